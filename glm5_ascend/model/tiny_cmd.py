"""`glm5-ascend make-tiny DIR`: write the built-in tiny GLM-5 checkpoint."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="weights are a deterministic function of the seed")


def main(args: argparse.Namespace) -> int:
    from glm5_ascend.model.tiny import make_tiny
    out = make_tiny(args.dir, seed=args.seed)
    print(f"wrote the tiny GLM-5 checkpoint to {out} (random weights: its text is meaningless)")
    return 0
