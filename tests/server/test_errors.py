"""Errors a client can cause: vLLM's status codes and bodies, and the server stays healthy."""
from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL, assert_error

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def test_unknown_model_is_404(client, http):
    err = assert_error(http.post(CMPL, json={"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert err["message"] == "The model `gpt-4` does not exist." and err["type"] == "NotFoundError"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER)


def test_prompt_too_long(http):
    err = assert_error(http.post(CMPL, json={"prompt": "a" * 1500, "max_tokens": 1}), 400, "input_tokens")
    assert "maximum context length is 1024 tokens" in err["message"] and "1500 input tokens" in err["message"]
    assert err["type"] == "BadRequestError"
    assert_error(http.post(CMPL, json={"prompt": [5] * 1024, "max_tokens": 1}), 400, "input_tokens")


def test_max_tokens_too_large(http, client):
    err = assert_error(http.post(CMPL, json={"prompt": "abc", "max_tokens": 1022}), 400, "max_tokens")
    assert err["message"].startswith("'max_tokens' or 'max_completion_tokens' is too large: 1022.")
    assert "(1022 > 1024 - 3)" in err["message"]
    assert http.post(CMPL, json={"prompt": "abc", "max_tokens": 1021, "temperature": 0,
                                 "stop_token_ids": list(range(288))}).status_code == 200
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=10 ** 6)


def test_logprobs_limits(http):
    err = assert_error(http.post(CMPL, json={"prompt": "x", "logprobs": 21}), 400, "logprobs")
    assert "greater than max allowed: 20" in err["message"]
    assert_error(http.post(CHAT, json={"messages": USER, "logprobs": True, "top_logprobs": 21}), 400)
    assert_error(http.post(CHAT, json={"messages": USER, "top_logprobs": 2}), 400)  # needs logprobs=true
    assert http.post(CMPL, json={"prompt": "x", "max_tokens": 1, "logprobs": 20}).status_code == 200


@pytest.mark.parametrize("body", [
    b"{not json", b"", b"[1, 2, 3]", b'"a string"', b"null", b'{"prompt": "x", "max_tokens": 5',
])
def test_malformed_json(http, body):
    r = http.post(CMPL, content=body, headers={"content-type": "application/json"})
    assert_error(r, 400)


@pytest.mark.parametrize("body", [b'{"prompt": "\xff\xfe"}', b'\xff\xfe\x00{"prompt": 1}',
                                  b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}'])
def test_invalid_utf8(http, body):
    for path in (CMPL, CHAT):
        assert_error(http.post(path, content=body, headers={"content-type": "application/json"}), 400)


@pytest.mark.parametrize("path,body,param", [
    (CMPL, {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    (CMPL, {"prompt": {"a": 1}}, "prompt"),
    (CMPL, {"prompt": "x", "temperature": [1]}, "temperature"),
    (CMPL, {"prompt": "x", "stream": "yes please"}, "stream"),
    (CMPL, {"prompt": "x", "stop": 5}, "stop"),
    (CHAT, {"messages": "hello"}, "messages"),
    (CHAT, {"messages": [{"content": "no role"}]}, "messages"),
    (CHAT, {"messages": USER, "n": 1.5}, "n"),
    (CMPL, {}, "prompt"),
])
def test_wrong_types(http, path, body, param):
    assert_error(http.post(path, json=body), 400, param)


@pytest.mark.parametrize("body", [
    b'{"prompt": "x", "max_tokens": 1e400}',
    b'{"prompt": "x", "max_tokens": 100000000000000000000000000000000000000}',
    b'{"prompt": "x", "n": 100000000000000000000000000}',
    b'{"prompt": "x", "seed": 100000000000000000000000000}',
    b'{"prompt": "x", "temperature": 1e400}',
    b'{"prompt": "x", "top_p": -1e308}',
    b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "x", "logit_bias": {"5": Infinity}}',
    b'{"prompt": "x", "logprobs": 99999999999999999999}',
    b'{"prompt": [99999999999999999999]}',
    b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
])
def test_huge_numbers(http, body):
    assert_error(http.post(CMPL, content=body, headers={"content-type": "application/json"}), 400)


def test_empty_inputs(http):
    assert_error(http.post(CHAT, json={"messages": []}), 400, "messages")
    assert_error(http.post(CMPL, json={"prompt": ""}), 400)
    assert_error(http.post(CMPL, json={"prompt": []}), 400)
    assert_error(http.post(CMPL, json={"prompt": [[]]}), 400)


@pytest.mark.parametrize("path,body,needle", [
    (CMPL, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream=True"),
    (CMPL, {"prompt": "x", "suffix": "s"}, "suffix"),
    (CMPL, {"prompt": "x", "n": 0}, "n must be at least 1"),
    (CMPL, {"prompt": "x", "temperature": -1}, "temperature"),
    (CMPL, {"prompt": "x", "top_p": 0}, "top_p"),
    (CMPL, {"prompt": "x", "logit_bias": {"100000": 5}}, "out-of-vocab"),
    (CMPL, {"prompt": "x", "allowed_token_ids": [99999]}, "out-of-vocab"),
    (CMPL, {"prompt": [0, 1, 99999]}, "out of vocabulary"),
    (CMPL, {"prompt": "x", "min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    (CMPL, {"prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
    (CHAT, {"messages": USER, "tool_choice": "auto"}, "`tools` must be set"),
    (CHAT, {"messages": USER, "chat_template": "{{ messages }}"}, "trust-request-chat-template"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "image_url"),
    ("/detokenize", {"tokens": [1, 100000]}, "out of vocabulary"),
    (CMPL, {"prompt": "x", "stop": ""}, "stop cannot contain an empty string"),
    (CHAT, {"messages": USER, "stop": ["ok", ""]}, "stop cannot contain an empty string"),
])
def test_semantic_errors(http, path, body, needle):
    err = assert_error(http.post(path, json=body), 400)
    assert needle in err["message"], err


@pytest.mark.parametrize("path,body", [
    (CMPL, b'{"prompt": "a\\ud800b", "max_tokens": 2}'),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
    ("/tokenize", b'{"prompt": "\\ud800"}'),
])
def test_lone_surrogate_is_400(http, path, body):
    """JSON may escape a lone surrogate; it is not text a tokenizer can take: 400, not 500."""
    err = assert_error(http.post(path, content=body, headers={"content-type": "application/json"}), 400)
    assert "surrogate" in err["message"]


def test_unknown_fields_are_ignored(http):
    r = http.post(CMPL, json={"prompt": "x", "max_tokens": 1, "not_a_field": {"deep": [1]}, "frobnicate": True})
    assert r.status_code == 200


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing").status_code == 404
    assert http.get(CMPL).status_code == 405


def test_server_still_healthy_after_errors(http):
    assert http.get("/health").status_code == 200
    assert http.post(CMPL, json={"prompt": "ok", "max_tokens": 2}).status_code == 200
