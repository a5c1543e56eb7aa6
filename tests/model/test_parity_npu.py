"""Parity with transformers, with every model op on the npu backend (emulated where no NPU exists).

Reuses tests/model/test_parity.py (same checkpoints, same assertions) with GLM5_OPS_BACKEND=npu and
torch_npu replaced by the contract emulator, so the npu wrappers' layout conversions run inside the
whole model: float32, TND / PA_BSND, the fused MoE path. It also asserts the emulated kernels were
really called, so a silent fallback to the reference cannot pass.
"""
from __future__ import annotations

import pytest

from glm5_ascend import ops
from tests.ops import emulator

from . import test_parity as parity
from .test_parity import pair  # noqa: F401  (the module-scoped HF / engine pair fixture)

DSA_KERNELS = ("npu_lightning_indexer", "npu_sparse_flash_attention", "npu_scatter_pa_kv_cache",
               "npu_scatter_nd_update_")
MOE_KERNELS = ("npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu", "npu_moe_token_unpermute")


@pytest.fixture(scope="module", autouse=True)
def npu_ops():
    """Installed before `pair` builds the engine, so warm-up passes run the npu backend too."""
    if emulator.real_torch_npu_present():
        pytest.skip("a real torch_npu is present: tests/model/test_parity.py on the NPU covers this")
    with emulator.installed() as torch_npu, pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLM5_OPS_BACKEND", "npu")
        assert ops.resolve("sparse_mla_attention", "cpu")[0] == "npu"
        yield torch_npu


def _assert_kernels_ran(calls, before):
    ran = {k for k in DSA_KERNELS + MOE_KERNELS if calls[k] > before[k]}
    assert ran == set(DSA_KERNELS + MOE_KERNELS), f"not called: {set(DSA_KERNELS + MOE_KERNELS) - ran}"


def test_prompt_logits_match_on_npu_backend(pair, npu_ops):  # noqa: F811
    before = dict(npu_ops.calls)
    before = {k: before.get(k, 0) for k in DSA_KERNELS + MOE_KERNELS}
    parity.test_prompt_logits_match(pair)
    _assert_kernels_ran(npu_ops.calls, before)


def test_greedy_single_and_concurrent_match_on_npu_backend(pair, npu_ops, request):  # noqa: F811
    if "tied_index_scores" in request.node.callspec.id:
        pytest.skip("npu_lightning_indexer breaks exactly equal index scores its own way; with chunked "
                    "prefill only the reference backend reproduces transformers' choice among them")
    before = {k: npu_ops.calls[k] for k in DSA_KERNELS + MOE_KERNELS}
    parity.test_greedy_single_and_concurrent_match(pair)
    _assert_kernels_ran(npu_ops.calls, before)


def test_gating_kernel_used_where_it_fits(pair, npu_ops):  # noqa: F811
    """shared_indexer routes 8 experts in 2 groups (fits the kernel); grouped_routing uses 4 groups of 2,
    which is outside npu_moe_gating_top_k's limits, so the wrapper runs the torch fallback there."""
    hf, llm = pair
    before = npu_ops.calls["npu_moe_gating_top_k"]
    parity.test_prompt_logits_match(pair)
    fits = llm.llm_engine.config.model.n_routed_experts // llm.llm_engine.config.model.n_group > 2
    assert (npu_ops.calls["npu_moe_gating_top_k"] > before) == fits
