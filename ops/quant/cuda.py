"""W8A8 operators on CUDA GPUs: the grouped expert GEMM in one Triton kernel per projection, with no host
sync (so a decode step that runs it can be captured in a CUDA graph); the linear layer is the reference's
(torch._int_mm, which waits for nothing either).

The products are the reference's exactly (int8 x int8 accumulated in int32); the dequantization rounds as
the reference does; SwiGLU's sigmoid is Triton's, so the result matches the reference to the last bit or
two of the activation dtype, not bit for bit.
"""
from __future__ import annotations

import torch
import triton

from glm5_ascend.ops.moe import cuda_kernels as moe_k
from . import cuda_kernels as k
from .reference import dynamic_quant, w8a8_linear

__all__ = ["w8a8_linear", "grouped_mlp_w8a8"]

# Tiles: 16 rows when experts hold a few rows each (decode), 64 for prefill; int8 K steps of 128.
BM_SMALL, BM_LARGE, BN, BK = 16, 64, 128, 128


def _grouped(xq, xs, w, ws, counts, out, n_out, up_off, swiglu, bm) -> None:
    M, K = xq.shape
    E = counts.shape[0]
    num_n = triton.cdiv(n_out, BN)
    n_progs = (triton.cdiv(M, bm) + E) * num_n  # a static bound: nothing waits for the GPU
    table = torch.empty((4, n_progs), dtype=torch.int32, device=xq.device)
    e_p = triton.next_power_of_2(E)
    block = max(1, min(128, 16384 // e_p))
    moe_k.tile_table_kernel[(triton.cdiv(n_progs, block),)](counts, E, table, n_progs, NUM_N=num_n, SPAN=bm,
                                                            E_P=e_p, BLOCK=block, num_warps=4)
    k.w8a8_grouped_kernel[(n_progs,)](xq, xs, w, ws, out, table, n_progs, M, n_out, K, up_off, xq.stride(0),
                                      w.stride(0), w.stride(1), ws.stride(0), out.stride(0), BM=bm, BN=BN, BK=BK,
                                      SWIGLU=swiglu, EVEN_K=K % BK == 0, num_warps=4, num_stages=3)


def grouped_mlp_w8a8(x, counts, w13, w13_scale, w2, w2_scale) -> torch.Tensor:
    """SwiGLU experts in W8A8 over rows sorted by expert: x [M, D] -> [M, D]; rows past sum(counts) are
    unspecified (ops.grouped_mlp_w8a8's contract). See ops/quant/reference.py for the arithmetic."""
    M, D = x.shape
    inter = w13.shape[1] // 2
    out = torch.empty((M, D), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    bm = BM_SMALL if M <= BM_SMALL * counts.shape[0] else BM_LARGE
    xq, xs = dynamic_quant(x)
    h = torch.empty((M, inter), dtype=x.dtype, device=x.device)
    _grouped(xq, xs, w13.contiguous(), w13_scale.float().contiguous(), counts, h, inter, inter, True, bm)
    aq, as_ = dynamic_quant(h)
    _grouped(aq, as_, w2.contiguous(), w2_scale.float().contiguous(), counts, out, D, 0, False, bm)
    return out
