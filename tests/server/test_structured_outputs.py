"""Structured outputs over HTTP with the openai client, against a real server on the tiny model.

The tiny model's random weights never write JSON or tool calls by themselves: an answer that
validates proves the constraint. The server runs the GLM-5 flags plus vLLM's
--structured-outputs-config disable_any_whitespace (random weights would otherwise fill every
allowed gap with whitespace)."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.server.conftest import GLM5_FLAGS, MODEL, assert_error, start_server

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok"],
          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "ok": {"type": "boolean"}}}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "required": ["days", "metric"],
             "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 9}, "metric": {"type": "boolean"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "required": ["offset"],
             "properties": {"offset": {"type": "integer", "enum": [0, 1, 2]}}}}}]


@pytest.fixture(scope="module")
def so_server(tiny_model_dir, tmp_path_factory):
    srv = start_server(GLM5_FLAGS + ["--structured-outputs-config", '{"disable_any_whitespace": true}'],
                       tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oc(so_server):
    c = openai.OpenAI(base_url=so_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def think_end(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("</think>")


def test_json_schema_answer_validates(oc):
    free = oc.chat.completions.create(model=MODEL, messages=USER, max_tokens=40, temperature=0, extra_body=NO_THINK)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    r = oc.chat.completions.create(model=MODEL, messages=USER, max_tokens=80, temperature=0,
                                   response_format=JSON_SCHEMA_FORMAT, extra_body=NO_THINK)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    obj = oc.chat.completions.create(model=MODEL, messages=USER, max_tokens=80, temperature=0,
                                     response_format={"type": "json_object"}, extra_body=NO_THINK)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


@pytest.mark.parametrize("body, check", [
    ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ({"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}}, lambda t: re.fullmatch("[a-z]{3}-[0-9]{2}", t)),
    ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, lambda t: t in ("red", "green", "blue")),
    ({"structured_outputs": {"grammar": 'root ::= "(" [0-9] [0-9]? ")"'}}, lambda t: re.fullmatch(r"\(\d\d?\)", t)),
    ({"guided_regex": "[0-9]{5}"}, lambda t: re.fullmatch("[0-9]{5}", t)),  # older vLLM's field
])
def test_completions_structured_outputs(oc, body, check):
    r = oc.completions.create(model=MODEL, prompt="Answer:", max_tokens=60, temperature=0, extra_body=body)
    assert r.choices[0].finish_reason == "stop" and check(r.choices[0].text), r.choices[0].text


def test_reasoning_is_free_and_the_answer_constrained(oc, think_end):
    regex = {"structured_outputs": {"regex": "[0-9]{4}"}}
    r = oc.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, temperature=0, extra_body=regex)
    m = r.choices[0].message
    assert m.reasoning and not re.fullmatch("[0-9]*", m.reasoning)  # thinking: unconstrained
    assert m.content is None or re.fullmatch("[0-9]{1,4}", m.content)  # what follows </think>, if any: digits
    # The bias makes </think> the first token; from there the grammar masks it (and everything but digits).
    r = oc.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, temperature=0,
                                   logit_bias={str(think_end): 100}, extra_body=regex)
    assert re.fullmatch("[0-9]{4}", r.choices[0].message.content) and r.choices[0].finish_reason == "stop"


def test_streaming_with_n_choices(oc):
    stream = oc.chat.completions.create(model=MODEL, messages=USER, max_tokens=80, temperature=1.0, seed=3, n=2,
                                        stream=True, response_format=JSON_SCHEMA_FORMAT, extra_body=NO_THINK)
    text, finish = {0: "", 1: ""}, {}
    for chunk in stream:
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "stop", 1: "stop"}
    for t in text.values():
        jsonschema.validate(json.loads(t), SCHEMA)


def _check_calls(calls, names):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls and all(c.function.name in names for c in calls), calls
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])


def test_named_tool_choice_is_enforced(oc):
    r = oc.chat.completions.create(model=MODEL, messages=USER, max_tokens=120, temperature=0, tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                   extra_body=NO_THINK)
    c = r.choices[0]
    assert len(c.message.tool_calls) == 1 and c.finish_reason == "stop" and c.message.content == ""
    _check_calls(c.message.tool_calls, {"get_weather"})


def test_required_tool_choice_is_enforced_streamed_too(oc, think_end):
    r = oc.chat.completions.create(model=MODEL, messages=USER, max_tokens=120, temperature=0, tools=TOOLS,
                                   tool_choice="required", parallel_tool_calls=False, extra_body=NO_THINK)
    c = r.choices[0]
    assert len(c.message.tool_calls) == 1 and c.finish_reason == "tool_calls"
    _check_calls(c.message.tool_calls, {"get_weather", "get_time"})
    # With thinking on: free reasoning first, then only tool calls.
    stream = oc.chat.completions.create(model=MODEL, messages=USER, max_tokens=120, temperature=0, tools=TOOLS,
                                        tool_choice="required", parallel_tool_calls=False, stream=True,
                                        logit_bias={str(think_end): 100})
    args, names, finish = {}, {}, None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                names[d.index] = names.get(d.index, "") + (d.function.name or "")
                args[d.index] = args.get(d.index, "") + (d.function.arguments or "")
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(names) == 1 and names[0] in ("get_weather", "get_time")
    jsonschema.validate(json.loads(args[0]), {t["function"]["name"]: t["function"]["parameters"]
                                              for t in TOOLS}[names[0]])


@pytest.mark.parametrize("path, body, param, needle", [
    ("/v1/completions", {"structured_outputs": {"json": {"type": "objekt"}}}, "structured_outputs", "objekt"),
    ("/v1/completions", {"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not valid JSON"),
    ("/v1/completions", {"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "regex"),
    ("/v1/completions", {"structured_outputs": {"grammar": 'root ::= "a" |'}}, "structured_outputs", "grammar"),
    ("/v1/completions", {"structured_outputs": {"grammar": ""}}, "structured_outputs", "non-empty"),
    ("/v1/completions", {"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one kind"),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, "response_format", '"schema"'),
    ("/v1/completions", {"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ("/v1/completions", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "response_format", "Only one"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "Only one"),
])
def test_bad_constraints_are_400_and_the_server_serves_on(so_server, path, body, param, needle):
    import httpx
    base = {"prompt": "x"} if "completions" in path and "chat" not in path else {"messages": USER}
    r = httpx.post(so_server.url + path, json={**base, "max_tokens": 4, **body}, timeout=60)
    err = assert_error(r, 400, param)
    assert needle in err["message"] and "\n" not in err["message"], err
    ok = httpx.post(so_server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_one_constrained_request_leaves_seven_others_alone(oc):
    """Eight concurrent greedy requests, one constrained: the seven give what they give without it."""
    def run(prompt, extra=None):
        return oc.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True, **(extra or {})}).choices[0].text

    prompts = [f"Story number {i}:" for i in range(7)]
    with ThreadPoolExecutor(8) as pool:
        alone = list(pool.map(run, prompts))
        constrained = pool.submit(run, "Digits:", {"structured_outputs": {"regex": "[0-9]{10}"}})
        mixed = list(pool.map(run, prompts))
    assert re.fullmatch("[0-9]{10}", constrained.result())
    assert mixed == alone
