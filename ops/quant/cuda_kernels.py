"""Triton kernel of the W8A8 grouped expert GEMM: int8 x int8 products accumulated exactly in int32."""
from __future__ import annotations

import triton
import triton.language as tl

from glm5_ascend.ops.moe.cuda_kernels import _tile_of_program


@triton.jit
def _dequant(acc, w_scale, x_scale, OUT_DTYPE: tl.constexpr):
    """The reference's (acc * w_scale[n] * x_scale[t]) in float32, rounded to the activation dtype."""
    return ((acc.to(tl.float32) * w_scale[None, :]) * x_scale[:, None]).to(OUT_DTYPE).to(tl.float32)


@triton.jit
def w8a8_grouped_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, table_ptr, n_progs, N, n_out, k_dim, up_off,
                        s_x, s_we, s_wn, s_wse, s_o, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        SWIGLU: tl.constexpr, EVEN_K: tl.constexpr):
    """out[rows of expert e] = dequant(xq[rows] @ w[e]^T) for int8 xq (per-row scales xs) and int8 w[e]
    ([n_out (+ up_off), k_dim], per-row scales ws[e]). With SWIGLU the program also multiplies rows
    up_off.. of w[e] and writes silu(gate) * up, each dequantized and rounded to out's dtype first, as
    the reference rounds its [N, 2I] product. table_ptr: tile_table_kernel's table with SPAN = BM."""
    e, r0, r1, nt = _tile_of_program(table_ptr, n_progs)
    if e >= 0:
        rows = r0 + tl.arange(0, BM)
        cols = nt * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        rows_c = tl.minimum(rows, N - 1).to(tl.int64)
        cols_c = tl.minimum(cols, n_out - 1).to(tl.int64)
        a_ptrs = x_ptr + rows_c[:, None] * s_x + offs_k[None, :]
        g_ptrs = w_ptr + e.to(tl.int64) * s_we + cols_c[:, None] * s_wn + offs_k[None, :]
        up = up_off.to(tl.int64) * s_wn
        acc_g = tl.zeros([BM, BN], tl.int32)
        acc_u = tl.zeros([BM, BN], tl.int32)
        for k0 in range(0, k_dim, BK):
            if EVEN_K:
                a = tl.load(a_ptrs)
                bg = tl.load(g_ptrs)
            else:
                km = (k0 + offs_k) < k_dim
                a = tl.load(a_ptrs, mask=km[None, :], other=0)
                bg = tl.load(g_ptrs, mask=km[None, :], other=0)
            acc_g = tl.dot(a, tl.trans(bg), acc_g, out_dtype=tl.int32)
            if SWIGLU:
                if EVEN_K:
                    bu = tl.load(g_ptrs + up)
                else:
                    bu = tl.load(g_ptrs + up, mask=km[None, :], other=0)
                acc_u = tl.dot(a, tl.trans(bu), acc_u, out_dtype=tl.int32)
            a_ptrs += BK
            g_ptrs += BK
        xs = tl.load(xs_ptr + rows_c)
        ws = ws_ptr + e.to(tl.int64) * s_wse
        h = _dequant(acc_g, tl.load(ws + cols_c), xs, out_ptr.dtype.element_ty)
        if SWIGLU:
            u = _dequant(acc_u, tl.load(ws + up_off + cols_c), xs, out_ptr.dtype.element_ty)
            h = h * tl.sigmoid(h) * u
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * s_o + cols[None, :], h.to(out_ptr.dtype.element_ty),
                 mask=(rows < r1)[:, None] & (cols < n_out)[None, :])
