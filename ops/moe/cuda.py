"""MoE ops on CUDA GPUs: grouped expert GEMMs with SwiGLU fused, and a deterministic unpermute.

moe_route, moe_permute and the EP collectives are the reference's: each is already a handful of
device kernels (`glm5-ascend bench ops` times them). They are re-exported so that
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
from .reference import moe_permute, moe_route

__all__ = ["grouped_mlp", "moe_unpermute", "moe_route", "moe_permute", "ep_dispatch", "ep_combine"]

# Launch settings, tuned on an H200 (docs/benchmarks.md); glm5-ascend bench ops may override them.
# "up" is the gate/up GEMM with SwiGLU fused, "down" the down projection. impl "triton" runs
# grouped_gemm_kernel, whose tiles take up to bm2 rows past their bm (0: none; see the kernel);
# "grouped_mm" runs torch._grouped_mm (bf16 only; SwiGLU then a separate Triton pass over the
# [N, 2I] product). tma: the Triton GEMM fetches its tiles with tensor descriptors on sm_90+
# (grouped_gemm_tma_kernel) where rows are 16-byte aligned.
CONFIG = {
    "up_impl": "triton", "down_impl": "triton", "tma": 1,
    "bm": 128, "bm2": 64, "up_bn": 128, "up_bk": 64, "up_warps": 8, "up_stages": 4,
    "down_bn": 256, "down_bk": 64, "down_warps": 8, "down_stages": 4, "group": 4, "order": "expert",
}


def _tiles(counts: torch.Tensor, n_rows: int, bm: int, group: int) -> tuple[torch.Tensor, int]:
    """[3, P] int32 (expert or -1, first row, end row) per M tile, P a static bound (no host sync)."""
    E = counts.shape[0]
    counts = counts.to(torch.int64)
    per = (counts + bm - 1) // bm
    cum = per.cumsum(0)
    P = triton.cdiv(triton.cdiv(n_rows, bm) + E, group) * group
    mt = torch.arange(P, device=counts.device)
    e = torch.searchsorted(cum, mt, right=True)
    ec = e.clamp(max=E - 1)
    starts = counts.cumsum(0) - counts
    r0 = starts[ec] + (mt - (cum[ec] - per[ec])) * bm
    r1 = starts[ec] + counts[ec]
    return torch.stack([torch.where(e < E, ec, -1), r0, r1]).to(torch.int32), P


def _order(counts: torch.Tensor, P: int, num_n: int, bm: int) -> torch.Tensor:
    """[2, P * num_n] int32 (M tile or -1, N tile): expert by expert, then N tile, M tile fastest."""
    counts = counts.to(torch.int64)
    per = (counts + bm - 1) // bm
    tstart = per.cumsum(0) - per
    pcum = (per * num_n).cumsum(0)
    pid = torch.arange(P * num_n, device=counts.device)
    e = torch.searchsorted(pcum, pid, right=True)
    ec = e.clamp(max=counts.shape[0] - 1)
    local = pid - (pcum[ec] - per[ec] * num_n)
    n_m = per[ec].clamp(min=1)
    mt = torch.where(e < counts.shape[0], tstart[ec] + local % n_m, -1)
    return torch.stack([mt, local // n_m]).to(torch.int32)


def _span() -> int:
    """Rows a tile covers: bm, plus bm2 for the rows an expert has beyond a multiple of bm."""
    bm2 = CONFIG["bm2"]
    if bm2 and (bm2 < 16 or bm2 & (bm2 - 1)):
        raise ValueError(f"moe CONFIG bm2={bm2}: use 0 or a power of two >= 16 (a tile's extra rows)")
    return CONFIG["bm"] + bm2


def _tma(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Tensor descriptors: CONFIG tma, a Hopper or later GPU (or Triton's CPU interpreter), 16-byte rows."""
    if not CONFIG["tma"] or TensorDescriptor is None:
        return False
    if x.is_cuda and (torch.version.hip is not None or torch.cuda.get_device_capability(x.device)[0] < 9):
        return False
    return all(row * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
               for t, row in ((x, x.stride(0)), (w, w.stride(1))))


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


def _gemm(x, w, out, tiles, P, counts, n_out, up_off, swiglu, bn, bk, warps, stages):
    cfg = CONFIG
    if x.element_size() > 2:  # float32 tiles: half the K step and fewer stages fit shared memory
        bk, stages = bk // 2, min(stages, 3)
    # sm_90 / sm_100 (wgmma, tcgen05) keep a buffer per stage; sm_80-89 and sm_120 (mma v2) one fewer.
    hopper = not x.is_cuda or 9 <= torch.cuda.get_device_capability(x.device)[0] < 12
    stages = fit_stages(stages, bn, bk, swiglu, x.element_size(), _max_smem(x.device), hopper)
    k_dim = x.shape[1]
    num_n = triton.cdiv(n_out, bn)
    by_expert = cfg["order"] == "expert"
    order = _order(counts, P, num_n, _span()) if by_expert else tiles
    if _tma(x, w):
        bm, bm2 = cfg["bm"], max(16, cfg["bm2"])
        E, w_rows = w.shape[0], w.shape[1]
        k.grouped_gemm_tma_kernel[(P * num_n,)](
            TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(x, [bm2, bk]),
            TensorDescriptor.from_tensor(w.view(E * w_rows, k_dim), [bn, bk]), out, tiles, P, n_out, k_dim,
            w_rows, up_off, out.stride(0), order, P * num_n, NUM_N=num_n, BM=bm, BM2=bm2, BN=bn, BK=bk,
            GROUP=cfg["group"], SWIGLU=swiglu, PREC="ieee" if x.dtype == torch.float32 else "tf32",
            BY_EXPERT=by_expert, REM=cfg["bm2"] > 0, num_warps=warps, num_stages=stages)
        return
    k.grouped_gemm_kernel[(P * num_n,)](
        x, w, out, tiles, P, x.shape[0], n_out, k_dim, up_off, x.stride(0), w.stride(0), w.stride(1),
        out.stride(0), order, P * num_n, NUM_N=num_n, BM=cfg["bm"], BM2=max(16, cfg["bm2"]), BN=bn, BK=bk,
        GROUP=cfg["group"], SWIGLU=swiglu, EVEN_K=k_dim % bk == 0,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", BY_EXPERT=by_expert, REM=cfg["bm2"] > 0,
        num_warps=warps, num_stages=stages)


def grouped_mlp(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over rows grouped by expert.

    Args:
        x: [N, D] rows sorted by expert; counts: [E] rows per expert (sum N).
        w13: [E, 2I, D] gate rows then up rows; w2: [E, D, I].
    Returns:
        [N, D] in x's dtype.
    """
    N, D = x.shape
    E, I2, _ = w13.shape
    inter = I2 // 2
    out = torch.empty((N, D), dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    cfg = CONFIG
    x = x.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    use_mm = x.dtype == torch.bfloat16 and D % 8 == 0 and inter % 8 == 0  # _grouped_mm: bf16, 16-byte rows
    tiles = P = offs = None
    if not (use_mm and cfg["up_impl"] == "grouped_mm" and cfg["down_impl"] == "grouped_mm"):
        tiles, P = _tiles(counts, N, _span(), cfg["group"])
    if use_mm and "grouped_mm" in (cfg["up_impl"], cfg["down_impl"]):
        offs = counts.cumsum(0).to(torch.int32)
    h = torch.empty((N, inter), dtype=x.dtype, device=x.device)
    if use_mm and cfg["up_impl"] == "grouped_mm":
        gu = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
        block = min(1024, triton.next_power_of_2(inter))
        k.swiglu_kernel[(N, triton.cdiv(inter, block))](gu, h, inter, gu.stride(0), h.stride(0), BLOCK=block)
    else:
        _gemm(x, w13, h, tiles, P, counts, inter, inter, True, cfg["up_bn"], cfg["up_bk"], cfg["up_warps"], cfg["up_stages"])
    if use_mm and cfg["down_impl"] == "grouped_mm":
        out = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    else:
        _gemm(h, w2, out, tiles, P, counts, D, 0, False, cfg["down_bn"], cfg["down_bk"], cfg["down_warps"], cfg["down_stages"])
    return out


def moe_unpermute(expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert rows back into token order, float32 accumulation.

    Args:
        expert_out: [N, D] rows in moe_permute's order; order: int64 [N] flat (token * k + j) index
            of each row; weights: [T, k].
    Returns:
        [T, D] in expert_out's dtype. A gather per token (no atomics), so the result is deterministic.
    """
    T, topk = weights.shape
    N, D = expert_out.shape
    out = torch.empty((T, D), dtype=expert_out.dtype, device=expert_out.device)
    if T == 0:
        return out
    inv = torch.full((T * topk,), -1, dtype=torch.int32, device=expert_out.device)
    inv.scatter_(0, order, torch.arange(N, dtype=torch.int32, device=expert_out.device))
    expert_out = expert_out if expert_out.stride(-1) == 1 else expert_out.contiguous()
    w = weights.contiguous()
    block = min(2048, triton.next_power_of_2(D))
    k.unpermute_kernel[(T, triton.cdiv(D, block))](expert_out, inv, w, out, D, expert_out.stride(0),
                                                   out.stride(0), TOPK=topk, BLOCK_D=block, num_warps=4)
    return out
