"""BeamSearch, the state machine, on a made-up model: a table of next-token logprobs per prefix, so every score
below is worked out by hand."""
from __future__ import annotations

import math

import pytest

from glm5_ascend.engine.beam_search import BeamSearch, BeamSearchParams, beam_score
from glm5_ascend.engine.sequence import CompletionOutput, Logprob, RequestOutput

EOS = 2
PROMPT = [100]
# next-token probabilities after each generated prefix
TABLE = {
    (): {5: 0.5, EOS: 0.3, 6: 0.2},
    (5,): {7: 0.9, EOS: 0.1},
    (6,): {EOS: 1.0},
    (5, 7): {EOS: 0.6, 8: 0.4},
    (5, 8): {EOS: 1.0},
    (5, 7, 8): {EOS: 1.0},
}


def _output(prefix: tuple) -> RequestOutput:
    probs = TABLE.get(prefix, {EOS: 1.0})
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    entry = {t: Logprob(math.log(p), r) for r, (t, p) in enumerate(ranked, start=1)}
    return RequestOutput("x", None, [], [CompletionOutput(0, "", [ranked[0][0]], None, [entry])], True)


def _run(params: BeamSearchParams) -> BeamSearch:
    search = BeamSearch(PROMPT, params, {EOS})
    while not search.done:
        search.advance([_output(tuple(b.tokens[len(PROMPT):])) for b in search.live])
    return search


def test_score_counts_the_prompt_and_not_a_final_eos():
    assert beam_score([1, 2, 3], -3.0, {9}, 1.0) == -1.0
    assert beam_score([1, 2, 9], -3.0, {9}, 1.0) == -1.5
    assert beam_score([1, 2, 3], -4.0, {9}, 2.0) == pytest.approx(-4.0 / 9)


def test_two_beams_finish_on_eos_and_rank_by_normalised_score():
    search = _run(BeamSearchParams(beam_width=2, max_tokens=4))
    outs = search.outputs(lambda ids: " ".join(map(str, ids)))
    # candidates: [EOS] p=.3 (len 1 -> score ln .3 / 1), [5 7 EOS] p=.27 (ln .27 / 3), [5 EOS] .05, [6 EOS] .2 ...
    best = sorted([((5, 7, EOS), 0.5 * 0.9 * 0.6), ((EOS,), 0.3), ((5, 7, 8, EOS), 0.5 * 0.9 * 0.4),
                   ((6, EOS), 0.2), ((5, EOS), 0.05)],
                  key=lambda sp: -math.log(sp[1]) / (len(PROMPT) + len(sp[0]) - 1))
    assert [tuple(o.token_ids) for o in outs] == [best[0][0][:-1], best[1][0][:-1]]  # the EOS is not listed
    for o, (ids, p) in zip(outs, best):
        assert o.cumulative_logprob == pytest.approx(math.log(p))  # but its logprob counts
        assert o.finish_reason == "stop" and o.stop_reason == EOS
        assert o.text == " ".join(map(str, ids[:-1]))  # nor shown
        assert [next(iter(e)) for e in o.logprobs] == list(ids)  # each step's entry starts with its own token
    assert [o.index for o in outs] == [0, 1]


def test_length_penalty_zero_ranks_by_total_logprob():
    outs = _run(BeamSearchParams(beam_width=1, max_tokens=4, length_penalty=0.0)).outputs(None)
    assert outs[0].token_ids == [] and outs[0].cumulative_logprob == pytest.approx(math.log(0.3))  # EOS at once


def test_ignore_eos_and_include_stop_str():
    outs = _run(BeamSearchParams(beam_width=1, max_tokens=3, ignore_eos=True)).outputs(str)
    assert len(outs[0].token_ids) == 3 and outs[0].finish_reason == "length" and outs[0].stop_reason is None
    shown = _run(BeamSearchParams(beam_width=1, max_tokens=4, include_stop_str_in_output=True)).outputs(str)
    assert shown[0].token_ids == [5, 7, 8, EOS] and shown[0].text == str([5, 7, 8])  # listed, never shown


def test_bad_params_and_output_counts_are_refused():
    with pytest.raises(ValueError, match="n >= 1"):
        BeamSearchParams(beam_width=0, max_tokens=3)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=1, max_tokens=0)
    search = BeamSearch(PROMPT, BeamSearchParams(beam_width=2, max_tokens=3), {EOS})
    with pytest.raises(ValueError, match="2 outputs for 1 beams"):
        search.advance([_output(()), _output(())])
