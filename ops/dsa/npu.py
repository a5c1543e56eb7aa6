"""DeepSeek Sparse Attention ops on Ascend NPU through torch_npu's fused kernels.

Same functions, arguments and results as ops/dsa/reference.py (the spec). Each wrapper reshapes our
flat-token, paged layout into the op's TND (queries) / PA_BSND (paged cache) layout:
  * queries [T, H, D] are TND as they stand; `actual_seq_lengths_query` is the TND prefix sum,
    i.e. cu_seqlens_q[1:], not per-sequence lengths.
  * a paged cache [num_blocks, block_size, D] is PA_BSND [num_blocks, block_size, N=1, D] (one shared
    latent / index-key head), read through `block_table` with `actual_seq_lengths_key(_kv)` = seq_lens.
  * sparse_mode=3 is the bottom-right-aligned causal mask: query i of a sequence with q_len new tokens
    and seq_len context sits at position seq_len - q_len + i, exactly our convention.
Shapes outside an op's documented limits (GLM-5's dims fit; the tiny test model's do not) run the
reference math, as they would have to on a real NPU. No NPU has run this code yet; it is written
against the torch-npu 2.13 signatures and the op documentation, and tested on CPU through the
contract emulator (tests/ops/emulator), which holds those limits.
"""
from __future__ import annotations

import torch
import torch_npu

# The DSA kernels take half precision only. The emulator also accepts float32 on CPU so the fp32
# parity tests exercise these wrappers; on a real NPU an fp32 call fails here with a clear message.
_HALF = (torch.bfloat16, torch.float16)


def _check_dtype(op: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type == "npu" and t.dtype not in _HALF:
            raise TypeError(f"{op} on NPU takes bfloat16/float16, got {t.dtype}; run the model with "
                            f"--dtype bfloat16 or set GLM5_OPS_BACKEND_{op.upper()}=reference")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


# npu_interleave_rope rotates rows of exactly this many dims (GLM-5's and DeepSeek's rope dim).
_ROPE_KERNEL_DIM = 64


def interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM-5's RoPE of x [T, ..., D] with cos / sin [T, D/2], via npu_interleave_rope when D = 64.

    The kernel takes x as [B, N, S, D] and cos / sin as [B, 1, S, D], de-interleaves x (evens, then
    odds) and applies rotate-half RoPE: exactly our layout and math, with the half-width cos / sin
    repeated to the full width. Each token is one B row (S = 1), its heads the N axis. Other widths
    run the reference math (the kernel has no other).
    """
    T, D = x.shape[0], x.shape[-1]
    if D != _ROPE_KERNEL_DIM or T == 0:
        from .reference import interleaved_rope as ref
        return ref(x, cos, sin)
    _check_dtype("interleaved_rope", x)
    c = torch.cat([cos, cos], dim=-1).to(x.dtype).view(T, 1, 1, D)
    s = torch.cat([sin, sin], dim=-1).to(x.dtype).view(T, 1, 1, D)
    y = torch_npu.npu_interleave_rope(x.reshape(T, -1, 1, D).contiguous(), c, s)
    return y.view(x.shape)


def mla_cache_write(latent: torch.Tensor, k_rope: torch.Tensor, index_k: torch.Tensor | None,
                    slot_mapping: torch.Tensor, latent_cache: torch.Tensor, rope_cache: torch.Tensor,
                    index_cache: torch.Tensor | None) -> None:
    """Paged write of latent [T, R], rope key [T, Dr] and index key [T, Di] at `slot_mapping`.

    latent / rope go through npu_scatter_pa_kv_cache (the key/value pair of scenario 2, ND caches:
    cache_mode="Norm") and the index key through npu_scatter_nd_update_. Our inputs are already normed
    and rotated (the model does that), so npu_kv_rmsnorm_rope_cache, which fuses norm + rope + write,
    does not fit this op's contract.

    Both kernels take only in-range, distinct slots ("slot_mapping的值范围[0,num_blocks*block_size-1]，
    且slotMapping内的元素值保证不重复", "indices中的索引数据不支持越界"). So, unlike the reference and cuda
    backends, this one does not skip padding slots (-1): filtering them would need a boolean mask, a
    host sync that aclgraph cannot capture. The engine never sends -1: a padded decode batch writes its
    padding rows to distinct slots of a scratch block past the block manager's (engine/decode_graphs.py).
    """
    T, R = latent.shape
    if T == 0:
        return
    nb, bs = latent_cache.shape[:2]
    torch_npu.npu_scatter_pa_kv_cache(
        latent.to(latent_cache.dtype).unsqueeze(1).contiguous(),
        k_rope.to(rope_cache.dtype).unsqueeze(1).contiguous(),
        latent_cache.view(nb, bs, 1, R), rope_cache.view(nb, bs, 1, rope_cache.shape[-1]),
        slot_mapping.contiguous(), cache_mode="Norm")
    if index_cache is not None and index_k is not None:
        torch_npu.npu_scatter_nd_update_(index_cache.view(-1, index_cache.shape[-1]), slot_mapping.long().view(-1, 1),
                                         index_k.to(index_cache.dtype))


# npu_lightning_indexer limits (op docs, torch_npu-npu_lightning_indexer.md and the CANN LightningIndexer
# README): "参数query中的D和参数key中的D值相等为128"; query heads "A3 ... query N1支持小于等于64" (the torch_npu
# page says "N1仅支持64"); "block_size取值为16的整数倍，最大支持到1024"; "sparse_count ... 支持1-2048以及3072、4096、
# 5120、6144、7168、8192" (torch-npu 2.13's docs).
_INDEX_DIM = 128
_INDEX_MAX_HEADS = 64
_SPARSE_COUNTS = frozenset(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}


def _paged_block_fits(block_size: int) -> bool:
    """PA_BSND block sizes both DSA kernels take: a multiple of 16, at most 1024."""
    return block_size % 16 == 0 and 0 < block_size <= 1024


def lightning_indexer(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor,
                      block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                      topk: int, softmax_scale: float, prompt_lens: torch.Tensor | None = None,
                      tie_flags: torch.Tensor | None = None) -> torch.Tensor:
    """DSA top-k selection via npu_lightning_indexer -> int32 [T, topk] positions, -1 padded at the end.

    q [T, H, D]; weights [T, H] float32; index_cache [num_blocks, block_size, D].
    The op computes sum_h w_h * relu(q_h . k) with no scale argument; relu(s * x) = s * relu(x) for
    s > 0, so softmax_scale is folded into the head weights (cast to q's dtype, as the op wants).
    Shapes outside the op's limits (D != 128, more than 64 heads, a block size that is not a multiple
    of 16 up to 1024, an unsupported topk) run the reference.
    """
    T, H, D = q.shape
    _check(softmax_scale > 0, f"softmax_scale must be > 0 to fold into the weights, got {softmax_scale}")
    nb, bs = index_cache.shape[:2]
    if not (D == _INDEX_DIM and H <= _INDEX_MAX_HEADS and _paged_block_fits(bs) and topk in _SPARSE_COUNTS):
        from .reference import lightning_indexer as ref
        return ref(q, weights, index_cache, block_tables, cu_seqlens_q, seq_lens, topk, softmax_scale,
                   prompt_lens, tie_flags)
    _check_dtype("lightning_indexer", q, index_cache)
    if T == 0:  # the kernel rejects empty queries
        return torch.empty((0, topk), dtype=torch.int32, device=q.device)
    indices, _ = torch_npu.npu_lightning_indexer(
        q.contiguous(), index_cache.view(nb, bs, 1, D), (weights.float() * softmax_scale).to(q.dtype).contiguous(),
        actual_seq_lengths_query=_int32(cu_seqlens_q[1:]), actual_seq_lengths_key=_int32(seq_lens),
        block_table=_int32(block_tables), layout_query="TND", layout_key="PA_BSND",
        sparse_count=topk, sparse_mode=3)
    _check(indices.shape == (T, 1, topk), f"npu_lightning_indexer returned {tuple(indices.shape)}, want [{T}, 1, {topk}]")
    return indices.view(T, topk)


# npu_sparse_flash_attention limits (op docs, torch_npu-npu_sparse_flash_attention.md): "参数query中的D和key、value
# 的D值相等为512，参数query_rope中的D和key_rope的D值相等为64"; query heads "N1支持1/2/4/8/16/32/64/128";
# PA_BSND "block_size取值为16的倍数，最大支持1024"; "sparse_size大于0"; attention_mode "仅支持传入2，表示MLA-absorb
# 模式"; return_softmax_lse "该参数仅在训练且layout_kv不为PA_BSND场景支持".
_MLA_LATENT, _MLA_ROPE = 512, 64
_SFA_HEADS = frozenset(1 << i for i in range(8))
_MLA_ABSORB = 2


def sparse_mla_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor,
                         rope_cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         seq_lens: torch.Tensor, topk_indices: torch.Tensor, softmax_scale: float,
                         return_lse: bool = False):
    """Absorbed sparse MLA via npu_sparse_flash_attention -> out [T, H, R] (+ lse float32 [T, H]).

    The latent cache is both key and value (MLA's absorbed form: attention_mode=2, the only mode the
    op documents, with the rope parts as query_rope / key_rope). topk_indices int32 [T, K] must keep
    its -1 padding at the end of each row, as lightning_indexer returns it: the kernel reads the
    valid prefix of each row. The op returns the softmax state only in training and never with a
    paged (PA_BSND) cache, so return_lse runs the reference; so do shapes outside the op's limits
    (R != 512, Dr != 64, a head count that is not a power of two up to 128, a block size that is not
    a multiple of 16 up to 1024, K = 0).
    """
    T, H, R = q_latent.shape
    Dr = q_rope.shape[-1]
    nb, bs = latent_cache.shape[:2]
    K = topk_indices.shape[1]
    fits = R == _MLA_LATENT and Dr == _MLA_ROPE and H in _SFA_HEADS and _paged_block_fits(bs) and K > 0
    if return_lse or not fits:
        from .reference import sparse_mla_attention as ref
        return ref(q_latent, q_rope, latent_cache, rope_cache, block_tables, cu_seqlens_q, seq_lens, topk_indices,
                   softmax_scale, return_lse)
    _check_dtype("sparse_mla_attention", q_latent, q_rope, latent_cache, rope_cache)
    if T == 0:
        return q_latent.new_empty((0, H, R))
    kv = latent_cache.view(nb, bs, 1, R)
    out, _, _ = torch_npu.npu_sparse_flash_attention(
        q_latent.contiguous(), kv, kv, _int32(topk_indices).view(T, 1, K).contiguous(), softmax_scale,
        block_table=_int32(block_tables), actual_seq_lengths_query=_int32(cu_seqlens_q[1:]),
        actual_seq_lengths_kv=_int32(seq_lens), query_rope=q_rope.contiguous(),
        key_rope=rope_cache.view(nb, bs, 1, Dr), sparse_block_size=1, layout_query="TND",
        layout_kv="PA_BSND", sparse_mode=3, attention_mode=_MLA_ABSORB)
    _check(out.shape == (T, H, R), f"npu_sparse_flash_attention returned {tuple(out.shape)}, want [{T}, {H}, {R}]")
    return out
