"""Parameter counts and per-rank weight bytes of GLM-5 under a layout and a quantization.

Counts come from config.json alone (nothing about GLM-5 is assumed). Per-rank bytes follow how the
engine shards and stores each tensor (model/glm5.py, model/layers.py, model/quant_layers.py):
attention heads, MLA up-projections, dense MLPs, shared experts and the vocabulary split over TP;
q_a / kv_a projections, norms, router and indexer whole on every rank; routed experts split on their
intermediate dimension over TP without expert parallelism, or as whole experts over all TP x DP ranks
with it. The model's dtype is bf16 except the router and the indexer's weights_proj (float32).
tests/launcher/test_plan.py checks these bytes against the engine's own model built on the meta device.

Quantizations (bytes per weight of a quantized linear; a per-output-row float32 scale beside it):
  bf16  2 everywhere
  fp8   as bf16: the engine dequantizes FP8 checkpoints at load (no FP8 matmul on Ascend / CPU)
  w8a8  1 for every linear the engine runs in W8A8 (model/quant.py DEFAULT_KEEP stays bf16)
  w4a8  0.5 for the routed experts (msmodelslim W4A8 keeps int4 experts), the other linears as w8a8;
        an estimate: the engine does not run W4A8 yet
"""
from __future__ import annotations

from dataclasses import dataclass

from glm5_ascend.config import ModelConfig

QUANTIZATIONS = ("bf16", "fp8", "w8a8", "w4a8")
_BF16, _FP32, _SCALE = 2, 4, 4
# Linears the engine keeps in bf16 under W8A8 (model/quant.py DEFAULT_KEEP and MODEL_FLOAT_ONLY, by role).
_KEEP_ROLES = {"kv_b_proj", "indexer", "eh_proj", "embedding", "lm_head"}


@dataclass(frozen=True)
class Params:
    """Parameter counts by placement class."""

    tp_split: int  # attention, dense MLPs, shared experts: split over tensor-parallel ranks
    replicated: int  # norms, router, indexer: whole on every device
    vocab: int  # embedding + lm_head: split over tensor-parallel ranks
    routed: int  # routed experts of all MoE layers (MTP layer excluded)
    per_expert: int  # one routed expert of one layer
    moe_layers: int
    mtp: int  # the MTP layer (loaded, not run by the main pass)

    @property
    def total(self) -> int:
        return self.tp_split + self.replicated + self.vocab + self.routed + self.mtp


@dataclass(frozen=True)
class Layout:
    devices: int
    tp: int
    ep: bool

    @property
    def dp(self) -> int:
        return self.devices // self.tp


def _attention(c: ModelConfig) -> tuple[int, int]:
    """(tp-split, replicated) parameters of one MLA block (indexer apart)."""
    h = c.num_attention_heads
    split = c.q_lora_rank * h * c.qk_head_dim + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    split += h * c.v_head_dim * c.hidden_size
    repl = c.hidden_size * (c.q_lora_rank + c.kv_lora_rank + c.qk_rope_head_dim) + c.q_lora_rank + c.kv_lora_rank
    repl += 2 * c.hidden_size  # the layer's two RMSNorms
    return split, repl


def _indexer(c: ModelConfig) -> int:
    return (c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.hidden_size * c.index_head_dim
            + 2 * c.index_head_dim + c.hidden_size * c.index_n_heads)


def count_params(c: ModelConfig) -> Params:
    attn_split, attn_repl = _attention(c)
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    split = repl = routed = 0
    moe_layers = 0
    for i in range(c.num_hidden_layers):
        split += attn_split
        repl += attn_repl + (_indexer(c) if c.indexer_types[i] == "full" else 0)
        if c.is_moe_layer(i):
            moe_layers += 1
            routed += c.n_routed_experts * per_expert
            split += c.n_shared_experts * per_expert
            repl += c.n_routed_experts * (c.hidden_size + 1)  # router weight and bias
        else:
            split += 3 * c.hidden_size * c.intermediate_size
    mtp = 0
    if c.num_nextn_predict_layers:
        mtp = (attn_split + attn_repl + _indexer(c) + c.n_routed_experts * (per_expert + c.hidden_size + 1)
               + c.n_shared_experts * per_expert + 2 * c.hidden_size * c.hidden_size + 3 * c.hidden_size)
    vocab = 2 * c.vocab_size * c.hidden_size
    return Params(split, repl + c.hidden_size, vocab, routed, per_expert, moe_layers, mtp)


def active_params(c: ModelConfig, p: Params) -> int:
    """Parameters one token uses: everything but the routed experts it is not sent to (no MTP)."""
    return p.tp_split + p.replicated + p.vocab + p.moe_layers * c.num_experts_per_tok * p.per_expert


def kv_bytes_per_token(c: ModelConfig, dtype_bytes: int = _BF16) -> int:
    """Paged-cache bytes of one token on one rank: latent + rope key + index key in every layer (MLA
    keeps one latent per token, so every TP rank of a DP group holds the whole cache of its sequences)."""
    return c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim) * dtype_bytes


def step_weight_bytes(c: ModelConfig, L: Layout, quant: str, tokens: int) -> float:
    """Weight bytes one rank must read for a forward of `tokens` tokens (those its experts may see):
    every weight but the routed experts no token is sent to (uniform routing: an expert is used with
    probability 1 - (1 - 1/E)^(tokens * top-k)) and the embedding table, which is gathered a row per
    token, not read whole (the lm_head is). The MTP layer is not run."""
    full = rank_weight_bytes(c, L, quant, mtp=False)
    routed = full["routed_experts"]
    hit = 1 - (1 - 1 / c.n_routed_experts) ** (tokens * c.num_experts_per_tok)
    embedding_table = (c.vocab_size // L.tp) * c.hidden_size * _BF16
    return full["total"] - routed + routed * hit - embedding_table


def kv_read_bytes(c: ModelConfig, context: int, dtype_bytes: int = _BF16) -> int:
    """Cache bytes DSA reads for one token at `context`: every index key, the top-k latents and rope keys."""
    return c.num_hidden_layers * (min(c.index_topk, context) * (c.kv_lora_rank + c.qk_rope_head_dim)
                                  + context * c.index_head_dim) * dtype_bytes


def prefill_flops(c: ModelConfig, start: int, n: int) -> float:
    """FLOPs of prompt tokens start .. start+n-1 on one device (no TP), without the lm_head: twice the
    active parameters each multiplies (the embedding is a gather), the indexer's scores over every
    earlier token and sparse MLA's over the top-k (QK over latent + rope, PV over the latent)."""
    linear = 2 * (active_params(c, count_params(c)) - c.vocab_size * c.hidden_size * 2)
    ctx_sum = n * start + n * (n + 1) // 2  # sum of the context lengths start+1 .. start+n
    k, first = c.index_topk, start + 1
    topk_sum = ctx_sum if start + n <= k else (  # sum of min(k, ctx)
        (sum(range(first, k + 1)) if first <= k else 0) + k * (start + n - max(k, start)))
    full = sum(t == "full" for t in c.indexer_types)
    per_head_mla = 2 * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    return (n * linear + 2 * c.index_n_heads * c.index_head_dim * full * ctx_sum
            + per_head_mla * c.num_attention_heads * c.num_hidden_layers * topk_sum)


def _linear(n: int, k: int, role: str, quant: str) -> int:
    """Bytes of one rank's [n, k] linear weight (plus its scales when quantized)."""
    if quant in ("w8a8", "w4a8") and role not in _KEEP_ROLES:
        per = 0.5 if (quant == "w4a8" and role == "routed") else 1
        return int(n * k * per) + n * _SCALE
    return n * k * _BF16


def _layer_bytes(c: ModelConfig, L: Layout, quant: str, moe: bool, full_indexer: bool) -> dict[str, int]:
    t, h, d = L.tp, c.num_attention_heads, c.hidden_size
    heads = h // t
    out = {"attention": (_linear(c.q_lora_rank, d, "q_a", quant)
                         + _linear(heads * c.qk_head_dim, c.q_lora_rank, "q_b", quant)
                         + _linear(c.kv_lora_rank + c.qk_rope_head_dim, d, "kv_a", quant)
                         + _linear(heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, "kv_b_proj", quant)
                         + _linear(d, heads * c.v_head_dim, "o", quant)
                         + (c.q_lora_rank + c.kv_lora_rank + 2 * d) * _BF16),  # 2 MLA norms, 2 layer norms
           "indexer": 0, "dense_mlp": 0, "shared_experts": 0, "routed_experts": 0, "router": 0}
    if c.attention_bias:  # q_a, kv_a and o_proj biases, whole on every rank
        out["attention"] += (c.q_lora_rank + c.kv_lora_rank + c.qk_rope_head_dim + d) * _BF16
    if full_indexer:
        out["indexer"] = (_linear(c.index_n_heads * c.index_head_dim, c.q_lora_rank, "indexer", quant)
                          + _linear(c.index_head_dim, d, "indexer", quant) + 2 * c.index_head_dim * _BF16
                          + c.index_n_heads * d * _FP32)
    if not moe:
        i = c.intermediate_size // t
        out["dense_mlp"] = 2 * _linear(i, d, "mlp", quant) + _linear(d, i, "mlp", quant)
        return out
    si = c.moe_intermediate_size * c.n_shared_experts // t
    out["shared_experts"] = 2 * _linear(si, d, "shared", quant) + _linear(d, si, "shared", quant)
    out["router"] = c.n_routed_experts * (d + 1) * _FP32
    n_local = c.n_routed_experts // L.devices if L.ep else c.n_routed_experts
    inter = c.moe_intermediate_size if L.ep else c.moe_intermediate_size // t
    out["routed_experts"] = n_local * (_linear(2 * inter, d, "routed", quant) + _linear(d, inter, "routed", quant))
    return out


def rank_weight_bytes(c: ModelConfig, L: Layout, quant: str, mtp: bool = True) -> dict[str, int]:
    """Bytes of weights one rank holds, by class, and their "total" (rank 0; all ranks hold the same)."""
    if quant not in QUANTIZATIONS:
        raise ValueError(f"--quantization {quant!r}: choose one of {', '.join(QUANTIZATIONS)}")
    d = c.hidden_size
    total: dict[str, int] = {}

    def add(part: dict[str, int]) -> None:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    for i in range(c.num_hidden_layers):
        add(_layer_bytes(c, L, quant, c.is_moe_layer(i), c.indexer_types[i] == "full"))
    if mtp and c.num_nextn_predict_layers:
        layer = _layer_bytes(c, L, quant, True, True)
        extra = _linear(d, 2 * d, "eh_proj", quant) + 3 * d * _BF16  # enorm, hnorm, shared_head.norm
        total["mtp"] = sum(layer.values()) + extra
    total["embedding"] = 2 * (c.vocab_size // L.tp) * d * _BF16 + d * _BF16  # embed, lm_head, final norm
    total["total"] = sum(total.values())
    return total


def check_layout(c: ModelConfig, L: Layout) -> None:
    """Raise ValueError naming the flag when the engine cannot shard the model this way."""
    if L.devices < 1 or L.tp < 1 or L.devices % L.tp:
        raise ValueError(f"--devices {L.devices} must be a positive multiple of --tensor-parallel-size {L.tp}")
    for field, value in (("num_attention_heads", c.num_attention_heads), ("vocab_size", c.vocab_size),
                         ("intermediate_size", c.intermediate_size),
                         ("moe_intermediate_size", c.moe_intermediate_size * c.n_shared_experts)):
        if value % L.tp:
            raise ValueError(f"--tensor-parallel-size {L.tp} does not divide {field}={value}")
    if L.ep and c.n_routed_experts % L.devices:
        raise ValueError(f"n_routed_experts={c.n_routed_experts} is not divisible by --devices {L.devices}; "
                         "with --enable-expert-parallel routed experts are split over every device")
    if not L.ep and c.moe_intermediate_size % L.tp:
        raise ValueError(f"--tensor-parallel-size {L.tp} does not divide moe_intermediate_size="
                         f"{c.moe_intermediate_size}; use --enable-expert-parallel")
