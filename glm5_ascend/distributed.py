"""Process groups (tp, ep, dp) and the collectives the model calls, held in one ParallelState object.

Global rank r is TP rank r % tp of DP group r // tp. The groups, made once per process after
torch.distributed is initialised (engine/cluster.py):

- tp_group: the DP group's TP ranks, on the device backend (hccl | nccl | gloo): the model's all-reduce
  and all-gather;
- ep_group: every rank, with --enable-expert-parallel: the MoE all-to-all dispatch / combine;
- mc2_group: on NPUs with EP, a second communicator over the same ranks that carries the fused MC2
  dispatch / combine only (its docs forbid any other collective on it);
- tp_cpu_group (gloo): the DP group's leader broadcasts each step's inputs to its TP peers;
- dp_cpu_group (gloo): the DP leaders (TP rank 0 of each DP group), through which rank 0 hands out
  requests and gathers outputs.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Control groups wait for the next step as long as the server idles; liveness is the heartbeat's job.
_IDLE_TIMEOUT = datetime.timedelta(days=30)


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits: TP / EP / DP rank and size, and the groups.

    The default is one process (no collectives). Layers take a ParallelState instead of reading
    module globals, so two engines in one process (tests) never share parallel state.
    """

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: object = None
    ep_group: object = None
    mc2_group: object = None
    tp_cpu_group: object = None
    dp_cpu_group: object = None

    def __post_init__(self):
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.ep_rank < self.ep_size
                and 0 <= self.dp_rank < self.dp_size):
            raise ValueError(f"bad parallel ranks: tp {self.tp_rank}/{self.tp_size}, ep {self.ep_rank}/{self.ep_size}, "
                             f"dp {self.dp_rank}/{self.dp_size}")

    @property
    def rank(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank

    @property
    def tp_leader(self) -> int:
        """Global rank of this DP group's TP rank 0 (it schedules; the others follow)."""
        return self.dp_rank * self.tp_size

    @property
    def is_tp_leader(self) -> bool:
        return self.tp_rank == 0

    @property
    def lockstep(self) -> bool:
        """DP groups share the EP collectives, so a group with no tokens still runs each step."""
        return self.dp_size > 1 and self.ep_size > 1


SINGLE = ParallelState()


def create_groups(tp: int, dp: int, expert_parallel: bool, rank: int, backend: str,
                  timeout: datetime.timedelta) -> ParallelState:
    """Every rank calls this with the same layout, after init_process_group; groups are made in one order."""
    world = tp * dp
    if dist.get_world_size() != world:
        raise RuntimeError(f"torch.distributed has {dist.get_world_size()} ranks, the layout needs {world}")
    tp_group = tp_cpu = None
    for d in range(dp):
        ranks = list(range(d * tp, (d + 1) * tp))
        dev = dist.new_group(ranks, backend=backend, timeout=timeout)
        cpu = dist.new_group(ranks, backend="gloo", timeout=_IDLE_TIMEOUT)
        if rank in ranks:
            tp_group, tp_cpu = dev, cpu
    dp_cpu = dist.new_group([d * tp for d in range(dp)], backend="gloo", timeout=_IDLE_TIMEOUT)
    ep_group = mc2_group = None
    if expert_parallel and world > 1:
        ep_group = dist.new_group(list(range(world)), backend=backend, timeout=timeout)
        if backend == "hccl":
            mc2_group = dist.new_group(list(range(world)), backend=backend, timeout=timeout)
    return ParallelState(
        tp_rank=rank % tp, tp_size=tp, ep_rank=rank if ep_group is not None else 0,
        ep_size=world if ep_group is not None else 1, dp_rank=rank // tp, dp_size=dp, tp_group=tp_group,
        ep_group=ep_group, mc2_group=mc2_group, tp_cpu_group=tp_cpu,
        dp_cpu_group=dp_cpu if rank % tp == 0 else None)


def split(total: int, parts: int, what: str) -> int:
    """total // parts, asserting divisibility with a message naming the dimension."""
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by the parallel size {parts}")
    return total // parts


def tp_all_reduce(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    if ps.tp_size > 1 and x.numel():
        dist.all_reduce(x, group=ps.tp_group)
    return x


def tp_all_gather_last(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Concatenate each rank's shard along the last dim."""
    if ps.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ps.tp_size)]
    if x.numel():
        dist.all_gather(parts, x.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=-1)


def tp_rows(total: int, ps: ParallelState) -> tuple[int, int]:
    """[start, stop) of the rows this TP rank takes when the TP group splits `total` rows (as tensor_split)."""
    base, extra = divmod(total, ps.tp_size)
    start = ps.tp_rank * base + min(ps.tp_rank, extra)
    return start, start + base + (ps.tp_rank < extra)


def broadcast_object(obj, src: int, group) -> object:
    """`obj` from global rank src to every rank of the (gloo) group."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
