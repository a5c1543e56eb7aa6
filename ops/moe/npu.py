"""MoE ops on Ascend NPU through torch_npu's fused kernels.

Same functions, arguments and results as ops/moe/reference.py (the spec), plus the MC2 expert-parallel
dispatch / combine (npu_moe_distribute_dispatch_v2 / combine_v2). Where an op's official semantics
differ from ours the wrapper converts, and says so where it does. Where a documented limit refuses a
shape, the wrapper runs the reference math (plain torch, which runs on the NPU too). No NPU has run
this code yet; it is written against the torch-npu 2.13 signatures and the op documentation, and
tested on CPU through the contract emulator (tests/ops/emulator).

The decode path holds no host sync (no .item(), int(tensor), boolean-mask indexing), so an aclgraph
capture can hold it: moe_permute returns its rows padded (see ops/__init__.py), ep_dispatch decides
MC2 from a static bound (ops/moe/mc2.py) and returns MC2's fixed-size buffer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch_npu

from glm5_ascend.ops.moe import ep, mc2, reference
from glm5_ascend.ops.npu_profile import device_profile

# npu_moe_gating_top_k (op docs): "最后一维的大小（即专家数）要求不大于2048"; group_count: "x_shape[-1]能够被
# group_count整除且整除后的结果大于2，并且整除的结果按照32个数对齐后乘group_count的结果不大于2048";
# k_group: "1 <= k_group <= group_count"; k: "1 <= k <= x_shape[-1] / group_count * k_group".
_GATING_MAX_EXPERTS = 2048
# npu_grouped_matmul: "内轴限制InnerLimit为65536. x和weight中每一组tensor的最后一维大小都应小于InnerLimit".
_GMM_INNER_LIMIT = 65536
# The attribute moe_permute leaves on its `order`: npu_moe_init_routing_v2's gather index (row_idx_type=0),
# which npu_moe_token_unpermute takes as sorted_indices as it stands.
ROW_IDX_ATTR = "_npu_gather_row_idx"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _gating_fits(E: int, top_k: int, n_group: int, topk_group: int) -> bool:
    if E > _GATING_MAX_EXPERTS or n_group < 1 or E % n_group or E // n_group <= 2:
        return False
    if -(-(E // n_group) // 32) * 32 * n_group > _GATING_MAX_EXPERTS:
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
    """Token copies grouped by expert via npu_moe_init_routing_v2 -> (permuted [T*k, D], order [T*k], counts [E]).

    The padded form of the contract (ops/__init__.py): all T*k rows come back, the N = sum(counts) rows
    with an expert in [0, E) first, grouped by expert, then padding rows whose `order` is -1; nothing
    reads N on the host. Ids outside [0, E) are mapped to an extra expert E that
    active_expert_range=[0, E+1] keeps in range, so they sort last and the op's gather index
    (row_idx_type=0: "expandedRowIdxOut[sortedRowIdx[i]]=i") is a permutation of all T*k slots, as
    npu_moe_token_unpermute wants its sorted_indices. It is left on `order` for moe_unpermute.
    """
    T, D = hidden.shape
    k = expert_ids.shape[1]
    if T == 0:
        return (hidden.new_empty((0, D)), torch.empty(0, dtype=torch.int64, device=hidden.device),
                torch.zeros(num_experts, dtype=torch.int64, device=hidden.device))
    ids = expert_ids.to(torch.int32)
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, torch.full_like(ids, num_experts))
    expanded_x, row_idx, counts, _ = torch_npu.npu_moe_init_routing_v2(
        hidden, ids, active_num=T * k, expert_num=num_experts + 1, drop_pad_mode=0,
        expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, num_experts + 1], row_idx_type=0)
    _check(counts.shape == (num_experts + 1,), f"npu_moe_init_routing_v2 returned counts {tuple(counts.shape)}")
    counts = counts[:num_experts].long()
    slots = torch.arange(T * k, device=hidden.device)
    order = torch.empty_like(slots).scatter_(0, row_idx.long(), slots)  # row -> slot, the inverse of row_idx
    order = torch.where(slots < counts.sum(), order, -1)  # rows of dropped ids are padding
    setattr(order, ROW_IDX_ATTR, row_idx)
    return expanded_x, order, counts


def _gather_index(order: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """int32 [S]: for each token slot the row holding it, from `order` (row -> slot, -1 padding) over S
    rows. Free slots (dropped ids) get the padding rows, so the result is a permutation. No host sync:
    padding rows sorted first, then valid rows by slot, paired with free slots, then covered slots."""
    S = order.numel()
    rows = torch.argsort(torch.where(valid, order, -1), stable=True)
    covered = torch.zeros(S, dtype=torch.int32, device=order.device).scatter_add_(
        0, order.clamp(min=0), valid.to(torch.int32)) > 0
    pos = torch.arange(S, device=order.device)
    slots = torch.argsort(torch.where(covered, pos, -1), stable=True)
    return torch.empty_like(pos).scatter_(0, slots, rows).to(torch.int32)


def moe_unpermute(expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine back to tokens via npu_moe_token_unpermute -> [T, D] in expert_out's dtype.

    The op gathers: out[t] = sum_j probs[t, j] * permuted[sorted_indices[t * k + j]], sorted_indices
    a permutation of the T * k slots. After this backend's moe_permute that is the routing op's own
    index (no inverse to compute); for any other `order` it is built on the device. Padding rows
    (order -1, or rows appended up to T * k) are zeroed and weighted 0: their content is unspecified.
    """
    T, k = weights.shape
    M, D = expert_out.shape
    if T == 0:
        return expert_out.new_zeros((0, D))
    S = T * k
    valid = order >= 0
    if M < S:
        expert_out = torch.cat([expert_out, expert_out.new_zeros((S - M, D))])
        valid = torch.cat([valid, valid.new_zeros(S - M)])
        order = torch.cat([order, order.new_full((S - M,), -1)])
    row_idx = getattr(order, ROW_IDX_ATTR, None)
    if row_idx is None or row_idx.numel() != S:
        row_idx = _gather_index(order, valid)
    rows = torch.where(valid[:, None], expert_out, expert_out.new_zeros(()))
    probs = weights.to(expert_out.dtype) * valid[row_idx.long()].view(T, k)
    return torch_npu.npu_moe_token_unpermute(rows, row_idx, probs=probs)


def _gmm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [M, K] rows grouped by expert times w [E, N_out, K] (nn.Linear layout) -> [M, N_out]."""
    # group_type=0 splits the M axis; split_item=3 returns one tensor. w.transpose(1, 2) is the op's
    # [E, K, N_out] as a transposed (non-contiguous) view, which the op takes without a copy.
    # group_list_type=1 means per-expert counts; a one-expert list is given as a cumsum (type 0) instead
    # ("group_list_type为1时 ... 长度不能为1"). Rows past sum(counts) are padding the op leaves alone.
    count_mode = counts.numel() > 1
    group_list = counts if count_mode else counts.cumsum(0)
    out = torch_npu.npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=group_list, split_item=3,
                                       group_type=0, group_list_type=1 if count_mode else 0)
    return out[0]


def grouped_mlp(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts via npu_grouped_matmul + npu_swiglu: x [M, D] sorted by expert -> [M, D].

    w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I]; npu_swiglu(h) = silu(h[:, :I]) * h[:, I:],
    the same gate-then-up split. Rows past sum(counts) are padding; their output is unspecified.
    Contraction dims of 65536 or more (the op's inner limit) run the reference.
    """
    M, D = x.shape
    if M == 0:
        return x.new_empty((0, D))
    w13, w2 = reference.unpack_weights(w13), reference.unpack_weights(w2)  # the cuda backend's packed form, if given
    if max(D, w2.shape[2]) >= _GMM_INNER_LIMIT:
        return reference.grouped_mlp(x, counts, w13, w2)
    counts = counts.to(torch.int64)
    h = torch_npu.npu_swiglu(_gmm(x, w13, counts), dim=-1)
    return _gmm(h, w2, counts)


@dataclass
class Mc2Handle:
    """What combine_v2 needs from dispatch_v2 (the op's opaque assist info and counts)."""

    backend: str
    expert_ids: torch.Tensor      # int32 [BS, k] global ids, as dispatched (one dummy row when T was 0)
    weights: torch.Tensor         # float32 [BS, k]
    assist_info: torch.Tensor     # int32, the op's own layout
    ep_send_counts: torch.Tensor  # int32, dispatch's ep_recv_counts
    expand_scales: torch.Tensor | None  # A2: dispatch's expand_scales, which combine requires; A3: None
    group_name: str
    buffer_rows: int              # rows of dispatch's expand_x; combine takes a buffer of that size
    global_bs: int                # the plan's, the same in every layer
    world: int
    rank: int
    num_experts: int
    tokens: int                   # this rank's real T (0 when it sent a dummy row)
    device: str                   # a2 | a3


def hccl_comm_name(group) -> str:
    """The HCCL communicator name the MC2 ops address a process group by."""
    rank = dist.get_rank(group)
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)


def ep_dispatch(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int, ep_group,
                mc2_group=None, max_tokens_per_rank: int | None = None):
    """MC2 dispatch (npu_moe_distribute_dispatch_v2) on `mc2_group`, else the all_to_all path on `ep_group`.

    The contract of ops.ep_dispatch. ops/moe/mc2.py decides, the same way on every rank, whether this
    call runs MC2; the MC2 ops run on mc2_group only, anything else (the all_to_all path, the per-call
    decision's all_reduce) on ep_group. MC2 returns (expand_x [A, D], counts int64 [E_local], handle):
    the op's fixed-size buffer, whose first sum(counts) rows are valid, so no host sync.
    """
    T, D = hidden.shape
    k = expert_ids.shape[1]
    world = dist.get_world_size(ep_group)
    _check(num_experts % world == 0, f"num_experts={num_experts} is not divisible by the EP size {world}")
    plan = mc2.plan(device_profile(), D, k, world, num_experts, max_tokens_per_rank, mc2_group is not None)
    if not mc2.use_mc2(plan, T, ep_group, hidden.device):
        return ep.ep_dispatch(hidden, expert_ids, weights, num_experts, ep_group)
    _check(dist.get_world_size(mc2_group) == world, "mc2_group must hold the same ranks as ep_group")
    rank = dist.get_rank(mc2_group)
    x, ids, w = hidden, expert_ids.to(torch.int32), weights.float()
    if T == 0:  # MC2 wants 0 < BS: one dummy row of zeros to K of this rank's experts, weight 0
        x = hidden.new_zeros((1, D))
        ids = mc2.dummy_ids(rank, num_experts // world, k, num_experts, hidden.device)
        w = w.new_zeros((1, k))
    a2 = plan.device == "a2"
    name = hccl_comm_name(mc2_group)
    # A2: shared_expert_num (and the TP / shared-expert-rank / special-expert arguments) are "暂不支持该参数，
    # 使用默认值即可", so they keep their defaults; comm_alg "fullmesh" pins the algorithm (and buffer formula)
    # that "" would pick from HCCL_INTRA_* variables. A3: shared_expert_num=0, "0表示无共享专家" (ours runs locally).
    expand_x, _, assist, counts, ep_recv_counts, _, expand_scales = torch_npu.npu_moe_distribute_dispatch_v2(
        x.contiguous(), ids.contiguous(), name, world, rank, num_experts, shared_expert_num=1 if a2 else 0,
        quant_mode=0, global_bs=plan.global_bs, expert_token_nums_type=1, comm_alg="fullmesh" if a2 else "")
    handle = Mc2Handle("npu", ids, w.contiguous(), assist, ep_recv_counts, expand_scales if a2 else None, name,
                       expand_x.shape[0], plan.global_bs, world, rank, num_experts, T, plan.device)
    return expand_x, counts.to(torch.int64), handle


def ep_combine(expert_out: torch.Tensor, handle: Mc2Handle) -> torch.Tensor:
    """MC2 combine (npu_moe_distribute_combine_v2): weighted sum back to each source token, [T, D]."""
    N, D = expert_out.shape
    _check(N <= handle.buffer_rows, f"{N} expert rows for a dispatch buffer of {handle.buffer_rows}")
    # combine_v2 reads expert rows from a buffer shaped like dispatch's expand_x
    rows = expert_out if N == handle.buffer_rows else torch.cat(
        [expert_out, expert_out.new_zeros((handle.buffer_rows - N, D))])
    a2 = handle.device == "a2"
    out = torch_npu.npu_moe_distribute_combine_v2(
        rows.contiguous(), handle.expert_ids, handle.assist_info, handle.ep_send_counts, handle.weights,
        handle.group_name, handle.world, handle.rank, handle.num_experts, expand_scales=handle.expand_scales,
        shared_expert_num=1 if a2 else 0, global_bs=handle.global_bs, comm_alg="fullmesh" if a2 else "")
    return out[:handle.tokens]  # a rank with no tokens sent one dummy row
