"""Triton kernels of the MoE ops: grouped GEMM (optionally with SwiGLU fused), SwiGLU, unpermute."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_mm(a_ptrs, a2_ptrs, g_ptrs, up_step, k_dim, BM: tl.constexpr, BM2: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr, REM: tl.constexpr, SWIGLU: tl.constexpr,
             EVEN_K: tl.constexpr, PREC: tl.constexpr):
    """The K loop of one tile: x rows (a_ptrs) times a weight tile (g_ptrs, and the up rows
    up_step further with SWIGLU); with REM also BM2 more rows (a2_ptrs) against the same weight
    tiles, loaded once for both."""
    offs_k = tl.arange(0, BK)
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    acc_g2 = tl.zeros([BM2, BN], tl.float32)
    acc_u2 = tl.zeros([BM2, BN], tl.float32)
    for k0 in range(0, k_dim, BK):
        km = (k0 + offs_k) < k_dim
        if EVEN_K:
            a = tl.load(a_ptrs)
            bg = tl.load(g_ptrs)
        else:
            a = tl.load(a_ptrs, mask=km[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=km[None, :], other=0.0)
        acc_g = tl.dot(a, tl.trans(bg), acc_g, input_precision=PREC)
        if REM:
            if EVEN_K:
                a2 = tl.load(a2_ptrs)
            else:
                a2 = tl.load(a2_ptrs, mask=km[None, :], other=0.0)
            acc_g2 = tl.dot(a2, tl.trans(bg), acc_g2, input_precision=PREC)
        if SWIGLU:
            if EVEN_K:
                bu = tl.load(g_ptrs + up_step)
            else:
                bu = tl.load(g_ptrs + up_step, mask=km[None, :], other=0.0)
            acc_u = tl.dot(a, tl.trans(bu), acc_u, input_precision=PREC)
            if REM:
                acc_u2 = tl.dot(a2, tl.trans(bu), acc_u2, input_precision=PREC)
        a_ptrs += BK
        a2_ptrs += BK
        g_ptrs += BK
    if SWIGLU:
        acc_g = acc_g * tl.sigmoid(acc_g) * acc_u
        acc_g2 = acc_g2 * tl.sigmoid(acc_g2) * acc_u2
    return acc_g, acc_g2


@triton.jit
def _tile_of_program(tiles_ptr, order_ptr, n_tiles_pad, n_progs, NUM_N: tl.constexpr, GROUP: tl.constexpr,
                     BY_EXPERT: tl.constexpr):
    """(expert or -1, first row, end row of the expert, N tile) of this program; see grouped_gemm_kernel."""
    pid = tl.program_id(0)
    if BY_EXPERT:  # order_ptr: [2, n_progs] (M tile or -1, N tile), all of an expert's programs together
        mt = tl.load(order_ptr + pid)
        nt = tl.load(order_ptr + n_progs + pid)
    else:
        per_group = GROUP * NUM_N
        mt = (pid // per_group) * GROUP + pid % GROUP
        nt = (pid % per_group) // GROUP
    e = tl.load(tiles_ptr + tl.maximum(mt, 0))
    e = tl.where(mt >= 0, e, -1)
    r0 = tl.load(tiles_ptr + n_tiles_pad + tl.maximum(mt, 0))
    r1 = tl.load(tiles_ptr + 2 * n_tiles_pad + tl.maximum(mt, 0))
    return e, r0, r1, nt


@triton.jit
def _store_tile(out_ptr, acc, rows, r_end, cols, n_out, s_o):
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * s_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < r_end)[:, None] & (cols < n_out)[None, :])


@triton.jit
def grouped_gemm_kernel(x_ptr, w_ptr, out_ptr, tiles_ptr, n_tiles_pad, N, n_out, k_dim, up_off,
                        s_x, s_we, s_wn, s_o, order_ptr, n_progs, NUM_N: tl.constexpr, BM: tl.constexpr,
                        BM2: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                        SWIGLU: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr,
                        BY_EXPERT: tl.constexpr, REM: tl.constexpr):
    """out[rows of expert e] = x[rows] @ w[e]^T (w[e]: [n_out (+ up_off), k_dim], k contiguous).

    tiles_ptr holds [3, n_tiles_pad] int32: expert (-1 = unused), first row, end row of the expert,
    for tiles of BM (+ BM2 with REM) rows sorted by expert. A tile multiplies its first BM rows, and
    with REM its next BM2 rows when the expert has them: the rows an expert has beyond a multiple of
    BM then share the weight tiles of the BM before them instead of costing a tile of their own,
    which would read the weights once more and multiply mostly padding. With SWIGLU the program
    also multiplies rows up_off.. of w[e] and writes silu(gate) * up, so the [N, 2I] gate/up
    product never reaches memory. Program order: with BY_EXPERT from order_ptr (expert by expert,
    N tile, then M tile fastest), else GROUP M tiles at a time, M fastest; either way the tiles of
    one expert run side by side and share each weight tile through L2 (weights, not activations,
    dominate the bytes at GLM-5's ~128 rows/expert)."""
    e, r0, r1, nt = _tile_of_program(tiles_ptr, order_ptr, n_tiles_pad, n_progs, NUM_N, GROUP, BY_EXPERT)
    if e >= 0:
        rows = r0 + tl.arange(0, BM)
        cols = nt * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        # Clamp instead of masking so the main-loop loads stay unmasked; extra rows/cols are not stored.
        rows_c = tl.minimum(rows, N - 1).to(tl.int64)
        cols_c = tl.minimum(cols, n_out - 1).to(tl.int64)
        a_ptrs = x_ptr + rows_c[:, None] * s_x + offs_k[None, :]
        g_ptrs = w_ptr + e.to(tl.int64) * s_we + cols_c[:, None] * s_wn + offs_k[None, :]
        rows2 = r0 + BM + tl.arange(0, BM2)
        a2_ptrs = x_ptr + tl.minimum(rows2, N - 1).to(tl.int64)[:, None] * s_x + offs_k[None, :]
        if REM and (r1 > r0 + BM):
            acc, acc2 = _tile_mm(a_ptrs, a2_ptrs, g_ptrs, up_off * s_wn, k_dim, BM, BM2, BN, BK, True,
                                 SWIGLU, EVEN_K, PREC)
            _store_tile(out_ptr, acc2, rows2, r1, cols, n_out, s_o)
        else:
            acc, acc2 = _tile_mm(a_ptrs, a2_ptrs, g_ptrs, up_off * s_wn, k_dim, BM, BM2, BN, BK, False,
                                 SWIGLU, EVEN_K, PREC)
        _store_tile(out_ptr, acc, rows, tl.minimum(r1, r0 + BM), cols, n_out, s_o)


@triton.jit
def _tile_mm_tma(x_desc, x2_desc, w_desc, r0, wrow, up_off, k_dim, BM: tl.constexpr, BM2: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, REM: tl.constexpr, SWIGLU: tl.constexpr, PREC: tl.constexpr):
    """_tile_mm with every tile fetched by the tensor-memory accelerator (zeros past the edges)."""
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    acc_g2 = tl.zeros([BM2, BN], tl.float32)
    acc_u2 = tl.zeros([BM2, BN], tl.float32)
    for k0 in range(0, k_dim, BK):
        a = x_desc.load([r0, k0])
        bg = w_desc.load([wrow, k0])
        acc_g = tl.dot(a, bg.T, acc_g, input_precision=PREC)
        if REM:
            a2 = x2_desc.load([r0 + BM, k0])
            acc_g2 = tl.dot(a2, bg.T, acc_g2, input_precision=PREC)
        if SWIGLU:
            bu = w_desc.load([wrow + up_off, k0])
            acc_u = tl.dot(a, bu.T, acc_u, input_precision=PREC)
            if REM:
                acc_u2 = tl.dot(a2, bu.T, acc_u2, input_precision=PREC)
    if SWIGLU:
        acc_g = acc_g * tl.sigmoid(acc_g) * acc_u
        acc_g2 = acc_g2 * tl.sigmoid(acc_g2) * acc_u2
    return acc_g, acc_g2


@triton.jit
def grouped_gemm_tma_kernel(x_desc, x2_desc, w_desc, out_ptr, tiles_ptr, n_tiles_pad, n_out, k_dim, w_rows,
                            up_off, s_o, order_ptr, n_progs, NUM_N: tl.constexpr, BM: tl.constexpr,
                            BM2: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                            SWIGLU: tl.constexpr, PREC: tl.constexpr, BY_EXPERT: tl.constexpr, REM: tl.constexpr):
    """grouped_gemm_kernel with tensor descriptors (Hopper and later): x_desc / x2_desc over x [N, K]
    in [BM, BK] / [BM2, BK] blocks, w_desc over the weights as [E * w_rows, K] in [BN, BK] blocks.
    The copies need no address registers, which the pointer kernel spends on its [BM, BK] and
    [BN, BK] pointer tiles; rows a tile reads past its expert are computed and not stored."""
    e, r0, r1, nt = _tile_of_program(tiles_ptr, order_ptr, n_tiles_pad, n_progs, NUM_N, GROUP, BY_EXPERT)
    if e >= 0:
        rows = r0 + tl.arange(0, BM)
        rows2 = r0 + BM + tl.arange(0, BM2)
        cols = nt * BN + tl.arange(0, BN)
        wrow = e * w_rows + nt * BN
        if REM and (r1 > r0 + BM):
            acc, acc2 = _tile_mm_tma(x_desc, x2_desc, w_desc, r0, wrow, up_off, k_dim, BM, BM2, BN, BK, True,
                                     SWIGLU, PREC)
            _store_tile(out_ptr, acc2, rows2, r1, cols, n_out, s_o)
        else:
            acc, acc2 = _tile_mm_tma(x_desc, x2_desc, w_desc, r0, wrow, up_off, k_dim, BM, BM2, BN, BK, False,
                                     SWIGLU, PREC)
        _store_tile(out_ptr, acc, rows, tl.minimum(r1, r0 + BM), cols, n_out, s_o)


@triton.jit
def swiglu_kernel(gu_ptr, out_ptr, inter, s_gu, s_o, BLOCK: tl.constexpr):
    """out[r] = silu(gu[r, :inter]) * gu[r, inter:], computed in float32."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < inter
    g = tl.load(gu_ptr + r * s_gu + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r * s_gu + inter + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * s_o + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def unpermute_kernel(eo_ptr, inv_ptr, w_ptr, out_ptr, d, s_eo, s_o,
                     TOPK: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j w[t, j] * expert_out[inv[t*TOPK + j]] (inv -1: a dropped copy), float32 sum."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < d
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j in tl.static_range(TOPK):
        src = tl.load(inv_ptr + t * TOPK + j)
        if src >= 0:
            wj = tl.load(w_ptr + t * TOPK + j).to(tl.float32)
            acc += wj * tl.load(eo_ptr + src.to(tl.int64) * s_eo + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * s_o + offs, acc.to(out_ptr.dtype.element_ty), mask=m)
