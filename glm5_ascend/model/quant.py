"""Quantized checkpoints: FP8 block-scaled (GLM-5-FP8) and W8A8 (int8, msmodelslim layout).

FP8 (config.json `quantization_config.quant_method: fp8`): a weight `<m>.weight` is float8_e4m3fn with
`<m>.weight_scale_inv` fp32 [ceil(N / bn), ceil(K / bk)], one value per bn x bk block, and
weight = fp8 * scale_inv. Ascend NPUs and the CPU have no fast FP8 matmul, so the loader
dequantizes each tensor at load, only the part this rank reads (`Fp8BlockTensor`).

W8A8 (`quant_model_description.json` beside config.json, `model_quant_type: W8A8_DYNAMIC`, the layout
msmodelslim writes and vllm-ascend serves): a quantized `<m>.weight` is int8 [N, K] with
`<m>.weight_scale` [N, 1] and `<m>.weight_offset` [N, 1] (zero: symmetric), weight = int8 * scale;
activations are quantized per token at run time. Modules the description marks FLOAT are plain.
Checkpoint and model may disagree per module: a quantized tensor the model keeps in high precision
is dequantized at load (`Int8ChannelTensor`), a float one the model runs in W8A8 is quantized at load.

Every lazy tensor here has `get_shape()` and `[...]` like a safetensors slice, so the layers' weight
loaders read them unchanged. docs/checkpoints.md describes both formats.
"""
from __future__ import annotations

import fnmatch
import math

import torch

FP8_SCALE = "weight_scale_inv"
W8A8_SCALE, W8A8_OFFSET = "weight_scale", "weight_offset"
DESCRIPTION_FILE = "quant_model_description.json"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
_FP8_DTYPES = ("F8_E4M3",)
_INT8_DTYPES = ("I8",)

# Modules kept in high precision by default when converting to (or serving as) W8A8. vllm-ascend's
# GLM-5 W8A8 keeps the same kinds: embeddings, lm_head, norms (not linears), the router and the indexer.
# kv_b_proj is absorbed into attention (its weight is read, not run) and stays high precision too.
DEFAULT_KEEP = ("*embed_tokens", "lm_head", "*.shared_head.*", "*.eh_proj", "*.mlp.gate", "*.self_attn.indexer.*",
                "*.self_attn.kv_b_proj")
# Linears the model reads as weights (never runs as a linear): always high precision in the model.
MODEL_FLOAT_ONLY = ("*.self_attn.kv_b_proj", "*.self_attn.indexer.weights_proj")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def is_fp8_dtype(st_dtype: str) -> bool:
    return st_dtype in _FP8_DTYPES


def is_int8_dtype(st_dtype: str) -> bool:
    return st_dtype in _INT8_DTYPES


def fp8_block(qc: dict | None) -> tuple[int, int] | None:
    """The FP8 block (rows, cols) of a quantization_config, None when it is not FP8."""
    if not qc or qc.get("quant_method") != "fp8":
        return None
    bn, bk = qc["weight_block_size"]
    return int(bn), int(bk)


def is_w8a8(qc: dict | None) -> bool:
    return bool(qc) and qc.get("quant_method") == "msmodelslim"


def keep_high_precision(module: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


def _shape_of(t) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t.get_shape())


def _region(index, shape) -> list[slice]:
    """The per-dimension slices of `index` (Ellipsis or a tuple of slices from layers.read)."""
    if index is Ellipsis:
        index = ()
    if not isinstance(index, tuple):
        index = (index,)
    out = []
    for d, n in enumerate(shape):
        s = index[d] if d < len(index) else slice(None)
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise CheckpointError("a quantized tensor can only be read in contiguous row / column ranges")
        start, stop, _ = s.indices(n)
        out.append(slice(start, max(start, stop)))
    return out


def _expand(scale: torch.Tensor, block: int, dim: int, region: slice) -> torch.Tensor:
    """Block scales -> one scale per element of `region` along dim (scale holds blocks from region.start // block)."""
    rep = scale.repeat_interleave(block, dim=dim)
    off = region.start - (region.start // block) * block
    return rep.narrow(dim, off, region.stop - region.start)


def _finite(t: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise CheckpointError(f"{where} holds NaN or Inf after dequantization; the file is corrupt, re-download it")
    return t


class Fp8BlockTensor:
    """A float8 weight and its block scales, read as float32 (only the requested rows / columns)."""

    def __init__(self, weight, scale, block: tuple[int, int], where: str):
        self.weight, self.scale, self.block, self.where = weight, scale, block, where
        shape = _shape_of(weight)
        if len(shape) != 2:
            raise CheckpointError(f"{where}: an FP8 weight must be 2-D, got shape {list(shape)}")
        want = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
        got = _shape_of(scale)
        if got != want:
            raise CheckpointError(f"{where}: {FP8_SCALE} has shape {list(got)} but weight {list(shape)} in "
                                  f"{block[0]}x{block[1]} blocks needs {list(want)}; the scales do not belong to "
                                  "this weight (check weight_block_size in config.json)")
        self._shape = shape

    def get_shape(self) -> tuple[int, ...]:
        return self._shape

    def __getitem__(self, index) -> torch.Tensor:
        rows, cols = _region(index, self._shape)
        (bn, bk) = self.block
        w = self.weight[rows, cols].float()
        s = self.scale[rows.start // bn:math.ceil(rows.stop / bn), cols.start // bk:math.ceil(cols.stop / bk)].float()
        return _finite(w * _expand(_expand(s, bn, 0, rows), bk, 1, cols), self.where)


class Int8ChannelTensor:
    """An int8 weight [N, K] (or [N, K] of one expert) with per-row scales [N, 1] / [N] and zero offsets.

    `[...]` reads it dequantized (float32); `quantized(rows, cols)` reads the int8 values and scales as stored.
    """

    def __init__(self, weight, scale, offset, where: str):
        self.weight, self.scale, self.offset, self.where = weight, scale, offset, where
        shape = _shape_of(weight)
        if len(shape) != 2:
            raise CheckpointError(f"{where}: an int8 weight must be 2-D, got shape {list(shape)}")
        for label, t in ((W8A8_SCALE, scale), (W8A8_OFFSET, offset)):
            if t is not None and _shape_of(t) not in ((shape[0], 1), (shape[0],)):
                raise CheckpointError(f"{where}: {label} has shape {list(_shape_of(t))} but weight {list(shape)} "
                                      f"needs [{shape[0]}, 1] (one per output row); the scales do not belong to "
                                      "this weight")
        self._shape = shape

    def get_shape(self) -> tuple[int, ...]:
        return self._shape

    def _rows(self, t, rows: slice) -> torch.Tensor:
        return t[rows].reshape(-1).float()

    def quantized(self, rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 [rows, cols], float32 scale [rows]) as stored."""
        if self.offset is not None and bool(self._rows(self.offset, rows).ne(0).any()):
            raise CheckpointError(f"{self.where}: {W8A8_OFFSET} is not zero; asymmetric int8 weights are not "
                                  "supported (W8A8_DYNAMIC is symmetric), re-quantize symmetrically")
        scale = _finite(self._rows(self.scale, rows), f"{self.where} ({W8A8_SCALE})")
        return self.weight[rows, cols], scale

    def __getitem__(self, index) -> torch.Tensor:
        rows, cols = _region(index, self._shape)
        q, scale = self.quantized(rows, cols)
        return q.float() * scale[:, None]


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w [N, K] -> (int8 [N, K], float32 scale [N]) with w ~= q * scale."""
    wf = w.float()
    amax = wf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(wf / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 with one scale per block: w [N, K] -> (float8_e4m3fn [N, K], float32 scale_inv [N/bn, K/bk] rounded up),
    w ~= q * scale_inv (the GLM-5-FP8 / DeepSeek-V3 convention)."""
    bn, bk = block
    N, K = w.shape
    nb, kb = math.ceil(N / bn), math.ceil(K / bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32)
    padded[:N, :K] = w.float()
    blocks = padded.view(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * bn, kb * bk)[:N, :K].contiguous(), scale


def read_int8_part(loaded, dim: int | None, start: int, length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of a weight [N, K] for a W8A8 layer: (int8, float32 scale [rows]).

    dim 0 (rows) / None (all): the rows' own scales. dim 1 (columns, a row-parallel split): the scales of
    whole rows, so every rank quantizes a row alike; a float source is then read in whole rows (once).
    `loaded` is an Int8ChannelTensor (read as stored) or any float source (quantized here).
    """
    N, K = _shape_of(loaded)
    rows = slice(start, start + length) if dim == 0 else slice(0, N)
    cols = slice(start, start + length) if dim == 1 else slice(0, K)
    if isinstance(loaded, Int8ChannelTensor):
        return loaded.quantized(rows, cols)
    q, scale = quantize_int8_rows(loaded[rows, :])
    return q[:, cols], scale
