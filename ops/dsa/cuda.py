"""DSA ops on CUDA GPUs: Triton kernels (ops/dsa/cuda_kernels.py) behind the reference signatures.

Contracts are those of ops/dsa/reference.py, with two documented differences in lightning_indexer:
equal scores at the K-th place are broken toward the lower position (the reference reproduces
transformers' topk choice instead; prompt_lens and tie_flags are accepted and unused here), and the positions are
not sorted by score: those above the K-th score come first, then the ties at it, each group
ascending. No wrapper syncs with the host, so decode steps can be captured in CUDA graphs.
"""
from __future__ import annotations

import functools
import warnings

import torch
import triton
from triton.errors import TritonError
from triton.runtime.errors import OutOfResources

from . import cuda_kernels as k
from .reference import interleaved_rope  # noqa: F401  (elementwise: torch is fine; re-exported so
#                                          GLM5_OPS_BACKEND=cuda covers every op the model calls)

# Launch settings, tuned on an H200 (docs/benchmarks.md); glm5-ascend bench ops may override them.
# topk_reg: rows up to this many positions are selected in registers (0: always stream from L2).
CONFIG = {
    "indexer_block_n": 128, "indexer_chunk": 2048, "indexer_warps": 4, "indexer_stages": 3,
    "topk_chunk": 4096, "topk_digit": 2, "topk_warps": 32, "topk_reg": 32768,
    "mla_block_n": 64, "mla_block_h": 64, "mla_warps": 8, "mla_stages": 2, "mla_waves": 1.0, "mla_splits": None,
    "mla_preslot": 1, "mla_combine_heads": 8,
    # mla_pdl: the merge kernel is launched with programmatic dependent launch (sm_90+), so its
    # launch overlaps the attention kernel's tail.
    "mla_pdl": 1,
    # Hopper: the warp-specialised Gluon kernel (cuda_sm90.py) for 16-bit caches with R=512, Dr=64.
    "mla_sm90": 1, "mla_sm90_block_n": 64, "mla_sm90_stages": 2, "mla_sm90_pv_regs": 192, "mla_sm90_load_regs": 72,
    "mla_sm90_maxnreg": 168,
    # mla_sm90_part16: split partial outputs in the output's 16-bit dtype (half the bytes written by
    # the attention kernel and read by the merge), stored through shared memory as whole rows.
    "mla_sm90_part16": 1,
}
# Rows of the 32-bit score-key scratch held at once (bounds prefill memory like the reference does).
_MAX_SCORE_ELEMS = 1 << 27


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _prec(dtype: torch.dtype) -> str:
    # float32 models (tests, the tiny model) must match the reference's fp32 math, so no tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _sm90_module(device: torch.device):
    """ops/dsa/cuda_sm90.py on an sm_90 GPU whose Triton has Gluon, else None."""
    if device.type != "cuda" or torch.version.hip is not None or torch.cuda.get_device_capability(device) != (9, 0):
        return None
    try:
        from . import cuda_sm90
    except ImportError:  # a Triton without Gluon's Hopper ops: the portable kernel serves
        return None
    return cuda_sm90


# Why the sm90 kernel is off in this process, once it failed to compile (e.g. a Triton whose Gluon
# API moved); the portable Triton kernel serves from then on.
SM90_DISABLED: list[str] = []


def _use_sm90(q_latent, latent_cache, R: int, DR: int) -> bool:
    return (bool(CONFIG["mla_sm90"]) and not SM90_DISABLED and R == 512 and DR == 64
            and latent_cache.dtype in (torch.bfloat16, torch.float16)
            and _sm90_module(q_latent.device) is not None)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # Triton's interpreter on CPU: any value works
    return torch.cuda.get_device_properties(device).multi_processor_count


def mla_cache_write(latent, k_rope, index_k, slot_mapping, latent_cache, rope_cache, index_cache) -> None:
    """Write latent [T, R], rope key [T, Dr], index key [T, Di] to slot_mapping [T] (-1 skipped)."""
    T = latent.shape[0]
    if T == 0:
        return
    R, DR = latent_cache.shape[-1], rope_cache.shape[-1]
    has_index = index_cache is not None and index_k is not None
    DI = index_cache.shape[-1] if has_index else 16
    for c in (latent_cache, rope_cache) + ((index_cache,) if has_index else ()):
        assert c.is_contiguous(), "paged caches must be contiguous [num_blocks, block_size, D]"
    # Casting here (not in the kernel) rounds exactly as the reference's .to(cache dtype) does.
    latent = latent.to(latent_cache.dtype).contiguous()
    k_rope = k_rope.to(rope_cache.dtype).contiguous()
    index_k = index_k.to(index_cache.dtype).contiguous() if has_index else latent
    k.mla_cache_write_kernel[(T,)](
        slot_mapping, latent, k_rope, index_k, latent_cache, rope_cache,
        index_cache if has_index else latent_cache, latent.stride(0), k_rope.stride(0), index_k.stride(0),
        R=R, DR=DR, DI=DI, R_P=_p2(R), DR_P=_p2(DR), DI_P=_p2(DI), HAS_INDEX=has_index, num_warps=4)


def lightning_indexer(q, weights, index_cache, block_tables, cu_seqlens_q, seq_lens, topk, softmax_scale,
                      prompt_lens=None, tie_flags=None):
    """Top-k causal context positions per query token.

    Args:
        q: [T, H, D] (rope applied); weights: [T, H] float32; index_cache: [num_blocks, block_size, D].
        block_tables: int32 [B, max_blocks]; cu_seqlens_q: int32 [B+1]; seq_lens: int32 [B].
    Returns:
        int32 [T, topk]; -1 padded where the context is shorter than topk.
    """
    T, H, D = q.shape
    out = torch.empty((T, topk), dtype=torch.int32, device=q.device)
    if T == 0 or topk == 0:
        return out
    if q.dtype != index_cache.dtype:
        q = q.to(index_cache.dtype)
    q = q if q.stride(-1) == 1 else q.contiguous()
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    B = seq_lens.shape[0]
    block_size = index_cache.shape[1]
    L = block_tables.shape[1] * block_size  # the most positions any sequence can address
    rows = max(1, min(T, _MAX_SCORE_ELEMS // max(1, L)))
    keys = torch.empty((rows, L), dtype=torch.int32, device=q.device)  # uint32 bits: sortable scores
    cfg = CONFIG
    if topk + cfg["topk_chunk"] >= 1 << 16:  # the select ranks with 16-bit fields (topk_select_kernel)
        raise ValueError(f"lightning_indexer (cuda): topk {topk} must be below {(1 << 16) - cfg['topk_chunk']}; "
                         "use GLM5_OPS_BACKEND_LIGHTNING_INDEXER=reference for larger ones")
    # Tiles that never straddle a cache block read each chunk's block ids once (indexer_scores_kernel).
    nbc = max(1, cfg["indexer_chunk"] // block_size)
    whole = block_size % cfg["indexer_block_n"] == 0 and cfg["indexer_chunk"] % block_size == 0 and nbc & (nbc - 1) == 0
    for t0 in range(0, T, rows):
        n = min(T, t0 + rows) - t0
        k.indexer_scores_kernel[(n, triton.cdiv(L, cfg["indexer_chunk"]))](
            q, weights, index_cache, block_tables, cu_seqlens_q, seq_lens, keys, t0, B,
            q.stride(0), q.stride(1), weights.stride(0), block_tables.stride(0), keys.stride(0),
            float(softmax_scale), H=H, D=D, H_P=_p2(H), D_P=_p2(D), B_P=_p2(B, 2),
            BLOCK_SIZE=block_size, BLOCK_N=cfg["indexer_block_n"], CHUNK=cfg["indexer_chunk"],
            PREC=_prec(q.dtype), WHOLE=whole, NBC=nbc,
            num_warps=cfg["indexer_warps"], num_stages=cfg["indexer_stages"])
        k.topk_select_kernel[(n,)](
            keys, out, cu_seqlens_q, seq_lens, t0, B, topk, keys.stride(0), out.stride(0),
            B_P=_p2(B, 2), CHUNK=cfg["topk_chunk"], DIGIT=cfg["topk_digit"],
            REG=min(cfg["topk_reg"], _p2(L)) if cfg["topk_reg"] else 16, num_warps=cfg["topk_warps"])
    return out


def _split_plan(out, lse, head_blocks: int, K: int, block_n: int, part_dtype: torch.dtype = torch.float32):
    """Split each top-k list so a decode batch fills the GPU; the splits are merged by lse.

    Returns (splits, split_len, part_o [splits, T, H, R], part_lse [splits, T, H]): partial outputs
    in part_dtype (lse in float32) with several splits, else views of out / lse the kernel writes
    directly."""
    T, H, R = out.shape
    if CONFIG["mla_splits"]:
        splits = int(CONFIG["mla_splits"])
    else:
        want = round(_num_sms(out.device) * CONFIG["mla_waves"] / (T * head_blocks))
        splits = max(1, min(want, triton.cdiv(K, block_n), 16))
    split_len = triton.cdiv(triton.cdiv(K, splits), block_n) * block_n
    splits = triton.cdiv(K, split_len) if K else 1
    if splits == 1:
        return 1, split_len, out.view(1, T, H, R), lse.view(1, T, H)
    return (splits, split_len, torch.empty((splits, T, H, R), dtype=part_dtype, device=out.device),
            torch.empty((splits, T, H), dtype=torch.float32, device=out.device))


def sparse_mla_attention(q_latent, q_rope, latent_cache, rope_cache, block_tables, cu_seqlens_q,
                         seq_lens, topk_indices, softmax_scale, return_lse=False):
    """Absorbed sparse MLA over each query's top-k positions (decode and prefill alike).

    Args:
        q_latent: [T, H, R]; q_rope: [T, H, Dr]; latent_cache / rope_cache: [num_blocks, block_size, R / Dr].
        topk_indices: int32 [T, K] positions, -1 padded.
    Returns:
        out [T, H, R] in q_latent's dtype; with return_lse also lse [T, H] float32 (natural log).
    """
    T, H, R = q_latent.shape
    DR = q_rope.shape[-1]
    K = topk_indices.shape[1]
    out = torch.empty((T, H, R), dtype=q_latent.dtype, device=q_latent.device)
    lse = torch.empty((T, H), dtype=torch.float32, device=q_latent.device)
    if T == 0:
        return (out, lse) if return_lse else out
    dt = latent_cache.dtype
    ql = q_latent.to(dt) if q_latent.dtype != dt else q_latent
    qr = q_rope.to(dt) if q_rope.dtype != dt else q_rope
    ql = ql if ql.stride(-1) == 1 else ql.contiguous()
    qr = qr if qr.stride(-1) == 1 else qr.contiguous()
    idx = topk_indices if topk_indices.stride(-1) == 1 else topk_indices.contiguous()
    if not (latent_cache.is_contiguous() and rope_cache.is_contiguous()) or rope_cache.dtype != dt:
        raise ValueError("sparse_mla_attention (cuda): latent_cache and rope_cache must be contiguous and of one "
                         f"dtype (got {dt} and {rope_cache.dtype}); the kernels address rows as slot * width")
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous()
    if _use_sm90(q_latent, latent_cache, R, DR):
        try:
            _sparse_mla_sm90(ql, qr, latent_cache, rope_cache, block_tables, cu_seqlens_q, seq_lens, idx, out,
                             lse, softmax_scale)
            return (out, lse) if return_lse else out
        except TritonError as e:  # compile errors, ptxas failures, too little shared memory: before launch
            SM90_DISABLED.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
            warnings.warn(f"sparse_mla_attention: the sm90 kernel does not compile with Triton {triton.__version__} "
                          f"({SM90_DISABLED[0]}); using the portable Triton kernel", stacklevel=2)
    B = seq_lens.shape[0]
    if CONFIG["mla_preslot"]:  # positions -> cache slots once, outside the attention kernel
        assert latent_cache.shape[0] * latent_cache.shape[1] < 2 ** 31, "int32 cache slots"
        slots = torch.empty((T, K), dtype=torch.int32, device=q_latent.device)
        k.mla_slots_kernel[(T, triton.cdiv(K, 1024))](
            idx, block_tables, cu_seqlens_q, seq_lens, slots, B, K, idx.stride(0), block_tables.stride(0),
            B_P=_p2(B, 2), BLOCK_SIZE=latent_cache.shape[1], BLOCK=1024, num_warps=4)
        idx = slots
    want = (max(16, min(CONFIG["mla_block_h"], _p2(H))), CONFIG["mla_block_n"])  # tl.dot needs M >= 16
    key = (q_latent.device, dt, R, DR, want, CONFIG["mla_warps"], CONFIG["mla_stages"])
    tiles = _smaller_tiles(want)
    tiles = tiles[tiles.index(_FITTED[key]):] if key in _FITTED else tiles  # a known fit first, then smaller
    for i, (block_h, block_n) in enumerate(tiles):
        try:
            _sparse_mla_triton(ql, qr, latent_cache, rope_cache, block_tables, cu_seqlens_q, seq_lens, idx, out, lse,
                               softmax_scale, block_h, block_n)
        except OutOfResources as e:  # raised before the launch, so nothing was written
            if i + 1 == len(tiles):
                raise RuntimeError(f"sparse_mla_attention (cuda): no tile of the Triton kernel fits this GPU ({e}); "
                                   "use GLM5_OPS_BACKEND_SPARSE_MLA_ATTENTION=reference") from e
            continue
        _FITTED[key] = (block_h, block_n)
        break
    return (out, lse) if return_lse else out


# The Triton kernel's (block_h, block_n) per (device, dtype, R, Dr, configured tiles, warps, stages),
# once a launch has shown what fits: the configured tiles are an H200's and fit an A100; GPUs with
# 99 KB of shared memory per block (L4, L40, RTX 4090 / 5090) need 32 x 32 at GLM-5's dims.
_FITTED: dict = {}


def _smaller_tiles(want: tuple[int, int]) -> list[tuple[int, int]]:
    """want, then smaller (block_h, block_n) to try when a launch needs more shared memory than the GPU has."""
    return list(dict.fromkeys([want] + [(min(want[0], h), min(want[1], n)) for h, n in ((32, 32), (16, 32), (16, 16))]))


def _sparse_mla_triton(ql, qr, latent_cache, rope_cache, block_tables, cu_seqlens_q, seq_lens, idx, out, lse,
                       softmax_scale, block_h, block_n) -> None:
    """sparse_mla_attention through cuda_kernels.sparse_mla_kernel (idx holds slots with mla_preslot)."""
    cfg = CONFIG
    T, H, R = ql.shape
    K = idx.shape[1]
    hb = triton.cdiv(H, block_h)
    splits, split_len, part_o, part_l = _split_plan(out, lse, hb, K, block_n)
    B = seq_lens.shape[0]
    k.sparse_mla_kernel[(T, hb, splits)](
        ql, qr, latent_cache, rope_cache, block_tables, cu_seqlens_q, seq_lens, idx, part_o, part_l,
        B, H, K, split_len, ql.stride(0), ql.stride(1), qr.stride(0), qr.stride(1),
        block_tables.stride(0), idx.stride(0), part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_l.stride(0), part_l.stride(1), float(softmax_scale) * 1.4426950408889634,
        R=R, DR=qr.shape[-1], R_P=_p2(R), DR_P=_p2(qr.shape[-1]), BLOCK_H=block_h, B_P=_p2(B, 2),
        BLOCK_SIZE=latent_cache.shape[1], BLOCK_N=block_n, PREC=_prec(latent_cache.dtype),
        PRESLOT=cfg["mla_preslot"], num_warps=cfg["mla_warps"], num_stages=cfg["mla_stages"])
    if splits > 1:
        _combine(part_o, part_l, out, lse)


def _combine(part_o, part_l, out, lse) -> None:
    """Merge per-split outputs [S, T, H, R] and lse [S, T, H] into out / lse by their lse weights."""
    splits, T, H, R = part_o.shape
    block_h = min(CONFIG["mla_combine_heads"], _p2(H, 1))
    pdl = (bool(CONFIG["mla_pdl"]) and k.gdc_wait is not None and out.is_cuda and torch.version.hip is None
           and torch.cuda.get_device_capability(out.device)[0] >= 9)  # PTX griddepcontrol: NVIDIA sm_90+
    k.mla_combine_kernel[(T, triton.cdiv(H, block_h))](
        part_o, part_l, out, lse, splits, H, part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_l.stride(0), part_l.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        SPLITS_P=_p2(splits, 2), R=R, R_P=_p2(R), BLOCK_H=block_h, PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}))


def _sparse_mla_sm90(ql, qr, latent_cache, rope_cache, block_tables, cu_seqlens_q, seq_lens, idx, out, lse,
                     softmax_scale) -> None:
    """sparse_mla_attention through cuda_sm90.py (64-head programs; block-table lookups in the kernel)."""
    cfg = CONFIG
    T, H, R = ql.shape
    K = idx.shape[1]
    B = seq_lens.shape[0]
    block_n = cfg["mla_sm90_block_n"]
    hb = triton.cdiv(H, 64)
    assert latent_cache.shape[0] * latent_cache.shape[1] < 2 ** 31, "int32 cache slots"
    part_dtype = out.dtype if cfg["mla_sm90_part16"] else torch.float32
    splits, split_len, part_o, part_l = _split_plan(out, lse, hb, K, block_n, part_dtype)
    _sm90_module(ql.device).sparse_mla_sm90_kernel[(T, hb, splits)](
        ql, qr, latent_cache, rope_cache, idx, block_tables, cu_seqlens_q, part_o, part_l, B, H, K, split_len,
        ql.stride(0), ql.stride(1), qr.stride(0), qr.stride(1), idx.stride(0), block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_l.stride(0), part_l.stride(1),
        float(softmax_scale) * 1.4426950408889634, R=R, DR=qr.shape[-1], BN=block_n, STAGES=cfg["mla_sm90_stages"],
        BLOCK_SIZE=latent_cache.shape[1], B_P=_p2(B, 2), PV_REGS=cfg["mla_sm90_pv_regs"],
        LOAD_REGS=cfg["mla_sm90_load_regs"], num_warps=4, maxnreg=cfg["mla_sm90_maxnreg"])
    if splits > 1:
        _combine(part_o, part_l, out, lse)
