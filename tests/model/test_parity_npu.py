"""Parity with transformers, with every model op on the npu backend (emulated where no NPU exists).

Reuses tests/model/test_parity.py (same checkpoints, same assertions) with GLM5_OPS_BACKEND=npu and
torch_npu replaced by the contract emulator, so the npu wrappers run inside the whole model: float32,
the paged cache writes, the fused MoE path (padded permute, grouped matmul, unpermute).

The tiny checkpoints are far below GLM-5's dims (latent 64, index dim 32, rope dim 16), outside the
documented limits of npu_sparse_flash_attention (latent 512, rope 64), npu_lightning_indexer (dim 128)
and npu_interleave_rope (64): there the wrappers must run the reference, as they would on a real NPU,
and these tests assert exactly that (the kernels that fit ran; the ones that do not were not called).
tests/ops/test_npu_emulated.py shows GLM-5-shaped calls reaching those kernels. Logits and greedy
decoding run under both device profiles (A2 and A3 differ only in MC2's limits, which a one-process
engine never reaches, so both must pass alike).
"""
from __future__ import annotations

import pytest

from glm5_ascend import ops
from glm5_ascend.model.glm5 import MoE
from tests.ops import emulator

from . import test_parity as parity
from .test_parity import pair  # noqa: F401  (the module-scoped HF / engine pair fixture)

RAN = ("npu_scatter_pa_kv_cache", "npu_scatter_nd_update_", "npu_moe_init_routing_v2", "npu_grouped_matmul",
       "npu_swiglu", "npu_moe_token_unpermute")
OUTSIDE_LIMITS = ("npu_lightning_indexer", "npu_sparse_flash_attention", "npu_interleave_rope")


@pytest.fixture(scope="module", autouse=True)
def npu_ops():
    """Installed before `pair` builds the engine, so warm-up passes run the npu backend too."""
    if emulator.real_torch_npu_present():
        pytest.skip("a real torch_npu is present: tests/model/test_parity.py on the NPU covers this")
    with emulator.installed("a3") as torch_npu, pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLM5_OPS_BACKEND", "npu")
        ops.rebind()
        assert ops.resolve("sparse_mla_attention", "cpu")[0] == "npu"
        yield torch_npu


def _count(calls):
    return {k: calls[k] for k in RAN + OUTSIDE_LIMITS}


def _assert_kernels(calls, before):
    ran = {k for k in RAN if calls[k] > before[k]}
    assert ran == set(RAN), f"not called: {set(RAN) - ran}"
    called = {k for k in OUTSIDE_LIMITS if calls[k] > before[k]}
    assert not called, f"called outside their documented limits (tiny dims): {called}"


@pytest.mark.parametrize("profile", ["a3", "a2"])
def test_prompt_logits_match_on_npu_backend(pair, npu_ops, profile):  # noqa: F811
    before = _count(npu_ops.calls)
    with emulator.use_profile(profile):
        parity.test_prompt_logits_match(pair)
    _assert_kernels(npu_ops.calls, before)


@pytest.mark.parametrize("profile", ["a3", "a2"])
def test_greedy_single_and_concurrent_match_on_npu_backend(pair, npu_ops, profile):  # noqa: F811
    before = _count(npu_ops.calls)
    with emulator.use_profile(profile):
        parity.test_greedy_single_and_concurrent_match(pair)
    _assert_kernels(npu_ops.calls, before)


def test_gating_kernel_used_where_it_fits(pair, npu_ops):  # noqa: F811
    """shared_indexer routes 8 experts in 2 groups (fits the kernel); grouped_routing uses 4 groups of 2,
    which is outside npu_moe_gating_top_k's limits, so the wrapper runs the torch fallback there."""
    hf, llm = pair
    before = npu_ops.calls["npu_moe_gating_top_k"]
    parity.test_prompt_logits_match(pair)
    fits = llm.llm_engine.config.model.n_routed_experts // llm.llm_engine.config.model.n_group > 2
    assert (npu_ops.calls["npu_moe_gating_top_k"] > before) == fits


def test_engine_gives_every_moe_layer_its_token_bound(pair):  # noqa: F811
    """ModelRunner builds the model with max_tokens_per_rank = ceil(max_num_batched_tokens / TP)."""
    hf, llm = pair
    eng = llm.llm_engine
    want = -(-eng.config.scheduler.max_num_batched_tokens // eng.runner.ps.tp_size)
    moes = [m for m in eng.runner.model.modules() if isinstance(m, MoE)]
    assert moes and {m.max_tokens_per_rank for m in moes} == {want}
