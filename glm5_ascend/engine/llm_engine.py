"""LLMEngine: requests in, one scheduler step at a time, RequestOutputs out (vLLM's shape)."""
from __future__ import annotations

import logging
import operator
import time
from dataclasses import dataclass

import torch

from glm5_ascend.config import EngineConfig
from glm5_ascend.engine.block_manager import BlockManager
from glm5_ascend.engine.detokenizer import IncrementalDetokenizer
from glm5_ascend.engine.errors import EngineDeadError
from glm5_ascend.engine.model_runner import ModelRunner, StepResult
from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.engine.scheduler import Scheduler
from glm5_ascend.engine.sequence import (CompletionOutput, Logprob, RequestMetrics, RequestOutput, Sequence)
from glm5_ascend.engine.structured_outputs import StructuredOutputs

logger = logging.getLogger(__name__)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(config: EngineConfig):
    """The checkpoint's (or --tokenizer's) tokenizer; None when skipped or when the checkpoint has none.

    A checkpoint written by transformers' save_pretrained alone carries no tokenizer: it still serves
    token ids in and out (as vLLM's skip_tokenizer_init does), with a warning.
    """
    from pathlib import Path

    from transformers import AutoTokenizer
    if config.skip_tokenizer_init:
        return None
    path = config.tokenizer_path or config.model_path
    if config.tokenizer_path is None and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files: prompts must be token ids and outputs carry no text "
                       "(pass tokenizer=PATH / --tokenizer for text)", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the path instead
        raise ValueError(f"cannot load the tokenizer from {path} ({type(e).__name__}: {e}); "
                         "pass a tokenizer directory with --tokenizer") from None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics


class LLMEngine:
    """One DP group's engine: scheduler, block manager, output processing, and its ModelRunner (on a
    `cluster`, the TP leader's runner, which drives its TP peers)."""

    def __init__(self, config: EngineConfig, tokenizer=None, cluster=None):
        self.config, self.cluster = config, cluster
        self.tokenizer = tokenizer or load_tokenizer(config)
        eos = set(config.model.eos_token_id)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self.structured_outputs = (StructuredOutputs(self.tokenizer, config.model.vocab_size, eos,
                                                     **config.structured_outputs)
                                   if self.tokenizer is not None else None)
        if cluster is None:
            self.runner = ModelRunner(config, eos)
            self.runner.allocate_cache(self.runner.available_blocks())
        else:
            self.runner = cluster.build_runner(eos)
        if self.structured_outputs is not None:
            self.structured_outputs.warm_up(self.runner.device)
        sc = config.scheduler
        bm = BlockManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        capacity = bm.num_blocks * bm.block_size
        if bm.blocks_needed(sc.max_model_len) > bm.num_blocks:
            raise ValueError(f"--max-model-len {sc.max_model_len} does not fit in the KV cache ({capacity} tokens); "
                             "lower --max-model-len or give the cache more memory")
        self.block_manager = bm
        self.scheduler = Scheduler(sc, bm)
        self.requests: dict[str, _Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished_reasons: dict[str, int] = {}
        # Wall time of each part of step(), for `bench serve`'s breakdown of where a request's time goes.
        self.step_seconds = {"schedule": 0.0, "model": 0.0, "detokenize": 0.0, "postprocess": 0.0}
        self.last_batch = None
        logger.info("KV cache: %d blocks x %d tokens (%.2f GiB)", bm.num_blocks, bm.block_size,
                    bm.num_blocks * self.runner.bytes_per_block() / (1 << 30))

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def shutdown(self) -> None:
        """Stop every other rank (a no-op in one process)."""
        if self.cluster is not None:
            self.cluster.shutdown()

    # ---- requests ----
    def validate_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("The prompt is empty; send at least one token.")
        vocab = self.config.model.vocab_size
        for t in prompt_ids:
            try:
                t = operator.index(t)  # ints of any integer type (numpy too), never floats or strings
            except TypeError:
                raise ValueError(f"Token ids must be integers, got {t!r} ({type(t).__name__}).") from None
            if not 0 <= t < vocab:
                raise ValueError(f"Token id {t} is out of vocabulary (vocab_size={vocab}).")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"The decoder prompt (length {len(prompt_ids)}) is longer than the maximum model "
                             f"length of {self.max_model_len}. Make sure that `max_model_len` is no smaller "
                             "than the number of text tokens plus one generated token.")

    def validate_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against the vocabulary, and a structured
        output constraint, compiled (and cached) here; ValueError naming the problem."""
        vocab = self.config.model.vocab_size
        for kind, asked in (("sample", params.logprobs), ("prompt", params.prompt_logprobs)):
            n = vocab if asked == -1 else asked
            if n is not None and n > self.config.max_logprobs:
                raise ValueError(f"Requested {kind} logprobs of {n}, which is greater than max allowed: "
                                 f"{self.config.max_logprobs}")
        bad = [t for t in params.logprob_token_ids or [] if t >= vocab]
        if bad:
            raise ValueError(f"logprob_token_ids {bad[:5]} are out of vocabulary (vocab_size={vocab}).")
        if self.tokenizer is None and params.stop:
            raise ValueError("stop strings need a tokenizer, and this engine has none; use stop_token_ids")
        if params.structured_outputs is not None:
            if self.structured_outputs is None:
                raise ValueError("structured outputs need a tokenizer, and this engine has none")
            self.structured_outputs.compile(params.structured_outputs)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, arrival: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_ids)
        prompt_ids = [operator.index(t) for t in prompt_ids]
        self.validate_params(params)
        arrival = arrival if arrival is not None else time.monotonic()
        seqs = []
        for i in range(params.n):
            child = params if params.seed is None or params.n == 1 else params.clone(seed=params.seed + i)
            seq = Sequence(request_id, i, prompt_ids, child, arrival)
            if self.tokenizer is not None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, child.skip_special_tokens)
            if child.seed is not None:
                seq.generator = torch.Generator(device=self.runner.device)
                seq.generator.manual_seed(child.seed)
            if child.structured_outputs is not None:
                seq.grammar = self.structured_outputs.sequence_grammar(child.structured_outputs)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, prompt, list(prompt_ids), params, seqs, RequestMetrics(arrival))
        self.prompt_tokens_total += len(prompt_ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            seq.grammar = None
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                self.finished_reasons["abort"] = self.finished_reasons.get("abort", 0) + 1
        return self._output(req, {})

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- stepping ----
    def step(self, idle_forward: bool = False) -> list[RequestOutput]:
        """One scheduler step. idle_forward: with nothing scheduled, still run the forward's
        expert-parallel collectives (DP groups in lockstep)."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        self.last_step_tokens = sum(batch.num_tokens) if batch else 0  # vllm:iteration_tokens_total
        self.last_batch = batch  # what ran, for `bench latency` / `bench throughput`
        t1 = time.perf_counter()
        self.step_seconds["schedule"] += t1 - t0
        if not batch and not idle_forward:
            return []
        try:
            if not batch:
                self.runner.execute_idle()
                return []
            result = self.runner.execute(batch)
        except Exception as e:
            if self.cluster is None:
                raise
            # The TP peers may be mid-step: this engine cannot step again in sync with them.
            raise EngineDeadError(self.cluster.explain(e)) from e
        t2 = time.perf_counter()
        self.step_seconds["model"] += t2 - t1
        detok_before = self.step_seconds["detokenize"]
        outputs = self._postprocess(batch, result)
        self.step_seconds["postprocess"] += (time.perf_counter() - t2
                                             - (self.step_seconds["detokenize"] - detok_before))
        return outputs

    def _postprocess(self, batch, result: StepResult) -> list[RequestOutput]:
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
        self._record_prompt_logprobs(result)
        new_tokens: dict[str, dict[int, int]] = {}
        now = time.monotonic()
        for i, seq in enumerate(result.sampled):
            self._append(seq, result, i, now)
            new_tokens.setdefault(seq.request_id, {})[seq.index] = 1
        outputs = []
        for rid in {s.request_id for s in batch.seqs}:
            req = self.requests.get(rid)
            if req is None or rid not in new_tokens:
                continue
            outputs.append(self._output(req, new_tokens[rid]))
            if outputs[-1].finished:
                del self.requests[rid]
        return outputs

    def _append(self, seq: Sequence, result: StepResult, i: int, now: float) -> None:
        s = result.samples
        token = s.token_ids[i]
        seq.token_ids.append(token)
        self.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.cumulative_logprob += s.logprobs[i]
        if seq.grammar is not None:
            seq.grammar.accept(token)
        if seq.logprobs is not None:
            top = s.top[i]
            entry = {token: Logprob(s.logprobs[i], top[2] if top else None)}
            for rank, (tid, lp) in enumerate(zip(*top[:2]) if top else (), start=1):
                entry.setdefault(tid, Logprob(lp, rank))
            if s.pinned is not None and s.pinned[i] is not None:
                for tid, lp, rank in zip(*s.pinned[i]):
                    entry.setdefault(tid, Logprob(lp, rank))
            self._decode_tokens(entry)
            seq.logprobs.append(entry)
        new_chars = 0
        p = seq.params
        # vLLM never shows the text of the EOS / stop token that ends a sequence.
        ends_here = seq.num_output_tokens >= p.min_tokens and (
            (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids)
        if seq.detok is not None and p.detokenize and not (ends_here and not p.include_stop_str_in_output):
            t0 = time.perf_counter()
            new_text = seq.detok.step(seq.token_ids)
            self.step_seconds["detokenize"] += time.perf_counter() - t0
            seq.output_text += new_text
            new_chars = len(new_text)
        self._check_stop(seq, token, new_chars)

    def _check_stop(self, seq: Sequence, token: int, new_chars: int) -> None:
        p = seq.params
        reason = stop_reason = None
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif token in p.stop_token_ids:
                reason, stop_reason = "stop", token
            elif p.stop and p.detokenize:
                hit = _find_stop(seq.output_text, p.stop, p.include_stop_str_in_output, new_chars)
                if hit is not None:
                    seq.output_text, stop_reason = hit
                    reason = "stop"
        if reason is None and (seq.num_output_tokens >= (p.max_tokens or float("inf"))
                               or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if stop_reason is None and seq.detok is not None and p.detokenize and reason == "length":
                seq.output_text += seq.detok.flush(seq.token_ids)
            self.scheduler.finish(seq, reason, stop_reason)
            seq.grammar = None
            self.finished_reasons[reason] = self.finished_reasons.get(reason, 0) + 1

    def _decode_tokens(self, entry: dict[int, Logprob]) -> None:
        if self.tokenizer is not None:
            for tid, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)

    def _record_prompt_logprobs(self, result: StepResult) -> None:
        for seq, first, lps, top_ids, top_lps, ranks in result.prompt_logprobs:
            for j, lp in enumerate(lps):
                pos = first + j
                entry = {seq.token_ids[pos]: Logprob(lp, ranks[j])}
                for rank, (tid, tlp) in enumerate(zip(top_ids[j], top_lps[j]), start=1):
                    entry.setdefault(tid, Logprob(tlp, rank))
                self._decode_tokens(entry)
                if pos < len(seq.prompt_logprobs):
                    seq.prompt_logprobs[pos] = entry
                else:
                    seq.prompt_logprobs.append(entry)

    def _output(self, req: _Request, new_counts: dict[int, int]) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.output_text
            p = seq.params
            if not seq.is_finished and p.stop and not p.include_stop_str_in_output:
                hold = max(len(s) for s in p.stop) - 1  # never stream the start of a stop string
                text = text[: max(0, len(text) - hold)]
            cumulative = seq.cumulative_logprob if p.logprobs is not None else None  # as vLLM reports it
            outs.append(CompletionOutput(seq.index, text, seq.output_ids, cumulative,
                                         seq.logprobs, seq.finish_reason, seq.stop_reason))
        finished = all(s.is_finished for s in req.seqs)
        m = req.metrics
        m.first_token_time = min((s.first_token_time for s in req.seqs if s.first_token_time), default=None)
        m.first_scheduled_time = min((s.first_scheduled for s in req.seqs if s.first_scheduled), default=None)
        m.num_preemptions = [s.num_preemptions for s in req.seqs]
        if finished:
            m.finished_time = time.monotonic()
        first = req.seqs[0]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished,
                             first.prompt_logprobs, first.num_cached_tokens, m,
                             [new_counts.get(s.index, 0) for s in req.seqs])

    def stats(self) -> dict:
        bm = self.block_manager
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_cache_usage": bm.usage(), "prefix_cache_queries": bm.prefix_queries,
                "prefix_cache_hits": bm.prefix_hits, "num_preemptions": self.scheduler.num_preemptions,
                "prompt_tokens": self.prompt_tokens_total, "generation_tokens": self.generation_tokens_total,
                "step_seconds": dict(self.step_seconds)}


def _find_stop(text: str, stops: list[str], include: bool, new_chars: int):
    """(truncated text, stop string) for the earliest stop string that the last new_chars completed."""
    best = None
    for s in stops:
        i = text.find(s, max(0, len(text) - new_chars - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return None
    i, s = best
    return (text[: i + len(s)] if include else text[:i]), s
