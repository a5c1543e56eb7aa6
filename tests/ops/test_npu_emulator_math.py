"""The emulator's DSA kernels on their own: hand-checked cases from the op definitions, and agreement
between layouts. The emulator computes without the project's reference (tests/ops/emulator/dsa.py),
so these pin its math down directly; test_npu_emulated.py then compares the npu backend with the
reference through it, and can fail when the reference is wrong.
"""
from __future__ import annotations

import math

import pytest
import torch

from glm5_ascend.ops.dsa import reference as dsa_ref
from tests.ops.emulator.dsa import npu_lightning_indexer, npu_sparse_flash_attention

from .conftest import make_batch

D_IDX, R, DR = 128, 512, 64
I32 = torch.int32


def _flat_keys(batch, cache):
    """Per sequence, its keys [ctx, ...] read from a paged cache [blocks, block_size, ...]."""
    out = []
    for b, c in enumerate(batch.ctx):
        pos = torch.arange(c)
        slots = batch.block_tables[b].long()[pos // batch.block_size] * batch.block_size + pos % batch.block_size
        out.append(cache.view(-1, *cache.shape[2:])[slots])
    return out


# ------------------------------------------------------------------ npu_lightning_indexer
def _indexer_case():
    """One sequence of 2 queries over 4 keys; head 0 weights 1, head 1 weights 2 (one hot dims)."""
    q = torch.zeros(2, 2, D_IDX)
    q[:, 0, 0] = 1.0  # head 0 reads dim 0 of the key
    q[:, 1, 1] = 1.0  # head 1 reads dim 1
    k = torch.zeros(4, D_IDX)
    k[:, 0] = torch.tensor([3.0, -5.0, 1.0, 2.0])
    k[:, 1] = torch.tensor([0.0, 4.0, -1.0, 0.5])
    w = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    # score_j = 1 * relu(k0) + 2 * relu(k1) = [3, 8, 1, 3]
    return q, k, w


@pytest.mark.parametrize("mode", [0, 3])
def test_indexer_scores_order_mask_and_padding(mode):
    q, k, w = _indexer_case()
    idx, values = npu_lightning_indexer(
        q, k.view(4, 1, D_IDX), w, actual_seq_lengths_query=torch.tensor([2], dtype=I32),
        actual_seq_lengths_key=torch.tensor([4], dtype=I32), layout_query="TND", layout_key="TND",
        sparse_count=6, sparse_mode=mode, return_value=True)
    assert idx.shape == (2, 1, 6) and idx.dtype == I32
    if mode == 0:  # every key: best first, the tie (3, 3) earlier position first, -1 after
        want = [[1, 0, 3, 2, -1, -1]] * 2
        want_vals = [[8, 3, 3, 1, 0, 0]] * 2
    else:  # rightDownCausal: query 0 of 2 over 4 keys sees keys 0..2, query 1 all 4
        want = [[1, 0, 2, -1, -1, -1], [1, 0, 3, 2, -1, -1]]
        want_vals = [[8, 3, 1, 0, 0, 0], [8, 3, 3, 1, 0, 0]]
    assert idx.view(2, 6).tolist() == want
    assert values.view(2, 6).tolist() == want_vals


def test_indexer_sparse_count_below_the_context_keeps_the_best():
    q, k, w = _indexer_case()
    idx, _ = npu_lightning_indexer(
        q, k.view(4, 1, D_IDX), w, actual_seq_lengths_query=torch.tensor([2], dtype=I32),
        actual_seq_lengths_key=torch.tensor([4], dtype=I32), layout_query="TND", layout_key="TND",
        sparse_count=2, sparse_mode=3)
    assert idx.view(2, 2).tolist() == [[1, 0], [1, 0]]


def test_indexer_layouts_agree():
    """PA_BSND through a shuffled block table, TND and BSND keys give the same selection."""
    batch = make_batch([3, 2], [20, 7], 16, seed=5)
    gen = torch.Generator().manual_seed(6)
    cache = batch.cache(D_IDX, torch.float32, "cpu", gen)
    q = torch.randn(batch.T, 4, D_IDX, generator=gen)
    w = torch.randn(batch.T, 4, generator=gen)
    common = dict(actual_seq_lengths_query=batch.cu_seqlens_q[1:], sparse_count=8, layout_query="TND")
    paged, _ = npu_lightning_indexer(q, cache.view(batch.num_blocks, 16, 1, D_IDX), w, block_table=batch.block_tables,
                                     actual_seq_lengths_key=batch.seq_lens, layout_key="PA_BSND", **common)
    keys = _flat_keys(batch, cache)
    tnd, _ = npu_lightning_indexer(q, torch.cat(keys).view(-1, 1, D_IDX), w, layout_key="TND",
                                   actual_seq_lengths_key=batch.seq_lens.cumsum(0).to(I32), **common)
    assert torch.equal(paged, tnd)
    # BSND queries [B, S1, N, D] and keys [B, S2, 1, D], padded; lengths per batch
    S1, S2 = max(batch.q_lens), max(batch.ctx)
    qb, wb, kb = torch.zeros(2, S1, 4, D_IDX), torch.zeros(2, S1, 4), torch.zeros(2, S2, 1, D_IDX)
    for b, (first, n) in enumerate(zip(batch.cu_seqlens_q[:-1].tolist(), batch.q_lens)):
        qb[b, :n], wb[b, :n] = q[first:first + n], w[first:first + n]
        kb[b, :batch.ctx[b], 0] = keys[b]
    bsnd, _ = npu_lightning_indexer(qb, kb, wb, actual_seq_lengths_query=torch.tensor(batch.q_lens, dtype=I32),
                                    actual_seq_lengths_key=batch.seq_lens, layout_query="BSND", layout_key="BSND",
                                    sparse_count=8)
    for b, (first, n) in enumerate(zip(batch.cu_seqlens_q[:-1].tolist(), batch.q_lens)):
        assert torch.equal(bsnd[b, :n], paged[first:first + n])


# ------------------------------------------------------------------ npu_sparse_flash_attention
def _sfa_inputs(seed=7, T=2, H=2, ctx=5):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, R, generator=gen) * 0.05
    qr = torch.randn(T, H, DR, generator=gen) * 0.5
    kv = torch.randn(ctx, 1, R, generator=gen) * 0.05
    kr = torch.randn(ctx, 1, DR, generator=gen) * 0.5
    return q, qr, kv, kr


def _sfa(q, qr, kv, kr, idx, scale=0.1, mode=3, lse=True, **kw):
    T, ctx = q.shape[0], kv.shape[0]
    return npu_sparse_flash_attention(
        q, kv, kv, idx.to(I32).view(T, 1, -1), scale, actual_seq_lengths_query=torch.tensor([T], dtype=I32),
        actual_seq_lengths_kv=torch.tensor([ctx], dtype=I32), query_rope=qr, key_rope=kr, layout_query="TND",
        layout_kv="TND", sparse_mode=mode, attention_mode=2, return_softmax_lse=lse, **kw)


def test_sfa_by_hand_with_rope_padding_and_softmax_stats():
    q, qr, kv, kr = _sfa_inputs()
    idx = torch.tensor([[3, 0, 2, -1], [1, 4, -1, -1]])
    out, mx, sm = _sfa(q, qr, kv, kr, idx)
    assert out.shape == q.shape and mx.shape == sm.shape == (1, 2, 2) and mx.dtype == torch.float32
    for t, picked in enumerate([[3, 0, 2], [1, 4]]):
        for h in range(2):
            x = [0.1 * (float(q[t, h] @ kv[j, 0]) + float(qr[t, h] @ kr[j, 0])) for j in picked]
            m = max(x)
            e = [math.exp(v - m) for v in x]
            want = sum(ei * kv[j, 0] for ei, j in zip(e, picked)) / sum(e)
            torch.testing.assert_close(out[t, h], want, atol=1e-6, rtol=1e-5)
            assert mx[0, t, h].item() == pytest.approx(m, abs=1e-6)
            assert sm[0, t, h].item() == pytest.approx(sum(e), rel=1e-5)
    # the rope term counts: without it the scores, hence the output, change
    out0, _, _ = _sfa(q, qr, kv, torch.zeros_like(kr), idx)
    assert (out0 - out).abs().max() > 1e-3


def test_sfa_causal_mode_drops_future_tokens_and_mode_0_keeps_them():
    q, qr, kv, kr = _sfa_inputs(T=2, ctx=5)
    idx = torch.tensor([[4, 3, 0, -1], [4, 3, 0, -1]])  # query 0 sits at position 3 (5 - 2 + 0)
    causal, _, _ = _sfa(q, qr, kv, kr, idx, mode=3)
    dropped, _, _ = _sfa(q, qr, kv, kr, torch.tensor([[3, 0, -1, -1], [4, 3, 0, -1]]), mode=0)
    full, _, _ = _sfa(q, qr, kv, kr, idx, mode=0)
    torch.testing.assert_close(causal, dropped)
    assert (full[0] - causal[0]).abs().max() > 1e-4 and torch.equal(full[1], causal[1])


def test_sfa_sparse_block_size_reads_whole_blocks_cut_at_the_length():
    q, qr, kv, kr = _sfa_inputs(T=1, ctx=7)
    blocks, _, _ = _sfa(q, qr, kv, kr, torch.tensor([[3, 1, -1]]), sparse_block_size=2)  # tokens 6, 2, 3 (7 cut)
    tokens, _, _ = _sfa(q, qr, kv, kr, torch.tensor([[6, 2, 3, -1]]))
    torch.testing.assert_close(blocks, tokens)


def test_sfa_paged_equals_tnd_and_matches_the_reference_lse():
    """PA_BSND with a shuffled block table equals TND keys; the stats give the reference's lse."""
    batch = make_batch([2, 1], [9, 20], 16, seed=3)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(batch.T, 4, R, generator=gen) * 0.05
    qr = torch.randn(batch.T, 4, DR, generator=gen) * 0.5
    lat, rope = batch.cache(R, torch.float32, "cpu", gen) * 0.05, batch.cache(DR, torch.float32, "cpu", gen) * 0.5
    idx = torch.tensor([[0, 5, 7, -1], [1, 2, 3, 8], [19, 0, 7, -1]])  # all causal: positions 7, 8, 19
    kv = lat.view(batch.num_blocks, 16, 1, R)
    common = dict(actual_seq_lengths_query=batch.cu_seqlens_q[1:], query_rope=qr, layout_query="TND",
                  attention_mode=2)
    paged, _, _ = npu_sparse_flash_attention(q, kv, kv, idx.to(I32).view(3, 1, 4), 0.07, block_table=batch.block_tables,
                                             actual_seq_lengths_kv=batch.seq_lens, layout_kv="PA_BSND",
                                             key_rope=rope.view(batch.num_blocks, 16, 1, DR), **common)
    flat_lat, flat_rope = torch.cat(_flat_keys(batch, lat)), torch.cat(_flat_keys(batch, rope))
    kv2 = flat_lat.view(-1, 1, R)
    tnd, mx, sm = npu_sparse_flash_attention(q, kv2, kv2, idx.to(I32).view(3, 1, 4), 0.07,
                                             actual_seq_lengths_kv=batch.seq_lens.cumsum(0).to(I32), layout_kv="TND",
                                             key_rope=flat_rope.view(-1, 1, DR), return_softmax_lse=True, **common)
    torch.testing.assert_close(paged, tnd)
    want, lse = dsa_ref.sparse_mla_attention(q, qr, lat, rope, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens,
                                             idx.to(I32), 0.07, return_lse=True)
    torch.testing.assert_close(tnd, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mx[0] + sm[0].log(), lse, atol=1e-5, rtol=1e-5)
