"""Emulated MC2 expert-parallel kernels: npu_moe_distribute_dispatch_v2 / combine_v2 over gloo.

The real ops address a process group by its HCCL communicator name; here `register_group(name, group)`
maps a name to a torch.distributed group (tests monkeypatch ops.moe.npu.hccl_comm_name to return it).
Output shapes follow the meta kernel (expand_x [A, H] with A = global_bs * min(E_local, k), valid rows
first). assist_info_for_combine and ep_recv_counts are opaque to the caller; the emulator stores its own
routing in them (source rank and flat source index per received row).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .common import limit, require, undefined_like

_GROUPS: dict = {}


def register_group(name: str, group) -> None:
    _GROUPS[name] = group


def _a2a(x: torch.Tensor, in_splits: list, out_splits: list, group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


def _group(op, name, world, rank):
    require(name in _GROUPS, op, f"unknown group_ep {name!r}")
    group = _GROUPS[name]
    require(dist.get_world_size(group) == world and dist.get_rank(group) == rank, op,
            "ep_world_size / ep_rank_id disagree with the group")
    return group


def npu_moe_distribute_dispatch_v2(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales=None,
                                   x_active_mask=None, expert_scales=None, elastic_info=None, performance_info=None,
                                   group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0, shared_expert_num=1,
                                   shared_expert_rank_num=0, quant_mode=0, global_bs=0, expert_token_nums_type=1,
                                   comm_alg="", zero_expert_num=0, copy_expert_num=0, const_expert_num=0, y_dtype=None,
                                   x_dtype=None, scales_dtype=None):
    """-> (expand_x, dynamic_scales, assist_info_for_combine, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales)."""
    op = "npu_moe_distribute_dispatch_v2"
    limit(all(v is None for v in (scales, x_active_mask, expert_scales, elastic_info, performance_info, y_dtype,
                                  x_dtype, scales_dtype)) and tp_world_size in (0, 1) and shared_expert_rank_num == 0
          and quant_mode == 0 and zero_expert_num == copy_expert_num == const_expert_num == 0 and comm_alg == "",
          op, "plain bf16/fp16 dispatch without TP, shared-expert ranks, quantisation or special experts")
    require(expert_token_nums_type in (0, 1), op, "the expert_token_nums_type should be 0 or 1")
    group = _group(op, group_ep, ep_world_size, ep_rank_id)
    require(moe_expert_num % ep_world_size == 0, op, "moe_expert_num must divide evenly over the EP ranks")
    bs, h = x.shape
    k = expert_ids.shape[1]
    require(expert_ids.shape[0] == bs and expert_ids.dtype == torch.int32, op, "expert_ids must be int32 [bs, k]")
    flat = expert_ids.reshape(-1).long()
    require(bool(((flat >= 0) & (flat < moe_expert_num)).all()), op, "expert ids must lie in [0, moe_expert_num)")
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(ep_world_size)]
    dist.all_gather(sizes, torch.tensor([bs]), group=group)
    max_bs = max(int(s) for s in sizes)
    gbs = global_bs or bs * ep_world_size
    require(max_bs * ep_world_size <= gbs if global_bs else max_bs == bs, op,
            "global_bs must cover the largest bs of any rank (0 only when every rank has the same bs)")
    n_local = moe_expert_num // ep_world_size
    a = gbs * min(n_local, k)
    order = torch.argsort(flat, stable=True)
    per_expert = torch.bincount(flat, minlength=moe_expert_num)
    recv_per_expert = _a2a(per_expert, [n_local] * ep_world_size, [n_local] * ep_world_size, group)
    send = per_expert.view(ep_world_size, n_local).sum(1).tolist()
    by_src = recv_per_expert.view(ep_world_size, n_local)
    recv = by_src.sum(1).tolist()
    rows = _a2a(x[order // k], send, recv, group)
    src_flat = _a2a(order, send, recv, group)
    src_rank = torch.repeat_interleave(torch.arange(ep_world_size), torch.tensor(recv))
    local_e = torch.repeat_interleave(torch.arange(n_local).repeat(ep_world_size), by_src.reshape(-1))
    regroup = torch.argsort(local_e, stable=True)
    n = len(regroup)
    expand_x = undefined_like((a, h), x.dtype, x.device)
    expand_x[:n] = rows[regroup]
    assist = torch.full((max(bs * k, a * 128),), -1, dtype=torch.int32)
    assist[0:2 * n:2] = src_rank[regroup].to(torch.int32)
    assist[1:2 * n:2] = src_flat[regroup].to(torch.int32)
    counts = by_src.sum(0)
    token_nums = counts if expert_token_nums_type == 1 else counts.cumsum(0)
    return (expand_x, torch.zeros(a, dtype=torch.float32), assist, token_nums.to(torch.int64),
            by_src.t().reshape(-1).to(torch.int32), torch.zeros(tp_world_size, dtype=torch.int32),
            torch.empty(0, dtype=torch.float32))


def npu_moe_distribute_combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep,
                                  ep_world_size, ep_rank_id, moe_expert_num, *, tp_send_counts=None, x_active_mask=None,
                                  expand_scales=None, shared_expert_x=None, elastic_info=None, ori_x=None,
                                  const_expert_alpha_1=None, const_expert_alpha_2=None, const_expert_v=None,
                                  performance_info=None, group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                                  shared_expert_num=1, shared_expert_rank_num=0, global_bs=0, comm_quant_mode=0,
                                  comm_alg="", zero_expert_num=0, copy_expert_num=0, const_expert_num=0):
    """-> [bs, H] in expand_x's dtype: sum_j expert_scales[t, j] * (expert row of (t, j))."""
    op = "npu_moe_distribute_combine_v2"
    limit(all(v is None for v in (tp_send_counts, x_active_mask, expand_scales, shared_expert_x, elastic_info, ori_x,
                                  const_expert_alpha_1, const_expert_alpha_2, const_expert_v, performance_info))
          and tp_world_size in (0, 1) and shared_expert_rank_num == 0 and comm_quant_mode == 0 and comm_alg == ""
          and zero_expert_num == copy_expert_num == const_expert_num == 0, op, "the plain combine")
    group = _group(op, group_ep, ep_world_size, ep_rank_id)
    bs, k = expert_ids.shape
    require(expert_scales.shape == (bs, k) and expert_scales.dtype == torch.float32, op,
            "expert_scales must be float32 [bs, k]")
    n_local = moe_expert_num // ep_world_size
    gbs = global_bs or bs * ep_world_size
    require(expand_x.shape[0] == gbs * min(n_local, k), op, "expand_x must be dispatch's expand_x buffer")
    n = int(ep_send_counts.long().sum())
    src_rank = assist_info_for_combine[0:2 * n:2].long()
    src_flat = assist_info_for_combine[1:2 * n:2].long()
    back = torch.argsort(src_rank, stable=True)
    send = torch.bincount(src_rank, minlength=ep_world_size)
    recv = _a2a(send, [1] * ep_world_size, [1] * ep_world_size, group).tolist()
    rows = _a2a(expand_x[:n][back], send.tolist(), recv, group)
    flat = _a2a(src_flat[back], send.tolist(), recv, group)
    w = expert_scales.reshape(-1)[flat]
    out = torch.zeros((bs, expand_x.shape[1]), dtype=torch.float32)
    out.index_add_(0, flat // k, rows.float() * w[:, None])
    return out.to(expand_x.dtype)
