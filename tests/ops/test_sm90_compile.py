"""The Hopper sparse MLA kernel (ops/dsa/cuda_sm90.py) compiles for sm_90 on any host with Triton.

Triton compiles Gluon kernels ahead of time for a named target without a GPU (it ships ptxas), so
this catches API misuse, layout errors and a shared-memory budget overrun on machines that cannot run
the kernel. Running it against the reference is tests/ops/test_cuda.py's job, on an sm_90 GPU.

The compile runs in a child process without TRITON_INTERPRET: tests/conftest.py turns Triton's CPU
interpreter on for the other kernel tests, and the interpreter's patched builtins break Gluon.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is None,
    reason="needs triton with Gluon's Hopper ops (scripts/setup.sh --dev installs it on x86_64)")

H100_SMEM_PER_BLOCK = 232448  # bytes, the opt-in maximum on sm_90
VARIANTS = [(dtype, split_out) for dtype in ("bf16", "fp16") for split_out in (True, False)]

_CHILD = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from glm5_ascend.ops.dsa import cuda_sm90
from glm5_ascend.ops.dsa.cuda import CONFIG

def stack_bytes(cubin):
    """The kernel's stack frame (spilled registers) by cuobjdump, which Triton ships; None without it."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"STACK:(\d+)", out)
    return int(m.group(1)) if m else None


results = {}
for dtype, split_out in json.loads(sys.argv[1]):
    ptr = "*" + dtype
    sig = dict(ql_ptr=ptr, qr_ptr=ptr, lat_ptr=ptr, rope_ptr=ptr, idx_ptr="*i32", bt_ptr="*i32", cu_ptr="*i32",
               o_ptr="*fp32" if split_out else ptr, lse_ptr="*fp32", B="i32", H="i32", K="i32", split_len="i32",
               s_qlt="i32", s_qlh="i32", s_qrt="i32", s_qrh="i32", s_idx="i32", s_bt="i32", s_os="i32",
               s_ot="i32", s_oh="i32", s_ls="i32", s_lt="i32", scale_log2="fp32",
               R="constexpr", DR="constexpr", BN="constexpr", STAGES="constexpr", BLOCK_SIZE="constexpr",
               B_P="constexpr", PV_REGS="constexpr", LOAD_REGS="constexpr")
    const = dict(R=512, DR=64, BN=CONFIG["mla_sm90_block_n"], STAGES=CONFIG["mla_sm90_stages"], BLOCK_SIZE=64,
                 B_P=64, PV_REGS=CONFIG["mla_sm90_pv_regs"], LOAD_REGS=CONFIG["mla_sm90_load_regs"])
    names = list(sig)
    # The divisibility-by-16 hints the launcher adds for pointers (without them loads compile scalar)
    # and for the integers that are multiples of 16 at GLM-5's shapes (strides, K, split lengths).
    ints16 = ("K", "split_len", "s_qlt", "s_qlh", "s_qrt", "s_qrh", "s_idx", "s_os", "s_ot", "s_oh", "s_ls", "s_lt")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n in ints16}
    src = GluonASTSource(fn=cuda_sm90.sparse_mla_sm90_kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    key = f"{dtype}-{split_out}"
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 4, "maxnreg": CONFIG["mla_sm90_maxnreg"]})
        ptx = kernel.asm["ptx"]
        results[key] = {"shared": kernel.metadata.shared,
                        "ops": all(op in ptx for op in ("wgmma.mma_async", "cp.async.mbarrier.arrive.noinc",
                                                        "setmaxnreg")),
                        "stack": stack_bytes(kernel.asm["cubin"])}
    except Exception as e:  # report the innermost cause: Triton wraps it once per call frame
        while e.__cause__ is not None:
            e = e.__cause__
        results[key] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # compile for real, not from a cache
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(VARIANTS)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype,split_out", VARIANTS, ids=[f"{d}-{'float32_partials' if s else 'final_output'}"
                                                           for d, s in VARIANTS])
def test_sm90_sparse_mla_compiles_for_hopper(compiled, dtype, split_out):
    result = compiled[f"{dtype}-{split_out}"]
    assert "error" not in result, result.get("error")
    assert result["shared"] <= H100_SMEM_PER_BLOCK, f"{result['shared']} bytes of shared memory"
    assert result["ops"], "expected wgmma, cp.async completion on mbarriers and setmaxnreg in the PTX"
    # CONFIG's register split (mla_sm90_pv_regs, mla_sm90_load_regs, maxnreg) leaves no partition
    # spilling: with 56 loader registers its look-ahead spilled 24 bytes (docs/benchmarks.md).
    if result["stack"] is not None:
        assert result["stack"] == 0, f"{result['stack']} bytes of stack: a partition spills registers"
