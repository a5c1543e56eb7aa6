"""Sparse MLA for Hopper (sm_90), written in Gluon: a warp-specialised kernel.

Why a second kernel beside cuda_kernels.sparse_mla_kernel: in that Triton kernel one program per SM
runs gather, Q·Kᵀ, softmax and P·V one after the other, because each tile's row addresses come from
a load of the same iteration and Triton's pipeliner then waits for every copy (docs/benchmarks.md).
Triton 3.6's automatic warp specialisation does not compile for sm_90, so this kernel states it by
hand. A program serves one token's 64 heads over its share of the top-k list, with three partitions:

- the loader (4 warps, few registers) maps top-k positions to cache slots through the block table
  (positions two tiles ahead, slots one) and gathers the latent and rope rows with cp.async into a
  ring of shared-memory stages, each signalled by an mbarrier;
- warpgroup 0 loads the queries, runs Q·Kᵀ for the whole tile with wgmma, the online softmax, hands
  P and the rescale factors to warpgroup 1 through shared memory, and runs P·V for output columns
  0..255;
- warpgroup 1 runs P·V for columns 256..511.

So the gather of the next tile overlaps this tile's MMAs, and Q is read from shared memory once per
tile instead of once per warpgroup. Only the shapes GLM-5 and DeepSeek use take this path (16-bit
caches, R = 512, Dr = 64); cuda.py sends everything else to the Triton kernel. Outputs match
sparse_mla_kernel's: per split, the normalised float32 output and the lse in base e, merged by
cuda_kernels.mla_combine_kernel, or the final output when there is one split.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

LOAD_WARPS = gl.constexpr(4)
LN2 = gl.constexpr(0.6931471805599453)
# Gluon is experimental and renames things between Triton releases; checked with 3.6, 3.8 and 3.9.
# A barrier across the calling partition's warps: gl.thread_barrier in 3.6, gl.barrier later.
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
# cp.async global -> shared: async_copy_global_to_shared in 3.6, async_load later.
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared


@gluon.jit
def _positions(idx_ptr, t, s_idx, n0, hi, BN: gl.constexpr, layout: gl.constexpr):
    offs = n0 + gl.arange(0, BN, layout)
    return gl.load(idx_ptr + t * s_idx + offs, mask=offs < hi, other=-1)


@gluon.jit
def _to_slots(pos, bt_ptr, seq, s_bt, BLOCK_SIZE: gl.constexpr):
    """Cache slots of top-k positions (-1 stays -1)."""
    valid = pos >= 0
    pos = gl.maximum(pos, 0)
    blk = gl.load(bt_ptr + seq * s_bt + pos // BLOCK_SIZE, mask=valid, other=0)
    return gl.where(valid, blk * BLOCK_SIZE + pos % BLOCK_SIZE, -1)


@gluon.jit
def _gather_rows(src_ptr, slot, dst, W: gl.constexpr, CHUNK: gl.constexpr, layout: gl.constexpr):
    """cp.async rows `slot` ([BN] in SliceLayout(1, layout); -1: zeros) of a [*, W] cache into dst [BN, W]."""
    base = gl.maximum(slot, 0).to(gl.int64) * W
    mask = (slot >= 0)[:, None]
    for c in gl.static_range(W // CHUNK):
        cols = c * CHUNK + gl.arange(0, CHUNK, gl.SliceLayout(0, layout))
        _async_load(dst.slice(c * CHUNK, CHUNK, dim=1), src_ptr + base[:, None] + cols[None, :], mask=mask)


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
    pos_n = _positions(idx_ptr, t, s_idx, lo, hi, BN, row_n)  # in flight while the sequence is found
    pos_r = _positions(idx_ptr, t, s_idx, lo, hi, BN, row_r)
    offs_b = gl.arange(0, B_P, gl.BlockedLayout([1], [32], [LOAD_WARPS], [0]))
    ends = gl.load(cu_ptr + 1 + offs_b, mask=offs_b < B, other=2147483647)
    seq = gl.sum((ends <= t).to(gl.int32), axis=0)  # the token's sequence: count of cu[1:] <= t
    slot_n = _to_slots(pos_n, bt_ptr, seq, s_bt, BLOCK_SIZE)
    slot_r = _to_slots(pos_r, bt_ptr, seq, s_bt, BLOCK_SIZE)
    pos_n = _positions(idx_ptr, t, s_idx, lo + BN, hi, BN, row_n)
    pos_r = _positions(idx_ptr, t, s_idx, lo + BN, hi, BN, row_r)
    for i in range(gl.cdiv(hi - lo, BN)):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        _gather_rows(lat_ptr, slot_n, kn_smem.index(s), R, 128, lay_n)
        _gather_rows(rope_ptr, slot_r, kr_smem.index(s), DR, DR, lay_r)
        # Each loader thread arrives once its own copies land (count = the loader's threads).
        async_copy.mbarrier_arrive(full.index(s), increment_count=False)
        # Lookups run ahead: the next tile's slots from its positions (loaded an iteration ago), and
        # the positions of the tile after it. Neither waits on a load issued in this iteration, so
        # one load's latency, not two in a row, stands between this tile's copies and the next's.
        slot_n = _to_slots(pos_n, bt_ptr, seq, s_bt, BLOCK_SIZE)
        slot_r = _to_slots(pos_r, bt_ptr, seq, s_bt, BLOCK_SIZE)
        n2 = lo + (i + 2) * BN
        pos_n = _positions(idx_ptr, t, s_idx, n2, hi, BN, row_n)
        pos_r = _positions(idx_ptr, t, s_idx, n2, hi, BN, row_r)


@gluon.jit
def _store_half(acc, l_i, c0, t, h0, sp, H, o_ptr, s_os, s_ot, s_oh, stage):
    """Normalised output columns c0 .. c0 + acc.shape[1] of one program's heads.

    Where the output has the cache's dtype (the final output, or 16-bit split partials), it goes
    through `stage`, a [BH, acc.shape[1]] piece of a stage buffer no one reads any more: written
    in the wgmma layout, read back 8 contiguous elements a thread, so each warp stores whole 512-byte
    row pieces. Stored straight from the wgmma layout, four threads would write 16 bytes of a row
    and leave each 32-byte sector half written per instruction."""
    o_layout: gl.constexpr = acc.type.layout
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = (acc / gl.where(l_o > 0, l_o, 1.0)[:, None]).to(o_ptr.dtype.element_ty)
    if o_ptr.dtype.element_ty == stage.dtype:
        stage.store(out)
        _barrier()
        row_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        _store_rows(stage.load(row_layout), c0, t, h0, sp, H, o_ptr, s_os, s_ot, s_oh)
    else:
        _store_rows(out, c0, t, h0, sp, H, o_ptr, s_os, s_ot, s_oh)


@gluon.jit
def _store_rows(out, c0, t, h0, sp, H, o_ptr, s_os, s_ot, s_oh):
    layout: gl.constexpr = out.type.layout
    offs_h = h0 + gl.arange(0, out.shape[0], gl.SliceLayout(1, layout))
    cols = c0 + gl.arange(0, out.shape[1], gl.SliceLayout(0, layout))
    gl.store(o_ptr + sp * s_os + t * s_ot + offs_h[:, None] * s_oh + cols[None, :], out, mask=(offs_h < H)[:, None])


@gluon.jit
def _softmax_partition(ql_ptr, qr_ptr, idx_ptr, o_ptr, lse_ptr, H, K, split_len, s_qlt, s_qlh, s_qrt, s_qrh, s_idx,
                       s_os, s_ot, s_oh, s_ls, s_lt, scale_log2, qn_smem, qr_smem, kn_smem, kr_smem, p_smem,
                       a_smem, full, empty, p_ready, p_free, fin, BH: gl.constexpr, R: gl.constexpr,
                       DR: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr):
    t = gl.program_id(0).to(gl.int64)  # t * stride passes 2^31 in long prefills
    h0 = gl.program_id(1) * BH
    sp = gl.program_id(2)
    lo = sp * split_len
    hi = gl.minimum(lo + split_len, K)
    # Queries into shared memory here, not before the fork, so the loader starts at once.
    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    offs_h = h0 + gl.arange(0, BH, gl.SliceLayout(1, q_layout))
    hm = (offs_h < H)[:, None]
    cols_n = gl.arange(0, R, gl.SliceLayout(0, q_layout))
    cols_r = gl.arange(0, DR, gl.SliceLayout(0, q_layout))
    qn_smem.store(gl.load(ql_ptr + t * s_qlt + offs_h[:, None] * s_qlh + cols_n[None, :], mask=hm, other=0.0))
    qr_smem.store(gl.load(qr_ptr + t * s_qrt + offs_h[:, None] * s_qrh + cols_r[None, :], mask=hm, other=0.0))
    fence_async_shared()
    _barrier()

    RH: gl.constexpr = R // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, RH, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    m_i = gl.full([BH], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BH], gl.float32, row_s)
    acc = gl.zeros([BH, RH], gl.float32, o_layout)
    s_zero = gl.zeros([BH, BN], gl.float32, s_layout)
    for i in range(gl.cdiv(hi - lo, BN)):
        s = i % STAGES
        valid = _positions(idx_ptr, t, s_idx, lo + i * BN, hi, BN, gl.SliceLayout(0, s_layout)) >= 0
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
        mbarrier.wait(p_free, (i & 1) ^ 1)  # warpgroup 1 is done with the previous P and alpha
        p_smem.store(p.to(p_smem.dtype))
        a_smem.store(alpha)
        fence_async_shared()
        _barrier()
        mbarrier.arrive(p_ready, count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        acc = warpgroup_mma(p_smem, kn.slice(0, RH, dim=1), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        _barrier()
        mbarrier.arrive(empty.index(s), count=1)
    mbarrier.wait(p_free, (gl.cdiv(hi - lo, BN) & 1) ^ 1)  # warpgroup 1 has read the last alpha
    a_smem.store(l_i)  # the row sums, for warpgroup 1's half
    _barrier()
    mbarrier.arrive(fin, count=1)
    # Warpgroup 1 has read its last tile (p_free above): the stage buffers are free.
    _store_half(acc, l_i, 0, t, h0, sp, H, o_ptr, s_os, s_ot, s_oh, kn_smem.index(0).slice(0, RH, dim=1))
    has = l_i > 0
    lse = gl.where(has, (m_i + gl.log2(gl.where(has, l_i, 1.0))) * LN2, float("-inf"))
    offs_l = h0 + gl.arange(0, BH, row_s)
    gl.store(lse_ptr + sp * s_ls + t * s_lt + offs_l, lse, mask=offs_l < H)


@gluon.jit
def _pv_partition(o_ptr, H, K, split_len, s_os, s_ot, s_oh, kn_smem, p_smem, a_smem, empty, p_ready, p_free, fin,
                  BH: gl.constexpr, R: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr):
    t = gl.program_id(0).to(gl.int64)
    h0 = gl.program_id(1) * BH
    sp = gl.program_id(2)
    lo = sp * split_len
    hi = gl.minimum(lo + split_len, K)
    RH: gl.constexpr = R // 2
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, RH, 16])
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    acc = gl.zeros([BH, RH], gl.float32, o_layout)
    for i in range(gl.cdiv(hi - lo, BN)):
        s = i % STAGES
        mbarrier.wait(p_ready, i & 1)
        acc = acc * a_smem.load(row_o)[:, None]
        acc = warpgroup_mma(p_smem, kn_smem.index(s).slice(RH, RH, dim=1), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        _barrier()
        mbarrier.arrive(p_free, count=1)
        mbarrier.arrive(empty.index(s), count=1)
    mbarrier.wait(fin, 0)
    # Warpgroup 0 has read its last tile (fin above): the other half of the same buffer is free.
    _store_half(acc, a_smem.load(row_o), RH, t, h0, sp, H, o_ptr, s_os, s_ot, s_oh,
                kn_smem.index(0).slice(RH, RH, dim=1))


@gluon.jit
def sparse_mla_sm90_kernel(ql_ptr, qr_ptr, lat_ptr, rope_ptr, idx_ptr, bt_ptr, cu_ptr, o_ptr, lse_ptr,
                           B, H, K, split_len, s_qlt, s_qlh, s_qrt, s_qrh, s_idx, s_bt,
                           s_os, s_ot, s_oh, s_ls, s_lt, scale_log2,
                           R: gl.constexpr, DR: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                           BLOCK_SIZE: gl.constexpr, B_P: gl.constexpr, PV_REGS: gl.constexpr,
                           LOAD_REGS: gl.constexpr):
    """One program per (token, head block of 64, split of the top-k list); num_warps must be 4.

    idx_ptr holds top-k positions (-1 padded), mapped to cache slots through the block table here.
    Writes the split's normalised output (in o_ptr's dtype) and lse at o_ptr / lse_ptr[split]."""
    BH: gl.constexpr = 64
    dtype: gl.constexpr = ql_ptr.dtype.element_ty
    qn_smem = gl.allocate_shared_memory(dtype, [BH, R], gl.NVMMASharedLayout.get_default_for([BH, R], dtype))
    qr_smem = gl.allocate_shared_memory(dtype, [BH, DR], gl.NVMMASharedLayout.get_default_for([BH, DR], dtype))
    kn_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, R], gl.NVMMASharedLayout.get_default_for([BN, R], dtype))
    kr_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, DR],
                                        gl.NVMMASharedLayout.get_default_for([BN, DR], dtype))
    p_smem = gl.allocate_shared_memory(dtype, [BH, BN], gl.NVMMASharedLayout.get_default_for([BH, BN], dtype))
    a_smem = gl.allocate_shared_memory(gl.float32, [BH], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=LOAD_WARPS * 32)  # every loader thread, on its copies' landing
        mbarrier.init(empty.index(s), count=2)  # both warpgroups
    for j in gl.static_range(3):
        mbarrier.init(bars.index(j), count=1)
    fence_async_shared()
    p_ready = bars.index(0)  # warpgroup 0 -> 1: P and alpha of this tile are in shared memory
    p_free = bars.index(1)  # warpgroup 1 -> 0: done reading them
    fin = bars.index(2)  # warpgroup 0 -> 1: the row sums are in shared memory
    gl.warp_specialize([
        (_softmax_partition, (ql_ptr, qr_ptr, idx_ptr, o_ptr, lse_ptr, H, K, split_len, s_qlt, s_qlh, s_qrt, s_qrh,
                              s_idx, s_os, s_ot, s_oh, s_ls, s_lt, scale_log2, qn_smem, qr_smem, kn_smem, kr_smem,
                              p_smem, a_smem, full, empty, p_ready, p_free, fin, BH, R, DR, BN, STAGES)),
        (_pv_partition, (o_ptr, H, K, split_len, s_os, s_ot, s_oh, kn_smem, p_smem, a_smem, empty, p_ready, p_free,
                         fin, BH, R, BN, STAGES)),
        (_load_partition, (lat_ptr, rope_ptr, idx_ptr, bt_ptr, cu_ptr, B, s_idx, s_bt, split_len, K, kn_smem,
                           kr_smem, full, empty, R, DR, BN, STAGES, BLOCK_SIZE, B_P)),
    ], [4, LOAD_WARPS], [PV_REGS, LOAD_REGS])
