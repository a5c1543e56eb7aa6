"""Streamed responses of the real server against the whole ones, for the cases that differ.

- stop strings: no streamed chunk carries text that the final answer does not have;
- n > 1 with choices that finish on different steps: exactly one finish chunk per choice;
- prompt logprobs (echo, prompt_logprobs) equal the offline engine's and transformers' log-softmax.
"""
from __future__ import annotations

import pytest
import torch

from tests.server.conftest import sse_events

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
PROMPT_IDS = list(range(40, 80))


def _stream(http, path: str, req: dict) -> list[dict]:
    with http.stream("POST", path, json={**req, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    return events[:-1]


def _printable_stop(text: str, length: int = 2) -> str:
    return next(text[i:i + length] for i in range(3, len(text) - length)
                if text[i:i + length].isprintable() and "\ufffd" not in text[i:i + length])


# ------------------------------------------------------------------ stop strings
def test_completion_stream_never_shows_text_the_stop_cuts(http):
    base = {"prompt": PROMPT_IDS, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    free = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = _printable_stop(free, 2)
    req = {**base, "stop": [stop]}
    whole = http.post("/v1/completions", json=req).json()["choices"][0]
    assert whole["text"] == free[:free.index(stop)] and whole["stop_reason"] == stop
    shown = ""
    for chunk in _stream(http, "/v1/completions", req):
        for c in chunk["choices"]:
            shown += c["text"]
            assert whole["text"].startswith(shown), (shown, whole["text"])
    assert shown == whole["text"]


def test_chat_stream_never_shows_text_the_stop_cuts(http):
    base = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 32, "temperature": 0,
            "ignore_eos": True, **NO_THINK}
    free = http.post("/v1/chat/completions", json=base).json()["choices"][0]["message"]["content"]
    stop = _printable_stop(free, 2)
    req = {**base, "stop": stop}
    whole = http.post("/v1/chat/completions", json=req).json()["choices"][0]
    assert whole["message"]["content"] == free[:free.index(stop)] and whole["finish_reason"] == "stop"
    shown = ""
    for chunk in _stream(http, "/v1/chat/completions", req):
        for c in chunk["choices"]:
            shown += c["delta"].get("content") or ""
            assert whole["message"]["content"].startswith(shown), (shown, whole["message"]["content"])
    assert shown == whole["message"]["content"]


# ------------------------------------------------------------------ n > 1, staggered finishes
# About a third of the vocabulary ends a choice: with sampling, the 4 choices end on different steps.
STAGGERED = {"n": 4, "temperature": 1.0, "seed": 7, "max_tokens": 40, "ignore_eos": True,
             "stop_token_ids": list(range(0, 256, 3))}


def _finish_counts(chunks: list[dict]) -> tuple[dict, dict]:
    finishes, tokens = {}, {}
    for chunk in chunks:
        for c in chunk["choices"]:
            i = c["index"]
            tokens[i] = tokens.get(i, 0) + len(c.get("token_ids") or [])
            if c["finish_reason"] is not None:
                finishes[i] = finishes.get(i, 0) + 1
    return finishes, tokens


def test_completion_n_staggered_finishes_one_finish_chunk_each(http):
    req = {"prompt": PROMPT_IDS, "return_token_ids": True, **STAGGERED}
    whole = http.post("/v1/completions", json=req).json()["choices"]
    lengths = sorted(len(c["token_ids"]) for c in whole)
    assert len(set(lengths)) > 1 and lengths[0] < 40, lengths  # the choices end on different steps
    finishes, tokens = _finish_counts(_stream(http, "/v1/completions", req))
    assert finishes == {0: 1, 1: 1, 2: 1, 3: 1}
    assert tokens == {c["index"]: len(c["token_ids"]) for c in whole}


def test_chat_n_staggered_finishes_one_finish_chunk_each(http):
    req = {"messages": [{"role": "user", "content": "four ways"}], "return_token_ids": True, **STAGGERED,
           **NO_THINK}
    whole = http.post("/v1/chat/completions", json=req).json()["choices"]
    lengths = sorted(len(c["token_ids"]) for c in whole)
    assert len(set(lengths)) > 1 and lengths[0] < 40, lengths
    finishes, _ = _finish_counts(_stream(http, "/v1/chat/completions", req))
    assert finishes == {0: 1, 1: 1, 2: 1, 3: 1}
    # (chat streams drop the token_ids of a step whose text is held back, e.g. half a UTF-8
    # character, so streamed token_ids need not add up to the whole answer's: not asserted here)


# ------------------------------------------------------------------ prompt logprobs
@pytest.fixture(scope="module")
def hf_prompt_logprobs(tiny_model_dir):
    """transformers' log-softmax of the served tiny checkpoint: row j-1 scores prompt token j."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT_IDS])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[j - 1, PROMPT_IDS[j]]) for j in range(1, len(PROMPT_IDS))], lp


@pytest.fixture(scope="module")
def offline_prompt_logprobs(tiny_model_dir):
    from glm5_ascend import LLM, SamplingParams
    from tests.conftest import TEST_DEVICE
    llm = LLM(tiny_model_dir, device=TEST_DEVICE, block_size=16, seed=0)
    out = llm.generate([{"prompt_token_ids": PROMPT_IDS}], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    return out.prompt_logprobs


def test_echo_logprobs_equal_offline_and_transformers(http, hf_prompt_logprobs, offline_prompt_logprobs):
    hf, _ = hf_prompt_logprobs
    body = http.post("/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 1, "echo": True, "logprobs": 1,
                                              "temperature": 0}).json()
    lps = body["choices"][0]["logprobs"]["token_logprobs"]
    assert lps[0] is None and len(lps) == len(PROMPT_IDS) + 1
    offline = [offline_prompt_logprobs[j][PROMPT_IDS[j]].logprob for j in range(1, len(PROMPT_IDS))]
    assert lps[1:len(PROMPT_IDS)] == pytest.approx(offline, abs=1e-5)
    assert lps[1:len(PROMPT_IDS)] == pytest.approx(hf, abs=1e-3)
    scored = http.post("/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 0, "echo": True,
                                                "logprobs": 0}).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert scored[0] is None and scored[1:] == pytest.approx(hf, abs=1e-3)  # lm-eval's scoring request


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_equal_offline_and_transformers(http, hf_prompt_logprobs, offline_prompt_logprobs, path):
    hf, lp = hf_prompt_logprobs
    if path == "/v1/completions":
        req = {"prompt": PROMPT_IDS, "max_tokens": 1, "prompt_logprobs": 2}
        body = http.post(path, json=req).json()
        entries = body["choices"][0]["prompt_logprobs"]
    else:  # chat renders its own prompt: compare with the offline engine on the same ids
        req = {"messages": [{"role": "user", "content": "score"}], "max_tokens": 1, "prompt_logprobs": 2, **NO_THINK}
        body = http.post(path, json=req).json()
        ids = http.post("/tokenize", json={"messages": req["messages"], **NO_THINK}).json()["tokens"]
        entries = body["prompt_logprobs"]
        assert entries[0] is None and len(entries) == len(ids)
        assert all(str(ids[j]) in entries[j] for j in range(1, len(ids)))
        return
    assert entries[0] is None and len(entries) == len(PROMPT_IDS)
    for j in range(1, len(PROMPT_IDS)):
        tid = PROMPT_IDS[j]
        got = entries[j]
        assert got[str(tid)]["logprob"] == pytest.approx(offline_prompt_logprobs[j][tid].logprob, abs=1e-5)
        assert got[str(tid)]["logprob"] == pytest.approx(hf[j - 1], abs=1e-3)
        assert got[str(tid)]["rank"] == int((lp[j - 1] > lp[j - 1, tid]).sum()) + 1
        top2 = lp[j - 1].topk(2)
        for rank, (t, v) in enumerate(zip(top2.indices.tolist(), top2.values.tolist()), start=1):
            assert got[str(t)]["logprob"] == pytest.approx(v, abs=1e-3)
            assert got[str(t)]["rank"] == rank or t == tid
