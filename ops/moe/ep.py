"""Expert-parallel dispatch / combine over torch.distributed.all_to_all_single (gloo, nccl or hccl).

The portable path, and the `reference` backend of ops.ep_dispatch / ops.ep_combine. Expert e lives on
EP rank e // E_local (E_local = num_experts / ep_size). dispatch sends each (token, expert) copy to the
expert's rank, where the rows are grouped by local expert for grouped_mlp; combine sends the expert
outputs back and sums them, weighted, into each token on its source rank. The fused Ascend path with
the same contract is ops/moe/npu.py (npu_moe_distribute_dispatch_v2 / combine_v2).

Two all_to_all_single calls each way: one for counts (equal splits of E_local), one for the rows with
split sizes from those counts. Every rank must call dispatch and combine, also with T = 0 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class EpHandle:
    """State dispatch leaves for combine. Shapes: T source tokens, k experts each, S rows sent, N received."""

    backend: str
    order: torch.Tensor        # int64 [S]: flat (token * k + j) index of each sent row, in send order
    weights: torch.Tensor      # [T, k] routing weights
    send_splits: list          # rows sent to each rank
    recv_splits: list          # rows received from each rank
    regroup: torch.Tensor      # int64 [N]: received row (rank-major) of each row in local-expert order
    group: object


def _all_to_all(x: torch.Tensor, out_rows: int, in_splits: list, out_splits: list, group) -> torch.Tensor:
    out = x.new_empty((out_rows,) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


def ep_dispatch(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int, ep_group,
                mc2_group=None, max_tokens_per_rank: int | None = None):
    """Send each token's rows to the ranks owning its experts.

    Args:
        hidden: [T, D]; expert_ids: int [T, k] global expert ids (ids < 0 are dropped, e.g. padding);
        weights: [T, k] routing weights (kept for combine); num_experts: E over all ranks.
        mc2_group, max_tokens_per_rank: for the npu backend's MC2 path; ignored here (everything runs
            on ep_group, and the result has exactly N rows).
    Returns:
        recv_hidden [N, D] rows grouped by local expert, recv_counts int64 [E_local], handle.
    """
    T, D = hidden.shape
    world = dist.get_world_size(ep_group)
    if num_experts % world:
        raise ValueError(f"num_experts={num_experts} is not divisible by the EP size {world}")
    n_local = num_experts // world
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).long()
    keep = (flat >= 0) & (flat < num_experts)
    # Sorting by global id orders rows by destination rank, then by local expert within it.
    order = torch.argsort(torch.where(keep, flat, num_experts), stable=True)[: int(keep.sum())]
    per_expert = torch.bincount(flat[keep], minlength=num_experts)  # [world * n_local]
    recv_per_expert = _all_to_all(per_expert, num_experts, [n_local] * world, [n_local] * world, ep_group)
    send_splits = per_expert.view(world, n_local).sum(1).tolist()
    recv_by_src = recv_per_expert.view(world, n_local)  # [source rank, local expert]
    recv_splits = recv_by_src.sum(1).tolist()
    recv = _all_to_all(hidden[order // k], sum(recv_splits), send_splits, recv_splits, ep_group)
    # Received rows come source-rank-major, local-expert-minor; regroup them expert-major.
    local_expert = torch.repeat_interleave(torch.arange(n_local, device=hidden.device).repeat(world),
                                           recv_by_src.reshape(-1))
    regroup = torch.argsort(local_expert, stable=True)
    handle = EpHandle("reference", order, weights, send_splits, recv_splits, regroup, ep_group)
    return recv[regroup], recv_by_src.sum(0), handle


def ep_combine(expert_out: torch.Tensor, handle: EpHandle) -> torch.Tensor:
    """Return expert outputs to their source ranks and sum them per token, weighted.

    Args:
        expert_out: [N, D] rows in dispatch's output order.
    Returns:
        [T, D] in expert_out's dtype (the weights are cast to it, as in moe_unpermute).
    """
    N, D = expert_out.shape
    if N != handle.regroup.numel():
        raise ValueError(f"expert_out has {N} rows, dispatch delivered {handle.regroup.numel()}")
    by_src = torch.empty_like(expert_out)
    by_src[handle.regroup] = expert_out  # back to source-rank-major order
    back = _all_to_all(by_src, sum(handle.send_splits), handle.recv_splits, handle.send_splits, handle.group)
    T, k = handle.weights.shape
    w = handle.weights.reshape(-1)[handle.order].to(expert_out.dtype)
    out = torch.zeros((T, D), dtype=expert_out.dtype, device=expert_out.device)
    return out.index_add_(0, handle.order // k, back * w[:, None])
