"""scripts/setup.sh: a CPU host gets the CPU build of torch (no nvidia-* wheels), pinned; torch_npu follows torch."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
# pip's messages when no index answers (DNS, refused connections, timeouts).
_OFFLINE = re.compile(r"NewConnectionError|Name or service not known|Temporary failure in name resolution|"
                      r"Network is unreachable|ConnectTimeout|Read timed out|ProxyError")


def _setup(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "PIP_DEFAULT_TIMEOUT": "20", "PIP_RETRIES": "1", **env}
    return subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True, env=full, timeout=600)


def _commands(r: subprocess.CompletedProcess) -> list[str]:
    assert r.returncode == 0, r.stderr
    return [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]


def test_cpu_host_installs_pinned_torch_from_the_cpu_index():
    cmds = _commands(_setup("--print", "--dev", GLM5_SETUP_DEVICE="cpu"))
    assert cmds[0].endswith("-m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    assert cmds[1].endswith("-m pip install -e .[dev]")
    pinned = _commands(_setup("--print", GLM5_SETUP_DEVICE="cpu", GLM5_TORCH_VERSION="2.12.0"))
    assert "torch==2.12.0 --index-url https://download.pytorch.org/whl/cpu" in pinned[0]


def test_gpu_host_keeps_pypi_and_npu_pins_torch_npu_to_torch(tmp_path):
    cuda = _commands(_setup("--print", GLM5_SETUP_DEVICE="cuda"))
    assert cuda[0].endswith("-m pip install torch==2.13.0")  # PyPI's Linux wheel is the CUDA build: wanted there
    fake_bin = tmp_path / "bin"  # an Ascend host that also has nvidia-smi must still get the CPU build
    fake_bin.mkdir()
    for tool in ("nvidia-smi", "npu-smi"):
        (fake_bin / tool).write_text("#!/bin/sh\nexit 0\n")
        (fake_bin / tool).chmod(0o755)
    npu = _commands(_setup("--print", "--npu", PATH=f"{fake_bin}:{os.environ['PATH']}"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in npu[0]
    assert npu[1:] == [f"{sys.executable} -m pip install -e .", f"{sys.executable} -m pip install torch_npu==2.13.0.*"]
    nvidia_only = fake_bin / "npu-smi"
    nvidia_only.unlink()
    gpu = _commands(_setup("--print", PATH=f"{fake_bin}:{os.environ['PATH']}"))
    assert gpu[0].endswith("-m pip install torch==2.13.0")


def test_unknown_option_is_one_line():
    r = _setup("--cuda")
    assert r.returncode == 2 and r.stderr.strip() == (
        "setup.sh: unknown option --cuda (use --dev, --npu, --print or --dry-run)")


def test_dry_run_resolves_no_nvidia_wheels_on_a_cpu_host(tmp_path):
    """pip's own resolver, through the script: what the torch step would install on a CPU host."""
    report = tmp_path / "report.json"
    r = _setup("--dry-run", GLM5_SETUP_DEVICE="cpu", GLM5_SETUP_REPORT=str(report))
    if r.returncode != 0 and _OFFLINE.search(r.stderr):
        pytest.skip(f"pip reached no index: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    installs = {item["metadata"]["name"].lower(): item for item in json.loads(report.read_text())["install"]}
    assert installs["torch"]["metadata"]["version"].split("+")[0] == "2.13.0"
    assert installs["torch"]["metadata"]["version"].endswith("+cpu")
    cuda = sorted(name for name in installs if name.startswith("nvidia-") or name == "triton")
    assert not cuda, f"a CPU host would get CUDA packages: {cuda}"
