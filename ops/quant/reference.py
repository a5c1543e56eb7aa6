"""W8A8 operators, pure torch: the spec (and the CUDA / CPU path).

W8A8 dynamic: weights int8 with one float32 scale per output row (symmetric), activations quantized
per token at run time: scale_t = max|x_t| / 127, q_t = round(x_t / scale_t). The integer product is
exact (int32 accumulation, torch._int_mm), then y = acc * w_scale[n] * x_scale[t] in float32, cast
to the activation dtype. The npu backend (ops/quant/npu.py) computes the same with npu_dynamic_quant
and npu_quant_matmul / the quantized npu_grouped_matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127.0


def dynamic_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: x [M, K] float -> (int8 [M, K], float32 scale [M]); an all-zero row gets scale 0."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe[:, None]).clamp_(-128, 127).to(torch.int8)
    return q, scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 [M, K] times b int8 [N, K] transposed -> exact int32 [M, N] (torch._int_mm)."""
    M = a.shape[0]
    if M == 0:
        return torch.zeros(0, b.shape[0], dtype=torch.int32, device=a.device)
    if a.is_cuda and M <= 16:  # cuBLASLt's int8 GEMM takes M > 16; pad the rows
        pad = torch.zeros(32 - M, a.shape[1], dtype=torch.int8, device=a.device)
        return torch._int_mm(torch.cat([a, pad]), b.t())[:M]
    return torch._int_mm(a, b.t())


def _dequant(acc: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (acc.float() * w_scale.float()[None, :] * x_scale[:, None]).to(dtype)


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] float, weight int8 [N, K], weight_scale float32 [N] -> [..., N] in x's dtype."""
    lead = x.shape[:-1]
    q, s = dynamic_quant(x.reshape(-1, x.shape[-1]))
    return _dequant(int8_matmul(q, weight), weight_scale, s, x.dtype).reshape(*lead, weight.shape[0])


def grouped_mlp_w8a8(x, counts, w13, w13_scale, w2, w2_scale) -> torch.Tensor:
    """SwiGLU experts in W8A8 over rows sorted by expert: x [M, D] -> [N, D], N = sum(counts).

    w13 int8 [E, 2I, D] (gate rows, then up rows) with w13_scale float32 [E, 2I]; w2 int8 [E, D, I]
    with w2_scale [E, D]. The SwiGLU output is quantized per token again before the down projection.
    """
    n = int(counts.sum())
    xq, xs = dynamic_quant(x[:n])
    inter = w13.shape[1] // 2
    h = x.new_empty(n, 2 * inter)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            rows = slice(start, start + c)
            h[rows] = _dequant(int8_matmul(xq[rows], w13[e]), w13_scale[e], xs[rows], x.dtype)
            start += c
    a = (F.silu(h[:, :inter].float()) * h[:, inter:].float()).to(x.dtype)
    aq, as_ = dynamic_quant(a)
    out = x.new_empty(n, x.shape[1])
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            rows = slice(start, start + c)
            out[rows] = _dequant(int8_matmul(aq[rows], w2[e]), w2_scale[e], as_[rows], x.dtype)
            start += c
    return out
