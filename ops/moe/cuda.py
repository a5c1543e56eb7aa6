"""MoE ops on CUDA GPUs: routing in one kernel, grouped expert GEMMs with SwiGLU fused, a permute
with one host sync, and a deterministic unpermute.

The EP collectives are the reference's (ops/moe/ep.py, torch.distributed), re-exported so that
GLM5_OPS_BACKEND=cuda covers every op the model calls.
"""
from __future__ import annotations

import functools

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without tensor descriptors: the pointer kernel serves
    TensorDescriptor = None

from . import cuda_kernels as k
from .ep import ep_combine, ep_dispatch  # re-exported: see the module docstring
from . import reference
from .reference import expert_shape, unpack_weights

__all__ = ["grouped_mlp", "pack_weights", "moe_unpermute", "moe_route", "moe_permute", "ep_dispatch", "ep_combine"]

# Launch settings, tuned on an H200 (docs/benchmarks.md); glm5-ascend bench ops may override them.
# "up" is the gate/up GEMM with SwiGLU fused, "down" the down projection. impl "triton" runs the Triton
# grouped GEMM, whose tiles take up to bm2 rows past their bm (0: none); "grouped_mm" runs
# torch._grouped_mm (bf16 only; SwiGLU then a separate Triton pass over the [N, 2I] product).
# tma: on sm_90+ the GEMM fetches its tiles with tensor descriptors (grouped_gemm_tma_kernel) where rows
# are 16-byte aligned, else with pointer loads (grouped_gemm_kernel). pack_weights packs weights in
# [bn, bk] tiles of these sizes.
CONFIG = {
    "up_impl": "triton", "down_impl": "triton", "tma": 1,
    "bm": 128, "bm2": 64, "up_bn": 128, "up_bk": 64, "up_warps": 8, "up_stages": 4,
    "down_bn": 256, "down_bk": 64, "down_warps": 8, "down_stages": 4,
}


def _span() -> int:
    """Rows a tile covers: bm, plus bm2 for the rows an expert has beyond a multiple of bm."""
    bm2 = CONFIG["bm2"]
    if bm2 and (bm2 < 16 or bm2 & (bm2 - 1)):
        raise ValueError(f"moe CONFIG bm2={bm2}: use 0 or a power of two >= 16 (a tile's extra rows)")
    return CONFIG["bm"] + bm2


def _table(counts: torch.Tensor, n_rows: int, num_n: int) -> tuple[torch.Tensor, int]:
    """(tile_table_kernel's [4, n_progs] int32 table, n_progs): n_progs a static bound on the programs
    (M tiles at most cdiv(n_rows, span) + E), so nothing waits for the GPU."""
    E = counts.shape[0]
    span = _span()
    n_progs = (triton.cdiv(n_rows, span) + E) * num_n
    table = torch.empty((4, n_progs), dtype=torch.int32, device=counts.device)
    e_p = triton.next_power_of_2(E)
    block = max(1, min(128, 16384 // e_p))
    k.tile_table_kernel[(triton.cdiv(n_progs, block),)](counts, E, table, n_progs, NUM_N=num_n, SPAN=span, E_P=e_p,
                                                         BLOCK=block, num_warps=4)
    return table, n_progs


def _tma_device(device: torch.device) -> bool:
    """Tensor descriptors: a Hopper or later NVIDIA GPU, or Triton's CPU interpreter."""
    if TensorDescriptor is None:
        return False
    return device.type != "cuda" or (torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9)


def _tma(x: torch.Tensor, w: torch.Tensor) -> bool:
    """CONFIG tma, a device with tensor descriptors, 16-byte aligned rows."""
    if not CONFIG["tma"] or not _tma_device(x.device):
        return False
    return all(row * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
               for t, row in ((x, x.stride(0)), (w, w.stride(-2))))


def _fit_tile(n: int, want: int) -> int:
    """The largest power of two <= want (and >= 16) that divides n; 0 if none does."""
    t = want
    while t > 16 and n % t:
        t //= 2
    return t if n % t == 0 else 0


def pack_weights(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, D] and w2 [E, D, I] packed for grouped_mlp: each in [bn, bk] tiles,
    [E, rows / bn, K / bk, bn, bk] contiguous, so each tile the GEMM fetches is one contiguous block.
    The tiles are CONFIG's up / down sizes, halved until they divide the dims (I for w13's bn, so gate
    and up rows never share a tile). 16-bit weights on a device with tensor descriptors are packed;
    others, or dims no tile of 16+ divides, come back as they are. grouped_mlp takes either form, and
    reads packed weights with their packing's tile sizes.

    Call once, after loading (the model does, through ops.prepare_expert_weights): packing copies the
    weights. At GLM-5's shapes on an H200 it makes grouped_mlp ~4% faster (docs/benchmarks.md)."""
    cfg = CONFIG
    if not (cfg["tma"] and _tma_device(w13.device) and w13.dtype in (torch.bfloat16, torch.float16)):
        return w13, w2
    up_bn, up_bk = _fit_tile(w13.shape[1] // 2, cfg["up_bn"]), _fit_tile(w13.shape[2], cfg["up_bk"])
    down_bn, down_bk = _fit_tile(w2.shape[1], cfg["down_bn"]), _fit_tile(w2.shape[2], cfg["down_bk"])
    if w13.dim() == 3 and up_bn and up_bk:
        w13 = _pack(w13, up_bn, up_bk)
    if w2.dim() == 3 and w2.dtype == w13.dtype and down_bn and down_bk:
        w2 = _pack(w2, down_bn, down_bk)
    return w13, w2


def _pack(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    E, rows, K = w.shape
    return w.reshape(E, rows // bn, bn, K // bk, bk).permute(0, 1, 3, 2, 4).contiguous()


@functools.lru_cache(maxsize=None)
def _max_smem(device: torch.device) -> int:
    """Shared memory a block may use on this GPU (232448 bytes on an H100/H200, 166912 on an A100)."""
    if device.type != "cuda":
        return 1 << 30  # Triton's CPU interpreter
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


def fit_stages(stages: int, bn: int, bk: int, swiglu: bool, elem: int, smem: int, hopper: bool) -> int:
    """Pipeline stages of the grouped GEMM that fit `smem` bytes (the settings are an H200's).

    A stage holds the x tiles (bm + bm2 rows) and the weight tiles (bn rows, twice with SwiGLU), bk
    wide. Triton keeps a buffer per stage with hopper (sm_90, sm_100) and one fewer elsewhere
    (tests/ops/test_smem_fit.py compiles for sm_80, sm_89 and sm_90 to check)."""
    per_stage = (CONFIG["bm"] + (CONFIG["bm2"] or 0) + (2 if swiglu else 1) * bn) * bk * elem
    return max(1, min(stages, (smem - 1024) // per_stage + (0 if hopper else 1)))


def _remainders(bm2: int) -> tuple[int, int, int]:
    """The widths of the piece a tile adds for rows past bm: bm2, bm2 / 2, bm2 / 4 (at least 16 each)."""
    return max(16, bm2), max(16, bm2 // 2), max(16, bm2 // 4)


def _gemm(x, w, out, counts, n_out, up_off, swiglu, bn, bk, warps, stages):
    """out = the grouped product of x and w ([E, rows, K], or pack_weights' 5-d form) for each expert."""
    cfg = CONFIG
    packed = w.dim() == 5
    if packed:  # the tile sizes are the packing's
        E, n_bn, KT, bn, bk = w.shape
        w_rows, k_dim = n_bn * bn, KT * bk
    else:
        E, w_rows, k_dim = w.shape
        KT = 0
    if x.element_size() > 2 and not packed:  # float32 tiles: half the K step, fewer stages fit shared memory
        bk, stages = bk // 2, min(stages, 3)
    # sm_90 / sm_100 (wgmma, tcgen05) keep a buffer per stage; sm_80-89 and sm_120 (mma v2) one fewer.
    hopper = not x.is_cuda or 9 <= torch.cuda.get_device_capability(x.device)[0] < 12
    stages = fit_stages(stages, bn, bk, swiglu, x.element_size(), _max_smem(x.device), hopper)
    num_n = triton.cdiv(n_out, bn)
    table, n_progs = _table(counts, x.shape[0], num_n)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    if packed or _tma(x, w):
        bm, (r1, r2, r3) = cfg["bm"], _remainders(cfg["bm2"])
        xd = [TensorDescriptor.from_tensor(x, [r, bk]) for r in (bm, r1, r2, r3)]
        wd = TensorDescriptor.from_tensor(w.view(-1, bk) if packed else w.view(E * w_rows, k_dim), [bn, bk])
        k.grouped_gemm_tma_kernel[(n_progs,)](
            *xd, wd, out, table, n_progs, n_out, k_dim, w_rows, up_off, out.stride(0), KT, BM=bm, R1=r1, R2=r2,
            R3=r3, BN=bn, BK=bk, SWIGLU=swiglu, PACKED=packed, PREC=prec, REM=cfg["bm2"] > 0, num_warps=warps,
            num_stages=stages)
        return
    k.grouped_gemm_kernel[(n_progs,)](
        x, w, out, table, n_progs, x.shape[0], n_out, k_dim, up_off, x.stride(0), w.stride(0), w.stride(1),
        out.stride(0), BM=cfg["bm"], BM2=max(16, cfg["bm2"]), BN=bn, BK=bk, SWIGLU=swiglu, EVEN_K=k_dim % bk == 0,
        PREC=prec, REM=cfg["bm2"] > 0, num_warps=warps, num_stages=stages)


def grouped_mlp(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over rows grouped by expert.

    Args:
        x: [N, D] rows sorted by expert; counts: [E] rows per expert (sum N).
        w13: [E, 2I, D] gate rows then up rows; w2: [E, D, I]; either may also be in pack_weights' form.
    Returns:
        [N, D] in x's dtype.
    """
    N, D = x.shape
    inter = expert_shape(w2)[2]
    out = torch.empty((N, D), dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    cfg = CONFIG
    x = x.contiguous()
    if (w13.dim() == 5 or w2.dim() == 5) and (not _tma_device(x.device) or x.data_ptr() % 16):
        w13, w2 = unpack_weights(w13), unpack_weights(w2)  # packed weights are read through tensor descriptors only
    w13, w2 = w13.contiguous(), w2.contiguous()
    # torch._grouped_mm: bf16, 16-byte rows, plain weights
    use_mm = x.dtype == torch.bfloat16 and D % 8 == 0 and inter % 8 == 0 and w13.dim() == w2.dim() == 3
    offs = counts.cumsum(0).to(torch.int32) if use_mm and "grouped_mm" in (cfg["up_impl"], cfg["down_impl"]) else None
    h = torch.empty((N, inter), dtype=x.dtype, device=x.device)
    if use_mm and cfg["up_impl"] == "grouped_mm":
        gu = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
        block = min(1024, triton.next_power_of_2(inter))
        k.swiglu_kernel[(N, triton.cdiv(inter, block))](gu, h, inter, gu.stride(0), h.stride(0), BLOCK=block)
    else:
        _gemm(x, w13, h, counts, inter, inter, True, cfg["up_bn"], cfg["up_bk"], cfg["up_warps"], cfg["up_stages"])
    if use_mm and cfg["down_impl"] == "grouped_mm":
        out = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    else:
        _gemm(h, w2, out, counts, D, 0, False, cfg["down_bn"], cfg["down_bk"], cfg["down_warps"], cfg["down_stages"])
    return out


# Rows of more experts than this are routed by the reference (the kernel holds a row in registers).
_ROUTE_MAX_EXPERTS = 4096


def moe_route(router_logits: torch.Tensor, e_score_correction_bias: torch.Tensor, top_k: int, n_group: int,
              topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool = True):
    """The reference's routing in one kernel launch -> (weights float32 [T, k], ids int32 [T, k]).

    The reference takes about a dozen small kernels. Picks come best first (the reference leaves the
    order within a row unspecified); equal scores go to the lower expert index.
    """
    T, E = router_logits.shape
    if E > _ROUTE_MAX_EXPERTS:
        return reference.moe_route(router_logits, e_score_correction_bias, top_k, n_group, topk_group,
                                   routed_scaling_factor, norm_topk_prob)
    weights = torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=router_logits.device)
    if T == 0:
        return weights, ids
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    e_p = triton.next_power_of_2(E)
    k.route_kernel[(T,)](logits, e_score_correction_bias.contiguous(), weights, ids, E, logits.stride(0),
                         float(routed_scaling_factor), TOP_K=top_k, K_P=triton.next_power_of_2(top_k),
                         N_GROUP=n_group, TOPK_GROUP=topk_group if n_group > 1 else 1, NORM=bool(norm_topk_prob),
                         E_P=e_p, G_P=triton.next_power_of_2(n_group), num_warps=max(1, min(4, e_p // 256)))
    return weights, ids


def moe_permute(hidden: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """Token copies grouped by expert, the reference's result bit for bit.

    Args:
        hidden: [T, D]; expert_ids: int [T, k] (ids outside [0, num_experts) are dropped).
    Returns:
        permuted [N, D], order int64 [N] (flat token * k + j of each row, stable), counts int64 [E].

    The reference waits for the GPU twice (the kept count, then a boolean gather for the counts) and
    copies rows with an advanced-indexing gather. Here dropped ids sort last as a virtual expert E, one
    index_add gives the counts and the dropped count together, and that count is the one host sync the
    contract needs (N sizes the result); the rows are copied by one kernel.
    """
    T, D = hidden.shape
    topk = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    # 32-bit keys: a radix sort over half the bits of the reference's int64 ids, same stable order
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts).to(torch.int32)
    order = torch.argsort(key, stable=True)
    # int64 counts, as the reference's. Not bincount: on CUDA it reads the largest key back to size its
    # result, a host sync that a graph capture refuses.
    per_key = torch.zeros(num_experts + 1, dtype=torch.int64, device=key.device).index_add_(
        0, key, torch.ones_like(key, dtype=torch.int64))
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing():  # a decode graph: no host sync, padded result (ops/__init__)
        n = T * topk
        order = torch.where(key[order] < num_experts, order, -1)  # dropped copies sort last: padding rows
    else:
        n = T * topk - int(per_key[num_experts])  # the host sync
        order = order[:n]
    out = torch.empty((n, D), dtype=hidden.dtype, device=hidden.device)
    if n and D:
        hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
        block = min(2048, triton.next_power_of_2(D))
        k.permute_kernel[(n, triton.cdiv(D, block))](hidden, order, out, D, hidden.stride(0), out.stride(0),
                                                     TOPK=topk, BLOCK_D=block, num_warps=4)
    return out, order, per_key[:num_experts]


def moe_unpermute(expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert rows back into token order, float32 accumulation.

    Args:
        expert_out: [N, D] rows in moe_permute's order; order: int64 [N] flat (token * k + j) index
            of each row, -1 for padding rows (skipped); weights: [T, k].
    Returns:
        [T, D] in expert_out's dtype. A gather per token (no atomics), so the result is deterministic.
    """
    T, topk = weights.shape
    N, D = expert_out.shape
    out = torch.empty((T, D), dtype=expert_out.dtype, device=expert_out.device)
    if T == 0:
        return out
    # slot -> row; padding rows (order -1, e.g. another backend's padded moe_permute) go to a spare slot
    inv = torch.full((T * topk + 1,), -1, dtype=torch.int32, device=expert_out.device)
    rows = torch.arange(N, dtype=torch.int32, device=expert_out.device)
    inv.scatter_(0, torch.where(order >= 0, order, T * topk), rows)
    inv = inv[:T * topk]
    expert_out = expert_out if expert_out.stride(-1) == 1 else expert_out.contiguous()
    w = weights.contiguous()
    block = min(2048, triton.next_power_of_2(D))
    k.unpermute_kernel[(T, triton.cdiv(D, block))](expert_out, inv, w, out, D, expert_out.stride(0),
                                                   out.stride(0), TOPK=topk, BLOCK_D=block, num_warps=4)
    return out
