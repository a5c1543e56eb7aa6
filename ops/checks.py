"""Argument checks shared by every backend: each public op in glm5_ascend.ops calls its check first.

Two levels:
  * Shapes, dtypes, devices and scalar arguments: always. They read tensor metadata only, so they
    never synchronise a device stream and cost a few microseconds a call.
  * Values (sequence offsets, block tables, slots, top-k positions, expert counts): only with
    GLM5_OPS_CHECK_VALUES=1, because reading them from an accelerator synchronises its stream. They
    catch what would otherwise be an out-of-bounds read inside a kernel, which on a GPU kills the
    process's CUDA context rather than raising.
Each failure is one ValueError (TypeError for a non-tensor) naming the op, the argument, the expected
shape or range and what was passed.
"""
from __future__ import annotations

import operator
import os

import torch

from glm5_ascend import envs
from glm5_ascend.ops.moe.reference import expert_shape

_INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def _tensor(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _shape(op: str, name: str, t, *dims) -> torch.Tensor:
    """t must have len(dims) dimensions; dims are (label, size or None for any size)."""
    if not isinstance(t, torch.Tensor):
        _tensor(op, name, t)
    shape = t.shape
    if len(shape) == len(dims):
        for got, (_, want) in zip(shape, dims):
            if want is not None and got != want:
                break
        else:
            return t
    expect = ", ".join(label if want is None else f"{label}={want}" for label, want in dims)
    _fail(op, f"{name} must be [{expect}], got {list(shape)}")


def _index(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INDEX_DTYPES:
        _fail(op, f"{name} must be int32 or int64, got {t.dtype}")


def _floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        _fail(op, f"{name} must be a floating-point tensor, got {t.dtype}")


def _one_device(op: str, first: str, tensors: dict) -> None:
    """Every tensor on the device of tensors[first]. get_device() (-1 on the CPU) is the cheap test;
    the message reads the devices only when it fails."""
    where = tensors[first].get_device()
    for name, t in tensors.items():
        if t is not None and t.get_device() != where:
            _fail(op, f"{name} is on {t.device} but {first} is on {tensors[first].device}; "
                      "move every input to one device")


def _int_arg(op: str, name: str, value, lo: int, hi: int | None = None, why: str = "") -> None:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        _fail(op, f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        _fail(op, f"{name} must be {bound}{why}, got {value}")


def _batch(op: str, block_tables, cu_seqlens_q, seq_lens) -> int:
    """The DSA batch metadata (ops/dsa/reference.py); returns B."""
    _shape(op, "seq_lens", seq_lens, ("B", None))
    B = seq_lens.shape[0]
    _shape(op, "cu_seqlens_q", cu_seqlens_q, ("B+1", B + 1))
    _shape(op, "block_tables", block_tables, ("B", B), ("max_blocks", None))
    for name, t in (("seq_lens", seq_lens), ("cu_seqlens_q", cu_seqlens_q), ("block_tables", block_tables)):
        _index(op, name, t)
    return B


def _batch_values(op: str, T: int, block_tables, cu_seqlens_q, seq_lens, num_blocks: int, block_size: int):
    """Value checks of the batch metadata; returns (cu, seq_lens) on the CPU, int64."""
    cu, lens = cu_seqlens_q.detach().long().cpu(), seq_lens.detach().long().cpu()
    q_lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != T or bool((q_lens < 0).any()):
        shown = cu.tolist() if cu.numel() <= 8 else cu[:4].tolist() + ["..."] + cu[-2:].tolist()
        _fail(op, f"cu_seqlens_q must rise from 0 to T={T}, got {shown}")
    short = (lens < q_lens).nonzero()
    if short.numel():
        b = int(short[0])
        _fail(op, f"seq_lens[{b}]={int(lens[b])} is below that sequence's {int(q_lens[b])} new tokens "
                  "(seq_lens count the context including them)")
    need = (lens + block_size - 1) // block_size
    if need.numel() and int(need.max()) > block_tables.shape[1]:
        b = int(need.argmax())
        _fail(op, f"sequence {b} has {int(lens[b])} tokens, {int(need[b])} blocks of {block_size}, but "
                  f"block_tables has {block_tables.shape[1]} columns")
    table = block_tables.detach().long().cpu()
    used = torch.arange(table.shape[1])[None, :] < need[:, None]
    bad = used & ((table < 0) | (table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        _fail(op, f"block_tables[{b}, {j}]={int(table[b, j])} is not a block of the cache (0..{num_blocks - 1})")
    return cu, lens


def check_values() -> bool:
    return os.environ.get("GLM5_OPS_CHECK_VALUES") not in (None, "", "0") and envs.ops_check_values()


# --- DSA ----------------------------------------------------------------------------------------


def interleaved_rope(x, cos, sin) -> None:
    op = "interleaved_rope"
    _tensor(op, "x", x)
    if x.dim() < 2 or x.shape[-1] % 2:
        _fail(op, f"x must be [T, ..., D] with an even D, got {list(x.shape)}")
    T, half = x.shape[0], x.shape[-1] // 2
    _shape(op, "cos", cos, ("T", T), ("D/2", half))
    _shape(op, "sin", sin, ("T", T), ("D/2", half))
    _one_device(op, "x", {"x": x, "cos": cos, "sin": sin})


def mla_cache_write(latent, k_rope, index_k, slot_mapping, latent_cache, rope_cache, index_cache) -> None:
    op = "mla_cache_write"
    _shape(op, "latent", latent, ("T", None), ("R", None))
    T, R = latent.shape
    _shape(op, "k_rope", k_rope, ("T", T), ("Dr", None))
    _shape(op, "slot_mapping", slot_mapping, ("T", T))
    _index(op, "slot_mapping", slot_mapping)
    _shape(op, "latent_cache", latent_cache, ("num_blocks", None), ("block_size", None), ("R", R))
    nb, bs = latent_cache.shape[:2]
    _shape(op, "rope_cache", rope_cache, ("num_blocks", nb), ("block_size", bs), ("Dr", k_rope.shape[1]))
    if (index_k is None) != (index_cache is None):
        _fail(op, "index_k and index_cache go together: pass both (a layer with an indexer) or neither")
    if index_cache is not None:
        _shape(op, "index_k", index_k, ("T", T), ("Di", None))
        _shape(op, "index_cache", index_cache, ("num_blocks", nb), ("block_size", bs), ("Di", index_k.shape[1]))
    _one_device(op, "latent", {"latent": latent, "k_rope": k_rope, "index_k": index_k, "slot_mapping": slot_mapping,
                               "latent_cache": latent_cache, "rope_cache": rope_cache, "index_cache": index_cache})
    if check_values() and T:
        top = int(slot_mapping.max())
        if top >= nb * bs:
            _fail(op, f"slot_mapping holds slot {top}, past the cache's {nb} blocks x {bs} = {nb * bs} slots")


def lightning_indexer(q, weights, index_cache, block_tables, cu_seqlens_q, seq_lens, topk, softmax_scale,
                      prompt_lens=None, tie_flags=None) -> None:
    op = "lightning_indexer"
    _shape(op, "q", q, ("T", None), ("H", None), ("D", None))
    T, H, D = q.shape
    _floating(op, "q", q)
    _shape(op, "weights", weights, ("T", T), ("H", H))
    _shape(op, "index_cache", index_cache, ("num_blocks", None), ("block_size", None), ("D", D))
    B = _batch(op, block_tables, cu_seqlens_q, seq_lens)
    _int_arg(op, "topk", topk, 0)
    if prompt_lens is not None:
        _shape(op, "prompt_lens", prompt_lens, ("B", B))
        _index(op, "prompt_lens", prompt_lens)
    if tie_flags is not None:
        _shape(op, "tie_flags", tie_flags, ("T", T))
        if tie_flags.dtype != torch.bool:
            _fail(op, f"tie_flags must be bool, got {tie_flags.dtype}")
    _one_device(op, "q", {"q": q, "weights": weights, "index_cache": index_cache, "block_tables": block_tables,
                          "cu_seqlens_q": cu_seqlens_q, "seq_lens": seq_lens, "prompt_lens": prompt_lens,
                          "tie_flags": tie_flags})
    if check_values():
        _batch_values(op, T, block_tables, cu_seqlens_q, seq_lens, *index_cache.shape[:2])


def sparse_mla_attention(q_latent, q_rope, latent_cache, rope_cache, block_tables, cu_seqlens_q, seq_lens,
                         topk_indices, softmax_scale, return_lse=False) -> None:
    op = "sparse_mla_attention"
    _shape(op, "q_latent", q_latent, ("T", None), ("H", None), ("R", None))
    T, H, R = q_latent.shape
    _floating(op, "q_latent", q_latent)
    _shape(op, "q_rope", q_rope, ("T", T), ("H", H), ("Dr", None))
    _shape(op, "latent_cache", latent_cache, ("num_blocks", None), ("block_size", None), ("R", R))
    nb, bs = latent_cache.shape[:2]
    _shape(op, "rope_cache", rope_cache, ("num_blocks", nb), ("block_size", bs), ("Dr", q_rope.shape[2]))
    _batch(op, block_tables, cu_seqlens_q, seq_lens)
    _shape(op, "topk_indices", topk_indices, ("T", T), ("K", None))
    _index(op, "topk_indices", topk_indices)
    _one_device(op, "q_latent", {"q_latent": q_latent, "q_rope": q_rope, "latent_cache": latent_cache,
                                 "rope_cache": rope_cache, "block_tables": block_tables,
                                 "cu_seqlens_q": cu_seqlens_q, "seq_lens": seq_lens, "topk_indices": topk_indices})
    if check_values():
        cu, lens = _batch_values(op, T, block_tables, cu_seqlens_q, seq_lens, nb, bs)
        if T and topk_indices.shape[1]:
            ctx = torch.repeat_interleave(lens, cu[1:] - cu[:-1])  # each token's sequence length
            idx = topk_indices.detach().long().cpu()
            bad = (idx < -1) | (idx >= ctx[:, None])
            if bool(bad.any()):
                t, j = (int(v) for v in bad.nonzero()[0])
                _fail(op, f"topk_indices[{t}, {j}]={int(idx[t, j])} is outside its sequence's {int(ctx[t])} "
                          "positions (-1 pads)")


# --- MoE ----------------------------------------------------------------------------------------


def moe_route(router_logits, e_score_correction_bias, top_k, n_group, topk_group, routed_scaling_factor,
              norm_topk_prob=True) -> None:
    op = "moe_route"
    _shape(op, "router_logits", router_logits, ("T", None), ("E", None))
    _floating(op, "router_logits", router_logits)
    E = router_logits.shape[1]
    _shape(op, "e_score_correction_bias", e_score_correction_bias, ("E", E))
    _one_device(op, "router_logits", {"router_logits": router_logits,
                                      "e_score_correction_bias": e_score_correction_bias})
    _int_arg(op, "n_group", n_group, 1, E)
    if E % n_group:
        _fail(op, f"n_group={n_group} must divide the {E} experts")
    per_group = E // n_group
    if n_group > 1 and per_group < 2:
        _fail(op, f"a group scores the sum of its two best experts, so groups need >= 2 experts; "
                  f"{E} experts in {n_group} groups have {per_group}")
    if n_group > 1:  # one group: topk_group is not used
        _int_arg(op, "topk_group", topk_group, 1, n_group)
    _int_arg(op, "top_k", top_k, 1, per_group * topk_group if n_group > 1 else E,
             f" (the experts of topk_group={topk_group} groups of {per_group})" if n_group > 1 else " (the experts)")


def moe_permute(hidden, expert_ids, num_experts) -> None:
    op = "moe_permute"
    _shape(op, "hidden", hidden, ("T", None), ("D", None))
    _shape(op, "expert_ids", expert_ids, ("T", hidden.shape[0]), ("k", None))
    _index(op, "expert_ids", expert_ids)
    _int_arg(op, "num_experts", num_experts, 1)
    _one_device(op, "hidden", {"hidden": hidden, "expert_ids": expert_ids})


def moe_unpermute(expert_out, order, weights) -> None:
    op = "moe_unpermute"
    _shape(op, "expert_out", expert_out, ("N", None), ("D", None))
    N = expert_out.shape[0]
    _shape(op, "order", order, ("N", N))
    _index(op, "order", order)
    _shape(op, "weights", weights, ("T", None), ("k", None))
    T, k = weights.shape
    if N > T * k:
        _fail(op, f"expert_out has {N} rows but weights [T={T}, k={k}] has only {T * k} token slots")
    _one_device(op, "expert_out", {"expert_out": expert_out, "order": order, "weights": weights})
    if check_values() and N:
        o = order.detach().cpu()
        kept = o[o >= 0]
        if int(o.min()) < -1 or (kept.numel() and int(kept.max()) >= T * k):
            _fail(op, f"order must index the {T * k} token slots of weights (-1: padding), got values "
                      f"{int(o.min())}..{int(o.max())}")
        if kept.unique().numel() != kept.numel():
            _fail(op, "order names a token slot twice")


def grouped_mlp(x, counts, w13, w2) -> None:
    op = "grouped_mlp"
    for name, t in (("x", x), ("counts", counts), ("w13", w13), ("w2", w2)):
        _tensor(op, name, t)
    if x.dim() != 2:
        _fail(op, f"x must be [N, D], got {list(x.shape)}")
    N, D = x.shape
    s13, s2 = expert_shape(w13), expert_shape(w2)
    if len(s13) != 3 or s13[2] != D or s13[1] % 2:
        _fail(op, f"w13 must be [E, 2I, D={D}] (gate rows, then up rows), got {list(s13)}")
    E, inter = s13[0], s13[1] // 2
    if s2 != (E, D, inter):
        _fail(op, f"w2 must be [E={E}, D={D}, I={inter}] to match w13, got {list(s2)}")
    _shape(op, "counts", counts, ("E", E))
    _index(op, "counts", counts)
    if not (x.dtype == w13.dtype == w2.dtype):
        _fail(op, f"x, w13 and w2 must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    _floating(op, "x", x)
    _one_device(op, "x", {"x": x, "counts": counts, "w13": w13, "w2": w2})
    if check_values():
        c = counts.detach().long().cpu()
        if bool((c < 0).any()) or int(c.sum()) > N:
            _fail(op, f"counts must be >= 0 and sum to at most x's {N} rows, got sum {int(c.sum())}, "
                      f"min {int(c.min())}")


def ep_dispatch(hidden, expert_ids, weights, num_experts, ep_group, mc2_group=None, max_tokens_per_rank=None) -> None:
    op = "ep_dispatch"
    _shape(op, "hidden", hidden, ("T", None), ("D", None))
    _shape(op, "expert_ids", expert_ids, ("T", hidden.shape[0]), ("k", None))
    _index(op, "expert_ids", expert_ids)
    _shape(op, "weights", weights, ("T", hidden.shape[0]), ("k", expert_ids.shape[1]))
    _int_arg(op, "num_experts", num_experts, 1)
    if max_tokens_per_rank is not None:
        _int_arg(op, "max_tokens_per_rank", max_tokens_per_rank, 1)
        if hidden.shape[0] > max_tokens_per_rank:
            _fail(op, f"hidden has T={hidden.shape[0]} rows, above max_tokens_per_rank={max_tokens_per_rank}, the "
                      "bound every EP rank relies on; pass the engine's true per-rank bound")
    if mc2_group is not None and mc2_group is ep_group:
        _fail(op, "mc2_group must be a communicator of its own (MC2's docs allow no other collective on it), "
                  "not ep_group")
    _one_device(op, "hidden", {"hidden": hidden, "expert_ids": expert_ids, "weights": weights})


def _w8a8_weight(op: str, name: str, w: torch.Tensor, scale_name: str, scale: torch.Tensor, dims: int) -> None:
    _tensor(op, name, w)
    _tensor(op, scale_name, scale)
    if w.dtype != torch.int8 or w.dim() != dims:
        _fail(op, f"{name} must be an int8 {dims}-D tensor, got {w.dtype} {list(w.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != tuple(w.shape[:-1]):
        _fail(op, f"{scale_name} must be float32 {list(w.shape[:-1])} (one per output row), got {scale.dtype} "
                  f"{list(scale.shape)}")


def w8a8_linear(x, weight, weight_scale) -> None:
    op = "w8a8_linear"
    _tensor(op, "x", x)
    _w8a8_weight(op, "weight", weight, "weight_scale", weight_scale, 2)
    _floating(op, "x", x)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        _fail(op, f"x must be [..., K={weight.shape[1]}], got {list(x.shape)}")
    _one_device(op, "x", {"x": x, "weight": weight, "weight_scale": weight_scale})


def grouped_mlp_w8a8(x, counts, w13, w13_scale, w2, w2_scale) -> None:
    op = "grouped_mlp_w8a8"
    _tensor(op, "x", x)
    _tensor(op, "counts", counts)
    _w8a8_weight(op, "w13", w13, "w13_scale", w13_scale, 3)
    _w8a8_weight(op, "w2", w2, "w2_scale", w2_scale, 3)
    if x.dim() != 2:
        _fail(op, f"x must be [N, D], got {list(x.shape)}")
    N, D = x.shape
    E, two_i, d = w13.shape
    if d != D or two_i % 2:
        _fail(op, f"w13 must be [E, 2I, D={D}] (gate rows, then up rows), got {list(w13.shape)}")
    if tuple(w2.shape) != (E, D, two_i // 2):
        _fail(op, f"w2 must be [E={E}, D={D}, I={two_i // 2}] to match w13, got {list(w2.shape)}")
    _shape(op, "counts", counts, ("E", E))
    _index(op, "counts", counts)
    _floating(op, "x", x)
    _one_device(op, "x", {"x": x, "counts": counts, "w13": w13, "w13_scale": w13_scale, "w2": w2,
                          "w2_scale": w2_scale})
    if check_values():
        c = counts.detach().long().cpu()
        if bool((c < 0).any()) or int(c.sum()) > N:
            _fail(op, f"counts must be >= 0 and sum to at most x's {N} rows, got sum {int(c.sum())}")
