"""What `bench latency` and `bench throughput` share: the engine built from EngineArgs, the device's
measured ceilings, a step loop that records what each engine step ran, and each step's roofline floor.

The floor of a step is max(bytes it must read / copy bandwidth, FLOPs it must do / matmul peak):
  bytes  the weights the step's tokens touch (every weight but routed experts no token is sent to,
         under uniform routing, and the embedding table, which is gathered) plus the KV entries DSA
         reads for each decoded token (every index key, the top-k latents and rope keys);
  FLOPs  its prompt tokens' (launcher/sizing.py prefill_flops) plus the lm_head's rows.
Both are arithmetic from config.json (launcher/sizing.py), per device; the ceilings are measured on
the spot (bench/ops.py measure_peaks), before the engine takes the memory.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from glm5_ascend.engine.arg_utils import EngineArgs


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(p)


@dataclass(frozen=True)
class Ceilings:
    device: str  # e.g. "NVIDIA H200 (cuda)"
    copy_bps: float  # bytes/s of a device copy, read + write
    matmul_flops: float  # FLOP/s of a square matmul in `dtype`
    dtype: torch.dtype
    matmul_n: int

    def describe(self) -> str:
        return (f"{self.device}, torch {torch.__version__}; measured: copy {si(self.copy_bps, 'B/s')}, "
                f"{str(self.dtype).removeprefix('torch.')} matmul {self.matmul_n}^3 {si(self.matmul_flops, 'FLOP/s')}")


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """The copy bandwidth and matmul rate of `device` (smaller probes on the CPU, which has less to give)."""
    from glm5_ascend.bench.ops import Timer, measure_peaks
    timer = Timer(device)
    if device.type == "cpu":
        name, n = "CPU", 1024
        bw, flops = measure_peaks(device, timer, copy_bytes=256 << 20, n=n, dtype=dtype, iters=5)
    else:
        mod = timer.mod
        name, n = f"{mod.get_device_name(device)} ({device.type})", 8192
        bw, flops = measure_peaks(device, timer, n=n, dtype=dtype)
        del timer
        mod.empty_cache()
    return Ceilings(name, bw, flops, dtype, n)


@dataclass
class StepRecord:
    """What one engine step ran and how long it took (wall clock, the sampled tokens on the host)."""

    seconds: float
    decode_contexts: list[int] = field(default_factory=list)  # context length of each decoded token
    prefill_chunks: list[tuple[int, int]] = field(default_factory=list)  # (first position, tokens)
    logit_rows: int = 0  # rows that went through the lm_head

    @property
    def is_decode(self) -> bool:
        return not self.prefill_chunks


def run_requests(llm, prompts: list[list[int]], params) -> tuple[float, list[StepRecord], int]:
    """Run every prompt to completion through the engine's step loop: (seconds, steps, output tokens).
    `params` is one SamplingParams or one per prompt."""
    engine = llm.llm_engine
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"bench-{next(_request_ids)}" for _ in prompts]
    for rid, prompt, p in zip(ids, prompts, params):
        engine.add_request(rid, prompt, p)
    records: list[StepRecord] = []
    generated = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outputs = engine.step()
        rec = StepRecord(time.perf_counter() - t0)
        for out in outputs:
            if out.finished:
                generated += sum(len(c.token_ids) for c in out.outputs)
        batch = engine.last_batch
        if not batch:
            continue
        for seq, n in zip(batch.seqs, batch.num_tokens):
            first = seq.num_computed_tokens - n  # the engine has counted this step's tokens already
            if first >= seq.num_prompt_tokens:
                rec.decode_contexts.extend(range(first + 1, first + n + 1))
                rec.logit_rows += n
            else:
                rec.prefill_chunks.append((first, n))
                rec.logit_rows += int(first + n >= seq.num_prompt_tokens)
        records.append(rec)
    return time.perf_counter() - start, records, generated


_request_ids = itertools.count()


def random_prompts(rng: np.random.Generator, vocab: int, lengths: list[int]) -> list[list[int]]:
    """Random token ids (the model's vocabulary, no tokenizer needed): fresh ones never hit the prefix cache."""
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


class Roofline:
    """Each step's floor on this device for the engine's model and layout (see the module docstring)."""

    def __init__(self, engine_config, ceilings: Ceilings):
        from glm5_ascend.launcher.sizing import Layout
        self.c = engine_config.model
        par = engine_config.parallel
        tp, dp = par.tensor_parallel_size, par.data_parallel_size
        self.layout = Layout(tp * dp, tp, par.enable_expert_parallel)
        method = (self.c.quantization_config or {}).get("quant_method")
        # FP8 checkpoints are dequantized to the model dtype at load; W8A8 ones keep int8 linears.
        self.quant = "w8a8" if method == "msmodelslim" else "bf16"
        itemsize = engine_config.dtype.itemsize
        self.weight_scale = itemsize / 2 if self.quant == "bf16" else 1.0  # sizing counts 2-byte weights
        self.kv_bytes = itemsize
        self.ceilings = ceilings

    def step_bytes(self, rec: StepRecord) -> float:
        from glm5_ascend.launcher.sizing import kv_read_bytes, step_weight_bytes
        tokens = len(rec.decode_contexts) + sum(n for _, n in rec.prefill_chunks)
        expert_tokens = tokens * (self.layout.dp if self.layout.ep else 1)
        weights = step_weight_bytes(self.c, self.layout, self.quant, expert_tokens) * self.weight_scale
        return weights + sum(kv_read_bytes(self.c, ctx, self.kv_bytes) for ctx in rec.decode_contexts)

    def step_flops(self, rec: StepRecord) -> float:
        from glm5_ascend.launcher.sizing import prefill_flops
        prompt = sum(prefill_flops(self.c, first, n) for first, n in rec.prefill_chunks)
        return (prompt + 2 * rec.logit_rows * self.c.vocab_size * self.c.hidden_size) / self.layout.tp

    def floor(self, rec: StepRecord) -> float:
        return max(self.step_bytes(rec) / self.ceilings.copy_bps, self.step_flops(rec) / self.ceilings.matmul_flops)


def model_summary(engine_config) -> str:
    from glm5_ascend.launcher.sizing import count_params
    c = engine_config.model
    graphs = engine_config.graphs.capture_sizes
    graph_text = (f"decode graphs for batch {graphs[0]}..{graphs[-1]} ({len(graphs)} sizes)" if graphs
                  else "eager decode")
    weights = "dummy (random) weights" if engine_config.load_format == "dummy" else "checkpoint weights"
    par = engine_config.parallel
    return (f"{engine_config.model_path}: {c.num_hidden_layers} layers, {si(count_params(c).total, '').strip()} "
            f"parameters, {str(engine_config.dtype).removeprefix('torch.')}, {weights}; {graph_text}; "
            f"TP {par.tensor_parallel_size} x DP {par.data_parallel_size}"
            f"{' + EP' if par.enable_expert_parallel else ''}")


def build(args: argparse.Namespace):
    """(LLM, ceilings): the ceilings are measured first, while the device's memory is still free."""
    from glm5_ascend.llm import LLM
    from glm5_ascend.platform import platform_for_device
    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()  # flag errors before anything is measured
    platform = platform_for_device(config.device)
    device = platform.device(int(config.device.split(":")[1]) if ":" in str(config.device) else 0)
    ceilings = measure_ceilings(device, config.dtype)
    return LLM(engine_args=engine_args), ceilings


def si(value: float, unit: str) -> str:
    """3 significant digits with a decimal prefix: si(4.06e6, "B") == "4.06 MB"."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "n/a"
