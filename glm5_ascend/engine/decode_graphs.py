"""Graph-captured decode: one CUDA graph (cuda) or aclgraph (npu) per padded decode batch size.

A decode step launches a few hundred small kernels per token; replaying a captured graph issues them
all with one host call. At start-up, for each capture size (largest first, so the smaller graphs
reuse its memory pool) the forward runs eagerly twice, which compiles and autotunes every kernel
variant that size needs, and is then captured. A step whose every sequence decodes one token, with B
sequences, copies its inputs into persistent buffers padded to the next captured size and replays
that graph; its logits land in one persistent buffer.

Padding rows are harmless by construction: token 0 at position 0, context length 1 read through
block 0, so they read finite cache values and their logits are dropped. Each writes its key to its own
slot of the scratch blocks the runner allocates past the block manager's blocks (`pad_slot` on): the
npu cache kernels take only in-range, distinct slots, so -1 ("write nothing") would need a host-side
filter that a graph cannot capture. Nothing inside the captured forward may wait for the host: the block tables keep their
full width (max_model_len / block_size), so no shape depends on the batch.

On the CPU there is nothing to capture; given capture sizes (tests) run the same padded path eagerly,
which checks the padding and the buffers wherever the suite runs.
"""
from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from glm5_ascend.model.glm5 import AttnMetadata

logger = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, model, caches, platform, device: torch.device, sizes: tuple[int, ...], max_blocks: int,
                 pad_slot: int):
        self.model, self.caches, self.platform = model, caches, platform
        self.sizes = sorted(sizes)
        n = self.sizes[-1]
        self.max_blocks = max_blocks
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        self.ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.pad_slots = np.arange(pad_slot, pad_slot + n, dtype=np.int64)  # row i pads to pad_slot + i
        self.slots = torch.arange(pad_slot, pad_slot + n, **i64)
        self.cu_seqlens = torch.arange(n + 1, **i32)
        self.seq_lens = torch.ones(n, **i32)
        self.prompt_lens = torch.ones(n, **i32)
        self.block_tables = torch.zeros(n, max_blocks, **i32)
        self.ties = torch.zeros(n, dtype=torch.bool, device=device)
        self.logits = torch.empty(n, model.cfg.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, object] = {}

    def fits(self, step) -> bool:
        """A pure decode step of at most the largest size: one token per sequence, each past its prompt."""
        b = len(step.seq_lens)
        return (len(step.ids) == b <= self.sizes[-1] and not step.prompt_ranges and len(step.logit_rows) == b
                and bool((step.positions >= step.prompt_lens).all()))

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = self.platform.graph_pool()
        for size in reversed(self.sizes):
            self._forward(size)  # compile and autotune outside the capture
            self._forward(size)
            graph = self.platform.new_graph()
            if graph is not None:
                self.platform.synchronize()
                with self.platform.capture(graph, pool):
                    self._forward(size)
            self.graphs[size] = graph
        self.platform.synchronize()
        kind = "captured" if self.platform.supports_graphs() else "warmed up (no graphs on this device)"
        logger.info("decode graphs: %d batch sizes %s in %.1f s (%s .. %s)", len(self.sizes), kind,
                    time.perf_counter() - start, self.sizes[0], self.sizes[-1])

    def _forward(self, size: int) -> None:
        meta = AttnMetadata(slot_mapping=self.slots[:size], block_tables=self.block_tables[:size],
                            cu_seqlens_q=self.cu_seqlens[:size + 1], seq_lens=self.seq_lens[:size],
                            prompt_lens=self.prompt_lens[:size], index_ties=self.ties[:size])
        hidden = self.model(self.ids[:size], self.positions[:size], self.caches, meta)
        self.logits[:size].copy_(self.model.compute_logits(hidden))

    def run(self, step) -> torch.Tensor:
        """Logits [B, V] of a step that `fits` (valid until the next run)."""
        b = len(step.ids)
        size = self.sizes[bisect.bisect_left(self.sizes, b)]
        pad = size - b
        width = step.block_tables.shape[1]
        if width > self.max_blocks:
            raise RuntimeError(f"decode graphs: a sequence holds {width} blocks, more than the "
                               f"{self.max_blocks} max_model_len allows")
        tables = np.zeros((size, width), dtype=np.int32)
        tables[:b] = step.block_tables
        self.ids[:size].copy_(torch.from_numpy(np.pad(step.ids, (0, pad))))
        self.positions[:size].copy_(torch.from_numpy(np.pad(step.positions, (0, pad))))
        self.slots[:size].copy_(torch.from_numpy(np.concatenate([step.slots, self.pad_slots[b:size]])))
        self.seq_lens[:size].copy_(torch.from_numpy(np.pad(step.seq_lens, (0, pad), constant_values=1)))
        self.prompt_lens[:size].copy_(torch.from_numpy(np.pad(step.prompt_lens, (0, pad), constant_values=1)))
        self.block_tables[:size, :width].copy_(torch.from_numpy(tables))
        graph = self.graphs[size]
        if graph is None:
            self._forward(size)
        else:
            graph.replay()
        return self.logits[:b]
