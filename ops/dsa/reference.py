"""DeepSeek Sparse Attention ops in plain torch: the readable spec every backend is tested against.

Conventions shared by every DSA op (and by the npu / cuda backends):
  * A batch is a flat run of T query tokens from B sequences. `cu_seqlens_q` [B+1] (int32) gives the
    token ranges, `seq_lens` [B] (int32) the context length of each sequence *including* its new
    tokens, so query i of sequence b sits at position seq_lens[b] - q_len_b + i.
  * Paged caches have shape [num_blocks, block_size, D]. `block_tables` [B, max_blocks] (int32) maps
    a sequence's block number to a physical block; a token's slot is block * block_size + offset.
  * Top-k indices are token *positions* within the sequence (int32), padded with -1. The order
    within a row is unspecified. How equal scores are broken is in lightning_indexer's docstring.
"""
from __future__ import annotations

import torch

# Bound the float32 temporaries of the reference so long prompts never build an S x S x H tensor.
_MAX_CHUNK_ELEMS = 1 << 25


def _gather_slots(block_tables: torch.Tensor, seq_ids: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots of token positions `pos` (any shape, >= 0) of sequences `seq_ids` (broadcastable)."""
    blocks = block_tables[seq_ids, torch.div(pos, block_size, rounding_mode="floor")].long()
    return blocks * block_size + pos % block_size


def interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM-5's RoPE on x [T, ..., D] with cos / sin [T, D/2]: pairs (x0, x1), (x2, x3)... rotate together.

    The result is stored de-interleaved (the rotated evens, then the rotated odds), as transformers
    does; queries and keys share the layout, so their dot products equal true interleaved RoPE's.
    """
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def mla_cache_write(latent: torch.Tensor, k_rope: torch.Tensor, index_k: torch.Tensor | None,
                    slot_mapping: torch.Tensor, latent_cache: torch.Tensor, rope_cache: torch.Tensor,
                    index_cache: torch.Tensor | None) -> None:
    """Write one step's latent [T, R], rope key [T, Dr] and index key [T, Di] into the paged caches.

    latent / k_rope arrive already normed and rotated. Slots < 0 (padding) are skipped.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    latent_cache.view(-1, latent_cache.shape[-1]).index_copy_(0, slots, latent[keep].to(latent_cache.dtype))
    rope_cache.view(-1, rope_cache.shape[-1]).index_copy_(0, slots, k_rope[keep].to(rope_cache.dtype))
    if index_cache is not None and index_k is not None:
        index_cache.view(-1, index_cache.shape[-1]).index_copy_(0, slots, index_k[keep].to(index_cache.dtype))


def lightning_indexer(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor,
                      block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                      topk: int, softmax_scale: float, prompt_lens: torch.Tensor | None = None,
                      tie_flags: torch.Tensor | None = None) -> torch.Tensor:
    """DSA lightning indexer: pick each query's top-k context tokens.

    score(t, j) = sum_h weights[t, h] * relu(softmax_scale * q[t, h] . k[j]), over causal j <= pos(t).

    Args:
        q: [T, H, D] indexer queries (rope applied). weights: [T, H] float32 head weights.
        index_cache: [num_blocks, block_size, D] paged index keys.
        prompt_lens: int [B] prompt length of each sequence, or None.
        tie_flags: bool [T], optional: set (never cleared) for prompt positions whose selection kept
            some but not all of several equal scores, i.e. whose choice depends on the row length.
    Returns:
        int32 [T, topk]: positions of the selected tokens; -1 where the context is shorter than topk.

    Ties: a key whose ReLU terms are all zero scores exactly 0, so equal scores are common in
    small models, and torch.topk's choice among them depends on the row's length. To pick what a
    transformers forward picks, the scores are computed with its matmuls and ranked with topk over
    the row it ranks: as long as the prompt for prompt positions (a whole-prompt forward), and
    pos + 1 for generated ones (a cached decode step), future positions -inf. That choice is also
    independent of chunked prefill and batching.
    """
    T = q.shape[0]
    block_size = index_cache.shape[1]
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    flat_keys = index_cache.view(-1, index_cache.shape[-1])
    cu = cu_seqlens_q.tolist()
    prompts = prompt_lens.tolist() if prompt_lens is not None else None
    for b, ctx in enumerate(seq_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        n_q = end - start
        first_pos = ctx - n_q
        prompt = prompts[b] if prompts is not None else ctx  # every prompt position's row length
        keys = flat_keys[_gather_slots(block_tables, b, torch.arange(ctx, device=q.device), block_size)]
        key_t = keys.float().t()[None, None]  # [1, 1, D, ctx], as transformers lays it out
        q_pos = torch.arange(first_pos, ctx, device=q.device)
        rows = max(1, _MAX_CHUNK_ELEMS // max(1, max(prompt, ctx) * q.shape[1]))
        for s in range(start, end, rows):
            e = min(end, s + rows)
            scores = torch.relu(torch.matmul(q[s:e].float()[None], key_t) * softmax_scale)  # [1, n, H, ctx]
            scores = torch.matmul(weights[s:e].float()[None, :, None, :], scores)[0, :, 0]  # [n, ctx]
            pos = q_pos[s - start:e - start]
            for lo, hi, length in _row_groups(pos, prompt):
                row = torch.full((hi - lo, length), float("-inf"), device=q.device)
                width = min(length, ctx)
                row[:, :width] = scores[lo:hi, :width]
                causal = torch.arange(length, device=q.device)[None, :] > pos[lo:hi, None]
                row.masked_fill_(causal, float("-inf"))
                k_eff = min(topk, length)
                vals, idx = row.topk(k_eff, dim=-1)
                out[s + lo:s + hi, :k_eff] = torch.where(torch.isinf(vals), -1, idx).to(torch.int32)
                if tie_flags is not None and k_eff < length and length == prompt:
                    # a tie straddles the boundary when an unselected score equals the k-th one
                    kth = vals[:, -1:]
                    straddles = ((row == kth).sum(-1) > (vals == kth).sum(-1)) & torch.isfinite(kth[:, 0])
                    tie_flags[s + lo:s + hi] |= straddles
    return out


def _row_groups(pos: torch.Tensor, prompt: int):
    """(lo, hi, row length) runs over these query positions: prompt positions share a row as long
    as the prompt, each generated position p has its own row of p + 1."""
    p = pos.tolist()
    n_prompt = sum(1 for x in p if x < prompt)
    groups = [(0, n_prompt, prompt)] if n_prompt else []
    groups += [(i, i + 1, p[i] + 1) for i in range(n_prompt, len(p))]
    return groups


def sparse_mla_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor,
                         rope_cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         seq_lens: torch.Tensor, topk_indices: torch.Tensor, softmax_scale: float,
                         return_lse: bool = False):
    """Sparse MLA in the absorbed form: every query attends only to its top-k tokens' latents.

    Args:
        q_latent: [T, H, R] queries already multiplied by W_UK (latent space).
        q_rope: [T, H, Dr] rotated rope queries.
        latent_cache / rope_cache: [num_blocks, block_size, R] / [..., Dr] paged caches.
        topk_indices: int32 [T, K] token positions, -1 padded (from lightning_indexer).
    Returns:
        out [T, H, R] in q's dtype (multiply by W_UV outside); with return_lse also lse [T, H] float32.
    """
    T, H, R = q_latent.shape
    block_size = latent_cache.shape[1]
    K = topk_indices.shape[1]
    out = torch.empty_like(q_latent)
    lse_out = torch.empty((T, H), dtype=torch.float32, device=q_latent.device)
    lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens), device=q_latent.device), lens)
    flat_lat = latent_cache.view(-1, R)
    flat_rope = rope_cache.view(-1, rope_cache.shape[-1])
    rows = max(1, _MAX_CHUNK_ELEMS // max(1, K * (R + H)))
    for s in range(0, T, rows):
        e = min(T, s + rows)
        idx = topk_indices[s:e].long()
        valid = idx >= 0
        slots = _gather_slots(block_tables, seq_of_token[s:e, None], idx.clamp(min=0), block_size)
        lat = flat_lat[slots]  # [t, K, R]
        rope = flat_rope[slots]
        scores = (torch.einsum("thr,tkr->thk", q_latent[s:e], lat)
                  + torch.einsum("thd,tkd->thk", q_rope[s:e], rope)).float() * softmax_scale
        scores.masked_fill_(~valid[:, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None]).to(q_latent.dtype)
        out[s:e] = torch.einsum("thk,tkr->thr", probs, lat.to(q_latent.dtype))
        lse_out[s:e] = lse
    return (out, lse_out) if return_lse else out
