"""SamplingParams validation at each rule's boundary: the last valid value passes, the first invalid
one fails naming the parameter (the mutation run found boundaries no test checked)."""
from __future__ import annotations

import pytest

from glm5_ascend import SamplingParams

VALID = [
    dict(n=1), dict(presence_penalty=-2.0), dict(presence_penalty=2.0), dict(frequency_penalty=-2.0),
    dict(frequency_penalty=2.0), dict(repetition_penalty=1e-6), dict(repetition_penalty=2.0 ** 31),
    dict(temperature=0.0), dict(top_p=1.0), dict(top_p=1e-9), dict(top_k=0), dict(top_k=-1), dict(top_k=1),
    dict(min_p=0.0), dict(min_p=1.0), dict(max_tokens=1), dict(max_tokens=None), dict(min_tokens=0),
    dict(min_tokens=3, max_tokens=3), dict(min_tokens=5, max_tokens=None), dict(logprobs=0), dict(logprobs=-1), dict(logprobs=10**6),
    dict(prompt_logprobs=0), dict(prompt_logprobs=-1), dict(seed=0), dict(stop="x"), dict(stop_token_ids=[0]),
    dict(allowed_token_ids=[0]), dict(logprob_token_ids=[]), dict(logprob_token_ids=[0, 7]),
]

INVALID = [
    (dict(n=0), "n must"), (dict(n=1.0), "n must"), (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(presence_penalty=2.01), "presence_penalty"), (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(frequency_penalty=2.01), "frequency_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=2.0 ** 31 + 1), "repetition_penalty"), (dict(temperature=-1e-9), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.0001), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(top_k=1.5), "top_k"), (dict(min_p=-1e-9), "min_p"), (dict(min_p=1.0001), "min_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.0), "max_tokens"), (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=1.0), "min_tokens"), (dict(min_tokens=4, max_tokens=3), "min_tokens"),
    (dict(logprobs=-2), "logprobs must be non-negative or -1"), (dict(prompt_logprobs=-2), "prompt_logprobs"), (dict(logprobs=1.0), "logprobs"), (dict(seed=1.5), "seed"),
    (dict(stop=[""]), "empty string"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(logprob_token_ids=[-1]), "logprob_token_ids"),
    (dict(logprob_token_ids=[1.0]), "logprob_token_ids"), (dict(logprob_token_ids=(1, 2)), "logprob_token_ids"),
    (dict(logprob_token_ids=[3, -2]), "logprob_token_ids"),
]


@pytest.mark.parametrize("kw", VALID, ids=str)
def test_boundary_values_are_accepted(kw):
    p = SamplingParams(**kw)
    for k, v in kw.items():
        if k == "stop":
            assert p.stop == [v]
        elif k == "top_k" and v == -1:
            assert p.top_k == 0  # -1 means all tokens, stored as 0
        else:
            assert getattr(p, k) == v


@pytest.mark.parametrize("kw, name", INVALID, ids=str)
def test_first_invalid_values_are_refused(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def test_normalisation():
    p = SamplingParams(stop=None, stop_token_ids=None, logit_bias={"5": 1})
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias == {5: 1.0}
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=1e-5).greedy
    assert SamplingParams(temperature=0.5).clone(n=3).n == 3
