"""Expert-parallel dispatch / combine with 2 and 4 processes over gloo on the CPU.

Every rank builds the same global problem from one seed and keeps its own tokens. The EP result
(dispatch -> grouped_mlp on the rank's experts -> combine) must equal the single-process reference MoE
(permute -> grouped_mlp over all experts -> unpermute) on the same tokens. Covered: a rank with T=0,
tokens whose experts all live on one rank (every other rank owns none of them), experts that receive
no tokens, and dropped ids (-1). Both paths run: the portable all_to_all_single one (reference backend)
and the MC2 one (npu backend: the real ops on an Ascend host, the emulator elsewhere).
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm5_ascend import ops
from glm5_ascend.ops.moe import reference as moe_ref

from .conftest import make_moe_ids

K, D, I, N_LOCAL = 3, 16, 8, 4
TOKENS = {2: [7, 0], 4: [5, 0, 9, 3]}


def _problem(world: int):
    """The global problem: tokens per rank, ids, weights and all experts' weights (same on every rank)."""
    gen = torch.Generator().manual_seed(100 + world)
    E = N_LOCAL * world
    sizes = TOKENS[world]
    x = torch.randn(sum(sizes), D, generator=gen)
    # Experts 1 and E-2 never chosen: they receive no tokens.
    ids = make_moe_ids(sum(sizes), K, E, gen, empty_experts=(1, E - 2))
    ids[0] = torch.tensor([0, 2, 3])  # all on rank 0: every other rank owns none of token 0's experts
    if sizes[-1]:
        ids[-1] = torch.tensor([E - 1, E - 3, E - 4])  # all on the last rank
    w = torch.rand(sum(sizes), K, generator=gen)
    w13 = torch.randn(E, 2 * I, D, generator=gen) * 0.3
    w2 = torch.randn(E, D, I, generator=gen) * 0.3
    return E, sizes, x, ids, w, w13, w2


def _moe_reference(x, ids, w, w13, w2, E):
    permuted, order, counts = moe_ref.moe_permute(x, ids, E)
    return moe_ref.moe_unpermute(moe_ref.grouped_mlp(permuted, counts, w13, w2), order, w)


def _expected_rows(x, ids, E, rank):
    """Per local expert of `rank`: the sorted rows it must receive (from every rank's tokens)."""
    flat = ids.reshape(-1).long()
    return [x[(flat == e).nonzero()[:, 0] // K].sort(0).values
            for e in range(rank * N_LOCAL, (rank + 1) * N_LOCAL)]


def _run_ep(x, ids, w, E, w13, w2, rank, group, expect_rows):
    recv, counts, handle = ops.ep_dispatch(x, ids, w, E, group)
    assert counts.dtype == torch.int64 and counts.shape == (N_LOCAL,) and int(counts.sum()) == recv.shape[0]
    bounds = [0] + counts.cumsum(0).tolist()
    for e, want in enumerate(expect_rows):
        got = recv[bounds[e]:bounds[e + 1]].sort(0).values
        assert torch.equal(got, want), f"rank {rank} local expert {e}: wrong rows"
    local = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    out = ops.ep_combine(moe_ref.grouped_mlp(recv, counts, w13[local], w2[local]), handle)
    return out, handle


def _worker(rank: int, world: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        E, sizes, x_all, ids_all, w_all, w13, w2 = _problem(world)
        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])
        x, ids, w = x_all[mine], ids_all[mine], w_all[mine]
        group = dist.group.WORLD
        with pytest.raises(ValueError, match="not divisible"):  # checked before any collective
            ops.ep_dispatch(x, ids, w, E + 1, group)
        want = _moe_reference(x, ids, w, w13, w2, E)
        # Portable path, with one dropped id (-1): reference backend on the CPU.
        dropped = ids_all.clone()
        dropped[2, 1] = -1
        want_drop = _moe_reference(x, dropped[mine], w, w13, w2, E)
        out, handle = _run_ep(x, dropped[mine], w, E, w13, w2, rank, group, _expected_rows(x_all, dropped, E, rank))
        assert handle.backend == "reference"
        torch.testing.assert_close(out, want_drop, atol=1e-5, rtol=1e-5)
        _run_mc2(x, ids, w, E, w13, w2, rank, group, _expected_rows(x_all, ids_all, E, rank), want)
        dist.barrier()  # no rank tears gloo down while another still talks to it (SIGABRT otherwise)
    finally:
        dist.destroy_process_group()
    # Passed: leave without interpreter teardown, where gloo's threads now and then hit
    # std::terminate ("terminate called without an active exception", SIGABRT; about 1 run in 6).
    os._exit(0)


def _run_mc2(x, ids, w, E, w13, w2, rank, group, expect_rows, want):
    from tests.ops import emulator
    if emulator.real_torch_npu_present():
        return  # the real MC2 kernels need an HCCL group on NPUs, not this gloo group on the CPU
    with emulator.installed() as torch_npu:
        from glm5_ascend.ops.moe import npu
        torch_npu.register_group("ep-world", group)
        npu.hccl_comm_name = lambda g: "ep-world"  # the emulator addresses groups by a registered name
        os.environ["GLM5_OPS_BACKEND_EP_DISPATCH"] = "npu"
        try:
            out, handle = _run_ep(x, ids, w, E, w13, w2, rank, group, expect_rows)
        finally:
            del os.environ["GLM5_OPS_BACKEND_EP_DISPATCH"]
        assert handle.backend == "npu"
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_ep_dispatch_combine_matches_single_process_moe(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous")), nprocs=world, join=True)


def test_ep_single_rank_group_is_local_moe(tmp_path):
    """A group of one: dispatch is a local permute (the in-process path the model takes at EP=1)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        E, sizes, x, ids, w, w13, w2 = _problem(2)
        recv, counts, handle = ops.ep_dispatch(x, ids, w, E, dist.group.WORLD)
        assert counts.tolist() == torch.bincount(ids.reshape(-1).long(), minlength=E).tolist()
        out = ops.ep_combine(moe_ref.grouped_mlp(recv, counts, w13, w2), handle)
        torch.testing.assert_close(out, _moe_reference(x, ids, w, w13, w2, E), atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()
