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
def tile_table_kernel(counts_ptr, E, table_ptr, n_progs, NUM_N: tl.constexpr, SPAN: tl.constexpr,
                      E_P: tl.constexpr, BLOCK: tl.constexpr):
    """The grouped GEMM's program table, [4, n_progs] int32 (expert or -1, first row of the tile, end row
    of the expert, N tile), from the rows per expert: expert by expert, then N tile, M tile fastest, so
    an expert's tiles run side by side and share each weight tile through L2 (weights, not
    activations, dominate the bytes at GLM-5's ~128 rows per expert). An expert with c rows has
    cdiv(c, SPAN) M tiles of SPAN rows; programs past the last expert's get -1. One launch over the
    device's counts: no host sync, and no chain of small torch ops (which took ~200 us here)."""
    offs_e = tl.arange(0, E_P)
    c = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)
    per = (c + SPAN - 1) // SPAN
    pend = tl.cumsum(per * NUM_N, 0)  # each expert's end in program order
    rend = tl.cumsum(c, 0)  # each expert's end row
    pid = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.sum((pend[None, :] <= pid[:, None]).to(tl.int32), axis=1)
    sel = offs_e[None, :] == e[:, None]
    per_e = tl.sum(tl.where(sel, per[None, :], 0), axis=1)
    c_e = tl.sum(tl.where(sel, c[None, :], 0), axis=1)
    local = pid - (tl.sum(tl.where(sel, pend[None, :], 0), axis=1) - per_e * NUM_N)
    n_m = tl.maximum(per_e, 1)
    r1 = tl.sum(tl.where(sel, rend[None, :], 0), axis=1)
    m = pid < n_progs
    tl.store(table_ptr + pid, tl.where(e < E, e, -1), mask=m)
    tl.store(table_ptr + n_progs + pid, r1 - c_e + (local % n_m) * SPAN, mask=m)
    tl.store(table_ptr + 2 * n_progs + pid, r1, mask=m)
    tl.store(table_ptr + 3 * n_progs + pid, local // n_m, mask=m)


@triton.jit
def _tile_of_program(table_ptr, n_progs):
    """(expert or -1, first row, end row of the expert, N tile) of this program (tile_table_kernel)."""
    pid = tl.program_id(0)
    return (tl.load(table_ptr + pid), tl.load(table_ptr + n_progs + pid), tl.load(table_ptr + 2 * n_progs + pid),
            tl.load(table_ptr + 3 * n_progs + pid))


@triton.jit
def _store_tile(out_ptr, acc, rows, r_end, cols, n_out, s_o):
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * s_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < r_end)[:, None] & (cols < n_out)[None, :])


@triton.jit
def grouped_gemm_kernel(x_ptr, w_ptr, out_ptr, table_ptr, n_progs, N, n_out, k_dim, up_off, s_x, s_we, s_wn, s_o,
                        BM: tl.constexpr, BM2: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        SWIGLU: tl.constexpr, EVEN_K: tl.constexpr, PREC: tl.constexpr, REM: tl.constexpr):
    """out[rows of expert e] = x[rows] @ w[e]^T (w[e]: [n_out (+ up_off), k_dim], k contiguous), with
    pointer loads (GPUs before Hopper, rows that are not 16-byte aligned).

    table_ptr: tile_table_kernel's [4, n_progs] table. A tile multiplies its first BM rows, and with REM
    its next BM2 rows when the expert has them: the rows an expert has beyond a multiple of BM then
    share the weight tiles of the BM before them instead of costing a tile of their own, which would
    read the weights once more and multiply mostly padding. With SWIGLU the program also multiplies
    rows up_off.. of w[e] and writes silu(gate) * up, so the [N, 2I] gate/up product never reaches
    memory."""
    e, r0, r1, nt = _tile_of_program(table_ptr, n_progs)
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
def _w_tile(w_desc, wrow, k0, KT, BN: tl.constexpr, BK: tl.constexpr, PACKED: tl.constexpr):
    """The [BN, BK] weight tile at row wrow (a multiple of BN when PACKED), column k0."""
    if PACKED:  # [BN, BK] tiles stored whole, (row tile, K tile) in row-major order: one 16 KB block
        return w_desc.load([((wrow // BN) * KT + k0 // BK) * BN, 0])
    else:
        return w_desc.load([wrow, k0])


@triton.jit
def _tile_mm_swap(x_desc, xr_desc, w_desc, r0, wrow, up_off, k_dim, KT, BM: tl.constexpr, R: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, HAS_R: tl.constexpr, SWIGLU: tl.constexpr,
                  PACKED: tl.constexpr, PREC: tl.constexpr):
    """The K loop of one tile, transposed: [BN weight rows, BM (+ R) x rows] accumulators."""
    acc_g = tl.zeros([BN, BM], tl.float32)
    acc_u = tl.zeros([BN, BM], tl.float32)
    acc_g2 = tl.zeros([BN, R], tl.float32)
    acc_u2 = tl.zeros([BN, R], tl.float32)
    for k0 in range(0, k_dim, BK):
        a = x_desc.load([r0, k0])
        bg = _w_tile(w_desc, wrow, k0, KT, BN, BK, PACKED)
        acc_g = tl.dot(bg, a.T, acc_g, input_precision=PREC)
        if HAS_R:
            a2 = xr_desc.load([r0 + BM, k0])
            acc_g2 = tl.dot(bg, a2.T, acc_g2, input_precision=PREC)
        if SWIGLU:
            bu = _w_tile(w_desc, wrow + up_off, k0, KT, BN, BK, PACKED)
            acc_u = tl.dot(bu, a.T, acc_u, input_precision=PREC)
            if HAS_R:
                acc_u2 = tl.dot(bu, a2.T, acc_u2, input_precision=PREC)
    if SWIGLU:
        acc_g = acc_g * tl.sigmoid(acc_g) * acc_u
        acc_g2 = acc_g2 * tl.sigmoid(acc_g2) * acc_u2
    return acc_g, acc_g2


@triton.jit
def _store_tile_t(out_ptr, acc, rows, r_end, cols, n_out, s_o):
    """A transposed tile acc [cols, rows] into out[rows, cols]."""
    tl.store(out_ptr + rows.to(tl.int64)[None, :] * s_o + cols[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < r_end)[None, :] & (cols < n_out)[:, None])


@triton.jit
def _swap_tile(x_desc, xr_desc, w_desc, out_ptr, r0, r1, wrow, up_off, k_dim, KT, cols, n_out, s_o,
               BM: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_R: tl.constexpr,
               SWIGLU: tl.constexpr, PACKED: tl.constexpr, PREC: tl.constexpr):
    acc, acc2 = _tile_mm_swap(x_desc, xr_desc, w_desc, r0, wrow, up_off, k_dim, KT, BM, R, BN, BK, HAS_R, SWIGLU,
                              PACKED, PREC)
    if HAS_R:
        _store_tile_t(out_ptr, acc2, r0 + BM + tl.arange(0, R), r1, cols, n_out, s_o)
    _store_tile_t(out_ptr, acc, r0 + tl.arange(0, BM), tl.minimum(r1, r0 + BM), cols, n_out, s_o)


@triton.jit
def grouped_gemm_tma_kernel(x_desc, xr1_desc, xr2_desc, xr3_desc, w_desc, out_ptr, table_ptr, n_progs, n_out, k_dim,
                            w_rows, up_off, s_o, KT, BM: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
                            R3: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SWIGLU: tl.constexpr,
                            PACKED: tl.constexpr, PREC: tl.constexpr, REM: tl.constexpr):
    """grouped_gemm_kernel for Hopper and later: tiles fetched by the tensor-memory accelerator, and the
    product computed transposed ("swap AB"), the weight rows on the MMA's M side and the tokens on its
    N side.

    Why transposed: wgmma's M comes in blocks of 64 rows but its N in steps of 8, so the rows an
    expert has past BM (GLM-5's experts get ~128 +- 12 rows) cost a 16-, 32- or 64-wide piece (R3, R2,
    R1 rows, descriptors xr3 / xr2 / xr1) instead of a 64-row block. x_desc covers x [N, K] in [BM, BK]
    blocks; w_desc the weights as [E * w_rows, K] in [BN, BK] blocks, or with PACKED the tile-packed
    weights (pack_weights in cuda.py) as [E * w_rows * KT, BK], where each [BN, BK] tile is one
    contiguous block: an H200 streams those at 4.67 TB/s against 4.27 for BN rows of 128 bytes each
    (docs/benchmarks.md). Rows a tile reads past its expert are computed and not stored."""
    e, r0, r1, nt = _tile_of_program(table_ptr, n_progs)
    if e >= 0:
        cols = nt * BN + tl.arange(0, BN)
        wrow = e * w_rows + nt * BN
        rem = r1 - (r0 + BM)
        if REM and rem > R2:
            _swap_tile(x_desc, xr1_desc, w_desc, out_ptr, r0, r1, wrow, up_off, k_dim, KT, cols, n_out, s_o,
                       BM, R1, BN, BK, True, SWIGLU, PACKED, PREC)
        elif REM and rem > R3:
            _swap_tile(x_desc, xr2_desc, w_desc, out_ptr, r0, r1, wrow, up_off, k_dim, KT, cols, n_out, s_o,
                       BM, R2, BN, BK, True, SWIGLU, PACKED, PREC)
        elif REM and rem > 0:
            _swap_tile(x_desc, xr3_desc, w_desc, out_ptr, r0, r1, wrow, up_off, k_dim, KT, cols, n_out, s_o,
                       BM, R3, BN, BK, True, SWIGLU, PACKED, PREC)
        else:
            _swap_tile(x_desc, xr3_desc, w_desc, out_ptr, r0, r1, wrow, up_off, k_dim, KT, cols, n_out, s_o,
                       BM, R3, BN, BK, False, SWIGLU, PACKED, PREC)


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
def route_kernel(logit_ptr, bias_ptr, w_ptr, id_ptr, E, s_l, scale, TOP_K: tl.constexpr, K_P: tl.constexpr,
                 N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, NORM: tl.constexpr, E_P: tl.constexpr,
                 G_P: tl.constexpr):
    """One token's noaux_tc routing (ops/moe/reference.py moe_route): sigmoid scores, the bias for
    selection only, the best TOPK_GROUP groups by the sum of their two best biased scores, the TOP_K
    best experts inside them, their unbiased scores renormalised and scaled. Picks go best first;
    equal scores go to the lower index."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E_P)
    valid = offs < E
    s = tl.sigmoid(tl.load(logit_ptr + t * s_l + offs, mask=valid, other=0.0).to(tl.float32))
    choice = tl.where(valid, s + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32), float("-inf"))
    if N_GROUP > 1:
        per = E // N_GROUP
        group = offs // per
        g_offs = tl.arange(0, G_P)
        g_score = tl.full([G_P], float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = group == g
            best = tl.max(tl.where(in_g, choice, float("-inf")), axis=0)
            first = tl.min(tl.where(in_g & (choice == best), offs, E_P), axis=0)
            second = tl.max(tl.where(in_g & (offs != first), choice, float("-inf")), axis=0)
            g_score = tl.where(g_offs == g, best + second, g_score)
        keep = offs < 0
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(g_score, axis=0)
            g_pick = tl.min(tl.where(g_score == top, g_offs, G_P), axis=0)
            keep = keep | (group == g_pick)
            g_score = tl.where(g_offs == g_pick, float("-inf"), g_score)
        choice = tl.where(keep, choice, float("-inf"))
    k_offs = tl.arange(0, K_P)
    ids = tl.zeros([K_P], tl.int32)
    ws = tl.zeros([K_P], tl.float32)
    for j in tl.static_range(TOP_K):
        top = tl.max(choice, axis=0)
        pick = tl.min(tl.where(choice == top, offs, E_P), axis=0)
        ids = tl.where(k_offs == j, pick, ids)
        ws = tl.where(k_offs == j, tl.sum(tl.where(offs == pick, s, 0.0), axis=0), ws)
        choice = tl.where(offs == pick, float("-inf"), choice)
    if NORM:
        ws = ws / (tl.sum(ws, axis=0) + 1e-20)
    tl.store(w_ptr + t * TOP_K + k_offs, ws * scale, mask=k_offs < TOP_K)
    tl.store(id_ptr + t * TOP_K + k_offs, ids, mask=k_offs < TOP_K)


@triton.jit
def permute_kernel(src_ptr, order_ptr, out_ptr, d, s_src, s_o, TOPK: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[i] = src[order[i] // TOPK]: each expert row is a copy of its token's row (order -1: padding)."""
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < d
    o = tl.load(order_ptr + i)
    t = tl.maximum(o, 0) // TOPK  # padding rows (order -1) copy token 0's row; their results are dropped
    tl.store(out_ptr + i * s_o + offs, tl.load(src_ptr + t * s_src + offs, mask=m), mask=m)


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
