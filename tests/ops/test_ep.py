"""Expert-parallel dispatch / combine with 2 and 4 processes over gloo on the CPU.

Every rank builds the same global problem from one seed and keeps its own tokens. The EP result
(dispatch -> grouped_mlp on the rank's experts -> combine) must equal the single-process reference MoE
(permute -> grouped_mlp over all experts -> unpermute) on the same tokens. Covered: a rank with T=0,
tokens whose experts all live on one rank (every other rank owns none of them), experts that receive
no tokens, and dropped ids (-1). Both paths run: the portable all_to_all_single one (reference backend)
and the npu backend, which runs MC2 (the emulator on the CPU) on its own communicator where the
documented limits allow and the portable path elsewhere; which one ran is asserted, as is that no
collective touched the MC2 communicator (the emulator refuses one) and that the static MC2 path holds
no host sync (capturable mode).
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm5_ascend import ops
from glm5_ascend.ops.moe import mc2
from glm5_ascend.ops.moe import reference as moe_ref

from .conftest import make_moe_ids

K, I, N_LOCAL = 3, 8, 4
D = 1024  # within MC2's documented hidden sizes on A3 ([1024, 8192]) and A2 ((0, 7168], a multiple of 32)
TOKENS = {2: [7, 0], 4: [5, 0, 9, 3]}  # a rank with no tokens
BUSY = {2: [7, 3], 4: [5, 2, 9, 3]}    # every rank has tokens


def _problem(world: int, sizes: list[int], seed: int = 100):
    """The global problem: tokens per rank, ids, weights and all experts' weights (same on every rank)."""
    gen = torch.Generator().manual_seed(seed + world)
    E = N_LOCAL * world
    x = torch.randn(sum(sizes), D, generator=gen)
    # Experts 1 and E-2 never chosen: they receive no tokens.
    ids = make_moe_ids(sum(sizes), K, E, gen, empty_experts=(1, E - 2))
    ids[0] = torch.tensor([0, 2, 3])  # all on rank 0: every other rank owns none of token 0's experts
    if sizes[-1]:
        ids[-1] = torch.tensor([E - 1, E - 3, E - 4])  # all on the last rank
    w = torch.rand(sum(sizes), K, generator=gen)
    w13 = torch.randn(E, 2 * I, D, generator=gen) * 0.1
    w2 = torch.randn(E, D, I, generator=gen) * 0.3
    return E, x, ids, w, w13, w2


def _moe_reference(x, ids, w, w13, w2, E):
    permuted, order, counts = moe_ref.moe_permute(x, ids, E)
    return moe_ref.moe_unpermute(moe_ref.grouped_mlp(permuted, counts, w13, w2), order, w)


def _expected_rows(x, ids, E, rank):
    """Per local expert of `rank`: the sorted rows it must receive (from every rank's tokens)."""
    flat = ids.reshape(-1).long()
    return [x[(flat == e).nonzero()[:, 0] // K].sort(0).values
            for e in range(rank * N_LOCAL, (rank + 1) * N_LOCAL)]


class Case:
    """One rank's share of a global problem."""

    def __init__(self, world, rank, sizes, seed=100, drop=False):
        self.E, x, ids, w, self.w13, self.w2 = _problem(world, sizes, seed)
        if drop:
            ids = ids.clone()
            ids[2, 1] = -1
        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])
        self.x, self.ids, self.w, self.rank = x[mine], ids[mine], w[mine], rank
        self.rows = _expected_rows(x, ids, self.E, rank)
        self.want = _moe_reference(self.x, self.ids, self.w, self.w13, self.w2, self.E)


def _run_ep(case: Case, group, mc2_group=None, bound=None, capturable=None):
    """dispatch -> this rank's experts -> combine; checks the rows each local expert got. Returns (out, handle)."""
    guard = capturable or _nothing
    with guard():
        recv, counts, handle = ops.ep_dispatch(case.x, case.ids, case.w, case.E, group, mc2_group, bound)
    n = recv.shape[0] if handle.backend == "reference" else None
    assert counts.dtype == torch.int64 and counts.shape == (N_LOCAL,)
    total = sum(counts.tolist())
    assert total <= recv.shape[0] and (n is None or total == n)  # MC2 returns its fixed-size buffer
    bounds = [0] + counts.cumsum(0).tolist()
    rows = case.rows
    if handle.backend == "npu" and case.x.shape[0] == 0:  # the dummy row a rank without tokens sends its own experts
        rows = [torch.cat([r, r.new_zeros((1, D))]).sort(0).values if e < K else r for e, r in enumerate(rows)]
    for e, want in enumerate(rows):
        got = recv[bounds[e]:bounds[e + 1]].sort(0).values
        assert torch.equal(got, want), f"rank {case.rank} local expert {e}: wrong rows"
    local = slice(case.rank * N_LOCAL, (case.rank + 1) * N_LOCAL)
    expert_out = moe_ref.grouped_mlp(recv, counts, case.w13[local], case.w2[local])
    with guard():
        out = ops.ep_combine(expert_out, handle)
    torch.testing.assert_close(out, case.want, atol=1e-4, rtol=1e-5)
    return out, handle


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _worker(rank: int, world: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ranks = list(range(world))
        ep_group, mc2_group, transport = (dist.new_group(ranks, backend="gloo") for _ in range(3))
        case = Case(world, rank, TOKENS[world])
        with pytest.raises(ValueError, match="not divisible"):  # checked before any collective
            ops.ep_dispatch(case.x, case.ids, case.w, case.E + 1, ep_group)
        # Portable path, with one dropped id (-1): reference backend on the CPU.
        _, handle = _run_ep(Case(world, rank, TOKENS[world], drop=True), ep_group)
        assert handle.backend == "reference"
        _run_npu(world, rank, ep_group, mc2_group, transport)
        dist.barrier()  # no rank tears gloo down while another still talks to it (SIGABRT otherwise)
    finally:
        dist.destroy_process_group()
    # Passed: leave without interpreter teardown, where gloo's threads now and then hit
    # std::terminate ("terminate called without an active exception", SIGABRT; about 1 run in 6).
    os._exit(0)


def _run_npu(world, rank, ep_group, mc2_group, transport):
    from tests.ops import emulator
    if emulator.real_torch_npu_present():
        return  # the real MC2 kernels need an HCCL group on NPUs, not gloo groups on the CPU
    os.environ["GLM5_OPS_BACKEND_EP_DISPATCH"] = "npu"
    try:
        with emulator.installed("a3") as torch_npu:
            from glm5_ascend.ops.moe import npu
            npu.hccl_comm_name = emulator.comm_name  # the emulator addresses groups by a registered name
            _npu_a3(world, rank, ep_group, mc2_group, transport, torch_npu, emulator)
        with emulator.installed("a2") as torch_npu:
            from glm5_ascend.ops.moe import npu
            npu.hccl_comm_name = emulator.comm_name
            emulator.register_group("mc2", mc2_group, transport)
            # A2's MC2 takes EP sizes 16..256 only: 2 and 4 ranks take the all_to_all path, static bound or not
            for bound in (16, None):
                _, handle = _run_ep(Case(world, rank, TOKENS[world]), ep_group, mc2_group, bound)
                assert handle.backend == "reference"
            assert torch_npu.calls["npu_moe_distribute_dispatch_v2"] == 0
    finally:
        del os.environ["GLM5_OPS_BACKEND_EP_DISPATCH"]


def _npu_a3(world, rank, ep_group, mc2_group, transport, torch_npu, emulator):
    calls = torch_npu.calls
    # Static bound <= 512: MC2 in every call without a collective or a host sync; the rank with no
    # tokens sends one dummy row. No collective touches mc2_group (the emulator would refuse it).
    emulator.register_group("mc2", mc2_group, transport)
    _, handle = _run_ep(Case(world, rank, TOKENS[world]), ep_group, mc2_group, 16, emulator.capturable)
    assert handle.backend == "npu" and handle.global_bs == 16 * world and calls["npu_moe_distribute_dispatch_v2"] == 1
    _, handle = _run_ep(Case(world, rank, BUSY[world], seed=7), ep_group, mc2_group, 16, emulator.capturable)
    assert handle.backend == "npu" and calls["npu_moe_distribute_combine_v2"] == 2
    # One global_bs for every layer: another bound on the same communicator is refused (on every rank)
    with pytest.raises(RuntimeError, match="global_bs must be the same"):
        ops.ep_dispatch(*_args(Case(world, rank, BUSY[world])), ep_group, mc2_group, 17)
    # No bound: decided per call by one all_reduce on ep_group. A rank with no tokens -> all_to_all;
    # every rank with tokens -> MC2 with global_bs = 512 * EP.
    emulator.register_group("mc2", mc2_group, transport)
    _, handle = _run_ep(Case(world, rank, TOKENS[world]), ep_group, mc2_group, None)
    assert handle.backend == "reference" and calls["npu_moe_distribute_dispatch_v2"] == 3
    _, handle = _run_ep(Case(world, rank, BUSY[world], seed=8), ep_group, mc2_group, None)
    assert handle.backend == "npu" and handle.global_bs == 512 * world
    if world == 2:  # above the cap (513 > 512 tokens on rank 0): all_to_all, also with a bound above the cap
        for bound in (None, 600):
            _, handle = _run_ep(Case(world, rank, [513, 3]), ep_group, mc2_group, bound)
            assert handle.backend == "reference"
    # HCCL_BUFFSIZE below the documented need: one line naming the value to set, before any collective
    os.environ["HCCL_BUFFSIZE"] = "1"
    try:
        with pytest.raises(RuntimeError, match=r"HCCL_BUFFSIZE=1 MB is below .* export HCCL_BUFFSIZE=\d+"):
            ops.ep_dispatch(*_args(Case(world, rank, BUSY[world])), ep_group, mc2_group, 256)
    finally:
        del os.environ["HCCL_BUFFSIZE"]
    # MC2's communicator carries nothing else: a collective on it is refused while the emulator is in
    with pytest.raises(RuntimeError, match="MC2 communicator"):
        dist.all_reduce(torch.zeros(1), group=mc2_group)


def _args(case: Case):
    return case.x, case.ids, case.w, case.E


@pytest.mark.parametrize("world", [2, 4])
def test_ep_dispatch_combine_matches_single_process_moe(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous")), nprocs=world, join=True)


def test_ep_single_rank_group_is_local_moe(tmp_path):
    """A group of one: dispatch is a local permute (the in-process path the model takes at EP=1)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        E, x, ids, w, w13, w2 = _problem(2, TOKENS[2])
        recv, counts, handle = ops.ep_dispatch(x, ids, w, E, dist.group.WORLD)
        assert counts.tolist() == torch.bincount(ids.reshape(-1).long(), minlength=E).tolist()
        out = ops.ep_combine(moe_ref.grouped_mlp(recv, counts, w13, w2), handle)
        torch.testing.assert_close(out, _moe_reference(x, ids, w, w13, w2, E), atol=1e-4, rtol=1e-5)
        with pytest.raises(ValueError, match="max_tokens_per_rank=4, the bound"):
            ops.ep_dispatch(x, ids, w, E, dist.group.WORLD, None, 4)
        with pytest.raises(ValueError, match="mc2_group must be a communicator of its own"):
            ops.ep_dispatch(x, ids, w, E, dist.group.WORLD, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


# --- the MC2 plan (ops/moe/mc2.py), no processes needed ---------------------------------------------

GLM5 = dict(hidden=6144, top_k=8, num_experts=256)


@pytest.mark.parametrize("device,ep,bound,mc2_on,per_call,bs", [
    ("a3", 16, 256, True, False, 256),    # static: bound within the cap
    ("a3", 16, 512, True, False, 512),
    ("a3", 16, 8192, True, True, 512),    # prefill-sized bound: per call, BS at the cap
    ("a3", 16, None, True, True, 512),    # no bound: per call
    ("a2", 16, 128, True, False, 128),    # A2: EP 16, 16 experts per rank
    ("a2", 16, 300, True, True, 256),     # A2's cap is 256
    ("a2", 8, 64, False, False, 64),      # A2: EP 8 is not an MC2 EP size, and 32 experts per rank > 24
    ("a2", 32, 64, True, False, 64),
])
def test_mc2_plan(monkeypatch, device, ep, bound, mc2_on, per_call, bs):
    monkeypatch.setenv("HCCL_BUFFSIZE", "4000")
    p = mc2.plan(device, GLM5["hidden"], GLM5["top_k"], ep, GLM5["num_experts"], bound, True)
    assert (p.mc2, p.per_call, p.tokens_per_rank, p.global_bs) == (mc2_on, per_call, bs, bs * ep)
    assert p.reason == "" if mc2_on else "EP size 8" in p.reason
    no_group = mc2.plan(device, GLM5["hidden"], GLM5["top_k"], ep, GLM5["num_experts"], bound, False)
    assert not no_group.mc2 and "no MC2 communicator" in no_group.reason


def test_mc2_buffsize_is_checked_with_the_value_to_set(monkeypatch):
    """GLM-5 on A3 at 512 tokens per rank needs 3296 MB (docs/deployment.md section 7); 200 is HCCL's default."""
    monkeypatch.delenv("HCCL_BUFFSIZE", raising=False)
    with pytest.raises(RuntimeError, match=r"^HCCL_BUFFSIZE=200 MB is below the 3296 MB .* export HCCL_BUFFSIZE=3296 "):
        mc2.plan("a3", GLM5["hidden"], GLM5["top_k"], 16, GLM5["num_experts"], None, True)
    monkeypatch.setenv("HCCL_BUFFSIZE", "3296")
    assert mc2.plan("a3", GLM5["hidden"], GLM5["top_k"], 16, GLM5["num_experts"], None, True).mc2
    monkeypatch.setenv("HCCL_BUFFSIZE", "200")  # A2, EP16, 64 tokens per rank: 196 MB
    assert mc2.plan("a2", GLM5["hidden"], GLM5["top_k"], 16, GLM5["num_experts"], 64, True).mc2
    monkeypatch.setenv("HCCL_BUFFSIZE", "big")
    with pytest.raises(RuntimeError, match="not a whole number of MB"):
        mc2.plan("a2", GLM5["hidden"], GLM5["top_k"], 16, GLM5["num_experts"], 64, True)


def test_dummy_ids_are_distinct_experts_of_the_rank():
    assert mc2.dummy_ids(3, 16, 8, 256, torch.device("cpu")).tolist() == [list(range(48, 56))]
    ids = mc2.dummy_ids(1, 2, 8, 16, torch.device("cpu"))  # fewer local experts than K: still K distinct ids
    assert sorted(ids[0].tolist()) == sorted(set(ids[0].tolist())) and len(set(ids[0].tolist())) == 8


def test_model_passes_mc2_group_and_bound(monkeypatch):
    """MoE._routed_ep hands ops.ep_dispatch ParallelState.mc2_group and the model's max_tokens_per_rank."""
    from glm5_ascend.config import ModelConfig
    from glm5_ascend.distributed import ParallelState
    from glm5_ascend.model.glm5 import GlmMoeDsaForCausalLM, MoE
    from glm5_ascend.model.tiny import tiny_config
    cfg = ModelConfig.from_dict(tiny_config(512))
    ep, mc2_group = object(), object()
    ps = ParallelState(ep_rank=0, ep_size=2, ep_group=ep, mc2_group=mc2_group)
    with torch.device("meta"):
        model = GlmMoeDsaForCausalLM(cfg, ps, torch.float32, max_tokens_per_rank=96)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes and all(m.max_tokens_per_rank == 96 for m in moes)  # every MoE layer, the MTP layer's too
    moe = MoE(cfg, ps, torch.float32, max_tokens_per_rank=96)
    seen = {}

    def dispatch(hidden, ids, weights, num_experts, ep_group, mc2, bound):
        seen.update(ep_group=ep_group, mc2=mc2, bound=bound)
        raise StopIteration

    monkeypatch.setattr(ops, "ep_dispatch", dispatch)
    with pytest.raises(StopIteration):
        moe._routed_ep(torch.zeros(3, cfg.hidden_size))
    assert seen == dict(ep_group=ep, mc2=mc2_group, bound=96)
