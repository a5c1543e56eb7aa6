#!/usr/bin/env python3
"""Decode step time of a batch with and without structured-output rows (issue 18's measurement).

    python3 scripts/bench_structured.py                       # tiny model, batch 64, 8 constrained
    python3 scripts/bench_structured.py --vocab-size 154880   # the tiny model with GLM-5's vocabulary width
    python3 scripts/bench_structured.py --device cuda         # on a GPU (the H200 run of the issue)

Part 1 (engine): a batch of --batch greedy requests decodes --steps tokens; the mean step time after
prefill, with none and with --constrained of them under a JSON schema, in alternating rounds. The
unconstrained rows must decode the same tokens in both runs (checked).
Part 2 (sampler): the Sampler alone on [batch, V] logits, V = --sampler-vocab, with a synthetic
byte-level vocabulary of that size for xgrammar, so the bitmask fill and apply cost what they cost at
GLM-5's width; reports the step time and the fill time.
Part 3 (--compare-sampler FILE): the Sampler against another version of sampler.py (e.g. the one before
the batched rework: git show 09ae6cf^:glm5_ascend/engine/sampler.py > /tmp/old_sampler.py) on four
kinds of batch at that width.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

SCHEMA = {"type": "object", "required": ["title", "items"],
          "properties": {"title": {"type": "string"},
                         "items": {"type": "array", "items": {"type": "object", "properties": {
                             "name": {"type": "string"}, "count": {"type": "integer"}}}}}}


def engine_part(args) -> dict:
    from glm5_ascend import LLM, SamplingParams
    from glm5_ascend.engine.sampling_params import StructuredOutputsParams
    kw = {"load_format": "dummy", "hf_overrides": {"vocab_size": args.vocab_size}} if args.vocab_size else {}
    llm = LLM(args.model, device=args.device, max_num_seqs=args.batch, seed=0, enforce_eager=args.device == "cpu",
              **kw)
    engine = llm.llm_engine
    prompts = [list(range(10 + i % 50, 40 + i % 50)) for i in range(args.batch)]

    def run(n_constrained: int, tag: str) -> tuple[list[float], dict[int, list[int]]]:
        for i, ids in enumerate(prompts):
            so = StructuredOutputsParams(json=SCHEMA) if i < n_constrained else None
            engine.add_request(f"{tag}-{i}", ids, SamplingParams(temperature=0, max_tokens=args.steps + 8,
                                                                 ignore_eos=True, structured_outputs=so))
        times, outs = [], {}
        while engine.has_unfinished_requests():
            decoding = all(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running) \
                and not engine.scheduler.waiting
            t0 = time.perf_counter()
            for out in engine.step():
                if out.finished:
                    outs[int(out.request_id.rsplit("-", 1)[1])] = out.outputs[0].token_ids
            if decoding:
                times.append(time.perf_counter() - t0)
        return times[2:args.steps], outs

    run(args.constrained, "warm")
    base, cons, same = [], [], True
    for r in range(args.rounds):
        t_b, o_b = run(0, f"b{r}")
        t_c, o_c = run(args.constrained, f"c{r}")
        base += t_b
        cons += t_c
        same &= all(o_b[i] == o_c[i] for i in range(args.constrained, args.batch))
    return {"vocab": engine.config.model.vocab_size, "base_ms": 1e3 * statistics.median(base),
            "constrained_ms": 1e3 * statistics.median(cons), "steps": len(base), "unconstrained_rows_same": same}


def sampler_part(args) -> dict:
    import xgrammar as xgr

    from glm5_ascend.engine.sampler import Sampler
    from glm5_ascend.engine.sampling_params import SamplingParams
    from glm5_ascend.engine.sequence import Sequence
    from glm5_ascend.engine.structured_outputs import SequenceGrammar
    V, rng = args.sampler_vocab, random.Random(0)
    alphabet = string.ascii_letters + string.digits + ' {}[]":,.-_\n\t'
    vocab = [chr(i) for i in range(256)] + sorted({"".join(rng.choices(alphabet, k=rng.randint(2, 8)))
                                                  for _ in range(V * 2)})[: V - 257] + ["<eos>"]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, stop_token_ids=[V - 1])
    compiled = xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(json.dumps(SCHEMA))
    dev = torch.device(args.device)
    sampler = Sampler({V - 1}, torch.Generator(device=dev).manual_seed(0))
    logits = torch.randn(args.batch, V, device=dev)

    def seqs(n_constrained):
        out = []
        for i in range(args.batch):
            s = Sequence(str(i), 0, [1, 2, 3], SamplingParams(temperature=0, max_tokens=10 ** 6))
            if i < n_constrained:
                s.grammar = SequenceGrammar(xgr.GrammarMatcher(compiled), None)
            out.append(s)
        return out

    def timed(n_constrained):
        batch, times = seqs(n_constrained), []
        for _ in range(args.steps):
            step_logits = logits.clone()  # a step's fresh logits (the sampler masks rows in place)
            t0 = time.perf_counter()
            res = sampler(step_logits, batch)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            for s, tok in zip(batch, res.token_ids):
                s.token_ids.append(tok)
                if s.grammar is not None:
                    s.grammar.accept(tok)
        return 1e3 * statistics.median(times[2:])

    fill_batch = seqs(args.constrained)
    bm = xgr.allocate_token_bitmask(args.constrained, V)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        for j, s in enumerate(fill_batch[:args.constrained]):
            s.grammar.matcher.fill_next_token_bitmask(bm, j)
    fill_ms = 1e3 * (time.perf_counter() - t0) / args.steps
    timed(args.constrained)  # warm-up
    base = [timed(0) for _ in range(args.rounds)]
    cons = [timed(args.constrained) for _ in range(args.rounds)]
    return {"vocab": V, "base_ms": statistics.median(base), "constrained_ms": statistics.median(cons),
            "fill_ms": fill_ms}


def compare_samplers(args) -> None:
    import importlib.util

    from glm5_ascend.engine.sampler import Sampler
    from glm5_ascend.engine.sampling_params import SamplingParams
    from glm5_ascend.engine.sequence import Sequence
    spec = importlib.util.spec_from_file_location("other_sampler", args.compare_sampler)
    other = importlib.util.module_from_spec(spec)
    sys.modules["other_sampler"] = other
    spec.loader.exec_module(other)
    V, B, dev = args.sampler_vocab, args.batch, torch.device(args.device)
    logits = torch.randn(B, V, device=dev)
    cases = {"greedy": lambda i: dict(temperature=0),
             "greedy, logprobs=5": lambda i: dict(temperature=0, logprobs=5),
             "T=0.8, top_p=0.9, top_k=50, 1 in 4 seeded": lambda i: dict(
                 temperature=0.8, top_p=0.9, top_k=50, seed=i if i % 4 == 0 else None),
             "greedy, repetition 1.1 + frequency 0.2": lambda i: dict(
                 temperature=0, repetition_penalty=1.1, frequency_penalty=0.2)}
    print(f"| batch of {B}, V={V} | {args.compare_sampler} (ms) | this sampler (ms) |\n| --- | --- | --- |")
    for name, kw in cases.items():
        row = []
        for cls in (other.Sampler, Sampler):
            sampler, times = cls({V - 1}, torch.Generator(device=dev).manual_seed(0)), []
            seqs = []
            for i in range(B):
                s = Sequence(str(i), 0, list(range(100)), SamplingParams(**kw(i)))
                if s.params.seed is not None:
                    s.generator = torch.Generator(device=dev).manual_seed(s.params.seed)
                s.token_ids += list(range(200, 232))
                seqs.append(s)
            for _ in range(max(4, args.rounds + 1)):
                x = logits.clone()
                t0 = time.perf_counter()
                sampler(x, seqs)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row.append(1e3 * statistics.median(times[1:]))
        print(f"| {name} | {row[0]:.0f} | {row[1]:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the built-in tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--constrained", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=None, help="override the model's vocab_size (dummy weights)")
    p.add_argument("--sampler-vocab", type=int, default=154880, help="vocabulary width of part 2 (GLM-5's)")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--compare-sampler", default=None, help="another sampler.py to time against this one")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.compare_sampler:
        compare_samplers(args)
        return
    if not args.skip_engine:
        e = engine_part(args)
        print(f"engine  V={e['vocab']:>6} batch {args.batch}: {e['base_ms']:.2f} ms/step unconstrained, "
              f"{e['constrained_ms']:.2f} ms/step with {args.constrained} constrained "
              f"({100 * (e['constrained_ms'] / e['base_ms'] - 1):+.1f}%); unconstrained rows identical: "
              f"{e['unconstrained_rows_same']}")
    s = sampler_part(args)
    print(f"sampler V={s['vocab']:>6} batch {args.batch}: {s['base_ms']:.2f} ms/step unconstrained, "
          f"{s['constrained_ms']:.2f} ms/step with {args.constrained} constrained "
          f"({100 * (s['constrained_ms'] / s['base_ms'] - 1):+.1f}%); bitmask fill {s['fill_ms']:.2f} ms "
          f"for {args.constrained} rows")


if __name__ == "__main__":
    main()
