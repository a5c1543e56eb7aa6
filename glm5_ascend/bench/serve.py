"""`glm5-ascend bench serve`: load-test a running vLLM-compatible server, like `vllm bench serve`.

Every request streams with `include_usage`; times come from chunk arrivals (see bench/metrics.py),
token counts from the server's usage. Requests arrive all at once (--request-rate inf) or as a Poisson
(gamma, with --burstiness) process, capped at --max-concurrency in flight.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from glm5_ascend.bench.breakdown import format_breakdown, scrape_server_times
from glm5_ascend.bench.datasets import (LocalTokenizer, RemoteTokenizer, SampleRequest, Tokenizer,
                                        random_requests, sharegpt_requests)
from glm5_ascend.bench.metrics import (METRICS, RequestOutput, compute_metrics, format_report,
                                       per_request_lists, timings_from_chunks)

logger = logging.getLogger(__name__)

ENDPOINTS = {"openai": "/v1/completions", "vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}
_CONNECT_TIMEOUT_S = 30.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `vllm bench serve` that this client implements, with vLLM's names and defaults."""
    p.add_argument("--backend", choices=sorted(ENDPOINTS), default="openai",
                   help="openai (or vllm): /v1/completions; openai-chat: /v1/chat/completions")
    p.add_argument("--base-url", default=None, help="server URL, e.g. http://host:8000 (overrides --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=None, help="API path (default: by --backend)")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    p.add_argument("--served-model-name", default=None, help="name sent in requests when it differs from --model")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer path (default: the model's directory if local, else the server's /tokenize)")
    p.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (for --dataset-name sharegpt)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="draw lengths uniformly in [len*(1-r), len*(1+r)]; 0 <= r < 1")
    p.add_argument("--random-prefix-len", type=int, default=0, help="tokens of a prefix shared by every prompt")
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="fixed output length for ShareGPT (default: each answer's length)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (default inf: send all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival times; 1 = Poisson, <1 burstier, >1 steadier")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--ignore-eos", action="store_true", help="generate the full output length")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                   help=f"comma-separated subset of {','.join(METRICS)} to report")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles, e.g. 50,90,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds before one request is failed")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--save-result", action="store_true", help="write the figures and per-request data as JSON")
    p.add_argument("--result-dir", default=None, help="directory for --save-result (default: current)")
    p.add_argument("--result-filename", default=None, help="file name for --save-result")


def _parse_options(args) -> tuple[list[str], list[float]]:
    """Check flag values; return (metrics to print, percentiles). Raises ValueError with one clear line."""
    selected = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    unknown = [m for m in selected if m not in METRICS]
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {','.join(unknown)}; choose from {','.join(METRICS)}")
    try:
        percentiles = [float(x) for x in args.metric_percentiles.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles {args.metric_percentiles!r}: expected numbers like 50,90,99") from None
    if not percentiles or any(not 0 < p <= 100 for p in percentiles):
        raise ValueError("--metric-percentiles: each value must be in (0, 100]")
    checks = [
        (args.num_prompts >= 1, "--num-prompts must be at least 1"),
        (args.random_input_len >= 1 and args.random_output_len >= 1,
         "--random-input-len and --random-output-len must be at least 1"),
        (args.random_prefix_len >= 0, "--random-prefix-len must be >= 0"),
        (0 <= args.random_range_ratio < 1, "--random-range-ratio must be in [0, 1)"),
        (args.request_rate > 0, "--request-rate must be > 0 (inf sends all at once)"),
        (args.burstiness > 0, "--burstiness must be > 0"),
        (args.max_concurrency is None or args.max_concurrency >= 1, "--max-concurrency must be at least 1"),
        (args.sharegpt_output_len is None or args.sharegpt_output_len >= 1, "--sharegpt-output-len must be >= 1"),
        (args.request_timeout > 0, "--request-timeout must be > 0"),
        (args.dataset_name != "sharegpt" or args.dataset_path, "--dataset-name sharegpt needs --dataset-path FILE"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return selected, percentiles


def _base_url(args) -> str:
    return (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")


def _api_url(args) -> str:
    base, endpoint = _base_url(args), args.endpoint or ENDPOINTS[args.backend]
    endpoint = endpoint if endpoint.startswith("/") else "/" + endpoint
    if base.endswith("/v1") and endpoint.startswith("/v1/"):  # --base-url http://h:p/v1 is common too
        base = base[:-3]
    return base + endpoint


def _headers(args) -> dict[str, str]:
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _server_models(base: str, headers: dict[str, str]) -> list[dict]:
    """The model cards of GET /v1/models."""
    import httpx
    root = base[:-3] if base.endswith("/v1") else base
    try:
        r = httpx.get(f"{root}/v1/models", headers=headers, timeout=_CONNECT_TIMEOUT_S, trust_env=False)
    except httpx.HTTPError as e:
        raise RuntimeError(f"cannot reach {root}/v1/models ({e}); is the server up? check --host/--port/--base-url")
    if r.status_code != 200:
        raise RuntimeError(f"GET {root}/v1/models answered {r.status_code}: {r.text[:200]} "
                           "(pass --api-key if the server needs one)")
    return list(r.json().get("data") or [])


def _resolve_model(args, headers) -> tuple[str, str | None]:
    """(model name, model path for the tokenizer if known) from --model or the server's first model."""
    if args.model and (args.tokenizer or Path(args.model).is_dir()):
        return args.model, args.model
    cards = _server_models(_base_url(args), headers)
    if args.model:
        card = next((c for c in cards if c.get("id") in (args.model, args.served_model_name)), {})
        return args.model, card.get("root")
    if not cards:
        raise RuntimeError("the server lists no model at /v1/models; pass --model NAME")
    return cards[0]["id"], cards[0].get("root")


def _make_tokenizer(args, model: str, model_path: str | None, headers) -> Tokenizer:
    """--tokenizer, else the model's local directory, else the server's /tokenize."""
    if args.tokenizer:
        return LocalTokenizer(args.tokenizer)
    for path in (model, model_path):
        if path and Path(path).is_dir():
            try:
                return LocalTokenizer(path)
            except ValueError as e:
                logger.warning("%s; counting tokens with the server instead", e)
    logger.info("no local tokenizer for %s; counting tokens with the server's /tokenize", model)
    return RemoteTokenizer(_base_url(args).removesuffix("/v1"), args.served_model_name or model, headers)


def _build_requests(args, tok: Tokenizer) -> list[SampleRequest]:
    if args.dataset_name == "sharegpt":
        return sharegpt_requests(tok, args.dataset_path, args.num_prompts, args.sharegpt_output_len, args.seed)
    # Completions take token ids, so prompt lengths are exact; chat needs text.
    return random_requests(tok, args.num_prompts, args.random_input_len, args.random_output_len,
                           args.random_range_ratio, args.random_prefix_len, args.seed,
                           as_text=args.backend == "openai-chat")


def build_payload(args, model: str, req: SampleRequest) -> dict:
    """The JSON body of one streamed request."""
    body: dict = {"model": model, "temperature": args.temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if args.backend == "openai-chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.expected_output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.expected_output_len
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


def chunk_content(data: dict) -> tuple[bool, str]:
    """(whether this chunk stands for generated tokens, its text).

    Any chunk with choices does, even with empty text (the detokenizer holds back a partial character
    or a skipped special token), except a chat chunk that only announces the assistant's role: a server
    may send that before prefill is done, and it would make TTFT look near zero.
    """
    choices = data.get("choices") or []
    if not choices:
        return False, ""
    choice = choices[0]
    if "delta" in choice:
        delta = choice.get("delta") or {}
        text = (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
        role_only = "role" in delta and not text and not delta.get("tool_calls")
        return not role_only, text
    return True, choice.get("text") or ""


def _error_text(body) -> str:
    """The message of vLLM's error body `{"error": {"message": ...}}` (or `{"error": "..."}`), else the body."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err if err is not None else body)


def _http_error(status: int, raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    try:
        text = _error_text(json.loads(text))
    except ValueError:
        pass
    return f"HTTP {status}: {text.strip()[:500]}"


async def _read_events(resp):
    """Yield (arrival time, parsed JSON) per SSE `data:` event; (time, None) marks [DONE]."""
    buf = b""
    async for piece in resp.content.iter_any():
        buf = (buf + piece).replace(b"\r\n", b"\n")  # on the joined buffer: a CRLF may straddle pieces
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            now = time.perf_counter()
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue  # comments / keep-alives
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    yield now, None
                    return
                data = json.loads(payload)
                if not isinstance(data, dict):
                    raise ValueError(f"malformed stream event {payload[:100]!r}")
                yield now, data


async def send_request(session, url: str, headers: dict, body: dict, prompt_len: int,
                       timeout_s: float) -> RequestOutput:
    """Stream one request and time it; failures come back as success=False with a message."""
    import aiohttp
    out = RequestOutput(prompt_len=prompt_len)
    token_times: list[float] = []
    texts, usage_tokens, end = [], None, None
    start = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                out.error = _http_error(resp.status, await resp.read())
                return out
            async for now, data in _read_events(resp):
                if data is None:
                    end = now
                    break
                if data.get("error"):
                    out.error = f"error event in the stream: {_error_text(data)[:500]}"
                    return out
                is_token, text = chunk_content(data)
                if is_token:
                    token_times.append(now)
                    texts.append(text)
                if data.get("usage"):
                    usage_tokens = data["usage"].get("completion_tokens")
    except asyncio.TimeoutError:
        out.error = f"timed out after {timeout_s:g} s (--request-timeout)"
        return out
    except (aiohttp.ClientError, ValueError, OSError) as e:
        out.error = f"{type(e).__name__}: {e}"
        return out
    if end is None:  # a vLLM server always ends with [DONE]; without it the server died mid-answer
        out.error = "the stream closed before data: [DONE]"
        return out
    out.ttft, out.itl, out.latency = timings_from_chunks(start, token_times, end)
    out.generated_text = "".join(texts)
    out.output_tokens = usage_tokens if usage_tokens is not None else -1  # -1: count it from the text later
    out.success = True
    return out


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Seconds to wait after each of the first n-1 requests: gamma(burstiness, 1/(rate*burstiness)).

    The mean gap is 1/rate whatever the burstiness; burstiness 1 gives Poisson arrivals, and the gaps'
    coefficient of variation is 1/sqrt(burstiness). An infinite rate sends everything at once.
    """
    if not math.isfinite(rate):
        return np.zeros(max(n - 1, 0))
    return np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=max(n - 1, 0))


async def _arrivals(requests: list[SampleRequest], rate: float, burstiness: float, seed: int):
    gaps = arrival_gaps(len(requests), rate, burstiness, seed)
    for i, req in enumerate(requests):
        yield req
        if i < len(gaps) and gaps[i] > 0:
            await asyncio.sleep(float(gaps[i]))


def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        disable = True
    if disable:
        class _Null:
            def update(self, n=1): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total)


async def run_benchmark(args, url: str, model: str, headers: dict,
                        requests: list[SampleRequest]) -> tuple[list[RequestOutput], float, tuple]:
    """Check one request, then send all; return (outputs in dataset order, wall duration in s,
    the server's time counters before and after)."""
    import aiohttp
    pool = args.max_concurrency or len(requests)
    connector = aiohttp.TCPConnector(limit=pool, limit_per_host=pool, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, sock_connect=_CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        def send(req: SampleRequest):
            return send_request(session, url, headers, build_payload(args, model, req), req.prompt_len,
                                args.request_timeout)

        logger.info("sending one test request to %s", url)
        test = await send(requests[0])
        if not test.success:
            raise RuntimeError(f"the test request to {url} failed: {test.error}")
        before = await scrape_server_times(session, url, headers)
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = _progress(len(requests), args.disable_tqdm)

        async def one(req: SampleRequest) -> RequestOutput:
            if sem is None:
                out = await send(req)
            else:
                async with sem:
                    out = await send(req)
            bar.update(1)
            return out

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(req))
                 async for req in _arrivals(requests, args.request_rate, args.burstiness, args.seed)]
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        bar.close()
        after = await scrape_server_times(session, url, headers)
    return outputs, duration, (before, after)



def _result_path(args, model: str) -> Path:
    if args.result_filename:
        name = args.result_filename
    else:
        rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
        conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{args.backend}-{rate}qps{conc}-{Path(model).name}-{stamp}.json"
    directory = Path(args.result_dir or ".")
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name


def save_result(args, model: str, tokenizer_id: str, metrics: dict, outputs: list[RequestOutput]) -> Path:
    """Write the run's arguments, the aggregate figures and per-request lists as JSON."""
    run_args = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "api_key"}
    run_args = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in run_args.items()}
    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": args.backend, "model_id": model,
        "tokenizer_id": tokenizer_id, "num_prompts": args.num_prompts,
        "request_rate": run_args["request_rate"], "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency, "args": run_args,
        **metrics, **per_request_lists(outputs),
    }
    path = _result_path(args, model)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def main(args) -> int:
    """Run the benchmark, print the table, optionally save JSON. Returns 0 if any request succeeded."""
    selected, percentiles = _parse_options(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per /tokenize call drowns the output
    headers = _headers(args)
    model, model_path = _resolve_model(args, headers)
    request_model = args.served_model_name or model
    tok = _make_tokenizer(args, model, model_path, headers)
    requests = _build_requests(args, tok)
    url = _api_url(args)
    print(f"Benchmarking {url} ({request_model}): {len(requests)} prompts, request rate {args.request_rate:g}, "
          f"burstiness {args.burstiness:g}, max concurrency {args.max_concurrency or 'unlimited'}", flush=True)
    outputs, duration, (before, after) = asyncio.run(run_benchmark(args, url, request_model, headers, requests))
    for out in outputs:
        if out.success and out.output_tokens < 0:  # the server sent no usage: count the text ourselves
            out.output_tokens = len(tok.encode(out.generated_text))
    metrics = compute_metrics(outputs, duration, percentiles)
    errors = [o.error for o in outputs if not o.success]
    if errors:
        print(f"{len(errors)} of {len(outputs)} requests failed; first error: {errors[0]}")
    print(format_report(metrics, selected, percentiles, args.max_concurrency, args.request_rate))
    breakdown = format_breakdown(before, after, duration, len(outputs))
    if breakdown:
        print(breakdown)
        metrics["server_time_breakdown"] = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    if args.save_result:
        print(f"Saved result to {save_result(args, model, tok.name, metrics, outputs)}")
    return 0 if metrics["completed"] else 1
