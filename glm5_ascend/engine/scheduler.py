"""Continuous batching with chunked prefill, mixed prefill/decode steps and recompute preemption.

Every sequence is "num_computed_tokens of num_tokens done"; a step gives each running sequence its
remaining tokens (one for a decode, a chunk for a prefill) within the token budget, then admits
waiting sequences. When blocks run out, the most recently admitted sequence is preempted: its
blocks are freed and it is recomputed later (its finished blocks usually still sit in the prefix
cache, which makes the recompute cheap).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from glm5_ascend.config import SchedulerConfig
from glm5_ascend.engine.block_manager import BlockManager
from glm5_ascend.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens scheduled per sequence this step

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.allocate_slots(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                budget -= n
        if not preempted:
            self._admit(seqs, counts, budget)
        now = time.monotonic()
        for seq in seqs:
            if seq.first_scheduled is None:
                seq.first_scheduled = now
        return ScheduledBatch(seqs, counts)

    def _admit(self, seqs: list[Sequence], counts: list[int], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits = self.bm.match_prefix(seq)
            remaining = seq.num_tokens - len(hits) * self.bm.block_size
            n = min(remaining, budget)
            if n < remaining and not self.config.enable_chunked_prefill:
                break
            if not self.bm.admit(seq, hits, n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """Mark seq finished and release its blocks (running or waiting)."""
        if seq.is_finished:
            return
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
