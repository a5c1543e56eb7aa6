"""N processes equal 1 process: TP, TP with EP, DP x TP with EP over gloo, through LLM(...).

Each layout runs the same workload as one process (fp32, greedy): prompts that share a prefix (prefix
cache hits, counted by the engine), a token budget that splits prompts into chunks mixed with
decodes, and a KV cache too small for every sequence at once (preemption, counted too).
"""
from __future__ import annotations

import random

import pytest

from glm5_ascend import LLM, SamplingParams
from glm5_ascend.engine.arg_utils import EngineArgs

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
# 16-token blocks, 24 tokens a step (chunked prefill), 14 blocks per DP group (preemption).
WORKLOAD = dict(dtype="float32", block_size=16, max_num_batched_tokens=24, num_gpu_blocks_override=14,
                max_model_len=160, seed=0)
LAYOUTS = {
    "tp2": dict(tensor_parallel_size=2),
    "tp4": dict(tensor_parallel_size=4),
    "tp2-ep": dict(tensor_parallel_size=2, enable_expert_parallel=True),
    "dp2-tp2-ep": dict(tensor_parallel_size=2, data_parallel_size=2, enable_expert_parallel=True),
}


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(0, 256) for _ in range(40)]  # two full blocks shared by half the prompts
    alone = [[rng.randrange(0, 256) for _ in range(rng.randrange(3, 70))] for _ in range(4)]
    return alone + [shared + [rng.randrange(0, 256) for _ in range(rng.randrange(1, 30))] for _ in range(4)]


def _run(llm: LLM) -> tuple[list[list[int]], dict]:
    prompts = _prompts()
    # The first shared-prefix prompt runs alone first, so the others find its blocks cached.
    first = llm.generate([{"prompt_token_ids": prompts[4]}], GREEDY)
    outs = first + llm.generate([{"prompt_token_ids": p} for p in prompts[:4] + prompts[5:]], GREEDY)
    order = [4, 0, 1, 2, 3, 5, 6, 7]
    ids = [None] * len(prompts)
    for i, out in zip(order, outs):
        ids[i] = out.outputs[0].token_ids
    return ids, llm.llm_engine.stats()


@pytest.fixture(scope="module")
def single(tiny_model_dir):
    llm = LLM(tiny_model_dir, **WORKLOAD)
    return _run(llm)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_equals_single_process(tiny_model_dir, single, layout):
    expected, _ = single
    llm = LLM(tiny_model_dir, **WORKLOAD, **LAYOUTS[layout])
    try:
        got, stats = _run(llm)
    finally:
        llm.shutdown()
    assert got == expected
    assert stats["prefix_cache_hits"] >= 3 * 32, stats  # the shared 2 blocks, found by 3 prompts (per group)
    assert stats["num_preemptions"] > 0, stats


def test_layout_that_does_not_divide_is_one_line():
    with pytest.raises(ValueError, match=r"--tensor-parallel-size = 3 does not divide the model's "
                                         r"num_attention_heads=4; sizes that divide it: 1, 2, 4"):
        EngineArgs(tensor_parallel_size=3).create_engine_config()
    with pytest.raises(ValueError, match=r"n_routed_experts=8"):
        EngineArgs(data_parallel_size=3, enable_expert_parallel=True).create_engine_config()


def test_llm_rejects_unknown_keywords():
    with pytest.raises(TypeError, match="tensor_paralel_size"):
        LLM(tensor_paralel_size=2)


def test_torchrun_environment_decides_the_ranks():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    pc = EngineArgs(tensor_parallel_size=2, data_parallel_size=2).parallel_config(env)
    assert (pc.launcher, pc.first_rank, pc.num_local_ranks, pc.device_index, pc.headless) == ("torchrun", 3, 1, 1, True)
    with pytest.raises(ValueError, match="torchrun started 4 processes but TP x DP = 2"):
        EngineArgs(tensor_parallel_size=2).parallel_config(env)


def test_node_flags_decide_the_ranks():
    pc = EngineArgs(tensor_parallel_size=4, data_parallel_size=2, nnodes=2, node_rank=1,
                    master_addr="10.0.0.1", master_port=4000).parallel_config({})
    assert (pc.first_rank, pc.num_local_ranks, pc.headless, pc.master_port) == (4, 4, True, 4000)
    dp_form = EngineArgs(tensor_parallel_size=2, data_parallel_size=4, data_parallel_size_local=2,
                         data_parallel_start_rank=2, data_parallel_address="10.0.0.1",
                         data_parallel_rpc_port=5000).parallel_config({})
    assert (dp_form.first_rank, dp_form.num_local_ranks, dp_form.headless, dp_form.master_addr) == (4, 4, True,
                                                                                                    "10.0.0.1")
    with pytest.raises(ValueError, match="--headless on the node that hosts rank 0"):
        EngineArgs(tensor_parallel_size=2, nnodes=2, master_port=1, headless=True).parallel_config({})
