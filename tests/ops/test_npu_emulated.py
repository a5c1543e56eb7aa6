"""The npu backend against the reference, through the public ops with GLM5_OPS_BACKEND=npu, on A2 and A3.

On a host without an NPU the torch_npu calls run in the contract emulator (tests/ops/emulator), which
holds the documented limits of the profile under test, so what is tested is each wrapper's layout
conversion, semantic mapping and its respect of those limits; on an Ascend host the same tests run the
real kernels. GLM-5's dims (index heads of 128, latent 512 + rope 64, 16-aligned blocks) reach the
fused kernels; smaller dims (the tiny test model's) are outside their limits and must run the
reference, which is checked too. Tolerances per dtype (conftest.TOL): float32 1e-5, bfloat16 3e-2.
Index selections are compared by the dense scores they pick (bf16 folds the softmax scale into bf16
weights, so near-equal scores may swap; the picked scores must still be the best ones).
"""
from __future__ import annotations

import pytest
import torch

from glm5_ascend import ops
from glm5_ascend.ops.dsa import reference as dsa_ref
from glm5_ascend.ops.moe import reference as moe_ref
from tests.ops import emulator

from .conftest import TOL, make_batch, make_moe_ids
from .test_reference import check_selection, dense_index_scores

DTYPES = [torch.float32, torch.bfloat16]
# The DSA cases of conftest.DSA_CASES with 16-token blocks (the kernels take multiples of 16 up to 1024).
NPU_DSA_CASES = {
    "decode_mixed": ([1, 1, 1, 1], [5, 16, 17, 40], 16, 8),
    "prefill": ([12, 7], [12, 7], 16, 6),
    "chunked_prefill": ([5, 3], [21, 24], 16, 10),
    "block_boundary": ([2, 1, 1], [32, 33, 31], 16, 16),
    "topk_ge_context": ([3, 1], [3, 2], 16, 16),
    "empty_sequence": ([0, 4, 1], [9, 4, 6], 16, 5),
}
INDEX_D, LATENT, ROPE = 128, 512, 64  # the kernels' only dims (GLM-5's)


@pytest.fixture(params=DTYPES, ids=["fp32", "bf16"])
def dtype(request, device):
    if device.type == "npu" and request.param == torch.float32:
        pytest.skip("the fused DSA kernels take bf16/fp16 only")
    return request.param


@pytest.fixture(params=sorted(NPU_DSA_CASES))
def npu_dsa_batch(request):
    q_lens, ctx, bs, topk = NPU_DSA_CASES[request.param]
    return request.param, make_batch(q_lens, ctx, bs, seed=len(request.param)), topk


def _dsa_inputs(batch, dtype, device, seed, H=4, D=INDEX_D):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch.T, H, D, generator=gen).to(dtype).to(device)
    w = torch.randn(batch.T, H, generator=gen).to(device)
    return q, w, batch.cache(D, dtype, device, gen)


def test_lightning_indexer(npu_backend, npu_dsa_batch, dtype, device):
    name, batch, topk = npu_dsa_batch
    q, w, cache = _dsa_inputs(batch, dtype, device, seed=11)
    b = batch.to(device)
    scale = INDEX_D ** -0.5
    args = (q, w, cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, topk, scale)
    assert ops.resolve("lightning_indexer", device.type)[0] == "npu"
    got = ops.lightning_indexer(*args).cpu()
    want = dsa_ref.lightning_indexer(*args).cpu()
    assert got.dtype == torch.int32 and got.shape == want.shape
    dense = dense_index_scores(q.cpu(), w.cpu(), cache.cpu(), batch, scale)
    top = max(float(s[torch.isfinite(s)].abs().max()) for s in dense if torch.isfinite(s).any())
    check_selection(got, dense, topk, atol=1e-4 if dtype == torch.float32 else 2e-2 * top)
    if device.type == "cpu":
        assert npu_backend.calls["npu_lightning_indexer"] == (1 if batch.T else 0)


def _attention_args(batch, dtype, device, H=4, R=LATENT, Dr=ROPE, topk=8, seed=12):
    gen = torch.Generator().manual_seed(seed)
    q_lat = torch.randn(batch.T, H, R, generator=gen).to(dtype).to(device)
    q_rope = torch.randn(batch.T, H, Dr, generator=gen).to(dtype).to(device)
    lat, rope = batch.cache(R, dtype, device, gen), batch.cache(Dr, dtype, device, gen)
    b = batch.to(device)
    q_i, w_i, c_i = _dsa_inputs(batch, dtype, device, seed=seed + 1, D=16)
    idx = dsa_ref.lightning_indexer(q_i, w_i, c_i, b.block_tables, b.cu_seqlens_q, b.seq_lens, topk, 0.25)
    return (q_lat, q_rope, lat, rope, b.block_tables, b.cu_seqlens_q, b.seq_lens, idx, (R + Dr) ** -0.5)


def test_sparse_mla_attention(npu_backend, npu_dsa_batch, dtype, device):
    """attention_mode=2 (MLA-absorb) reaches the kernel; return_lse (training-only with PA_BSND) runs the reference."""
    name, batch, topk = npu_dsa_batch
    args = _attention_args(batch, dtype, device, topk=topk)
    want_out, want_lse = dsa_ref.sparse_mla_attention(*args, return_lse=True)
    out = ops.sparse_mla_attention(*args)
    assert out.dtype == dtype and out.shape == want_out.shape
    torch.testing.assert_close(out.float().cpu(), want_out.float().cpu(), **TOL[dtype])
    if device.type == "cpu":
        assert npu_backend.calls["npu_sparse_flash_attention"] == (1 if batch.T else 0)
    out2, lse = ops.sparse_mla_attention(*args, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (batch.T, 4)
    torch.testing.assert_close(lse.cpu(), want_lse.cpu(), **TOL[dtype])
    torch.testing.assert_close(out2.float().cpu(), want_out.float().cpu(), **TOL[dtype])
    if device.type == "cpu":  # the lse call never reached the kernel
        assert npu_backend.calls["npu_sparse_flash_attention"] == (1 if batch.T else 0)


@pytest.mark.parametrize("shape", ["tiny", "heads_not_pow2", "block_8"])
def test_dsa_outside_the_kernel_limits_runs_the_reference(npu_backend, device, shape):
    """The tiny model's dims (latent 64, index dim 32), 3 heads, 8-token blocks: refused by the documented
    limits, so the wrappers run the reference and match it; the kernels are never called."""
    H, R, Dr, Di, bs = {"tiny": (4, 64, 16, 32, 16), "heads_not_pow2": (3, LATENT, ROPE, INDEX_D, 16),
                        "block_8": (4, LATENT, ROPE, INDEX_D, 8)}[shape]
    batch = make_batch([2, 1], [9, 20], bs)
    b = batch.to(device)
    dt = torch.bfloat16
    q, w, cache = _dsa_inputs(batch, dt, device, seed=3, H=H if shape != "heads_not_pow2" else 96, D=Di)
    args = (q, w, cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, 6, Di ** -0.5)
    assert torch.equal(ops.lightning_indexer(*args), dsa_ref.lightning_indexer(*args))
    att = _attention_args(batch, dt, device, H=H, R=R, Dr=Dr, topk=6)
    torch.testing.assert_close(ops.sparse_mla_attention(*att).float(), dsa_ref.sparse_mla_attention(*att).float())
    if device.type == "cpu":
        assert npu_backend.calls["npu_lightning_indexer"] == 0 and npu_backend.calls["npu_sparse_flash_attention"] == 0


def test_mla_cache_write(npu_backend, dtype, device):
    batch = make_batch([3, 1, 2], [10, 17, 2], 8)
    gen = torch.Generator().manual_seed(14)
    slots = torch.cat([batch.slot(b, torch.arange(c - q, c)) for b, (q, c) in enumerate(zip(batch.q_lens, batch.ctx))])
    lat, rope, idx = (torch.randn(batch.T, d, generator=gen).to(dtype).to(device) for d in (32, 8, 16))
    caches = [batch.cache(d, dtype, device, gen) for d in (32, 8, 16)]
    want = [c.clone() for c in caches]
    ops.mla_cache_write(lat, rope, idx, slots.to(device), *caches)
    dsa_ref.mla_cache_write(lat, rope, idx, slots.to(device), *want)
    for got, ref in zip(caches, want):
        assert torch.equal(got.cpu(), ref.cpu())
    ops.mla_cache_write(lat, rope, None, slots.to(device), caches[0], caches[1], None)  # shared-indexer layer
    # the kernels take no padding slot (-1): the engine sends padding rows to a scratch block instead
    slots[2] = -1
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match=r"slot_mapping must lie in \[0, "):
            ops.mla_cache_write(lat, rope, idx, slots.to(device), *caches)


def test_dsa_empty_batch(npu_backend, device):
    batch = make_batch([0], [5], 16)
    b = batch.to(device)
    q, w, cache = _dsa_inputs(batch, torch.bfloat16, device, seed=15)
    assert ops.lightning_indexer(q, w, cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, 4, 0.25).shape == (0, 4)
    lat = torch.zeros(0, 4, LATENT, dtype=torch.bfloat16, device=device)
    rope = torch.zeros(0, 4, ROPE, dtype=torch.bfloat16, device=device)
    c_lat, c_rope = batch.cache(LATENT, torch.bfloat16, device, None), batch.cache(ROPE, torch.bfloat16, device, None)
    idx = torch.zeros(0, 4, dtype=torch.int32, device=device)
    out = ops.sparse_mla_attention(lat, rope, c_lat, c_rope, b.block_tables, b.cu_seqlens_q, b.seq_lens, idx, 0.2)
    assert out.shape == (0, 4, LATENT)


def test_dsa_shape_errors_name_the_argument(npu_backend, device):
    batch = make_batch([2], [5], 16)
    b = batch.to(device)
    q, w, cache = _dsa_inputs(batch, torch.bfloat16, device, seed=16)
    with pytest.raises(ValueError, match="weights must be"):
        ops.lightning_indexer(q, w[:, :2], cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, 4, 0.25)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ops.lightning_indexer(q, w, cache, b.block_tables, b.cu_seqlens_q[:1], b.seq_lens, 4, 0.25)


@pytest.mark.parametrize("E,top_k,n_group,topk_group,norm,fused", [
    (256, 8, 1, 1, True, True),    # GLM-5's router (one group)
    (256, 8, 8, 4, True, True),    # DeepSeek-V3's
    (16, 4, 4, 2, True, True),
    (16, 2, 1, 1, False, True),    # no renormalisation: weights gathered from norm_out
    (8, 3, 4, 2, True, False),     # 2 experts per group: outside the kernel's limits, torch fallback
    (1320, 8, 40, 4, True, False),  # 33 experts a group: Align32(33) * 40 = 2560 > 2048, fallback
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


def _spy(monkeypatch, module, name, seen):
    fn = getattr(module, name)

    def spy(*args, **kwargs):
        out = fn(*args, **kwargs)
        seen.append((args, kwargs, out))
        return out
    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("drop", [False, True])
def test_permute_unpermute(npu_backend, dtype, device, drop, monkeypatch):
    """Padded permute (all T*k rows, padding order -1, no host read of N) and an unpermute that hands
    npu_moe_token_unpermute the routing op's own gather index (row_idx_type=0), no inverse computed."""
    gen = torch.Generator().manual_seed(17)
    T, k, E, D = 11, 3, 8, 16
    x = torch.randn(T, D, generator=gen).to(dtype).to(device)
    ids = make_moe_ids(T, k, E, gen, empty_experts=(0, 6))
    if drop:
        ids[1, :], ids[5, 2] = -1, E + 1
    ids = ids.to(device)
    routing, unpermute = [], []
    if device.type == "cpu":
        _spy(monkeypatch, npu_backend, "npu_moe_init_routing_v2", routing)
        _spy(monkeypatch, npu_backend, "npu_moe_token_unpermute", unpermute)
    permuted, order, counts = ops.moe_permute(x, ids, E)
    r_perm, r_order, r_counts = moe_ref.moe_permute(x, ids, E)
    n = len(r_order)
    assert order.dtype == torch.int64 and counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), r_counts.cpu()) and counts[0] == counts[6] == 0
    assert permuted.shape[0] == order.shape[0] >= n and bool((order[n:] == -1).all()) and bool((order[:n] >= 0).all())
    # Within an expert the kernel may order rows differently; as a set per expert they must agree.
    assert torch.equal(permuted[:n].cpu(), x.cpu()[order[:n].cpu() // k])
    bounds = [0] + counts.cumsum(0).tolist()
    for e in range(E):
        s, t = bounds[e], bounds[e + 1]
        assert sorted(order[s:t].tolist()) == sorted(r_order[s:t].tolist())
    weights = torch.rand(T, k, generator=gen).to(device)
    expert_out = torch.randn(len(order), D, generator=gen).to(dtype).to(device)
    expert_out[n:] = float("nan")  # padding rows are unspecified: they must not leak
    got = ops.moe_unpermute(expert_out, order, weights)
    want = moe_ref.moe_unpermute(expert_out[:n], order[:n], weights)
    assert got.dtype == dtype and got.shape == (T, D)
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **TOL[dtype])
    # the reference backend reads the padded form too
    torch.testing.assert_close(moe_ref.moe_unpermute(expert_out, order, weights).float(), want.float(), **TOL[dtype])
    if device.type == "cpu":
        assert routing[0][1]["row_idx_type"] == 0
        assert unpermute[0][0][1] is routing[0][2][1]  # sorted_indices: the routing op's expanded_row_idx itself
    # an order from another backend (exactly N rows) gets its gather index built on the device
    torch.testing.assert_close(ops.moe_unpermute(expert_out[:n], r_order, weights).float().cpu(),
                               moe_ref.moe_unpermute(expert_out[:n], r_order, weights).float().cpu(), **TOL[dtype])


def test_moe_empty_tokens(npu_backend, device):
    x = torch.zeros(0, 8, device=device)
    permuted, order, counts = ops.moe_permute(x, torch.zeros(0, 2, dtype=torch.int32, device=device), 4)
    assert permuted.shape == (0, 8) and order.numel() == 0 and counts.tolist() == [0] * 4
    assert ops.moe_unpermute(permuted, order, torch.zeros(0, 2, device=device)).shape == (0, 8)


@pytest.mark.parametrize("counts,pad", [([3, 0, 5, 1, 0, 2], 0), ([3, 0, 5, 1, 0, 2], 4), ([4], 0), ([4], 3),
                                        ([0, 0, 0], 0)],
                         ids=["empty_experts", "padded", "one_expert", "one_expert_padded", "no_rows"])
def test_grouped_mlp(npu_backend, dtype, device, counts, pad):
    gen = torch.Generator().manual_seed(18)
    E, D, I = len(counts), 16, 8
    counts = torch.tensor(counts, device=device)
    n = int(counts.sum())
    x = torch.randn(n + pad, D, generator=gen).to(dtype).to(device)
    w13 = (torch.randn(E, 2 * I, D, generator=gen) * 0.3).to(dtype).to(device)
    w2 = (torch.randn(E, D, I, generator=gen) * 0.3).to(dtype).to(device)
    got = ops.grouped_mlp(x, counts, w13, w2)
    want = moe_ref.grouped_mlp(x[:n], counts, w13, w2)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got[:n].float().cpu(), want.float().cpu(), **TOL[dtype])
    # weights in the cuda backend's tile-packed form [E, rows / bn, K / bk, bn, bk] give the same result
    packed = [w.reshape(E, w.shape[1] // 8, 8, w.shape[2] // 8, 8).permute(0, 1, 3, 2, 4).contiguous() for w in (w13, w2)]
    assert torch.equal(ops.grouped_mlp(x, counts, *packed)[:n], got[:n])


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
    if device.type == "cpu":
        assert npu_backend.calls["npu_lightning_indexer"] == 1 and npu_backend.calls["npu_sparse_flash_attention"] == 1


def test_decode_path_is_capturable(npu_backend, device, monkeypatch):
    """A GLM-5-shaped decode step through every npu wrapper on the decode path, inside capturable():
    no wrapper syncs with the host (aclgraph could capture it)."""
    if device.type != "cpu":
        pytest.skip("the host-sync detector wraps the emulated kernels")
    monkeypatch.setenv("GLM5_OPS_CHECK_VALUES", "0")  # the value checks read the device by design
    gen = torch.Generator().manual_seed(21)
    dt = torch.bfloat16
    batch = make_batch([1, 1], [300, 517], 128)
    b = batch.to(device)
    T, H = 2, 16
    x_rope = torch.randn(T, H, 64, generator=gen).to(dt)
    angle = torch.randn(T, 32, generator=gen)
    q_i = torch.randn(T, 32, 128, generator=gen).to(dt)
    w_i = torch.randn(T, 32, generator=gen)
    idx_cache = batch.cache(128, dt, device, gen)
    q_lat = torch.randn(T, H, 512, generator=gen).to(dt)
    lat, rope = batch.cache(512, dt, device, gen), batch.cache(64, dt, device, gen)
    logits, bias = torch.randn(T, 256, generator=gen), torch.randn(256, generator=gen) * 0.1
    E, D, I = 256, 64, 32
    hidden = torch.randn(T, D, generator=gen).to(dt)
    w13 = (torch.randn(E, 2 * I, D, generator=gen) * 0.3).to(dt)
    w2 = (torch.randn(E, D, I, generator=gen) * 0.3).to(dt)
    slots = torch.tensor([batch.slot(0, 299), batch.slot(1, 516)]).view(-1)
    new_lat, new_rope = lat[0, :2].clone(), rope[0, :2].clone()
    with emulator.capturable():
        ops.interleaved_rope(x_rope, angle.cos().to(dt), angle.sin().to(dt))
        idx = ops.lightning_indexer(q_i, w_i, idx_cache, b.block_tables, b.cu_seqlens_q, b.seq_lens, 2048, 128 ** -0.5)
        out = ops.sparse_mla_attention(q_lat, x_rope, lat, rope, b.block_tables, b.cu_seqlens_q, b.seq_lens, idx,
                                       576 ** -0.5)
        weights, ids = ops.moe_route(logits, bias, 8, 1, 1, 2.5)
        permuted, order, counts = ops.moe_permute(hidden, ids, E)
        routed = ops.moe_unpermute(ops.grouped_mlp(permuted, counts, w13, w2), order, weights)
        ops.mla_cache_write(new_lat, new_rope, None, slots, lat, rope, None)
    assert out.shape == (T, H, 512) and routed.shape == (T, D)
    for op in ("npu_interleave_rope", "npu_lightning_indexer", "npu_sparse_flash_attention", "npu_scatter_pa_kv_cache",
               "npu_moe_gating_top_k",
               "npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_moe_token_unpermute"):
        assert npu_backend.calls[op] >= 1, op
    permuted, order, counts = moe_ref.moe_permute(hidden.float(), ids, E)
    want = moe_ref.moe_unpermute(moe_ref.grouped_mlp(permuted, counts, w13.float(), w2.float()), order, weights)
    torch.testing.assert_close(routed.float(), want, atol=0.1, rtol=0.05)  # bf16 sums of 8 experts


def test_capturable_catches_host_syncs():
    x = torch.arange(6)
    for what, fn in (("Tensor.item", lambda: x.sum().item()), ("__int__", lambda: int(x[0])),
                     ("__bool__", lambda: bool(x.any())), ("Tensor.__getitem__", lambda: x[x > 2]),
                     ("Tensor.__setitem__", lambda: x.__setitem__(x > 2, 0)), ("Tensor.tolist", x.tolist),
                     ("torch.nonzero", lambda: torch.nonzero(x)), ("torch.repeat_interleave",
                                                                    lambda: torch.repeat_interleave(x, x))):
        with emulator.capturable(), pytest.raises(emulator.HostSync, match=what.replace(".", r"\.")):
            fn()
    with emulator.capturable():  # device-side work is fine, and so is anything inside a kernel
        torch.where(x > 2, x, -1).cumsum(0)
        x[torch.tensor([0, 2])]
        from tests.ops.emulator import capture
        with capture.kernel():
            assert int(x.sum()) == 15
    assert int(x.sum()) == 15  # and everything is restored afterwards


@pytest.mark.npu
def test_npu_backend_is_the_default_on_an_npu_device(device):
    assert device.type == "npu"
    assert ops.resolve("sparse_mla_attention", "npu")[0] == "npu" and ops.resolve("grouped_mlp", "npu")[0] == "npu"


@pytest.mark.npu
def test_fp32_dsa_inputs_are_refused_on_npu(npu_backend, device):
    batch = make_batch([1], [5], 16).to(device)
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


def test_device_profile_from_the_npu_name_or_the_environment(monkeypatch):
    """GLM5_NPU_DEVICE decides; else torch.npu.get_device_name(): Ascend910B* is A2, Ascend910_93* is A3."""
    from glm5_ascend.ops.npu_profile import device_profile, profile_of_name
    assert [profile_of_name(n) for n in ("Ascend910B1", "Ascend910B4-1", "Ascend910_9391", "Ascend910_9362")] == \
        ["a2", "a2", "a3", "a3"]
    with pytest.raises(RuntimeError, match="set GLM5_NPU_DEVICE=a2 or a3"):
        profile_of_name("Ascend910_9579")  # an Ascend 950 part: neither
    monkeypatch.setenv("GLM5_NPU_DEVICE", "a2")
    assert device_profile() == "a2"
    monkeypatch.setenv("GLM5_NPU_DEVICE", "a5")
    with pytest.raises(ValueError, match="GLM5_NPU_DEVICE must be a2 or a3"):
        device_profile()
