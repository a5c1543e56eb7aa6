"""The one place the engine touches the device: model, paged KV cache, batch inputs, sampling.

With tensor parallelism every TP rank of a DP group holds a ModelRunner. The group's leader (TP
rank 0, which owns the scheduler) turns each batch into a StepInput and broadcasts it to its TP
peers, which run `follow()`: every rank runs the same forward and the same logits calls (their
collectives line up), and only the leader samples.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from glm5_ascend import envs
from glm5_ascend.config import EngineConfig
from glm5_ascend.distributed import SINGLE, ParallelState, broadcast_object
from glm5_ascend.engine.decode_graphs import DecodeGraphs
from glm5_ascend.engine.sampler import Sampler, SampleResult
from glm5_ascend.engine.scheduler import ScheduledBatch
from glm5_ascend.engine.sequence import Sequence
from glm5_ascend.model.glm5 import AttnMetadata, GlmMoeDsaForCausalLM, LayerCache
from glm5_ascend.model.dummy import init_dummy_weights
from glm5_ascend.model.loader import load_weights
from glm5_ascend.platform import platform_for_device

logger = logging.getLogger(__name__)

_ACTIVATION_RESERVE = 2 << 30  # bytes kept free on a GPU/NPU for activations and the allocator
_IDLE, _STOP = "idle", "stop"  # what a leader broadcasts instead of a StepInput


@dataclass
class StepResult:
    sampled: list[Sequence]
    samples: SampleResult | None
    # (seq, first prompt position predicted, logprobs [n], top ids [n, k], top logprobs [n, k], ranks [n])
    prompt_logprobs: list[tuple]


@dataclass
class StepInput:
    """One forward, as every TP rank needs it: T tokens of B sequences (see AttnMetadata)."""

    ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slots: np.ndarray  # int64 [T]
    cu_seqlens: list[int]  # [B + 1]
    seq_lens: np.ndarray  # int32 [B]
    prompt_lens: np.ndarray  # int32 [B]
    block_tables: np.ndarray  # int32 [B, max blocks]
    logit_rows: list[int] = field(default_factory=list)  # rows whose next token is sampled
    prompt_ranges: list[tuple[int, int]] = field(default_factory=list)  # row ranges scored for prompt logprobs


class ModelRunner:
    """Builds the model (this rank's shard) and loads it; `allocate_cache` follows once the ranks have
    agreed on a block count (ParallelState.tp_size > 1) or at once (one process)."""

    def __init__(self, config: EngineConfig, eos_token_ids: set[int] = frozenset(), ps: ParallelState = SINGLE,
                 device: torch.device | None = None):
        self.config, self.ps = config, ps
        self.platform = platform_for_device(config.device)
        if device is None:
            device = self.platform.device() if config.device in (None, "auto") else torch.device(config.device)
        self.device = device
        torch.manual_seed(config.seed)
        with torch.device(self.device):
            self.model = GlmMoeDsaForCausalLM(
                config.model, ps, config.dtype,
                max_tokens_per_rank=-(-config.scheduler.max_num_batched_tokens // ps.tp_size))
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed + ps.rank)
        else:
            load_weights(self.model, config.model_path, progress=ps.rank == 0 and ps.tp_size * ps.dp_size > 1)
        self.model.eval()
        self.graphs: DecodeGraphs | None = None
        self.block_size = config.cache.block_size
        self.num_blocks = 0
        self.caches: list[LayerCache] = []
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.seed)
        self.sampler = Sampler(eos_token_ids, generator)

    # ---- KV cache ----
    def bytes_per_block(self) -> int:
        m = self.config.model
        per_token = m.kv_lora_rank + m.qk_rope_head_dim + m.index_head_dim
        return m.num_hidden_layers * self.block_size * per_token * self.config.dtype.itemsize

    def available_blocks(self) -> int:
        """KV-cache blocks this rank can hold (or the override), capped at what the scheduler can use."""
        if self.config.cache.num_blocks is not None:
            return self.config.cache.num_blocks
        sc = self.config.scheduler
        most_useful = sc.max_num_seqs * -(-sc.max_model_len // self.block_size) + 1
        if self.platform.name == "cpu":
            budget = int(envs.cpu_kv_cache_gib() * (1 << 30))
        else:
            self.platform.synchronize()
            free, total = self.platform.mem_get_info(self.device.index or 0)
            budget = int(total * self.config.cache.gpu_memory_utilization) - (total - free) - _ACTIVATION_RESERVE
        blocks = min(most_useful, budget // self.bytes_per_block())
        if blocks < 1:
            raise RuntimeError("no memory left for the KV cache after loading the model; raise "
                               "--gpu-memory-utilization (or GLM5_CPU_KV_CACHE_GIB on CPU) or use more devices")
        return blocks

    def allocate_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        m, dt = self.config.model, self.config.dtype
        sizes = self.config.graphs.capture_sizes
        graphs = bool(sizes) and self.ps.ep_size == 1
        # Padded decode batches write their padding rows to distinct slots of scratch blocks past the
        # block manager's `num_blocks` (the npu cache kernels take no -1 slot: ops/dsa/npu.py).
        scratch = -(-max(sizes) // self.block_size) if graphs else 0
        shape = (num_blocks + scratch, self.block_size)
        self.caches = [LayerCache(torch.zeros(*shape, m.kv_lora_rank, dtype=dt, device=self.device),
                                  torch.zeros(*shape, m.qk_rope_head_dim, dtype=dt, device=self.device),
                                  torch.zeros(*shape, m.index_head_dim, dtype=dt, device=self.device))
                       for _ in range(m.num_hidden_layers)]
        if sizes and not graphs:
            logger.info("decode graphs: off with expert parallelism (the all_to_all dispatch needs its split "
                        "sizes on the host); decode runs eagerly")
        elif sizes:
            max_blocks = -(-self.config.scheduler.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, self.caches, self.platform, self.device, sizes, max_blocks,
                                       pad_slot=num_blocks * self.block_size)
            self.graphs.capture()
        if self.device.type != "cpu":
            self.warm_up()

    # ---- start-up ----
    def _synthetic(self, lens: list[tuple[int, int]]) -> StepInput | None:
        """A step of token-0 sequences, one per (context, new tokens), over consecutive blocks from block 0
        (nothing is cached yet, so what it writes is overwritten before it is read). None if it does not fit."""
        bs = self.block_size
        ids, pos, slots, cu, seq_lens, tables, rows = [], [], [], [0], [], [], []
        block = 0
        for ctx, n in lens:
            table = list(range(block, block + -(-(ctx + n) // bs)))
            block += len(table)
            pos.extend(range(ctx, ctx + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(ctx, ctx + n))
            cu.append(cu[-1] + n)
            rows.append(cu[-1] - 1)
            seq_lens.append(ctx + n)
            tables.append(table)
        width = max(len(t) for t in tables)
        if block > self.num_blocks or width * bs > self.config.scheduler.max_model_len + bs:
            return None
        return StepInput(np.zeros(len(pos), dtype=np.int64), np.array(pos, dtype=np.int64),
                         np.array(slots, dtype=np.int64), cu, np.array(seq_lens, dtype=np.int32),
                         np.array([max(ctx, 1) if n == 1 else ctx + n for ctx, n in lens], dtype=np.int32),
                         np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32), rows)

    @torch.inference_mode()
    def warm_up(self) -> int:
        """Compile, before the first request, every kernel variant an eager step can need (no request
        pays a compile, issue 16): Triton specialises integer arguments that are 1 or a multiple of 16
        and the batch's power-of-two padding, so prefills of 1, 2, 4, ... up to --max-num-seqs
        sequences, of 16 and of 5 tokens each; a prompt past the indexer's top-k (its selection
        kernel); and a step mixing a decode row with a prefill. Every rank runs the same steps."""
        start = time.perf_counter()
        sc, topk = self.config.scheduler, self.config.model.index_topk
        steps = []
        b = 1
        while b <= sc.max_num_seqs:
            steps += [[(0, n)] * b for n in (16, 5)]
            b *= 2
        steps += [[(0, topk + 17)], [(40, 1), (0, 7)], [(40, 1), (40, 1), (0, 7)]]
        ran = 0
        for lens in steps:
            step = self._synthetic(lens)
            if step is None or len(step.ids) > sc.max_num_batched_tokens:
                continue
            hidden, _ = self._forward(step)
            self._logits(step, hidden)
            ran += 1
        self.platform.synchronize()
        logger.info("warm-up: %d eager step shapes compiled in %.1f s", ran, time.perf_counter() - start)
        return ran

    # ---- one step ----
    def prepare(self, batch: ScheduledBatch) -> StepInput:
        """The batch's flat inputs; rows to sample (sequences whose scheduled tokens reach their end)
        and prompt-logprob row ranges."""
        bs = self.block_size
        ids, pos, slots, cu, seq_lens = [], [], [], [0], []
        rows, ranges = [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            table = seq.block_table
            for p in range(start, start + n):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            if start + n == seq.num_tokens:
                rows.append(cu[-1] + n - 1)
            if seq.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                ranges.append((cu[-1], cu[-1] + min(start + n, seq.num_prompt_tokens - 1) - start))
            cu.append(cu[-1] + n)
            seq_lens.append(start + n)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]
        return StepInput(np.array(ids, dtype=np.int64), np.array(pos, dtype=np.int64),
                         np.array(slots, dtype=np.int64), cu, np.array(seq_lens, dtype=np.int32),
                         np.array([s.num_prompt_tokens for s in batch.seqs], dtype=np.int32),
                         np.array(tables, dtype=np.int32), rows, ranges)

    def _forward(self, step: StepInput) -> tuple[torch.Tensor, AttnMetadata]:
        dev = self.device
        meta = AttnMetadata(
            slot_mapping=torch.from_numpy(step.slots).to(dev),
            block_tables=torch.from_numpy(step.block_tables).to(dev),
            cu_seqlens_q=torch.tensor(step.cu_seqlens, dtype=torch.int32, device=dev),
            seq_lens=torch.from_numpy(step.seq_lens).to(dev),
            prompt_lens=torch.from_numpy(step.prompt_lens).to(dev),
            index_ties=torch.zeros(len(step.ids), dtype=torch.bool, device=dev))
        hidden = self.model(torch.from_numpy(step.ids).to(dev), torch.from_numpy(step.positions).to(dev),
                            self.caches, meta)
        return hidden, meta

    def _logits(self, step: StepInput, hidden: torch.Tensor):
        """The logits every rank computes together (the vocab-parallel lm_head gathers them):
        sampled rows, then each prompt-logprob range."""
        sample = self.model.compute_logits(hidden[step.logit_rows]) if step.logit_rows else None
        return sample, [self.model.compute_logits(hidden[a:b]) for a, b in step.prompt_ranges]

    def _compute(self, step: StepInput):
        """(sampled rows' logits, prompt-logprob logits, index_ties or None): a captured decode graph
        where the step is a pure decode that fits one, else the eager forward."""
        if self.graphs is not None and self.graphs.fits(step):
            return self.graphs.run(step), [], None
        hidden, meta = self._forward(step)
        return *self._logits(step, hidden), meta.index_ties

    def _share(self, step) -> None:
        """Leader: hand this step (a StepInput, _IDLE or _STOP) to the TP peers."""
        if self.ps.tp_size > 1:
            broadcast_object(step, self.ps.tp_leader, self.ps.tp_cpu_group)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, StepInput]:
        """Forward one batch (on every TP rank) -> (final hidden states [T, D], its StepInput)."""
        step = self.prepare(batch)
        self._share(step)
        hidden, meta = self._forward(step)
        self._limit_prefix_cache(batch, meta.index_ties, step.cu_seqlens)
        return hidden, step

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        step = self.prepare(batch)
        self._share(step)
        logits, prompt_logits, ties = self._compute(step)
        if ties is not None:
            self._limit_prefix_cache(batch, ties, step.cu_seqlens)
        sampled = [seq for seq, n in zip(batch.seqs, batch.num_tokens) if seq.num_computed_tokens + n == seq.num_tokens]
        with_lp = [seq for seq in batch.seqs
                   if seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens - 1]
        prompt_lp = [self._prompt_logprobs(seq, lg) for seq, lg in zip(with_lp, prompt_logits)]
        samples = self.sampler(logits, sampled) if sampled else None
        return StepResult(sampled, samples, prompt_lp)

    @torch.inference_mode()
    def execute_idle(self) -> None:
        """Leader of a DP group with no tokens this step, while others run (expert-parallel lockstep)."""
        self._share(_IDLE)
        self.model.idle_forward()

    def stop_followers(self) -> None:
        self._share(_STOP)

    @torch.inference_mode()
    def follow(self) -> None:
        """TP peer of a leader: run every step it broadcasts, until it says stop."""
        while True:
            step = broadcast_object(None, self.ps.tp_leader, self.ps.tp_cpu_group)
            if step == _STOP:
                return
            if step == _IDLE:
                self.model.idle_forward()
                continue
            self._compute(step)

    def _limit_prefix_cache(self, batch: ScheduledBatch, ties: torch.Tensor, cu: list[int]) -> None:
        """Keep blocks whose keys depend on the prompt's length out of the prefix cache.

        Where a prompt row's top-k kept some but not all of several equal index scores, another prompt
        sharing this prefix (but not its length) would keep others; that position's block and every
        later one must not be reused (docs/architecture.md)."""
        if not bool(ties.any()):
            return
        for b, seq in enumerate(batch.seqs):
            hit = ties[cu[b]:cu[b + 1]].nonzero()
            if hit.numel():
                block = (seq.num_computed_tokens + int(hit[0, 0])) // self.block_size
                seq.uncacheable_from_block = min(seq.uncacheable_from_block, block)

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> tuple:
        """Logprobs of prompt tokens start+1 .. predicted by this chunk's positions (logits of those rows)."""
        start = seq.num_computed_tokens
        stop = start + logits.shape[0]
        k = seq.params.prompt_logprobs
        k = logits.shape[-1] if k == -1 else k  # -1: the whole vocabulary
        raw = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(seq.token_ids[start + 1:stop + 1], device=raw.device)
        lp = raw.gather(1, targets[:, None]).squeeze(1)
        ranks = (raw > lp[:, None]).sum(-1) + 1
        top_lp, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], targets[:, None][:, :0])
        return seq, start + 1, lp.tolist(), top_ids.tolist(), top_lp.tolist(), ranks.tolist()
