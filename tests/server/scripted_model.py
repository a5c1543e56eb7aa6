"""A tiny GLM-5 checkpoint that writes a given token chain: real architecture, real files, scripted output.

The random tiny model never writes a tool call on purpose. This one is the tiny checkpoint with every
layer's output projection (attention o_proj, MLP and expert down_proj) zeroed, so the final hidden
state of a token is its own (normalised) embedding, and an lm_head whose row for token b points along
that state for token a, for every step a -> b of the chain: greedy decoding then follows the chain
through the real engine (every layer still runs, on every rank of a layout).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def make_scripted(tiny_dir: str, out_dir: Path, chain: list[int]) -> Path:
    """Copy tiny_dir to out_dir with weights that continue chain[i] with chain[i + 1]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(tiny_dir).iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out_dir / f.name)
    tensors = load_file(str(Path(tiny_dir) / "model.safetensors"))
    for name, t in tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(t)
    embed, norm = tensors["model.embed_tokens.weight"], tensors["model.norm.weight"]
    state = embed * torch.rsqrt(embed.pow(2).mean(-1, keepdim=True) + 1e-5) * norm  # final RMSNorm of each token
    head = torch.randn(tensors["lm_head.weight"].shape, generator=torch.Generator().manual_seed(1)) * 1e-3
    for a, b in zip(chain, chain[1:]):
        head[b] += 10 * state[a] / state[a].norm()
    tensors["lm_head.weight"] = head
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
