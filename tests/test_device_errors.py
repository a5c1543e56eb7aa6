"""A device the host cannot use is one line naming the flag (or variable) the user set, what is missing, the fix."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from glm5_ascend import platform as plat

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
no_torch_npu = pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")


@no_cuda
def test_cuda_flag_is_named_not_the_variable(monkeypatch):
    monkeypatch.delenv("GLM5_DEVICE", raising=False)
    with pytest.raises(ValueError) as e:
        plat.platform_for_device("cuda:1")
    msg = str(e.value)
    assert msg.startswith("--device cuda: ") and "GLM5_DEVICE" not in msg and "--device cpu" in msg
    monkeypatch.setenv("GLM5_DEVICE", "cuda")
    with pytest.raises(ValueError, match=r"^GLM5_DEVICE=cuda: .*unset it or set it to cpu"):
        plat.platform_for_device("auto")


@no_torch_npu
def test_npu_without_torch_npu_says_how_to_install_it():
    with pytest.raises(ValueError, match=r"^--device npu: torch_npu is not installed; on an Ascend host with CANN "
                                         r"run `bash scripts/setup.sh --npu`"):
        plat.platform_for_device("npu:0")  # torch.device("npu:0") itself would raise torch's own error here


def test_npu_that_fails_to_import_names_cann(monkeypatch):
    class _Spec:  # torch_npu "installed", but importing it fails as it does without CANN's libraries
        pass
    monkeypatch.setattr(plat.importlib.util, "find_spec", lambda name: _Spec() if name == "torch_npu" else None)
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` raise ImportError
    plat._detect.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"^--device npu: torch_npu fails to import .*set_env\.sh"):
            plat.platform_for_device("npu")
    finally:
        plat._detect.cache_clear()


def test_unknown_platform_names_the_variable(monkeypatch):
    monkeypatch.setenv("GLM5_DEVICE", "tpu")
    with pytest.raises(ValueError, match=r"^GLM5_DEVICE=tpu is not a platform; use one of npu, cuda, cpu$"):
        plat.current_platform()


@no_cuda
@no_torch_npu
@pytest.mark.parametrize("command,device", [("serve", "npu"), ("generate", "cuda")])
def test_cli_device_errors_are_one_line(command, device):
    args = ["--prompt", "hi"] if command == "generate" else ["--port", "1"]
    env = {k: v for k, v in os.environ.items() if k != "GLM5_DEVICE"}
    r = subprocess.run([sys.executable, "-m", "glm5_ascend.cli", command, "--device", device, *args],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"glm5-ascend: error: --device {device}: ")
