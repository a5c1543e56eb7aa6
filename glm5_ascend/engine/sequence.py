"""Sequences and request outputs: CPU-only bookkeeping, no device code."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from glm5_ascend.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


_ids = itertools.count()


class Sequence:
    """One generated continuation (a request with n > 1 has n of them)."""

    def __init__(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                 arrival: float | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hashes of this sequence's full blocks, in order
        self.num_registered_blocks = 0  # full blocks already entered into the prefix cache
        self.uncacheable_from_block = 1 << 62  # blocks from here on never enter the prefix cache
        self.logprobs: list[dict[int, Logprob]] | None = (
            [] if params.logprobs is not None or params.logprob_token_ids else None)
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.output_text = ""
        self.detok = None  # IncrementalDetokenizer, set by the engine
        self.generator = None  # torch.Generator for seeded sampling
        self.grammar = None  # structured_outputs.SequenceGrammar of a constrained request, set by the engine
        self.arrival = arrival if arrival is not None else time.monotonic()
        self.first_scheduled: float | None = None
        self.first_token_time: float | None = None
        self.num_preemptions = 0  # times preempted and queued for recompute

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def reset_for_recompute(self) -> None:
        """Preempted: drop the KV cache; prompt and generated tokens are recomputed later."""
        self.num_preemptions += 1
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_registered_blocks = 0
        self.uncacheable_from_block = 1 << 62
        self.status = Status.WAITING
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = [None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: list[int] = field(default_factory=list)  # per choice


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    new_token_counts: list[int] = field(default_factory=list)  # per choice, tokens added this step
