"""Safetensors checkpoint -> model parameters, one tensor at a time, each rank only its own part.

Reads a single model.safetensors or the shards listed in model.safetensors.index.json. Each tensor
is opened as a lazy safetensors slice (`get_slice`) and the parameter's weight_loader reads just
this rank's rows or columns of it, straight into the (already allocated) parameter: a rank never
builds a tensor it does not own, and the weights never exist twice in memory. Experts another EP
rank owns are not opened at all. Any missing, unexpected or mis-shaped tensor, and any unreadable
file, is an error naming the tensor and the file.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from glm5_ascend.model.glm5 import Experts, GlmMoeDsaForCausalLM

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name to the file holding it."""
    root = Path(path)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e}); re-download the checkpoint") from None
        files = {name: root / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {INDEX_FILE} but missing; re-download that shard")
        return files
    single = root / "model.safetensors"
    candidates = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
    if not candidates:
        raise CheckpointError(f"{root}: no *.safetensors files; pass --model a checkpoint directory")
    files: dict[str, Path] = {}
    for f in candidates:
        for name in _open(f).keys():
            files[name] = f
    return files


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e}); re-download it") from None


def _targets(model: GlmMoeDsaForCausalLM) -> dict[str, tuple]:
    """Checkpoint tensor name -> how to load it, for every tensor this rank needs."""
    targets: dict[str, tuple] = {}
    experts: dict[str, Experts] = {}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            experts[name] = module
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if owner in experts:
            continue
        targets[name] = ("param", param)
    for prefix, mod in experts.items():
        total = mod.n_local * model.ps.ep_size
        for e in range(total):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                targets[f"{prefix}.{e}.{proj}.weight"] = ("expert", mod, e, proj) if mod.owns(e) else ("skip",)
    return targets


def load_weights(model: GlmMoeDsaForCausalLM, path: str | Path, progress: bool = False) -> None:
    """Load this rank's part of a Hugging Face GLM-5 checkpoint into `model` (allocated on its final
    device), then leave the experts' weights in the layout the grouped_mlp backend reads fastest
    (Experts.prepare_weights). progress: show a bar (rank 0 does)."""
    files = checkpoint_files(path)
    targets = _targets(model)
    mtp = model.cfg.mtp_layer_index
    mtp_prefix = f"model.layers.{mtp}." if mtp is not None else None
    # Duplicates of the main embedding / head some MTP checkpoints carry; the main ones are used.
    optional = {f"{mtp_prefix}embed_tokens.weight", f"{mtp_prefix}shared_head.head.weight"} if mtp_prefix else set()
    names = set(files)
    has_mtp = mtp_prefix is not None and any(n.startswith(mtp_prefix) for n in names)
    if mtp_prefix and not has_mtp:
        logger.warning("checkpoint has no MTP layer (model.layers.%d.*); MTP speculative decoding is unavailable", mtp)
        model.drop_mtp()
        targets = {k: v for k, v in targets.items() if not k.startswith(mtp_prefix)}
    fused = {n for n in names if _FUSED_EXPERT.match(n)}
    if fused:
        targets = _accept_fused_experts(targets, fused)
    missing = sorted(set(targets) - names)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]} "
                              "(is this a GLM-5 checkpoint matching config.json?)")
    extra = sorted(names - set(targets) - optional)
    if extra:
        raise CheckpointError(f"{files[extra[0]]}: unexpected tensor {extra[0]} ({len(extra)} in all) "
                              "not in GLM-5 for this config.json; check the checkpoint and config match")
    by_file: dict[Path, list[str]] = {}
    for name in sorted(targets):
        if targets[name][0] != "skip":
            by_file.setdefault(files[name], []).append(name)
    # Only a rank that shows the bar makes one: tqdm's lock is a semaphore a worker's fast exit would leak.
    bar = tqdm(total=sum(map(len, by_file.values())), desc="Loading weights", unit="tensor",
               mininterval=1.0) if progress else None
    with torch.no_grad():
        for f, tensor_names in by_file.items():
            handle = _open(f)
            for name in tensor_names:
                _load_one(handle, f, name, targets[name])
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    for module in model.modules():
        if isinstance(module, Experts):
            module.prepare_weights()


class _Slice:
    """A lazy checkpoint tensor: its shape without reading it, and any part of it read on indexing,
    checked for NaN / Inf and read errors (named by file and tensor)."""

    def __init__(self, handle, f: Path, name: str):
        self.f, self.name = f, name
        try:
            self._slice = handle.get_slice(name)
            self._shape = tuple(self._slice.get_shape())
        except Exception as e:  # noqa: BLE001 - bad header, unknown dtype...
            raise CheckpointError(f"{f}: tensor {name} is unreadable ({e}); the file is corrupt, re-download it") from None

    def get_shape(self) -> tuple[int, ...]:
        return self._shape

    def __getitem__(self, index) -> torch.Tensor:
        try:
            tensor = self._slice[index]
        except Exception as e:  # noqa: BLE001 - truncated data...
            raise CheckpointError(f"{self.f}: tensor {self.name} is unreadable ({e}); the file is corrupt, "
                                  "re-download it") from None
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{self.f}: tensor {self.name} holds NaN or Inf; the file is corrupt, re-download it")
        return tensor


def _load_one(handle, f: Path, name: str, target: tuple) -> None:
    loaded = _Slice(handle, f, name)
    try:
        kind = target[0]
        if kind == "param":
            param = target[1]
            param.weight_loader(param, loaded)
        elif kind == "expert":
            _, mod, e, proj = target
            mod.load_expert(e, proj, loaded)
        elif kind == "fused":
            _, mod, which = target
            mod.load_fused(which, loaded)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{f}: tensor {name}: {e}") from None


def _accept_fused_experts(targets: dict, fused: set[str]) -> dict:
    """transformers-internal layout: experts.gate_up_proj [E, 2I, D] and experts.down_proj [E, D, I]."""
    out = dict(targets)
    for name in fused:
        prefix, which = _FUSED_EXPERT.match(name).groups()
        per_expert = [k for k, v in targets.items() if k.startswith(prefix + ".") and _EXPERT.match(k)]
        mod = next((v[1] for k in per_expert if (v := targets[k])[0] == "expert"), None)
        for k in per_expert:
            out.pop(k, None)
        out[name] = ("fused", mod, which) if mod is not None else ("skip",)
    return out
