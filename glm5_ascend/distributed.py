"""Process groups (tp, ep) and the collectives the model calls, held in one ParallelState object."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits: tensor-parallel and expert-parallel rank/size and their groups.

    The default is one process (no collectives). Layers take a ParallelState instead of reading
    module globals, so two engines in one process (tests) never share parallel state.
    """

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    tp_group: object = None
    ep_group: object = None

    def __post_init__(self):
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.ep_rank < self.ep_size):
            raise ValueError(f"bad parallel ranks: tp {self.tp_rank}/{self.tp_size}, ep {self.ep_rank}/{self.ep_size}")


SINGLE = ParallelState()


def split(total: int, parts: int, what: str) -> int:
    """total // parts, asserting divisibility with a message naming the dimension."""
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by the parallel size {parts}")
    return total // parts


def tp_all_reduce(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    if ps.tp_size > 1:
        dist.all_reduce(x, group=ps.tp_group)
    return x


def tp_all_gather_last(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Concatenate each rank's shard along the last dim."""
    if ps.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ps.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=-1)
