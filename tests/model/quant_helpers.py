"""Helpers for the quantized-checkpoint tests: a model's prompt logits without the engine."""
from __future__ import annotations

import torch

from glm5_ascend.config import ModelConfig
from glm5_ascend.distributed import SINGLE
from glm5_ascend.model.glm5 import AttnMetadata, GlmMoeDsaForCausalLM, LayerCache
from glm5_ascend.model.loader import load_weights


def load(path, dtype=torch.float32, ps=SINGLE) -> GlmMoeDsaForCausalLM:
    model = GlmMoeDsaForCausalLM(ModelConfig.from_pretrained(path), ps, dtype)
    load_weights(model, path)
    return model.eval()


@torch.no_grad()
def prompt_logits(model: GlmMoeDsaForCausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """float32 logits [T, vocab] of one whole-prompt forward on a fresh paged cache."""
    c, T = model.cfg, len(ids)
    blocks = -(-T // block_size)
    dtype = model.dtype
    caches = [LayerCache(torch.zeros(blocks, block_size, c.kv_lora_rank, dtype=dtype),
                         torch.zeros(blocks, block_size, c.qk_rope_head_dim, dtype=dtype),
                         torch.zeros(blocks, block_size, c.index_head_dim, dtype=dtype))
              for _ in range(c.num_hidden_layers)]
    meta = AttnMetadata(slot_mapping=torch.arange(T), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                        cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32),
                        seq_lens=torch.tensor([T], dtype=torch.int32), prompt_lens=torch.tensor([T], dtype=torch.int32))
    hidden = model(torch.tensor(ids), torch.arange(T), caches, meta)
    return model.compute_logits(hidden)
