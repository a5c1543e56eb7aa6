"""GLM-5 (GlmMoeDsaForCausalLM) on a paged KV cache, built bottom-up: Indexer, MLA, router, MoE, block.

Module and parameter names follow the Hugging Face checkpoint, so the loader is a name lookup.
Attention is DeepSeek Sparse Attention in the absorbed-MLA form: the indexer picks each query's
top-k context tokens and attention reads only those tokens' latent entries from the paged cache,
so its cost per token is O(index_topk), not O(context). All operators go through glm5_ascend.ops.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm5_ascend import ops
from glm5_ascend.config import ModelConfig
from glm5_ascend.distributed import SINGLE, ParallelState, split, tp_all_reduce, tp_rows
from glm5_ascend.model.layers import (ColumnParallelLinear, InterleavedRope, LayerNorm, ParallelLMHead,
                                      ReplicatedLinear, RMSNorm, RowParallelLinear, VocabParallelEmbedding,
                                      _param, read, shape_of)


@dataclass
class AttnMetadata:
    """Where one step's tokens live. T tokens from B sequences (see ops/dsa/reference.py).

    slot_mapping: int64 [T] cache slot of each new token (padding rows: slots of a scratch block)
    block_tables: int32 [B, max_blocks]; cu_seqlens_q: int32 [B+1]; seq_lens: int32 [B] (context incl. new)
    prompt_lens: int32 [B] prompt length of each sequence
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    prompt_lens: torch.Tensor | None = None  # int32 [B]; steers the indexer's tie-breaking only
    index_ties: torch.Tensor | None = None  # bool [T], filled: prompt rows whose top-k split a tie


@dataclass
class LayerCache:
    """One layer's paged caches, each [num_blocks, block_size, D]."""

    latent: torch.Tensor
    rope: torch.Tensor
    index: torch.Tensor


class Indexer(nn.Module):
    """DSA lightning indexer: scores context tokens per query and keeps the top index_topk."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim, self.topk = cfg.qk_rope_head_dim, cfg.index_topk
        self.wq_b = ReplicatedLinear(cfg.q_lora_rank, self.n_heads * self.head_dim, dtype=dtype)
        self.wk = ReplicatedLinear(cfg.hidden_size, self.head_dim, dtype=dtype)
        self.k_norm = LayerNorm(self.head_dim, eps=1e-6, dtype=dtype)
        self.weights_proj = ReplicatedLinear(cfg.hidden_size, self.n_heads, dtype=torch.float32)
        self.softmax_scale = self.head_dim ** -0.5

    def _rope_first(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # The indexer rotates the *first* rope_dim dims (MLA rotates the last ones).
        return torch.cat([ops.interleaved_rope(x[..., :self.rope_dim], cos, sin), x[..., self.rope_dim:]], -1)

    def key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Index key [T, D] of each new token (LayerNorm with bias, then RoPE)."""
        return self._rope_first(self.k_norm(self.wk(x)), cos, sin)

    def forward(self, x, q_resid, cos, sin, cache: LayerCache, meta: AttnMetadata) -> torch.Tensor:
        q = self._rope_first(self.wq_b(q_resid).view(-1, self.n_heads, self.head_dim), cos, sin)
        weights = self.weights_proj(x.float()) * self.n_heads ** -0.5
        return ops.lightning_indexer(q, weights, cache.index, meta.block_tables, meta.cu_seqlens_q,
                                     meta.seq_lens, self.topk, self.softmax_scale, meta.prompt_lens,
                                     meta.index_ties)


class MLAttention(nn.Module):
    """Multi-head latent attention with DSA. `shared` layers reuse the previous layer's top-k."""

    def __init__(self, cfg: ModelConfig, layer: int, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.n_local_heads = split(cfg.num_attention_heads, ps.tp_size, "num_attention_heads")
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        h = cfg.num_attention_heads
        self.q_a_proj = ReplicatedLinear(cfg.hidden_size, cfg.q_lora_rank, cfg.attention_bias, dtype)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype)
        self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, h * cfg.qk_head_dim, ps, dtype=dtype)
        self.kv_a_proj_with_mqa = ReplicatedLinear(cfg.hidden_size, self.kv_rank + self.rope_dim, cfg.attention_bias, dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, 1e-6, dtype)
        self.kv_b_proj = ColumnParallelLinear(self.kv_rank, h * (self.nope + self.v_dim), ps, dtype=dtype)
        self.o_proj = RowParallelLinear(h * self.v_dim, cfg.hidden_size, ps, cfg.attention_bias, dtype)
        self.indexer = None if cfg.indexer_types[layer] == "shared" else Indexer(cfg, dtype)
        self.softmax_scale = cfg.softmax_scale

    def forward(self, x, cos, sin, cache: LayerCache, meta: AttnMetadata, prev_topk):
        T = x.shape[0]
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_resid).view(T, self.n_local_heads, self.nope + self.rope_dim)
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rot = ops.interleaved_rope(q_rot, cos, sin)
        k_rot = ops.interleaved_rope(k_rot, cos, sin)
        index_k = self.indexer.key(x, cos, sin) if self.indexer is not None else None
        ops.mla_cache_write(latent, k_rot, index_k, meta.slot_mapping, cache.latent, cache.rope,
                            cache.index if self.indexer is not None else None)
        if self.indexer is not None:
            topk = self.indexer(x, q_resid, cos, sin, cache, meta)
        elif prev_topk is None:
            raise ValueError("a 'shared' indexer layer needs a previous 'full' layer")
        else:
            topk = prev_topk
        # Absorb W_UK into the query and W_UV into the output: attention runs in the latent space.
        w_kv = self.kv_b_proj.weight.view(self.n_local_heads, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w_kv[:, :self.nope], w_kv[:, self.nope:]
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        out = ops.sparse_mla_attention(q_latent, q_rot.contiguous(), cache.latent, cache.rope,
                                       meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, topk,
                                       self.softmax_scale)
        out = torch.einsum("thr,hvr->thv", out, w_uv).reshape(T, -1)
        return self.o_proj(out), topk


class MLP(nn.Module):
    """SwiGLU MLP, split over TP ranks; reduce=False leaves the partial sum to the caller."""

    def __init__(self, hidden: int, inter: int, ps: ParallelState, dtype: torch.dtype, reduce: bool = True):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, inter, ps, dtype=dtype)
        self.up_proj = ColumnParallelLinear(hidden, inter, ps, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, hidden, ps, dtype=dtype, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Router weights in float32, as the checkpoint keeps them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = _param(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32)
        self.e_score_correction_bias = _param(cfg.n_routed_experts, dtype=torch.float32)


class Experts(nn.Module):
    """This rank's routed experts stacked for grouped GEMM: w13 [E, 2I, D] (gate; up), w2 [E, D, I].

    With expert parallelism each EP rank holds E / ep whole experts; without it, every TP rank holds
    all experts with I split over TP (the routed output is then a partial sum, as the dense MLP's).
    Checkpoint tensors are per expert (mlp.experts.E.{gate,up,down}_proj.weight); `load_expert`
    places this rank's part of one into its slot, skipping experts another EP rank owns.
    """

    def __init__(self, cfg: ModelConfig, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.total = cfg.n_routed_experts
        self.n_local = split(cfg.n_routed_experts, ps.ep_size, "n_routed_experts")
        self.first = ps.ep_rank * self.n_local
        self.tp_parts, self.tp_index = (1, 0) if ps.ep_size > 1 else (ps.tp_size, ps.tp_rank)
        self.inter = inter = split(cfg.moe_intermediate_size, self.tp_parts, "moe_intermediate_size")
        self.w13_weight = _param(self.n_local, 2 * inter, cfg.hidden_size, dtype=dtype)
        self.w2_weight = _param(self.n_local, cfg.hidden_size, inter, dtype=dtype)

    def owns(self, expert: int) -> bool:
        return self.first <= expert < self.first + self.n_local

    def _part(self, loaded, dim: int) -> torch.Tensor:
        """This TP rank's slice of I along dim of one expert's checkpoint tensor."""
        return read(loaded, dim, self.tp_index * self.inter, self.inter)

    def load_expert(self, expert: int, proj: str, loaded) -> None:
        e = expert - self.first
        full = self.inter * self.tp_parts
        d = self.w13_weight.shape[2]
        want = (d, full) if proj == "down_proj" else (full, d)
        if shape_of(loaded) != want:
            raise ValueError(f"shape {shape_of(loaded)} does not match the model's {want}")
        if proj == "gate_proj":
            self.w13_weight.data[e, :self.inter].copy_(self._part(loaded, 0))
        elif proj == "up_proj":
            self.w13_weight.data[e, self.inter:].copy_(self._part(loaded, 0))
        else:
            self.w2_weight.data[e].copy_(self._part(loaded, 1))

    def load_fused(self, which: str, loaded) -> None:
        """transformers-internal layout: gate_up_proj [E, 2I, D] (gate rows, then up) or down_proj [E, D, I]."""
        full, d = self.inter * self.tp_parts, self.w13_weight.shape[2]
        want = (self.total, 2 * full, d) if which == "gate_up_proj" else (self.total, d, full)
        if shape_of(loaded) != want:
            raise ValueError(f"shape {shape_of(loaded)} does not match the model's {want} (all experts)")
        experts, lo, n = slice(self.first, self.first + self.n_local), self.tp_index * self.inter, self.inter
        if which == "gate_up_proj":
            self.w13_weight.data[:, :n].copy_(loaded[experts, lo:lo + n])
            self.w13_weight.data[:, n:].copy_(loaded[experts, full + lo:full + lo + n])
        else:
            self.w2_weight.data.copy_(loaded[experts, :, lo:lo + n])

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of x sorted by local expert, counts [E_local] -> SwiGLU expert outputs (ops.grouped_mlp)."""
        return ops.grouped_mlp(x, counts, self.w13_weight, self.w2_weight)

    def prepare_weights(self) -> None:
        """Once loaded: keep the weights in the layout grouped_mlp's backend reads fastest
        (ops.prepare_expert_weights; the cuda backend packs them in tiles). No more loading after."""
        w13, w2 = ops.prepare_expert_weights(self.w13_weight.data, self.w2_weight.data)
        if w13 is not self.w13_weight.data:
            self.w13_weight = nn.Parameter(w13, requires_grad=False)
        if w2 is not self.w2_weight.data:
            self.w2_weight = nn.Parameter(w2, requires_grad=False)


class MoE(nn.Module):
    """Routed experts plus the shared expert; one TP all-reduce sums every partial result.

    Without EP the routed and shared outputs are both TP partial sums. With EP (experts over all
    TP x DP ranks) each TP rank routes its own share of the DP group's tokens through the EP
    dispatch / combine, so no token is sent twice, and places the result in its rows: the same
    all-reduce then gathers the rows and sums the shared expert.
    """

    def __init__(self, cfg: ModelConfig, ps: ParallelState, dtype: torch.dtype, max_tokens_per_rank: int | None = None):
        super().__init__()
        self.cfg, self.ps = cfg, ps
        self.max_tokens_per_rank = max_tokens_per_rank  # static bound on the rows one rank routes (ops.ep_dispatch)
        self.gate = Router(cfg)
        self.experts = Experts(cfg, ps, dtype)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, ps, dtype,
                                  reduce=False)

    def _route(self, x: torch.Tensor):
        c = self.cfg
        logits = F.linear(x.float(), self.gate.weight)
        return ops.moe_route(logits, self.gate.e_score_correction_bias, c.num_experts_per_tok,
                             c.n_group, c.topk_group, c.routed_scaling_factor, c.norm_topk_prob)

    def _routed_ep(self, x: torch.Tensor) -> torch.Tensor:
        # Every rank must call dispatch and combine, also with no tokens (an idle DP group).
        start, stop = tp_rows(x.shape[0], self.ps)
        mine = x[start:stop]
        weights, ids = self._route(mine)
        recv, counts, handle = ops.ep_dispatch(mine, ids, weights, self.cfg.n_routed_experts, self.ps.ep_group,
                                               self.ps.mc2_group, self.max_tokens_per_rank)
        out = ops.ep_combine(self.experts(recv, counts), handle)
        if self.ps.tp_size == 1:
            return out
        routed = x.new_zeros(x.shape)
        routed[start:stop] = out
        return routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ps.ep_size > 1:
            routed = self._routed_ep(x)
        else:
            weights, ids = self._route(x)
            permuted, order, counts = ops.moe_permute(x, ids, self.experts.n_local)
            routed = ops.moe_unpermute(self.experts(permuted, counts), order, weights)
        return tp_all_reduce(routed + self.shared_experts(x), self.ps)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ps: ParallelState, dtype: torch.dtype,
                 max_tokens_per_rank: int | None = None):
        super().__init__()
        self.self_attn = MLAttention(cfg, layer, ps, dtype)
        self.mlp = (MoE(cfg, ps, dtype, max_tokens_per_rank) if cfg.is_moe_layer(layer)
                    else MLP(cfg.hidden_size, cfg.intermediate_size, ps, dtype))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x, cos, sin, cache: LayerCache, meta: AttnMetadata, prev_topk):
        attn, topk = self.self_attn(self.input_layernorm(x), cos, sin, cache, meta, prev_topk)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), topk


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class MTPLayer(DecoderLayer):
    """The multi-token-prediction layer (checkpoint names model.layers.{num_hidden_layers}.*).

    Loaded and kept for speculative decoding; the main forward pass does not run it.
    """

    def __init__(self, cfg: ModelConfig, ps: ParallelState, dtype: torch.dtype, max_tokens_per_rank: int | None = None):
        cfg_full = _with_full_indexer(cfg)
        super().__init__(cfg_full, cfg.num_hidden_layers, ps, dtype, max_tokens_per_rank)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.eh_proj = ReplicatedLinear(2 * cfg.hidden_size, cfg.hidden_size, dtype=dtype)
        self.shared_head = SharedHead(cfg, dtype)


def _with_full_indexer(cfg: ModelConfig) -> ModelConfig:
    """A view of cfg with one extra layer (the MTP layer): MoE, with its own indexer."""
    return dataclasses.replace(cfg, num_hidden_layers=cfg.num_hidden_layers + 1,
                               mlp_layer_types=cfg.mlp_layer_types + ("sparse",),
                               indexer_types=cfg.indexer_types + ("full",))


def make_rotary(cfg: ModelConfig) -> InterleavedRope:
    hf_fields = dict(qk_rope_head_dim=cfg.qk_rope_head_dim, hidden_size=cfg.hidden_size,
                     num_attention_heads=cfg.num_attention_heads)
    return InterleavedRope(cfg.qk_rope_head_dim, cfg.rope_parameters, cfg.max_position_embeddings, hf_fields)


class GlmModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, dtype: torch.dtype, max_tokens_per_rank: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ps, dtype)
        layers = [DecoderLayer(cfg, i, ps, dtype, max_tokens_per_rank) for i in range(cfg.num_hidden_layers)]
        layers += [MTPLayer(cfg, ps, dtype, max_tokens_per_rank) for _ in range(min(cfg.num_nextn_predict_layers, 1))]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary = make_rotary(cfg)

    def forward(self, ids, positions, caches: list[LayerCache], meta: AttnMetadata) -> torch.Tensor:
        x = self.embed_tokens(ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        topk = None
        for i in range(self.cfg.num_hidden_layers):
            x, topk = self.layers[i](x, cos, sin, caches[i], meta, topk)
        return self.norm(x)


class GlmMoeDsaForCausalLM(nn.Module):
    """GLM-5 for inference on a paged cache. forward -> final hidden states [T, D]."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState = SINGLE, dtype: torch.dtype = torch.bfloat16,
                 max_tokens_per_rank: int | None = None):
        """max_tokens_per_rank: the static bound on the tokens one rank routes through expert-parallel
        dispatch per step (the engine's max_num_batched_tokens / TP), given to every MoE layer."""
        super().__init__()
        if cfg.tie_word_embeddings:
            raise ValueError("config.json: tie_word_embeddings=true; GLM-5 has an untied lm_head")
        self.cfg, self.ps, self.dtype = cfg, ps, dtype
        qc = cfg.quantization_config or {}
        w8a8 = qc.get("quant_method") == "msmodelslim"
        device = torch.get_default_device()
        # W8A8: built on the meta device, then its linears swapped for int8 ones, then allocated, so the
        # high-precision weights they replace never take memory (model/quant_layers.py).
        with torch.device("meta") if w8a8 else contextlib.nullcontext():
            self.model = GlmModel(cfg, ps, dtype, max_tokens_per_rank)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ps, dtype)
        if w8a8:
            from glm5_ascend.model.quant_layers import materialize, quantize_model
            quantize_model(self, set(qc.get("float_modules", ())))
            materialize(self, device)
            with torch.device(device):
                self.model.rotary = make_rotary(cfg)

    @property
    def mtp(self) -> MTPLayer | None:
        layers = self.model.layers
        return layers[self.cfg.num_hidden_layers] if len(layers) > self.cfg.num_hidden_layers else None

    def drop_mtp(self) -> None:
        if self.mtp is not None:
            del self.model.layers[self.cfg.num_hidden_layers]

    def forward(self, ids, positions, caches, meta) -> torch.Tensor:
        return self.model(ids, positions, caches, meta)

    def idle_forward(self) -> None:
        """This DP group has no tokens this step: run only what the other groups need from it,
        each MoE layer's expert-parallel dispatch / combine (with no rows)."""
        w = self.lm_head.weight
        x = torch.empty(0, self.cfg.hidden_size, dtype=self.dtype, device=w.device)
        for i in range(self.cfg.num_hidden_layers):
            if self.cfg.is_moe_layer(i):
                self.model.layers[i].mlp(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()
