"""The sampler draws from the distribution vLLM's parameters define, at ordinary values.

Greedy-equivalent corners (top_k=1, top_p tiny) cannot tell T from 1/T or a top-p boundary off by
one token; these tests can. For each setting the expected distribution is computed here from the
definitions (softmax(logits / T); min_p keeps p >= min_p * max p; top_k keeps the k largest; top_p
keeps the smallest set of the largest that reaches top_p of what is left; renormalise), then
N seeded draws are compared with a chi-square goodness-of-fit test. A token the definition removes
must never be drawn. The threshold is the chi-square quantile at p = 1e-4 for the support's degrees
of freedom: a correct sampler fails 1 time in 10,000 seeds, and the draws are seeded, so the test
is deterministic.
"""
from __future__ import annotations

import math

import pytest
import torch

from glm5_ascend.engine.sampler import Sampler
from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.engine.sequence import Sequence

# chi2.ppf(1 - 1e-4, df) for df = 1 .. 11 (scipy.stats.chi2)
CHI2_CRITICAL = [15.14, 18.42, 21.11, 23.51, 25.74, 27.86, 29.88, 31.83, 33.72, 35.56, 37.37]
LOGITS = [2.0, 1.6, 1.3, 1.1, 0.8, 0.5, 0.3, 0.0, -0.4, -0.9, -1.5, -2.5]
N_DRAWS = 10000
BATCH = 2500


def expected(logits: list[float], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """The target distribution, from the definitions, in plain Python floats."""
    z = [x / temperature for x in logits]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    p = [x / sum(e) for x in e]
    keep = set(range(len(p)))
    if min_p > 0:
        keep = {i for i in keep if p[i] >= min_p * max(p)}
    if top_k:
        keep = set(sorted(keep, key=lambda i: -p[i])[:top_k])
    if top_p < 1.0:
        order = sorted(keep, key=lambda i: -p[i])
        mass = sum(p[i] for i in keep)
        kept, acc = set(), 0.0
        for i in order:
            kept.add(i)
            acc += p[i]
            if acc >= top_p * mass:
                break
        keep = kept
    total = sum(p[i] for i in keep)
    return [p[i] / total if i in keep else 0.0 for i in range(len(p))]


def draw(params: SamplingParams, n: int = N_DRAWS, seed: int = 0) -> list[int]:
    """Counts of n draws through the engine's Sampler (rows of the same logits, one sequence each)."""
    sampler = Sampler(eos_token_ids=set(), generator=torch.Generator().manual_seed(seed))
    counts = [0] * len(LOGITS)
    row = torch.tensor(LOGITS, dtype=torch.float32)
    for start in range(0, n, BATCH):
        b = min(BATCH, n - start)
        seqs = [Sequence("d", i, [1, 2, 3], params) for i in range(b)]
        for t in sampler(row.repeat(b, 1), seqs).token_ids:
            counts[t] += 1
    return counts


def chi_square(counts: list[int], probs: list[float]) -> tuple[float, int]:
    n = sum(counts)
    support = [i for i, p in enumerate(probs) if p > 0]
    stat = sum((counts[i] - n * probs[i]) ** 2 / (n * probs[i]) for i in support)
    return stat, len(support) - 1


CASES = {
    "T=0.7": dict(temperature=0.7),
    "T=1.5": dict(temperature=1.5),
    "top_k=5": dict(temperature=1.0, top_k=5),
    "top_p=0.75": dict(temperature=1.0, top_p=0.75),
    "min_p=0.1": dict(temperature=1.0, min_p=0.1),
    "T=0.7,top_k=5": dict(temperature=0.7, top_k=5),
    "T=0.7,top_p=0.8": dict(temperature=0.7, top_p=0.8),
    "T=0.7,min_p=0.05,top_k=8,top_p=0.93": dict(temperature=0.7, min_p=0.05, top_k=8, top_p=0.93),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_draws_follow_the_defined_distribution(name):
    kw = CASES[name]
    probs = expected(LOGITS, **kw)
    counts = draw(SamplingParams(**kw))
    removed = [i for i, p in enumerate(probs) if p == 0]
    assert all(counts[i] == 0 for i in removed), f"{name}: drew removed tokens {counts}"
    stat, df = chi_square(counts, probs)
    assert df >= 2, name  # every case keeps several tokens, so the comparison has power
    assert stat < CHI2_CRITICAL[df - 1], f"{name}: chi2={stat:.1f} (df={df}) counts={counts} probs={probs}"


def test_the_test_rejects_a_wrong_temperature():
    """Power check: the draws at T=0.7 are far outside the threshold for T=1/0.7's distribution."""
    counts = draw(SamplingParams(temperature=0.7), n=4000)
    stat, df = chi_square(counts, expected(LOGITS, temperature=1 / 0.7))
    assert stat > 10 * CHI2_CRITICAL[df - 1]


def test_boundaries_of_the_cases_are_not_ties():
    """The top-p / min-p cut-offs of the cases fall strictly between tokens, so rounding cannot move them."""
    for name, kw in CASES.items():
        z = [x / kw["temperature"] for x in LOGITS]
        e = [math.exp(x - max(z)) for x in z]
        p = sorted((x / sum(e) for x in e), reverse=True)
        if kw.get("min_p"):
            assert all(abs(x / p[0] - kw["min_p"]) > 5e-3 for x in p), name
        if kw.get("top_p", 1.0) < 1.0:
            kept = [x for x in p if x >= kw.get("min_p", 0) * p[0]][:kw.get("top_k") or None]
            cums = [sum(kept[:i + 1]) / sum(kept) for i in range(len(kept))]
            assert all(abs(c - kw["top_p"]) > 5e-3 for c in cums), name
