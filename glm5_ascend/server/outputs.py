"""Response pieces both serving paths share: usage, SSE framing, logprob JSON and per-choice stream state.

/v1/completions and /v1/chat/completions differ in their bodies' shapes, not in how they count tokens,
frame events, show logprobs or track what a streamed choice has already sent; those live here, once.
"""
from __future__ import annotations

import json

NEG_INF = -9999.0  # what OpenAI shows for a -inf logprob


def logprob_value(lp: float) -> float:
    return max(lp, NEG_INF)


def sse(obj: dict) -> str:
    """One Server-Sent Event holding a JSON body."""
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """vLLM's UsageInfo; prompt_tokens_details only with --enable-prompt-tokens-details (cached_tokens given)."""
    details = None if cached_tokens is None else {"cached_tokens": cached_tokens}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": details}


def stream_usage(stream_options, force: bool = False) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a stream: the request's stream_options, or every stream
    when --enable-force-include-usage is set (vLLM's rule)."""
    if stream_options is None:
        return force, False
    include = bool(stream_options.include_usage) or force
    return include, include and bool(stream_options.continuous_usage_stats)


# -------------------------------------------------------------------- logprobs
def completion_logprobs(ctx, token_ids: list[int], entries: list, num: int, offset: int, as_id: bool) -> dict:
    """OpenAI's completion logprobs ({text_offset, token_logprobs, tokens, top_logprobs}) for token_ids;
    num = -1: every entry (the pinned logprob_token_ids)."""
    offsets, token_lps, tokens, tops = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        token = ctx.token_text(tid, as_id)
        if entry is None:  # the first prompt token has no logprob
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(logprob_value(entry[tid].logprob))
            # The sampled token comes first, then the top ones: up to num + 1 entries (vLLM's rule).
            tops.append({ctx.token_text(t, as_id): logprob_value(lp.logprob)
                         for i, (t, lp) in enumerate(entry.items()) if i <= num or num == -1})
        offsets.append(offset)
        offset += len(token)
        tokens.append(token)
    return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens, "top_logprobs": tops}


def chat_logprobs(ctx, token_ids: list[int], entries: list, k: int, as_id: bool) -> dict:
    """OpenAI's chat logprobs ({"content": [{token, logprob, bytes, top_logprobs}]}); k = -1: every entry."""
    content = []
    for tid, entry in zip(token_ids, entries):
        token = ctx.token_text(tid, as_id)
        tops = [{"token": (t := ctx.token_text(other, as_id)), "logprob": logprob_value(lp.logprob),
                 "bytes": list(t.encode("utf-8", errors="replace"))}
                for i, (other, lp) in enumerate(entry.items()) if i < k or k == -1]
        content.append({"token": token, "logprob": logprob_value(entry[tid].logprob),
                        "bytes": list(token.encode("utf-8", errors="replace")), "top_logprobs": tops})
    return {"content": content}


def prompt_logprobs_json(ctx, entries: list | None) -> list | None:
    """vLLM's prompt_logprobs: per prompt token, {token_id: {logprob, rank, decoded_token}} (first is null)."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": logprob_value(lp.logprob), "rank": lp.rank,
                                             "decoded_token": ctx.token_text(t)} for t, lp in e.items()}
            for e in entries]


# -------------------------------------------------------------------- streaming
class ChoiceStream:
    """What one streamed choice has sent so far; ``advance`` returns only what an output adds."""

    __slots__ = ("text", "tokens", "done", "started")

    def __init__(self):
        self.text = self.tokens = 0  # characters and tokens already sent
        self.done = False  # its finish_reason has been sent
        self.started = False  # its first chunk has been sent

    def advance(self, o) -> tuple[str, list[int], list]:
        """The new text, token ids and logprob entries of CompletionOutput `o`; marks the choice done
        when `o` finishes."""
        delta = o.text[self.text:]
        ids = list(o.token_ids[self.tokens:])
        entries = list((o.logprobs or [])[self.tokens:])
        self.text, self.tokens = len(o.text), len(o.token_ids)
        if o.finish_reason:
            self.done = True
        return delta, ids, entries


def cached_tokens(ctx, outs) -> int | None:
    """usage.prompt_tokens_details' cached_tokens over RequestOutputs: only with --enable-prompt-tokens-details
    and some prompt tokens from the prefix cache (vLLM's rule), else None."""
    if not ctx.prompt_tokens_details:
        return None
    cached = sum(o.num_cached_tokens for o in outs if o is not None)
    return cached or None


def timing_metrics(out, n_tokens: int) -> dict:
    """vLLM's per-request `metrics` (--enable-per-request-metrics) from a finished RequestOutput: time to first
    token from scheduling, queue and generation time, mean inter-token latency and tokens per second."""
    m = getattr(out, "metrics", None)
    queued, scheduled, first, last = ((m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finished_time)
                                      if m is not None else (None,) * 4)

    def ms(a, b):
        return None if a is None or b is None else max(0.0, b - a) * 1000.0

    generation = ms(first, last)
    running = None if scheduled is None or last is None else last - scheduled
    return {"time_to_first_token_ms": ms(scheduled, first), "generation_time_ms": generation,
            "queue_time_ms": ms(queued, scheduled),
            "mean_itl_ms": generation / (n_tokens - 1) if generation is not None and n_tokens > 1 else None,
            "tokens_per_second": n_tokens / running if running and running > 0 else None}
