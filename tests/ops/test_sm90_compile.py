"""The Hopper sparse MLA kernel (ops/dsa/cuda_sm90.py) compiles for sm_90 on any host with Triton.

Triton compiles Gluon kernels ahead of time for a named target without a GPU (it ships ptxas), so
this catches API misuse, layout errors and a shared-memory budget overrun on machines that cannot run
the kernel. Running it against the reference is tests/ops/test_cuda.py's job, on an sm_90 GPU.
"""
from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is None,
    reason="needs triton with Gluon's Hopper ops (the cuda extra); CPU-only installs have no triton")

H100_SMEM_PER_BLOCK = 232448  # bytes, the opt-in maximum on sm_90


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("split_out", [True, False], ids=["float32_partials", "final_output"])
def test_sm90_sparse_mla_compiles_for_hopper(dtype, split_out, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from a cache
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from glm5_ascend.ops.dsa import cuda_sm90
    from glm5_ascend.ops.dsa.cuda import CONFIG

    ptr = f"*{dtype}"
    sig = dict(ql_ptr=ptr, qr_ptr=ptr, lat_ptr=ptr, rope_ptr=ptr, idx_ptr="*i32", bt_ptr="*i32", cu_ptr="*i32",
               o_ptr="*fp32" if split_out else ptr, lse_ptr="*fp32", B="i32", H="i32", K="i32", split_len="i32",
               s_qlt="i32", s_qlh="i32", s_qrt="i32", s_qrh="i32", s_idx="i32", s_bt="i32", s_os="i32",
               s_ot="i32", s_oh="i32", s_ls="i32", s_lt="i32", scale_log2="fp32",
               R="constexpr", DR="constexpr", BN="constexpr", STAGES="constexpr", BLOCK_SIZE="constexpr",
               B_P="constexpr", PV_REGS="constexpr", LOAD_REGS="constexpr")
    const = dict(R=512, DR=64, BN=CONFIG["mla_sm90_block_n"], STAGES=CONFIG["mla_sm90_stages"], BLOCK_SIZE=64,
                 B_P=64, PV_REGS=CONFIG["mla_sm90_pv_regs"], LOAD_REGS=CONFIG["mla_sm90_load_regs"])
    names = list(sig)
    # The 16-byte alignment hints the launcher adds for pointers; without them loads compile scalar.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    src = GluonASTSource(fn=cuda_sm90.sparse_mla_sm90_kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "maxnreg": CONFIG["mla_sm90_maxnreg"]})
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK, f"{kernel.metadata.shared} bytes of shared memory"
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.mbarrier.arrive.noinc" in ptx and "setmaxnreg" in ptx
