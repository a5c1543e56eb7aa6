"""Emulated MC2 expert-parallel kernels: npu_moe_distribute_dispatch_v2 / combine_v2 over gloo.

Communicators. The real ops address a process group by its HCCL communicator name. Here
`register_group(name, group, transport)` maps a name to the MC2 group (the one the backend's
hccl_comm_name is given) and to a transport group over the same ranks, on which the emulator moves its
data: no collective ever runs on the MC2 group, the emulator's own bookkeeping included. While the
emulator is installed, `guard()` refuses any torch.distributed collective on a registered MC2 group:
"一个模型中的npu_moe_distribute_dispatch_v2和npu_moe_distribute_combine_v2算子仅支持相同EP通信域，且该通信域中不
允许有其他算子" [dispatch, 通信域使用约束].

Rules ([dispatch] / [combine]: see profiles.py), per the active profile (a2 / a3):
  BS, EP size, H, K, expert count, experts per rank, expert ids (in range, unique per row), the
  arguments each device does not support, one global_bs for every call on a communicator ("global_bs
  网络中不同层中也需保持一致") that covers every rank's BS, and HCCL_BUFFSIZE against the documented
  formula (ops/moe/mc2_limits.py: the formulas are reused, as the brief for this emulator asks).
Output shapes follow the meta kernel (expand_x [A, H], A = global_bs * min(E_local, K), valid rows
first, the rest undefined: NaN). assist_info_for_combine and ep_recv_counts are opaque to the caller;
the emulator stores its own routing in them (source rank and flat source index per received row).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from glm5_ascend.ops.moe.mc2_limits import MiB, hccl_buffsize_bytes

from . import profiles
from .common import HALF_OR_FP32, limit, require, undefined_like

HCCL_DEFAULT_BUFFSIZE_MB = 200  # [dispatch] HCCL_BUFFSIZE: "单位MB，不配置时默认为200MB"


@dataclass
class Comm:
    group: object       # the MC2 communicator: nothing may run on it but MC2
    transport: object   # the emulator's own group over the same ranks
    global_bs: int | None = None
    shared_expert_num: int | None = None


_COMMS: dict[str, Comm] = {}


def register_group(name: str, group, transport) -> None:
    """`name` addresses MC2 group `group`; the emulator moves data on `transport` (never on `group`)."""
    if transport is group:
        raise ValueError("the transport group must not be the MC2 group: MC2's communicator carries nothing else")
    for old in [n for n, c in _COMMS.items() if c.group is group]:
        del _COMMS[old]  # a group re-registered is a fresh communicator (a new engine): its state starts over
    _COMMS[name] = Comm(group, transport)


def comm_name(group) -> str:
    """The registered name of an MC2 group (what hccl_comm_name returns on a real NPU)."""
    for name, comm in _COMMS.items():
        if comm.group is group:
            return name
    raise RuntimeError("this process group is not a registered MC2 communicator")


def reset() -> None:
    _COMMS.clear()


# --- no other collective on the MC2 communicator ---------------------------------------------------

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
                "all_to_all_single", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
                "reduce_scatter_tensor", "barrier", "monitored_barrier", "gather", "scatter", "send", "recv",
                "isend", "irecv", "batch_isend_irecv")


def _group_of(fn, args, kwargs):
    if "group" in kwargs:
        return kwargs["group"]
    try:
        bound = _signature(fn).bind_partial(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get("group")


@functools.lru_cache(maxsize=None)
def _signature(fn):
    return inspect.signature(fn)


@contextlib.contextmanager
def guard():
    """Refuse every torch.distributed collective on a registered MC2 group for the duration."""
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            group = _group_of(fn, args, kwargs)
            if group is not None and any(c.group is group for c in _COMMS.values()):
                raise RuntimeError(f"torch.distributed.{name} on the MC2 communicator: MC2's docs allow no other "
                                   "operator on it (该通信域中不允许有其他算子); use the EP group")
            return fn(*args, **kwargs)
        return checked
    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# --- the documented rules ---------------------------------------------------------------------------

def check_layout(op: str, prof: profiles.Profile, bs: int, h: int, k: int, ep_world_size: int,
                 moe_expert_num: int) -> None:
    """BS, H, K, EP size and expert count against the profile (shared_expert_rank_num is 0 here)."""
    require(0 < bs <= prof.mc2_max_bs, op, f"BS must satisfy 0<BS<={prof.mc2_max_bs} on {prof.name}, got {bs}")
    if prof.mc2_ep_sizes is not None:
        require(ep_world_size in prof.mc2_ep_sizes, op,
                f"ep_world_size on {prof.name} must be one of {prof.mc2_ep_sizes}, got {ep_world_size}")
    else:
        lo, hi = prof.mc2_ep_range
        require(lo <= ep_world_size <= hi, op,
                f"ep_world_size on {prof.name} must be in [{lo}, {hi}], got {ep_world_size}")
    require(prof.mc2_h_min <= h <= prof.mc2_h_max and h % prof.mc2_h_multiple == 0, op,
            f"H on {prof.name} must be in [{prof.mc2_h_min}, {prof.mc2_h_max}]"
            + (f", a multiple of {prof.mc2_h_multiple}" if prof.mc2_h_multiple > 1 else "") + f", got {h}")
    require(0 < k <= profiles.MC2_MAX_K and k <= moe_expert_num, op,
            f"K must satisfy 0<K<=16 and K<=moe_expert_num, got {k}")
    require(1 <= moe_expert_num <= profiles.MC2_MAX_EXPERTS and moe_expert_num % ep_world_size == 0, op,
            f"moe_expert_num must be in [1, 1024] and divide by ep_world_size, got {moe_expert_num} over "
            f"{ep_world_size}")
    if prof.mc2_max_local_experts is not None:
        require(moe_expert_num // ep_world_size <= prof.mc2_max_local_experts, op,
                f"moe_expert_num/ep_world_size must be <= {prof.mc2_max_local_experts} on {prof.name}, "
                f"got {moe_expert_num // ep_world_size}")


def check_ids(op: str, expert_ids: torch.Tensor, bs: int, moe_expert_num: int) -> None:
    """[dispatch] expert_ids: "shape为(BS, K)，数据类型支持int32 ... value取值范围为[0, moe_expert_num)，且同一行中的K个
    value不能重复"."""
    require(expert_ids.dim() == 2 and expert_ids.shape[0] == bs and expert_ids.dtype == torch.int32, op,
            "expert_ids must be int32 [BS, K]")
    require(bool(((expert_ids >= 0) & (expert_ids < moe_expert_num)).all()), op,
            "expert ids must lie in [0, moe_expert_num)")
    if expert_ids.numel():
        s = expert_ids.sort(dim=1).values
        require(bool((s[:, 1:] != s[:, :-1]).all()), op, "the K expert ids of a row must not repeat")


def check_arguments(op: str, prof: profiles.Profile, args: dict, combine: bool = False) -> None:
    """What each device supports of the optional arguments (see profiles.Profile.a2_argument_rules)."""
    if prof.a2_argument_rules:
        for name, default in (("shared_expert_num", 1), ("shared_expert_rank_num", 0), ("expert_shard_type", 0),
                              ("group_tp", ""), ("tp_world_size", 0), ("tp_rank_id", 0), ("elastic_info", None),
                              ("zero_expert_num", 0), ("copy_expert_num", 0), ("const_expert_num", 0),
                              ("tp_send_counts", None), ("shared_expert_x", None)):
            if name in args:
                require(args[name] is None if default is None else args[name] == default, op,
                        f"{name} is not supported on a2: leave it at its default ({default!r}), got {args[name]!r}")
        alg = args.get("comm_alg", "")
        # [dispatch] comm_alg "": "配置HCCL_INTRA_PCIE_ENABLE=1和HCCL_INTRA_ROCE_ENABLE=0时，调用"hierarchy""
        env = os.environ
        if alg == "" and env.get("HCCL_INTRA_PCIE_ENABLE") == "1" and env.get("HCCL_INTRA_ROCE_ENABLE") == "0":
            alg = "hierarchy"
        require(alg in ("", "fullmesh", "hierarchy"), op, f"comm_alg on a2 is '', fullmesh or hierarchy, got {alg!r}")
        limit(alg != "hierarchy", op, "comm_alg hierarchy (its own buffer formula and limits)")
    else:
        require(args.get("expert_scales") is None, op, "expert_scales is not supported on a3 (leave it None)")
        require(0 <= args.get("shared_expert_num", 1) <= 4, op, "shared_expert_num on a3 must be in [0, 4]")
        # [dispatch] A3 comm_alg: "当前版本仅支持""，"fullmesh_v1"，"fullmesh_v2"三种输入方式"; [combine] A3:
        # "commAlg 当前版本不支持，传空指针即可"
        allowed = ("",) if combine else ("", "fullmesh_v1", "fullmesh_v2")
        require(args.get("comm_alg", "") in allowed, op, f"comm_alg on a3 must be one of {allowed}")
        limit(args.get("comm_alg", "") != "fullmesh_v2" and args.get("tp_world_size", 0) in (0, 1)
              and args.get("shared_expert_rank_num", 0) == 0 and args.get("elastic_info") is None
              and not any(args.get(n, 0) for n in ("zero_expert_num", "copy_expert_num", "const_expert_num")),
              op, "a3 without fullmesh_v2, a TP domain, shared-expert ranks, elastic info or special experts")


def check_global_bs(op: str, comm: Comm, global_bs: int, sizes: list[int], ep_world_size: int,
                    prof: profiles.Profile) -> int:
    """[dispatch] global_bs: "当每个rank的BS不同时，支持传入max_bs*ep_world_size，其中max_bs表示单rank BS最大值；当每个
    rank的BS相同时，支持取值0或BS*ep_world_size", and the same value in every layer. Returns max_bs."""
    if global_bs == 0:
        require(len(set(sizes)) == 1, op, f"global_bs=0 needs the same BS on every rank, got {sizes}")
        max_bs = sizes[0]
    else:
        max_bs = global_bs // ep_world_size
        require(global_bs % ep_world_size == 0 and max(sizes) <= max_bs <= prof.mc2_max_bs, op,
                f"global_bs must be max_bs * ep_world_size with every rank's BS <= max_bs <= {prof.mc2_max_bs}, "
                f"got {global_bs} for BS {sizes}")
    if comm.global_bs is None:
        comm.global_bs = global_bs
    require(comm.global_bs == global_bs, op,
            f"global_bs must be the same in every layer and call on a communicator: {comm.global_bs} before, "
            f"now {global_bs}")
    return max_bs


def check_buffsize(op: str, prof: profiles.Profile, h: int, k: int, ep_world_size: int, max_bs: int,
                   moe_expert_num: int, shared_expert_num: int) -> None:
    """[dispatch] HCCL_BUFFSIZE: "调用本接口前需检查HCCL_BUFFSIZE环境变量取值是否合理" against the device's formula."""
    value = os.environ.get("HCCL_BUFFSIZE", "") or str(HCCL_DEFAULT_BUFFSIZE_MB)
    need = hccl_buffsize_bytes(h, k, ep_world_size, max_bs, prof.name, n_routed_experts=moe_expert_num,
                               shared_expert_num=0 if prof.a2_argument_rules else shared_expert_num)
    require(int(value) * MiB >= need, op, f"HCCL_BUFFSIZE={value} MB is below the {-(-need // MiB)} MB this "
                                          f"layout needs on {prof.name}")


def _comm(op, name, world, rank) -> Comm:
    require(name in _COMMS, op, f"unknown group_ep {name!r}")
    comm = _COMMS[name]
    require(dist.get_world_size(comm.transport) == world and dist.get_rank(comm.transport) == rank, op,
            "ep_world_size / ep_rank_id disagree with the group")
    return comm


def _a2a(x: torch.Tensor, in_splits: list, out_splits: list, group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


def npu_moe_distribute_dispatch_v2(x, expert_ids, group_ep, ep_world_size, ep_rank_id, moe_expert_num, *, scales=None,
                                   x_active_mask=None, expert_scales=None, elastic_info=None, performance_info=None,
                                   group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0, shared_expert_num=1,
                                   shared_expert_rank_num=0, quant_mode=0, global_bs=0, expert_token_nums_type=1,
                                   comm_alg="", zero_expert_num=0, copy_expert_num=0, const_expert_num=0, y_dtype=None,
                                   x_dtype=None, scales_dtype=None):
    """-> (expand_x, dynamic_scales, assist_info_for_combine, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales)."""
    op = "npu_moe_distribute_dispatch_v2"
    prof = profiles.active()
    check_arguments(op, prof, dict(expert_scales=expert_scales, elastic_info=elastic_info, group_tp=group_tp,
                                   tp_world_size=tp_world_size, tp_rank_id=tp_rank_id,
                                   expert_shard_type=expert_shard_type, shared_expert_num=shared_expert_num,
                                   shared_expert_rank_num=shared_expert_rank_num, comm_alg=comm_alg,
                                   zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num,
                                   const_expert_num=const_expert_num))
    limit(all(v is None for v in (scales, x_active_mask, expert_scales, performance_info, y_dtype, x_dtype,
                                  scales_dtype)) and quant_mode == 0,
          op, "plain bf16/fp16 dispatch without quantisation, masks or expert scales")
    require(expert_token_nums_type in (0, 1), op, "the expert_token_nums_type should be 0 or 1")
    comm = _comm(op, group_ep, ep_world_size, ep_rank_id)
    require(x.dim() == 2 and x.dtype in HALF_OR_FP32, op, "x must be [BS, H] bf16/fp16")
    bs, h = x.shape
    k = expert_ids.shape[1] if expert_ids.dim() == 2 else 0
    check_layout(op, prof, bs, h, k, ep_world_size, moe_expert_num)
    check_ids(op, expert_ids, bs, moe_expert_num)
    group = comm.transport
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(ep_world_size)]
    dist.all_gather(sizes, torch.tensor([bs]), group=group)
    max_bs = check_global_bs(op, comm, global_bs, [int(s) for s in sizes], ep_world_size, prof)
    check_buffsize(op, prof, h, k, ep_world_size, max_bs, moe_expert_num, shared_expert_num)
    comm.shared_expert_num = shared_expert_num
    n_local = moe_expert_num // ep_world_size
    a = max_bs * ep_world_size * min(n_local, k)
    flat = expert_ids.reshape(-1).long()
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
    # [dispatch] expand_scales: A2 "要求是一个1维张量，shape为(A, )"; A3 "暂不支持该输出"
    expand_scales = torch.zeros(a if prof.a2_argument_rules else 0, dtype=torch.float32)
    return (expand_x, torch.zeros(a, dtype=torch.float32), assist, token_nums.to(torch.int64),
            by_src.t().reshape(-1).to(torch.int32), torch.zeros(tp_world_size, dtype=torch.int32), expand_scales)


def npu_moe_distribute_combine_v2(expand_x, expert_ids, assist_info_for_combine, ep_send_counts, expert_scales, group_ep,
                                  ep_world_size, ep_rank_id, moe_expert_num, *, tp_send_counts=None, x_active_mask=None,
                                  expand_scales=None, shared_expert_x=None, elastic_info=None, ori_x=None,
                                  const_expert_alpha_1=None, const_expert_alpha_2=None, const_expert_v=None,
                                  performance_info=None, group_tp="", tp_world_size=0, tp_rank_id=0, expert_shard_type=0,
                                  shared_expert_num=1, shared_expert_rank_num=0, global_bs=0, comm_quant_mode=0,
                                  comm_alg="", zero_expert_num=0, copy_expert_num=0, const_expert_num=0):
    """-> [bs, H] in expand_x's dtype: sum_j expert_scales[t, j] * (expert row of (t, j))."""
    op = "npu_moe_distribute_combine_v2"
    prof = profiles.active()
    check_arguments(op, prof, dict(elastic_info=elastic_info, group_tp=group_tp, tp_world_size=tp_world_size,
                                   tp_rank_id=tp_rank_id, expert_shard_type=expert_shard_type,
                                   shared_expert_num=shared_expert_num, shared_expert_rank_num=shared_expert_rank_num,
                                   comm_alg=comm_alg, zero_expert_num=zero_expert_num, copy_expert_num=copy_expert_num,
                                   const_expert_num=const_expert_num, tp_send_counts=tp_send_counts,
                                   shared_expert_x=shared_expert_x), combine=True)
    limit(all(v is None for v in (tp_send_counts, x_active_mask, shared_expert_x, elastic_info, ori_x,
                                  const_expert_alpha_1, const_expert_alpha_2, const_expert_v, performance_info))
          and comm_quant_mode == 0, op, "the plain combine")
    comm = _comm(op, group_ep, ep_world_size, ep_rank_id)
    require(expert_ids.dim() == 2, op, "expert_ids must be [BS, K]")
    bs, k = expert_ids.shape
    h = expand_x.shape[1]
    check_layout(op, prof, bs, h, k, ep_world_size, moe_expert_num)
    check_ids(op, expert_ids, bs, moe_expert_num)
    require(expert_scales.shape == (bs, k) and expert_scales.dtype == torch.float32, op,
            "expert_scales must be float32 [bs, k]")
    require(comm.global_bs is not None and comm.global_bs == global_bs, op,
            "global_bs must equal dispatch's (and be the same in every layer)")
    require(comm.shared_expert_num == shared_expert_num, op, "shared_expert_num must equal dispatch's")
    n_local = moe_expert_num // ep_world_size
    gbs = global_bs or bs * ep_world_size
    a = gbs * min(n_local, k)
    require(expand_x.shape[0] == a, op, "expand_x must be dispatch's expand_x buffer")
    if prof.a2_argument_rules:  # [combine] expand_scales, A2: "必选参数，要求是1D的Tensor，shape为(A, )，数据类型支持float"
        require(expand_scales is not None and expand_scales.shape == (a,) and expand_scales.dtype == torch.float32,
                op, "expand_scales (dispatch's) is required on a2: float32 [A]")
    else:  # A3: "暂不支持该参数，使用默认值即可"
        require(expand_scales is None, op, "expand_scales is not supported on a3 (leave it None)")
    group = comm.transport
    n = int(ep_send_counts.long().sum())
    src_rank = assist_info_for_combine[0:2 * n:2].long()
    src_flat = assist_info_for_combine[1:2 * n:2].long()
    back = torch.argsort(src_rank, stable=True)
    send = torch.bincount(src_rank, minlength=ep_world_size)
    recv = _a2a(send, [1] * ep_world_size, [1] * ep_world_size, group).tolist()
    rows = _a2a(expand_x[:n][back], send.tolist(), recv, group)
    flat = _a2a(src_flat[back], send.tolist(), recv, group)
    w = expert_scales.reshape(-1)[flat]
    out = torch.zeros((bs, h), dtype=torch.float32)
    out.index_add_(0, flat // k, rows.float() * w[:, None])
    return out.to(expand_x.dtype)
