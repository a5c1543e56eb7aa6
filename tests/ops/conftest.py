"""Fixtures for the op suite: the device under test, the npu backend (real or emulated), batch builders.

The suite runs unchanged on an Ascend host (real torch_npu, tensors on the NPU), on a CUDA host and on
a CPU host (tensors on the CPU, the npu backend through the contract emulator in tests/ops/emulator).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from glm5_ascend import ops
from tests.ops import emulator

# Tolerances per dtype, for outputs compared elementwise (attention, MLP, combine).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def real_npu() -> bool:
    if not emulator.real_torch_npu_present():
        return False
    from glm5_ascend.platform import npu_available
    return npu_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs an Ascend NPU with torch_npu")
    if not real_npu():
        for item in items:
            if "npu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _check_values(monkeypatch):
    """The op suite runs with the value checks on (ops/checks.py), so none refuses a valid case."""
    monkeypatch.setenv("GLM5_OPS_CHECK_VALUES", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where op inputs live: the NPU on an Ascend host, else the CPU."""
    return torch.device("npu") if real_npu() else torch.device("cpu")


@pytest.fixture(params=["a3", "a2"])
def npu_profile(request) -> str:
    """The Atlas generation under test: both with the emulator; on an Ascend host only its own."""
    if real_npu():
        from glm5_ascend.ops.npu_profile import device_profile
        if request.param != device_profile():
            pytest.skip(f"this NPU is {device_profile()}")
    return request.param


@pytest.fixture
def npu_backend(monkeypatch, device, npu_profile):
    """GLM5_OPS_BACKEND=npu with torch_npu present (the emulator on hosts without one, holding the
    limits of `npu_profile`); yields it."""
    with emulator.installed(npu_profile) as torch_npu:
        monkeypatch.setenv("GLM5_OPS_BACKEND", "npu")
        ops.rebind()
        yield torch_npu


@dataclasses.dataclass
class Batch:
    """A paged DSA batch: T query tokens of B sequences (see ops/dsa/reference.py)."""

    q_lens: list
    ctx: list
    block_size: int
    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor      # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks], physical blocks shuffled
    num_blocks: int

    @property
    def T(self) -> int:
        return sum(self.q_lens)

    def positions(self) -> torch.Tensor:
        """int64 [T]: position of each query token in its sequence."""
        return torch.cat([torch.arange(c - q, c) for q, c in zip(self.q_lens, self.ctx)])

    def seq_of_token(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.q_lens)), torch.tensor(self.q_lens))

    def slot(self, b: int, pos) -> torch.Tensor:
        pos = torch.as_tensor(pos)
        return self.block_tables[b, pos // self.block_size].long() * self.block_size + pos % self.block_size

    def cache(self, dim: int, dtype, device, gen) -> torch.Tensor:
        """A random paged cache [num_blocks, block_size, dim]."""
        return torch.randn(self.num_blocks, self.block_size, dim, generator=gen).to(dtype).to(device)

    def to(self, device) -> "Batch":
        return dataclasses.replace(self, cu_seqlens_q=self.cu_seqlens_q.to(device),
                                   seq_lens=self.seq_lens.to(device), block_tables=self.block_tables.to(device))


def make_batch(q_lens, ctx, block_size, seed=0, spare_blocks=3) -> Batch:
    """Sequences b with q_lens[b] new tokens and ctx[b] context (incl. them); shuffled block tables."""
    gen = torch.Generator().manual_seed(seed)
    need = [(c + block_size - 1) // block_size for c in ctx]
    max_blocks = max(need) + 1  # a spare column: tables are wider than any sequence needs
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(ctx), max_blocks), num_blocks - 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    return Batch(list(q_lens), list(ctx), block_size, cu, torch.tensor(ctx, dtype=torch.int32), table, num_blocks)


# (q_lens, ctx, block_size, topk): decode, prefill, chunked prefill, block boundaries, top-k >= context,
# a sequence with no new tokens.
DSA_CASES = {
    "decode_mixed": ([1, 1, 1, 1], [5, 16, 17, 40], 16, 8),
    "prefill": ([12, 7], [12, 7], 8, 6),
    "chunked_prefill": ([5, 3], [21, 24], 8, 10),
    "block_boundary": ([2, 1, 1], [32, 33, 31], 16, 16),
    "topk_ge_context": ([3, 1], [3, 2], 4, 16),
    "empty_sequence": ([0, 4, 1], [9, 4, 6], 4, 5),
}


@pytest.fixture(params=sorted(DSA_CASES))
def dsa_batch(request) -> tuple[str, Batch, int]:
    q_lens, ctx, bs, topk = DSA_CASES[request.param]
    return request.param, make_batch(q_lens, ctx, bs, seed=len(request.param)), topk


def make_moe_ids(T, k, E, gen, empty_experts=()) -> torch.Tensor:
    """int32 [T, k] distinct expert ids per token, never choosing `empty_experts`."""
    allowed = torch.tensor([e for e in range(E) if e not in set(empty_experts)])
    scores = torch.rand(T, len(allowed), generator=gen)
    return allowed[scores.topk(k, dim=-1)[1]].to(torch.int32)
