"""`glm5-ascend plan`: does a layout fit, how many KV tokens then, and how fast can decode go at best?

Weights per rank are exact for the engine's sharding and the chosen quantization (sizing.py). Each
rank also keeps a workspace (activations, allocator slack), the captured decode graphs' memory and
the collective buffers: HCCL gives every communicator 2 x HCCL_BUFFSIZE (hicann HCCL_BUFFSIZE.md), and a
rank uses one per TP group, EP group and MC2 group it is in. What is left holds the paged KV cache.
A layout that does not fit gets the smallest one that would (more nodes, or expert parallelism).
The decode bound is memory bandwidth: a step must at least read this device's weights that the batch
touches and the KV entries DSA reads (every index key, only the top-k latents). It is arithmetic,
not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from glm5_ascend.config import ModelConfig
from glm5_ascend.launcher.sizing import (QUANTIZATIONS, Layout, Params, active_params, check_layout,  # noqa: F401
                                         count_params, kv_bytes_per_token, kv_read_bytes, rank_weight_bytes,
                                         step_weight_bytes)

GiB = 1 << 30
# Per-device facts from the vendors' data sheets (shared/reference/README.md); override with flags.
# atlas-a3: one die of a 910C, the device unit of an A3 node (two per chip, 16 per node). Its memory
# bandwidth is not in the data sheet we have: 1.6 TB/s (a 910B's) is assumed; --hbm-tbps overrides.
DEVICES = {
    "atlas-a2": {"desc": "Ascend 910B (Atlas 800 A2)", "hbm_gib": 64, "hbm_tbps": 1.6, "per_node": 8, "hccl": True},
    "atlas-a3": {"desc": "Ascend 910C die (Atlas 800 A3)", "hbm_gib": 64, "hbm_tbps": 1.6, "per_node": 16,
                 "hccl": True},
    "h200": {"desc": "NVIDIA H200", "hbm_gib": 140, "hbm_tbps": 4.8, "per_node": 8, "hccl": False},
}
WORKSPACE_GIB = 2.0  # activations and allocator slack the engine keeps free
GRAPH_GIB = 1.0  # captured decode graphs (aclgraph / CUDA graphs) and their private pools
HCCL_BUFFSIZE_MB = 200  # HCCL's default and vllm-ascend's GLM-5 recipes' value
NCCL_BUFFER_MIB = 64  # per communicator, an estimate (NCCL's buffers are sized by channels, not an env knob)


def communicators(L: Layout) -> int:
    """Device communicators one rank joins: its TP group, the EP group, and MC2's own (NPU, EP)."""
    return int(L.tp > 1) + (2 if L.ep and L.devices > 1 else 0)


def margins(L: Layout, device: dict, buffsize_mb: int, workspace_gib: float, graph_gib: float) -> dict[str, int]:
    per_comm = 2 * buffsize_mb * (1 << 20) if device["hccl"] else NCCL_BUFFER_MIB * (1 << 20)
    return {"workspace": int(workspace_gib * GiB), "graphs": int(graph_gib * GiB),
            "collectives": communicators(L) * per_comm}


def plan(c: ModelConfig, L: Layout, device: dict, quant: str = "bf16", utilization: float = 0.9,
         max_model_len: int | None = None, max_num_seqs: int = 32, context: int = 8192,
         buffsize_mb: int = HCCL_BUFFSIZE_MB, workspace_gib: float = WORKSPACE_GIB,
         graph_gib: float = GRAPH_GIB, block_size: int = 128) -> dict:
    """The figures `glm5-ascend plan` prints; raises ValueError for a layout the engine cannot shard."""
    check_layout(c, L)
    p = count_params(c)
    weights = rank_weight_bytes(c, L, quant)
    margin = margins(L, device, buffsize_mb, workspace_gib, graph_gib)
    usable = int(device["hbm_gib"] * GiB * utilization)
    free = usable - weights["total"] - sum(margin.values())
    kv_tok = kv_bytes_per_token(c)
    kv_tokens = max(0, free // kv_tok) // block_size * block_size
    max_len = max_model_len or c.max_position_embeddings
    fits = free > 0 and kv_tokens >= min(max_len, context)
    return {
        "fits": fits, "total_params": p.total, "active_params": active_params(c, p),
        "layout": {"devices": L.devices, "tp": L.tp, "dp": L.dp, "expert_parallel": L.ep},
        "quantization": quant, "weight_bytes_per_rank": weights["total"],
        "weight_bytes_by_class": {k: v for k, v in weights.items() if k != "total"},
        "margin_bytes": margin, "usable_bytes": usable, "kv_bytes_per_token": kv_tok, "kv_tokens": kv_tokens,
        "seqs_at_max_len": kv_tokens // max_len, "max_model_len": max_len,
        "fits_batch": kv_tokens >= max_num_seqs * context,
        **decode_bound(c, L, device, quant, weights["total"], max_num_seqs, context),
    }


def decode_bound(c: ModelConfig, L: Layout, device: dict, quant: str, weight_bytes: int, batch: int,
                 context: int) -> dict:
    """Lower bound on a decode step: `batch` sequences per DP group at `context` tokens each."""
    step = step_weight_bytes(c, L, quant, batch * (L.dp if L.ep else 1)) + batch * kv_read_bytes(c, context)
    tpot = step / (device["hbm_tbps"] * 1e12)
    return {"step_bytes": int(step), "tpot_ms": tpot * 1e3, "decode_tok_s": batch * L.dp / tpot if tpot else math.inf}


def smallest_fitting(c: ModelConfig, L: Layout, device: dict, quant: str, per_node: int, max_nodes: int = 64,
                     **kw) -> dict | None:
    """The fewest devices (whole nodes, same TP; expert parallelism tried too) at which plan() fits."""
    start = max(1, math.ceil(L.devices / per_node))
    for nodes in range(start, max_nodes + 1):
        devices = nodes * per_node
        for ep in dict.fromkeys((L.ep, True)):
            cand = Layout(devices, L.tp, ep)
            try:
                r = plan(c, cand, device, quant, **kw)
            except ValueError:
                continue
            if r["fits"] and (cand != L):
                return {"nodes": nodes, "devices": devices, "tp": cand.tp, "dp": cand.dp, "expert_parallel": ep,
                        "kv_tokens": r["kv_tokens"]}
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory or config.json (default: the built-in tiny model)")
    p.add_argument("--device", choices=sorted(DEVICES), default="atlas-a2",
                   help="per-device facts; atlas-a3 is one 910C die (64 GB), the device unit of an A3 node")
    p.add_argument("--devices", type=int, default=None,
                   help="devices in all (default: --nodes x --devices-per-node, or 1)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (with --devices-per-node)")
    p.add_argument("--devices-per-node", type=int, default=None, help="default: the device's node size (A2 8, A3 16)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="devices per tensor-parallel group (default: --devices / --data-parallel-size, else 1)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=None, help="attention data-parallel groups")
    p.add_argument("--enable-expert-parallel", action="store_true", help="routed experts whole, over all devices")
    p.add_argument("--quantization", "-q", choices=QUANTIZATIONS, default="bf16", help="weight format served")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of each device's memory for weights, margins and KV cache")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--max-num-seqs", "--batch", dest="max_num_seqs", type=int, default=32,
                   help="sequences decoding together per data-parallel group")
    p.add_argument("--context", type=int, default=8192, help="tokens of context per sequence in the decode estimate")
    p.add_argument("--hccl-buffsize-mb", type=int, default=HCCL_BUFFSIZE_MB,
                   help="HCCL_BUFFSIZE of the deployment (each communicator holds 2x; MC2 may need more, "
                        "see `glm5-ascend launch`)")
    p.add_argument("--hbm-gib", type=float, default=None, help="override the device's memory")
    p.add_argument("--hbm-tbps", type=float, default=None, help="override the device's memory bandwidth")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


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


def layout_from_args(args: argparse.Namespace, per_node: int) -> Layout:
    if args.nodes is not None or args.devices_per_node is not None:
        devices = (args.nodes or 1) * (args.devices_per_node or per_node)
        if args.devices is not None and args.devices != devices:
            raise ValueError(f"--devices {args.devices} disagrees with --nodes x --devices-per-node = {devices}")
    else:
        devices = args.devices or 1
    tp, dp = args.tensor_parallel_size, args.data_parallel_size
    if tp is None:
        tp = devices // dp if dp and devices % dp == 0 else (1 if dp is None else 0)
    if dp is not None and tp * dp != devices:
        raise ValueError(f"--tensor-parallel-size {tp} x --data-parallel-size {dp} must equal the {devices} devices")
    return Layout(devices, tp, args.enable_expert_parallel)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(args: argparse.Namespace) -> int:
    c = _config(args.model)
    dev = dict(DEVICES[args.device])
    dev["hbm_gib"] = args.hbm_gib or dev["hbm_gib"]
    dev["hbm_tbps"] = args.hbm_tbps or dev["hbm_tbps"]
    per_node = args.devices_per_node or dev["per_node"]
    L = layout_from_args(args, per_node)
    kw = dict(utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, context=args.context, buffsize_mb=args.hccl_buffsize_mb)
    r = plan(c, L, dev, args.quantization, **kw)
    if not r["fits"]:
        r["smallest_fitting_layout"] = smallest_fitting(c, L, dev, args.quantization, per_node, **kw)
    if args.json:
        print(json.dumps(r))
        return 0 if r["fits"] else 1
    _print(r, args, dev, L)
    return 0 if r["fits"] and r["fits_batch"] else 1


def _print(r: dict, args, dev: dict, L: Layout) -> None:
    m = r["margin_bytes"]
    print(f"model: {_count(r['total_params'])} parameters with the MTP layer, "
          f"{_count(r['active_params'])} used per token (embedding and lm_head included)")
    experts = f"routed experts whole over all {L.devices} devices (EP)" if L.ep else \
        f"routed experts split over TP {L.tp} (no EP)"
    print(f"layout: {L.devices} x {dev['desc']} ({dev['hbm_gib']:g} GiB, {dev['hbm_tbps']:g} TB/s), TP {L.tp} "
          f"x DP {L.dp} attention, {experts}; weights {r['quantization']}")
    print(f"per rank: weights {r['weight_bytes_per_rank'] / GiB:.2f} GiB, workspace {m['workspace'] / GiB:.1f}, "
          f"graphs {m['graphs'] / GiB:.1f}, collective buffers {m['collectives'] / GiB:.2f} GiB "
          f"of {r['usable_bytes'] / GiB:.1f} GiB usable; KV {r['kv_bytes_per_token']:,} bytes per token")
    if not r["fits"]:
        s = r.get("smallest_fitting_layout")
        hint = (f"; the smallest that fits: {s['nodes']} node(s), {s['devices']} devices, TP {s['tp']} x DP {s['dp']}"
                f"{' with --enable-expert-parallel' if s['expert_parallel'] else ''} ({s['kv_tokens']:,} KV tokens)"
                if s else "; no layout of up to 64 nodes fits")
        print(f"verdict: does not fit{hint}")
        return
    print(f"KV cache per rank: {r['kv_tokens']:,} tokens ({r['seqs_at_max_len']} sequences at max_model_len "
          f"{r['max_model_len']:,})")
    print(f"decode bound, {args.max_num_seqs} sequences per DP group at {args.context:,} context: reads "
          f"{r['step_bytes'] / GiB:.2f} GiB per step per device -> TPOT >= {r['tpot_ms']:.2f} ms, "
          f"<= {r['decode_tok_s']:,.0f} output tok/s in all")
    print("verdict: fits" if r["fits_batch"] else "verdict: weights fit, but the KV cache cannot hold the batch "
          "at this context")
