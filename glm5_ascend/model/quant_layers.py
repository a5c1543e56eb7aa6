"""W8A8 layers: int8 weights with one float32 scale per output row, activations quantized per token.

`W8A8Linear` stands in for a Replicated / Column / Row parallel linear with the same sharding and
collectives; `W8A8Experts` for a layer's routed experts. `quantize_model` swaps them in by module
name. The model is built on the meta device first (glm5.GlmMoeDsaForCausalLM), so the high-precision
weights a W8A8 layer replaces are never allocated. Their weight loaders take this rank's part of an
int8 checkpoint tensor as stored, or quantize a float / FP8 one at load (model/quant.py).
"""
from __future__ import annotations

import torch
from torch import nn

from glm5_ascend import ops
from glm5_ascend.distributed import tp_all_reduce
from glm5_ascend.model import quant
from glm5_ascend.model.glm5 import Experts
from glm5_ascend.model.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, _param, shape_of


class W8A8Linear(nn.Module):
    """A parallel linear in W8A8: weight int8 [N_local, K_local], weight_scale float32 [N_local]."""

    w8a8 = True

    def __init__(self, like: ReplicatedLinear):
        super().__init__()
        self.kind = {ColumnParallelLinear: "column", RowParallelLinear: "row"}.get(type(like), "replicated")
        self.ps = getattr(like, "ps", None)
        self.reduce = getattr(like, "reduce", True)
        n, k = like.weight.shape
        self.weight = _param(n, k, dtype=torch.int8, loader=self._load)
        self.weight_scale = _param(n, dtype=torch.float32, loader=None)
        self.bias = like.bias  # sharded like the float layer's (its weight_loader kept)

    def _load(self, param: torch.Tensor, loaded) -> None:
        n, k = self.weight.shape
        full = shape_of(loaded)
        dim = {"column": 0, "row": 1}.get(self.kind)
        if len(full) != 2 or dim is None or full == (n, k):
            if full != (n, k):
                raise ValueError(f"shape {full} does not match the model's {(n, k)}")
            dim, start, length = None, 0, None
        else:
            size = (n, k)[dim]
            if full[dim] % size or full[dim] // size <= self.ps.tp_rank or full[1 - dim] != (n, k)[1 - dim]:
                raise ValueError(f"shape {full} does not split into the model's {(n, k)} shards")
            start, length = self.ps.tp_rank * size, size
        q, scale = quant.read_int8_part(loaded, dim, start, length)
        self.weight.data.copy_(q)
        self.weight_scale.data.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.w8a8_linear(x, self.weight, self.weight_scale)
        if self.kind == "row":
            if not self.reduce:
                return out
            out = tp_all_reduce(out, self.ps)
        return out + self.bias if self.bias is not None else out


class W8A8Experts(Experts):
    """This rank's routed experts in W8A8: w13 int8 [E, 2I, D] + w13_weight_scale [E, 2I], w2 int8 [E, D, I] +
    w2_weight_scale [E, D]. Per-row scales are those of whole checkpoint rows, so a TP split of I keeps them."""

    w8a8 = True

    def __init__(self, like: Experts):
        nn.Module.__init__(self)
        for attr in ("total", "n_local", "first", "tp_parts", "tp_index", "inter"):
            setattr(self, attr, getattr(like, attr))
        E, two_i, d = like.w13_weight.shape
        self.w13_weight = _param(E, two_i, d, dtype=torch.int8)
        self.w13_weight_scale = _param(E, two_i, dtype=torch.float32)
        self.w2_weight = _param(E, d, self.inter, dtype=torch.int8)
        self.w2_weight_scale = _param(E, d, dtype=torch.float32)

    def load_expert(self, expert: int, proj: str, loaded) -> None:
        e = expert - self.first
        full, d = self.inter * self.tp_parts, self.w13_weight.shape[2]
        want = (d, full) if proj == "down_proj" else (full, d)
        if shape_of(loaded) != want:
            raise ValueError(f"shape {shape_of(loaded)} does not match the model's {want}")
        lo, n = self.tp_index * self.inter, self.inter
        if proj == "down_proj":
            q, s = quant.read_int8_part(loaded, 1, lo, n)
            self.w2_weight.data[e].copy_(q)
            self.w2_weight_scale.data[e].copy_(s)
            return
        q, s = quant.read_int8_part(loaded, 0, lo, n)
        rows = slice(0, n) if proj == "gate_proj" else slice(n, 2 * n)
        self.w13_weight.data[e, rows].copy_(q)
        self.w13_weight_scale.data[e, rows].copy_(s)

    def load_fused(self, which: str, loaded) -> None:
        raise ValueError("the fused (transformers-internal) expert layout cannot load into W8A8 experts; "
                         "use per-expert tensors (glm5-ascend convert writes them)")

    def prepare_weights(self) -> None:
        """Nothing to repack: both backends read [E, N, K] (the npu one as a transposed view)."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return ops.grouped_mlp_w8a8(x, counts, self.w13_weight, self.w13_weight_scale, self.w2_weight,
                                    self.w2_weight_scale)


_LINEARS = (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear)


def quantize_model(model: nn.Module, float_modules: set[str]) -> None:
    """Swap every linear and expert group not in float_modules (and not one the model reads as a weight,
    quant.MODEL_FLOAT_ONLY) for its W8A8 form. An expert group stays float if any of its experts is."""
    for name, mod in list(model.named_modules()):
        if type(mod) in _LINEARS:
            if name in float_modules or quant.keep_high_precision(name, quant.MODEL_FLOAT_ONLY):
                continue
            new = W8A8Linear(mod)
        elif type(mod) is Experts:
            if any(m.startswith(name + ".") for m in float_modules):
                continue
            new = W8A8Experts(mod)
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Meta parameters -> uninitialised ones on `device`, keeping their attributes (weight_loader)."""
    for mod in model.modules():
        for key, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
                new.__dict__.update(p.__dict__)
                mod._parameters[key] = new
