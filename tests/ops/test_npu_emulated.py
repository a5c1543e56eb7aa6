"""The npu backend against the reference, through the public ops with GLM5_OPS_BACKEND=npu.

On a host without an NPU the torch_npu calls run in the contract emulator (tests/ops/emulator), so what
is tested is each wrapper's layout conversion and semantic mapping; on an Ascend host the same tests run
the real kernels. Tolerances per dtype (conftest.TOL): float32 1e-5, bfloat16 3e-2 (abs and rel). Index
selections are compared by the dense scores they pick (bf16 folds the softmax scale into bf16 weights,
so near-equal scores may swap; the picked scores must still be the best ones).
"""
from __future__ import annotations

import pytest
import torch

from glm5_ascend import ops
from glm5_ascend.ops.dsa import reference as dsa_ref
from glm5_ascend.ops.moe import reference as moe_ref

from .conftest import TOL, make_batch, make_moe_ids
from .test_reference import check_selection, dense_index_scores

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=DTYPES, ids=["fp32", "bf16"])
def dtype(request, device):
    if device.type == "npu" and request.param == torch.float32:
        pytest.skip("the fused DSA kernels take bf16/fp16 only")
    return request.param


def _dsa_inputs(batch, dtype, device, seed, H=4, D=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch.T, H, D, generator=gen).to(dtype).to(device)
    w = torch.randn(batch.T, H, generator=gen).to(device)
    return q, w, batch.cache(D, dtype, device, gen)


def test_lightning_indexer(npu_backend, dsa_batch, dtype, device):
    name, batch, topk = dsa_batch
    q, w, cache = _dsa_inputs(batch, dtype, device, seed=11)
    b = batch.to(device)
    args = (q, w, cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, topk, 16 ** -0.5)
    assert ops.resolve("lightning_indexer", device.type)[0] == "npu"
    got = ops.lightning_indexer(*args).cpu()
    want = dsa_ref.lightning_indexer(*args).cpu()
    assert got.dtype == torch.int32 and got.shape == want.shape
    dense = dense_index_scores(q.cpu(), w.cpu(), cache.cpu(), batch, 16 ** -0.5)
    scale = max(float(s[torch.isfinite(s)].abs().max()) for s in dense if torch.isfinite(s).any())
    check_selection(got, dense, topk, atol=1e-5 if dtype == torch.float32 else 2e-2 * scale)
    if dtype == torch.float32:
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    if device.type == "cpu":
        assert npu_backend.calls["npu_lightning_indexer"] == (1 if batch.T else 0)


def test_sparse_mla_attention(npu_backend, dsa_batch, dtype, device):
    name, batch, topk = dsa_batch
    gen = torch.Generator().manual_seed(12)
    H, R, Dr, Di = 4, 32, 8, 16
    q_lat = torch.randn(batch.T, H, R, generator=gen).to(dtype).to(device)
    q_rope = torch.randn(batch.T, H, Dr, generator=gen).to(dtype).to(device)
    lat, rope = batch.cache(R, dtype, device, gen), batch.cache(Dr, dtype, device, gen)
    b = batch.to(device)
    q_i, w_i, c_i = _dsa_inputs(batch, dtype, device, seed=13, D=Di)
    idx = dsa_ref.lightning_indexer(q_i, w_i, c_i, b.block_tables, b.cu_seqlens_q, b.seq_lens, topk, 0.25)
    args = (q_lat, q_rope, lat, rope, b.block_tables, b.cu_seqlens_q, b.seq_lens, idx, 0.2)
    out, lse = ops.sparse_mla_attention(*args, return_lse=True)
    want_out, want_lse = dsa_ref.sparse_mla_attention(*args, return_lse=True)
    assert out.dtype == dtype and out.shape == (batch.T, H, R) and lse.dtype == torch.float32
    torch.testing.assert_close(out.float().cpu(), want_out.float().cpu(), **TOL[dtype])
    torch.testing.assert_close(lse.cpu(), want_lse.cpu(), **TOL[dtype])
    plain = ops.sparse_mla_attention(*args)
    torch.testing.assert_close(plain.float().cpu(), want_out.float().cpu(), **TOL[dtype])


def test_mla_cache_write(npu_backend, dtype, device):
    batch = make_batch([3, 1, 2], [10, 17, 2], 8)
    gen = torch.Generator().manual_seed(14)
    slots = torch.cat([batch.slot(b, torch.arange(c - q, c)) for b, (q, c) in enumerate(zip(batch.q_lens, batch.ctx))])
    slots[2] = -1
    lat, rope, idx = (torch.randn(batch.T, d, generator=gen).to(dtype).to(device) for d in (32, 8, 16))
    caches = [batch.cache(d, dtype, device, gen) for d in (32, 8, 16)]
    want = [c.clone() for c in caches]
    ops.mla_cache_write(lat, rope, idx, slots.to(device), *caches)
    dsa_ref.mla_cache_write(lat, rope, idx, slots.to(device), *want)
    for got, ref in zip(caches, want):
        assert torch.equal(got.cpu(), ref.cpu())
    ops.mla_cache_write(lat, rope, None, slots.to(device), caches[0], caches[1], None)  # shared-indexer layer


def test_dsa_empty_batch(npu_backend, device):
    batch = make_batch([0], [5], 4)
    b = batch.to(device)
    q, w, cache = _dsa_inputs(batch, torch.bfloat16, device, seed=15)
    assert ops.lightning_indexer(q, w, cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, 4, 0.25).shape == (0, 4)
    out, lse = ops.sparse_mla_attention(q, q[..., :4], cache, cache[..., :4], b.block_tables, b.cu_seqlens_q,
                                        b.seq_lens, torch.zeros(0, 4, dtype=torch.int32, device=device), 0.2, True)
    assert out.shape == (0, 4, 16) and lse.shape == (0, 4)


def test_dsa_shape_errors_name_the_argument(npu_backend, device):
    batch = make_batch([2], [5], 4)
    b = batch.to(device)
    q, w, cache = _dsa_inputs(batch, torch.bfloat16, device, seed=16)
    with pytest.raises(ValueError, match="weights must be"):
        ops.lightning_indexer(q, w[:, :2], cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, 4, 0.25)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ops.lightning_indexer(q, w, cache, b.block_tables, b.cu_seqlens_q[:1], b.seq_lens, 4, 0.25)


@pytest.mark.parametrize("E,top_k,n_group,topk_group,norm,fused", [
    (256, 8, 8, 4, True, True),    # GLM-5's router
    (16, 4, 4, 2, True, True),
    (16, 2, 1, 1, False, True),    # no renormalisation: weights gathered from norm_out
    (8, 3, 4, 2, True, False),     # 2 experts per group: outside the kernel's limits, torch fallback
])
def test_moe_route(npu_backend, device, E, top_k, n_group, topk_group, norm, fused):
    gen = torch.Generator().manual_seed(E * top_k)
    logits = torch.randn(33, E, generator=gen).to(device)
    bias = (torch.randn(E, generator=gen) * 0.1).to(device)
    w, ids = ops.moe_route(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    want_w, want_ids = moe_ref.moe_route(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    got, ref = ids.long().cpu().sort(-1), want_ids.long().cpu().sort(-1)
    assert torch.equal(got.values, ref.values)
    torch.testing.assert_close(w.cpu().gather(1, got.indices), want_w.cpu().gather(1, ref.indices), **TOL[torch.float32])
    if device.type == "cpu":
        assert npu_backend.calls["npu_moe_gating_top_k"] == int(fused)


@pytest.mark.parametrize("drop", [False, True])
def test_permute_unpermute(npu_backend, dtype, device, drop):
    gen = torch.Generator().manual_seed(17)
    T, k, E, D = 11, 3, 8, 16
    x = torch.randn(T, D, generator=gen).to(dtype).to(device)
    ids = make_moe_ids(T, k, E, gen, empty_experts=(0, 6))
    if drop:
        ids[1, :], ids[5, 2] = -1, E + 1
    ids = ids.to(device)
    permuted, order, counts = ops.moe_permute(x, ids, E)
    r_perm, r_order, r_counts = moe_ref.moe_permute(x, ids, E)
    assert order.dtype == torch.int64 and counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), r_counts.cpu()) and counts[0] == counts[6] == 0
    # Within an expert the kernel may order rows differently; as a set per expert they must agree.
    assert torch.equal(permuted.cpu(), x.cpu()[order.cpu() // k])
    bounds = [0] + counts.cumsum(0).tolist()
    for e in range(E):
        s, t = bounds[e], bounds[e + 1]
        assert sorted(order[s:t].tolist()) == sorted(r_order[s:t].tolist())
    weights = torch.rand(T, k, generator=gen).to(device)
    expert_out = torch.randn(len(order), D, generator=gen).to(dtype).to(device)
    got = ops.moe_unpermute(expert_out, order, weights)
    want = moe_ref.moe_unpermute(expert_out, order, weights)
    assert got.dtype == dtype and got.shape == (T, D)
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **TOL[dtype])


def test_moe_empty_tokens(npu_backend, device):
    x = torch.zeros(0, 8, device=device)
    permuted, order, counts = ops.moe_permute(x, torch.zeros(0, 2, dtype=torch.int32, device=device), 4)
    assert permuted.shape == (0, 8) and order.numel() == 0 and counts.tolist() == [0] * 4
    assert ops.moe_unpermute(permuted, order, torch.zeros(0, 2, device=device)).shape == (0, 8)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 2], [4], [0, 0, 0]], ids=["empty_experts", "one_expert", "no_rows"])
def test_grouped_mlp(npu_backend, dtype, device, counts):
    gen = torch.Generator().manual_seed(18)
    E, D, I = len(counts), 16, 8
    counts = torch.tensor(counts, device=device)
    x = torch.randn(int(counts.sum()), D, generator=gen).to(dtype).to(device)
    w13 = (torch.randn(E, 2 * I, D, generator=gen) * 0.3).to(dtype).to(device)
    w2 = (torch.randn(E, D, I, generator=gen) * 0.3).to(dtype).to(device)
    got = ops.grouped_mlp(x, counts, w13, w2)
    want = moe_ref.grouped_mlp(x, counts, w13, w2)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **TOL[dtype])
    # weights in the cuda backend's tile-packed form [E, rows / bn, K / bk, bn, bk] give the same result
    packed = [w.reshape(E, w.shape[1] // 8, 8, w.shape[2] // 8, 8).permute(0, 1, 3, 2, 4).contiguous() for w in (w13, w2)]
    assert torch.equal(ops.grouped_mlp(x, counts, *packed), got)


def test_glm5_shapes_decode(npu_backend, device):
    """GLM-5's real head shapes (64 heads, latent 512 + rope 64, indexer 32 x 128, top-k 2048), 2 decodes."""
    batch = make_batch([1, 1], [2047, 2500], 128)
    b = batch.to(device)
    gen = torch.Generator().manual_seed(19)
    dt = torch.bfloat16
    q_i = torch.randn(2, 32, 128, generator=gen).to(dt).to(device)
    w_i = torch.randn(2, 32, generator=gen).to(device) * 32 ** -0.5
    idx_cache = batch.cache(128, dt, device, gen)
    idx = ops.lightning_indexer(q_i, w_i, idx_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, 2048, 128 ** -0.5)
    assert idx.shape == (2, 2048) and int((idx[0] >= 0).sum()) == 2047 and int((idx[1] >= 0).sum()) == 2048
    q_lat = torch.randn(2, 64, 512, generator=gen).to(dt).to(device)
    q_rope = torch.randn(2, 64, 64, generator=gen).to(dt).to(device)
    lat, rope = batch.cache(512, dt, device, gen), batch.cache(64, dt, device, gen)
    args = (q_lat, q_rope, lat, rope, b.block_tables, b.cu_seqlens_q, b.seq_lens, idx, 576 ** -0.5)
    torch.testing.assert_close(ops.sparse_mla_attention(*args).float().cpu(),
                               dsa_ref.sparse_mla_attention(*args).float().cpu(), **TOL[dt])


@pytest.mark.npu
def test_npu_backend_is_the_default_on_an_npu_device(device):
    assert device.type == "npu"
    assert ops.resolve("sparse_mla_attention", "npu")[0] == "npu" and ops.resolve("grouped_mlp", "npu")[0] == "npu"


@pytest.mark.npu
def test_fp32_dsa_inputs_are_refused_on_npu(npu_backend, device):
    batch = make_batch([1], [5], 4).to(device)
    q, w, cache = _dsa_inputs(batch, torch.float32, device, seed=20)
    with pytest.raises(TypeError, match="bfloat16"):
        ops.lightning_indexer(q, w, cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, 4, 0.25)


@pytest.mark.parametrize("shape", [(7, 64), (5, 4, 64), (3, 2, 32), (0, 64)],
                         ids=["key", "heads", "not-64-wide", "empty"])
def test_interleaved_rope(npu_backend, dtype, device, shape):
    """npu_interleave_rope where the row is its 64 wide; the reference math for other widths."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(shape, generator=gen).to(dtype).to(device)
    angle = torch.randn(shape[0], shape[-1] // 2, generator=gen)
    cos, sin = angle.cos().to(dtype).to(device), angle.sin().to(dtype).to(device)
    assert ops.resolve("interleaved_rope", device.type)[0] == "npu"
    got = ops.interleaved_rope(x, cos, sin)
    want = dsa_ref.interleaved_rope(x.float().cpu(), cos.float().cpu(), sin.float().cpu())
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])
    if device.type == "cpu":
        assert npu_backend.calls["npu_interleave_rope"] == (1 if shape[-1] == 64 and shape[0] else 0)
