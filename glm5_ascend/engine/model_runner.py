"""The one place the engine touches the device: model, paged KV cache, batch inputs, sampling."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from glm5_ascend.config import EngineConfig
from glm5_ascend.distributed import SINGLE, ParallelState
from glm5_ascend.engine.sampler import Sampler, SampleResult
from glm5_ascend.engine.scheduler import ScheduledBatch
from glm5_ascend.engine.sequence import Sequence
from glm5_ascend.model.glm5 import AttnMetadata, GlmMoeDsaForCausalLM, LayerCache
from glm5_ascend.model.loader import load_weights
from glm5_ascend.platform import platform_for_device
from glm5_ascend import envs

logger = logging.getLogger(__name__)

_ACTIVATION_RESERVE = 2 << 30  # bytes kept free on a GPU/NPU for activations and the allocator


@dataclass
class StepResult:
    sampled: list[Sequence]
    samples: SampleResult | None
    # (seq, first prompt position predicted, logprobs [n], top ids [n, k], top logprobs [n, k], ranks [n])
    prompt_logprobs: list[tuple]


class ModelRunner:
    def __init__(self, config: EngineConfig, eos_token_ids: set[int], ps: ParallelState = SINGLE):
        self.config = config
        self.platform = platform_for_device(config.device)
        self.device = self.platform.device() if config.device in (None, "auto") else torch.device(config.device)
        torch.manual_seed(config.seed)
        with torch.device(self.device):
            self.model = GlmMoeDsaForCausalLM(config.model, ps, config.dtype)
        load_weights(self.model, config.model_path)
        self.model.eval()
        self.block_size = config.cache.block_size
        self.num_blocks = self._num_blocks()
        self.caches = self._allocate_caches()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.seed)
        self.sampler = Sampler(eos_token_ids, generator)

    # ---- KV cache ----
    def bytes_per_block(self) -> int:
        m = self.config.model
        per_token = m.kv_lora_rank + m.qk_rope_head_dim + m.index_head_dim
        return m.num_hidden_layers * self.block_size * per_token * self.config.dtype.itemsize

    def _num_blocks(self) -> int:
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

    def _allocate_caches(self) -> list[LayerCache]:
        m, dt = self.config.model, self.config.dtype
        shape = (self.num_blocks, self.block_size)
        return [LayerCache(torch.zeros(*shape, m.kv_lora_rank, dtype=dt, device=self.device),
                           torch.zeros(*shape, m.qk_rope_head_dim, dtype=dt, device=self.device),
                           torch.zeros(*shape, m.index_head_dim, dtype=dt, device=self.device))
                for _ in range(m.num_hidden_layers)]

    # ---- one step ----
    def prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        ids, pos, slots, cu, seq_lens = [], [], [], [0], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            table = seq.block_table
            for p in range(start, start + n):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            cu.append(cu[-1] + n)
            seq_lens.append(start + n)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]
        dev = self.device
        meta = AttnMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            prompt_lens=torch.tensor([s.num_prompt_tokens for s in batch.seqs], dtype=torch.int32, device=dev),
            index_ties=torch.zeros(len(ids), dtype=torch.bool, device=dev))
        return (torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(pos, dtype=torch.int64, device=dev), meta, cu)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Forward one batch -> (final hidden states [T, D], cu_seqlens as a list)."""
        ids, pos, meta, cu = self.prepare(batch)
        hidden = self.model(ids, pos, self.caches, meta)
        self._limit_prefix_cache(batch, meta.index_ties, cu)
        return hidden, cu

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

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        hidden, cu = self.run(batch)
        sampled, rows = [], []
        prompt_lp = []
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            end = seq.num_computed_tokens + n
            if end == seq.num_tokens:
                sampled.append(seq)
                rows.append(cu[b + 1] - 1)
            if seq.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens - 1:
                prompt_lp.append(self._prompt_logprobs(seq, hidden[cu[b]:cu[b + 1]], n))
        samples = None
        if sampled:
            logits = self.model.compute_logits(hidden[rows])
            samples = self.sampler(logits, sampled)
        return StepResult(sampled, samples, prompt_lp)

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, n: int) -> tuple:
        """Logprobs of prompt tokens start+1 .. predicted by this chunk's positions."""
        start = seq.num_computed_tokens
        stop = min(start + n, seq.num_prompt_tokens - 1)
        k = seq.params.prompt_logprobs
        raw = torch.log_softmax(self.model.compute_logits(hidden[: stop - start]), dim=-1)
        targets = torch.tensor(seq.token_ids[start + 1:stop + 1], device=raw.device)
        lp = raw.gather(1, targets[:, None]).squeeze(1)
        ranks = (raw > lp[:, None]).sum(-1) + 1
        top_lp, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], targets[:, None][:, :0])
        return seq, start + 1, lp.tolist(), top_ids.tolist(), top_lp.tolist(), ranks.tolist()
