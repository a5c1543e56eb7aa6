"""Safetensors checkpoint -> model parameters, one tensor at a time, each rank only its own part.

Reads a single model.safetensors or the shards listed in model.safetensors.index.json. Each tensor
is opened as a lazy safetensors slice (`get_slice`) and the parameter's weight_loader reads just
this rank's rows or columns of it, straight into the (already allocated) parameter: a rank never
builds a tensor it does not own, and the weights never exist twice in memory. Experts another EP
rank owns are not opened at all. Any missing, unexpected or mis-shaped tensor, and any unreadable
file, is an error naming the tensor and the file.

Quantized checkpoints (model/quant.py, docs/checkpoints.md): a weight's scales are read with it,
from whichever shard holds them. An FP8 weight is dequantized as it is read; an int8 weight goes
as stored into a W8A8 layer, or dequantized into a layer the model keeps in high precision.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from glm5_ascend.model import quant
from glm5_ascend.model.glm5 import Experts, GlmMoeDsaForCausalLM
from glm5_ascend.model.quant import CheckpointError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


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
    quantized = {name for name, m in model.named_modules() if getattr(m, "w8a8", False)}
    for name, param in model.named_parameters():
        owner, leaf = name.rsplit(".", 1)
        if owner in experts or (owner in quantized and leaf == quant.W8A8_SCALE):
            continue  # a W8A8 layer's scales load with its weight
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
    scales = _scales(files, model.cfg.quantization_config)
    files = {n: f for n, f in files.items() if n not in scales["all"]}
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
    handles = _Handles()
    block = quant.fp8_block(model.cfg.quantization_config)
    with torch.no_grad():
        for f, tensor_names in by_file.items():
            for name in tensor_names:
                _load_one(_source(handles, f, name, scales, block), f, name, targets[name])
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

    @property
    def dtype(self) -> str:
        """The safetensors dtype name (BF16, F32, F8_E4M3, I8...)."""
        return self._slice.get_dtype()

    def __getitem__(self, index) -> torch.Tensor:
        try:
            tensor = self._slice[index]
        except Exception as e:  # noqa: BLE001 - truncated data...
            raise CheckpointError(f"{self.f}: tensor {self.name} is unreadable ({e}); the file is corrupt, "
                                  "re-download it") from None
        # float8 has no isfinite; its dequantized values are checked (quant.Fp8BlockTensor)
        if tensor.is_floating_point() and tensor.element_size() > 1 and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{self.f}: tensor {self.name} holds NaN or Inf; the file is corrupt, re-download it")
        return tensor


class _Handles:
    """Open safetensors files by path, each opened once (a weight's scales may sit in another shard)."""

    def __init__(self):
        self._open: dict[Path, object] = {}

    def slice(self, f: Path, name: str) -> _Slice:
        if f not in self._open:
            self._open[f] = _open(f)
        return _Slice(self._open[f], f, name)


def _scales(files: dict[str, Path], qc: dict | None) -> dict:
    """Scale tensors by the weight they belong to: {"fp8": {weight: scale}, "int8": {weight: (scale, offset)},
    "all": every scale / offset name}. Errors name a scale without its weight, and scales config.json
    does not declare."""
    fp8, int8, every = {}, {}, set()
    for name in files:
        owner, _, leaf = name.rpartition(".")
        weight = f"{owner}.weight"
        if leaf == quant.FP8_SCALE:
            if quant.fp8_block(qc) is None:
                raise CheckpointError(f"{files[name]}: tensor {name} is an FP8 block scale, but config.json has no "
                                      "quantization_config with quant_method fp8; use the checkpoint's own config.json")
            fp8[weight] = name
        elif leaf in (quant.W8A8_SCALE, quant.W8A8_OFFSET):
            if not quant.is_w8a8(qc):
                raise CheckpointError(f"{files[name]}: tensor {name} is an int8 weight scale, but the checkpoint "
                                      f"has no {quant.DESCRIPTION_FILE}; use the checkpoint as msmodelslim wrote it")
            pair = int8.setdefault(weight, [None, None])
            pair[0 if leaf == quant.W8A8_SCALE else 1] = name
        elif leaf in ("input_scale", "input_offset", "deq_scale", "quant_bias"):
            raise CheckpointError(f"{files[name]}: tensor {name} belongs to static W8A8 quantization, which is not "
                                  "supported; use a W8A8_DYNAMIC checkpoint (glm5-ascend convert --to w8a8)")
        else:
            continue
        every.add(name)
        if weight not in files:
            raise CheckpointError(f"{files[name]}: scale {name} has no weight {weight} in the checkpoint; "
                                  "the checkpoint is incomplete, re-download it")
    for weight, (scale, _) in int8.items():
        if scale is None:
            raise CheckpointError(f"{files[weight]}: tensor {weight} has a {quant.W8A8_OFFSET} but no "
                                  f"{quant.W8A8_SCALE}; the checkpoint is incomplete, re-download it")
    return {"fp8": fp8, "int8": int8, "all": every, "files": files}


def _source(handles: _Handles, f: Path, name: str, scales: dict, block):
    """The checkpoint tensor `name` as the layers read it: itself, or a dequantizing view with its scales."""
    loaded = handles.slice(f, name)
    where = f"{f}: tensor {name}"
    dtype, files = loaded.dtype, scales["files"]
    if quant.is_fp8_dtype(dtype):
        scale = scales["fp8"].get(name)
        if scale is None:
            raise CheckpointError(f"{where} is FP8 but its scale {name}_scale_inv is missing; the checkpoint is "
                                  "incomplete, re-download it")
        return quant.Fp8BlockTensor(loaded, handles.slice(files[scale], scale), block, where)
    if quant.is_int8_dtype(dtype):
        pair = scales["int8"].get(name)
        if pair is None:
            raise CheckpointError(f"{where} is int8 but its scale {name}_scale is missing; the checkpoint is "
                                  "incomplete, re-download it")
        offset = handles.slice(files[pair[1]], pair[1]) if pair[1] else None
        return quant.Int8ChannelTensor(loaded, handles.slice(files[pair[0]], pair[0]), offset, where)
    if name in scales["fp8"] or name in scales["int8"]:
        raise CheckpointError(f"{where} is {dtype} but has scales; a scaled weight must be FP8 (e4m3) or int8, "
                              "the checkpoint is inconsistent")
    return loaded


def _load_one(loaded, f: Path, name: str, target: tuple) -> None:
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
