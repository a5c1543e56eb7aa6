"""`glm5-ascend convert SRC DST --to {bf16,w8a8,fp8}` (the work is in model/convert.py, imported on use)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source checkpoint directory (BF16, FP8 or msmodelslim W8A8)")
    p.add_argument("dst", help="output directory (new or empty; an interrupted run's directory resumes)")
    p.add_argument("--to", required=True, choices=("bf16", "w8a8", "fp8"), help="target format")
    p.add_argument("--keep", default=None,
                   help="comma-separated module-name patterns (fnmatch) kept in high precision; default: "
                        "embeddings, lm_head, the MTP head and eh_proj, router, indexer and kv_b_proj "
                        "(docs/checkpoints.md)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from glm5_ascend.model import quant
    from glm5_ascend.model.convert import convert, parse_size
    keep = tuple(k for k in args.keep.split(",") if k) if args.keep is not None else quant.DEFAULT_KEEP
    out = convert(args.src, args.dst, args.to, keep, parse_size(args.max_shard_size), not args.no_progress)
    print(f"wrote {out} ({args.to})")
    return 0
