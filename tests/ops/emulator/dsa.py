"""Emulated DSA kernels: npu_lightning_indexer, npu_sparse_flash_attention, the paged cache writes.

Signatures are the torch-npu 2.13 schema (tests/ops/test_npu_contract.py checks them). Shapes and
dtypes follow the meta kernels. The math is written here from the op documentation, never borrowed
from the project's reference ops (ops/dsa/reference.py): a test of "npu backend == reference" is
only a test if the emulated kernel can disagree with the reference.

  indexer:  score[i, j] = sum_g W[i, g] * ReLU(Q[i, g] . K[j])  (no scale: [li] formula), over the
            keys j the mask allows; the sparse_count highest, best first, -1 after the last one.
  attention (attention_mode=2, MLA-absorb): for the tokens the valid prefix of a sparse_indices row
            names (each index a block of sparse_block_size tokens, cut at the sequence's length),
            x = scale_value * (Q . K + Q_rope . K_rope), out = sum softmax(x) V with V = K;
            softmax_max = max x and softmax_sum = sum exp(x - max) per (N2, token, head group).
  sparse_mode 0: every key of the sequence; 3 (rightDownCausal): query i of a sequence with S1
            queries and S2 keys sees keys j <= S2 - S1 + i.
  layouts:  queries TND ([T, N, D], actual_seq_lengths_query the prefix sums) or BSND ([B, S1, N, D],
            lengths per batch); keys PA_BSND ([blocks, block_size, N2, D] through block_table),
            BSND ([B, S2, N2, D]) or TND ([T2, N2, D], actual_seq_lengths_key/kv the prefix sums).

The documented limits, the same on Atlas A2 and A3, each checked with the doc line it comes from:
  [li]  Ascend/op-plugin docs/context/torch_npu-npu_lightning_indexer.md, and the CANN ops-transformer
        LightningIndexer README where it is more precise (per-device head counts)
  [sfa] Ascend/op-plugin docs/context/torch_npu-npu_sparse_flash_attention.md
  [whl] torch-npu 2.13.0's torch_npu/_op_plugin_docs.py and its meta kernels (output shapes)
"""
from __future__ import annotations

import torch

from .common import HALF_OR_FP32, MAX_INT64, limit, require

# [whl] npu_lightning_indexer sparse_count: "支持1-2048以及3072、4096、5120、6144、7168、8192" ([li] says [1, 2048])
_SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}
# [li] "参数query中的D和参数key中的D值相等为128"
INDEX_DIM = 128
# [li] README: "A3 训练系列产品/Atlas A3 推理系列产品: query N1支持小于等于64" ([li] torch_npu page: "N1仅支持64")
INDEX_MAX_HEADS = 64
# [sfa] "参数query中的D和key、value的D值相等为512，参数query_rope中的D和key_rope的D值相等为64"
SFA_DIM, SFA_ROPE_DIM = 512, 64
# [sfa] query: "N1支持1/2/4/8/16/32/64/128"
SFA_HEADS = {1, 2, 4, 8, 16, 32, 64, 128}
# [sfa] attention_mode: "仅支持传入2，表示MLA-absorb模式"
MLA_ABSORB = 2
QUERY_LAYOUTS, KEY_LAYOUTS = ("TND", "BSND"), ("PA_BSND", "BSND", "TND")


def _paged_block(op: str, block_size: int) -> None:
    """[li] / [sfa] PA_BSND key: "block_size取值为16的倍数，最大支持1024"."""
    require(block_size % 16 == 0 and 0 < block_size <= 1024, op,
            f"PA_BSND block_size must be a multiple of 16 up to 1024, got {block_size}")


def _int32_vector(op, name, t, B=None):
    require(t is not None and t.dim() == 1 and t.dtype == torch.int32, op, f"{name} must be 1-D int32")
    require(B is None or t.shape[0] == B, op, f"{name} must have one entry per batch ({B})")
    return [int(x) for x in t.tolist()]


def _query_runs(op, layout, T_or_B, S1, actual_seq_lengths_query):
    """(batch count, [(first flat row, number of queries)]) of a TND / BSND query."""
    if layout == "TND":
        require(actual_seq_lengths_query is not None, op, "actual_seq_lengths_query is required for layout TND")
        ends = _int32_vector(op, "actual_seq_lengths_query", actual_seq_lengths_query)
        starts = [0] + ends[:-1]
        require(all(e >= s for s, e in zip(starts, ends)) and (not ends or ends[-1] == T_or_B), op,
                f"actual_seq_lengths_query must be a non-decreasing prefix sum ending at T={T_or_B}")
        return len(ends), [(s, e - s) for s, e in zip(starts, ends)]
    lens = [S1] * T_or_B if actual_seq_lengths_query is None else _int32_vector(
        op, "actual_seq_lengths_query", actual_seq_lengths_query, T_or_B)
    require(all(0 <= n <= S1 for n in lens), op, "actual_seq_lengths_query must lie in [0, S1]")
    return T_or_B, [(b * S1, n) for b, n in enumerate(lens)]


def _key_rows(op, layout, key, B, actual_seq_lengths_key, block_table, name="actual_seq_lengths_key"):
    """Per batch, the flat row numbers (into key viewed as [rows, N2, D]) of its keys, in order."""
    if layout == "PA_BSND":
        nb, bs = key.shape[:2]
        _paged_block(op, bs)
        lens = _int32_vector(op, f"{name}/kv", actual_seq_lengths_key, B) if actual_seq_lengths_key is not None \
            else None
        require(lens is not None, op, f"{name} is required for PA_BSND")
        require(block_table is not None and block_table.dim() == 2 and block_table.shape[0] == B
                and block_table.dtype == torch.int32, op, "block_table must be int32 [B, max_blocks] for PA_BSND")
        need = max([(n + bs - 1) // bs for n in lens], default=0)
        require(block_table.shape[1] >= need, op, f"block_table has {block_table.shape[1]} columns, needs {need}")
        rows = []
        for b, n in enumerate(lens):
            pos = torch.arange(n)
            rows.append(block_table[b].long().cpu()[pos // bs] * bs + pos % bs)
        return rows
    if layout == "TND":
        ends = _int32_vector(op, name, actual_seq_lengths_key, B)
        starts = [0] + ends[:-1]
        require(all(e >= s for s, e in zip(starts, ends)) and (not ends or ends[-1] <= key.shape[0]), op,
                f"{name} must be a non-decreasing prefix sum within T2 for layout TND")
        return [torch.arange(s, e) for s, e in zip(starts, ends)]
    S2 = key.shape[1]
    lens = [S2] * B if actual_seq_lengths_key is None else _int32_vector(op, name, actual_seq_lengths_key, B)
    require(all(0 <= n <= S2 for n in lens), op, f"{name} must lie in [0, S2]")
    return [b * S2 + torch.arange(n) for b, n in enumerate(lens)]


def _allowed(n_q: int, n_k: int, sparse_mode: int) -> torch.Tensor:
    """bool [n_q, n_k]: which keys each query of one sequence may see."""
    if sparse_mode == 0:
        return torch.ones(n_q, n_k, dtype=torch.bool)
    # rightDownCausal: the mask's diagonal ends at the bottom-right corner
    return torch.arange(n_k)[None, :] <= (n_k - n_q + torch.arange(n_q))[:, None]


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048,
                          sparse_mode=3, pre_tokens=MAX_INT64, next_tokens=MAX_INT64, return_value=False):
    """-> (sparse_indices int32 [T, N2, sparse_count] (TND) / [B, S1, N2, sparse_count] (BSND),
    values in the query's dtype, same shape, or [0]); best first, -1 past the keys the mask allows."""
    op = "npu_lightning_indexer"
    require(query.numel() > 0 and key.numel() > 0, op, "query and key must not be empty")
    require(sparse_count in _SPARSE_COUNTS, op, f"sparse_count={sparse_count} is not supported")
    require(layout_query in QUERY_LAYOUTS and layout_key in KEY_LAYOUTS, op,
            f"layout_query is TND or BSND, layout_key PA_BSND, BSND or TND; got {layout_query}, {layout_key}")
    # [li] "在非PageAttention场景下，该参数值应与layout_query值保持一致"
    require(layout_key in ("PA_BSND", layout_query), op, "without PageAttention layout_key must equal layout_query")
    # [li] pre_tokens / next_tokens: "仅支持默认值2^63-1"; return_value: "仅在训练且layout_kv不为PA_BSND场景支持"
    require(pre_tokens == MAX_INT64 and next_tokens == MAX_INT64, op, "pre_tokens / next_tokens take only 2^63-1")
    require(not return_value or layout_key != "PA_BSND", op,
            "return_value is supported only in training and not with layout_key=PA_BSND")
    require(sparse_mode in (0, 3), op, "sparse_mode is 0 or 3")
    q_dims = 3 if layout_query == "TND" else 4
    k_dims = 3 if layout_key == "TND" else 4
    require(query.dim() == q_dims and key.dim() == k_dims and weights.dim() == q_dims - 1, op,
            f"{layout_query} query is [T, N1, D] / [B, S1, N1, D] with weights without D; {layout_key} key "
            "[blocks, block_size, N2, D] / [B, S2, N2, D] / [T2, N2, D]")
    N1, D = query.shape[-2:]
    N2, Dk = key.shape[-2:]
    require(Dk == D and weights.shape == query.shape[:-1], op, "query, key and weights shapes disagree")
    require(D == INDEX_DIM, op, f"query / key D must be {INDEX_DIM}, got {D}")
    require(N1 <= INDEX_MAX_HEADS, op, f"query heads N1 must be <= {INDEX_MAX_HEADS}, got {N1}")
    require(N2 == 1, op, "key heads N2 must be 1 ('N2仅支持1')")
    # [li] query / key / weights: "不支持非连续 ... 数据类型支持bfloat16和float16"; "参数query、key、weights的数据类型应保持一致"
    for name, t in (("query", query), ("key", key), ("weights", weights)):
        require(t.dtype in HALF_OR_FP32 and t.is_contiguous(), op, f"{name} must be contiguous bf16/fp16")
    require(key.dtype == query.dtype and weights.dtype == query.dtype, op,
            "query, key and weights must share a dtype (weights in the query's dtype)")
    S1 = query.shape[1] if layout_query == "BSND" else 0
    B, runs = _query_runs(op, layout_query, query.shape[0], S1, actual_seq_lengths_query)
    key_rows = _key_rows(op, layout_key, key, B, actual_seq_lengths_key, block_table)
    q = query.reshape(-1, N1, D).float().cpu()
    w = weights.reshape(-1, N1).float().cpu()
    k = key.reshape(-1, D).float().cpu()
    n_rows = q.shape[0]
    indices = torch.full((n_rows, sparse_count), -1, dtype=torch.int32)
    values = torch.zeros(n_rows, sparse_count)
    for (first, n_q), rows in zip(runs, key_rows):
        if n_q == 0:
            continue
        n_k = len(rows)
        require(sparse_mode == 0 or n_k >= n_q, op, "a sequence has more queries than keys")
        dots = torch.einsum("igd,jd->igj", q[first:first + n_q], k[rows])  # [n_q, N1, n_k]
        score = (w[first:first + n_q, :, None] * dots.clamp(min=0)).sum(1)  # [n_q, n_k]
        allowed = _allowed(n_q, n_k, sparse_mode)
        for i in range(n_q):
            keys = allowed[i].nonzero().flatten()
            # best first; equal scores: the earlier position first
            order = sorted(keys.tolist(), key=lambda j: (-float(score[i, j]), j))[:sparse_count]
            indices[first + i, :len(order)] = torch.tensor(order, dtype=torch.int32)
            values[first + i, :len(order)] = score[i, order]
    shape = (query.shape[0], 1, sparse_count) if layout_query == "TND" else (*query.shape[:2], 1, sparse_count)
    vals = values.to(query.dtype).view(shape).to(query.device) if return_value else \
        torch.empty(0, dtype=query.dtype, device=query.device)
    return indices.view(shape).to(query.device), vals


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                               sparse_mode=3, pre_tokens=MAX_INT64, next_tokens=MAX_INT64, attention_mode=0,
                               return_softmax_lse=False, sinks=None):
    """-> (out like query, softmax_max, softmax_sum float32 [N2, T, N1/N2] (TND) / [B, N2, S1, N1/N2]
    (BSND), or [0] without return_softmax_lse)."""
    op = "npu_sparse_flash_attention"
    require(query.numel() > 0 and key.numel() > 0 and sparse_indices.numel() > 0, op,
            "empty input (sparse_size must be > 0: '需要满足sparse_size大于0')")
    require(layout_query in QUERY_LAYOUTS and layout_kv in KEY_LAYOUTS, op,
            f"layout_query is TND or BSND, layout_kv PA_BSND, BSND or TND; got {layout_query}, {layout_kv}")
    require(attention_mode == MLA_ABSORB, op,
            f"attention_mode takes only 2 (MLA-absorb: rope parts joined to the nope parts), got {attention_mode}")
    require(query_rope is not None and key_rope is not None, op, "MLA-absorb needs query_rope and key_rope")
    require(not return_softmax_lse or layout_kv != "PA_BSND", op,
            "return_softmax_lse is supported only in training and not with layout_kv=PA_BSND")
    require(pre_tokens == MAX_INT64 and next_tokens == MAX_INT64, op, "pre_tokens / next_tokens take only 2^63-1")
    require(sparse_mode in (0, 3), op, "sparse_mode is 0 or 3")
    # [sfa] sparse_block_size: "取值范围为[1,128]，且为2的幂次方"; "支持sparse_block_size整除block_size"
    require(1 <= sparse_block_size <= 128 and sparse_block_size & (sparse_block_size - 1) == 0, op,
            "sparse_block_size must be a power of two in [1, 128]")
    limit(sinks is None, op, "no sinks")
    # [sfa] value: "shape与key的shape一致"; attention_mode 2: "key和value共享同一份底层张量数据"
    require(value is not None and value.shape == key.shape and value.data_ptr() == key.data_ptr(), op,
            "MLA-absorb: value must share key's data")
    q_dims = 3 if layout_query == "TND" else 4
    k_dims = 3 if layout_kv == "TND" else 4
    require(query.dim() == q_dims and key.dim() == k_dims, op,
            f"{layout_query} query [T, N1, D] / [B, S1, N1, D], {layout_kv} key [blocks, block_size, N2, D] / "
            "[B, S2, N2, D] / [T2, N2, D]")
    N1, D = query.shape[-2:]
    N2, Dk = key.shape[-2:]
    require(N2 == 1, op, "KV_N must be 1 ('KV_N只支持1')")
    require(D == SFA_DIM and Dk == SFA_DIM, op, f"query / key / value D must be {SFA_DIM}, got {D} and {Dk}")
    require(N1 in SFA_HEADS, op, f"query heads N1 must be one of 1/2/4/8/16/32/64/128, got {N1}")
    if layout_kv == "PA_BSND":
        _paged_block(op, key.shape[1])
        require(key.shape[1] % sparse_block_size == 0, op, "sparse_block_size must divide block_size")
    Dr = query_rope.shape[-1]
    require(Dr == SFA_ROPE_DIM and query_rope.shape == (*query.shape[:-1], Dr)
            and key_rope.shape == (*key.shape[:-1], Dr), op,
            f"query_rope [..., N1, {SFA_ROPE_DIM}] / key_rope [..., 1, {SFA_ROPE_DIM}] disagree with query / key")
    require(sparse_indices.dim() == q_dims and sparse_indices.shape[:-1] == (*query.shape[:-2], N2)
            and sparse_indices.dtype == torch.int32, op,
            "sparse_indices must be int32 [T, N2, sparse_size] (TND) / [B, S1, N2, sparse_size] (BSND)")
    for name, t in (("query", query), ("key", key), ("query_rope", query_rope), ("key_rope", key_rope),
                    ("sparse_indices", sparse_indices)):
        require(t.is_contiguous(), op, f"{name} must be contiguous")
    for t in (query, key, query_rope, key_rope):
        require(t.dtype == query.dtype and t.dtype in HALF_OR_FP32, op, "query/key/rope dtypes must match (bf16/fp16)")
    S1 = query.shape[1] if layout_query == "BSND" else 0
    B, runs = _query_runs(op, layout_query, query.shape[0], S1, actual_seq_lengths_query)
    key_rows = _key_rows(op, layout_kv, key, B, actual_seq_lengths_kv, block_table, "actual_seq_lengths_kv")
    K = sparse_indices.shape[-1]
    idx = sparse_indices.reshape(-1, K).long().cpu()
    valid = idx >= 0
    # [sfa] sparse_indices: "需要保证每行有效值均在前半部分，无效值均在后半部分"
    require(bool((valid[:, 1:] <= valid[:, :-1]).all()), op, "each sparse_indices row must keep its -1 padding at the end")
    q = query.reshape(-1, N1, D).float().cpu()
    qr = query_rope.reshape(-1, N1, Dr).float().cpu()
    kv = key.reshape(-1, D).float().cpu()
    kr = key_rope.reshape(-1, Dr).float().cpu()
    n_rows = q.shape[0]
    out = torch.zeros(n_rows, N1, D)
    row_max = torch.full((n_rows, N1), float("-inf"))
    row_sum = torch.zeros(n_rows, N1)
    for (first, n_q), rows in zip(runs, key_rows):
        n_k = len(rows)
        allowed = _allowed(n_q, n_k, sparse_mode) if n_q else None
        for i in range(n_q):
            r = first + i
            picked = idx[r, :int(valid[r].sum())]  # the valid prefix of the row
            tokens = (picked[:, None] * sparse_block_size + torch.arange(sparse_block_size)[None, :]).flatten()
            tokens = tokens[tokens < n_k]
            tokens = tokens[allowed[i, tokens]]
            if tokens.numel() == 0:
                continue
            slots = rows[tokens]
            x = scale_value * (q[r] @ kv[slots].T + qr[r] @ kr[slots].T)  # [N1, n]
            m = x.max(dim=-1).values
            e = torch.exp(x - m[:, None])
            row_max[r], row_sum[r] = m, e.sum(-1)
            out[r] = (e @ kv[slots]) / row_sum[r][:, None]
    out = out.view(query.shape).to(query.dtype).to(query.device)
    if not return_softmax_lse:
        empty = torch.empty(0, dtype=torch.float32, device=query.device)
        return out, empty, empty.clone()
    if layout_query == "TND":  # [N2, T, N1 / N2]
        mx, sm = row_max.view(1, n_rows, N1), row_sum.view(1, n_rows, N1)
    else:  # [B, N2, S1, N1 / N2]
        mx, sm = (t.view(query.shape[0], 1, S1, N1) for t in (row_max, row_sum))
    return out, mx.to(query.device), sm.to(query.device)


def npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, *, compress_lens=None,
                            compress_seq_offsets=None, seq_lens=None, cache_mode="PA_NZ"):
    """In-place: key_cache / value_cache [blocks, block_size, N, D] at `slot_mapping` <- key / value [T, N, D]."""
    op = "npu_scatter_pa_kv_cache"
    limit(cache_mode == "Norm" and compress_lens is None and compress_seq_offsets is None and seq_lens is None,
          op, "only ND caches (cache_mode='Norm') without compression (scenario 2)")
    require(key.dim() == 3 and value.dim() == 3 and key.shape[:2] == value.shape[:2], op,
            "key and value must be [T, N, D] with equal T and N")
    require(key_cache.dim() == 4 and value_cache.dim() == 4 and key_cache.shape[2:] == key.shape[1:]
            and value_cache.shape[2:] == value.shape[1:] and key_cache.shape[:2] == value_cache.shape[:2], op,
            "caches must be [blocks, block_size, N, D] matching key / value")
    require(key.dtype == value.dtype == key_cache.dtype == value_cache.dtype, op, "all dtypes must be equal")
    require(all(t.is_contiguous() for t in (key, value, key_cache, value_cache, slot_mapping)), op,
            "inputs must be contiguous")
    require(slot_mapping.shape == (key.shape[0],) and slot_mapping.dtype in (torch.int32, torch.int64), op,
            "slot_mapping must be int32/int64 [T]")
    n_slots = key_cache.shape[0] * key_cache.shape[1]
    slots = slot_mapping.long()
    require(bool(((slots >= 0) & (slots < n_slots)).all()), op, f"slot_mapping must lie in [0, {n_slots})")
    require(slots.unique().numel() == slots.numel(), op, "slot_mapping must not repeat a slot")
    key_cache.view(n_slots, -1).index_copy_(0, slots, key.reshape(len(slots), -1))
    value_cache.view(n_slots, -1).index_copy_(0, slots, value.reshape(len(slots), -1))


def npu_scatter_nd_update_(self, indices, updates):
    """In-place self[indices[i]] = updates[i] (indices [n, 1]: row updates); returns self."""
    op = "npu_scatter_nd_update_"
    require(indices.dim() == 2 and indices.dtype in (torch.int32, torch.int64), op, "indices must be int [n, depth]")
    limit(indices.shape[1] == 1, op, "row updates only (indices [n, 1])")
    require(updates.shape == (indices.shape[0],) + tuple(self.shape[1:]) and updates.dtype == self.dtype, op,
            "updates must be [n, *self.shape[1:]] in self's dtype")
    rows = indices[:, 0].long()
    require(bool(((rows >= 0) & (rows < self.shape[0])).all()), op, "index out of range")
    self.index_copy_(0, rows, updates)
    return self


def npu_interleave_rope(x, cos, sin):
    """-> y like x. x [B, N, S, 64]; cos / sin [B, 1, S or 1, 64]: de-interleave the last dim
    (reshape to [..., 32, 2], swap the last two axes), then q * cos + RotateHalf(q) * sin."""
    op = "npu_interleave_rope"
    require(x.dim() == 4 and cos.dim() == 4 and sin.shape == cos.shape, op, "x, cos and sin must be 4-D, cos like sin")
    B, N, S, D = x.shape
    require(D == 64 and cos.shape[3] == 64, op, f"the last dim must be 64, got {D} and {cos.shape[3]}")
    require(cos.shape[0] == B and cos.shape[1] == 1 and cos.shape[2] in (1, S), op,
            f"cos must be [B={B}, 1, 1 or S={S}, 64], got {tuple(cos.shape)}")
    require(x.dtype in HALF_OR_FP32 and cos.dtype == sin.dtype == x.dtype, op, "x, cos and sin must share a dtype: bf16, fp16 (or fp32 here)")
    q = x.float().reshape(B, N, S, D // 2, 2).transpose(-1, -2).reshape(B, N, S, D)
    rotated = torch.cat([-q[..., D // 2:], q[..., :D // 2]], dim=-1)
    return (q * cos.float() + rotated * sin.float()).to(x.dtype)
