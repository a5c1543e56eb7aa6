"""Prefix caching: which blocks are found, counted and evicted, asserted on the engine's own counters.

Equal outputs alone cannot show a hit happened (a miss gives the same tokens), nor that a block
was *not* wrongly reused when the outputs happen to agree; so every test here also reads the block
manager's counters or the request's num_cached_tokens.
"""
from __future__ import annotations

import random

import pytest

from glm5_ascend import LLM, SamplingParams
from glm5_ascend.engine.block_manager import BlockManager
from glm5_ascend.engine.sequence import Sequence
from tests.conftest import TEST_DEVICE

BS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 256) for _ in range(n)]


# ------------------------------------------------------------------ the block manager alone
def _run_and_free(bm: BlockManager, ids: list[int]) -> tuple[Sequence, list[int]]:
    """What the scheduler and engine do for one prompt: match, admit, compute it all, register, free."""
    seq = Sequence("r", 0, ids, SamplingParams())
    hits = bm.match_prefix(seq)
    assert bm.admit(seq, hits, seq.num_tokens - len(hits) * bm.block_size)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_full_blocks(seq)
    table = list(seq.block_table)
    bm.free_seq(seq)
    return seq, hits if hits else table


def _hits(bm: BlockManager, ids: list[int]) -> int:
    """Cached blocks a new prompt `ids` would reuse (the lookup is counted, nothing is taken)."""
    return len(bm.match_prefix(Sequence("probe", 0, ids, SamplingParams())))


def test_a_middle_block_is_not_found_without_its_prefix():
    """[X, M, t] cached: [M, ...] must not reuse M's block (its keys were computed after X, at
    positions 16..31), and [Y, M, ...] must not find M either. Only [X, M, ...] finds both."""
    bm = BlockManager(num_blocks=16, block_size=4)
    X, M, Y = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    _run_and_free(bm, X + M + [13])
    assert _hits(bm, M + [13, 14]) == 0
    assert _hits(bm, M + M + [13]) == 0
    assert _hits(bm, Y + M + [13]) == 0
    assert _hits(bm, X + M + [14]) == 2
    assert _hits(bm, X + Y + [14]) == 1


def test_hit_counters_are_exact():
    bm = BlockManager(num_blocks=16, block_size=4)
    _run_and_free(bm, list(range(10)))  # 2 full blocks cached (the last 2 tokens are partial)
    q0, h0 = bm.prefix_queries, bm.prefix_hits
    seq = Sequence("r", 0, list(range(9)) + [99], SamplingParams())
    hits = bm.match_prefix(seq)
    assert len(hits) == 2 and bm.prefix_hits - h0 == 8 and bm.prefix_queries - q0 == 10
    assert bm.admit(seq, hits, 2) and seq.num_cached_tokens == seq.num_computed_tokens == 8
    # the last token is always computed, even when the whole prompt is cached
    assert _hits(bm, list(range(8))) == 1


def test_eviction_is_least_recently_freed_first():
    """4 blocks: A then B are run and freed (2 blocks each). A new prompt needing 2 blocks must
    evict A's (freed first), leaving B findable; then B's run refreshes B, and C evicts what is
    older: the new prompt's blocks, not B's."""
    bm = BlockManager(num_blocks=4, block_size=4)
    A, B, C, D = (list(range(s, s + 6)) for s in (0, 100, 200, 300))
    _run_and_free(bm, A)
    _run_and_free(bm, B)
    assert _hits(bm, A) == 1 and _hits(bm, B) == 1
    _run_and_free(bm, C)  # takes 2 free blocks: A's
    assert _hits(bm, A) == 0 and _hits(bm, B) == 1 and _hits(bm, C) == 1
    _run_and_free(bm, B)  # a hit: B's head block is used again and freed last
    _run_and_free(bm, D)  # evicts C's two blocks, the least recently freed
    assert _hits(bm, C) == 0 and _hits(bm, B) == 1 and _hits(bm, D) == 1


def test_a_head_block_outlives_its_tail():
    """free_seq frees a sequence's tail first, so when one block must go it is the tail's."""
    bm = BlockManager(num_blocks=3, block_size=4)
    _run_and_free(bm, list(range(9)))  # 3 blocks, 2 of them full and cached
    _run_and_free(bm, [50, 51])  # needs 1 block: the least recently freed is the third (partial)
    _run_and_free(bm, [60, 61])  # the next one: the second full block (freed before the head)
    assert _hits(bm, list(range(9))) == 1


# ------------------------------------------------------------------ through the engine
@pytest.fixture(scope="module")
def cached(tiny_model_dir):
    return LLM(tiny_model_dir, device=TEST_DEVICE, block_size=BS, seed=0, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return LLM(tiny_model_dir, device=TEST_DEVICE, block_size=BS, seed=0, enable_prefix_caching=False)


def _gen(llm, ids):
    out = llm.generate([{"prompt_token_ids": ids}], GREEDY)[0]
    return out.outputs[0].token_ids, out.num_cached_tokens


def test_engine_reuses_only_true_prefixes(cached, plain):
    """A prompt whose first block equals another prompt's middle block gets no hit, and its output
    equals the uncached one; a prompt sharing two whole blocks gets exactly those 32 tokens."""
    bm = cached.llm_engine.block_manager
    X, M = _tokens(BS, 1), _tokens(BS, 2)
    first = X + M + _tokens(5, 3)
    _gen(cached, first)
    h0 = bm.prefix_hits
    shifted = M + _tokens(20, 4)  # M at positions 0..15 here, 16..31 in `first`
    tokens, n_cached = _gen(cached, shifted)
    assert n_cached == 0 and bm.prefix_hits == h0
    assert tokens == _gen(plain, shifted)[0]
    other_head = _tokens(BS, 5) + M + _tokens(5, 6)
    assert _gen(cached, other_head)[1] == 0 and bm.prefix_hits == h0
    same = X + M + _tokens(7, 7)
    tokens, n_cached = _gen(cached, same)
    assert n_cached == 2 * BS and bm.prefix_hits - h0 == 2 * BS
    assert tokens == _gen(plain, same)[0]


def test_engine_stats_count_queries_and_hits(cached):
    stats0 = cached.llm_engine.stats()
    ids = _tokens(3 * BS + 4, 8)
    _gen(cached, ids)
    _gen(cached, ids)
    stats = cached.llm_engine.stats()
    assert stats["prefix_cache_queries"] - stats0["prefix_cache_queries"] == 2 * len(ids)
    assert stats["prefix_cache_hits"] - stats0["prefix_cache_hits"] == 3 * BS  # the second run's 3 full blocks
