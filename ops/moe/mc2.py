"""When the npu backend's ep_dispatch runs MC2, with which global_bs, and whether HCCL_BUFFSIZE covers it.

MC2 (npu_moe_distribute_dispatch_v2 / combine_v2) takes 0 < BS <= 256 tokens per rank on A2 and <= 512
on A3, one `global_bs` for every layer, EP sizes and hidden sizes per device (ops/moe/mc2_limits.py has
the documented figures). Every EP rank must take the same path in a call, MC2 or the all_to_all path
(ops/moe/ep.py), or the collectives mismatch. The path is decided so:

* A plan, once per layout (lru_cache): the engine's static per-rank bound `max_tokens_per_rank` (the
  same on every rank) fixes BS = min(bound, cap) and global_bs = BS * ep_size for every layer and call.
  A layout outside the documented limits at that BS (A2 with an EP size other than 16..256, more than
  24 experts per rank, a hidden size out of range, no MC2 communicator) never runs MC2.
* Static (bound <= cap): MC2 in every call, decided from that identical information alone: no
  collective, no host sync, so a captured decode graph can hold it. A rank with no tokens sends one
  dummy row (zero hidden, zero weights, K distinct experts of its own), since MC2 wants BS > 0.
* Per call (no bound, or a bound above the cap, e.g. prefill-sized batches): one all_reduce (MAX of
  T and -T) on the EP group, never on the MC2 communicator, read on the host: MC2 when every rank has
  0 < T <= BS, else the all_to_all path. That read is a host sync, so only the static case captures.

HCCL_BUFFSIZE (MB, default 200) must reach mc2_limits.hccl_buffsize_mb for the plan's BS; the check
runs when the plan is made, i.e. at the first ep_dispatch (the engine's warm-up forward, before the
server reports healthy), and fails with one line giving the value to set.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from glm5_ascend.ops.moe.mc2_limits import MC2_LIMITS, hccl_buffsize_mb, mc2_violations

HCCL_DEFAULT_BUFFSIZE_MB = 200  # "不配置时默认为200MB" (dispatch_v2 docs, HCCL_BUFFSIZE)


@dataclass(frozen=True)
class Mc2Plan:
    """The MC2 decision for one layout (device, H, K, EP size, experts, bound)."""

    device: str            # a2 | a3
    mc2: bool              # the layout can run MC2 at all
    tokens_per_rank: int   # BS that global_bs and HCCL_BUFFSIZE are sized for
    global_bs: int         # tokens_per_rank * ep_size: the one value every layer passes
    per_call: bool         # decide per call with an all_reduce on the EP group (no usable static bound)
    reason: str            # why MC2 is off, "" when on


def buffsize_env_mb() -> int:
    """HCCL_BUFFSIZE from the environment, in MB (HCCL's default 200 when unset)."""
    value = os.environ.get("HCCL_BUFFSIZE", "")
    if value == "":
        return HCCL_DEFAULT_BUFFSIZE_MB
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"HCCL_BUFFSIZE={value!r} is not a whole number of MB; set it to one (e.g. 200)") from None


def plan(device: str, hidden: int, top_k: int, ep_size: int, num_experts: int, bound: int | None,
         have_group: bool) -> Mc2Plan:
    """The plan for this layout; raises RuntimeError when HCCL_BUFFSIZE is below MC2's need."""
    p = _plan(device, hidden, top_k, ep_size, num_experts, bound, have_group)
    if p.mc2:
        _check_buffsize(p, hidden, top_k, ep_size, num_experts, buffsize_env_mb())
    return p


@functools.lru_cache(maxsize=None)
def _plan(device, hidden, top_k, ep_size, num_experts, bound, have_group) -> Mc2Plan:
    cap = MC2_LIMITS[device].max_tokens_per_rank
    bs = cap if bound is None else max(1, min(bound, cap))
    per_call = bound is None or bound > cap
    reason = "" if have_group else "no MC2 communicator (ParallelState.mc2_group is made on hccl only)"
    if not reason:
        reason = "; ".join(mc2_violations(hidden, top_k, ep_size, bs, device, num_experts))
    return Mc2Plan(device, not reason, bs, bs * ep_size, per_call, reason)


@functools.lru_cache(maxsize=None)
def _check_buffsize(p: Mc2Plan, hidden, top_k, ep_size, num_experts, have_mb) -> None:
    need = hccl_buffsize_mb(hidden, top_k, ep_size, p.tokens_per_rank, p.device, n_routed_experts=num_experts)
    if have_mb < need:
        raise RuntimeError(
            f"HCCL_BUFFSIZE={have_mb} MB is below the {need} MB that MC2 dispatch/combine need on {p.device} "
            f"(H={hidden}, top-k {top_k}, {num_experts} experts over EP {ep_size}, {p.tokens_per_rank} tokens per "
            f"rank); export HCCL_BUFFSIZE={need} on every node, or lower --max-num-batched-tokens")


def use_mc2(p: Mc2Plan, tokens: int, ep_group, device: torch.device) -> bool:
    """Whether this call runs MC2; the same answer on every EP rank (see the module docstring)."""
    if not p.mc2:
        return False
    if not p.per_call:
        return True
    t = torch.tensor([tokens, -tokens], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ep_group)  # the EP group: MC2's communicator carries MC2 only
    most, fewest = (int(v) for v in t.tolist())  # host sync: the per-call decision needs the value on the host
    return 0 < -fewest and most <= p.tokens_per_rank


def dummy_ids(rank: int, n_local: int, top_k: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """int32 [1, K]: K distinct experts, this rank's first (MC2 wants K unique ids per row)."""
    return ((torch.arange(top_k, device=device) + rank * n_local) % num_experts).to(torch.int32).view(1, top_k)
