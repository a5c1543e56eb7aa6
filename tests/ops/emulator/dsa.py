"""Emulated DSA kernels: npu_lightning_indexer, npu_sparse_flash_attention, the paged cache writes.

Signatures are the torch-npu 2.13 schema (tests/ops/test_npu_contract.py checks them). Shapes and
dtypes follow the meta kernels; the math is the reference (ops/dsa/reference.py). Layouts other than
the ones the npu backend uses (TND queries, PA_BSND caches, ND cache writes) raise EmulatorLimit.
"""
from __future__ import annotations

import torch

from glm5_ascend.ops.dsa import reference

from .common import HALF_OR_FP32, MAX_INT64, limit, require

_SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}


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
    limit(sparse_mode == 3 and pre_tokens == MAX_INT64 and next_tokens == MAX_INT64 and not return_value,
          op, "only sparse_mode=3 with default pre/next tokens and return_value=False")
    require(query.dim() == 3 and key.dim() == 4 and weights.dim() == 2, op,
            "TND query is [T, N1, D], PA_BSND key [blocks, block_size, N2, D], weights [T, N1]")
    T, N1, D = query.shape
    nb, bs, N2, Dk = key.shape
    require(Dk == D and weights.shape == (T, N1), op, "query, key and weights shapes disagree")
    limit(N2 == 1, op, "one key head (N2=1)")
    for name, t in (("query", query), ("key", key), ("weights", weights)):
        require(t.dtype in HALF_OR_FP32 and t.is_contiguous(), op, f"{name} must be contiguous bf16/fp16")
    require(key.dtype == query.dtype, op, "key dtype must equal query dtype")
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
    require(query.numel() > 0 and key.numel() > 0 and sparse_indices.numel() > 0, op, "empty input")
    limit(layout_query == "TND" and layout_kv == "PA_BSND", op, "only layout_query=TND, layout_kv=PA_BSND")
    limit(sparse_mode == 3 and sparse_block_size == 1 and attention_mode == 0 and sinks is None
          and pre_tokens == MAX_INT64 and next_tokens == MAX_INT64, op,
          "only sparse_mode=3, sparse_block_size=1, attention_mode=0, no sinks")
    limit(value is not None and value.shape == key.shape and value.data_ptr() == key.data_ptr(), op,
          "value must be the key tensor (MLA absorbed form)")
    limit(query_rope is not None and key_rope is not None, op, "query_rope and key_rope (MLA)")
    require(query.dim() == 3 and key.dim() == 4, op, "TND query [T, N1, D], PA_BSND key [blocks, block_size, N2, D]")
    T, N1, D = query.shape
    nb, bs, N2, Dk = key.shape
    limit(N2 == 1, op, "one kv head (N2=1)")
    Dr = query_rope.shape[-1]
    require(Dk == D and query_rope.shape == (T, N1, Dr) and key_rope.shape == (nb, bs, 1, Dr), op,
            "query/key/query_rope/key_rope shapes disagree")
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
    out, lse = reference.sparse_mla_attention(query, query_rope, lat, rope, block_table, cu, seq_lens, idx,
                                              scale_value, return_lse=True)
    if not return_softmax_lse:
        empty = torch.empty(0, dtype=torch.float32, device=query.device)
        return out, empty, empty.clone()
    # The kernel's online-softmax state: the row max m and sum(exp(s - m)); lse = m + log(sum).
    m = _row_max(query, query_rope, lat, rope, block_table, cu, idx, scale_value)
    return out, m.view(1, T, N1), torch.exp(lse - m).view(1, T, N1)


def _row_max(q, q_rope, lat, rope, block_tables, cu, idx, scale):
    """max over each query's selected tokens of the scaled score, float32 [T, H]."""
    lens = (cu[1:] - cu[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lens)), lens)
    slots = reference._gather_slots(block_tables, seq[:, None], idx.clamp(min=0).long(), lat.shape[1])
    s = (torch.einsum("thr,tkr->thk", q.float(), lat.view(-1, lat.shape[-1])[slots].float())
         + torch.einsum("thd,tkd->thk", q_rope.float(), rope.view(-1, rope.shape[-1])[slots].float())) * scale
    return s.masked_fill(~(idx >= 0)[:, None, :], float("-inf")).amax(-1)


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
