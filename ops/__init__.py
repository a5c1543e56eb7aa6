"""glm5_ascend.ops: the DSA and MoE operators the model calls, one public function each.

Each op has up to three backends, chosen from the tensors' device and bound once per (op, device type):
  reference  pure torch (ops/*/reference.py), the spec; the default on CPU
  npu        torch_npu fused ops (ops/*/npu.py); the default on an Ascend NPU
  cuda       Triton / torch fast paths (ops/*/cuda.py); the default on a CUDA GPU
GLM5_OPS_BACKEND forces one backend for every op, GLM5_OPS_BACKEND_<OP> for one op. A device's
default backend that does not implement an op falls back to reference; a backend asked for by
name that is unknown or cannot load is an error. Backends are imported lazily, so a CPU host
never imports torch_npu or triton. The variables are read when an op is first called on a device
type; `rebind()` makes the next call read them again.

Every op checks its arguments before it dispatches (ops/checks.py): shapes, dtypes and devices
always, index values with GLM5_OPS_CHECK_VALUES=1. So all backends fail the same way, with one line
naming the argument, and a bad block table cannot crash a GPU kernel when the value checks are on.

ep_dispatch / ep_combine are the expert-parallel collectives: their reference backend is the portable
all_to_all_single path in ops/moe/ep.py, the npu backend the MC2 ops (on their own communicator,
mc2_group) where the documented limits allow, else that same portable path; combine always runs the
backend whose dispatch made its handle.

Padded results. Routing sizes its output by data (N token copies kept), which the host can only learn
by waiting for the device. So moe_permute and ep_dispatch may return M >= N rows: the N valid rows
first, then padding (moe_permute's `order` is -1 there). grouped_mlp leaves rows past sum(counts)
unspecified, moe_unpermute ignores rows whose `order` is -1, ep_combine takes the rows as dispatch
gave them. The reference and cuda backends return exactly N rows (and wait for the device to learn
N); the npu backend returns all T*k rows / MC2's fixed-size buffer and reads nothing back, so a
decode step can be captured as a graph (docs/ops.md lists the syncs that remain).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from glm5_ascend import envs
from glm5_ascend.ops import checks

BACKENDS = ("reference", "npu", "cuda")
_FAMILY = {
    "interleaved_rope": "dsa", "mla_cache_write": "dsa", "lightning_indexer": "dsa", "sparse_mla_attention": "dsa",
    "moe_route": "moe", "moe_permute": "moe", "moe_unpermute": "moe", "grouped_mlp": "moe",
    "ep_dispatch": "moe", "ep_combine": "moe",
}
# Ops whose reference backend is not <family>/reference.py: the portable collectives path.
_REFERENCE_MODULE = {"ep_dispatch": "moe.ep", "ep_combine": "moe.ep"}
_DEVICE_DEFAULT = {"cpu": "reference", "cuda": "cuda", "npu": "npu"}


def _load(family: str, backend: str, op: str | None = None) -> ModuleType | None:
    sub = _REFERENCE_MODULE[op] if backend == "reference" and op in _REFERENCE_MODULE else f"{family}.{backend}"
    try:
        return importlib.import_module(f"glm5_ascend.ops.{sub}")
    except ModuleNotFoundError as e:
        if e.name == f"glm5_ascend.ops.{sub}":
            return None  # this backend has no module for the family yet
        raise


def resolve(op: str, device_type: str) -> tuple[str, object]:
    """(backend name, function) that runs `op` for tensors on `device_type`."""
    family = _FAMILY[op]
    per_op = envs.ops_backend_for(op)
    forced = per_op or envs.ops_backend()
    if forced:
        var = f"GLM5_OPS_BACKEND_{op.upper()}" if per_op else "GLM5_OPS_BACKEND"
        if forced not in BACKENDS:
            raise ValueError(f"{var}={forced!r} is not a backend; use one of {', '.join(BACKENDS)}")
        try:
            module = _load(family, forced, op)
        except ImportError as e:
            raise RuntimeError(f"ops backend {forced!r} cannot load on this host ({e}); unset {var}") from None
        fn = getattr(module, op, None) if module else None
        if fn is None:
            raise RuntimeError(f"ops backend {forced!r} does not implement {op}; unset {var} or use reference")
        return forced, fn
    backend = _DEVICE_DEFAULT.get(device_type, "reference")
    module = _load(family, backend, op)
    fn = getattr(module, op, None) if module else None
    if fn is None:
        backend, fn = "reference", getattr(_load(family, "reference", op), op)
    return backend, fn


_BOUND: dict[tuple[str, str], object] = {}  # (op, device type) -> the backend function it runs


def rebind() -> None:
    """Forget every bound backend, so the next call of each op resolves again (after GLM5_OPS_BACKEND*
    or the installed torch_npu changed)."""
    _BOUND.clear()


def _call(op: str, *args):
    """Check op's arguments, then run it on the backend bound for the device of its first tensor."""
    getattr(checks, op)(*args)
    key = (op, args[0].device.type)
    fn = _BOUND.get(key)
    if fn is None:
        fn = _BOUND[key] = resolve(*key)[1]
    return fn(*args)


def interleaved_rope(x, cos, sin):
    """GLM-5's interleaved RoPE of x [T, ..., D] with cos / sin [T, D/2]; see ops/dsa/reference.py."""
    return _call("interleaved_rope", x, cos, sin)


def mla_cache_write(latent, k_rope, index_k, slot_mapping, latent_cache, rope_cache, index_cache):
    """Paged write of latent [T, R], rope key [T, Dr], index key [T, Di]; see ops/dsa/reference.py."""
    return _call("mla_cache_write", latent, k_rope, index_k, slot_mapping,
                 latent_cache, rope_cache, index_cache)


def lightning_indexer(q, weights, index_cache, block_tables, cu_seqlens_q, seq_lens, topk, softmax_scale,
                      prompt_lens=None, tie_flags=None):
    """Top-k token positions per query, int32 [T, topk], -1 padded; see ops/dsa/reference.py.

    prompt_lens (int [B]) and tie_flags (bool [T], filled) concern only which of several equal scores
    are kept (see the reference); backends with their own select kernel break such ties toward the
    lower position, a rule that needs neither.
    """
    return _call("lightning_indexer", q, weights, index_cache, block_tables, cu_seqlens_q,
                 seq_lens, topk, softmax_scale, prompt_lens, tie_flags)


def sparse_mla_attention(q_latent, q_rope, latent_cache, rope_cache, block_tables, cu_seqlens_q,
                         seq_lens, topk_indices, softmax_scale, return_lse=False):
    """Absorbed sparse MLA over the top-k tokens, [T, H, R] (+ lse); see ops/dsa/reference.py."""
    return _call("sparse_mla_attention", q_latent, q_rope, latent_cache, rope_cache,
                 block_tables, cu_seqlens_q, seq_lens, topk_indices, softmax_scale, return_lse)


def moe_route(router_logits, e_score_correction_bias, top_k, n_group, topk_group,
              routed_scaling_factor, norm_topk_prob=True):
    """Sigmoid group-limited top-k routing -> (weights f32 [T, k], ids int32 [T, k])."""
    return _call("moe_route", router_logits, e_score_correction_bias, top_k,
                 n_group, topk_group, routed_scaling_factor, norm_topk_prob)


def moe_permute(hidden, expert_ids, num_experts):
    """Rows grouped by expert -> (permuted [M, D], order int64 [M], counts int64 [E]).

    The first N = sum(counts) rows are the kept copies grouped by expert; M >= N (padded results
    above): rows past N are padding, their order -1.
    """
    return _call("moe_permute", hidden, expert_ids, num_experts)


def moe_unpermute(expert_out, order, weights):
    """Weighted combine of expert rows [M, D] back to tokens, [T, D]; rows whose order is -1 are ignored."""
    return _call("moe_unpermute", expert_out, order, weights)


def grouped_mlp(x, counts, w13, w2):
    """SwiGLU grouped experts over rows sorted by expert, [M, D]; sum(counts) <= M, rows past it unspecified."""
    return _call("grouped_mlp", x, counts, w13, w2)


def prepare_expert_weights(w13, w2):
    """(w13, w2) in the layout grouped_mlp's backend reads fastest, for a model to keep after loading.

    The cuda backend packs them in tiles (ops/moe/cuda.py pack_weights); the reference backend also
    reads that form; other backends keep w13 [E, 2I, D] and w2 [E, D, I]. Packing copies the weights:
    call it once, not per forward.
    """
    backend, _ = resolve("grouped_mlp", w13.device.type)
    pack = getattr(_load("moe", backend), "pack_weights", None)
    return pack(w13, w2) if pack else (w13, w2)


def ep_dispatch(hidden, expert_ids, weights, num_experts, ep_group, mc2_group=None, max_tokens_per_rank=None):
    """Expert-parallel dispatch -> (recv_hidden [M, D] grouped by local expert, recv_counts int64 [E_local], handle).

    hidden [T, D] (T may be 0), expert_ids int [T, k] global ids (< 0 dropped), weights [T, k];
    see ops/moe/ep.py. Every rank of ep_group must call it. The first sum(recv_counts) rows of
    recv_hidden are valid, the rest padding (padded results above).
    mc2_group: a second communicator over ep_group's ranks that carries the npu backend's MC2 ops and
        nothing else (their docs forbid any other collective on it); None: no MC2. Other backends ignore it.
    max_tokens_per_rank: the static bound on T every rank shares (the engine's max_num_batched_tokens /
        TP, identical on all ranks); T above it is an error. It sizes MC2's one global_bs and lets the
        npu backend choose MC2 without a collective (ops/moe/mc2.py). None: unknown.
    """
    return _call("ep_dispatch", hidden, expert_ids, weights, num_experts, ep_group, mc2_group, max_tokens_per_rank)


def ep_combine(expert_out, handle):
    """Weighted sum of expert rows [N, D] back into each token on its source rank, [T, D].

    Runs the backend whose ep_dispatch made `handle`, whatever the overrides say now.
    """
    module = _load(_FAMILY["ep_combine"], handle.backend, "ep_combine")
    return module.ep_combine(expert_out, handle)


# ---- W8A8 (ops/quant): int8 weights with per-row scales, activations quantized per token ----
_FAMILY.update({"w8a8_linear": "quant", "grouped_mlp_w8a8": "quant"})


def w8a8_linear(x, weight, weight_scale):
    """x [..., K] float16/bfloat16/float32, weight int8 [N, K], weight_scale float32 [N] -> [..., N] in x's dtype;
    see ops/quant/reference.py."""
    return _call("w8a8_linear", x, weight, weight_scale)


def grouped_mlp_w8a8(x, counts, w13, w13_scale, w2, w2_scale):
    """grouped_mlp with int8 experts: w13 [E, 2I, D] + w13_scale f32 [E, 2I], w2 [E, D, I] + w2_scale f32 [E, D];
    rows past sum(counts) unspecified (reference: exactly sum(counts) rows); see ops/quant/reference.py."""
    return _call("grouped_mlp_w8a8", x, counts, w13, w13_scale, w2, w2_scale)
