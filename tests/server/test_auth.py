"""--api-key: /v1/* needs `Authorization: Bearer KEY`; health, metrics, version, ping and tokenize stay open."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import start_server

KEYS = ["key-one", "key-two"]


@pytest.fixture(scope="module")
def auth_server(tiny_model_dir, tmp_path_factory):
    # No tool parser flags here: this server also checks that tool_choice=auto is refused without them.
    srv = start_server(["--api-key", KEYS[0], "--api-key", KEYS[1], "--max-model-len", "1024",
                        "--max-num-seqs", "8", "--uvicorn-log-level", "warning"], tmp_path_factory)
    yield srv
    srv.stop()


def test_v1_needs_a_key(auth_server):
    url = auth_server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0]},
                    {"Authorization": f"Basic {KEYS[0]}"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}


def test_every_key_works(auth_server):
    for key in KEYS:
        r = httpx.get(auth_server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny-glm5-v2"


def test_open_routes(auth_server):
    url = auth_server.url
    for path in ("/health", "/ping", "/version", "/metrics", "/load"):
        assert httpx.get(url + path).status_code == 200, path
    assert httpx.post(url + "/tokenize", json={"prompt": "abc"}).json()["count"] == 3


def test_openai_client_with_and_without_key(auth_server):
    good = openai.OpenAI(base_url=auth_server.url + "/v1", api_key=KEYS[1], max_retries=0)
    out = good.completions.create(model="tiny-glm5-v2", prompt="hi", max_tokens=2)
    assert out.usage.completion_tokens <= 2
    bad = openai.OpenAI(base_url=auth_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_auto_tool_choice_refused_without_flags(auth_server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    r = httpx.post(auth_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS[0]}"},
                   json={"messages": [{"role": "user", "content": "x"}], "tools": tools, "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and "--enable-auto-tool-choice" in err["message"]
    # with thinking and no reasoning parser, everything is plain content
    r = httpx.post(auth_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS[0]}"},
                   json={"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": "none",
                         "max_tokens": 2, "ignore_eos": True})
    msg = r.json()["choices"][0]["message"]
    assert r.status_code == 200 and msg["reasoning"] is None and msg["tool_calls"] == []
