"""`glm5-ascend plan`: does a layout fit, and how fast can decode go at best?

Counts parameters from config.json (nothing about GLM-5 is assumed), places them the way the engine
shards them (attention, dense MLPs, shared experts and embeddings split over tensor-parallel ranks;
routed experts split over all devices; attention replicated per data-parallel group), sizes the
paged KV cache from what is left, and bounds decode from memory bandwidth: a step must at least
read this device's weights that the batch touches and the KV entries DSA reads (every index key,
only the top-k latents). It is arithmetic, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from glm5_ascend.config import ModelConfig, parse_dtype

# Per-device facts from the vendors' data sheets (shared/reference/README.md); override with flags.
DEVICES = {
    "atlas-a2": {"desc": "Ascend 910B (Atlas 800 A2)", "hbm_gib": 64, "hbm_tbps": 1.6, "tflops": 354},
    "h200": {"desc": "NVIDIA H200", "hbm_gib": 141, "hbm_tbps": 4.8, "tflops": 990},
}
_RESERVE_GIB = 2.0  # activations and allocator slack, as the engine keeps free


@dataclass(frozen=True)
class Params:
    """Parameter counts by placement class."""

    tp_split: int  # attention, dense MLPs, shared experts: split over tensor-parallel ranks
    replicated: int  # norms, router, indexer: whole on every device
    vocab: int  # embedding + lm_head: split over tensor-parallel ranks
    routed: int  # routed experts of all MoE layers: split over every device
    per_expert: int  # one routed expert of one layer
    moe_layers: int
    mtp: int  # the MTP layer (loaded, not run by the main pass)

    @property
    def total(self) -> int:
        return self.tp_split + self.replicated + self.vocab + self.routed + self.mtp


def _attention(c: ModelConfig) -> tuple[int, int]:
    """(tp-split, replicated) parameters of one MLA + indexer block."""
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


def kv_bytes_per_token(c: ModelConfig, dtype_bytes: int) -> int:
    return c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim) * dtype_bytes


def plan(c: ModelConfig, devices: int, tp: int, hbm_gib: float, hbm_tbps: float, dtype_bytes: int,
         utilization: float, max_model_len: int, batch: int, context: int) -> dict:
    """The figures `glm5-ascend plan` prints; raises ValueError for an impossible layout."""
    if devices < 1 or tp < 1 or devices % tp:
        raise ValueError(f"--devices {devices} must be a positive multiple of --tensor-parallel-size {tp}")
    if c.num_attention_heads % tp:
        raise ValueError(f"--tensor-parallel-size {tp} does not divide num_attention_heads={c.num_attention_heads}")
    if c.n_routed_experts % devices and devices > 1:
        raise ValueError(f"n_routed_experts={c.n_routed_experts} is not divisible by --devices {devices}; "
                         "routed experts are split over every device")
    p = count_params(c)
    dp = devices // tp
    local_experts = c.n_routed_experts / devices
    weights = ((p.tp_split + p.vocab + p.mtp) / tp + p.replicated + p.routed / devices) * dtype_bytes
    budget = hbm_gib * (1 << 30) * utilization - _RESERVE_GIB * (1 << 30)
    kv_tok = kv_bytes_per_token(c, dtype_bytes)
    kv_tokens = max(0, int((budget - weights) // kv_tok))
    # Decode step on one device: a batch of `batch` sequences per DP group, each at `context` tokens.
    routed_tokens = batch * dp * c.num_experts_per_tok  # token-expert pairs over all devices
    touched = local_experts * (1 - (1 - 1 / c.n_routed_experts) ** routed_tokens)  # expected experts hit
    step_weights = ((p.tp_split + p.vocab) / tp + p.replicated
                    + p.moe_layers * touched * p.per_expert) * dtype_bytes
    per_seq_kv = c.num_hidden_layers * (min(c.index_topk, context) * (c.kv_lora_rank + c.qk_rope_head_dim)
                                        + context * c.index_head_dim) * dtype_bytes
    step_bytes = step_weights + batch * per_seq_kv
    tpot = step_bytes / (hbm_tbps * 1e12)
    return {
        "total_params": p.total, "active_params": active_params(c, p), "dp": dp,
        "weights_gib": weights / (1 << 30), "budget_gib": budget / (1 << 30),
        "fits": weights < budget, "kv_tokens": kv_tokens,
        "fits_one_max_len_seq": kv_tokens >= max_model_len, "seqs_at_max_len": kv_tokens // max_model_len,
        "fits_batch": kv_tokens >= batch * context, "tpot_ms": tpot * 1e3,
        "decode_tok_s": batch * dp / tpot if tpot else math.inf, "step_gib": step_bytes / (1 << 30),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or config.json (default: the built-in tiny model)")
    p.add_argument("--device", choices=sorted(DEVICES), default="atlas-a2", help="per-device facts to assume")
    p.add_argument("--devices", type=int, default=1, help="devices in all (nodes x devices per node)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="devices per tensor-parallel group (divides --devices and the attention heads)")
    p.add_argument("--dtype", default="bfloat16", help="weight and KV dtype")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of each device's memory for weights and KV cache")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--batch", type=int, default=32, help="sequences decoding together per data-parallel group")
    p.add_argument("--context", type=int, default=8192, help="tokens of context per sequence in the decode estimate")
    p.add_argument("--hbm-gib", type=float, default=None, help="override the device's memory")
    p.add_argument("--hbm-tbps", type=float, default=None, help="override the device's memory bandwidth")


def _config(model: str | None) -> ModelConfig:
    if model is None:
        from glm5_ascend.llm import resolve_model
        model = resolve_model(None)
    path = Path(model)
    if path.is_file():
        try:
            return ModelConfig.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return ModelConfig.from_pretrained(path)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(args: argparse.Namespace) -> int:
    c = _config(args.model)
    dev = DEVICES[args.device]
    hbm = args.hbm_gib or dev["hbm_gib"]
    bw = args.hbm_tbps or dev["hbm_tbps"]
    max_len = args.max_model_len or c.max_position_embeddings
    r = plan(c, args.devices, args.tensor_parallel_size, hbm, bw, parse_dtype(args.dtype).itemsize,
             args.gpu_memory_utilization, max_len, args.batch, args.context)
    print(f"model: {_count(r['total_params'])} parameters with the MTP layer, "
          f"{_count(r['active_params'])} used per token (embedding and lm_head included)")
    print(f"layout: {args.devices} x {dev['desc']} ({hbm:g} GiB, {bw:g} TB/s), TP {args.tensor_parallel_size} "
          f"x DP {r['dp']} attention, routed experts over all {args.devices} devices")
    print(f"weights per device: {r['weights_gib']:.2f} GiB of {r['budget_gib']:.1f} GiB usable")
    if not r["fits"]:
        print("verdict: does not fit; add devices or use a smaller dtype")
        return 1
    print(f"KV cache per device: {r['kv_tokens']:,} tokens ({r['seqs_at_max_len']} sequences at max_model_len {max_len:,})")
    print(f"decode bound, batch {args.batch} per DP group at {args.context:,} context: reads {r['step_gib']:.2f} GiB "
          f"per step per device -> TPOT >= {r['tpot_ms']:.2f} ms, <= {r['decode_tok_s']:,.0f} output tok/s in all")
    ok = r["fits_one_max_len_seq"] and r["fits_batch"]
    print("verdict: fits" if ok else "verdict: weights fit, but the KV cache cannot hold "
          + ("one max_model_len sequence" if not r["fits_one_max_len_seq"] else "the batch at this context"))
    return 0 if ok else 1
