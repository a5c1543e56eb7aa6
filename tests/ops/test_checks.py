"""The public ops' argument checks (ops/checks.py): each mistake is one line naming the argument.

Shapes, dtypes, devices and scalar arguments are checked on every call; index values only with
GLM5_OPS_CHECK_VALUES=1 (tests/ops/conftest.py turns that on for the whole op suite, so every valid
case there also passes the value checks).
"""
from __future__ import annotations

import re

import pytest
import torch

from glm5_ascend import ops

from .conftest import make_batch


def _raises(msg: str, fn, *args, exc=ValueError):
    with pytest.raises(exc, match=re.escape(msg)) as info:
        fn(*args)
    assert "\n" not in str(info.value)


def _dsa():
    """A valid indexer / MLA call's arguments: 2 sequences, 3 + 1 new tokens, block size 4."""
    b = make_batch([3, 1], [6, 9], 4)
    T, H, D, R, Dr = 4, 2, 8, 16, 4
    gen = torch.Generator().manual_seed(0)
    return dict(
        b=b, q=torch.randn(T, H, D, generator=gen), w=torch.randn(T, H, generator=gen),
        index_cache=torch.randn(b.num_blocks, 4, D, generator=gen),
        ql=torch.randn(T, H, R, generator=gen), qr=torch.randn(T, H, Dr, generator=gen),
        latent=torch.randn(b.num_blocks, 4, R, generator=gen), rope=torch.randn(b.num_blocks, 4, Dr, generator=gen),
        idx=torch.tensor([[0, 1, -1], [0, 2, 3], [1, 4, 5], [8, 0, -1]], dtype=torch.int32))


def _indexer(d, **over):
    a = dict(q=d["q"], weights=d["w"], index_cache=d["index_cache"], block_tables=d["b"].block_tables,
             cu_seqlens_q=d["b"].cu_seqlens_q, seq_lens=d["b"].seq_lens, topk=3, softmax_scale=0.5)
    a.update(over)
    return lambda: ops.lightning_indexer(**a)


def _mla(d, **over):
    a = dict(q_latent=d["ql"], q_rope=d["qr"], latent_cache=d["latent"], rope_cache=d["rope"],
             block_tables=d["b"].block_tables, cu_seqlens_q=d["b"].cu_seqlens_q, seq_lens=d["b"].seq_lens,
             topk_indices=d["idx"], softmax_scale=0.2)
    a.update(over)
    return lambda: ops.sparse_mla_attention(**a)


def test_valid_dsa_calls_pass_every_check():
    d = _dsa()
    assert _indexer(d)().shape == (4, 3)
    assert _mla(d)().shape == (4, 2, 16)


@pytest.mark.parametrize("over,msg", [
    (lambda d: dict(q=d["q"][0]), "lightning_indexer: q must be [T, H, D], got [2, 8]"),
    (lambda d: dict(weights=d["w"][:, :1]), "weights must be [T=4, H=2], got [4, 1]"),
    (lambda d: dict(index_cache=d["index_cache"][..., :4]), "index_cache must be [num_blocks, block_size, D=8]"),
    (lambda d: dict(cu_seqlens_q=d["b"].cu_seqlens_q[:2]), "cu_seqlens_q must be [B+1=3], got [2]"),
    (lambda d: dict(block_tables=d["b"].block_tables[:1]), "block_tables must be [B=2, max_blocks]"),
    (lambda d: dict(seq_lens=d["b"].seq_lens.float()), "seq_lens must be int32 or int64, got torch.float32"),
    (lambda d: dict(topk=-1), "topk must be >= 0, got -1"),
    (lambda d: dict(topk=2.0), "topk must be an int, got float"),
    (lambda d: dict(q=d["q"].to(torch.int32)), "q must be a floating-point tensor"),
    (lambda d: dict(tie_flags=torch.zeros(4, dtype=torch.int32)), "tie_flags must be bool"),
    (lambda d: dict(prompt_lens=torch.zeros(3, dtype=torch.int32)), "prompt_lens must be [B=2]"),
])
def test_indexer_names_the_argument(over, msg):
    d = _dsa()
    _raises(msg, _indexer(d, **over(d)))


@pytest.mark.parametrize("over,msg", [
    (lambda d: dict(q_rope=d["qr"][:3]), "sparse_mla_attention: q_rope must be [T=4, H=2, Dr], got [3, 2, 4]"),
    (lambda d: dict(rope_cache=d["rope"][:1]), "rope_cache must be [num_blocks="),
    (lambda d: dict(latent_cache=d["latent"][..., :8]), "latent_cache must be [num_blocks, block_size, R=16]"),
    (lambda d: dict(topk_indices=d["idx"][:2]), "topk_indices must be [T=4, K], got [2, 3]"),
    (lambda d: dict(topk_indices=d["idx"].float()), "topk_indices must be int32 or int64"),
])
def test_sparse_mla_names_the_argument(over, msg):
    d = _dsa()
    _raises(msg, _mla(d, **over(d)))


@pytest.mark.parametrize("over,msg", [
    (lambda d: dict(cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.int32)), "cu_seqlens_q must rise from 0 to T=4"),
    (lambda d: dict(seq_lens=torch.tensor([2, 9], dtype=torch.int32)),
     "seq_lens[0]=2 is below that sequence's 3 new tokens"),
    (lambda d: dict(block_tables=d["b"].block_tables[:, :2]),
     "sequence 1 has 9 tokens, 3 blocks of 4, but block_tables has 2 columns"),
    (lambda d: dict(block_tables=d["b"].block_tables.clone().fill_(99)),
     "block_tables[0, 0]=99 is not a block of the cache"),
])
def test_value_checks_catch_batch_metadata_that_would_read_out_of_bounds(monkeypatch, over, msg):
    monkeypatch.setenv("GLM5_OPS_CHECK_VALUES", "1")
    d = _dsa()
    _raises(msg, _indexer(d, **over(d)))
    _raises(msg.replace("lightning_indexer", "sparse_mla_attention"), _mla(d, **over(d)))


def test_value_checks_catch_top_k_positions_past_the_context(monkeypatch):
    monkeypatch.setenv("GLM5_OPS_CHECK_VALUES", "1")
    d = _dsa()
    idx = d["idx"].clone()
    idx[3, 1] = 9  # sequence 1 has 9 positions: 0..8
    _raises("topk_indices[3, 1]=9 is outside its sequence's 9 positions", _mla(d, topk_indices=idx))
    idx[3, 1] = -2
    _raises("topk_indices[3, 1]=-2", _mla(d, topk_indices=idx))


def test_value_checks_are_off_by_default_and_the_switch_is_strict(monkeypatch):
    d = _dsa()
    monkeypatch.delenv("GLM5_OPS_CHECK_VALUES", raising=False)
    wide = d["b"].seq_lens.clone()
    wide[0] = 2  # a bad value, not a bad shape: only the value checks see it
    _indexer(d, seq_lens=wide)()
    monkeypatch.setenv("GLM5_OPS_CHECK_VALUES", "yes")
    _raises("GLM5_OPS_CHECK_VALUES must be 0 or 1, got 'yes'", _indexer(d))


def test_cache_write_names_the_argument(monkeypatch):
    T, R, Dr, Di, nb, bs = 3, 8, 4, 6, 2, 4
    lat, rope, ik = torch.randn(T, R), torch.randn(T, Dr), torch.randn(T, Di)
    caches = [torch.zeros(nb, bs, n) for n in (R, Dr, Di)]
    slots = torch.tensor([0, 5, -1])
    ops.mla_cache_write(lat, rope, ik, slots, *caches)
    _raises("mla_cache_write: slot_mapping must be [T=3], got [2]",
            ops.mla_cache_write, lat, rope, ik, slots[:2], *caches)
    _raises("slot_mapping must be int32 or int64", ops.mla_cache_write, lat, rope, ik, slots.float(), *caches)
    _raises("rope_cache must be [num_blocks=2, block_size=4, Dr=4], got [2, 4, 5]",
            ops.mla_cache_write, lat, rope, ik, slots, caches[0], torch.zeros(nb, bs, 5), caches[2])
    _raises("index_k and index_cache go together", ops.mla_cache_write, lat, rope, None, slots, *caches)
    monkeypatch.setenv("GLM5_OPS_CHECK_VALUES", "1")
    _raises("slot_mapping holds slot 8, past the cache's 2 blocks x 4 = 8 slots",
            ops.mla_cache_write, lat, rope, ik, torch.tensor([0, 8, -1]), *caches)


def test_rope_names_the_argument():
    x, cos = torch.randn(3, 2, 8), torch.randn(3, 4)
    assert ops.interleaved_rope(x, cos, cos).shape == x.shape
    _raises("interleaved_rope: cos must be [T=3, D/2=4], got [3, 8]", ops.interleaved_rope, x, cos.repeat(1, 2), cos)
    _raises("x must be [T, ..., D] with an even D", ops.interleaved_rope, x[..., :7], cos, cos)


@pytest.mark.parametrize("args,msg", [
    ((9, 1, 1), "moe_route: top_k must be in [1, 8] (the experts), got 9"),
    ((2, 3, 1), "n_group=3 must divide the 8 experts"),
    ((2, 4, 5), "topk_group must be in [1, 4], got 5"),
    ((5, 4, 2), "top_k must be in [1, 4] (the experts of topk_group=2 groups of 2), got 5"),
    ((2, 8, 2), "groups need >= 2 experts; 8 experts in 8 groups have 1"),
])
def test_route_names_the_argument(args, msg):
    _raises(msg, ops.moe_route, torch.randn(4, 8), torch.zeros(8), *args, 1.0)


def test_route_bias_and_one_group():
    _raises("e_score_correction_bias must be [E=8], got [7]",
            ops.moe_route, torch.randn(4, 8), torch.zeros(7), 2, 1, 1, 1.0)
    # with one group topk_group is unused, as transformers ignores it there
    assert ops.moe_route(torch.randn(4, 8), torch.zeros(8), 2, 1, 0, 1.0)[1].shape == (4, 2)


def test_permute_and_unpermute_name_the_argument(monkeypatch):
    h, ids = torch.randn(4, 6), torch.tensor([[0, 1], [1, 2], [2, 0], [1, 0]])
    permuted, order, counts = ops.moe_permute(h, ids, 3)
    _raises("moe_permute: expert_ids must be [T=4, k], got [3, 2]", ops.moe_permute, h, ids[:3], 3)
    _raises("expert_ids must be int32 or int64", ops.moe_permute, h, ids.float(), 3)
    _raises("num_experts must be >= 1, got 0", ops.moe_permute, h, ids, 0)
    w = torch.rand(4, 2)
    assert ops.moe_unpermute(permuted, order, w).shape == (4, 6)
    _raises("moe_unpermute: order must be [N=8], got [7]", ops.moe_unpermute, permuted, order[:7], w)
    _raises("expert_out has 8 rows but weights [T=2, k=2] has only 4 token slots",
            ops.moe_unpermute, permuted, order, w[:2])
    monkeypatch.setenv("GLM5_OPS_CHECK_VALUES", "1")
    _raises("order must index the 8 token slots of weights (-1: padding), got values 0..8",
            ops.moe_unpermute, permuted, torch.where(order == 7, 8, order), w)
    _raises("order names a token slot twice", ops.moe_unpermute, permuted, torch.where(order == 7, 6, order), w)
    padded = torch.where(order == 7, -1, order)  # a padding row (the npu backend's padded moe_permute)
    assert ops.moe_unpermute(permuted, padded, w).shape == (4, 6)


@pytest.mark.parametrize("change,msg", [
    (lambda x, c, a, b: (x[:, :4], c, a, b), "w13 must be [E, 2I, D=4]"),
    (lambda x, c, a, b: (x, c, a, b[:, :, :2]), "w2 must be [E=3, D=8, I=4]"),
    (lambda x, c, a, b: (x, c[:2], a, b), "counts must be [E=3]"),
    (lambda x, c, a, b: (x, c.float(), a, b), "counts must be int32 or int64"),
    (lambda x, c, a, b: (x[0], c, a, b), "x must be [N, D]"),
    (lambda x, c, a, b: (x.double(), c, a, b), "must share a dtype"),
])
def test_grouped_mlp_names_inputs_that_do_not_fit(change, msg):
    x, counts = torch.randn(5, 8), torch.tensor([2, 0, 3])
    w13, w2 = torch.randn(3, 8, 8), torch.randn(3, 8, 4)
    _raises(msg, ops.grouped_mlp, *change(x, counts, w13, w2))


def test_grouped_mlp_counts_must_fit_the_rows(monkeypatch):
    monkeypatch.setenv("GLM5_OPS_CHECK_VALUES", "1")
    x, w13, w2 = torch.randn(5, 8), torch.randn(3, 8, 8), torch.randn(3, 8, 4)
    _raises("counts must be >= 0 and sum to at most x's 5 rows, got sum 6",
            ops.grouped_mlp, x, torch.tensor([2, 1, 3]), w13, w2)
    assert ops.grouped_mlp(x, torch.tensor([2, 0, 2]), w13, w2).shape == (5, 8)  # the fifth row is padding


def test_a_non_tensor_is_a_type_error():
    _raises("grouped_mlp: counts must be a torch.Tensor, got list", ops.grouped_mlp,
            torch.randn(5, 8), [2, 0, 3], torch.randn(3, 8, 8), torch.randn(3, 8, 4), exc=TypeError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_inputs_on_two_devices_are_named():
    x = torch.randn(5, 8, device="cuda")
    _raises("grouped_mlp: counts is on cpu but x is on cuda:0; move every input to one device", ops.grouped_mlp,
            x, torch.tensor([2, 0, 3]), torch.randn(3, 8, 8, device="cuda"), torch.randn(3, 8, 4, device="cuda"))
