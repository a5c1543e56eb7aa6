"""`glm5-ascend generate`: print a completion of one prompt (offline, no server; every engine flag of `serve`)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from glm5_ascend.engine.arg_utils import EngineArgs
    p.add_argument("--prompt", required=True, help="text to complete")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn with the chat template")
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens with this mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    EngineArgs.add_cli_args(p)


def main(args: argparse.Namespace) -> int:
    from glm5_ascend import LLM, SamplingParams
    from glm5_ascend.engine.arg_utils import EngineArgs
    llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
        if args.chat:
            out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
        else:
            out = llm.generate(args.prompt, params)[0]
        print(out.outputs[0].text)
    finally:
        llm.shutdown()
    return 0
