"""What each engine step shows of a request: never text that the final answer takes back.

A streamed client appends every step's new text. A stop string that spans several tokens is
recognised only when its last token arrives, so the text of its first tokens must be held back
until then; else a client has already shown text that the final answer cuts.
"""
from __future__ import annotations

import pytest

from glm5_ascend import LLM, SamplingParams
from tests.conftest import TEST_DEVICE

PROMPT = list(range(40, 90))


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, device=TEST_DEVICE, block_size=16, seed=0)


def _steps(llm, params: SamplingParams, rid: str) -> list:
    """Every RequestOutput the engine produces for one request, step by step."""
    eng = llm.llm_engine
    eng.add_request(rid, PROMPT, params)
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.request_id == rid]
    return outs


def _printable_stop(text: str, length: int, start: int = 3) -> str:
    return next(text[i:i + length] for i in range(start, len(text) - length)
                if text[i:i + length].isprintable() and "\ufffd" not in text[i:i + length])


@pytest.mark.parametrize("stop_len", [2, 3])
def test_no_step_shows_text_the_stop_string_removes(llm, stop_len):
    free = llm.generate([{"prompt_token_ids": PROMPT}],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    stop = _printable_stop(free.text, stop_len)
    cut = free.text.index(stop)
    # a longer stop string that never matches sets how much is held back; the short one ends the text
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "\x7f" * 5])
    outs = _steps(llm, params, f"hold-{stop_len}")
    final = outs[-1].outputs[0]
    assert final.text == free.text[:cut] and (final.finish_reason, final.stop_reason) == ("stop", stop)
    # one token is one character with the tiny byte-level tokenizer: the stop string spanned steps
    assert len(outs) > 1 and len(final.token_ids) >= cut + stop_len
    for o in outs:
        shown = o.outputs[0].text
        assert final.text.startswith(shown), (shown, final.text)


def test_text_grows_monotonically_and_reaches_the_end(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["\x7f\x7f\x7f"])
    outs = _steps(llm, params, "grow")
    texts = [o.outputs[0].text for o in outs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    free = llm.generate([{"prompt_token_ids": PROMPT}],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert texts[-1] == free.text and outs[-1].outputs[0].finish_reason == "length"  # nothing held at the end
