"""Emulated MoE kernels: gating top-k, init routing v2, grouped matmul, swiglu, token unpermute.

Signatures are the torch-npu 2.13 schema; shapes, dtypes and documented constraints follow the meta
kernels and the op docs; the math is the documented formula in plain torch. Options the npu backend
never passes raise EmulatorLimit. The limits are the same on Atlas A2 and A3; each rule cites its doc:
  [gating]  Ascend/op-plugin docs/context/torch_npu-npu_moe_gating_top_k.md
  [routing] Ascend/op-plugin docs/context/torch_npu-npu_moe_init_routing_v2.md, and the CANN ops-transformer
            MoeInitRoutingV3 README (which spells out row_idx_type 0: "expandedRowIdxOut[sortedRowIdx[i]]=i",
            "当rowIdxType为0时，无效数据由-1填充")
  [gmm]     torch-npu 2.13.0 _op_plugin_docs.py npu_grouped_matmul (the op-plugin page says the same for A2/A3)
  [unperm]  Ascend/op-plugin torch_npu.npu_moe_token_unpermute page
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import limit, require, undefined_like

INNER_LIMIT = 65536


def npu_moe_gating_top_k(x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    """-> (y [T, k] x.dtype, expert_idx int32 [T, k], norm_out float32 [T, E]).

    norm = sigmoid|softmax(x); selection on norm + bias, group-limited (group score: max, or sum of
    the top 2); y = norm[chosen] / (sum + eps) * routed_scaling_factor.
    """
    op = "npu_moe_gating_top_k"
    require(x.dim() == 2, op, "the x shape support only 2d")
    T, E = x.shape
    # [gating] x: "最后一维的大小（即专家数）要求不大于2048"
    require(E <= 2048, op, "at most 2048 experts")
    require(bias is None or (bias.shape == (E,) and bias.dtype == x.dtype), op, "bias must be [E] in x's dtype")
    limit(input_ids is None and tid2eid is None, op, "no hash routing (input_ids / tid2eid)")
    require(renorm == 0, op, "renorm only supports 0")
    limit(norm_type == 1, op, "sigmoid only (norm_type=1)")
    # [gating] group_count: "x_shape[-1]能够被group_count整除且整除后的结果大于2，并且整除的结果按照32个数对齐后乘
    # group_count的结果不大于2048"
    require(group_count > 0 and E % group_count == 0 and E // group_count > 2, op,
            "experts must split into group_count groups of more than 2")
    require(-(-(E // group_count) // 32) * 32 * group_count <= 2048, op,
            "experts per group, aligned up to 32, times group_count must be <= 2048")
    # [gating] k: "1 <= k <= x_shape[-1] / group_count * k_group"; k_group: "1 <= k_group <= group_count"
    require(1 <= k_group <= group_count and 1 <= k <= E // group_count * k_group, op,
            "need 1 <= k_group <= group_count and 1 <= k <= E / group_count * k_group")
    require(group_select_mode in (0, 1), op, "group_select_mode is 0 or 1")
    norm = x.float().sigmoid()
    choice = norm + bias.float() if bias is not None else norm.clone()
    if group_count > 1:
        grouped = choice.view(T, group_count, E // group_count)
        score = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k_group, dim=-1)[1], True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // group_count, dim=1), float("-inf"))
    ids = choice.topk(k, dim=-1)[1]
    y = norm.gather(1, ids)
    y = y / (y.sum(-1, keepdim=True) + eps) * routed_scaling_factor
    return y.to(x.dtype), ids.to(torch.int32), norm


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=[], row_idx_type=0, x_dtype=None):  # noqa: B006 (official default)
    """-> (expanded_x [T*K, H], expanded_row_idx int32 [T*K], expert_token_count int64 [end-start], expanded_scale f32 [T*K]).

    Rows with an expert in active_expert_range [start, end) are stably sorted by expert; expanded_x's
    first `available` rows are valid. row_idx_type=1: expanded_row_idx[i] = flat source index
    (token * K + j) of output row i (first `available` valid); row_idx_type=0: the inverse, -1 for
    rows outside the range. Everything past `available` is undefined (NaN / INT_MIN here).
    """
    op = "npu_moe_init_routing_v2"
    require(x.dim() == 2 and expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0], op,
            "x must be [NUM_ROWS, H] and expert_idx [NUM_ROWS, K]")
    require(expert_idx.dtype == torch.int32, op, "expert_idx must be int32")
    T, K = expert_idx.shape
    # [routing] active_num: "当前未使用，校验需等于NUM_ROWS*K"; expert_num: "其他模式取值范围为[0, 10240]";
    # drop_pad_mode "当前仅支持0"; expert_tokens_num_type "当前仅支持1和2"; expert_tokens_num_flag "当前仅支持True";
    # quant_mode "当前仅支持-1和1"; row_idx_type "0表示gather类型的索引；1表示scatter类型的索引"
    require(active_num == T * K, op, f"active_num must equal NUM_ROWS*K={T * K}, got {active_num}")
    require(0 < expert_num <= 10240, op, "expert_num must be in (0, 10240]")
    require(drop_pad_mode == 0, op, "only drop_pad_mode=0 (dropless)")
    require(expert_tokens_num_type in (1, 2) and expert_tokens_num_flag, op,
            "expert_tokens_num_type is 1 or 2 and expert_tokens_num_flag True")
    limit(expert_tokens_num_type == 1, op, "count mode (expert_tokens_num_type=1)")
    require(quant_mode in (-1, 1), op, "quant_mode is -1 or 1")
    limit(quant_mode == -1 and scale is None and offset is None and x_dtype is None, op, "no quantisation")
    require(row_idx_type in (0, 1), op, "row_idx_type is 0 or 1")
    # [routing] active_expert_range: "要求值大于等于0，并且expert_end不大于expert_num"
    start, end = active_expert_range if len(active_expert_range) == 2 else (0, expert_num)
    require(0 <= start < end <= expert_num, op, "active_expert_range must satisfy 0 <= start < end <= expert_num")
    flat = expert_idx.reshape(-1).long()
    require(bool(((flat >= 0) & (flat < expert_num)).all()), op, "expert ids must lie in [0, expert_num)")
    active = (flat >= start) & (flat < end)
    n = int(active.sum())
    order = torch.argsort(torch.where(active, flat, end), stable=True)[:n]
    expanded_x = undefined_like((T * K, x.shape[1]), x.dtype, x.device)
    expanded_x[:n] = x[order // K]
    if row_idx_type == 1:
        row_idx = undefined_like((T * K,), torch.int32, x.device)
        row_idx[:n] = order.to(torch.int32)
    else:
        row_idx = torch.full((T * K,), -1, dtype=torch.int32, device=x.device)
        row_idx[order] = torch.arange(n, dtype=torch.int32, device=x.device)
    counts = torch.bincount(flat[active] - start, minlength=end - start).to(torch.int64)
    return expanded_x, row_idx, counts, undefined_like((T * K,), torch.float32, x.device)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None):
    """Single x [M, K], single weight [E, K, N], group_type=0 (M split by group_list) -> [y [M, N]].

    Two forms: float (no quantisation), and per-token quantised ([gmm] 公式3 y = x @ w * scale * pertokenscale;
    the group_list-Tensor table's per-token row: x int8, weight int8, scale bfloat16/float32, per_token_scale
    float32, output_dtype bfloat16/float16). The docs give scale's shape only as "1维" per tensor; for one
    weight tensor of E groups it is [E, N] here, as antiquant_scale's documented single-tensor shape [g, n]
    and vllm-ascend's W8A8_DYNAMIC MoE call pass it; per_token_scale is [M].
    """
    op = "npu_grouped_matmul"
    limit(len(x) == 1 and len(weight) == 1 and group_type == 0 and split_item in (2, 3), op,
          "the single-tensor form: x=[x], weight=[w], group_type=0, split_item 2/3")
    quantised = scale is not None or per_token_scale is not None
    extras = (bias, offset, antiquant_scale, antiquant_offset, activation_input,
              activation_quant_scale, activation_quant_offset, tuning_config, x_dtype, weight_dtype,
              scale_dtype, per_token_scale_dtype) + (() if quantised else (output_dtype,))
    limit(all(e is None for e in extras) and act_type == 0, op, "no bias, offsets, antiquant or activation")
    a, w = x[0], weight[0]
    if quantised:
        return _grouped_matmul_per_token(op, a, w, scale, per_token_scale, group_list, group_list_type,
                                         output_dtype)
    require(a.dim() == 2 and w.dim() == 3 and w.shape[1] == a.shape[1], op, "x [M, K] and weight [E, K, N] disagree")
    # [gmm] "内轴限制InnerLimit为65536. x和weight中每一组tensor的最后一维大小都应小于InnerLimit. xi的最后一维指当x不转置时
    # xi的K轴 ... weighti的最后一维指当weight不转置时weighti的N轴或当weight转置时weighti的K轴"
    w_transposed = w.dim() == 3 and w.stride(1) == 1 and w.stride(2) != 1
    w_last = w.shape[1] if w_transposed else w.shape[2]
    require(a.shape[1] < INNER_LIMIT and w_last < INNER_LIMIT, op,
            f"the last dims of x ({a.shape[1]}) and weight ({w_last}) must be below {INNER_LIMIT}")
    require(a.dtype == w.dtype and a.dtype in (torch.float16, torch.bfloat16, torch.float32), op,
            "x and weight must share a float dtype")
    require(a.is_contiguous(), op, "x does not support transposition")
    require(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64
            and group_list.shape == (w.shape[0],), op, "group_list must be int64 [E]")
    require(w.shape[0] <= 1024, op, "at most 1024 groups")
    # [gmm] group_list: "当group_list_type为0时，group_list必须为非负单调非递减数列。当group_list_type为1时，group_list
    # 必须为非负数列，且长度不能为1"; it indexes x's first dim, so it covers at most M rows. Rows past it: undefined.
    require(group_list_type in (0, 1), op, "group_list_type is 0 (cumsum) or 1 (counts)")
    if group_list_type == 0:
        ends = group_list
        require(bool((ends >= 0).all()) and bool((ends[1:] >= ends[:-1]).all()) and int(ends[-1]) <= a.shape[0], op,
                "a cumsum group_list must be non-negative, non-decreasing and end at most at M")
    else:
        require(group_list.numel() > 1, op, "a count group_list must not have length 1")
        require(bool((group_list >= 0).all()) and int(group_list.sum()) <= a.shape[0], op,
                "counts must be non-negative and sum to at most M")
        ends = group_list.cumsum(0)
    out = undefined_like((a.shape[0], w.shape[2]), a.dtype, a.device)
    start = 0
    for g, end in enumerate(ends.tolist()):
        out[start:end] = a[start:end] @ w[g]
        start = end
    return [out]


def _group_ends(op, group_list, group_list_type, E, M):
    require(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64
            and group_list.shape == (E,), op, "group_list must be int64 [E]")
    require(group_list_type in (0, 1), op, "group_list_type is 0 (cumsum) or 1 (counts)")
    if group_list_type == 0:
        ends = group_list
        require(bool((ends >= 0).all()) and bool((ends[1:] >= ends[:-1]).all()) and int(ends[-1]) <= M, op,
                "a cumsum group_list must be non-negative, non-decreasing and end at most at M")
        return ends
    require(group_list.numel() > 1, op, "a count group_list must not have length 1")
    require(bool((group_list >= 0).all()) and int(group_list.sum()) <= M, op,
            "counts must be non-negative and sum to at most M")
    return group_list.cumsum(0)


def _grouped_matmul_per_token(op, a, w, scale, per_token_scale, group_list, group_list_type, output_dtype):
    require(a.dtype == torch.int8 and w.dtype == torch.int8, op, "per-token quantisation: x and weight int8")
    require(a.dim() == 2 and w.dim() == 3 and w.shape[1] == a.shape[1], op, "x [M, K] and weight [E, K, N] disagree")
    E, N, M = w.shape[0], w.shape[2], a.shape[0]
    require(scale is not None and len(scale) == 1 and scale[0].shape == (E, N)
            and scale[0].dtype in (torch.float32, torch.bfloat16), op, f"scale must be [tensor [E={E}, N={N}] "
            "float32 / bfloat16]")
    require(per_token_scale is not None and len(per_token_scale) == 1 and per_token_scale[0].shape == (M,)
            and per_token_scale[0].dtype == torch.float32, op, f"per_token_scale must be [tensor float32 [M={M}]]")
    require(output_dtype in (torch.bfloat16, torch.float16), op, "per-token quantisation: output_dtype is "
            "bfloat16 or float16")
    require(a.shape[1] < INNER_LIMIT and N < INNER_LIMIT, op, f"the last dims must be below {INNER_LIMIT}")
    require(E <= 1024, op, "at most 1024 groups")
    ends = _group_ends(op, group_list, group_list_type, E, M)
    out = undefined_like((M, N), output_dtype, a.device)
    start, pts = 0, per_token_scale[0]
    for g, end in enumerate(ends.tolist()):
        acc = a[start:end].to(torch.int64) @ w[g].to(torch.int64)
        out[start:end] = (acc.float() * scale[0][g].float()[None, :] * pts[start:end, None]).to(output_dtype)
        start = end
    return [out]


def npu_swiglu(self, dim=-1):
    """silu(A) * B with A, B the halves of `self` along dim (A first)."""
    require(self.shape[dim] % 2 == 0, "npu_swiglu", f"dim {dim} has odd size {self.shape[dim]}")
    a, b = self.chunk(2, dim=dim)
    return (F.silu(a.float()) * b.float()).to(self.dtype)


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """out[t] = sum_j probs[t, j] * permuted_tokens[sorted_indices[t * K + j]] -> [T, H] permuted dtype."""
    op = "npu_moe_token_unpermute"
    # [unperm] sorted_indices: "数据类型支持int32 ... 取值范围是[0, tokens_num * topK_num - 1]，且没有重复索引";
    # "topK_num要求小于等于512"; padded_mode / restore_shape: "当前仅支持False" / "当前仅支持None"
    require(permuted_tokens.dim() == 2 and sorted_indices.dim() == 1, op,
            "permuted_tokens must be 2-D and sorted_indices 1-D")
    require(sorted_indices.dtype == torch.int32, op, "sorted_indices must be int32")
    require(not padded_mode and restore_shape is None, op, "padded_mode only supports False, restore_shape None")
    K = 1 if probs is None else probs.shape[1]
    require(K <= 512, op, "topK must be <= 512")
    n = sorted_indices.numel()
    require(probs is None or (probs.dim() == 2 and probs.numel() == n), op, "probs must be [T, K] with T*K = len(sorted_indices)")
    require(permuted_tokens.shape[0] == n, op, "permuted_tokens must have T*K rows")
    idx = sorted_indices.long()
    require(bool(((idx >= 0) & (idx < n)).all()) and idx.unique().numel() == n, op,
            "sorted_indices must be a permutation of [0, T*K)")
    rows = permuted_tokens[idx].float().view(n // K, K, -1)
    if probs is not None:
        rows = rows * probs.float()[..., None]
    return rows.sum(1).to(permuted_tokens.dtype)
