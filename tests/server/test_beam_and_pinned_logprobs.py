"""use_beam_search and logprob_token_ids (issue 18, item 3) as a client sees them: the openai client against the
shared GLM-5 server. Beam results are checked against the server's own greedy answers, its top logprobs and an
independent re-scoring of each beam (echo + logprobs), not against a second beam search."""
from __future__ import annotations

import math

import openai
import pytest

from tests.server.conftest import MODEL

PROMPT = [11, 57, 203, 9, 140, 33]
AS_IDS = {"return_tokens_as_token_ids": True}


def _id(key: str) -> int:
    return int(key.removeprefix("token_id:"))


def _beam(client, n: int, max_tokens: int, **extra):
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, n=n, extra_body={
        "use_beam_search": True, "ignore_eos": True, "return_token_ids": True, **extra})


def test_one_beam_is_greedy(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.0,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    beam = _beam(client, 1, 8, temperature=0.0)
    assert beam.choices[0].model_extra["token_ids"] == greedy.choices[0].model_extra["token_ids"]
    assert beam.choices[0].text == greedy.choices[0].text


def test_one_step_beams_are_the_top_tokens(client):
    top = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0.0, logprobs=5,
                                    extra_body=AS_IDS)
    ranked = sorted(top.choices[0].logprobs.top_logprobs[0].items(), key=lambda kv: -kv[1])
    beams = _beam(client, 4, 1, temperature=0.0)
    assert [c.model_extra["token_ids"][0] for c in beams.choices] == [_id(k) for k, _ in ranked[:4]]
    assert [c.index for c in beams.choices] == [0, 1, 2, 3]


def test_beams_are_distinct_ranked_and_scored_exactly(client):
    beams = _beam(client, 3, 5, temperature=0.0, length_penalty=1.0)
    seqs = [c.model_extra["token_ids"] for c in beams.choices]
    assert len(seqs) == 3 and len({tuple(s) for s in seqs}) == 3 and all(len(s) == 5 for s in seqs)
    assert beams.usage.completion_tokens == 15
    totals = []
    for seq in seqs:  # re-score each beam through the prompt-logprob path: the sum of its tokens' logprobs
        echo = client.completions.create(model=MODEL, prompt=PROMPT + seq, max_tokens=0, echo=True, logprobs=0,
                                         extra_body=AS_IDS)
        totals.append(sum(echo.choices[0].logprobs.token_logprobs[len(PROMPT):]))
    # Equal lengths: the length penalty divides every score alike, so the order is the order of the sums.
    assert totals == sorted(totals, reverse=True)
    shown = _beam(client, 3, 5, temperature=0.0, logprobs=2, **AS_IDS)
    for choice, total in zip(shown.choices, totals):
        lp = choice.logprobs
        assert [_id(t) for t in lp.tokens] == choice.model_extra["token_ids"]
        assert math.isclose(sum(lp.token_logprobs), total, abs_tol=1e-3)
        assert all(_id(next(iter(top))) == _id(t) and len(top) <= 3 for top, t in zip(lp.top_logprobs, lp.tokens))


def test_beam_search_streams_and_chats(client):
    whole = _beam(client, 2, 4, temperature=0.0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, stream=True,
                                            extra_body={"use_beam_search": True, "ignore_eos": True,
                                                        "temperature": 0.0}))
    texts = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert texts == {c.index: c.text for c in whole.choices}
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=4, n=2, temperature=0.0, extra_body={
                                              "use_beam_search": True, "ignore_eos": True,
                                              "chat_template_kwargs": {"enable_thinking": False}})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8
    assert all(c.finish_reason == "length" for c in chat.choices)


@pytest.mark.parametrize("extra,param", [
    ({"logprob_token_ids": [3]}, "logprob_token_ids"),
    ({"response_format": {"type": "json_object"}}, "use_beam_search"),
    ({"n": 11}, "n"),  # 22 candidates per beam > --max-logprobs 20
])
def test_beam_search_refusals_name_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=1,
                                  extra_body={"use_beam_search": True, **extra})
    assert e.value.body["param"] == param


# ---------------------------------------------------------------- logprob_token_ids
def test_completion_logprob_token_ids_replace_the_top_ones(client):
    top = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0.0, logprobs=5,
                                    extra_body={"ignore_eos": True, **AS_IDS})
    first = {_id(k): v for k, v in top.choices[0].logprobs.top_logprobs[0].items()}
    pinned = sorted(first)[:3] + [0]  # three of the top five, and token 0 (most likely outside them)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0.0, logprobs=1,
                                    extra_body={"ignore_eos": True, "logprob_token_ids": pinned, **AS_IDS})
    lp = out.choices[0].logprobs
    assert lp.tokens == top.choices[0].logprobs.tokens
    for step, (token, shown) in enumerate(zip(lp.tokens, lp.top_logprobs)):
        assert set(map(_id, shown)) == set(pinned) | {_id(token)}  # the sampled token and every pinned one
    got = {_id(k): v for k, v in lp.top_logprobs[0].items()}
    for tid in pinned[:3]:
        assert math.isclose(got[tid], first[tid], abs_tol=1e-4)
    if 0 not in first:
        assert got[0] <= min(first.values()) + 1e-4


def test_chat_logprob_token_ids_streamed_and_whole(client):
    body = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4, temperature=0.0,
                logprobs=True, extra_body={"logprob_token_ids": [7, 8, 9], "ignore_eos": True,
                                           "chat_template_kwargs": {"enable_thinking": False}, **AS_IDS})
    whole = client.chat.completions.create(**body).choices[0].logprobs.content
    assert len(whole) == 4
    for item in whole:
        assert {_id(t.token) for t in item.top_logprobs} == {7, 8, 9, _id(item.token)}
        assert item.top_logprobs[0].token == item.token
    streamed = [item for c in client.chat.completions.create(**body, stream=True)
                for ch in c.choices if ch.logprobs for item in ch.logprobs.content]
    assert [(i.token, round(i.logprob, 4), [(t.token, round(t.logprob, 4)) for t in i.top_logprobs])
            for i in streamed] == [(i.token, round(i.logprob, 4), [(t.token, round(t.logprob, 4))
                                                                   for t in i.top_logprobs]) for i in whole]
    off = client.chat.completions.create(**{**body, "logprobs": False})
    assert off.choices[0].logprobs is None  # the logprobs switch is still what asks for them


@pytest.mark.parametrize("extra,kwargs", [
    ({"logprob_token_ids": [10 ** 7]}, {"max_tokens": 2}),
    ({"logprob_token_ids": [-1]}, {"max_tokens": 2}),
    ({"logprob_token_ids": [5]}, {"max_tokens": 0, "echo": True}),  # nothing generated to report them on
])
def test_logprob_token_ids_refusals(client, extra, kwargs):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, logprobs=1, extra_body=extra, **kwargs)
    assert e.value.body["param"] == "logprob_token_ids"
