"""The built-in tiny model: a small GLM-5-architecture checkpoint written from a seed.

Its weights are random, so its text is meaningless; it exists so every command and test runs on a
laptop with the real code paths (MoE with n_group > 1, a 'shared' indexer layer, top-k smaller than
ordinary prompts, an MTP layer) and the real file formats (config.json, safetensors, tokenizer).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm5_ascend import envs
from glm5_ascend.config import ModelConfig
from glm5_ascend.model.tiny_tokenizer import EOS_TOKENS, special_token_ids, write_tiny_tokenizer

TINY_NAME = "tiny-glm5-v2"


def tiny_config(vocab_size: int) -> dict:
    """config.json of the tiny model, in Hugging Face's keys."""
    sp = special_token_ids()
    return {
        "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa", "dtype": "float32",
        "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 64, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
        "v_head_dim": 32, "head_dim": 16, "attention_bias": False,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "index_n_heads": 16, "index_head_dim": 32, "index_topk": 32, "index_topk_pattern": "FFSF",
        "indexer_rope_interleave": True, "rope_interleave": True,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.1,
        "eos_token_id": [sp[t] for t in EOS_TOKENS], "pad_token_id": sp["<|endoftext|>"],
    }


def _checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor name of cfg with its shape (per-expert names, MTP layer included)."""
    from glm5_ascend.model.glm5 import GlmMoeDsaForCausalLM
    from glm5_ascend.model.loader import _targets
    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(cfg, dtype=torch.float32)
    shapes = {}
    for name, target in _targets(model).items():
        if target[0] == "param":
            shapes[name] = tuple(target[1].shape)
        else:  # a routed expert's projection ("expert", module, expert id, proj)
            proj = target[3]
            inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
            shapes[name] = (hidden, inter) if proj == "down_proj" else (inter, hidden)
    return shapes


def make_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint (config, safetensors, tokenizer) into out_dir, deterministically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(out)
    raw = tiny_config(-(-vocab // 32) * 32)
    cfg = ModelConfig.from_dict(raw)
    gen = torch.Generator().manual_seed(seed)
    std = raw["initializer_range"]
    tensors = {}
    for name, shape in sorted(_checkpoint_shapes(cfg).items()):
        if name.endswith("e_score_correction_bias"):
            t = torch.randn(shape, generator=gen) * 0.05
        elif len(shape) == 1:  # norm weights near one, LayerNorm biases near zero
            base = 0.0 if name.endswith(".bias") else 1.0
            t = base + torch.randn(shape, generator=gen) * 0.1
        else:
            t = torch.randn(shape, generator=gen) * std
        tensors[name] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    gen_cfg = {"eos_token_id": raw["eos_token_id"], "pad_token_id": raw["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    return out


def default_model_path() -> Path:
    """The tiny model in the user cache directory, created on first use (safe against races)."""
    target = envs.cache_dir() / TINY_NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TINY_NAME + ".", dir=target.parent))
    try:
        make_tiny(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; use its copy
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
