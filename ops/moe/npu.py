"""MoE ops on Ascend NPU through torch_npu's fused kernels.

Same functions, arguments and results as ops/moe/reference.py (the spec), plus the MC2 expert-parallel
dispatch / combine (npu_moe_distribute_dispatch_v2 / combine_v2). Where an op's official semantics
differ from ours the wrapper converts, and says so where it does. No NPU has run this code yet; it is
written against the torch-npu 2.13 signatures and tested on CPU through the contract emulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch_npu

from glm5_ascend.ops.moe import reference

# npu_moe_gating_top_k limits (torch-npu 2.13 docs): at most 2048 experts, more than 2 experts per
# group, 1 <= k_group <= group_count, k <= experts_per_group * k_group. Outside them we run the
# reference math (plain torch ops, which run on the NPU too).
_GATING_MAX_EXPERTS = 2048


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _gating_fits(E: int, top_k: int, n_group: int, topk_group: int) -> bool:
    if E > _GATING_MAX_EXPERTS or n_group < 1 or E % n_group or E // n_group <= 2:
        return False
    return 1 <= topk_group <= n_group and 1 <= top_k <= E // n_group * topk_group


def moe_route(router_logits: torch.Tensor, e_score_correction_bias: torch.Tensor, top_k: int,
              n_group: int, topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool = True):
    """Sigmoid group-limited top-k via npu_moe_gating_top_k -> (weights f32 [T, k], ids int32 [T, k]).

    Mapping: norm_type=1 (sigmoid), group_select_mode=1 (a group scores the sum of its top 2), renorm=0.
    The op always renormalises the chosen (unbiased) scores: y / (sum + eps) * routed_scaling_factor.
    Without norm_topk_prob we ask for the sigmoid scores (out_flag) and gather them ourselves.
    """
    T, E = router_logits.shape
    if T == 0 or not _gating_fits(E, top_k, n_group, topk_group):
        return reference.moe_route(router_logits, e_score_correction_bias, top_k, n_group, topk_group,
                                   routed_scaling_factor, norm_topk_prob)
    x = router_logits.float()  # the op wants bias in x's dtype; routing stays float32 end to end
    y, ids, norm_out = torch_npu.npu_moe_gating_top_k(
        x, top_k, bias=e_score_correction_bias.float(), k_group=topk_group, group_count=n_group,
        group_select_mode=1, renorm=0, norm_type=1, out_flag=not norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor, eps=1e-20)
    ids = ids.to(torch.int32)
    if norm_topk_prob:
        return y.float(), ids
    return norm_out.float().gather(1, ids.long()) * routed_scaling_factor, ids


def moe_permute(hidden: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """Group token copies by expert via npu_moe_init_routing_v2 -> (permuted [N, D], order int64 [N], counts int64 [E]).

    Ids outside [0, num_experts) (experts another EP rank owns, -1 padding) are dropped. The op wants
    ids in [0, expert_num), so they are mapped to the extra expert `num_experts`, which
    active_expert_range=[0, num_experts] leaves out. row_idx_type=1 returns, for each output row,
    its flat source index token * k + j (our `order`); its first N entries are valid.
    """
    T, D = hidden.shape
    k = expert_ids.shape[1]
    if T == 0:
        return (hidden.new_empty((0, D)), torch.empty(0, dtype=torch.int64, device=hidden.device),
                torch.zeros(num_experts, dtype=torch.int64, device=hidden.device))
    ids = expert_ids.to(torch.int32)
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, torch.full_like(ids, num_experts))
    expanded_x, expanded_row_idx, counts, _ = torch_npu.npu_moe_init_routing_v2(
        hidden, ids, active_num=T * k, expert_num=num_experts + 1, drop_pad_mode=0,
        expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, num_experts], row_idx_type=1)
    _check(counts.shape == (num_experts,), f"npu_moe_init_routing_v2 returned counts {tuple(counts.shape)}")
    n = int(counts.sum())  # host sync, as in the reference: N sizes the grouped GEMM
    return expanded_x[:n], expanded_row_idx[:n].long(), counts.long()


def moe_unpermute(expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine back to tokens via npu_moe_token_unpermute -> [T, D] in expert_out's dtype.

    The op gathers: out[t] = sum_j probs[t, j] * permuted[sorted_indices[t * k + j]], so it wants the
    inverse of `order` over all T * k slots, each used once. Slots dropped by moe_permute (other EP
    ranks' experts) point at appended zero rows.
    """
    T, k = weights.shape
    N, D = expert_out.shape
    if T == 0:
        return expert_out.new_zeros((0, D))
    inv = torch.empty(T * k, dtype=torch.int64, device=order.device)
    dropped = torch.ones(T * k, dtype=torch.bool, device=order.device)
    dropped[order] = False
    inv[order] = torch.arange(N, device=order.device)
    inv[dropped] = torch.arange(N, T * k, device=order.device)
    rows = expert_out if N == T * k else torch.cat([expert_out, expert_out.new_zeros((T * k - N, D))])
    return torch_npu.npu_moe_token_unpermute(rows, inv.to(torch.int32), probs=weights.to(expert_out.dtype))


def _gmm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, K] rows grouped by expert times w [E, N_out, K] (nn.Linear layout) -> [N, N_out]."""
    # group_type=0 splits the M axis; split_item=3 returns one tensor. w.transpose(1, 2) is the op's
    # [E, K, N_out] as a transposed (non-contiguous) view, which the op takes without a copy.
    # group_list_type=1 means per-expert counts; a one-expert list is given as a cumsum (type 0) instead.
    count_mode = counts.numel() > 1
    group_list = counts if count_mode else counts.cumsum(0)
    out = torch_npu.npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=group_list, split_item=3,
                                       group_type=0, group_list_type=1 if count_mode else 0)
    return out[0]


def grouped_mlp(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts via npu_grouped_matmul + npu_swiglu: x [N, D] sorted by expert -> [N, D].

    w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I]; npu_swiglu(h) = silu(h[:, :I]) * h[:, I:],
    the same gate-then-up split.
    """
    N, D = x.shape
    if N == 0:
        return x.new_empty((0, D))
    w13, w2 = reference.unpack_weights(w13), reference.unpack_weights(w2)  # the cuda backend's packed form, if given
    counts = counts.to(torch.int64)
    h = torch_npu.npu_swiglu(_gmm(x, w13, counts), dim=-1)
    return _gmm(h, w2, counts)


@dataclass
class Mc2Handle:
    """What combine_v2 needs from dispatch_v2 (the op's opaque assist info and send counts)."""

    backend: str
    expert_ids: torch.Tensor      # int32 [T, k] global ids
    weights: torch.Tensor         # float32 [T, k]
    assist_info: torch.Tensor     # int32, the op's own layout
    ep_send_counts: torch.Tensor  # int32
    group_name: str
    buffer_rows: int              # rows of dispatch's expand_x; combine takes a buffer of that size
    global_bs: int                # max tokens per rank * EP size, as dispatch was given
    world: int
    rank: int
    num_experts: int


def hccl_comm_name(group) -> str:
    """The HCCL communicator name the MC2 ops address a process group by."""
    rank = dist.get_rank(group)
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)


def ep_dispatch(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int, ep_group):
    """MC2 dispatch (npu_moe_distribute_dispatch_v2); the contract of ops/moe/ep.py's ep_dispatch.

    Returns (recv_hidden [N, D] grouped by local expert, recv_counts int64 [E_local], handle).
    The op returns a buffer sized for the worst case; its first sum(recv_counts) rows are valid.
    """
    T, D = hidden.shape
    world, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    _check(num_experts % world == 0, f"num_experts={num_experts} is not divisible by the EP size {world}")
    ids = expert_ids.to(torch.int32).contiguous()
    # global_bs=0 would mean "every rank has T tokens"; ranks differ (down to T=0), so pass the max.
    max_t = torch.tensor([T], dtype=torch.int64, device=hidden.device)
    dist.all_reduce(max_t, op=dist.ReduceOp.MAX, group=ep_group)
    n_local = num_experts // world
    if int(max_t) == 0:
        handle = Mc2Handle("npu", ids, weights.float(), ids.new_empty(0), ids.new_empty(0), "", 0, 0,
                            world, rank, num_experts)
        return hidden.new_empty((0, D)), torch.zeros(n_local, dtype=torch.int64, device=hidden.device), handle
    name = hccl_comm_name(ep_group)
    expand_x, _, assist_info, counts, ep_recv_counts, _, _ = torch_npu.npu_moe_distribute_dispatch_v2(
        hidden.contiguous(), ids, name, world, rank, num_experts, shared_expert_num=0,
        shared_expert_rank_num=0, quant_mode=0, global_bs=int(max_t) * world, expert_token_nums_type=1)
    counts = counts.long()
    n = int(counts.sum())
    handle = Mc2Handle("npu", ids, weights.float().contiguous(), assist_info, ep_recv_counts, name,
                       expand_x.shape[0], int(max_t) * world, world, rank, num_experts)
    return expand_x[:n], counts, handle


def ep_combine(expert_out: torch.Tensor, handle: Mc2Handle) -> torch.Tensor:
    """MC2 combine (npu_moe_distribute_combine_v2): weighted sum back to each source token, [T, D]."""
    N, D = expert_out.shape
    if handle.buffer_rows == 0:  # no rank had tokens: dispatch ran no collective, neither does combine
        return expert_out.new_zeros((handle.expert_ids.shape[0], D))
    _check(N <= handle.buffer_rows, f"{N} expert rows for a dispatch buffer of {handle.buffer_rows}")
    # combine_v2 reads expert rows from a buffer shaped like dispatch's expand_x; only the first N count.
    rows = torch.cat([expert_out, expert_out.new_zeros((handle.buffer_rows - N, D))]) if N < handle.buffer_rows else expert_out
    return torch_npu.npu_moe_distribute_combine_v2(
        rows.contiguous(), handle.expert_ids, handle.assist_info, handle.ep_send_counts, handle.weights,
        handle.group_name, handle.world, handle.rank, handle.num_experts, shared_expert_num=0,
        shared_expert_rank_num=0, global_bs=handle.global_bs)
