"""A newcomer's first hour (issue 13): readable request errors, a clean /openapi.json, help for every flag."""
from __future__ import annotations

import argparse
import collections

import pytest

from glm5_ascend.cli import build_parser


@pytest.mark.parametrize("body,message,param", [
    ({}, "Field required: `prompt` (a text) or `messages` (a chat).", None),
    ({"prompt": 3}, "prompt: Input should be a valid string", "prompt"),
    ({"messages": "hi"}, "messages: Input should be a valid list", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True,
      "continue_final_message": True},
     "Value error, Cannot set both `continue_final_message` and `add_generation_prompt` to True.", None),
])
def test_tokenize_errors_name_the_fields_not_pydantic_internals(http, body, message, param):
    r = http.post("/tokenize", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["message"] == message and err["param"] == param
    assert "function-after" not in err["message"] and "Tokenize" not in err["message"]


def test_openapi_has_unique_operation_ids(http):
    spec = http.get("/openapi.json").json()
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert [i for i, n in collections.Counter(ids).items() if n > 1] == []
    assert {"get", "post"} <= set(spec["paths"]["/ping"])


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("command", ["serve", "generate", "plan"])
def test_every_flag_has_help_and_help_shows_defaults(command):
    p = _subparser(build_parser(), command)
    bare = [a.option_strings or [a.dest] for a in p._actions
            if a.help is None or (a.help != argparse.SUPPRESS and not a.help.strip())]
    assert bare == [], f"`{command}` flags without help: {bare}"
    text = p.format_help()
    expected = {"serve": ["--port PORT           TCP port to listen on (default: 8000)",
                          "(default: 0.0.0.0)", "(default: 256)"],
                "generate": ["(default: 32)"],
                "plan": ["(default: atlas-a2)", "(default: 0.9)"]}[command]
    flat = " ".join(text.split())
    for needle in expected:
        assert " ".join(needle.split()) in flat, f"{needle!r} not in `{command} --help`"


@pytest.fixture(scope="module")
def thinking_off_server(tiny_model_dir, tmp_path_factory):
    from tests.server.conftest import start_server
    srv = start_server(["--reasoning-parser", "glm45", "--default-chat-template-kwargs",
                        '{"enable_thinking": false}', "--uvicorn-log-level", "warning"], tmp_path_factory)
    yield srv
    srv.stop()


def test_thinking_off_server_wide_and_back_on_per_request(thinking_off_server):
    import httpx
    msgs = [{"role": "user", "content": "Hi"}]
    with httpx.Client(base_url=thinking_off_server.url, timeout=120) as c:
        def prompt_end(**extra):
            ids = c.post("/tokenize", json={"messages": msgs, **extra}).json()["tokens"]
            return c.post("/detokenize", json={"tokens": ids}).json()["prompt"][-len("<|assistant|></think>"):]
        assert prompt_end() == "<|assistant|></think>"  # the server's default: no thinking
        assert prompt_end(chat_template_kwargs={"enable_thinking": True}).endswith("<|assistant|><think>")

        def answer(**extra):
            body = {"messages": msgs, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **extra}
            return c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        off = answer()
        assert off["content"] and off.get("reasoning") is None  # everything is the answer
        on = answer(chat_template_kwargs={"enable_thinking": True})
        assert on["reasoning"] and not on["content"]  # no </think> in 12 random tokens: all of it is reasoning
