"""Emulated DSA kernels: npu_lightning_indexer, npu_sparse_flash_attention, the paged cache writes.

Signatures are the torch-npu 2.13 schema (tests/ops/test_npu_contract.py checks them). Shapes and
dtypes follow the meta kernels; the math is the reference (ops/dsa/reference.py). Layouts other than
the ones the npu backend uses (TND queries, PA_BSND caches, ND cache writes) raise EmulatorLimit.

The documented limits, the same on Atlas A2 and A3, each checked with the doc line it comes from:
  [li]  Ascend/op-plugin docs/context/torch_npu-npu_lightning_indexer.md, and the CANN ops-transformer
        LightningIndexer README where it is more precise (per-device head counts)
  [sfa] Ascend/op-plugin docs/context/torch_npu-npu_sparse_flash_attention.md
  [whl] torch-npu 2.13.0's torch_npu/_op_plugin_docs.py
"""
from __future__ import annotations

import torch

from glm5_ascend.ops.dsa import reference

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


def _paged_block(op: str, block_size: int) -> None:
    """[li] / [sfa] PA_BSND key: "block_size取值为16的倍数，最大支持1024"."""
    require(block_size % 16 == 0 and 0 < block_size <= 1024, op,
            f"PA_BSND block_size must be a multiple of 16 up to 1024, got {block_size}")


def _tnd_batch(op, T, actual_seq_lengths_query, actual_seq_lengths_key, block_table, block_size):
    """Validate TND prefix sums + paged kv lengths; return (cu_seqlens_q [B+1], seq_lens [B])."""
    require(actual_seq_lengths_query is not None, op, "actual_seq_lengths_query is required for layout TND")
    asq, ask = actual_seq_lengths_query, actual_seq_lengths_key
    require(asq.dim() == 1 and asq.dtype == torch.int32, op, "actual_seq_lengths_query must be 1-D int32")
    require(ask is not None and ask.shape == asq.shape and ask.dtype == torch.int32, op,
            "actual_seq_lengths_key/kv must be int32 [B] with B = len(actual_seq_lengths_query)")
    cu = torch.cat([asq.new_zeros(1), asq]).long()
    require(bool((cu[1:] >= cu[:-1]).all()) and int(cu[-1]) == T, op,
            f"actual_seq_lengths_query must be a non-decreasing prefix sum ending at T={T}")
    q_lens = cu[1:] - cu[:-1]
    require(bool((ask.long() >= q_lens).all()), op, "a sequence has more queries than keys")
    require(block_table is not None and block_table.dim() == 2 and block_table.shape[0] == asq.shape[0]
            and block_table.dtype == torch.int32, op, "block_table must be int32 [B, max_blocks] for PA_BSND")
    need = (int(ask.max()) + block_size - 1) // block_size if ask.numel() else 0
    require(block_table.shape[1] >= need, op, f"block_table has {block_table.shape[1]} columns, needs {need}")
    return cu.to(torch.int32), ask


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048,
                          sparse_mode=3, pre_tokens=MAX_INT64, next_tokens=MAX_INT64, return_value=False):
    """-> (sparse_indices int32 [T, N2, sparse_count], values [0]); -1 pads rows past the context."""
    op = "npu_lightning_indexer"
    require(query.numel() > 0 and key.numel() > 0, op, "query and key must not be empty")
    require(sparse_count in _SPARSE_COUNTS, op, f"sparse_count={sparse_count} is not supported")
    limit(layout_query == "TND" and layout_key == "PA_BSND", op, "only layout_query=TND, layout_key=PA_BSND")
    # [li] pre_tokens / next_tokens: "仅支持默认值2^63-1"; return_value: "仅在训练且layout_kv不为PA_BSND场景支持"
    require(pre_tokens == MAX_INT64 and next_tokens == MAX_INT64, op, "pre_tokens / next_tokens take only 2^63-1")
    require(not return_value, op, "return_value is supported only in training and not with layout_key=PA_BSND")
    require(sparse_mode in (0, 3), op, "sparse_mode is 0 or 3")
    limit(sparse_mode == 3, op, "only sparse_mode=3")
    require(query.dim() == 3 and key.dim() == 4 and weights.dim() == 2, op,
            "TND query is [T, N1, D], PA_BSND key [blocks, block_size, N2, D], weights [T, N1]")
    T, N1, D = query.shape
    nb, bs, N2, Dk = key.shape
    require(Dk == D and weights.shape == (T, N1), op, "query, key and weights shapes disagree")
    require(D == INDEX_DIM, op, f"query / key D must be {INDEX_DIM}, got {D}")
    require(N1 <= INDEX_MAX_HEADS, op, f"query heads N1 must be <= {INDEX_MAX_HEADS}, got {N1}")
    require(N2 == 1, op, "key heads N2 must be 1 ('N2仅支持1')")
    _paged_block(op, bs)
    # [li] query / key / weights: "不支持非连续 ... 数据类型支持bfloat16和float16"; "参数query、key、weights的数据类型应保持一致"
    for name, t in (("query", query), ("key", key), ("weights", weights)):
        require(t.dtype in HALF_OR_FP32 and t.is_contiguous(), op, f"{name} must be contiguous bf16/fp16")
    require(key.dtype == query.dtype and weights.dtype == query.dtype, op,
            "query, key and weights must share a dtype (weights in the query's dtype)")
    cu, seq_lens = _tnd_batch(op, T, actual_seq_lengths_query, actual_seq_lengths_key, block_table, bs)
    idx = reference.lightning_indexer(query, weights.float(), key.view(nb, bs, D), block_table, cu, seq_lens,
                                      sparse_count, 1.0)
    return idx.view(T, 1, sparse_count), torch.empty(0, dtype=query.dtype, device=query.device)


def _causal_valid(op, sparse_indices, cu, seq_lens):
    """Valid entries per row; checks the kernel's rule that valid entries come first in every row."""
    valid = sparse_indices >= 0
    require(bool((valid[:, 1:] <= valid[:, :-1]).all()), op, "each sparse_indices row must keep its -1 padding at the end")
    q_lens = (cu[1:] - cu[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens)
    first = torch.repeat_interleave(cu[:-1].long(), q_lens)
    pos = seq_lens.long()[seq] - q_lens[seq] + (torch.arange(len(seq)) - first)
    return valid & (sparse_indices.long() <= pos[:, None])  # sparse_mode=3: right-down causal


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                               sparse_mode=3, pre_tokens=MAX_INT64, next_tokens=MAX_INT64, attention_mode=0,
                               return_softmax_lse=False, sinks=None):
    """-> (out [T, N1, D] query dtype, softmax_max, softmax_sum float32 [N2, T, N1] or [0])."""
    op = "npu_sparse_flash_attention"
    require(query.numel() > 0 and key.numel() > 0 and sparse_indices.numel() > 0, op,
            "empty input (sparse_size must be > 0: '需要满足sparse_size大于0')")
    limit(layout_query == "TND" and layout_kv == "PA_BSND", op, "only layout_query=TND, layout_kv=PA_BSND")
    require(attention_mode == MLA_ABSORB, op,
            f"attention_mode takes only 2 (MLA-absorb: rope parts joined to the nope parts), got {attention_mode}")
    require(query_rope is not None and key_rope is not None, op, "MLA-absorb needs query_rope and key_rope")
    require(not return_softmax_lse or layout_kv != "PA_BSND", op,
            "return_softmax_lse is supported only in training and not with layout_kv=PA_BSND")
    require(pre_tokens == MAX_INT64 and next_tokens == MAX_INT64, op, "pre_tokens / next_tokens take only 2^63-1")
    # [sfa] sparse_block_size: "取值范围为[1,128]，且为2的幂次方"; "支持sparse_block_size整除block_size"
    require(1 <= sparse_block_size <= 128 and sparse_block_size & (sparse_block_size - 1) == 0, op,
            "sparse_block_size must be a power of two in [1, 128]")
    limit(sparse_mode == 3 and sparse_block_size == 1 and sinks is None, op,
          "only sparse_mode=3, sparse_block_size=1, no sinks")
    # [sfa] value: "shape与key的shape一致"; attention_mode 2: "key和value共享同一份底层张量数据"
    require(value is not None and value.shape == key.shape and value.data_ptr() == key.data_ptr(), op,
            "MLA-absorb: value must share key's data")
    require(query.dim() == 3 and key.dim() == 4, op, "TND query [T, N1, D], PA_BSND key [blocks, block_size, N2, D]")
    T, N1, D = query.shape
    nb, bs, N2, Dk = key.shape
    require(N2 == 1, op, "KV_N must be 1 ('KV_N只支持1')")
    require(D == SFA_DIM and Dk == SFA_DIM, op, f"query / key / value D must be {SFA_DIM}, got {D} and {Dk}")
    require(N1 in SFA_HEADS, op, f"query heads N1 must be one of 1/2/4/8/16/32/64/128, got {N1}")
    _paged_block(op, bs)
    require(bs % sparse_block_size == 0, op, "sparse_block_size must divide block_size")
    Dr = query_rope.shape[-1]
    require(Dr == SFA_ROPE_DIM and query_rope.shape == (T, N1, Dr) and key_rope.shape == (nb, bs, 1, Dr), op,
            f"query_rope [T, N1, {SFA_ROPE_DIM}] / key_rope [blocks, block_size, 1, {SFA_ROPE_DIM}] disagree")
    require(sparse_indices.dim() == 3 and sparse_indices.shape[:2] == (T, N2) and sparse_indices.dtype == torch.int32,
            op, "TND sparse_indices must be int32 [T, N2, sparse_size]")
    for name, t in (("query", query), ("key", key), ("query_rope", query_rope), ("key_rope", key_rope),
                    ("sparse_indices", sparse_indices)):
        require(t.is_contiguous(), op, f"{name} must be contiguous")
    for t in (query, key, query_rope, key_rope):
        require(t.dtype == query.dtype and t.dtype in HALF_OR_FP32, op, "query/key/rope dtypes must match (bf16/fp16)")
    cu, seq_lens = _tnd_batch(op, T, actual_seq_lengths_query, actual_seq_lengths_kv, block_table, bs)
    idx = sparse_indices.view(T, -1)
    idx = torch.where(_causal_valid(op, idx, cu, seq_lens), idx, -1)
    lat, rope = key.view(nb, bs, D), key_rope.view(nb, bs, Dr)
    out = reference.sparse_mla_attention(query, query_rope, lat, rope, block_table, cu, seq_lens, idx, scale_value)
    empty = torch.empty(0, dtype=torch.float32, device=query.device)
    return out, empty, empty.clone()


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
