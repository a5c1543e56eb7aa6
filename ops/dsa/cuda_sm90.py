"""Sparse MLA decode for Hopper (sm_90), written in Gluon: a warp-specialised kernel.

Why a second kernel beside cuda_kernels.sparse_mla_kernel: in that Triton kernel one program per SM
runs gather, Q·Kᵀ, softmax and P·V one after the other, because each tile's row addresses come from
a load of the same iteration and Triton's pipeliner then waits for every copy (docs/benchmarks.md).
Triton 3.6 has no automatic warp specialisation for Hopper, so this kernel states it by hand:

- a loader partition (4 warps, few registers) reads each tile's cache slots and gathers the latent
  and rope rows into a ring of shared-memory stages with cp.async, signalling an mbarrier per stage;
- the compute partition (8 warps = 2 warpgroups) waits on a stage, runs Q·Kᵀ with wgmma (each
  warpgroup one half of the tile's keys), the online softmax, writes P to shared memory, runs P·V
  with wgmma (each warpgroup one half of the 512 output dims), and hands the stage back.

So the gather of the next tiles overlaps the MMAs of this one. Only the shapes GLM-5 and DeepSeek
use take this path (16-bit caches, R = 512, Dr = 64); cuda.py sends everything else to the Triton
kernel. Outputs match sparse_mla_kernel's: per split, the normalised float32 output and the lse in
base e, merged by mla_combine_kernel, or the final output when there is one split.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

LOAD_WARPS = gl.constexpr(4)


@gluon.jit
def _gather_rows(src_ptr, slot, dst, mask, W: gl.constexpr, CHUNK: gl.constexpr, layout: gl.constexpr):
    """cp.async rows `slot` ([BN] in SliceLayout(1, layout)) of a [*, W] cache into dst [BN, W]."""
    base = slot.to(gl.int64) * W
    for c in gl.static_range(W // CHUNK):
        cols = c * CHUNK + gl.arange(0, CHUNK, gl.SliceLayout(0, layout))
        async_copy.async_copy_global_to_shared(dst.slice(c * CHUNK, CHUNK, dim=1),
                                               src_ptr + base[:, None] + cols[None, :], mask=mask[:, None])


@gluon.jit
def _slots(idx_ptr, bt_ptr, t, seq, s_idx, s_bt, n0, hi, BN: gl.constexpr, BLOCK_SIZE: gl.constexpr,
           layout: gl.constexpr):
    """Cache slots of top-k entries n0 .. n0+BN ([BN] in `layout`), -1 for padding and past hi."""
    offs = n0 + gl.arange(0, BN, layout)
    pos = gl.load(idx_ptr + t * s_idx + offs, mask=offs < hi, other=-1)
    valid = pos >= 0
    pos = gl.maximum(pos, 0)
    blk = gl.load(bt_ptr + seq * s_bt + pos // BLOCK_SIZE, mask=valid, other=0)
    return gl.where(valid, blk * BLOCK_SIZE + pos % BLOCK_SIZE, -1)


@gluon.jit
def _load_partition(lat_ptr, rope_ptr, idx_ptr, bt_ptr, cu_ptr, B, s_idx, s_bt, split_len, K, kn_smem, kr_smem,
                    full, empty, R: gl.constexpr, DR: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                    BLOCK_SIZE: gl.constexpr, B_P: gl.constexpr):
    t = gl.program_id(0)
    lo = gl.program_id(2) * split_len
    hi = gl.minimum(lo + split_len, K)
    # 16-byte vectors: 128 columns per pass for the latent rows, 64 for the rope rows. Each layout
    # reads its own copy of the slots (cached), which is cheaper than converting between them.
    lay_n: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [LOAD_WARPS, 1], [1, 0])
    lay_r: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [LOAD_WARPS, 1], [1, 0])
    row_n: gl.constexpr = gl.SliceLayout(1, lay_n)
    row_r: gl.constexpr = gl.SliceLayout(1, lay_r)
    b_lay: gl.constexpr = gl.BlockedLayout([1], [32], [LOAD_WARPS], [0])
    offs_b = gl.arange(0, B_P, b_lay)
    ends = gl.load(cu_ptr + 1 + offs_b, mask=offs_b < B, other=2147483647)
    seq = gl.sum((ends <= t).to(gl.int32), axis=0)  # the token's sequence: count of cu[1:] <= t
    slot_n = _slots(idx_ptr, bt_ptr, t, seq, s_idx, s_bt, lo, hi, BN, BLOCK_SIZE, row_n)
    slot_r = _slots(idx_ptr, bt_ptr, t, seq, s_idx, s_bt, lo, hi, BN, BLOCK_SIZE, row_r)
    for i in range(gl.cdiv(hi - lo, BN)):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        _gather_rows(lat_ptr, gl.maximum(slot_n, 0), kn_smem.index(s), slot_n >= 0, R, 128, lay_n)
        _gather_rows(rope_ptr, gl.maximum(slot_r, 0), kr_smem.index(s), slot_r >= 0, DR, DR, lay_r)
        # Each loader thread arrives once its own copies land (count = the loader's threads).
        async_copy.mbarrier_arrive(full.index(s), increment_count=False)
        # The next tile's slots: dependent loads, in flight while this stage is consumed.
        slot_n = _slots(idx_ptr, bt_ptr, t, seq, s_idx, s_bt, lo + (i + 1) * BN, hi, BN, BLOCK_SIZE, row_n)
        slot_r = _slots(idx_ptr, bt_ptr, t, seq, s_idx, s_bt, lo + (i + 1) * BN, hi, BN, BLOCK_SIZE, row_r)


@gluon.jit
def _compute_partition(idx_ptr, s_idx, split_len, K, scale_log2, qn_smem, qr_smem, kn_smem, kr_smem, p_smem,
                       full, empty, BH: gl.constexpr, R: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr):
    t = gl.program_id(0)
    lo = gl.program_id(2) * split_len
    hi = gl.minimum(lo + split_len, K)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BN // 2, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, R // 2, 16])
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    m_i = gl.full([BH], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BH], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BH, R], gl.float32, o_layout)
    s_zero = gl.zeros([BH, BN], gl.float32, s_layout)
    for i in range(gl.cdiv(hi - lo, BN)):
        s = i % STAGES
        offs = lo + i * BN + gl.arange(0, BN, col_s)
        valid = gl.load(idx_ptr + t * s_idx + offs, mask=offs < hi, other=-1) >= 0  # padding
        kn = kn_smem.index(s)
        mbarrier.wait(full.index(s), (i // STAGES) & 1)
        fence_async_shared()  # the loader's cp.async writes, before wgmma reads them
        sc = warpgroup_mma(qn_smem, kn.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        sc = warpgroup_mma(qr_smem, kr_smem.index(s).permute((1, 0)), sc, is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc, ))
        sc = gl.where(valid[None, :], sc * scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(sc, axis=1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        p_smem.store(p.to(p_smem.dtype))
        fence_async_shared()
        gl.thread_barrier()  # both warpgroups' halves of P are in place
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(p_smem, kn, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        gl.thread_barrier()  # every warpgroup is done with this stage and with P
        mbarrier.arrive(empty.index(s), count=1)
    return acc, gl.convert_layout(m_i, gl.SliceLayout(1, o_layout)), gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))


@gluon.jit
def sparse_mla_decode_sm90_kernel(ql_ptr, qr_ptr, lat_ptr, rope_ptr, idx_ptr, bt_ptr, cu_ptr, o_ptr, lse_ptr,
                                  B, H, K, split_len, s_qlt, s_qlh, s_qrt, s_qrh, s_idx, s_bt,
                                  s_os, s_ot, s_oh, s_ls, s_lt, scale_log2,
                                  R: gl.constexpr, DR: gl.constexpr, BH: gl.constexpr, BN: gl.constexpr,
                                  STAGES: gl.constexpr, BLOCK_SIZE: gl.constexpr, B_P: gl.constexpr,
                                  SPLIT_OUT: gl.constexpr, LOAD_REGS: gl.constexpr):
    """One program per (token, head block of BH = 64, split of the top-k list); num_warps must be 8.
    idx_ptr holds top-k positions (-1 padded), mapped to cache slots through the block table here.
    With SPLIT_OUT, writes the split's normalised float32 output and lse at o_ptr / lse_ptr[split]
    (merged by cuda_kernels.mla_combine_kernel); else the final output."""
    t = gl.program_id(0)
    h0 = gl.program_id(1) * BH
    sp = gl.program_id(2)
    dtype: gl.constexpr = ql_ptr.dtype.element_ty
    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
    offs_h = h0 + gl.arange(0, BH, gl.SliceLayout(1, q_layout))
    hm = offs_h < H
    cols_n = gl.arange(0, R, gl.SliceLayout(0, q_layout))
    cols_r = gl.arange(0, DR, gl.SliceLayout(0, q_layout))
    qn = gl.load(ql_ptr + t * s_qlt + offs_h[:, None] * s_qlh + cols_n[None, :], mask=hm[:, None], other=0.0)
    qr = gl.load(qr_ptr + t * s_qrt + offs_h[:, None] * s_qrh + cols_r[None, :], mask=hm[:, None], other=0.0)
    qn_smem = gl.allocate_shared_memory(dtype, [BH, R], gl.NVMMASharedLayout.get_default_for([BH, R], dtype), qn)
    qr_smem = gl.allocate_shared_memory(dtype, [BH, DR], gl.NVMMASharedLayout.get_default_for([BH, DR], dtype), qr)
    kn_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, R], gl.NVMMASharedLayout.get_default_for([BN, R], dtype))
    kr_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, DR],
                                        gl.NVMMASharedLayout.get_default_for([BN, DR], dtype))
    p_smem = gl.allocate_shared_memory(dtype, [BH, BN], gl.NVMMASharedLayout.get_default_for([BH, BN], dtype))
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=LOAD_WARPS * 32)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()
    acc, m_i, l_i = gl.warp_specialize([
        (_compute_partition, (idx_ptr, s_idx, split_len, K, scale_log2, qn_smem, qr_smem, kn_smem, kr_smem,
                              p_smem, full, empty, BH, R, BN, STAGES)),
        (_load_partition, (lat_ptr, rope_ptr, idx_ptr, bt_ptr, cu_ptr, B, s_idx, s_bt, split_len, K, kn_smem,
                           kr_smem, full, empty, R, DR, BN, STAGES, BLOCK_SIZE, B_P)),
    ], [LOAD_WARPS], [LOAD_REGS])
    o_layout: gl.constexpr = acc.type.layout
    has = l_i > 0
    out = acc / gl.where(has, l_i, 1.0)[:, None]
    lse = gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    offs_ho = h0 + gl.arange(0, BH, gl.SliceLayout(1, o_layout))
    cols_o = gl.arange(0, R, gl.SliceLayout(0, o_layout))
    hmo = offs_ho < H
    o_off = sp * s_os + t * s_ot + offs_ho[:, None] * s_oh + cols_o[None, :]
    if SPLIT_OUT:
        gl.store(o_ptr + o_off, out, mask=hmo[:, None])
    else:
        gl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=hmo[:, None])
    gl.store(lse_ptr + sp * s_ls + t * s_lt + offs_ho, lse, mask=hmo)
