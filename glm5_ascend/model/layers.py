"""Building blocks: tensor-parallel linear / embedding layers, norms and RoPE frequencies.

Each parameter carries a `weight_loader(param, loaded)` that copies this rank's shard, so the
checkpoint loader stays a name lookup. `loaded` is a torch.Tensor or a lazy safetensors slice;
`read` takes only this rank's part of it, so no rank builds a tensor it does not own. Collectives
run inside forward, in plain sight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5_ascend.distributed import ParallelState, split, tp_all_gather_last, tp_all_reduce


def shape_of(loaded) -> tuple[int, ...]:
    """Shape of a checkpoint tensor, without reading it (torch.Tensor or safetensors slice)."""
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def read(loaded, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
    """The rows [start, start + length) along `dim` of a checkpoint tensor (all of it if dim is None).
    Indexing a safetensors slice reads only those bytes; indexing a tensor is a view."""
    if dim is None:
        return loaded[...]
    return loaded[(slice(None),) * dim + (slice(start, start + length),)]


def _copy_loader(param: torch.Tensor, loaded) -> None:
    if tuple(param.shape) != shape_of(loaded):
        raise ValueError(f"shape {shape_of(loaded)} does not match the model's {tuple(param.shape)}")
    param.data.copy_(read(loaded))


def shard_loader(dim: int, rank_of):
    """A weight_loader taking shard `rank_of()` of the checkpoint tensor along dim (whole when it already fits)."""
    def load(param: torch.Tensor, loaded) -> None:
        n, full = param.shape[dim], shape_of(loaded)
        if len(full) != param.dim() or full[dim] == n:
            return _copy_loader(param, loaded)
        if full[dim] % n or full[dim] // n <= rank_of():
            raise ValueError(f"shape {full} does not split into the model's {tuple(param.shape)} shards")
        part = read(loaded, dim, rank_of() * n, n)
        if part.shape != param.shape:
            raise ValueError(f"shape {full} does not match the model's {tuple(param.shape)} shards")
        param.data.copy_(part)
    return load


def _param(*shape: int, dtype: torch.dtype | None = None, loader=_copy_loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    return p


class ReplicatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(ReplicatedLinear):
    """Output features split over tp ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, bias: bool = False, dtype=None):
        self.ps = ps
        super().__init__(in_features, split(out_features, ps.tp_size, "output features"), bias, dtype)
        self.weight.weight_loader = shard_loader(0, lambda: ps.tp_rank)
        if self.bias is not None:
            self.bias.weight_loader = shard_loader(0, lambda: ps.tp_rank)


class RowParallelLinear(ReplicatedLinear):
    """Input features split over tp ranks; partial outputs are all-reduced (unless reduce=False: the
    caller sums them itself, e.g. with another partial, in one all-reduce)."""

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, bias: bool = False, dtype=None,
                 reduce: bool = True):
        self.ps, self.reduce = ps, reduce
        super().__init__(split(in_features, ps.tp_size, "input features"), out_features, False, dtype)
        self.weight.weight_loader = shard_loader(1, lambda: ps.tp_rank)
        if bias and not reduce:
            raise ValueError("a RowParallelLinear with a bias must reduce (the bias is added once, after it)")
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if not self.reduce:
            return out
        out = tp_all_reduce(out, self.ps)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over tp ranks; out-of-shard ids contribute zero before the all-reduce."""

    def __init__(self, vocab: int, dim: int, ps: ParallelState, dtype=None):
        super().__init__()
        self.ps = ps
        self.shard = split(vocab, ps.tp_size, "vocab_size")
        self.start = ps.tp_rank * self.shard
        self.weight = _param(self.shard, dim, dtype=dtype, loader=shard_loader(0, lambda: ps.tp_rank))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.shard)
        out = F.embedding(local.clamp(0, self.shard - 1), self.weight) * inside[..., None]
        return tp_all_reduce(out, self.ps)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return tp_all_gather_last(F.linear(hidden, self.weight), self.ps)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as the reference does)."""

    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype)
        self.bias = _param(dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class InterleavedRope(nn.Module):
    """GLM-5 RoPE frequencies: cos / sin [T, dim/2] of each position, for ops.interleaved_rope
    (pairs (x0, x1), (x2, x3)... rotate together)."""

    def __init__(self, dim: int, rope_parameters: dict, max_position: int, hf_fields: dict):
        super().__init__()
        theta = float(rope_parameters["rope_theta"])
        if rope_parameters.get("rope_type", "default") == "default":
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            self.attention_scaling = 1.0
        else:  # yarn and friends: use transformers' own frequency code, not a copy of it
            from transformers import GlmMoeDsaConfig
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            hf = GlmMoeDsaConfig(**hf_fields, rope_parameters=dict(rope_parameters),
                                 max_position_embeddings=max_position)
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf, "cpu")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[:, None].float() * self.inv_freq.float()
        return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)
