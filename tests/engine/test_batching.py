"""Scheduling must not change results: batching, chunked prefill, prefix caching, preemption."""
from __future__ import annotations

import random

import pytest

from glm5_ascend import LLM, SamplingParams
from tests.conftest import TEST_DEVICE

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompts(n, seed, lo=5, hi=90):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _run(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.fixture(scope="module")
def llms(tiny_model_dir):
    common = dict(device=TEST_DEVICE, block_size=16, seed=0)
    return {
        "plain": LLM(tiny_model_dir, enable_prefix_caching=False, **common),
        # 24-token budget: long prompts are split into chunks and mixed with other requests' decodes
        "chunked": LLM(tiny_model_dir, enable_prefix_caching=False, max_num_batched_tokens=24, **common),
        "cached": LLM(tiny_model_dir, enable_prefix_caching=True, **common),
    }


def test_batch_equals_alone_with_and_without_chunking(llms):
    prompts = _prompts(6, seed=3)
    alone = [_run(llms["plain"], [p])[0] for p in prompts]
    assert _run(llms["plain"], prompts) == alone
    assert _run(llms["chunked"], prompts) == alone


def test_prefix_cache_hits_equal_misses(llms):
    llm = llms["cached"]
    shared = _prompts(1, seed=4, lo=50, hi=51)[0]  # 3 full blocks of 16
    prompts = [shared + tail for tail in _prompts(4, seed=5, lo=3, hi=20)]
    misses = [_run(llms["plain"], [p])[0] for p in prompts]
    bm = llm.llm_engine.block_manager
    before = bm.prefix_hits
    first = _run(llm, prompts[:1])
    hits = _run(llm, prompts)  # every prompt now shares the cached 48-token head
    assert bm.prefix_hits - before >= 4 * 48
    assert first + hits[1:] == [misses[0]] + misses[1:]
    assert hits == misses


def test_no_block_leak_after_200_requests_with_preemption(tiny_model_dir):
    # 12 blocks of 16 tokens cannot hold 8 sequences of ~60 tokens: the scheduler must preempt.
    llm = LLM(tiny_model_dir, device=TEST_DEVICE, block_size=16, num_gpu_blocks_override=12, max_model_len=160,
              max_num_batched_tokens=64, seed=0)
    eng = llm.llm_engine
    free0 = eng.block_manager.num_free_blocks
    rng = random.Random(7)
    total = 0
    for round_ in range(25):
        prompts = _prompts(8, seed=100 + round_, lo=10, hi=60)
        params = [SamplingParams(temperature=rng.choice([0, 0.8]), max_tokens=rng.randrange(1, 20),
                                 ignore_eos=True, seed=rng.randrange(1000)) for _ in prompts]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        assert all(o.finished for o in outs)
        assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
        total += len(outs)
    assert total == 200
    assert eng.scheduler.num_preemptions > 0
    assert eng.block_manager.num_free_blocks == free0
    assert not eng.scheduler.running and not eng.scheduler.waiting


def test_preempted_requests_give_the_same_greedy_tokens(tiny_model_dir, llms):
    llm = LLM(tiny_model_dir, device=TEST_DEVICE, block_size=16, num_gpu_blocks_override=10, max_model_len=150,
              enable_prefix_caching=False, seed=0)
    prompts = _prompts(6, seed=9, lo=30, hi=60)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outs = _run(llm, prompts, params)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert outs == [_run(llms["plain"], [p], params)[0] for p in prompts]
