"""Where a served request's time goes, from a glm5-ascend server's own /metrics.

The server counts its engine step thread's wall time by phase (glm5:engine_step_seconds) and its
chat-template + tokenization time (glm5:tokenize_seconds). Scraped before and after a benchmark,
the deltas split the run's wall time into engine work (model forward + sampling, scheduling,
detokenization, other bookkeeping), server tokenization, and the rest: HTTP, JSON, SSE framing and
the event loop, plus any idle time. Other servers lack these series; then no breakdown is shown.
"""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

_PHASES = (("model", "engine: model forward + sampling"), ("schedule", "engine: scheduling"),
           ("detokenize", "engine: detokenization"), ("postprocess", "engine: other bookkeeping"))


def parse_server_times(text: str) -> dict[str, float]:
    """{phase: seconds, "tokenize": seconds} from Prometheus text; {} if the server has no such series."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "glm5:engine_step_seconds_total":
                phase = sample.labels.get("phase", "")
                out[phase] = out.get(phase, 0.0) + sample.value
            elif sample.name == "glm5:tokenize_seconds_total":
                out["tokenize"] = out.get("tokenize", 0.0) + sample.value
    return out


async def scrape_server_times(session, url: str, headers: dict) -> dict[str, float]:
    """The server's own time counters (glm5-ascend only); {} when it has none or /metrics fails."""
    metrics_url = url.split("/v1/")[0] + "/metrics"
    try:
        async with session.get(metrics_url, headers=headers) as resp:
            return parse_server_times(await resp.text()) if resp.status == 200 else {}
    except Exception:  # noqa: BLE001 - the breakdown is optional; the benchmark itself must not fail
        return {}


def format_breakdown(before: dict[str, float], after: dict[str, float], duration: float, requests: int) -> str:
    """A table of each part's share of the benchmark's wall time and its mean per request."""
    if not after or duration <= 0 or requests <= 0:
        return ""
    rows = [(label, after.get(k, 0.0) - before.get(k, 0.0)) for k, label in _PHASES]
    rows.append(("server: chat template + tokenization", after.get("tokenize", 0.0) - before.get("tokenize", 0.0)))
    rest = duration - sum(v for _, v in rows)
    rows.append(("server: HTTP, JSON, SSE, event loop, idle", max(rest, 0.0)))
    lines = ["{s:{c}^50}".format(s=" Server time breakdown ", c="-"),
             f"{'part':<44}{'share':>8}{'ms/request':>12}"]
    for label, secs in rows:
        lines.append(f"{label:<44}{100 * secs / duration:>7.1f}%{1000 * secs / requests:>12.2f}")
    return "\n".join(lines)
