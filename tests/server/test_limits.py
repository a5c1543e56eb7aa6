"""One client's huge or hostile request never stalls the others (issue 20): early rejection, size limits,
tokenization off the event loop, memory handed back."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from glm5_ascend.server import protocol as P
from glm5_ascend.server.limits import longest_token_chars, prompt_char_bound
from glm5_ascend.server.serving_completion import CompletionServing
from glm5_ascend.server.serving_tokens import ServingContext

MAX_LEN = 1024  # the shared server's --max-model-len (conftest.GLM5_FLAGS)


class _Prober(threading.Thread):
    """Polls /health every 20 ms; latencies in seconds."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.latencies, self.statuses = url, threading.Event(), [], set()

    def run(self):
        with httpx.Client(timeout=30) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                self.statuses.add(c.get(self.url + "/health").status_code)
                self.latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)


def _post_raw(http, path: str, body: bytes):
    return http.post(path, content=body, headers={"content-type": "application/json"})


def test_24mb_prompt_is_refused_while_health_answers(server, http):
    body = json.dumps({"prompt": "hello world " * 2_000_000, "max_tokens": 4}).encode()  # built before probing
    prober = _Prober(server.url)
    prober.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    r = _post_raw(http, "/v1/completions", body)
    elapsed = time.perf_counter() - t0
    time.sleep(0.2)
    prober.stop.set()
    prober.join()
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    assert "--max-request-body-bytes" in r.json()["error"]["message"]
    assert prober.statuses == {200} and max(prober.latencies) < 0.2, max(prober.latencies)
    assert elapsed < 5


def test_text_that_cannot_fit_is_refused_before_tokenizing(server, http, tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bound = prompt_char_bound(tok, MAX_LEN)
    assert bound == longest_token_chars(tok) * MAX_LEN  # the tiny tokenizer has no normalizer
    r = http.post("/v1/completions", json={"prompt": "ab" * (bound // 2 + 1), "max_tokens": 4})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "input_tokens"
    assert f"at least {MAX_LEN + 1} input tokens ({bound + 2} characters)" in err["message"]
    just_under = http.post("/v1/completions", json={"prompt": "a" * 200, "max_tokens": 4})
    assert just_under.status_code == 200
    # a chat: the characters of every message, and one token (its role marker) per message
    many = [{"role": "user", "content": "hi"}] * MAX_LEN
    r = http.post("/v1/chat/completions", json={"messages": many, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert f"in {MAX_LEN} messages" in r.json()["error"]["message"]


def test_chunked_body_over_the_limit_is_413(server, http):
    def chunks():
        for _ in range(64):
            yield b"x" * (64 * 1024)  # 4 MiB with no Content-Length
    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]


def _raw_request(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_header_limits(server):
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(300))
    answer = _raw_request(server.port, b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431") and b"--h11-max-header-count" in answer
    huge = b"x-big: " + b"a" * (5 << 20) + b"\r\n"  # over the 4 MiB h11 event limit
    try:
        answer = _raw_request(server.port, b"GET /health HTTP/1.1\r\nhost: x\r\n" + huge + b"\r\n")
    except ConnectionResetError:
        answer = b""
    assert not answer.startswith(b"HTTP/1.1 200")
    assert httpx.get(server.url + "/health").status_code == 200


class _Engine:
    """The AsyncEngine interface, recording nothing but the ids; one token out."""

    async def generate(self, ids, params, request_id, prompt=None):
        from glm5_ascend.engine.sequence import CompletionOutput, RequestOutput
        yield RequestOutput(request_id, prompt, list(ids), [CompletionOutput(0, "x", [120], None, None, "stop")],
                            True)


def test_prompts_are_tokenized_in_the_pool_not_on_the_loop(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ctx = ServingContext(engine=_Engine(), tokenizer=tok, served_names=["m"], model_path="/m", max_model_len=4096,
                         vocab_size=288, kv_capacity_tokens=1 << 20)
    ctx.start_pool(2)
    threads = []
    real_encode = ctx.encode

    def encode(text, add_special_tokens):
        threads.append(threading.current_thread().name)
        return real_encode(text, add_special_tokens)
    ctx.encode = encode
    req = P.CompletionRequest.model_validate({"prompt": ["one", "two"], "max_tokens": 1, "echo": True})

    async def run():
        prompts, stream = await CompletionServing(ctx).generate(req, "r")
        return prompts, [item async for item in stream], threading.current_thread().name
    prompts, outs, loop_thread = asyncio.run(run())
    ctx.pool.shutdown()
    assert len(outs) == 2 and [p.text for p in prompts] == ["one", "two"]
    assert len(threads) == 2 and all(t.startswith("glm5-tokenize") for t in threads) and loop_thread not in threads


def test_memory_is_handed_back_after_a_large_body(tiny_model_dir):
    """The middleware asks the allocator to return freed memory after a body over 1 MiB (not after small ones)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from glm5_ascend.server.limits import RequestLimitMiddleware
    trims = []

    async def echo_len(request):
        return PlainTextResponse(str(len(await request.body())))
    app = Starlette(routes=[Route("/", echo_len, methods=["POST"])])
    app.add_middleware(RequestLimitMiddleware, max_body=8 << 20, max_headers=256, trim=lambda: trims.append(1))
    with TestClient(app) as c:
        assert c.post("/", content=b"x" * 100).text == "100" and trims == []
        assert c.post("/", content=b"x" * (2 << 20)).text == str(2 << 20)
        r = c.post("/", content=b"x" * (9 << 20))
        assert r.status_code == 413
    deadline = time.monotonic() + 5
    while len(trims) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(trims) == 2
