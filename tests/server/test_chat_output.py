"""Chat output assembly on synthetic GLM-5 model text, through the same code the server runs.

The random tiny model never writes tool calls or </think> on purpose, so a fake engine replays
chosen text token by token (or several tokens per output) into ChatServing and the app; the
checks are on exactly what a client receives.
"""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from glm5_ascend.engine.async_engine import EngineError
from glm5_ascend.engine.sequence import CompletionOutput, RequestOutput
from glm5_ascend.server import protocol as P
from glm5_ascend.server.api_server import build_app
from glm5_ascend.server.metrics import Metrics
from glm5_ascend.server.serving_chat import ChatServing
from glm5_ascend.server.serving_tokens import ServingContext
from tests.server.conftest import sse_events

OBSERVATION = "<|observation|>"  # an EOS token of GLM-5: the model hands over to the tool
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALL = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>")


class FakeEngine:
    """Replays a fixed model text as cumulative RequestOutputs; optionally fails midway."""

    errored = False

    def __init__(self, tokenizer, text: str, eos: str | None = OBSERVATION, group: int = 1,
                 fail_after: int | None = None, seed: int = 0):
        self.tok, self.text, self.eos, self.group = tokenizer, text, eos, group
        self.fail_after, self.rng = fail_after, random.Random(seed)

    async def generate(self, prompt_ids, params, request_id, prompt=None):
        ids = self.tok.encode(self.text, add_special_tokens=False)
        if self.eos:
            ids.append(self.tok.convert_tokens_to_ids(self.eos))
        k, steps = 0, 0
        while k < len(ids):
            k = min(len(ids), k + (self.rng.randint(1, self.group) if self.group > 1 else 1))
            steps += 1
            if self.fail_after is not None and steps > self.fail_after:
                raise EngineError("the engine failed while running this request: boom")
            done = k == len(ids)
            # Like the engine: every token is decoded (specials too, when not skipped) except the
            # EOS that ends the sequence, whose text vLLM never shows.
            shown = ids[:k - 1] if done and self.eos else ids[:k]
            text = self.tok.decode(shown, skip_special_tokens=params.skip_special_tokens)
            outs = [CompletionOutput(i, text, ids[:k], None, None, "stop" if done else None)
                    for i in range(params.n)]
            yield RequestOutput(request_id, prompt, list(prompt_ids), outs, done)
            await asyncio.sleep(0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_ctx(tokenizer, engine, **kw) -> ServingContext:
    base = dict(engine=engine, tokenizer=tokenizer, served_names=["glm-5"], model_path="/m", max_model_len=4096,
                vocab_size=288, kv_capacity_tokens=1 << 20, chat_template=tokenizer.chat_template,
                tool_parser="glm47", reasoning_parser="glm45", enable_auto_tool_choice=True)
    return ServingContext(**{**base, **kw})


def chat_request(**kw) -> P.ChatCompletionRequest:
    return P.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "weather?"}],
                                                   "max_tokens": 50, **kw})


def run_full(tokenizer, text, group=1, **kw) -> dict:
    serving = ChatServing(make_ctx(tokenizer, FakeEngine(tokenizer, text, group=group)))
    body = asyncio.run(serving.full(chat_request(**kw), "chatcmpl-x", "glm-5"))
    P.ChatCompletionResponse.model_validate(body)
    return body["choices"][0]


def run_stream(tokenizer, text, group=1, seed=0, **kw) -> list[dict]:
    serving = ChatServing(make_ctx(tokenizer, FakeEngine(tokenizer, text, group=group, seed=seed)))

    async def collect():
        events = await serving.stream(chat_request(stream=True, **kw), "chatcmpl-x", "glm-5")
        return [json.loads(e[len("data: "):]) async for e in events]

    chunks = asyncio.run(collect())
    for c in chunks:
        P.ChatCompletionChunk.model_validate(c)
    return chunks


def assemble(chunks: list[dict]) -> dict:
    """What a streaming client reconstructs: content, reasoning, tool calls, finish reasons."""
    out = {"content": "", "reasoning": "", "calls": {}, "finish": [], "role": None}
    for c in chunks:
        for ch in c["choices"]:
            d = ch["delta"]
            out["role"] = out["role"] or d.get("role")
            out["content"] += d.get("content") or ""
            out["reasoning"] += d.get("reasoning") or ""
            assert d.get("reasoning") == d.get("reasoning_content")
            for tc in d.get("tool_calls") or []:
                call = out["calls"].setdefault(tc["index"], {"deltas": 0, "arguments": ""})
                if call["deltas"] == 0:  # the first delta of a call names it
                    assert tc["id"].startswith("chatcmpl-tool-") and tc["type"] == "function"
                    call["name"] = tc["function"]["name"]
                else:
                    assert "id" not in tc and "name" not in tc["function"]
                call["deltas"] += 1
                call["arguments"] += tc["function"].get("arguments", "")
            if ch["finish_reason"]:
                out["finish"].append(ch["finish_reason"])
    return out


NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def test_tool_call_full(tokenizer):
    c = run_full(tokenizer, "Let me check." + CALL, tools=TOOLS, **NO_THINK)
    msg = c["message"]
    assert c["finish_reason"] == "tool_calls" and msg["content"] == "Let me check." and msg["reasoning"] is None
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}


@pytest.mark.parametrize("group", [1, 3, 7])
def test_tool_call_stream_matches_full(tokenizer, group):
    full = run_full(tokenizer, "Let me check." + CALL + CALL.replace("Paris", "Rome"), tools=TOOLS, **NO_THINK)
    for seed in range(3):
        chunks = run_stream(tokenizer, "Let me check." + CALL + CALL.replace("Paris", "Rome"), group=group,
                            seed=seed, tools=TOOLS, **NO_THINK)
        got = assemble(chunks)
        assert got["role"] == "assistant" and got["finish"] == ["tool_calls"]
        assert got["content"] == full["message"]["content"]
        calls = [got["calls"][i] for i in sorted(got["calls"])]
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (t["function"]["name"], t["function"]["arguments"]) for t in full["message"]["tool_calls"]]
        assert OBSERVATION not in json.dumps(chunks) and "<tool_call>" not in json.dumps(chunks)


@pytest.mark.parametrize("group", [1, 4])
def test_reasoning_split_full_and_stream(tokenizer, group):
    text = "The user wants weather.</think>It is sunny."
    full = run_full(tokenizer, text)["message"]
    assert full["reasoning"] == full["reasoning_content"] == "The user wants weather."
    assert full["content"] == "It is sunny." and full["tool_calls"] == []
    got = assemble(run_stream(tokenizer, text, group=group))
    assert got["reasoning"] == full["reasoning"] and got["content"] == full["content"]
    assert got["finish"] == ["stop"]


def test_reasoning_then_tool_call(tokenizer):
    text = "Need the weather tool.</think>" + CALL
    c = run_full(tokenizer, text, tools=TOOLS)
    assert c["message"]["reasoning"] == "Need the weather tool." and c["message"]["content"] is None
    assert c["finish_reason"] == "tool_calls" and len(c["message"]["tool_calls"]) == 1
    got = assemble(run_stream(tokenizer, text, group=2, tools=TOOLS))
    assert got["reasoning"] == "Need the weather tool." and got["content"] == ""
    assert got["finish"] == ["tool_calls"] and got["calls"][0]["name"] == "get_weather"


def test_thinking_off_is_all_content(tokenizer):
    c = run_full(tokenizer, "plain answer", **NO_THINK)
    assert c["message"]["content"] == "plain answer" and c["message"]["reasoning"] is None
    assert c["finish_reason"] == "stop" and c["stop_reason"] is None  # the EOS text is not shown


def test_tool_choice_none_leaves_markup_as_content(tokenizer):
    c = run_full(tokenizer, CALL, tools=TOOLS, tool_choice="none", **NO_THINK)
    assert c["message"]["tool_calls"] == [] and c["message"]["content"] == CALL and c["finish_reason"] == "stop"


def test_named_tool_choice_finishes_with_stop(tokenizer):
    named = {"type": "function", "function": {"name": "get_weather"}}
    c = run_full(tokenizer, CALL, tools=TOOLS, tool_choice=named, **NO_THINK)
    assert len(c["message"]["tool_calls"]) == 1 and c["finish_reason"] == "stop"  # vLLM's rule for named


def test_auto_tool_choice_needs_server_flags(tokenizer):
    from glm5_ascend.server.errors import BadRequest
    serving = ChatServing(make_ctx(tokenizer, FakeEngine(tokenizer, "x"), enable_auto_tool_choice=False))
    with pytest.raises(BadRequest, match="--enable-auto-tool-choice"):
        serving.prepare(chat_request(tools=TOOLS))


def test_n_choices_each_get_role_and_one_finish(tokenizer):
    chunks = run_stream(tokenizer, "abc</think>def", n=3)
    for i in range(3):
        mine = [ch for c in chunks for ch in c["choices"] if ch["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert sum(1 for ch in mine if ch["finish_reason"]) == 1


def _app(tokenizer, engine):
    ctx = make_ctx(tokenizer, engine)
    return build_app(ctx, Metrics("glm-5", 4096, lambda: {}))


def _post(app, path, body):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post(path, json=body)
    return asyncio.run(go())


def test_mid_stream_error_is_one_event_then_done(tokenizer):
    app = _app(tokenizer, FakeEngine(tokenizer, "a long enough answer", fail_after=3))
    r = _post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}], "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text.splitlines())
    assert events[-1] == "[DONE]" and "error" in events[-2]
    err = events[-2]["error"]
    assert err["code"] == 500 and "boom" in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert all("choices" in e for e in events[:-2])


def test_error_before_streaming_is_json(tokenizer):
    app = _app(tokenizer, FakeEngine(tokenizer, "x"))
    r = _post(app, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "q"}],
                                            "stream": True})
    assert r.status_code == 404 and r.json()["error"]["message"] == "The model `nope` does not exist."
    r = _post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}], "stream": True,
                                            "max_tokens": 5000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_failed_request_gives_500_body(tokenizer):
    app = _app(tokenizer, FakeEngine(tokenizer, "answer", fail_after=1))
    r = _post(app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 500 and r.json()["error"]["code"] == 500


def test_tool_arguments_json_string_is_decoded_for_the_template(tokenizer):
    ctx = make_ctx(tokenizer, FakeEngine(tokenizer, "x"))
    req = chat_request(messages=[
        {"role": "user", "content": "w?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"}], tools=TOOLS)
    text = ctx.render_chat(req)
    assert ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
            "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>") in text
    assert "<|observation|><tool_response>sunny</tool_response>" in text
    bad = chat_request(messages=[{"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}])
    from glm5_ascend.server.errors import BadRequest
    with pytest.raises(BadRequest, match="not valid JSON"):
        ctx.render_chat(bad)


def test_parallel_tool_calls_false_keeps_the_first(tokenizer):
    text = CALL + CALL.replace("Paris", "Rome")
    c = run_full(tokenizer, text, tools=TOOLS, parallel_tool_calls=False, **NO_THINK)
    (call,) = c["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"])["city"] == "Paris"
    got = assemble(run_stream(tokenizer, text, group=3, tools=TOOLS, parallel_tool_calls=False, **NO_THINK))
    assert list(got["calls"]) == [0] and json.loads(got["calls"][0]["arguments"])["city"] == "Paris"


def test_request_that_can_never_fit_the_cache_is_refused(tokenizer):
    from glm5_ascend.server.errors import BadRequest
    ctx = make_ctx(tokenizer, FakeEngine(tokenizer, "x"), kv_capacity_tokens=256)
    assert ctx.max_tokens(100, 156) == 156
    with pytest.raises(BadRequest, match="can never run"):
        ctx.max_tokens(100, 157)
    with pytest.raises(BadRequest, match="can never run"):
        ctx.max_tokens(100, None)  # the default budget (rest of the context) does not fit either
