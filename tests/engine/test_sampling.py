"""Sampler and stop semantics through the public LLM API on the tiny model."""
from __future__ import annotations

import math

import pytest

from glm5_ascend import LLM, SamplingParams
from tests.conftest import TEST_DEVICE


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, device=TEST_DEVICE, block_size=16, seed=0)


PROMPT = {"prompt_token_ids": list(range(40, 90))}


def _one(llm, **kw):
    return llm.generate([PROMPT], SamplingParams(**kw))[0]


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm):
    a = _one(llm, temperature=1.0, seed=11, max_tokens=16, ignore_eos=True).outputs[0].token_ids
    b = _one(llm, temperature=1.0, seed=11, max_tokens=16, ignore_eos=True).outputs[0].token_ids
    c = _one(llm, temperature=1.0, seed=12, max_tokens=16, ignore_eos=True).outputs[0].token_ids
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_equal_greedy(llm):
    greedy = _one(llm, temperature=0, max_tokens=10, ignore_eos=True).outputs[0].token_ids
    assert _one(llm, temperature=1.0, top_k=1, seed=1, max_tokens=10, ignore_eos=True).outputs[0].token_ids == greedy
    assert _one(llm, temperature=1.0, top_p=1e-6, seed=2, max_tokens=10, ignore_eos=True).outputs[0].token_ids == greedy
    assert _one(llm, temperature=1.0, min_p=1.0, seed=3, max_tokens=10, ignore_eos=True).outputs[0].token_ids == greedy


def test_n_choices_and_logprobs(llm):
    out = _one(llm, n=3, temperature=1.0, seed=5, max_tokens=8, logprobs=4, ignore_eos=True)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) == 8
        for tok, entry in zip(c.token_ids, c.logprobs):
            assert tok in entry and 4 <= len(entry) <= 5
            ranks = sorted(lp.rank for t, lp in entry.items() if t != tok or lp.rank <= 4)
            assert ranks[:4] == [1, 2, 3, 4]
        assert abs(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)) - c.cumulative_logprob) < 1e-4


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    greedy = _one(llm, temperature=0, max_tokens=10, ignore_eos=True).outputs[0]
    target = greedy.token_ids[3]
    first = greedy.token_ids.index(target)
    out = _one(llm, temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[target]).outputs[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", target)
    late = _one(llm, temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[target], min_tokens=10).outputs[0]
    assert len(late.token_ids) == 10 and target not in late.token_ids and late.finish_reason == "length"


def test_stop_strings_truncate_text(llm):
    greedy = _one(llm, temperature=0, max_tokens=20, ignore_eos=True).outputs[0]
    text = greedy.text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2])
    cut = text.index(stop)
    out = _one(llm, temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]).outputs[0]
    assert out.text == text[:cut] and (out.finish_reason, out.stop_reason) == ("stop", stop)
    inc = _one(llm, temperature=0, max_tokens=20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert inc.outputs[0].text == text[:cut + len(stop)]


def test_penalties_change_the_distribution(llm):
    def repeats(tokens):
        return len(tokens) - len(set(tokens))

    base = _one(llm, temperature=0, max_tokens=80, ignore_eos=True).outputs[0].token_ids
    assert repeats(base) > 0  # 80 tokens from a 278-token vocabulary: the greedy path repeats itself
    for kw in (dict(repetition_penalty=2.0), dict(frequency_penalty=2.0), dict(presence_penalty=2.0)):
        penalized = _one(llm, temperature=0, max_tokens=80, ignore_eos=True, **kw).outputs[0].token_ids
        assert repeats(penalized) < repeats(base), kw


def test_eos_stops_unless_ignored(llm):
    eos = 256  # <|endoftext|> of the tiny tokenizer
    out = _one(llm, temperature=0, max_tokens=5, logit_bias={eos: 100.0}).outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason is None and out.text == ""
    shown = _one(llm, temperature=0, max_tokens=5, logit_bias={eos: 100.0}, skip_special_tokens=False).outputs[0]
    assert shown.token_ids == [eos] and shown.text == ""  # the ending token's text is never shown
    out = _one(llm, temperature=0, max_tokens=5, logit_bias={eos: 100.0}, ignore_eos=True).outputs[0]
    assert out.token_ids == [eos] * 5 and out.finish_reason == "length"


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-5), "top_k"),
    (dict(n=0), "n must"), (dict(max_tokens=0), "max_tokens"), (dict(min_p=2), "min_p"),
    (dict(logprobs=-2), "logprobs"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=["a", ""]), "empty string"),
])
def test_invalid_sampling_params_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_bad_prompts_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate([{"prompt_token_ids": [1, 2, 10**6]}])
    with pytest.raises(ValueError, match="longer than the maximum model length"):
        llm.generate([{"prompt_token_ids": [5] * llm.llm_engine.max_model_len}])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}])
    assert not llm.llm_engine.has_unfinished_requests()  # nothing half-queued


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    tok = llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids, skip_special_tokens=False) == "[gMASK]<sop><|user|>Hi<|assistant|><think>"
    assert len(out.outputs[0].token_ids) == 3


def test_numpy_token_ids_decoded_tokens_and_cumulative_logprob(llm):
    import numpy as np
    ids = np.arange(40, 60, dtype=np.int64)
    a = llm.generate([{"prompt_token_ids": list(ids)}], SamplingParams(temperature=0, max_tokens=4, logprobs=2))[0]
    b = llm.generate([{"prompt_token_ids": ids.tolist()}], SamplingParams(temperature=0, max_tokens=4))[0]
    assert a.prompt_token_ids == ids.tolist() and a.outputs[0].token_ids == b.outputs[0].token_ids
    tok = llm.get_tokenizer()
    for entry in a.outputs[0].logprobs:
        assert all(lp.decoded_token == tok.decode([t], skip_special_tokens=False) for t, lp in entry.items())
    assert a.outputs[0].cumulative_logprob is not None and b.outputs[0].cumulative_logprob is None
    with pytest.raises(ValueError, match="must be integers"):
        llm.generate([{"prompt_token_ids": [1.5, 2]}])


def test_prompt_forms_of_generate_agree(llm):
    """Dict prompts, bare token-id lists (one or several) and older vLLM's prompt_token_ids= keyword."""
    p = SamplingParams(temperature=0, max_tokens=3)
    ids = list(range(40, 50))
    want = llm.generate({"prompt_token_ids": ids}, p)[0].outputs[0].token_ids
    assert llm.generate(ids, p)[0].outputs[0].token_ids == want
    assert [o.outputs[0].token_ids for o in llm.generate([ids, ids], p)] == [want, want]
    assert llm.generate(prompt_token_ids=[ids], sampling_params=p)[0].outputs[0].token_ids == want


def test_max_logprobs_caps_requests_and_minus_one_means_the_vocabulary(llm):
    """vLLM's contract: the cap is the engine's (--max-logprobs, default 20; -1 no cap), not SamplingParams'."""
    prompt = [{"prompt_token_ids": [5, 6, 7, 8]}]
    with pytest.raises(ValueError, match="Requested sample logprobs of 21, which is greater than max allowed: 20"):
        llm.generate(prompt, SamplingParams(max_tokens=2, logprobs=21))
    vocab = llm.llm_engine.config.model.vocab_size
    with pytest.raises(ValueError, match=f"Requested prompt logprobs of {vocab}, which is greater than max allowed"):
        llm.generate(prompt, SamplingParams(max_tokens=2, prompt_logprobs=-1))
    uncapped = LLM(llm.llm_engine.config.model_path, device=TEST_DEVICE, max_logprobs=-1, max_num_seqs=2, seed=0)
    assert uncapped.llm_engine.config.max_logprobs == vocab
    out = uncapped.generate(prompt, SamplingParams(temperature=0, max_tokens=2, logprobs=-1, prompt_logprobs=-1))[0]
    for entry in out.outputs[0].logprobs:
        assert len(entry) == vocab
        assert abs(sum(math.exp(e.logprob) for e in entry.values()) - 1) < 1e-3  # the whole distribution
    assert all(len(e) == vocab for e in out.prompt_logprobs[1:])
    with pytest.raises(ValueError, match="--max-logprobs -2 must be >= 0, or -1"):
        LLM(max_logprobs=-2)
