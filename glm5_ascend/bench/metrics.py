"""Per-request timings and the figures `glm5-ascend bench serve` reports (vLLM's definitions and key names).

TTFT: request sent -> first chunk with generated tokens (non-empty choices; not a chat role announcement).
ITL: gaps between later such chunks.
TPOT: (E2E - TTFT) / (output tokens - 1), output tokens from the server's final usage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# metric key -> (section title, short name) in the printed table
METRICS = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}
_WIDTH = 50


@dataclass
class RequestOutput:
    """What one request measured; times in seconds."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    generated_text: str = ""
    error: str = ""


def timings_from_chunks(start: float, token_times: list[float], end: float) -> tuple[float, list[float], float]:
    """(ttft, itl, e2e) from the send time, the arrival times of token chunks, and the stream's end."""
    if not token_times:
        return end - start, [], end - start
    itl = [b - a for a, b in zip(token_times, token_times[1:])]
    return token_times[0] - start, itl, end - start


def tpot(out: RequestOutput) -> float | None:
    """Mean time per output token after the first; None when there is no second token."""
    if out.output_tokens <= 1:
        return None
    return (out.latency - out.ttft) / (out.output_tokens - 1)


def percentile_label(p: float) -> str:
    """99 -> '99', 99.9 -> '99.9' (vLLM's spelling in keys and titles)."""
    return str(int(p)) if float(p).is_integer() else str(p)


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    if ms.size == 0:  # no samples (e.g. every request failed): report zeros, as vLLM does
        ms = np.zeros(1)
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    for p in percentiles:
        out[f"p{percentile_label(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def compute_metrics(outputs: list[RequestOutput], duration_s: float, percentiles: list[float]) -> dict:
    """Aggregate figures over successful requests, keyed like vLLM's saved result."""
    ok = [o for o in outputs if o.success]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    duration_s = max(duration_s, 1e-9)
    result = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(outputs) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    tpots = [t for t in map(tpot, ok) if t is not None]
    samples = {"ttft": [o.ttft for o in ok], "tpot": tpots,
               "itl": [g for o in ok for g in o.itl], "e2el": [o.latency for o in ok]}
    for name, values in samples.items():
        result.update(_stats(name, values, percentiles))
    return result


def per_request_lists(outputs: list[RequestOutput]) -> dict[str, list]:
    """Per-request columns for the saved JSON (all requests, in dataset order)."""
    return {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_tokens for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "tpots": [tpot(o) or 0.0 for o in outputs],
        "itls": [o.itl for o in outputs],
        "e2els": [o.latency for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }


def _row(label: str, value) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40} {text:<10}"


def format_report(result: dict, selected: list[str], percentiles: list[float],
                  max_concurrency: int | None = None, request_rate: float | None = None) -> str:
    """The result table, laid out like `vllm bench serve`'s."""
    lines = [" Serving Benchmark Result ".center(_WIDTH, "="),
             _row("Successful requests:", result["completed"]),
             _row("Failed requests:", result["failed"])]
    if max_concurrency:
        lines.append(_row("Maximum request concurrency:", max_concurrency))
    if request_rate is not None:
        lines.append(_row("Request rate configured (RPS):", request_rate))
    lines += [
        _row("Benchmark duration (s):", float(result["duration"])),
        _row("Total input tokens:", result["total_input_tokens"]),
        _row("Total generated tokens:", result["total_output_tokens"]),
        _row("Request throughput (req/s):", float(result["request_throughput"])),
        _row("Output token throughput (tok/s):", float(result["output_throughput"])),
        _row("Total Token throughput (tok/s):", float(result["total_token_throughput"])),
    ]
    for name in selected:
        title, short = METRICS[name]
        lines.append(title.center(_WIDTH, "-"))
        lines.append(_row(f"Mean {short} (ms):", result[f"mean_{name}_ms"]))
        lines.append(_row(f"Median {short} (ms):", result[f"median_{name}_ms"]))
        for p in percentiles:
            lines.append(_row(f"P{percentile_label(p)} {short} (ms):", result[f"p{percentile_label(p)}_{name}_ms"]))
    lines.append("=" * _WIDTH)
    return "\n".join(lines)
