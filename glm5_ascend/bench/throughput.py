"""`glm5-ascend bench throughput`: offline throughput of many requests (like `vllm bench throughput`).

All --num-prompts requests are queued at once and run to completion through the engine's step loop;
the scheduler batches them as `serve` would (--max-num-seqs, --max-num-batched-tokens). Prompts are
random token ids (--dataset-name random, the default: no tokenizer needed, so `--load-format dummy`
works without a checkpoint) or ShareGPT conversations (--dataset-name sharegpt, tokenized with the
model's tokenizer). Beside vLLM's figures it prints the roofline floor of the steps that ran
(bench/offline.py: weights + KV bytes at the measured copy bandwidth, prompt FLOPs at the measured
matmul peak, step by step) and the share of it achieved; the prefill steps' FLOPs as a share of the
peak; and the decode steps' median time against their bound.
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from glm5_ascend.bench import offline


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (for --dataset-name sharegpt)")
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens per request (random)")
    p.add_argument("--output-len", type=int, default=None,
                   help="generated tokens per request (random: default 128; sharegpt: default each answer's "
                        "length)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="draw lengths uniformly in [len*(1-r), len*(1+r)]; 0 <= r < 1")
    p.add_argument("--random-prefix-len", type=int, default=0, help="tokens of a prefix shared by every prompt")
    p.add_argument("--output-json", default=None, help="write the results to this JSON file")
    offline.add_engine_arguments(p)


def _requests(args, llm, rng: np.random.Generator) -> tuple[list[list[int]], list[int]]:
    """(prompt ids, output lengths) of every request."""
    from glm5_ascend.bench import datasets
    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path FILE (a ShareGPT JSON file)")
        tok = llm.get_tokenizer()
        if tok is None:
            raise ValueError("--dataset-name sharegpt needs the model's tokenizer; drop --skip-tokenizer-init "
                             "or pass --tokenizer PATH")
        path = args.tokenizer or llm.llm_engine.config.model_path
        reqs = datasets.sharegpt_requests(datasets.LocalTokenizer(path), args.dataset_path, args.num_prompts,
                                          args.output_len, seed=0)
        return [tok.encode(r.prompt, add_special_tokens=True) for r in reqs], [r.expected_output_len for r in reqs]
    if not 0 <= args.random_range_ratio < 1:
        raise ValueError(f"--random-range-ratio {args.random_range_ratio} must be in [0, 1)")
    lo_in, hi_in = datasets._length_range(args.input_len, args.random_range_ratio)
    lo_out, hi_out = datasets._length_range(args.output_len or 128, args.random_range_ratio)
    vocab = llm.llm_engine.config.model.vocab_size
    prefix = offline.random_prompts(rng, vocab, [args.random_prefix_len])[0]
    lengths = rng.integers(lo_in, hi_in + 1, args.num_prompts).tolist()
    prompts = [prefix + body for body in offline.random_prompts(rng, vocab, lengths)]
    return prompts, rng.integers(lo_out, hi_out + 1, args.num_prompts).tolist()


def main(args: argparse.Namespace) -> int:
    for name in ("input_len", "output_len", "num_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.random_prefix_len < 0:
        raise ValueError(f"--random-prefix-len {args.random_prefix_len} must be at least 0")
    from glm5_ascend.engine.sampling_params import SamplingParams
    llm, ceil = offline.build(args)
    config = llm.llm_engine.config
    prompts, out_lens = _requests(args, llm, np.random.default_rng(config.seed))
    for ids in prompts:  # every request is valid before any runs
        llm.llm_engine.validate_prompt(ids)
    params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n) for n in out_lens]
    print(ceil.describe(), flush=True)
    print(offline.model_summary(config), flush=True)
    seconds, steps, generated = offline.run_requests(llm, prompts, params)
    prompt_tokens = sum(map(len, prompts))
    total = prompt_tokens + generated
    print(f"Throughput: {len(prompts) / seconds:.2f} requests/s, {total / seconds:.2f} total tokens/s, "
          f"{generated / seconds:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {prompt_tokens}")
    print(f"Total num output tokens:  {generated}")
    roofline = offline.Roofline(config, ceil)
    floor = sum(roofline.floor(r) for r in steps)
    step_time = sum(r.seconds for r in steps)
    print(f"Roofline floor of the {len(steps)} steps that ran: {floor:.3f} s against {step_time:.3f} s spent in "
          f"them: {offline.percent(floor, step_time)} of the bound")
    result = {"elapsed_time": seconds, "num_requests": len(prompts), "total_num_tokens": total,
              "requests_per_second": len(prompts) / seconds, "tokens_per_second": total / seconds,
              "output_tokens_per_second": generated / seconds, "device": ceil.device,
              "copy_bytes_per_s": ceil.copy_bps, "matmul_flops_per_s": ceil.matmul_flops,
              "model": offline.model_summary(config), "steps": len(steps), "roofline_floor_seconds": floor,
              "step_seconds": step_time}
    prefill = [r for r in steps if not r.is_decode]
    if prefill:
        t, flops = sum(r.seconds for r in prefill), sum(roofline.step_flops(r) for r in prefill)
        print(f"Prefill steps ({len(prefill)}): {offline.si(flops, 'FLOP')} in {t:.3f} s -> "
              f"{offline.si(flops / t, 'FLOP/s')} = {offline.percent(flops / t, ceil.matmul_flops)} of the measured "
              "matmul peak")
        result["prefill"] = {"steps": len(prefill), "seconds": t, "flops": flops}
    decode = [r for r in steps if r.is_decode]
    if decode:
        med = sorted(decode, key=lambda r: r.seconds)[len(decode) // 2]
        nbytes = roofline.step_bytes(med)
        bound = nbytes / ceil.copy_bps
        batch = statistics.mean(len(r.decode_contexts) for r in decode)
        print(f"Decode steps ({len(decode)}, mean batch {batch:.1f}): median {med.seconds * 1e3:.2f} ms; that step "
              f"reads {offline.si(nbytes, 'B')} -> bound {bound * 1e3:.2f} ms: "
              f"{offline.percent(bound, med.seconds)} of the bound")
        result["decode"] = {"steps": len(decode), "mean_batch": batch, "median_step_seconds": med.seconds,
                            "median_step_bound_seconds": bound}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
