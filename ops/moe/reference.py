"""MoE ops in plain torch: the readable spec every backend is tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_route(router_logits: torch.Tensor, e_score_correction_bias: torch.Tensor, top_k: int,
              n_group: int, topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool = True):
    """GLM-5 / DeepSeek-V3 noaux_tc routing (the semantics of npu_moe_gating_top_k, sigmoid mode).

    Selection uses sigmoid(logits) + bias with group-limited top-k (a group scores the sum of its two
    best experts); the weights are the unbiased sigmoid scores of the chosen experts, normalised,
    times routed_scaling_factor.

    Args:
        router_logits: [T, E] float32.
    Returns:
        weights float32 [T, top_k], expert ids int32 [T, top_k].
    """
    T, E = router_logits.shape
    scores = router_logits.float().sigmoid()
    choice = scores + e_score_correction_bias.float()
    if n_group > 1:
        group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
        expert_mask = group_mask[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def moe_permute(hidden: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """Group token copies by expert.

    Args:
        hidden: [T, D]; expert_ids: int [T, k] (ids outside [0, num_experts) are dropped, e.g. experts
            another EP rank owns when passed as -1).
    Returns:
        permuted [N, D] rows sorted by expert; order int64 [N], the flat (token * k + j) index of
        each row; counts int64 [num_experts].
    """
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).long()
    keep = (flat >= 0) & (flat < num_experts)
    order = torch.argsort(torch.where(keep, flat, num_experts), stable=True)[: int(keep.sum())]
    counts = torch.bincount(flat[keep], minlength=num_experts)
    return hidden[order // k], order, counts


def moe_unpermute(expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs back into token order.

    Args:
        expert_out: [M, D] rows in moe_permute's order; order: int64 [M], the flat (token * k + j) slot
            of each row, -1 for padding rows (ignored: their content may be anything, NaN included);
        weights: [T, k] routing weights.
    Returns:
        [T, D] in expert_out's dtype.
    """
    T, k = weights.shape
    kept = order >= 0
    slot = order.clamp(min=0)
    w = weights.reshape(-1)[slot].to(expert_out.dtype)
    rows = torch.where(kept[:, None], expert_out * w[:, None], expert_out.new_zeros(()))
    out = torch.zeros((T, expert_out.shape[1]), dtype=expert_out.dtype, device=expert_out.device)
    return out.index_add_(0, slot // k, rows)


def grouped_mlp(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over rows grouped by expert.

    Args:
        x: [M, D] rows sorted by expert; counts: [E] rows per expert, sum N <= M (rows past N are
            padding; their output is left unspecified).
        w13: [E, 2I, D] gate rows then up rows; w2: [E, D, I]; either may be in the cuda backend's
            tile-packed form (unpack_weights), as a model loaded for that backend holds them.
    Returns:
        [M, D].
    """
    w13, w2 = unpack_weights(w13), unpack_weights(w2)
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        rows = x[start:start + n]
        gate, up = F.linear(rows, w13[e]).chunk(2, dim=-1)
        out[start:start + n] = F.linear(F.silu(gate) * up, w2[e])
        start += n
    return out


def unpack_weights(w: torch.Tensor) -> torch.Tensor:
    """Expert weights [E, rows, K] from the cuda backend's tile-packed form [E, rows / bn, K / bk, bn, bk]
    (ops/moe/cuda.py pack_weights: each [bn, bk] tile contiguous); [E, rows, K] weights as they are."""
    return w.permute(0, 1, 3, 2, 4).reshape(expert_shape(w)) if w.dim() == 5 else w


def expert_shape(w: torch.Tensor) -> tuple[int, ...]:
    """[E, rows, K] of expert weights, plain or packed."""
    if w.dim() == 5:
        E, n_bn, kt, bn, bk = w.shape
        return E, n_bn * bn, kt * bk
    return tuple(w.shape)
