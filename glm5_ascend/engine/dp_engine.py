"""Data parallelism: rank 0 drives every DP group's engine, one step at a time for all of them.

Each DP group is an LLMEngine on its TP leader (global rank d * tp) with its own scheduler, KV cache and
requests. Rank 0 runs group 0 in-process and hands the others their work over the DP leaders' gloo
group. Every step, rank 0 broadcasts each group's new requests and aborts, every group steps (one
that has nothing to run still runs its forward's expert-parallel collectives when the experts are
spread over the groups), and rank 0 gathers what each produced.

Outputs travel as deltas (new token ids, new text, new logprobs), so a step's message does not grow
with the length of what was generated; rank 0 keeps the cumulative RequestOutput of each remote
request. Times travel as ages, so the nodes' clocks need not agree.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch.distributed as dist

from glm5_ascend.distributed import broadcast_object
from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.engine.sequence import CompletionOutput, RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)

_SUM_STATS = ("num_running", "num_waiting", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
              "prompt_tokens", "generation_tokens")


@dataclass
class _Choice:
    """What rank 0 has received of one choice of a remote request."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Remote:
    group: int
    prompt: str | None
    prompt_ids: list[int]
    choices: list[_Choice]
    prompt_logprobs: list | None = None


class DPEngine:
    """Rank 0's engine with data parallelism; the interface of LLMEngine (add/abort/step/stats)."""

    def __init__(self, local, cluster):
        self.local, self.cluster, self.ps = local, cluster, cluster.ps
        self.config, self.tokenizer = local.config, local.tokenizer
        self.eos_token_ids = local.eos_token_ids
        self.block_manager = local.block_manager
        self.remote: dict[str, _Remote] = {}
        self.pending: dict[int, list] = {d: [] for d in range(1, self.ps.dp_size)}
        self.group_stats: list[dict] = [local.stats()] * self.ps.dp_size

    # ---- LLMEngine's interface ----
    @property
    def max_model_len(self) -> int:
        return self.local.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        return self.local.kv_capacity_tokens

    @property
    def step_seconds(self) -> dict:
        return self.local.step_seconds

    @property
    def structured_outputs(self):
        return self.local.structured_outputs

    def validate_prompt(self, prompt_ids: list[int]) -> None:
        self.local.validate_prompt(prompt_ids)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, arrival: float | None = None) -> None:
        if request_id in self.remote or request_id in self.local.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        load = [len(self.local.requests)] + [0] * (self.ps.dp_size - 1)
        for r in self.remote.values():
            load[r.group] += 1
        group = min(range(self.ps.dp_size), key=lambda d: load[d])
        if group == 0:
            return self.local.add_request(request_id, prompt_ids, params, prompt, arrival)
        self.local.validate_prompt(prompt_ids)  # the group's engine checks the same, but answers late
        self.local.validate_params(params)
        now = time.monotonic()
        age = now - (arrival if arrival is not None else now)
        self.pending[group].append(("add", request_id, list(prompt_ids), params, prompt, age))
        self.remote[request_id] = _Remote(group, prompt, list(prompt_ids), [_Choice() for _ in range(params.n)])

    def abort_request(self, request_id: str) -> RequestOutput | None:
        if request_id in self.local.requests:
            return self.local.abort_request(request_id)
        r = self.remote.pop(request_id, None)
        if r is None:
            return None
        self.pending[r.group].append(("abort", request_id))
        for c in r.choices:
            c.finish_reason = c.finish_reason or "abort"
        return self._output(request_id, r, True, 0, None, [0] * len(r.choices))

    def has_unfinished_requests(self) -> bool:
        return bool(self.remote) or self.local.has_unfinished_requests() or any(self.pending.values())

    def step(self) -> list[RequestOutput]:
        commands, self.pending = self.pending, {d: [] for d in self.pending}
        broadcast_object(commands, 0, self.ps.dp_cpu_group)
        outputs = self.local.step(idle_forward=self.ps.lockstep)
        gathered = [None] * self.ps.dp_size
        dist.gather_object(([], self.local.stats()), gathered, dst=0, group=self.ps.dp_cpu_group)
        now = time.monotonic()
        self.group_stats[0] = self.local.stats()
        for d in range(1, self.ps.dp_size):
            deltas, stats = gathered[d]
            self.group_stats[d] = stats
            outputs.extend(o for o in (self._apply(delta, now) for delta in deltas) if o is not None)
        return outputs

    def stats(self) -> dict:
        out = dict(self.group_stats[0])
        for key in _SUM_STATS:
            out[key] = sum(s[key] for s in self.group_stats)
        out["kv_cache_usage"] = sum(s["kv_cache_usage"] for s in self.group_stats) / len(self.group_stats)
        return out

    def shutdown(self) -> None:
        self.local.shutdown()

    # ---- outputs ----
    def _apply(self, delta: tuple, now: float) -> RequestOutput | None:
        """Add a group's delta to the request's output. Its times are ages when sent (the transfer's few ms
        are not subtracted)."""
        rid, finished, cached, times, counts, prompt_lp, choices = delta
        r = self.remote.get(rid)
        if r is None:  # aborted here meanwhile
            return None
        for index, new_ids, text_at, text, new_lps, cum, finish, stop in choices:
            c = r.choices[index]
            c.token_ids.extend(new_ids)
            c.text = c.text[:text_at] + text
            if new_lps is not None:
                c.logprobs = (c.logprobs or []) + new_lps
            c.cumulative_logprob, c.finish_reason, c.stop_reason = cum, finish, stop
        if prompt_lp is not None:
            r.prompt_logprobs = prompt_lp
        # Ages on the group's clock, when it sent, become times on this one's.
        metrics = RequestMetrics(*(None if age is None else now - age for age in times))
        if finished:
            del self.remote[rid]
        return self._output(rid, r, finished, cached, metrics, counts)

    @staticmethod
    def _output(rid: str, r: _Remote, finished: bool, cached: int, metrics, counts) -> RequestOutput:
        outs = [CompletionOutput(i, c.text, list(c.token_ids), c.cumulative_logprob,
                                 None if c.logprobs is None else list(c.logprobs), c.finish_reason, c.stop_reason)
                for i, c in enumerate(r.choices)]
        return RequestOutput(rid, r.prompt, r.prompt_ids, outs, finished, r.prompt_logprobs, cached, metrics, counts)


class _DeltaEncoder:
    """A DP leader's record of what rank 0 has of each request, to send only what is new."""

    def __init__(self):
        self.sent: dict[str, list[tuple[int, str, int]]] = {}  # per choice: (tokens, text, logprobs) sent
        self.prompt_lp: dict[str, int] = {}

    def encode(self, out: RequestOutput, now: float) -> tuple:
        sent = self.sent.setdefault(out.request_id, [(0, "", 0)] * len(out.outputs))
        choices = []
        for o in out.outputs:
            ntok, text, nlp = sent[o.index]
            at = len(text) if o.text.startswith(text) else _common_prefix(text, o.text)
            lps = None if o.logprobs is None else o.logprobs[nlp:]
            choices.append((o.index, o.token_ids[ntok:], at, o.text[at:], lps, o.cumulative_logprob,
                            o.finish_reason, o.stop_reason))
            sent[o.index] = (len(o.token_ids), o.text, nlp + len(lps or ()))
        prompt_lp = None
        n_plp = sum(e is not None for e in out.prompt_logprobs or ())
        if out.prompt_logprobs is not None and n_plp != self.prompt_lp.get(out.request_id):
            prompt_lp, self.prompt_lp[out.request_id] = out.prompt_logprobs, n_plp
        m = out.metrics
        times = (None,) * 4 if m is None else tuple(
            None if t is None else now - t
            for t in (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finished_time))
        if out.finished:
            self.forget(out.request_id)
        return (out.request_id, out.finished, out.num_cached_tokens, times, out.new_token_counts, prompt_lp, choices)

    def forget(self, rid: str) -> None:
        self.sent.pop(rid, None)
        self.prompt_lp.pop(rid, None)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def serve_dp_group(engine) -> None:
    """A DP leader (rank d * tp, d > 0): step its engine whenever rank 0 says, until the shutdown key ends
    the process."""
    ps = engine.runner.ps
    encoder = _DeltaEncoder()
    while True:
        commands = broadcast_object(None, 0, ps.dp_cpu_group)
        refused = []
        now = time.monotonic()
        for cmd in commands.get(ps.dp_rank, ()):
            if cmd[0] == "abort":
                engine.abort_request(cmd[1])
                encoder.forget(cmd[1])
                continue
            _, rid, ids, params, prompt, age = cmd
            try:
                engine.add_request(rid, ids, params, prompt=prompt, arrival=now - age)
            except ValueError as e:  # rank 0 checked what it could; this one ends as aborted
                logger.warning("request %s refused by DP group %d: %s", rid, ps.dp_rank, e)
                refused.append((rid, True, 0, (None,) * 4, [0] * params.n, None,
                                [(i, [], 0, "", None, None, "abort", None) for i in range(params.n)]))
        outputs = engine.step(idle_forward=ps.lockstep)
        now = time.monotonic()
        deltas = refused + [encoder.encode(o, now) for o in outputs]
        dist.gather_object((deltas, engine.stats()), None, dst=0, group=ps.dp_cpu_group)
