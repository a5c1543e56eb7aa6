"""Load and faults: 64 concurrent streaming clients, then 20 that hang up mid-stream."""
from __future__ import annotations

import asyncio
import time

import httpx

from tests.server.conftest import MODEL, metric, metric_values, sse_events

N_CLIENTS = 64
N_DISCONNECT = 20


async def _stream(c: httpx.AsyncClient, path: str, req: dict) -> list[dict]:
    """The JSON chunks of one streamed request, without the closing [DONE]."""
    async with c.stream("POST", path, json=req) as r:
        assert r.status_code == 200
        return [e for e in sse_events([line async for line in r.aiter_lines()]) if e != "[DONE]"]


async def _stream_completion(c: httpx.AsyncClient, i: int) -> dict:
    req = {"model": MODEL, "prompt": f"client number {i}", "max_tokens": 6 + i % 5, "ignore_eos": True,
           "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    text, ids, usage, finishes = "", [], None, 0
    for chunk in await _stream(c, "/v1/completions", req):
        if chunk["usage"] is not None:
            usage = chunk["usage"]
        for ch in chunk["choices"]:
            text += ch["text"]
            ids += ch["token_ids"]
            finishes += ch["finish_reason"] is not None
    return {"want": req["max_tokens"], "text": text, "ids": ids, "usage": usage, "finishes": finishes}


async def _stream_chat(c: httpx.AsyncClient, i: int) -> dict:
    req = {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 6 + i % 5,
           "ignore_eos": True, "stream": True, "logprobs": True, "chat_template_kwargs": {"enable_thinking": False},
           "stream_options": {"include_usage": True}}
    text, tokens, usage, finishes = "", [], None, 0
    for chunk in await _stream(c, "/v1/chat/completions", req):
        if chunk["usage"] is not None:
            usage = chunk["usage"]
        for ch in chunk["choices"]:
            text += ch["delta"].get("content") or ""
            tokens += [e["token"] for e in (ch["logprobs"] or {}).get("content") or []]
            finishes += ch["finish_reason"] is not None
    return {"want": req["max_tokens"], "text": text, "tokens": tokens, "usage": usage, "finishes": finishes}


def _scrape(url: str) -> dict:
    return metric_values(httpx.get(url + "/metrics").text)


def test_64_concurrent_streams(server):
    before = _scrape(server.url)

    async def main():
        limits = httpx.Limits(max_connections=N_CLIENTS + 8)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            jobs = [(_stream_completion if i % 2 else _stream_chat)(c, i) for i in range(N_CLIENTS)]
            results = await asyncio.gather(*jobs)
            # skip_special_tokens is on for completions; /detokenize shows everything (as vLLM's does)
            decoded = await asyncio.gather(*(c.post("/detokenize", json={"tokens": [t for t in r["ids"] if t < 256]})
                                             for r in results if "ids" in r))
            return results, [d.json()["prompt"] for d in decoded]

    results, decoded = asyncio.run(main())
    for r in results:
        streamed = len(r.get("ids", r.get("tokens")))
        assert streamed == r["usage"]["completion_tokens"] == r["want"], r  # nothing lost or repeated
        assert r["finishes"] == 1
    for r, text in zip([r for r in results if "ids" in r], decoded):
        assert r["text"] == text  # the text deltas add up to exactly the streamed tokens
    after = _scrape(server.url)

    def delta(name, **labels):
        return metric(after, name, model_name=MODEL, **labels) - metric(before, name, model_name=MODEL, **labels)
    assert delta("vllm:prompt_tokens_total") == sum(r["usage"]["prompt_tokens"] for r in results)
    assert delta("vllm:generation_tokens_total") == sum(r["usage"]["completion_tokens"] for r in results)
    assert delta("vllm:request_success_total", finished_reason="length") == N_CLIENTS
    assert delta("vllm:e2e_request_latency_seconds_count") == N_CLIENTS
    assert delta("vllm:time_to_first_token_seconds_count") == N_CLIENTS
    assert delta("vllm:request_generation_tokens_sum") == sum(r["want"] for r in results)
    # one gap per token after each request's first (one token per step: no speculative tokens here)
    assert delta("vllm:inter_token_latency_seconds_count") == sum(r["want"] - 1 for r in results)
    assert metric(after, "vllm:num_requests_running") == 0 and metric(after, "vllm:kv_cache_usage_perc") == 0


def test_disconnects_free_the_kv_cache(server):
    before = _scrape(server.url)

    async def hang_up(c: httpx.AsyncClient, i: int) -> int:
        req = {"prompt": f"leaving {i}", "max_tokens": 800, "ignore_eos": True, "stream": True}
        seen = 0
        async with c.stream("POST", "/v1/completions", json=req) as r:
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 2:
                    break  # leaving the block closes the connection mid-stream
        return seen

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            seen = await asyncio.gather(*(hang_up(c, i) for i in range(N_DISCONNECT)))
            assert seen == [2] * N_DISCONNECT
            busy = metric_values((await c.get("/metrics")).text)
            return metric(busy, "vllm:kv_cache_usage_perc")

    asyncio.run(main())
    deadline, after = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        after = _scrape(server.url)
        if (metric(after, "vllm:kv_cache_usage_perc") == 0 and metric(after, "vllm:num_requests_running") == 0
                and metric(after, "vllm:request_success_total", finished_reason="abort")
                - metric(before, "vllm:request_success_total", finished_reason="abort") == N_DISCONNECT):
            break
        time.sleep(0.1)
    assert metric(after, "vllm:kv_cache_usage_perc") == 0, "aborted requests kept their KV blocks"
    assert metric(after, "vllm:num_requests_waiting") == 0
    aborted = (metric(after, "vllm:request_success_total", finished_reason="abort")
               - metric(before, "vllm:request_success_total", finished_reason="abort"))
    assert aborted == N_DISCONNECT
    # every hung-up request stopped long before its 800 tokens
    assert metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") < 400
    assert httpx.get(server.url + "/load").json() == {"server_load": 0}
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "still there?", "max_tokens": 3,
                                                         "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_disconnect_aborts(server):
    """A client that gives up on a non-streamed request also frees its blocks."""
    before = _scrape(server.url)
    try:
        httpx.post(server.url + "/v1/completions", json={"prompt": "slow", "max_tokens": 1000, "ignore_eos": True},
                   timeout=0.5)
    except httpx.TimeoutException:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = _scrape(server.url)
        gone = (metric(after, "vllm:request_success_total", finished_reason="abort")
                - metric(before, "vllm:request_success_total", finished_reason="abort"))
        if gone == 1 and metric(after, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.1)
    assert gone == 1 and metric(after, "vllm:kv_cache_usage_perc") == 0


def test_load_counts_requests_in_flight(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            req = {"prompt": "busy", "max_tokens": 300, "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/completions", json=req) as r1, \
                    c.stream("POST", "/v1/completions", json=req) as r2:
                # keep the line iterators referenced: a dropped one closes its stream
                lines = [r1.aiter_lines(), r2.aiter_lines()]
                for it in lines:
                    while not (await it.__anext__()).startswith("data: "):
                        pass
                during = (await c.get("/load")).json()["server_load"]
            for _ in range(100):
                after = (await c.get("/load")).json()["server_load"]
                if after == 0:
                    break
                await asyncio.sleep(0.05)
            return during, after
    assert asyncio.run(main()) == (2, 0)
