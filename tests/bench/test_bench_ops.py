"""`glm5-ascend bench ops`, run as users run it. On a CPU host it times the small cases with the
reference backend (the GPU figures live in docs/benchmarks.md); bad flags are one-line errors."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

OPS = ["lightning_indexer", "sparse_mla_decode", "sparse_mla_prefill", "mla_cache_write", "grouped_mlp",
       "moe_route", "moe_permute", "moe_unpermute"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm5_ascend.cli", "bench", "ops", *args], capture_output=True,
                          text=True, timeout=300)


def test_cpu_run_prints_every_op_and_appends_to_output(tmp_path):
    out = tmp_path / "bench.md"
    proc = bench("--device", "cpu", "--iters", "2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| op ")
            and not line.startswith("| ---")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == OPS
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "reference" and cells[5] == "n/a (cpu)", row  # no peak is claimed for a CPU
        assert cells[3].endswith(("µs", "ms")), row
    written = out.read_text()
    assert "glm5-ascend bench ops --device cpu --iters 2" in written and all(op in written for op in OPS)


@pytest.mark.parametrize("args,message", [
    (["--ops", "attention"], "--ops: unknown attention; choose from lightning_indexer"),
    (["--iters", "0"], "--iters must be at least 1"),
    (["--set", "mla_block_n=32"], "expected FAMILY.KEY=VALUE"),
    (["--device", "tpu"], "--device tpu: bench ops runs on npu, npu:N, cuda, cuda:N or cpu"),
])
def test_bad_flags_are_one_line_errors(args, message):
    proc = bench("--device", "cpu", *args)
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert message in line


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="this host may have an NPU")
def test_npu_without_torch_npu_says_what_is_missing():
    proc = bench("--device", "npu")
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "--device npu: torch_npu or an NPU is missing; install glm5-ascend[npu]" in line


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the cuda settings need triton to import")
@pytest.mark.parametrize("item,message", [
    ("dsa.mla_blockn=32", "no setting 'mla_blockn'; dsa has indexer_block_n"),
    ("moe.up_stages=four", "up_stages takes an integer (now 4)"),
    ("dsa.mla_waves=x", "mla_waves takes a number (now 1.0)"),
])
def test_bad_settings_are_one_line_errors(item, message):
    proc = bench("--device", "cpu", "--ops", "mla_cache_write", "--set", item)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert message in line


@pytest.mark.parametrize("q_per_seq", [1, 40])
def test_mla_cases_pass_positions_as_the_cuda_indexer_emits_them(q_per_seq):
    """Ascending within each row with the -1 padding last, so the op is timed on the model's input."""
    from glm5_ascend.bench.ops import _mla_inputs
    args, T = _mla_inputs(torch.device("cpu"), 3, 60, 2, 16, 8, 48, q_per_seq=q_per_seq)
    idx = args[7]
    assert idx.dtype == torch.int32 and idx.shape == (T, 48)
    for row, q in zip(idx.tolist(), range(T)):
        real = [p for p in row if p >= 0]
        assert row == real + [-1] * (len(row) - len(real)) and real == sorted(set(real))
    assert (idx < 0).any() == (q_per_seq > 1)  # early prefill queries see fewer than 48 positions
