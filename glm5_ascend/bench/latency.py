"""`glm5-ascend bench latency`: the time of one batch, prompt to last token (like `vllm bench latency`).

Each iteration sends --batch-size fresh random prompts of --input-len tokens (fresh, so the prefix
cache never serves them) and generates exactly --output-len tokens each (ignore_eos). Beside vLLM's
figures it prints, from the steps of the timed iterations:
  prefill  the steps that ran prompt tokens: their time, their FLOPs, and that as a share of the
           measured matmul peak;
  decode   the steps where every sequence decoded one token: the median step, the weight + KV bytes
           such a step must read, that bound as a time at the measured copy bandwidth, and the share.
--compare-transformers times transformers' GlmMoeDsaForCausalLM on the same configuration and shapes
afterwards (random weights of its own; the engine is shut down first to free the memory).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np

from glm5_ascend.bench import offline

PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per iteration")
    p.add_argument("--num-iters-warmup", type=int, default=10, help="iterations run before timing")
    p.add_argument("--num-iters", type=int, default=30, help="timed iterations")
    p.add_argument("--output-json", default=None, help="write the results to this JSON file")
    p.add_argument("--compare-transformers", action="store_true",
                   help="then time transformers' GlmMoeDsaForCausalLM on the same model and shapes")
    offline.add_engine_arguments(p)


def _check(args) -> None:
    for name in ("input_len", "output_len", "batch_size", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.num_iters_warmup < 0:
        raise ValueError(f"--num-iters-warmup {args.num_iters_warmup} must be at least 0")


def summarize(iterations: list[tuple[float, list]], roofline: offline.Roofline, batch: int) -> dict:
    """Prefill and decode figures of the timed iterations' steps."""
    ceil = roofline.ceilings
    prefill_s = [sum(r.seconds for r in steps if not r.is_decode) for _, steps in iterations]
    prefill_flops = sum(roofline.step_flops(r) for r in iterations[0][1] if not r.is_decode)
    full = [r for _, steps in iterations for r in steps if r.is_decode and len(r.decode_contexts) == batch]
    out = {"prefill": None, "decode": None}
    if prefill_s:
        t = statistics.median(prefill_s)
        out["prefill"] = {"seconds": t, "flops": prefill_flops, "flops_per_s": prefill_flops / t,
                          "share_of_matmul_peak": prefill_flops / t / ceil.matmul_flops}
    if full:
        mid = sorted(full, key=lambda r: r.seconds)[len(full) // 2]  # the median step, bound by its own bytes
        step = mid.seconds
        nbytes = roofline.step_bytes(mid)
        bound = nbytes / ceil.copy_bps
        out["decode"] = {"steps": len(full), "median_step_seconds": step,
                         "mean_context": float(np.mean([np.mean(r.decode_contexts) for r in full])),
                         "step_bytes": nbytes, "bound_seconds": bound, "share_of_bound": bound / step}
    return out


def report(summary: dict, args, ceil: offline.Ceilings) -> list[str]:
    lines = []
    p, d = summary["prefill"], summary["decode"]
    if p:
        lines.append(f"Prefill: {args.batch_size} x {args.input_len} tokens in {p['seconds'] * 1e3:.1f} ms "
                     f"(median); {offline.si(p['flops'], 'FLOP')} -> {offline.si(p['flops_per_s'], 'FLOP/s')} = "
                     f"{offline.percent(p['flops_per_s'], ceil.matmul_flops)} of the measured matmul peak")
    if d:
        lines.append(f"Decode: batch {args.batch_size}, mean context {d['mean_context']:.0f}: step "
                     f"{d['median_step_seconds'] * 1e3:.2f} ms (median of {d['steps']}); a step reads "
                     f"{offline.si(d['step_bytes'], 'B')} of weights + KV -> bound {d['bound_seconds'] * 1e3:.2f} ms "
                     f"at {offline.si(ceil.copy_bps, 'B/s')}: {offline.percent(d['bound_seconds'], d['median_step_seconds'])}"
                     " of the bound")
    return lines


def main(args: argparse.Namespace) -> int:
    _check(args)
    from glm5_ascend.engine.sampling_params import SamplingParams
    llm, ceil = offline.build(args)
    engine = llm.llm_engine
    config = engine.config
    if args.input_len + args.output_len > engine.max_model_len:
        raise ValueError(f"--input-len {args.input_len} + --output-len {args.output_len} exceeds --max-model-len "
                         f"{engine.max_model_len}; raise --max-model-len or shorten them")
    roofline = offline.Roofline(config, ceil)
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)
    rng = np.random.default_rng(config.seed)

    def iteration():
        prompts = offline.random_prompts(rng, config.model.vocab_size, [args.input_len] * args.batch_size)
        seconds, steps, _ = offline.run_requests(llm, prompts, params)
        return seconds, steps

    print(ceil.describe(), flush=True)
    print(offline.model_summary(config), flush=True)
    for _ in range(args.num_iters_warmup):
        iteration()
    iterations = [iteration() for _ in range(args.num_iters)]
    latencies = [s for s, _ in iterations]
    avg = float(np.mean(latencies))
    pct = {p: float(np.percentile(latencies, p)) for p in PERCENTILES}
    print(f"Avg latency: {avg} seconds")
    for p, v in pct.items():
        print(f"{p}% percentile latency: {v} seconds")
    summary = summarize(iterations, roofline, args.batch_size)
    for line in report(summary, args, ceil):
        print(line)
    result = {"avg_latency": avg, "latencies": latencies, "percentiles": {str(k): v for k, v in pct.items()},
              "device": ceil.device, "copy_bytes_per_s": ceil.copy_bps, "matmul_flops_per_s": ceil.matmul_flops,
              "model": offline.model_summary(config), **summary}
    if args.compare_transformers:
        llm.shutdown()
        del llm, engine
        gc.collect()
        result["transformers"] = compare_transformers(config, args, roofline)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def compare_transformers(config, args, roofline: offline.Roofline) -> dict:
    """transformers' GlmMoeDsaForCausalLM, random weights, the same config, dtype, device and shapes:
    prefill = generate(max_new_tokens=1); decode step = (full generate - prefill) / (output_len - 1)."""
    import torch
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    from glm5_ascend.platform import platform_for_device
    platform = platform_for_device(config.device)
    device = platform.device()
    if platform.module() is not None:
        platform.module().empty_cache()
    raw = json.loads((Path(config.model_path) / "config.json").read_text())
    raw.update(args.hf_overrides or {})
    raw.pop("quantization_config", None)
    hf_cfg = GlmMoeDsaConfig(**raw)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(config.dtype)
        with torch.device(device):
            model = GlmMoeDsaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(default)
    ceil = roofline.ceilings
    rng = np.random.default_rng(config.seed + 1)
    iters = max(1, min(3, args.num_iters))
    prefill, full = [], []
    try:
        for i in range(iters + 1):
            ids = torch.tensor(offline.random_prompts(rng, config.model.vocab_size,
                                                      [args.input_len] * args.batch_size), device=device)
            kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
            for out, n in ((prefill, 1), (full, args.output_len)):
                platform.synchronize()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
                platform.synchronize()
                if i:  # the first round warms up
                    out.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        print("transformers: out of device memory at this shape")
        return {"error": "out of memory"}
    p, f = statistics.median(prefill), statistics.median(full)
    step = (f - p) / max(1, args.output_len - 1)
    ctx = args.input_len + args.output_len // 2
    bound = roofline.step_bytes(offline.StepRecord(0.0, [ctx] * args.batch_size)) / ceil.copy_bps
    flops = roofline.step_flops(offline.StepRecord(0.0, [], [(0, args.input_len)] * args.batch_size, args.batch_size))
    print(f"transformers GlmMoeDsaForCausalLM (median of {iters}): latency {f:.3f} s; prefill "
          f"{p * 1e3:.1f} ms = {offline.percent(flops / p, ceil.matmul_flops)} of the matmul peak; decode step "
          f"{step * 1e3:.2f} ms = {offline.percent(bound, step)} of the bound")
    return {"latency_seconds": f, "prefill_seconds": p, "decode_step_seconds": step, "iters": iters}
