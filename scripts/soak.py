#!/usr/bin/env python3
"""Soak a `glm5-ascend serve` with well-behaved and hostile clients at once; print (and --json) the figures.

    python3 scripts/soak.py --duration 600          # starts the tiny model's server itself
    python3 scripts/soak.py --url http://host:8000  # an existing server (no RSS figures then)

Phases: warm-up; reference tokens (each well-behaved prompt alone, greedy); a baseline of the well-behaved
clients alone (TTFT); the soak: --clients streaming clients, --hostile clients cycling through huge prompts,
huge chat histories, huge logit_bias, deep JSON, malformed bodies and mid-stream disconnects, and a prober
polling /health, each in its own process so that no client's work skews another's timings. Then: KV-cache
usage back at its start, resident memory against its level after warm-up.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import httpx

MAX_TOKENS = 16


def _prompt(i: int) -> str:
    return f"Client {i} asks for a story about the number {i * 7919 % 1000}."


def _good_body(i: int, stream: bool) -> dict:
    return {"prompt": _prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}


def hostile_cases() -> dict[str, bytes]:
    """Request bodies a hostile client sends (bytes, built once)."""
    deep = 200_000
    return {
        "huge_prompt": json.dumps({"prompt": "hello world " * 2_000_000, "max_tokens": 4}).encode(),
        "long_prompt": json.dumps({"prompt": "x" * 300_000, "max_tokens": 4}).encode(),
        "huge_chat": json.dumps({"messages": [{"role": "user", "content": "hi"}] * 50_000}).encode(),
        "huge_logit_bias": json.dumps({"prompt": "hi", "max_tokens": 2,
                                       "logit_bias": {str(i): 1 for i in range(300_000)}}).encode(),
        "deep_json": b'{"prompt": ' + b"[" * deep + b"]" * deep + b"}",
        "malformed": b'{"prompt": "hi", "max_tokens": ',
        "bad_utf8": b'{"prompt": "\xff\xfe", "max_tokens": 2}',
    }


# ---------------------------------------------------------------- client processes
async def _stream_once(c: httpx.AsyncClient, url: str, i: int) -> tuple[int, float | None, list[int], bool]:
    t0 = time.perf_counter()
    ttft, tokens, error = None, [], False
    async with c.stream("POST", url + "/v1/completions", json=_good_body(i, True)) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = True
            elif event["choices"]:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                tokens += event["choices"][0].get("token_ids") or []
        return r.status_code, ttft, tokens, error


def good_clients(url: str, n: int, seconds: float, reference: dict, out) -> None:
    async def client(i: int, c: httpx.AsyncClient, deadline: float, rows: list):
        while time.monotonic() < deadline:
            status, ttft, tokens, error = await _stream_once(c, url, i)
            rows.append({"status": status, "ttft": ttft, "same": tokens == reference[str(i)], "error": error})

    async def main():
        rows: list = []
        limits = httpx.Limits(max_connections=n + 4)
        async with httpx.AsyncClient(timeout=300, limits=limits) as c:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(client(i, c, deadline, rows) for i in range(n)))
        out.put(rows)
    asyncio.run(main())


def hostile_clients(url: str, n: int, seconds: float, pause: float, out) -> None:
    cases = hostile_cases()
    names = [*cases, "disconnect"]

    async def disconnect(c: httpx.AsyncClient) -> int:
        body = {**_good_body(0, True), "max_tokens": 500}
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # hang up mid-stream
            return r.status_code

    async def client(k: int, deadline: float, rows: list):
        j = k
        async with httpx.AsyncClient(timeout=300) as c:
            while time.monotonic() < deadline:
                name = names[j % len(names)]
                j += 1
                path = "/v1/chat/completions" if name == "huge_chat" else "/v1/completions"
                try:
                    if name == "disconnect":
                        status = await disconnect(c)
                    else:
                        r = await c.post(url + path, content=cases[name],
                                         headers={"content-type": "application/json"})
                        status = r.status_code
                except httpx.HTTPError as e:
                    status = f"{type(e).__name__}"
                rows.append({"case": name, "status": status})
                await asyncio.sleep(pause)

    async def main():
        rows: list = []
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client(k, deadline, rows) for k in range(n)))
        out.put(rows)
    asyncio.run(main())


def health_prober(url: str, seconds: float, out) -> None:
    lat = []
    with httpx.Client(timeout=30) as c:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            status = c.get(url + "/health").status_code
            lat.append((time.perf_counter() - t0, status))
            time.sleep(0.05)
    out.put(lat)


def _run(targets: list) -> list:
    """Start each (function, args) in its own process; their results, in order."""
    ctx = mp.get_context("spawn")
    queues, procs = [], []
    for fn, args in targets:
        q = ctx.Queue()
        p = ctx.Process(target=fn, args=(*args, q))
        p.start()
        queues.append(q)
        procs.append(p)
    results = [q.get() for q in queues]
    for p in procs:
        p.join()
    return results


# ---------------------------------------------------------------- measurements
def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def kv_usage(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:kv_cache_usage_perc"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("no vllm:kv_cache_usage_perc in /metrics")


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _wait_idle(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/load", timeout=30).json()["server_load"] == 0 and kv_usage(url) == 0:
            return
        time.sleep(0.5)


def soak(url: str, pid: int | None, clients: int, hostile: int, seconds: float, baseline_seconds: float,
         pause: float = 0.1) -> dict:
    with httpx.Client(timeout=300) as c:
        for i in range(3):  # warm-up
            c.post(url + "/v1/completions", json=_good_body(i, False)).raise_for_status()
        reference = {}
        for i in range(clients):  # each prompt alone: the tokens every later run must repeat
            r = c.post(url + "/v1/completions", json=_good_body(i, False))
            r.raise_for_status()
            reference[str(i)] = r.json()["choices"][0]["token_ids"]
    _wait_idle(url)
    rss_warm, kv_start = _rss(pid), kv_usage(url)
    (base,) = _run([(good_clients, (url, clients, baseline_seconds, reference))])
    (good, bad, health) = _run([(good_clients, (url, clients, seconds, reference)),
                                (hostile_clients, (url, hostile, seconds, pause)), (health_prober, (url, seconds))])
    _wait_idle(url)
    rss_end, kv_end = _rss(pid), kv_usage(url)
    statuses: dict = {}
    for row in bad:
        statuses.setdefault(row["case"], {}).setdefault(str(row["status"]), 0)
        statuses[row["case"]][str(row["status"])] += 1
    base_ttft = [r["ttft"] for r in base if r["ttft"] is not None]
    soak_ttft = [r["ttft"] for r in good if r["ttft"] is not None]
    return {
        "clients": clients, "hostile": hostile, "seconds": seconds, "hostile_pause_s": pause,
        "health_p50_ms": _p([h[0] for h in health], 0.5) * 1e3, "health_p99_ms": _p([h[0] for h in health], 0.99) * 1e3,
        "health_max_ms": max(h[0] for h in health) * 1e3, "health_probes": len(health),
        "health_not_200": sum(h[1] != 200 for h in health),
        "baseline_requests": len(base), "baseline_ttft_p99_ms": _p(base_ttft, 0.99) * 1e3,
        "soak_requests": len(good), "soak_ttft_p99_ms": _p(soak_ttft, 0.99) * 1e3,
        "good_not_200": sum(r["status"] != 200 for r in good + base),
        "good_errors": sum(r["error"] for r in good + base),
        "good_mismatched": sum(not r["same"] for r in good + base),
        "hostile_requests": len(bad), "hostile_statuses": statuses,
        "kv_usage_start": kv_start, "kv_usage_end": kv_end,
        "rss_after_warmup_mib": rss_warm / 2**20 if rss_warm else None,
        "rss_end_mib": rss_end / 2**20 if rss_end else None,
    }


def _probe_until(url: str, stop, out) -> None:
    lat = []
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            c.get(url + "/health")
            lat.append(time.perf_counter() - t0)
            time.sleep(0.01)
    out.put(lat)


def one_at_a_time(url: str, pid: int | None) -> list[dict]:
    """Each huge request alone, /health polled every 10 ms from another process meanwhile."""
    cases = [("24 MB text prompt", "/v1/completions", {"prompt": "hello world " * 2_000_000, "max_tokens": 4}),
             ("50,000 chat messages", "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "hi"}] * 50_000}),
             ("5,000,000 prompt token ids", "/v1/completions", {"prompt": [1] * 5_000_000}),
             ("147,000-character prompt", "/v1/completions", {"prompt": "hello world " * 12_250, "max_tokens": 1})]
    ctx = mp.get_context("spawn")
    rows = [{"case": "fresh", "rss_mib": (_rss(pid) or 0) / 2**20}]
    with httpx.Client(timeout=120) as c:
        for name, path, body in cases:
            raw = json.dumps(body).encode()
            stop, q = ctx.Event(), ctx.Queue()
            prober = ctx.Process(target=_probe_until, args=(url, stop, q))
            prober.start()
            time.sleep(0.5)
            t0 = time.perf_counter()
            r = c.post(url + path, content=raw, headers={"content-type": "application/json"})
            seconds = time.perf_counter() - t0
            time.sleep(0.3)
            stop.set()
            lat = q.get()
            prober.join()
            rows.append({"case": name, "status": r.status_code, "seconds": seconds, "health_max_ms": max(lat) * 1e3,
                         "rss_mib": (_rss(pid) or 0) / 2**20})
    return rows


def start_server(extra: list[str], log_path: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "glm5_ascend.server", "--host", "127.0.0.1", "--port", str(port),
                             "--uvicorn-log-level", "warning", *extra], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not start; see {log_path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an existing server (default: start the tiny model's)")
    p.add_argument("--duration", type=float, default=120, help="seconds of soak")
    p.add_argument("--baseline", type=float, default=30, help="seconds of well-behaved clients alone first")
    p.add_argument("--clients", type=int, default=32, help="well-behaved streaming clients")
    p.add_argument("--hostile", type=int, default=4, help="hostile clients")
    p.add_argument("--hostile-pause", type=float, default=0.1,
                   help="seconds each hostile client waits between its requests (0: back to back)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="instead of the soak: each huge request alone (the issue's cases), /health polled meanwhile")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--server-log", default="soak-server.log", help="the started server's log")
    p.add_argument("server_args", nargs="*", help="after --: flags for the started server")
    args = p.parse_args(argv)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.server_args, args.server_log)
    try:
        pid = proc.pid if proc else None
        if args.one_at_a_time:
            with httpx.Client(timeout=300) as c:
                for i in range(3):
                    c.post(url + "/v1/completions", json=_good_body(i, False)).raise_for_status()
            figures = one_at_a_time(url, pid)
        else:
            figures = soak(url, pid, args.clients, args.hostile, args.duration, args.baseline, args.hostile_pause)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
