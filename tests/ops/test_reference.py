"""The reference ops (the spec) against straightforward dense torch formulations.

Each dense oracle gathers a sequence's whole context out of the paged cache and computes the op the
obvious way, so paging, variable lengths, causality and -1 padding are checked independently.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glm5_ascend.ops.dsa import reference as dsa
from glm5_ascend.ops.moe import reference as moe

from .conftest import make_batch, make_moe_ids


def dense_index_scores(q, weights, index_cache, batch, scale) -> list[torch.Tensor]:
    """Per query token: float32 [ctx] scores sum_h w_h relu(scale q_h . k_j), -inf past its position."""
    flat = index_cache.view(-1, index_cache.shape[-1]).float()
    out, pos, seq = [], batch.positions(), batch.seq_of_token()
    for t in range(batch.T):
        b = int(seq[t])
        keys = flat[batch.slot(b, torch.arange(batch.ctx[b]))]
        s = (weights[t].float()[:, None] * torch.relu(scale * q[t].float() @ keys.T)).sum(0)
        s[pos[t] + 1:] = float("-inf")
        out.append(s)
    return out


def check_selection(idx, dense, topk, atol):
    """idx int32 [T, topk] is a valid top-k of each dense row: valid, unique, trailing -1, best scores."""
    for t, s in enumerate(dense):
        n_valid = min(topk, int(torch.isfinite(s).sum()))
        row = idx[t].long()
        assert (row[:n_valid] >= 0).all() and (row[n_valid:] == -1).all(), f"token {t}: padding wrong: {row}"
        chosen = row[:n_valid]
        assert chosen.unique().numel() == n_valid, f"token {t}: repeated positions {chosen}"
        assert torch.isfinite(s[chosen]).all(), f"token {t}: a chosen position is in the future"
        best = s.topk(n_valid).values
        torch.testing.assert_close(s[chosen].sort(descending=True).values, best, atol=atol, rtol=0)


def test_lightning_indexer_matches_dense_topk(dsa_batch):
    name, batch, topk = dsa_batch
    gen = torch.Generator().manual_seed(1)
    H, D = 4, 16
    q = torch.randn(batch.T, H, D, generator=gen)
    w = torch.randn(batch.T, H, generator=gen)
    cache = batch.cache(D, torch.float32, "cpu", gen)
    idx = dsa.lightning_indexer(q, w, cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, topk, D ** -0.5)
    assert idx.dtype == torch.int32 and idx.shape == (batch.T, topk)
    check_selection(idx, dense_index_scores(q, w, cache, batch, D ** -0.5), topk, atol=1e-5)


def dense_sparse_attention(q_lat, q_rope, lat_cache, rope_cache, batch, topk_idx, scale):
    """Dense softmax over the whole context with everything outside the selected set masked."""
    T, H, R = q_lat.shape
    out, lse = torch.zeros(T, H, R), torch.zeros(T, H)
    seq = batch.seq_of_token()
    for t in range(T):
        b = int(seq[t])
        slots = batch.slot(b, torch.arange(batch.ctx[b]))
        lat = lat_cache.view(-1, R)[slots].float()
        rope = rope_cache.view(-1, rope_cache.shape[-1])[slots].float()
        s = (q_lat[t].float() @ lat.T + q_rope[t].float() @ rope.T) * scale  # [H, ctx]
        sel = torch.zeros(batch.ctx[b], dtype=torch.bool)
        chosen = topk_idx[t][topk_idx[t] >= 0].long()
        sel[chosen] = True
        s = s.masked_fill(~sel, float("-inf"))
        lse[t] = torch.logsumexp(s, -1)
        out[t] = torch.softmax(s, -1) @ lat
    return out, lse


def random_topk(batch, topk, gen) -> torch.Tensor:
    """int32 [T, topk] causal positions per query (random subsets), -1 padded at the end."""
    out = torch.full((batch.T, topk), -1, dtype=torch.int32)
    for t, p in enumerate(batch.positions().tolist()):
        n = min(topk, p + 1)
        out[t, :n] = torch.randperm(p + 1, generator=gen)[:n].to(torch.int32)
    return out


def test_sparse_mla_attention_matches_dense_masked(dsa_batch):
    name, batch, topk = dsa_batch
    gen = torch.Generator().manual_seed(2)
    H, R, Dr = 4, 32, 8
    q_lat, q_rope = torch.randn(batch.T, H, R, generator=gen), torch.randn(batch.T, H, Dr, generator=gen)
    lat, rope = batch.cache(R, torch.float32, "cpu", gen), batch.cache(Dr, torch.float32, "cpu", gen)
    idx = random_topk(batch, topk, gen)
    out, lse = dsa.sparse_mla_attention(q_lat, q_rope, lat, rope, batch.block_tables, batch.cu_seqlens_q,
                                        batch.seq_lens, idx, 0.3, return_lse=True)
    want_out, want_lse = dense_sparse_attention(q_lat, q_rope, lat, rope, batch, idx, 0.3)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(dsa.sparse_mla_attention(q_lat, q_rope, lat, rope, batch.block_tables, batch.cu_seqlens_q,
                                                batch.seq_lens, idx, 0.3), out)


def test_interleaved_rope_rotates_adjacent_pairs():
    """Pair (x[2i], x[2i+1]) is the complex number x[2i] + j x[2i+1] turned by angle[i]; the result
    holds the real parts, then the imaginary ones. So q.k after RoPE depends on the angle difference."""
    gen = torch.Generator().manual_seed(5)
    T, H, D = 6, 3, 16
    x = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    angle = torch.randn(T, D // 2, generator=gen, dtype=torch.float64)
    got = dsa.interleaved_rope(x, angle.cos(), angle.sin())
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1))
    k = torch.randn(D, generator=gen, dtype=torch.float64).expand(T, D)
    shift = angle + 0.7  # both turned by 0.7 more: every q.k stays
    qk = (got[:, 0] * dsa.interleaved_rope(k, angle.cos(), angle.sin())).sum(-1)
    qk_shifted = (dsa.interleaved_rope(x[:, 0], shift.cos(), shift.sin())
                  * dsa.interleaved_rope(k, shift.cos(), shift.sin())).sum(-1)
    torch.testing.assert_close(qk, qk_shifted)


def test_mla_cache_write_hits_slots_and_skips_padding():
    batch = make_batch([3, 2], [10, 5], 4)
    gen = torch.Generator().manual_seed(3)
    slots = torch.cat([batch.slot(b, torch.arange(c - q, c)) for b, (q, c) in enumerate(zip(batch.q_lens, batch.ctx))])
    slots[1] = -1  # a padding token
    lat, rope, idx = (torch.randn(batch.T, d, generator=gen) for d in (8, 4, 6))
    caches = [torch.zeros(batch.num_blocks, 4, d) for d in (8, 4, 6)]
    dsa.mla_cache_write(lat, rope, idx, slots, *caches)
    for src, cache in zip((lat, rope, idx), caches):
        flat = cache.view(-1, cache.shape[-1])
        keep = slots >= 0
        assert torch.equal(flat[slots[keep]], src[keep])
        assert int((flat.abs().sum(-1) > 0).sum()) == int(keep.sum())  # nothing else written


def direct_route(logits, bias, top_k, n_group, topk_group, scale, norm):
    """Token by token, the noaux_tc rule written out with Python loops."""
    T, E = logits.shape
    per = E // n_group
    weights, ids = torch.zeros(T, top_k), torch.zeros(T, top_k, dtype=torch.long)
    for t in range(T):
        s = torch.sigmoid(logits[t])
        c = s + bias
        group_score = [sorted(c[g * per:(g + 1) * per].tolist())[-2:] for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
        cand = [e for e in range(E) if e // per in groups]
        chosen = sorted(cand, key=lambda e: -float(c[e]))[:top_k]
        w = s[chosen]
        w = w / w.sum() if norm else w
        ids[t], weights[t] = torch.tensor(chosen), w * scale
    return weights, ids


@pytest.mark.parametrize("E,top_k,n_group,topk_group,norm", [
    (16, 4, 4, 2, True), (16, 2, 1, 1, True), (12, 3, 3, 1, False), (256, 8, 8, 4, True)])
def test_moe_route_matches_direct_formula(E, top_k, n_group, topk_group, norm):
    gen = torch.Generator().manual_seed(E + top_k)
    logits, bias = torch.randn(7, E, generator=gen), torch.randn(E, generator=gen) * 0.1
    w, ids = moe.moe_route(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (7, top_k)
    want_w, want_ids = direct_route(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    order = ids.long().sort(-1)
    want = want_ids.sort(-1)
    assert torch.equal(order.values, want.values)
    torch.testing.assert_close(w.gather(1, order.indices), want_w.gather(1, want.indices), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("drop", [False, True])
def test_permute_unpermute_round_trip(drop):
    gen = torch.Generator().manual_seed(4)
    T, k, E, D = 9, 3, 8, 5
    x = torch.randn(T, D, generator=gen)
    ids = make_moe_ids(T, k, E, gen, empty_experts=(2, 5))
    if drop:  # an EP rank: ids it does not own arrive as -1 or out of range
        ids[0, 0], ids[3, :], ids[4, 1] = -1, -1, E + 3
    permuted, order, counts = moe.moe_permute(x, ids, E)
    flat = ids.reshape(-1).long()
    keep = (flat >= 0) & (flat < E)
    assert counts.tolist() == torch.bincount(flat[keep], minlength=E).tolist() and counts[2] == counts[5] == 0
    assert permuted.shape == (int(keep.sum()), D) and torch.equal(permuted, x[order // k])
    assert (flat[order][1:] >= flat[order][:-1]).all(), "rows must be grouped by expert"
    w = torch.rand(T, k, generator=gen)
    back = moe.moe_unpermute(permuted, order, w)
    want = x * (w * keep.view(T, k)).sum(-1, keepdim=True)
    torch.testing.assert_close(back, want, atol=1e-6, rtol=1e-6)


def test_grouped_mlp_matches_per_expert_loop():
    gen = torch.Generator().manual_seed(5)
    E, D, I = 6, 8, 4
    counts = torch.tensor([3, 0, 2, 0, 4, 1])  # experts 1 and 3 get no rows
    x = torch.randn(int(counts.sum()), D, generator=gen)
    w13, w2 = torch.randn(E, 2 * I, D, generator=gen), torch.randn(E, D, I, generator=gen)
    out = moe.grouped_mlp(x, counts, w13, w2)
    expert = torch.repeat_interleave(torch.arange(E), counts)
    for r in range(len(x)):
        e = int(expert[r])
        h = w13[e] @ x[r]
        want = w2[e] @ (F.silu(h[:I]) * h[I:])
        torch.testing.assert_close(out[r], want, atol=1e-5, rtol=1e-5)
    assert moe.grouped_mlp(x[:0], torch.zeros(E, dtype=torch.long), w13, w2).shape == (0, D)


def test_grouped_mlp_reads_the_cuda_backends_packed_weights():
    """unpack_weights inverts the cuda backend's [E, rows / bn, K / bk, bn, bk] tiling."""
    gen = torch.Generator().manual_seed(7)
    x, counts = torch.randn(6, 64, generator=gen), torch.tensor([4, 2])
    w13, w2 = torch.randn(2, 64, 64, generator=gen), torch.randn(2, 64, 32, generator=gen)
    def pack(w, bn, bk):
        E, rows, K = w.shape
        return w.reshape(E, rows // bn, bn, K // bk, bk).permute(0, 1, 3, 2, 4).contiguous()
    assert torch.equal(moe.unpack_weights(pack(w13, 16, 32)), w13)
    assert torch.equal(moe.grouped_mlp(x, counts, pack(w13, 16, 32), pack(w2, 32, 16)),
                       moe.grouped_mlp(x, counts, w13, w2))


# ---- boundaries the mutation run found unchecked (docs/testing.md)
def test_mla_cache_write_writes_slot_zero_beside_padding():
    # float32 inputs into bfloat16 caches (the model's), rope width 6 != block size 4
    lat, rope, idx = torch.arange(1.0, 4.0)[:, None].repeat(1, 8), torch.full((3, 6), 2.0), torch.ones(3, 5)
    caches = [torch.zeros(2, 4, d, dtype=torch.bfloat16) for d in (8, 6, 5)]
    dsa.mla_cache_write(lat, rope, idx, torch.tensor([0, -1, 5]), *caches)
    for src, cache in zip((lat, rope, idx), caches):
        flat = cache.view(-1, cache.shape[-1])
        assert torch.equal(flat[0], src[0].bfloat16()) and torch.equal(flat[5], src[2].bfloat16())
        assert int((flat.abs().sum(-1) > 0).sum()) == 2  # the -1 row went nowhere
    rope_only = torch.zeros(2, 4, 6)
    dsa.mla_cache_write(lat, rope, idx, torch.tensor([1, 2, 3]), torch.zeros(2, 4, 8), rope_only, None)
    assert int((rope_only.view(-1, 6).abs().sum(-1) > 0).sum()) == 3  # no index cache: that write is skipped


def test_moe_route_default_normalises_and_two_groups():
    gen = torch.Generator().manual_seed(9)
    logits, bias = torch.randn(5, 8, generator=gen), torch.randn(8, generator=gen) * 0.1
    w, ids = moe.moe_route(logits, bias, 2, 2, 1, 1.0)  # norm_topk_prob left at its default (True)
    assert torch.allclose(w.sum(-1), torch.ones(5), atol=1e-6)
    want_w, want_ids = direct_route(logits, bias, 2, 2, 1, 1.0, True)
    assert torch.equal(ids.long().sort(-1).values, want_ids.sort(-1).values)
    assert ((ids // 4) == (ids[:, :1] // 4)).all()  # one group of two kept: both picks in it


def test_moe_unpermute_keeps_the_activation_dtype():
    x = torch.randn(4, 6).bfloat16()
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 0]])
    permuted, order, _ = moe.moe_permute(x, ids, 3)
    back = moe.moe_unpermute(permuted, order, torch.full((4, 2), 0.5))
    assert back.dtype == torch.bfloat16
    torch.testing.assert_close(back.float(), x.float(), atol=1e-2, rtol=1e-2)


def test_expert_shape_of_plain_and_packed_weights():
    w = torch.zeros(3, 8, 12)
    assert moe.expert_shape(w) == (3, 8, 12)
    assert moe.expert_shape(w.reshape(3, 2, 4, 3, 4).permute(0, 1, 3, 2, 4)) == (3, 8, 12)


def test_moe_permute_drops_the_id_equal_to_num_experts_and_keeps_copy_order():
    E, k = 4, 2
    ids = torch.tensor([[0, E], [-1, 3], [E, 0]])
    permuted, order, counts = moe.moe_permute(torch.arange(3.0)[:, None], ids, E)
    assert counts.tolist() == [2, 0, 0, 1] and order.tolist() == [0, 5, 3]
    assert moe.moe_permute(torch.zeros(2, 1), torch.tensor([[0, 1], [1, 0]]), E)[2].tolist() == [2, 2, 0, 0]
    # many copies of one expert come out in flat-index order (a stable sort), whatever the sort would do
    many = torch.zeros(3000, k, dtype=torch.long)
    many[::3, 1] = 1
    _, order, counts = moe.moe_permute(torch.zeros(3000, 1), many, E)
    zeros = order[:int(counts[0])]
    assert (zeros[1:] > zeros[:-1]).all()


def test_row_groups_and_tie_flags_on_a_hand_made_tie():
    """Every key scores exactly 0 (all-zero keys), so each prompt row with more causal keys than topk
    keeps some of several equal scores: those rows, and only those, are flagged; a generated row is
    never flagged (its row length is pos + 1, not the prompt's)."""
    assert dsa._row_groups(torch.arange(6), 6) == [(0, 6, 6)]
    assert dsa._row_groups(torch.tensor([4, 5, 6, 7]), 6) == [(0, 2, 6), (2, 3, 7), (3, 4, 8)]
    assert dsa._row_groups(torch.tensor([6]), 6) == [(0, 1, 7)]
    batch = make_batch([7], [7], 4)  # one sequence: 6 prompt positions, then one generated
    q, w = torch.ones(7, 2, 8), torch.ones(7, 2)
    cache = torch.zeros(batch.num_blocks, 4, 8)
    flags = torch.zeros(7, dtype=torch.bool)
    flags[1] = True  # flags are only ever set, never cleared
    top = dsa.lightning_indexer(q, w, cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, 3, 1.0,
                                prompt_lens=torch.tensor([6]), tie_flags=flags)
    assert flags.tolist() == [False, True, False, True, True, True, False]
    assert top[0].tolist() == [0, -1, -1] and top[2].sort().values.tolist() == [0, 1, 2]
