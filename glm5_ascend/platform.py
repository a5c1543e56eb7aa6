"""The device platform: npu | cuda | cpu.

This is the one module (besides ops/*/npu.py) that imports torch_npu, and only when it is
importable. Everything device-specific that is not an operator goes through here.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from glm5_ascend import envs

_DIST_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


@dataclass(frozen=True)
class Platform:
    name: str  # npu | cuda | cpu

    @property
    def dist_backend(self) -> str:
        return _DIST_BACKENDS[self.name]

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu") if self.name == "cpu" else torch.device(self.name, index)

    def module(self):
        """torch.cuda or torch.npu (after torch_npu is imported); None on cpu."""
        if self.name == "cpu":
            return None
        return getattr(torch, self.name)

    def synchronize(self) -> None:
        mod = self.module()
        if mod is not None:
            mod.synchronize()

    def mem_get_info(self, index: int = 0) -> tuple[int, int]:
        """(free, total) bytes of device memory; host memory on cpu."""
        mod = self.module()
        if mod is not None:
            return mod.mem_get_info(index)
        return _host_memory()

    def set_device(self, index: int) -> None:
        """Bind this process to device `index` (before any process group is made: HCCL / NCCL need it)."""
        mod = self.module()
        if mod is not None:
            if index >= mod.device_count():
                raise ValueError(f"this process needs {self.name} device {index}, but {mod.device_count()} are "
                                 "visible; give each rank its own device (ASCEND_RT_VISIBLE_DEVICES / "
                                 "CUDA_VISIBLE_DEVICES) or use fewer ranks per node")
            mod.set_device(index)

    def supports_graphs(self) -> bool:
        return self.name in ("cuda", "npu")


def _host_memory() -> tuple[int, int]:
    total = free = 0
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        total, free = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        pass
    return free, total


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:  # a broken CANN install must not take the CPU path down with it
        return False
    return bool(getattr(torch, "npu", None)) and torch.npu.is_available()


@functools.lru_cache(maxsize=None)
def _detect(forced: str | None) -> Platform:
    if forced:
        if forced not in _DIST_BACKENDS:
            raise ValueError(f"GLM5_DEVICE={forced!r} is not a platform; use one of npu, cuda, cpu")
        if forced == "cuda" and not torch.cuda.is_available():
            raise ValueError("GLM5_DEVICE=cuda but no CUDA device is visible; unset it or use cpu")
        if forced == "npu" and not npu_available():
            raise ValueError("GLM5_DEVICE=npu but torch_npu or an NPU is missing; install glm5-ascend[npu] on an Ascend host")
        return Platform(forced)
    if npu_available():
        return Platform("npu")
    if torch.cuda.is_available():
        return Platform("cuda")
    return Platform("cpu")


def current_platform() -> Platform:
    """The platform of this process (GLM5_DEVICE overrides detection)."""
    return _detect(envs.device())


def platform_for_device(device: str | torch.device | None) -> Platform:
    """The platform owning `device` ("cpu", "cuda:1", "npu"...), or the detected one if None."""
    if device is None or device == "auto":
        return current_platform()
    kind = torch.device(device).type if not isinstance(device, torch.device) else device.type
    return _detect(kind)
