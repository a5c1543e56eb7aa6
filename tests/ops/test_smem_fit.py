"""The cuda backend's Triton kernels fit the shared memory of GPUs older or smaller than an H200.

The launch settings in ops/*/cuda.py were tuned on an H200 (227 KB of shared memory per block). An
A100 has 163 KB, and the sm_86 / sm_89 / sm_120 parts (A10, L4, L40, RTX 3090 / 4090 / 5090) 99 KB. The wrappers fit
their settings to the GPU: grouped_mlp caps its pipeline stages (moe.cuda.fit_stages), and
sparse_mla_attention retries smaller tiles when a launch runs out of shared memory (dsa.cuda
_smaller_tiles; the retry itself is tested in test_cuda.py). Triton compiles for a named target
without a GPU, so this checks, on any host with Triton, that what the wrappers would launch on those
GPUs fits them (and, for sm_90, that the H200's own settings fit it). Only the compile is checked
here; of these GPUs only an H200 has run the kernels.

The compile runs in a child process without TRITON_INTERPRET, which tests/conftest.py may set.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

def _triton_version() -> tuple[int, int]:
    if importlib.util.find_spec("triton") is None:
        return (0, 0)
    import triton
    return tuple(int(p) for p in triton.__version__.split(".")[:2])


pytestmark = pytest.mark.skipif(_triton_version() < (3, 6), reason="needs triton >= 3.6, the versions these settings "
                                "were checked with (scripts/setup.sh --dev installs it on x86_64)")

# Opt-in shared memory per block, bytes. On sm_90 grouped_mlp takes the tensor-descriptor kernel.
GPUS = {"A100 (sm_80)": (80, 166912), "L40 (sm_89)": (89, 101376), "H100 (sm_90)": (90, 232448),
        "RTX 5090 (sm_120)": (120, 101376)}

_CHILD = r'''
import json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from glm5_ascend.ops.dsa import cuda as dsa, cuda_kernels as dk
from glm5_ascend.ops.moe import cuda as moe, cuda_kernels as mk

cap, smem = json.loads(sys.argv[1])
# Integer arguments the launcher would see as multiples of 16 at GLM-5's shapes (it specialises them).
DIV16 = {"s_qlt", "s_qlh", "s_qrt", "s_qrh", "s_idx", "s_os", "s_ot", "s_oh", "s_ls", "s_lt", "K", "split_len",
         "s_qt", "s_qh", "s_wt", "s_bt", "s_score", "s_x", "s_we", "s_wn", "s_o", "k_dim", "n_out", "up_off",
         "w_rows", "s_key", "s_out"}


def shared(fn, sig, consts, warps, stages):
    sig = dict(sig, **{n: "constexpr" for n in consts})
    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n in DIV16}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": stages})
    return kernel.metadata.shared


out = {}
cfg = dsa.CONFIG
mla_sig = dict(ql_ptr="*bf16", qr_ptr="*bf16", lat_ptr="*bf16", rope_ptr="*bf16", bt_ptr="*i32", cu_ptr="*i32",
               seq_lens_ptr="*i32", idx_ptr="*i32", o_ptr="*fp32", lse_ptr="*fp32",
               **{n: "i32" for n in ("B", "H", "K", "split_len", "s_qlt", "s_qlh", "s_qrt", "s_qrh", "s_bt", "s_idx",
                                     "s_os", "s_ot", "s_oh", "s_ls", "s_lt")}, scale_log2="fp32")
mla = {}
for bh, bn in dsa._smaller_tiles((cfg["mla_block_h"], cfg["mla_block_n"])):
    consts = dict(R=512, DR=64, R_P=512, DR_P=64, BLOCK_H=bh, B_P=64, BLOCK_SIZE=128, BLOCK_N=bn, PREC="tf32",
                  PRESLOT=bool(cfg["mla_preslot"]))
    mla[f"{bh}x{bn}"] = shared(dk.sparse_mla_kernel, mla_sig, consts, cfg["mla_warps"], cfg["mla_stages"])
out["sparse_mla"] = mla
idx_sig = dict(q_ptr="*bf16", w_ptr="*fp32", cache_ptr="*bf16", bt_ptr="*i32", cu_ptr="*i32", seq_lens_ptr="*i32",
               score_ptr="*i32", **{n: "i32" for n in ("t_base", "B", "s_qt", "s_qh", "s_wt", "s_bt", "s_score")},
               scale="fp32")
nbc = cfg["indexer_chunk"] // 128
out["indexer_scores"] = shared(dk.indexer_scores_kernel, idx_sig,
                               dict(H=32, D=128, H_P=32, D_P=128, B_P=64, BLOCK_SIZE=128, BLOCK_N=cfg["indexer_block_n"],
                                    CHUNK=cfg["indexer_chunk"], PREC="tf32", WHOLE=True, NBC=nbc),
                               cfg["indexer_warps"], cfg["indexer_stages"])
sel_sig = dict(key_ptr="*i32", out_ptr="*i32", cu_ptr="*i32", seq_lens_ptr="*i32",
               **{n: "i32" for n in ("t_base", "B", "K", "s_key", "s_out")})
out["topk_select"] = shared(dk.topk_select_kernel, sel_sig, dict(B_P=64, CHUNK=cfg["topk_chunk"], DIGIT=cfg["topk_digit"],
                                                                 REG=cfg["topk_reg"]), cfg["topk_warps"], 3)
mc = moe.CONFIG
bm, bm2 = mc["bm"], max(16, mc["bm2"])
for name, swiglu, bn, bk, warps, stages in (("up", True, mc["up_bn"], mc["up_bk"], mc["up_warps"], mc["up_stages"]),
                                            ("down", False, mc["down_bn"], mc["down_bk"], mc["down_warps"],
                                             mc["down_stages"])):
    fitted = moe.fit_stages(stages, bn, bk, swiglu, 2, smem, hopper=90 <= cap < 120)
    if cap >= 90:  # what grouped_mlp launches there for the model's (packed) weights
        fn = mk.grouped_gemm_tma_kernel
        r1, r2, r3 = moe._remainders(mc["bm2"])
        sig = dict(x_desc=f"tensordesc<bf16[{bm}, {bk}]>",
                   **{f"xr{i}_desc": f"tensordesc<bf16[{r}, {bk}]>" for i, r in ((1, r1), (2, r2), (3, r3))},
                   w_desc=f"tensordesc<bf16[{bn}, {bk}]>", out_ptr="*bf16", table_ptr="*i32",
                   **{n: "i32" for n in ("n_progs", "n_out", "k_dim", "w_rows", "up_off", "s_o", "KT")})
        consts = dict(BM=bm, R1=r1, R2=r2, R3=r3, BN=bn, BK=bk, SWIGLU=swiglu, PACKED=True, PREC="tf32",
                      REM=mc["bm2"] > 0)
    else:
        fn = mk.grouped_gemm_kernel
        sig = dict(x_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", table_ptr="*i32",
                   **{n: "i32" for n in ("n_progs", "N", "n_out", "k_dim", "up_off", "s_x", "s_we", "s_wn", "s_o")})
        consts = dict(BM=bm, BM2=bm2, BN=bn, BK=bk, SWIGLU=swiglu, EVEN_K=True, PREC="tf32", REM=mc["bm2"] > 0)
    out[f"grouped_{name}"] = {"stages": fitted, "shared": shared(fn, sig, consts, warps, fitted),
                              "one_more": shared(fn, sig, consts, warps, fitted + 1)}
print(json.dumps(out))
'''


@pytest.fixture(scope="module", params=sorted(GPUS))
def gpu(request, tmp_path_factory):
    cap, smem = GPUS[request.param]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([cap, smem])], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, smem, json.loads(proc.stdout.strip().splitlines()[-1])


def test_sparse_mla_triton_kernel_has_a_tile_that_fits(gpu):
    name, smem, got = gpu
    fits = [tile for tile, used in got["sparse_mla"].items() if used <= smem]
    assert fits, f"{name}: no tile of sparse_mla_kernel fits {smem} bytes: {got['sparse_mla']}"
    if name.startswith(("A100", "H100")):  # the H200's tiles fit these as they are
        assert next(iter(got["sparse_mla"].values())) <= smem, got["sparse_mla"]


def test_indexer_kernels_fit(gpu):
    name, smem, got = gpu
    assert got["indexer_scores"] <= smem and got["topk_select"] <= smem, (name, got)


@pytest.mark.parametrize("proj", ["up", "down"])
def test_grouped_gemm_stages_are_the_most_that_fit(gpu, proj):
    name, smem, got = gpu
    g = got[f"grouped_{proj}"]
    assert g["shared"] <= smem, (name, g)
    assert g["one_more"] > smem or g["stages"] == moe_config()[f"{proj}_stages"], (name, g)


def moe_config():
    from glm5_ascend.ops.moe.cuda import CONFIG
    return CONFIG
