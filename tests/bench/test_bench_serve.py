"""Tests of `glm5-ascend bench serve`: metric math, datasets, the streaming client, and a run on the real server."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from argparse import ArgumentParser
from pathlib import Path

import numpy as np
import pytest

from glm5_ascend.bench import serve
from glm5_ascend.bench.datasets import LocalTokenizer, load_sharegpt, random_requests, sharegpt_requests
from glm5_ascend.bench.metrics import (RequestOutput, compute_metrics, format_report, percentile_label,
                                       timings_from_chunks, tpot)
from glm5_ascend.model.tiny_tokenizer import special_token_ids, write_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def tok(tiny_tok_dir):
    return LocalTokenizer(tiny_tok_dir)


def _args(*argv: str):
    p = ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(list(argv))


# ---------------------------------------------------------------- metric math

def test_timings_from_chunks():
    ttft, itl, e2e = timings_from_chunks(10.0, [10.5, 10.6, 10.9, 11.0], 11.25)
    assert ttft == pytest.approx(0.5)
    assert itl == pytest.approx([0.1, 0.3, 0.1])
    assert e2e == pytest.approx(1.25)
    assert timings_from_chunks(1.0, [], 3.0) == (2.0, [], 2.0)


def test_tpot_excludes_first_token():
    out = RequestOutput(success=True, output_tokens=5, ttft=0.2, latency=1.0)
    assert tpot(out) == pytest.approx((1.0 - 0.2) / 4)
    assert tpot(RequestOutput(success=True, output_tokens=1, ttft=0.2, latency=0.3)) is None


def test_compute_metrics_aggregates_successes_only():
    outs = [
        RequestOutput(True, prompt_len=10, output_tokens=3, ttft=0.1, itl=[0.05, 0.05], latency=0.2),
        RequestOutput(True, prompt_len=20, output_tokens=5, ttft=0.3, itl=[0.1, 0.2, 0.1, 0.1], latency=0.8),
        RequestOutput(False, prompt_len=30, error="HTTP 500: boom"),
    ]
    m = compute_metrics(outs, duration_s=2.0, percentiles=[50, 99, 99.9])
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 8)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["total_token_throughput"] == pytest.approx(19.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)  # linear interpolation between 100 and 300
    tpots_ms = [(0.2 - 0.1) / 2 * 1000, (0.8 - 0.3) / 4 * 1000]
    assert m["mean_tpot_ms"] == pytest.approx(np.mean(tpots_ms))
    itls_ms = np.array([0.05, 0.05, 0.1, 0.2, 0.1, 0.1]) * 1000
    assert m["mean_itl_ms"] == pytest.approx(itls_ms.mean())
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["p99.9_itl_ms"] == pytest.approx(np.percentile(itls_ms, 99.9))
    assert m["p50_e2el_ms"] == pytest.approx(500.0)


def test_compute_metrics_all_failed_reports_zeros():
    m = compute_metrics([RequestOutput(False, error="x")], 1.0, [99])
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0 and m["p99_itl_ms"] == 0.0


def test_report_layout():
    m = compute_metrics([RequestOutput(True, 4, 2, 0.01, [0.02], 0.03)], 1.0, [90, 99.5])
    text = format_report(m, ["ttft", "e2el"], [90, 99.5], max_concurrency=4, request_rate=float("inf"))
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert "Successful requests:                     1" in text
    assert "Maximum request concurrency:             4" in text
    assert "---------------Time to First Token----------------" in text
    assert "P99.5 E2EL (ms):" in text and "Mean TTFT (ms):                          10.00" in text
    assert "TPOT" not in text and "ITL" not in text
    assert percentile_label(99.0) == "99" and percentile_label(99.9) == "99.9"


@pytest.mark.parametrize("burstiness", [1.0, 4.0, 0.25])
def test_arrival_gaps_mean_rate_and_burstiness(burstiness):
    gaps = serve.arrival_gaps(40001, rate=10.0, burstiness=burstiness, seed=0)
    assert gaps.shape == (40000,) and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(burstiness ** -0.5, rel=0.05)
    assert not serve.arrival_gaps(5, float("inf"), 1.0, 0).any()


def test_http_error_messages():
    assert serve._http_error(401, b'{"error": "Unauthorized"}') == "HTTP 401: Unauthorized"
    assert serve._http_error(400, b'{"error": {"message": "too long", "code": 400}}') == "HTTP 400: too long"
    assert serve._http_error(502, b"Bad Gateway\n") == "HTTP 502: Bad Gateway"


# ---------------------------------------------------------------- datasets

def test_random_prompts_have_exact_lengths(tok):
    reqs = random_requests(tok, 8, input_len=32, output_len=16, seed=1)
    specials = set(special_token_ids().values())
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len == 32
        assert r.expected_output_len == 16
        assert not specials & set(r.prompt)
    assert reqs[0].prompt != reqs[1].prompt
    again = random_requests(tok, 8, input_len=32, output_len=16, seed=1)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]


def test_random_prefix_and_range_ratio(tok):
    reqs = random_requests(tok, 20, input_len=40, output_len=10, range_ratio=0.5, prefix_len=7, seed=3)
    prefix = reqs[0].prompt[:7]
    for r in reqs:
        assert r.prompt[:7] == prefix
        assert 7 + 20 <= r.prompt_len <= 7 + 60 and r.prompt_len == len(r.prompt)
        assert 5 <= r.expected_output_len <= 15
    assert len({r.prompt_len for r in reqs}) > 1


def test_random_text_prompts_reencode_to_exact_length(tok):
    for r in random_requests(tok, 6, input_len=32, output_len=4, prefix_len=5, seed=2, as_text=True):
        assert isinstance(r.prompt, str)
        assert len(tok.encode(r.prompt)) == r.prompt_len == 37


def _write_sharegpt(path: Path) -> Path:
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "What is the capital of France, please?"},
                                      {"from": "gpt", "value": "The capital of France is Paris."}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "hello there, how may I help"},
                                      {"from": "human", "value": "Tell me a story about a dragon."},
                                      {"from": "gpt", "value": "Once upon a time there was a dragon."}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Only a question, no answer here."}]},
        {"id": "d", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello!"}]},
        {"id": "e"},
        "junk",
    ]
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_parsing(tmp_path, tok):
    path = _write_sharegpt(tmp_path / "sg.json")
    pairs = load_sharegpt(path)
    assert pairs == [("What is the capital of France, please?", "The capital of France is Paris."),
                     ("Tell me a story about a dragon.", "Once upon a time there was a dragon."),
                     ("hi", "hello!")]
    reqs = sharegpt_requests(tok, path, 2, seed=0)
    assert {r.prompt for r in reqs} == {pairs[0][0], pairs[1][0]}  # "hi" is pruned: under 4 tokens
    for r in reqs:
        answer = dict(pairs)[r.prompt]
        assert r.prompt_len == len(r.prompt.encode()) and r.expected_output_len == len(answer.encode())
    fixed = sharegpt_requests(tok, path, 5, output_len=7, seed=0)  # only 2 usable: repeated
    assert len(fixed) == 5 and all(r.expected_output_len == 7 for r in fixed)


def test_sharegpt_bad_files(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_sharegpt(tmp_path / "missing.json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="JSON list"):
        load_sharegpt(tmp_path / "obj.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no conversation"):
        sharegpt_requests(tok, tmp_path / "empty.json", 3)


# ---------------------------------------------------------------- flags and payloads

@pytest.mark.parametrize("argv, message", [
    (["--percentile-metrics", "ttft,foo"], "unknown foo"),
    (["--metric-percentiles", "abc"], "expected numbers"),
    (["--metric-percentiles", "0"], "(0, 100]"),
    (["--random-range-ratio", "1.5"], "[0, 1)"),
    (["--dataset-name", "sharegpt"], "needs --dataset-path"),
    (["--max-concurrency", "0"], "at least 1"),
])
def test_bad_flags_give_one_line(argv, message, capsys):
    from glm5_ascend.cli import main
    assert main(["bench", "serve", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("glm5-ascend: error: ") and message in err and "\n" not in err


def test_unreachable_server_gives_one_line(capsys):
    from glm5_ascend.cli import main
    assert main(["bench", "serve", "--port", str(_free_port()), "--num-prompts", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot reach" in err and "--host/--port/--base-url" in err


def test_payloads_and_urls(tok):
    req = random_requests(tok, 1, 8, 5)[0]
    body = serve.build_payload(_args("--ignore-eos"), "m", req)
    assert body["prompt"] == req.prompt and body["max_tokens"] == 5 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    chat = serve.build_payload(_args("--backend", "openai-chat"), "m", req)
    assert chat["max_completion_tokens"] == 5 and chat["messages"][0]["role"] == "user"
    assert "ignore_eos" not in chat and "max_tokens" not in chat
    assert serve._api_url(_args("--port", "9")) == "http://127.0.0.1:9/v1/completions"
    assert serve._api_url(_args("--base-url", "http://h:1/v1/", "--backend", "openai-chat")) == \
        "http://h:1/v1/chat/completions"
    assert serve.chunk_content({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == (False, "")
    assert serve.chunk_content({"choices": [{"delta": {"role": "assistant", "content": "a"}}]}) == (True, "a")
    assert serve.chunk_content({"choices": [{"index": 0, "text": ""}]}) == (True, "")  # a held-back byte
    assert serve.chunk_content({"choices": [{"delta": {"reasoning_content": "hm", "reasoning": "hm"}}]}) == \
        (True, "hm")
    assert serve.chunk_content({"choices": [], "usage": {"completion_tokens": 3}}) == (False, "")


# ---------------------------------------------------------------- the client against a scripted server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_app(seen: list):
    """A tiny vLLM-like server streaming one 'x' per token (the 2nd empty). Model 'boom': 500;
    13 tokens: an error event; 11 tokens: no [DONE]. Chat streams start with a role-only chunk."""
    from aiohttp import web

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "fake", "root": "fake"}]})

    async def stream(request):
        body = await request.json()
        seen.append((request.path, body, request.headers.get("Authorization")))
        if body["model"] == "boom":
            return web.json_response({"error": {"message": "engine exploded", "code": 500}}, status=500)
        chat = request.path.endswith("chat/completions")
        n = body.get("max_completion_tokens" if chat else "max_tokens")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def emit(obj):
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        if chat:
            await emit({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None})
        for i in range(n):
            await asyncio.sleep(0.002)
            if n == 13 and i == 2:
                await emit({"error": {"message": "lost the KV cache", "code": 500}})
                break
            text = "" if i == 1 else "x"  # as a detokenizer holding back half a character
            await emit({"choices": [{"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}]})
        else:
            await emit({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}})
        if n != 11:  # 11: the server dies without the closing [DONE]
            await resp.write(b"data: [DONE]\n\n")
        return resp

    async def tokenize(request):  # byte-level, like the tiny tokenizer
        tokens = list((await request.json())["prompt"].encode())
        return web.json_response({"tokens": tokens, "count": len(tokens)})

    async def detokenize(request):
        return web.json_response({"prompt": bytes((await request.json())["tokens"]).decode("utf-8", "replace")})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/completions", stream)
    app.router.add_post("/v1/chat/completions", stream)
    return app


@pytest.fixture(scope="module")
def fake_server():
    """(base URL, list of (path, body, auth) seen) of the scripted server, run in a background thread."""
    from aiohttp import web
    seen, port, loop = [], _free_port(), asyncio.new_event_loop()
    runner = web.AppRunner(_fake_app(seen))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", seen
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _send(url: str, body: dict) -> RequestOutput:
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            return await serve.send_request(session, url, {}, body, 3, 30.0)
    return asyncio.run(go())


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_client_times_a_stream(fake_server, backend):
    base, _ = fake_server
    args = _args("--backend", backend)
    req = serve.SampleRequest(prompt="hello" if backend == "openai-chat" else [1, 2, 3], prompt_len=3,
                              expected_output_len=6)
    out = _send(serve._api_url(_args("--base-url", base, "--backend", backend)), serve.build_payload(args, "f", req))
    assert out.success and out.error == ""
    assert out.output_tokens == 6 and out.generated_text == "x" * 5
    assert len(out.itl) == 5 and min(out.itl) >= 0 and sum(out.itl) >= 0.008  # the empty chunk counts, the role chunk not
    assert 0.002 <= out.ttft < out.latency  # the first token comes after a 2 ms sleep, the role chunk before it


def test_client_reports_failures(fake_server):
    base, _ = fake_server
    url = base + "/v1/completions"
    out = _send(url, {"model": "boom", "prompt": "a", "max_tokens": 4, "stream": True})
    assert not out.success and out.error == "HTTP 500: engine exploded"
    out = _send(url, {"model": "f", "prompt": "a", "max_tokens": 13, "stream": True})
    assert not out.success and out.error == "error event in the stream: lost the KV cache"
    out = _send(url, {"model": "f", "prompt": "a", "max_tokens": 11, "stream": True})
    assert not out.success and "[DONE]" in out.error
    out = _send(f"http://127.0.0.1:{_free_port()}/v1/completions", {"model": "f"})
    assert not out.success and out.error


def test_full_run_against_scripted_server(fake_server, tiny_tok_dir, tmp_path, capsys, monkeypatch):
    base, seen = fake_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    args = _args("--base-url", base, "--tokenizer", tiny_tok_dir, "--num-prompts", "12", "--random-input-len", "9",
                 "--random-output-len", "5", "--max-concurrency", "3", "--request-rate", "200",
                 "--metric-percentiles", "50,99", "--percentile-metrics", "ttft,tpot,itl,e2el",
                 "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json")
    n_seen = len(seen)
    assert serve.main(args) == 0
    report = capsys.readouterr().out
    assert "Successful requests:                     12" in report and "P50 E2EL (ms):" in report
    sent = seen[n_seen:]
    assert len(sent) == 13  # the test request, then the 12
    assert all(auth == "Bearer sk-test" and body["model"] == "fake" for _, body, auth in sent)
    assert all(len(body["prompt"]) == 9 for _, body, _ in sent)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["total_input_tokens"] == 12 * 9 and result["total_output_tokens"] == 12 * 5
    assert len(result["itls"]) == 12 and all(len(x) == 4 for x in result["itls"])
    assert result["p99_tpot_ms"] > 0 and result["max_concurrency"] == 3
    assert "api_key" not in result["args"] and result["args"]["request_rate"] == 200.0


def test_chat_run_with_server_tokenizer(fake_server, tmp_path, capsys):
    """No --model, no --tokenizer: the model comes from /v1/models, token counts from /tokenize."""
    base, seen = fake_server
    path = _write_sharegpt(tmp_path / "sg.json")
    args = _args("--base-url", base, "--backend", "openai-chat", "--dataset-name", "sharegpt", "--dataset-path",
                 str(path), "--num-prompts", "4", "--sharegpt-output-len", "3", "--disable-tqdm")
    n_seen = len(seen)
    assert serve.main(args) == 0
    assert "Successful requests:                     4" in capsys.readouterr().out
    bodies = [body for _, body, _ in seen[n_seen:]]
    assert all(b["model"] == "fake" and b["max_completion_tokens"] == 3 for b in bodies)
    assert {b["messages"][0]["content"] for b in bodies} == {p for p, _ in load_sharegpt(path)[:2]}


# ---------------------------------------------------------------- end to end on the real server

def _server_available() -> bool:
    try:
        return importlib.util.find_spec("glm5_ascend.server.__main__") is not None
    except ImportError:
        return False


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 120.0) -> None:
    import httpx
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"server not healthy at {url} after {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
@pytest.mark.skipif(not _server_available(), reason="glm5_ascend.server.__main__ is not importable yet")
def test_bench_serve_against_real_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "GLM5_CACHE_DIR": str(tmp_path / "cache")}
    log = tmp_path / "server.log"
    with open(log, "w") as sink:  # a file, not a pipe: an unread pipe would block the server's logging
        server = subprocess.Popen([sys.executable, "-m", "glm5_ascend.server", "--port", str(port)], cwd=REPO,
                                  env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(server, f"http://127.0.0.1:{port}/health", log)
        bench = subprocess.run(
            [sys.executable, "-m", "glm5_ascend.cli", "bench", "serve", "--port", str(port),
             "--dataset-name", "random", "--num-prompts", "16", "--max-concurrency", "4",
             "--random-input-len", "32", "--random-output-len", "16", "--ignore-eos", "--disable-tqdm",
             "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert bench.returncode == 0, bench.stdout + bench.stderr + log.read_text()[-4000:]
        assert "Serving Benchmark Result" in bench.stdout
        result = json.loads((tmp_path / "bench.json").read_text())
        assert result["completed"] == 16 and result["failed"] == 0, result["errors"]
        assert result["total_output_tokens"] == 16 * 16
        assert result["total_input_tokens"] == 16 * 32
        assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0
        assert all(t > 0 for t in result["ttfts"])
        # the server's own counters split the run: the model did real work, detokenization was timed
        assert "Server time breakdown" in bench.stdout
        parts = result["server_time_breakdown"]
        assert parts["model"] > 0 and parts["detokenize"] > 0 and parts["model"] < result["duration"]
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_server_time_breakdown_from_prometheus_text():
    from glm5_ascend.bench.breakdown import format_breakdown, parse_server_times
    text = (
        '# TYPE glm5:engine_step_seconds_total counter\n'
        'glm5:engine_step_seconds_total{model_name="m",phase="model"} 3.0\n'
        'glm5:engine_step_seconds_total{model_name="m",phase="detokenize"} 0.5\n'
        '# TYPE glm5:tokenize_seconds_total counter\n'
        'glm5:tokenize_seconds_total{model_name="m"} 0.25\n')
    after = parse_server_times(text)
    assert after == {"model": 3.0, "detokenize": 0.5, "tokenize": 0.25}
    table = format_breakdown({"model": 1.0}, after, duration=4.0, requests=2)
    lines = {line[:44].strip(): line[44:].split() for line in table.splitlines()[2:]}
    assert lines["engine: model forward + sampling"] == ["50.0%", "1000.00"]
    assert lines["server: chat template + tokenization"] == ["6.2%", "125.00"]
    assert lines["server: HTTP, JSON, SSE, event loop, idle"] == ["31.2%", "625.00"]  # 4 - 2 - 0.5 - 0.25
    assert format_breakdown({}, parse_server_times("# other server\nvllm:x 1\n"), 4.0, 2) == ""
