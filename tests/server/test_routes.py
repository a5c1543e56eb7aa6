"""Every route through the official openai client and raw httpx, against a real server process."""
from __future__ import annotations

import json

import pytest

from glm5_ascend.server import protocol as P
from tests.server.conftest import MODEL, sse_events

GREEDY = {"temperature": 0.0}
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def test_health_ping_version_load(http):
    for path in ("/health", "/ping"):
        r = http.get(path)
        assert r.status_code == 200 and r.content == b""
    assert http.post("/ping").status_code == 200
    assert isinstance(http.get("/version").json()["version"], str)
    assert http.get("/load").json() == {"server_load": 0}


def test_models(client, http, server):
    body = http.get("/v1/models").json()
    P.ModelList.model_validate(body)
    assert [c["id"] for c in body["data"]] == [MODEL, "glm5-alias"]
    card = body["data"][0]
    assert card["owned_by"] == "vllm" and card["max_model_len"] == 1024 and card["parent"] is None
    assert card["root"].endswith("tiny-glm5-v2") and card["permission"][0]["object"] == "model_permission"
    assert [m.id for m in client.models.list()] == [MODEL, "glm5-alias"]


def test_openapi_and_docs(http):
    spec = http.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models"):
        assert path in spec["paths"]
    assert http.get("/docs").status_code == 200


def test_completion_basic_shape(client, http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 5, **GREEDY})
    body = r.json()
    P.CompletionResponse.model_validate(body)
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("stop", "length") and choice["index"] == 0
    n_prompt = http.post("/tokenize", json={"prompt": "Hello"}).json()["count"]
    u = body["usage"]
    assert u["prompt_tokens"] == n_prompt and u["total_tokens"] == n_prompt + u["completion_tokens"]
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert out.choices[0].text == choice["text"]  # greedy is deterministic


def test_empty_model_means_first_and_alias_works(http):
    for model in (None, "", "glm5-alias"):
        body = {"prompt": "x", "max_tokens": 1} | ({"model": model} if model is not None else {})
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["model"] == (model or MODEL)


def test_default_max_tokens_is_16_and_ignore_eos(client):
    out = client.completions.create(model=MODEL, prompt="abc", extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


def test_n_and_multiple_prompts_index_across_prompts(client):
    out = client.completions.create(model=MODEL, prompt=["one", "two", "three"], n=2, max_tokens=3, seed=1,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert out.usage.completion_tokens == 18
    assert out.usage.prompt_tokens == len("one") + len("two") + len("three")  # byte-level tokenizer


def test_token_id_prompts(client):
    ids = [104, 101, 108, 108, 111]
    a = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    b = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
    c = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=4, temperature=0)
    assert a.choices[0].text == b.choices[0].text == c.choices[0].text == c.choices[1].text
    assert a.usage.prompt_tokens == 5


def test_stop_string_truncates_and_reports(client):
    # Only "A" and "B" may be sampled, so the text is printable and a stop string is easy to pick.
    kw = dict(model=MODEL, prompt="The sky", max_tokens=24, temperature=0)
    extra = {"ignore_eos": True, "allowed_token_ids": [65, 66]}
    full = client.completions.create(**kw, extra_body=extra).choices[0].text
    assert len(full) == 24 and set(full) <= {"A", "B"}
    stop = full[5:8]
    first = full.index(stop)
    c = client.completions.create(**kw, stop=[stop, "never"], extra_body=extra).choices[0]
    assert c.text == full[:first] and c.finish_reason == "stop" and c.model_extra["stop_reason"] == stop
    kept = client.completions.create(**kw, stop=stop, extra_body={**extra, "include_stop_str_in_output": True})
    assert kept.choices[0].text == full[:first] + stop
    by_id = client.completions.create(**kw, extra_body={**extra, "stop_token_ids": [ord(full[3])]}).choices[0]
    assert by_id.finish_reason == "stop" and by_id.model_extra["stop_reason"] == ord(full[3])
    assert by_id.text == full[:full.index(full[3])]  # the stop token's text is not shown


def test_completion_logprobs_and_echo(client, http):
    out = client.completions.create(model=MODEL, prompt="Hi there", max_tokens=4, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    # Keys are token texts (several byte tokens show as U+FFFD and collide); as ids, all 3 are there.
    as_ids = client.completions.create(model=MODEL, prompt="Hi there", max_tokens=4, temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert all(len(t) == 3 for t in as_ids.choices[0].logprobs.top_logprobs)  # greedy: sampled is in the top 3
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    # greedy: the sampled token is the most likely one
    ids_lp = as_ids.choices[0].logprobs
    assert ids_lp.token_logprobs == lp.token_logprobs
    assert all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(ids_lp.top_logprobs, ids_lp.token_logprobs))
    echo = client.completions.create(model=MODEL, prompt="Hi there", max_tokens=4, temperature=0, logprobs=1,
                                     echo=True, extra_body={"ignore_eos": True}).choices[0]
    assert echo.text == "Hi there" + out.choices[0].text
    assert echo.logprobs.token_logprobs[0] is None and len(echo.logprobs.tokens) == 8 + 4
    assert all(v is not None for v in echo.logprobs.token_logprobs[1:])


def test_echo_with_max_tokens_0_scores_the_prompt(client):
    # lm-evaluation-harness scores prompts this way: echo, max_tokens=0, logprobs
    out = client.completions.create(model=MODEL, prompt="Score me", max_tokens=0, echo=True, logprobs=1)
    c = out.choices[0]
    assert c.text == "Score me" and len(c.logprobs.tokens) == 8 and c.logprobs.token_logprobs[0] is None
    assert all(v <= 0 for v in c.logprobs.token_logprobs[1:])


def test_return_tokens_as_token_ids_and_token_ids(http):
    body = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3, "logprobs": 1,
                                              "return_tokens_as_token_ids": True, "return_token_ids": True,
                                              **GREEDY}).json()
    choice = body["choices"][0]
    assert [f"token_id:{t}" for t in choice["token_ids"]] == choice["logprobs"]["tokens"]
    assert choice["prompt_token_ids"] == [97, 98]


def test_seed_reproducible(client):
    kw = dict(model=MODEL, prompt="seed test", max_tokens=8, temperature=1.0, seed=1234,
              extra_body={"ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def _stream_text(events) -> tuple[dict, dict]:
    texts, reasons = {}, {}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                assert c["index"] not in reasons
                reasons[c["index"]] = c["finish_reason"]
    return texts, reasons


def test_completion_stream_equals_full(http):
    req = {"model": MODEL, "prompt": ["Once upon", "a time"], "n": 2, "max_tokens": 12, **GREEDY}
    full = http.post("/v1/completions", json=req).json()
    with http.stream("POST", "/v1/completions", json={**req, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    texts, reasons = _stream_text(events[:-1])
    for c in full["choices"]:
        assert texts[c["index"]] == c["text"] and reasons[c["index"]] == c["finish_reason"]
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert all(e["usage"] is None for e in events[:-2])


def test_completion_stream_continuous_usage(http):
    req = {"prompt": "abc", "max_tokens": 4, "stream": True, "ignore_eos": True,
           "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **GREEDY}
    with http.stream("POST", "/v1/completions", json=req) as r:
        events = sse_events(r.iter_lines())[:-1]
    running = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
    assert running == sorted(running) and running[-1] == 4 and events[-1]["usage"]["completion_tokens"] == 4


def test_openai_stream_completion(client):
    stream = client.completions.create(model=MODEL, prompt="stream me", max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(model=MODEL, prompt="stream me", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert text == full.choices[0].text


def test_chat_basic(client, http):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=6, temperature=0,
                                         extra_body=NO_THINK)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    c = out.choices[0]
    assert c.message.role == "assistant" and c.message.tool_calls in ([], None)
    # no stop strings or stop token ids: the answer ends at EOS ("stop") or at max tokens ("length")
    assert c.model_extra["stop_reason"] is None
    assert c.finish_reason == ("length" if out.usage.completion_tokens == 6 else "stop"), (c, out.usage)
    tok = http.post("/tokenize", json={"messages": msgs, **NO_THINK}).json()
    assert out.usage.prompt_tokens == tok["count"]
    raw = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, **GREEDY, **NO_THINK}).json()
    P.ChatCompletionResponse.model_validate(raw)
    assert raw["choices"][0]["message"]["content"] == c.message.content
    assert raw["choices"][0]["message"]["reasoning"] is None


def test_chat_reasoning_is_split_by_default(http):
    msgs = [{"role": "user", "content": "think"}]
    r = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 8, "ignore_eos": True, **GREEDY})
    msg = r.json()["choices"][0]["message"]
    # thinking is on: the prompt ends in <think>, so text up to </think> is reasoning (both names)
    assert msg["reasoning"] == msg["reasoning_content"] and msg["reasoning"]
    plain = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 8, "ignore_eos": True,
                                                    **GREEDY, **NO_THINK}).json()["choices"][0]["message"]
    assert plain["reasoning"] is None and plain["content"]


def _chat_stream(http, req):
    with http.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        assert r.status_code == 200
        return sse_events(r.iter_lines())


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_stream_equals_full(http, thinking):
    req = {"messages": [{"role": "user", "content": "Tell me a story"}], "n": 2, "max_tokens": 16,
           "chat_template_kwargs": {"enable_thinking": thinking}, **GREEDY}
    full = http.post("/v1/chat/completions", json=req).json()
    events = _chat_stream(http, {**req, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for e in chunks:
        P.ChatCompletionChunk.model_validate(e)
    firsts = {}
    content, reasoning, finishes = {}, {}, {}
    for e in chunks[:-1]:
        (c,) = e["choices"]
        i = c["index"]
        if i not in firsts:
            firsts[i] = c["delta"]
            continue
        content[i] = content.get(i, "") + (c["delta"].get("content") or "")
        reasoning[i] = reasoning.get(i, "") + (c["delta"].get("reasoning") or "")
        if c["finish_reason"]:
            finishes.setdefault(i, []).append(c["finish_reason"])
    assert firsts == {0: {"role": "assistant", "content": ""}, 1: {"role": "assistant", "content": ""}}
    for c in full["choices"]:
        i, msg = c["index"], c["message"]
        assert finishes[i] == [c["finish_reason"]]  # exactly one finish chunk per choice
        assert (content.get(i) or None) == msg["content"] and (reasoning.get(i) or None) == msg["reasoning"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True, **NO_THINK})
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the top one
    assert "".join(e.token for e in content) == out.choices[0].message.content


def test_chat_echo(http):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Partial answer"}]
    body = http.post("/v1/chat/completions", json={
        "messages": msgs, "add_generation_prompt": False, "continue_final_message": True, "echo": True,
        "max_tokens": 3, **GREEDY, **NO_THINK}).json()
    assert body["choices"][0]["message"]["content"].startswith("Partial answer")


def test_chat_tools_shapes(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}, "none"):
        out = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, tool_choice=choice,
                                             max_tokens=4, temperature=0, extra_body=NO_THINK)
        c = out.choices[0]
        calls = c.message.tool_calls
        assert isinstance(calls, list), choice
        # Every reported call names a declared tool with JSON arguments; a named choice calls only it.
        # (That "required" / a named choice always yield a call is enforced by structured outputs
        # and asserted with them.)
        for call in calls:
            assert call.type == "function" and call.function.name == "get_weather", (choice, call)
            assert isinstance(json.loads(call.function.arguments), dict), (choice, call)
        if choice == "none":
            assert calls == [] and c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
        elif isinstance(choice, dict):
            assert c.finish_reason in ("stop", "length"), (choice, c)  # a named call ends with "stop"
        elif calls:
            assert c.finish_reason == "tool_calls", (choice, c)
        else:
            assert c.finish_reason in ("stop", "length"), (choice, c)
        if choice == "required" or isinstance(choice, dict):
            assert calls == [] or c.message.content == "", (choice, c)  # a forced call comes with no text
    stream = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, max_tokens=4, temperature=0,
                                            stream=True, extra_body=NO_THINK)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "héllo", "return_token_strs": True}).json()
    P.TokenizeResponse.model_validate(r)
    assert r["count"] == len(r["tokens"]) == len("héllo".encode()) and r["max_model_len"] == 1024
    assert len(r["token_strs"]) == r["count"]
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "héllo"}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text == "[gMASK]<sop><|user|>hi<|assistant|><think>" and chat["token_strs"] is None
    no_prompt = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                             "add_generation_prompt": False}).json()
    assert no_prompt["count"] == chat["count"] - 2


def test_metrics_names_and_labels(http):
    http.post("/v1/completions", json={"prompt": "m", "max_tokens": 2})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket"):
        assert f'{name}{{' in text and f'model_name="{MODEL}"' in text, name
    for reason in ("stop", "length", "abort"):
        assert f'vllm:request_success_total{{finished_reason="{reason}",model_name="{MODEL}"}}' in text
    assert "vllm:gpu_cache_usage_perc" not in text  # retired name


def test_metrics_count_each_of_n_choices_as_a_request(http):
    """vLLM fans n > 1 out into n requests: every per-request series moves by n, tokens agree with usage."""
    from tests.server.conftest import metric, metric_values
    before = metric_values(http.get("/metrics").text)
    r = http.post("/v1/completions", json={"prompt": "count me", "max_tokens": 3, "n": 3, "ignore_eos": True})
    usage = r.json()["usage"]
    after = metric_values(http.get("/metrics").text)

    def delta(name, **labels):
        return metric(after, name, model_name=MODEL, **labels) - metric(before, name, model_name=MODEL, **labels)

    assert delta("vllm:request_success_total", finished_reason="length") == 3
    assert delta("vllm:e2e_request_latency_seconds_count") == 3
    assert delta("vllm:request_prompt_tokens_count") == 3
    assert delta("vllm:prompt_tokens_total") == 3 * usage["prompt_tokens"]
    assert delta("vllm:generation_tokens_total") == usage["completion_tokens"] == 9
