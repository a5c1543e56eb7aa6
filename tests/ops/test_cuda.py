"""The cuda backend (Triton / torch fast paths) against the reference, on a CUDA GPU.

Skipped without a GPU. With TRITON_INTERPRET=1 and triton installed, the small cases also run on the
CPU through Triton's interpreter (slow; for developing kernels without a GPU). Triton 3.6's
interpreter needs NumPy < 2.4 (with 2.4 it fails converting loop bounds to Python ints).

Tolerances, per dtype (relative Frobenius error ||out - ref|| / ||ref|| unless said otherwise):
  bf16 attention / grouped MLP outputs: 2e-2 (bf16 rounding of P / of the intermediate), against a
      reference run on float32 copies of the same bf16 inputs; float32: 1e-5 (no tf32 for fp32).
  lse: 2e-2 absolute for bf16 inputs (scores are rounded to bf16 in the reference), 1e-4 for fp32.
  indexer selection: the sorted true scores of the chosen set equal those of the reference top-k
      within 1e-3 of the score scale (ties and near-ties may pick different tokens).
  cache write, permute: exact. unpermute: 1e-2 bf16 (fp32 accumulation here vs bf16 there).
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from glm5_ascend import ops
from glm5_ascend.ops.dsa import reference as dsa_ref
from glm5_ascend.ops.moe import reference as moe_ref

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() or _INTERPRET), reason="needs a CUDA GPU (cuda backend)"),
]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
big = pytest.mark.skipif(DEV.type != "cuda", reason="GLM-5-sized case: GPU only")
# Triton's CPU interpreter multiplies bf16 tiles wrongly (numpy has no bf16), so bf16 cases need a GPU.
BF16 = pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(DEV.type != "cuda", reason="bf16 tl.dot: GPU only"))
DTYPES = [BF16, pytest.param(torch.float32, id="fp32")]


def dsa():
    from glm5_ascend.ops.dsa import cuda
    return cuda


def moe():
    from glm5_ascend.ops.moe import cuda
    return cuda


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------- paging
def paged_batch(ctx_lens, q_lens, block_size, seed=0, extra_blocks=2):
    """Block tables over a shuffled pool (sequences own scattered blocks), cu_seqlens_q, seq_lens."""
    g = torch.Generator().manual_seed(seed)
    nblk = [math.ceil(c / block_size) for c in ctx_lens]
    total = sum(nblk) + extra_blocks
    perm = torch.randperm(total, generator=g)
    tables = torch.zeros((len(ctx_lens), max(nblk) + extra_blocks), dtype=torch.int32)
    at = 0
    for b, n in enumerate(nblk):
        tables[b, :n] = perm[at:at + n].int()
        at += n
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    return total, tables.to(DEV), cu.to(DEV), torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)


def _query_positions(cu, seq_lens):
    pos, seq = [], []
    cu, sl = cu.tolist(), seq_lens.tolist()
    for b in range(len(sl)):
        n = cu[b + 1] - cu[b]
        pos += list(range(sl[b] - n, sl[b]))
        seq += [b] * n
    return pos, seq


# --------------------------------------------------------------------------------- mla_cache_write
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_index", [True, False])
def test_mla_cache_write_exact(dtype, with_index):
    nb, bs, R, DR, DI, T = 6, 16, 64, 16, 32, 40
    caches = [torch.randn(nb, bs, d, device=DEV).to(dtype) for d in (R, DR, DI)]
    slots = torch.randperm(nb * bs, device=DEV)[:T]
    slots[::7] = -1  # padding tokens
    lat, rope, idx = (torch.randn(T, d, device=DEV) for d in (R, DR, DI))  # float32 in, cast on write
    want = [c.clone() for c in caches]
    dsa_ref.mla_cache_write(lat, rope, idx if with_index else None, slots, *want[:2], want[2] if with_index else None)
    dsa().mla_cache_write(lat, rope, idx if with_index else None, slots, *caches[:2], caches[2] if with_index else None)
    for got, ref in zip(caches, want):
        assert torch.equal(got, ref)


# ------------------------------------------------------------------------------- lightning_indexer
def _indexer_case(ctx_lens, q_lens, H, D, topk, block_size, dtype, seed=0):
    nblocks, tables, cu, seq_lens = paged_batch(ctx_lens, q_lens, block_size, seed)
    T = sum(q_lens)
    torch.manual_seed(seed)
    q = torch.randn(T, H, D, device=DEV).to(dtype)
    w = torch.randn(T, H, device=DEV) * H ** -0.5
    cache = torch.randn(nblocks, block_size, D, device=DEV).to(dtype)
    return q, w, cache, tables, cu, seq_lens


def _check_selection(got, q, w, cache, tables, cu, seq_lens, topk, scale):
    """Same count, unique causal positions, and (allowing ties) the same multiset of true scores."""
    bs = cache.shape[1]
    flat = cache.view(-1, cache.shape[-1]).double()
    pos, seq = _query_positions(cu, seq_lens)
    got = got.cpu()
    for t in range(q.shape[0]):
        n = pos[t] + 1
        keep = min(topk, n)
        row = got[t]
        assert (row[keep:] == -1).all() and (row[:keep] >= 0).all(), f"token {t}: bad -1 padding"
        sel = row[:keep].long()
        assert sel.unique().numel() == keep and int(sel.max()) < n, f"token {t}: duplicate or non-causal"
        p = torch.arange(n)
        slots = tables[seq[t], p // bs].long().cpu() * bs + p % bs
        keys = flat[slots.to(flat.device)]
        s = torch.relu(torch.einsum("hd,jd->hj", q[t].double(), keys) * scale)
        s = (w[t].double()[:, None] * s).sum(0).cpu()
        want = s.topk(keep).values.sort().values
        have = s[sel].sort().values
        tol = 1e-3 * float(s.abs().max()) + 1e-6
        assert (want - have).abs().max() <= tol, f"token {t}: selected scores differ from the top-{keep}"


INDEXER_CASES = {
    # name: (ctx_lens, q_lens, H, D, topk, block_size)
    "decode_small": ([5, 37, 64, 100], [1, 1, 1, 1], 4, 32, 16, 16),
    "topk_ge_context": ([3, 16, 17], [1, 1, 1], 8, 16, 32, 16),
    "block_boundaries": ([127, 128, 129, 255, 256, 257], [1] * 6, 8, 64, 100, 128),
    "prefill_varlen": ([40, 70, 33], [40, 9, 1], 4, 32, 24, 16),
    "chunked_prefill": ([300, 10], [50, 0], 4, 32, 64, 32),  # an empty sequence too
    "two_tiles_per_block": ([300, 700], [1, 2], 4, 32, 64, 256),  # score tiles inside 256-token blocks
    "one_block_per_chunk": ([2500, 4200], [1, 1], 4, 32, 128, 2048),
}


@pytest.fixture(params=["in_registers", "streaming"])
def topk_path(request):
    """Run the top-k select with rows held in registers (decode-length rows) or streamed from L2."""
    cfg = dsa().CONFIG
    old = cfg["topk_reg"]
    cfg["topk_reg"] = old if request.param == "in_registers" else 0
    yield request.param
    cfg["topk_reg"] = old


@pytest.mark.parametrize("case", sorted(INDEXER_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lightning_indexer_small(case, dtype, topk_path):
    ctx, ql, H, D, topk, bs = INDEXER_CASES[case]
    args = _indexer_case(ctx, ql, H, D, topk, bs, dtype)
    got = dsa().lightning_indexer(*args, topk, D ** -0.5)
    assert got.dtype == torch.int32 and got.shape == (sum(ql), topk)
    _check_selection(got, *args, topk, D ** -0.5)


@pytest.mark.parametrize("ctx_lens,q_lens,topk", [
    ([300, 200], [3, 1], 128),
    ([9000], [1], 6000),  # the ties span the select's 4096-key writeout chunks
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lightning_indexer_ties_break_to_lower_position(ctx_lens, q_lens, topk, dtype, topk_path):
    """Zero keys score exactly 0 (all ReLU terms vanish): the K-th score is a tie shared by many keys,
    and the cuda backend takes the tied positions lowest first (module docstring of ops/dsa/cuda.py;
    the reference follows torch.topk's order instead, which differs between devices)."""
    q, w, cache, tables, cu, seq_lens = _indexer_case(ctx_lens, q_lens, 4, 32, topk, 16, dtype, seed=7)
    w = w.abs()  # scores >= 0, so every zero key sits at the bottom as a tie
    flat = cache.view(-1, cache.shape[-1])
    flat[torch.randperm(flat.shape[0], device=DEV)[: flat.shape[0] // 2]] = 0
    got = dsa().lightning_indexer(q, w, cache, tables, cu, seq_lens, topk, 32 ** -0.5).cpu()
    pos, seq = _query_positions(cu, seq_lens)
    bs = cache.shape[1]
    tied = 0
    for t in range(q.shape[0]):
        p = torch.arange(pos[t] + 1)
        slots = tables[seq[t], p // bs].long().cpu() * bs + p % bs
        keys = flat.double()[slots.to(flat.device)]
        s = torch.relu(torch.einsum("hd,jd->hj", q[t].double(), keys) * 32 ** -0.5)
        s = (w[t].double()[:, None] * s).sum(0).cpu()
        keep = min(topk, p.numel())
        thr = s.topk(keep).values[-1]
        above = p[s > thr].tolist()
        tied += int(thr == 0 and len(above) < keep)
        want = above + p[s == thr].tolist()[:keep - len(above)]
        assert sorted(got[t][:keep].tolist()) == sorted(want), f"token {t}"
    assert tied, "no token's K-th score fell on the zero ties: the case tests nothing"


def test_lightning_indexer_exactly_k_keys_at_the_kth_score(topk_path):
    """Exactly K keys share the top score 0.0, whose sortable key is a bisection candidate itself:
    the select stops early there and must still take those K keys (thr = candidate - 1)."""
    n, K, D, bs = 40, 12, 16, 16
    _, tables, cu, seq_lens = paged_batch([n], [1], bs)
    cache = torch.zeros(tables.numel() + 2, bs, D, device=DEV)
    p = torch.arange(n, device=DEV)
    slots = tables[0, p // bs].long() * bs + p % bs
    k0 = torch.arange(1, n + 1, dtype=torch.float32, device=DEV)  # distinct: scores -1, -2, ...
    top = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:K].to(DEV)
    k0[top] = -1.0  # relu(-1) = 0: these K score exactly 0.0, the maximum
    cache.view(-1, D)[slots, 0] = k0
    q = torch.zeros(1, 1, D, device=DEV)
    q[0, 0, 0] = 1.0
    got = dsa().lightning_indexer(q, -torch.ones(1, 1, device=DEV), cache, tables, cu, seq_lens, K, 1.0)
    assert sorted(got[0].tolist()) == sorted(top.tolist())


@pytest.mark.parametrize("ties", ["all", "half"])
def test_lightning_indexer_tie_ranks_beyond_16_bits(ties):
    """70000 keys, top-64000: more keys tie at the K-th score than a 16-bit rank holds, so the tie
    count carried between writeout chunks must stay capped (topk + chunk < 2^16)."""
    n, K, D, bs = 70000, 64000, 16, 128
    _, tables, cu, seq_lens = paged_batch([n], [1], bs)
    cache = torch.zeros(tables.numel() + 2, bs, D, device=DEV)
    p = torch.arange(n, device=DEV)
    slots = tables[0, p // bs].long() * bs + p % bs
    if ties == "half":  # every other position scores 1, the rest tie at 0
        cache.view(-1, D)[slots[::2], 0] = 1.0
    q = torch.zeros(1, 1, D, device=DEV)
    q[0, 0, 0] = 1.0
    cfg = dsa().CONFIG
    old = cfg["topk_chunk"]
    cfg["topk_chunk"] = 1024
    try:
        got = dsa().lightning_indexer(q, torch.ones(1, 1, device=DEV), cache, tables, cu, seq_lens, K, 1.0)
    finally:
        cfg["topk_chunk"] = old
    above = list(range(0, n, 2)) if ties == "half" else []
    tied = [i for i in range(n) if ties == "all" or i % 2][:K - len(above)]
    assert sorted(got[0].tolist()) == sorted(above + tied)


def test_lightning_indexer_refuses_topk_past_its_16_bit_ranks():
    args = _indexer_case([40], [1], 4, 32, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="GLM5_OPS_BACKEND_LIGHTNING_INDEXER=reference"):
        dsa().lightning_indexer(*args, 62000, 32 ** -0.5)


@big
@pytest.mark.parametrize("ctx_lens,q_lens", [
    ([32768, 5000, 2048, 2047, 2049, 130], [1] * 6),      # decode, around topk and block edges
    ([4200, 3000], [1500, 300]),                           # prefill chunks, longer than topk
])
def test_lightning_indexer_glm5_shape(ctx_lens, q_lens, topk_path):
    args = _indexer_case(ctx_lens, q_lens, 32, 128, 2048, 128, torch.bfloat16, seed=3)
    got = dsa().lightning_indexer(*args, 2048, 128 ** -0.5)
    _check_selection(got, *args, 2048, 128 ** -0.5)


# ----------------------------------------------------------------------------- sparse_mla_attention
def _mla_case(ctx_lens, q_lens, H, R, DR, K, block_size, dtype, pad_every=0, seed=0):
    nblocks, tables, cu, seq_lens = paged_batch(ctx_lens, q_lens, block_size, seed)
    T = sum(q_lens)
    torch.manual_seed(seed)
    ql = torch.randn(T, H, R, device=DEV).to(dtype)
    qr = torch.randn(T, H, DR, device=DEV).to(dtype)
    lat = torch.randn(nblocks, block_size, R, device=DEV).to(dtype)
    rope = torch.randn(nblocks, block_size, DR, device=DEV).to(dtype)
    pos, _ = _query_positions(cu, seq_lens)
    idx = torch.full((T, K), -1, dtype=torch.int32)
    for t, p in enumerate(pos):  # random causal selection, -1 padded when the context is short
        sel = torch.randperm(p + 1)[:K]
        idx[t, :sel.numel()] = sel.int()
        if pad_every:
            idx[t, 1::pad_every] = -1  # holes inside the list, not only at its tail
            idx[t, 0] = p
    return ql, qr, lat, rope, tables, cu, seq_lens, idx.to(DEV)


MLA_CASES = {
    # name: (ctx_lens, q_lens, H, R, DR, K, block_size, pad_every)
    "decode_small": ([20, 64, 100], [1, 1, 1], 4, 64, 16, 32, 16, 0),
    "tp8_heads_k_gt_ctx": ([5, 40], [1, 1], 8, 64, 16, 48, 16, 0),
    "holes_in_list": ([90, 33], [2, 3], 16, 32, 8, 40, 16, 3),
    "prefill_varlen": ([50, 17, 80], [50, 1, 20], 4, 64, 16, 24, 32, 0),
}


def _check_mla(args, scale, dtype, splits=None):
    ref_args = [a.float() if a.is_floating_point() else a for a in args]
    want, want_lse = dsa_ref.sparse_mla_attention(*ref_args, scale, return_lse=True)
    old = dsa().CONFIG["mla_splits"]
    dsa().CONFIG["mla_splits"] = splits
    try:
        out, lse = dsa().sparse_mla_attention(*args, scale, return_lse=True)
        plain = dsa().sparse_mla_attention(*args, scale)
    finally:
        dsa().CONFIG["mla_splits"] = old
    assert out.dtype == args[0].dtype and lse.dtype == torch.float32 and torch.equal(out, plain)
    tol_o, tol_l = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    assert _rel(out, want) < tol_o
    assert (lse - want_lse).abs().max().item() < tol_l


@pytest.mark.parametrize("case", sorted(MLA_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_sparse_mla_small(case, dtype, splits):
    ctx, ql, H, R, DR, K, bs, pad = MLA_CASES[case]
    _check_mla(_mla_case(ctx, ql, H, R, DR, K, bs, dtype, pad), R ** -0.5, dtype, splits)


def test_sparse_mla_refuses_caches_it_cannot_address():
    """The kernels address cache rows as slot * width: a latent / rope pair sliced out of one fused
    cache, or caches of two dtypes, get a one-line error instead of wrong rows."""
    args = list(_mla_case([40, 9], [1, 1], 4, 64, 16, 16, 16, torch.float32))
    fused = torch.cat([args[2], args[3]], dim=-1)
    sliced = args[:2] + [fused[..., :64], fused[..., 64:]] + args[4:]
    with pytest.raises(ValueError, match="must be contiguous and of one dtype"):
        dsa().sparse_mla_attention(*sliced, 0.125)
    mixed = args[:3] + [args[3].to(torch.float16)] + args[4:]
    with pytest.raises(ValueError, match="must be contiguous and of one dtype"):
        dsa().sparse_mla_attention(*mixed, 0.125)


def test_sparse_mla_falls_back_when_the_sm90_kernel_does_not_compile(monkeypatch):
    """A Triton whose Gluon API moved must not break the op: one warning, then the portable kernel."""
    from triton.compiler.errors import CompilationError

    def broken(*args, **kwargs):
        raise CompilationError("cuda_sm90.py", None, "no attribute 'thread_barrier'")

    monkeypatch.setattr(dsa(), "SM90_DISABLED", [])
    monkeypatch.setattr(dsa(), "_sm90_module", lambda device: True)
    monkeypatch.setattr(dsa(), "_sparse_mla_sm90", broken)
    monkeypatch.setitem(dsa().CONFIG, "mla_sm90", 1)
    args = _mla_case([40, 9], [1, 1], 4, 512, 64, 16, 16, torch.float32)
    args = args[:2] + (args[2].half(), args[3].half()) + args[4:]  # only 16-bit caches take the sm90 path
    with pytest.warns(UserWarning, match="does not compile"):
        out = dsa().sparse_mla_attention(*args, 0.05)
    assert dsa().SM90_DISABLED and not dsa()._use_sm90(args[0], args[2], 512, 64)
    want = dsa_ref.sparse_mla_attention(*[a.float() if a.is_floating_point() else a for a in args], 0.05)
    assert _rel(out.float(), want) < 2e-2


class _SmallSharedMemory:
    """Stands in for sparse_mla_kernel on a GPU with less shared memory: launches with more than
    `limit` = block_h * block_n raise Triton's OutOfResources, as they do before running."""

    def __init__(self, kernel, limit):
        self.kernel, self.limit, self.tried = kernel, limit, []

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def launch(*args, **kwargs):
            self.tried.append((kwargs["BLOCK_H"], kwargs["BLOCK_N"]))
            if kwargs["BLOCK_H"] * kwargs["BLOCK_N"] > self.limit:
                raise OutOfResources(155904, 101376, "shared memory")
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_sparse_mla_fits_tiles_to_a_gpu_with_less_shared_memory(monkeypatch):
    """The Triton kernel's tiles are an H200's; where they do not fit (99 KB GPUs such as an L40 need
    32 x 32 at GLM-5's dims) it retries smaller ones, remembers the fit, and names the fix when none fits."""
    small = _SmallSharedMemory(dsa().k.sparse_mla_kernel, 32 * 32)
    monkeypatch.setattr(dsa().k, "sparse_mla_kernel", small)
    monkeypatch.setattr(dsa(), "_FITTED", {})
    monkeypatch.setitem(dsa().CONFIG, "mla_sm90", 0)
    monkeypatch.setitem(dsa().CONFIG, "mla_block_n", 64)
    args = _mla_case([300, 90], [1, 2], 64, 64, 16, 96, 16, torch.float32)
    _check_mla(args, 80 ** -0.5, torch.float32)
    assert small.tried[:2] == [(64, 64), (32, 32)] and set(small.tried[2:]) == {(32, 32)}
    assert list(dsa()._FITTED.values()) == [(32, 32)]
    small.limit, small.tried = 16 * 32, []  # a remembered fit that stops fitting: smaller tiles are tried next
    _check_mla(args, 80 ** -0.5, torch.float32)
    assert small.tried[:2] == [(32, 32), (16, 32)] and list(dsa()._FITTED.values()) == [(16, 32)]
    small.limit = 0
    with pytest.raises(RuntimeError, match="no tile of the Triton kernel fits.*GLM5_OPS_BACKEND_SPARSE_MLA_ATTENTION"):
        dsa().sparse_mla_attention(*args, 0.1)


SM90 = DEV.type == "cuda" and torch.cuda.get_device_capability() == (9, 0)
SM90_CASES = {
    # name: (ctx_lens, q_lens, H, K, block_size, pad_every): R = 512, Dr = 64 (the sm90 kernel's shapes)
    "decode_glm5_heads": ([3000, 70, 129, 64], [1] * 4, 64, 2048, 64, 0),
    "tp8_heads_short_ctx": ([5, 40, 700], [1, 1, 1], 8, 256, 16, 0),
    "two_head_blocks_odd_heads": ([300, 90], [1, 1], 80, 100, 32, 0),
    "holes_k_not_tile_multiple": ([400, 33], [2, 3], 16, 150, 16, 3),
    "prefill_varlen": ([130, 17, 200], [130, 1, 20], 32, 96, 64, 0),
}


@pytest.mark.skipif(not SM90, reason="the warp-specialised sparse MLA kernel is for sm_90 GPUs (H100/H200/H20)")
@pytest.mark.parametrize("case", sorted(SM90_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("part16", [1, 0], ids=["16bit_partials", "float32_partials"])
def test_sparse_mla_sm90_kernel(case, dtype, splits, part16, monkeypatch):
    monkeypatch.setitem(dsa().CONFIG, "mla_sm90_part16", part16)
    ctx, ql, H, K, bs, pad = SM90_CASES[case]
    args = _mla_case(ctx, ql, H, 512, 64, K, bs, dtype, pad, seed=3)
    assert dsa()._use_sm90(args[0], args[2], 512, 64), f"this GPU should take the sm90 kernel: {dsa().SM90_DISABLED}"
    _check_mla(args, 576 ** -0.5, dtype, splits)
    assert not dsa().SM90_DISABLED, dsa().SM90_DISABLED  # it ran, not the fallback


@pytest.mark.skipif(not SM90, reason="sm_90 GPU only")
def test_sparse_mla_sm90_rows_with_nothing_to_attend():
    """Rows whose top-k list is all padding get output 0 and lse -inf, as the reference does."""
    args = list(_mla_case([300, 200], [1, 1], 64, 512, 64, 128, 64, torch.bfloat16, seed=4))
    args[-1][1] = -1
    out, lse = dsa().sparse_mla_attention(*args, 576 ** -0.5, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool(torch.isneginf(lse[1]).all())
    want = dsa_ref.sparse_mla_attention(*[a.float() if a.is_floating_point() else a for a in args], 576 ** -0.5)
    assert _rel(out[0], want[0]) < 2e-2


@big
@pytest.mark.parametrize("ctx_lens,q_lens", [([32768, 3000, 2048, 129], [1] * 4), ([2500, 700], [200, 37])])
def test_sparse_mla_glm5_shape(ctx_lens, q_lens):
    args = _mla_case(ctx_lens, q_lens, 64, 512, 64, 2048, 128, torch.bfloat16, seed=5)
    _check_mla(args, 256 ** -0.5, torch.bfloat16)


# ---------------------------------------------------------------------------------------- MoE ops
def _moe_case(T, E, topk, D, inter, dtype, empty_experts=(), seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(T, E, device=DEV)
    if empty_experts:
        logits[:, list(empty_experts)] = -1e4  # these experts receive no tokens
    ids = logits.topk(topk, dim=-1).indices.int()
    x = torch.randn(T, D, device=DEV).to(dtype)
    w13 = (torch.randn(E, 2 * inter, D, device=DEV) * D ** -0.5).to(dtype)
    w2 = (torch.randn(E, D, inter, device=DEV) * inter ** -0.5).to(dtype)
    return x, ids, w13, w2


# "triton_rem": 16-row tiles that take up to 16 more rows each (CONFIG bm2), so small cases have
# experts with rows past a tile, exactly at it, and short of it. "triton" fetches tiles with tensor
# descriptors (on sm_90+ and in the interpreter), "triton_pointers" with pointer loads (older GPUs).
_TRITON = {"up_impl": "triton", "down_impl": "triton", "tma": 1}
IMPLS = {"triton": _TRITON, "grouped_mm": {"up_impl": "grouped_mm", "down_impl": "grouped_mm"},
         "triton_rem": {**_TRITON, "bm": 16, "bm2": 16}, "triton_pointers": {**_TRITON, "tma": 0},
         "triton_pointers_rem": {**_TRITON, "bm": 16, "bm2": 16, "tma": 0}}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,topk,D,inter,empty", [
    (37, 8, 2, 64, 32, (3, 5)),       # tiny-model sized, two experts with no rows
    (300, 16, 4, 96, 80, (0,)),      # dims not multiples of the tiles
    (1, 4, 1, 64, 64, ()),
])
def test_grouped_mlp_small(impl, dtype, T, E, topk, D, inter, empty):
    if impl == "grouped_mm" and (DEV.type != "cuda" or dtype != torch.bfloat16):
        pytest.skip("torch._grouped_mm path: bf16 on a GPU only")
    x, ids, w13, w2 = _moe_case(T, E, topk, D, inter, dtype, empty)
    permuted, order, counts = moe_ref.moe_permute(x, ids, E)
    assert all(int(counts[e]) == 0 for e in empty)
    want = moe_ref.grouped_mlp(permuted.float(), counts, w13.float(), w2.float())
    cfg = moe().CONFIG
    old = dict(cfg)
    cfg.update(IMPLS[impl])
    try:
        got = moe().grouped_mlp(permuted, counts, w13, w2)
    finally:
        cfg.update(old)
    assert got.dtype == dtype and got.shape == permuted.shape
    assert _rel(got, want) < (1e-5 if dtype == torch.float32 else 2e-2)


# Tile sizes the small cases' dims are multiples of, so pack_weights packs their weights.
_SMALL_PACK = {"up_bn": 16, "up_bk": 32, "down_bn": 32, "down_bk": 32}


@pytest.mark.parametrize("dtype", [BF16, pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("T,E,topk,D,inter,empty,packs", [
    (37, 8, 2, 64, 32, (3, 5), (True, True)),
    (300, 16, 4, 96, 80, (0,), (True, True)),  # w2's K (80): 16-wide K tiles, not 32
    (1, 4, 1, 64, 64, (), (True, True)),
    (20, 4, 2, 40, 24, (), (False, False)),  # no tile of 16+ divides I = 24 or D = 40: left as they are
])
@pytest.mark.parametrize("bm,bm2", [(128, 64), (16, 16), (16, 64), (32, 0)])
def test_grouped_mlp_packed_weights(dtype, T, E, topk, D, inter, empty, packs, bm, bm2, monkeypatch):
    """pack_weights' tile-packed weights give what the plain ones give, through every remainder width."""
    for key, value in {**_SMALL_PACK, "bm": bm, "bm2": bm2}.items():
        monkeypatch.setitem(moe().CONFIG, key, value)
    x, ids, w13, w2 = _moe_case(T, E, topk, D, inter, dtype, empty)
    permuted, order, counts = moe_ref.moe_permute(x, ids, E)
    p13, p2 = moe().pack_weights(w13, w2)
    assert (p13.dim() == 5, p2.dim() == 5) == packs
    assert torch.equal(moe_ref.unpack_weights(p13), w13) and torch.equal(moe_ref.unpack_weights(p2), w2)
    assert _rel(moe_ref.grouped_mlp(permuted.float(), counts, p13.float(), p2.float()),
                moe_ref.grouped_mlp(permuted.float(), counts, w13.float(), w2.float())) == 0
    want = moe_ref.grouped_mlp(permuted.float(), counts, w13.float(), w2.float())
    got = moe().grouped_mlp(permuted, counts, p13, p2)
    assert got.dtype == dtype and _rel(got, want) < 2e-2
    # Where the packing's K tile is CONFIG's the sums run in the same order: the same bits.
    plain = moe().grouped_mlp(permuted, counts, w13, w2)
    assert torch.equal(got, plain) if D % 32 == 0 and inter % 32 == 0 else _rel(got, plain) < 2e-3


def test_grouped_mlp_names_weights_that_do_not_fit():
    x, ids, w13, w2 = _moe_case(10, 4, 2, 64, 32, torch.float32)
    permuted, _, counts = moe_ref.moe_permute(x, ids, 4)
    with pytest.raises(ValueError, match=r"w2 must be \[E=4, D=64, I=32\]"):
        ops.grouped_mlp(permuted, counts, w13, w2[:, :, :16])


@pytest.mark.parametrize("counts,bm,bm2,num_n", [
    ([5, 0, 200, 128, 129, 0], 128, 64, 3),
    ([0, 0, 0], 16, 16, 2),
    ([1] * 5 + [400], 32, 0, 1),
])
def test_tile_table(counts, bm, bm2, num_n, monkeypatch):
    """The program table: expert by expert, N tile, then M tile fastest; -1 past the last tile."""
    monkeypatch.setitem(moe().CONFIG, "bm", bm)
    monkeypatch.setitem(moe().CONFIG, "bm2", bm2)
    span = bm + bm2
    table, n_progs = moe()._table(torch.tensor(counts, device=DEV), sum(counts), num_n)
    want, start = [], 0
    for e, c in enumerate(counts):
        m_tiles = -(-c // span)
        want += [(e, start + m * span, start + c, n) for n in range(num_n) for m in range(m_tiles)]
        start += c
    got = [tuple(r) for r in table.t().tolist()]
    assert got[:len(want)] == want and all(r[0] == -1 for r in got[len(want):])
    assert n_progs >= len(want)


@big
def test_grouped_mlp_glm5_shape():
    """256 experts, top-8, hidden 6144, expert width 2048; 300 tokens leave many experts empty."""
    x, ids, w13, w2 = _moe_case(300, 256, 8, 6144, 2048, torch.bfloat16, empty_experts=(7, 100))
    permuted, order, counts = moe_ref.moe_permute(x, ids, 256)
    want = moe_ref.grouped_mlp(permuted.float(), counts, w13.float(), w2.float())
    for impl, extra in (("triton", {}), ("grouped_mm", {}), ("triton", {"bm2": 0}), ("triton", {"tma": 0})):
        cfg = moe().CONFIG
        old = dict(cfg)
        cfg.update(up_impl=impl, down_impl=impl, **extra)
        try:
            got = moe().grouped_mlp(permuted, counts, w13, w2)
        finally:
            cfg.update(old)
        assert _rel(got, want) < 2e-2, impl


@big
@pytest.mark.parametrize("bm2", [64, 0])
def test_grouped_mlp_glm5_width_experts_past_a_tile(bm2):
    """GLM-5's hidden 6144 and expert width 2048 over 16 experts: one expert with several tiles'
    worth of rows, the others near 128, some past a 128-row tile (with and without CONFIG bm2)."""
    x, _, w13, w2 = _moe_case(640, 16, 4, 6144, 2048, torch.bfloat16)
    logits = torch.randn(640, 16, device=DEV)
    logits[:, 0] += 3.0  # expert 0 takes nearly every token: several tiles, the last one short
    ids = logits.topk(4, dim=-1).indices.int()
    permuted, order, counts = moe_ref.moe_permute(x, ids, 16)
    rest = counts[1:]  # ~129 rows each: some past a 128-row tile, some short of it
    assert int(counts[0]) > 3 * (128 + 64) and bool(((rest > 128) & (rest <= 192)).any()) and int(rest.min()) < 128
    want = moe_ref.grouped_mlp(permuted.float(), counts, w13.float(), w2.float())
    cfg = moe().CONFIG
    old = dict(cfg)
    cfg.update(_TRITON, bm2=bm2)
    try:
        got = moe().grouped_mlp(permuted, counts, w13, w2)
    finally:
        cfg.update(old)
    assert _rel(got, want) < 2e-2


@pytest.mark.parametrize("E,top_k,n_group,topk_group,norm", [
    (256, 8, 1, 1, True),    # GLM-5
    (256, 8, 8, 4, True),    # DeepSeek-V3's groups
    (16, 4, 4, 2, True), (12, 3, 3, 1, False), (20, 6, 4, 3, True),  # groups of 3 and 5 experts; k not a power of 2
    (1, 1, 1, 1, True),
])
def test_moe_route_equals_the_reference(E, top_k, n_group, topk_group, norm):
    """Same experts per token and the same weights (to float32 rounding) as the reference."""
    torch.manual_seed(E * 100 + top_k)
    logits = torch.randn(77, E, device=DEV)
    bias = torch.randn(E, device=DEV) * 0.1
    w, ids = moe().moe_route(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    want_w, want_ids = moe_ref.moe_route(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (77, top_k)
    got, ref = ids.long().sort(-1), want_ids.long().sort(-1)
    assert torch.equal(got.values, ref.values)
    torch.testing.assert_close(w.gather(1, got.indices), want_w.gather(1, ref.indices), atol=1e-6, rtol=1e-6)
    # best first: the biased scores of the picks do not rise along a row
    choice = (logits.sigmoid() + bias).gather(1, ids.long())
    assert (choice[:, 1:] <= choice[:, :-1]).all()
    empty = moe().moe_route(logits[:0], bias, top_k, n_group, topk_group, 2.5, norm)
    assert empty[0].shape == empty[1].shape == (0, top_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["all_kept", "ep_drop", "empty_experts", "no_tokens", "all_dropped"])
def test_moe_permute_equals_the_reference(dtype, case):
    """Same rows, order and counts as the reference, bit for bit: EP-dropped ids (-1 and ids past E),
    experts with no tokens, no tokens at all, and a rank that owns none of any token's experts."""
    T, E, topk, D = (0 if case == "no_tokens" else 37), 8, 3, 200
    x, ids, _, _ = _moe_case(max(T, 1), E, topk, D, 16, dtype)
    x, ids = x[:T], ids[:T]
    if case == "ep_drop":
        ids = torch.where(ids < 4, ids, -1)
        ids[1, 0] = E + 3  # past the experts: dropped as well
    elif case == "empty_experts":
        ids = ids % 3  # experts 3..7 get nothing
    elif case == "all_dropped":
        ids = torch.full_like(ids, -1)
    want = moe_ref.moe_permute(x, ids, E)
    got = moe().moe_permute(x, ids, E)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ep_drop", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_moe_unpermute(dtype, ep_drop, padded):
    T, E, topk, D = 50, 8, 3, 96
    x, ids, _, _ = _moe_case(T, E, topk, D, 16, dtype)
    if ep_drop:  # this EP rank owns experts 0..3; token 0 has none of its experts here
        ids = torch.where(ids < 4, ids, -1)
        ids[0] = -1
    weights = torch.rand(T, topk, device=DEV)
    permuted, order, counts = moe_ref.moe_permute(x, ids, E)
    rows = permuted.float() * 1.5 - 0.25
    want = moe_ref.moe_unpermute(rows, order, weights)
    if padded:  # another backend's padded moe_permute: rows past N are padding (order -1), content unspecified
        rows = torch.cat([rows, torch.full((5, D), float("nan"), device=DEV)])
        order = torch.cat([order, torch.full((5,), -1, dtype=order.dtype, device=DEV)])
    got = moe().moe_unpermute(rows.to(dtype), order, weights)
    assert got.dtype == dtype
    assert _rel(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    if ep_drop:
        assert (got[0] == 0).all()


def test_registry_picks_cuda_on_gpu():
    from glm5_ascend import ops
    if DEV.type != "cuda":
        pytest.skip("registry default for cuda tensors")
    for op in ("lightning_indexer", "sparse_mla_attention", "mla_cache_write", "grouped_mlp", "moe_route",
               "moe_permute", "moe_unpermute"):
        assert ops.resolve(op, "cuda")[0] == "cuda", op
