"""Triton kernels of the DSA ops (lightning indexer, top-k select, sparse MLA, cache write).

Layouts follow ops/dsa/reference.py. Every kernel finds a token's sequence from cu_seqlens_q itself
(no host sync), so the decode path can be captured in a CUDA graph. Feature dims are padded to
powers of two >= 16 with masks, so any model shape runs (tl.dot needs 16 on each side).
"""
from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # a Triton without programmatic dependent launch: cuda.py then does not ask for it
    gdc_wait = None


@triton.jit
def _seq_and_pos(t, cu_ptr, seq_lens_ptr, B, B_P: tl.constexpr):
    """Sequence id of flat token t (count of cu[1:] <= t) and its position in the sequence."""
    offs_b = tl.arange(0, B_P)
    ends = tl.load(cu_ptr + 1 + offs_b, mask=offs_b < B, other=2147483647)
    seq = tl.sum((ends <= t).to(tl.int32), axis=0)
    end = tl.load(cu_ptr + 1 + seq)
    pos = tl.load(seq_lens_ptr + seq) - (end - t)
    return seq, pos


@triton.jit
def mla_cache_write_kernel(slot_ptr, lat_ptr, rope_ptr, idx_ptr, lat_c, rope_c, idx_c,
                           s_lat, s_rope, s_idx,
                           R: tl.constexpr, DR: tl.constexpr, DI: tl.constexpr,
                           R_P: tl.constexpr, DR_P: tl.constexpr, DI_P: tl.constexpr,
                           HAS_INDEX: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # padding tokens carry slot -1 and are skipped
        o = tl.arange(0, R_P)
        v = tl.load(lat_ptr + t * s_lat + o, mask=o < R)
        tl.store(lat_c + slot * R + o, v.to(lat_c.dtype.element_ty), mask=o < R)
        o = tl.arange(0, DR_P)
        v = tl.load(rope_ptr + t * s_rope + o, mask=o < DR)
        tl.store(rope_c + slot * DR + o, v.to(rope_c.dtype.element_ty), mask=o < DR)
        if HAS_INDEX:
            o = tl.arange(0, DI_P)
            v = tl.load(idx_ptr + t * s_idx + o, mask=o < DI)
            tl.store(idx_c + slot * DI + o, v.to(idx_c.dtype.element_ty), mask=o < DI)


@triton.jit
def _sortable(v):
    """float32 -> uint32 whose unsigned order is the float order (-0.0 first made +0.0: they tie)."""
    bits = tl.where(v == 0.0, 0.0, v).to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return bits ^ flip


@triton.jit
def indexer_scores_kernel(q_ptr, w_ptr, cache_ptr, bt_ptr, cu_ptr, seq_lens_ptr, score_ptr,
                          t_base, B, s_qt, s_qh, s_wt, s_bt, s_score, scale,
                          H: tl.constexpr, D: tl.constexpr, H_P: tl.constexpr, D_P: tl.constexpr,
                          B_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                          CHUNK: tl.constexpr, PREC: tl.constexpr, WHOLE: tl.constexpr, NBC: tl.constexpr):
    """keys[t - t_base, j] = sortable(sum_h w[t,h] relu(scale q[t,h].k[j])) for j <= pos(t) (uint32).

    Grid (tokens, context chunks). Scores are K @ q^T so the MMA's M side is the BLOCK_N keys
    (one query token has only 32 heads, too few for Hopper's 64-row MMA)."""
    t = t_base + tl.program_id(0)
    c0 = tl.program_id(1) * CHUNK
    seq, qpos = _seq_and_pos(t, cu_ptr, seq_lens_ptr, B, B_P)
    if c0 <= qpos:
        offs_h = tl.arange(0, H_P)
        offs_d = tl.arange(0, D_P)
        qt = tl.load(q_ptr + t * s_qt + offs_h[None, :] * s_qh + offs_d[:, None],
                     mask=(offs_h[None, :] < H) & (offs_d[:, None] < D), other=0.0)  # [D_P, H_P]
        w = tl.load(w_ptr + t * s_wt + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        hi = tl.minimum(c0 + CHUNK, qpos + 1)
        row = score_ptr + (t - t_base).to(tl.int64) * s_score
        # A key tile's address must not hang on a load of its own iteration: Triton's pipeliner then
        # waits for every copy before each tile. With WHOLE (tiles never straddle cache blocks) the
        # chunk's block ids are read once up front; otherwise the next tile's are read a step ahead.
        if WHOLE:
            offs_b = tl.arange(0, NBC)
            ids = tl.load(bt_ptr + seq * s_bt + c0 // BLOCK_SIZE + offs_b,
                          mask=c0 + offs_b * BLOCK_SIZE < hi, other=0)
        else:
            pos = c0 + tl.arange(0, BLOCK_N)
            blk_next = tl.load(bt_ptr + seq * s_bt + pos // BLOCK_SIZE, mask=pos < hi, other=0)
        for n0 in range(c0, hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            inb = pos < hi
            if WHOLE:
                blk = tl.sum(tl.where(offs_b == (n0 - c0) // BLOCK_SIZE, ids, 0), axis=0).to(tl.int64)
            else:
                blk = blk_next.to(tl.int64)
                pos_next = pos + BLOCK_N
                blk_next = tl.load(bt_ptr + seq * s_bt + pos_next // BLOCK_SIZE, mask=pos_next < hi, other=0)
            slot = blk * BLOCK_SIZE + pos % BLOCK_SIZE
            k = tl.load(cache_ptr + slot[:, None] * D + offs_d[None, :],
                        mask=inb[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_N, D_P]
            s = tl.dot(k, qt, input_precision=PREC)  # [BLOCK_N, H_P] fp32
            s = tl.maximum(s * scale, 0.0) * w[None, :]
            tl.store(row + pos, _sortable(tl.sum(s, axis=1)).to(tl.int32, bitcast=True), mask=inb)


@triton.jit
def _count_ge(row, n, thr, CHUNK: tl.constexpr, STRICT: tl.constexpr = False):
    """How many keys row[0:n] are >= thr (> thr if STRICT); keys and thr uint32."""
    offs = tl.arange(0, CHUNK)
    c = 0
    for c0 in range(0, n, CHUNK):
        o = c0 + offs
        key = tl.load(row + o, mask=o < n, other=0).to(tl.uint32, bitcast=True)
        hit = (key > thr) if STRICT else (key >= thr)
        c += tl.sum((hit & (o < n)).to(tl.int32), axis=0)
    return c


@triton.jit
def topk_select_kernel(key_ptr, out_ptr, cu_ptr, seq_lens_ptr, t_base, B, K, s_key, s_out,
                       B_P: tl.constexpr, CHUNK: tl.constexpr, DIGIT: tl.constexpr, REG: tl.constexpr):
    """Top-K positions of each row of sortable keys; one program per query token.

    Finds the K-th largest key thr = the largest value with count(key >= thr) >= K. A row of at
    most REG keys is held in registers and bisected bit by bit (no memory traffic per pass: the
    decode case); longer rows stream from L2, DIGIT bits a pass from the top: with DIGIT <= 2 by
    counting keys above each of the 2^DIGIT - 1 candidates (plain compares, cheap per element),
    otherwise by a histogram of the digit among keys that match the prefix found so far. A last
    pass writes the positions above thr, then the lowest-positioned ties at thr (the reference's
    tie-break). Positions come out ascending within each of those two groups, not sorted by score
    (no consumer needs score order)."""
    t = t_base + tl.program_id(0)
    seq, qpos = _seq_and_pos(t, cu_ptr, seq_lens_ptr, B, B_P)
    n = qpos + 1  # causal: exactly positions 0..qpos are candidates
    out = out_ptr + t.to(tl.int64) * s_out
    row = key_ptr + (t - t_base).to(tl.int64) * s_key
    offs = tl.arange(0, CHUNK)
    if n <= K:  # every candidate is selected; pad with -1
        for k0 in range(0, K, CHUNK):
            o = k0 + offs
            tl.store(out + o, tl.where(o < n, o, -1), mask=o < K)
    else:
        NB: tl.constexpr = 1 << DIGIT
        prefix = tl.zeros([2], tl.uint32).max(axis=0)  # uint32 scalar 0: the digits found so far
        n_gt = K * 0
        if n <= REG:  # the row fits in registers: read it once and bisect on the key bits
            o_all = tl.arange(0, REG)
            row_keys = tl.load(row + o_all, mask=o_all < n, other=0).to(tl.uint32, bitcast=True)  # 0: never K-th
            # Stop early once some candidate has exactly K keys at or above it: those keys are the
            # top K (no tie straddles the boundary), and thr = cand - 1 selects exactly them. With
            # distinct scores that comes after about half of the 32 steps.
            bit = tl.full([], 31, tl.int32)
            c = K - 1
            while (bit >= 0) & (c != K):
                cand = prefix | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
                c = tl.sum((row_keys >= cand).to(tl.int32), axis=0)
                if c >= K:
                    prefix = cand
                bit -= 1
            if c == K:
                prefix = prefix - 1
                n_gt = K
            else:
                n_gt = tl.sum(((row_keys > prefix) & (o_all < n)).to(tl.int32), axis=0)
        elif DIGIT <= 2:
            # Per-lane counters, reduced once a pass: a block-wide sum per chunk would cost more
            # than the compares themselves.
            for p in tl.static_range(32 // DIGIT):
                shift = 32 - DIGIT * (p + 1)  # constexpr: p is unrolled
                c1 = tl.zeros([CHUNK], tl.int32)
                c2 = tl.zeros([CHUNK], tl.int32)
                c3 = tl.zeros([CHUNK], tl.int32)
                for c0 in range(0, n, CHUNK):
                    o = c0 + offs
                    inb = o < n
                    key = tl.load(row + o, mask=inb, other=0).to(tl.uint32, bitcast=True)
                    c1 += (inb & (key >= (prefix | (1 << shift)))).to(tl.int32)
                    if DIGIT == 2:
                        c2 += (inb & (key >= (prefix | (2 << shift)))).to(tl.int32)
                        c3 += (inb & (key >= (prefix | (3 << shift)))).to(tl.int32)
                j = (tl.sum(c1, axis=0) >= K).to(tl.uint32)
                if DIGIT == 2:
                    j += (tl.sum(c2, axis=0) >= K).to(tl.uint32) + (tl.sum(c3, axis=0) >= K).to(tl.uint32)
                prefix = prefix | (j << shift)
        else:
            bins = tl.arange(0, NB)
            krem = K
            for p in tl.static_range(32 // DIGIT):
                shift = 32 - DIGIT * (p + 1)
                hist = tl.zeros([NB], tl.int32)
                for c0 in range(0, n, CHUNK):
                    o = c0 + offs
                    inb = o < n
                    key = tl.load(row + o, mask=inb, other=0).to(tl.uint32, bitcast=True)
                    match = inb
                    if p > 0:  # only keys whose higher digits equal the prefix found so far
                        match = match & ((key >> (shift + DIGIT)) == (prefix >> (shift + DIGIT)))
                    hist += tl.histogram(((key >> shift) & (NB - 1)).to(tl.int32), NB, mask=match)
                # suffix[d]: matching keys with this digit >= d; take the largest d with suffix >= krem
                suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
                d = tl.sum((suffix >= krem).to(tl.int32), axis=0) - 1
                krem -= tl.sum(tl.where(bins > d, hist, 0), axis=0)
                prefix = prefix | (d.to(tl.uint32) << shift)
        if n > REG:
            n_gt = _count_ge(row, n, prefix, CHUNK, True)
        # Write the positions: stream the row once more (from L2) CHUNK keys at a time; one scan
        # ranks both groups, keys above thr in the low 16 bits and ties at thr in the high 16.
        # Fields stay below 2^16: keys above thr number at most K, and the tie count carried between
        # chunks is capped at krem (later ties are not taken anyway), so K + CHUNK < 2^16 is enough
        # (the wrapper checks). A scan over the whole register-held row would spill registers.
        krem = K - n_gt  # ties at thr to take, lowest positions first
        cnt = 0
        for c0 in range(0, n, CHUNK):
            o = c0 + offs
            inb = o < n
            key = tl.load(row + o, mask=inb, other=0).to(tl.uint32, bitcast=True)
            gt = inb & (key > prefix)
            eq = inb & (key == prefix)
            packed = gt.to(tl.int32) | (eq.to(tl.int32) << 16)
            ranks = cnt + tl.cumsum(packed, axis=0)
            r_gt = (ranks & 0xFFFF) - 1
            r_eq = ((ranks >> 16) & 0xFFFF) - 1
            tl.store(out + r_gt, o, mask=gt)
            tl.store(out + n_gt + r_eq, o, mask=eq & (r_eq < krem))
            cnt += tl.sum(packed, axis=0)
            cnt = (cnt & 0xFFFF) | (tl.minimum((cnt >> 16) & 0xFFFF, krem) << 16)


@triton.jit
def mla_slots_kernel(idx_ptr, bt_ptr, cu_ptr, seq_lens_ptr, slot_ptr, B, K, s_idx, s_bt,
                     B_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """slot[t, j] = cache slot of top-k position idx[t, j] (-1 stays -1), so the attention loop
    gathers rows after one dependent load instead of three."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seq, qpos = _seq_and_pos(t, cu_ptr, seq_lens_ptr, B, B_P)
    idx = tl.load(idx_ptr + t * s_idx + offs, mask=offs < K, other=-1)
    valid = idx >= 0
    pos = tl.maximum(idx, 0)
    blk = tl.load(bt_ptr + seq * s_bt + pos // BLOCK_SIZE, mask=valid, other=0)
    tl.store(slot_ptr + t * K + offs, tl.where(valid, blk * BLOCK_SIZE + pos % BLOCK_SIZE, -1), mask=offs < K)


@triton.jit
def sparse_mla_kernel(ql_ptr, qr_ptr, lat_ptr, rope_ptr, bt_ptr, cu_ptr, seq_lens_ptr, idx_ptr,
                      o_ptr, lse_ptr, B, H, K, split_len, s_qlt, s_qlh, s_qrt, s_qrh, s_bt, s_idx,
                      s_os, s_ot, s_oh, s_ls, s_lt, scale_log2,
                      R: tl.constexpr, DR: tl.constexpr, R_P: tl.constexpr, DR_P: tl.constexpr,
                      BLOCK_H: tl.constexpr, B_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      BLOCK_N: tl.constexpr, PREC: tl.constexpr, PRESLOT: tl.constexpr):
    """Absorbed sparse MLA for one (token, head block, split of the top-k list).

    Every head of a token reads the same gathered latent rows, so a program holds BLOCK_H heads as
    the MMA's M side and streams its share of the top-k rows once: scores over R + DR dims, online
    softmax in base 2, output accumulated in the latent space. Writes the normalised output (in
    o_ptr's dtype) and lse of the split: the final output when there is one split, else a partial
    that mla_combine_kernel merges."""
    t = tl.program_id(0).to(tl.int64)  # t * stride passes 2^31 in long prefills
    h0 = tl.program_id(1) * BLOCK_H
    sp = tl.program_id(2)
    seq, qpos = _seq_and_pos(t, cu_ptr, seq_lens_ptr, B, B_P)
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, R_P)
    offs_d = tl.arange(0, DR_P)
    hm = offs_h < H
    ql = tl.load(ql_ptr + t * s_qlt + offs_h[:, None] * s_qlh + offs_r[None, :],
                 mask=hm[:, None] & (offs_r[None, :] < R), other=0.0)
    qr = tl.load(qr_ptr + t * s_qrt + offs_h[:, None] * s_qrh + offs_d[None, :],
                 mask=hm[:, None] & (offs_d[None, :] < DR), other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R_P], tl.float32)
    lo = sp * split_len
    hi = tl.minimum(lo + split_len, K)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_ptr + t * s_idx + offs_n, mask=offs_n < hi, other=-1)
        valid = idx >= 0
        if PRESLOT:  # idx_ptr holds cache slots already (mla_slots_kernel): one dependent load less
            slot = tl.maximum(idx, 0).to(tl.int64)
        else:
            pos = tl.maximum(idx, 0)
            blk = tl.load(bt_ptr + seq * s_bt + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            slot = blk * BLOCK_SIZE + pos % BLOCK_SIZE
        kl = tl.load(lat_ptr + slot[:, None] * R + offs_r[None, :],
                     mask=valid[:, None] & (offs_r[None, :] < R), other=0.0)  # [BLOCK_N, R_P]
        kr = tl.load(rope_ptr + slot[:, None] * DR + offs_d[None, :],
                     mask=valid[:, None] & (offs_d[None, :] < DR), other=0.0)
        s = tl.dot(ql, tl.trans(kl), input_precision=PREC)
        s = tl.dot(qr, tl.trans(kr), s, input_precision=PREC) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing valid yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kl.dtype), kl, input_precision=PREC)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    omask = hm[:, None] & (offs_r[None, :] < R)
    o_off = sp * s_os + t * s_ot + offs_h[:, None] * s_oh + offs_r[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=omask)
    tl.store(lse_ptr + sp * s_ls + t * s_lt + offs_h, lse, mask=hm)


@triton.jit
def mla_combine_kernel(po_ptr, plse_ptr, o_ptr, lse_ptr, n_splits, H, s_ps, s_pt, s_ph, s_pls, s_plt,
                       s_ot, s_oh, s_lt, SPLITS_P: tl.constexpr, R: tl.constexpr, R_P: tl.constexpr,
                       BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """Merge the n_splits normalised outputs of BLOCK_H heads of one token by their lse weights.

    The split loops are unrolled to SPLITS_P (n_splits rounded up to a power of two, so a handful of
    compiled variants serve every batch), so every split's loads are issued at once instead of one
    memory round trip per split. With PDL (launched as a programmatic dependent of the attention
    kernel) it first waits for that kernel's writes."""
    if PDL:
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, R_P)
    hm = offs_h < H
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS_P):
        m = tl.maximum(m, tl.load(plse_ptr + s * s_pls + t * s_plt + offs_h, mask=hm & (s < n_splits),
                                  other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R_P], tl.float32)
    mask = hm[:, None] & (offs_r[None, :] < R)
    for s in tl.static_range(SPLITS_P):
        w = tl.exp(tl.load(plse_ptr + s * s_pls + t * s_plt + offs_h, mask=hm & (s < n_splits),
                           other=float("-inf")) - m_safe)
        den += w  # empty (and absent) splits weigh 0
        acc += w[:, None] * tl.load(po_ptr + s * s_ps + t * s_pt + offs_h[:, None] * s_ph + offs_r[None, :],
                                    mask=mask & (s < n_splits), other=0.0)
    has = den > 0
    out = acc / tl.where(has, den, 1.0)[:, None]
    tl.store(o_ptr + t * s_ot + offs_h[:, None] * s_oh + offs_r[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + t * s_lt + offs_h, tl.where(has, m_safe + tl.log(tl.where(has, den, 1.0)), float("-inf")),
             mask=hm)
