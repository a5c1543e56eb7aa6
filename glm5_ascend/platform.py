"""The device platform: npu | cuda | cpu.

This is the one module (besides ops/*/npu.py) that imports torch_npu, and only when it is
importable. Everything device-specific that is not an operator goes through here.
"""
from __future__ import annotations

import functools
import importlib.util
import os
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

    def new_graph(self):
        """An empty torch.cuda.CUDAGraph / torch.npu.NPUGraph (aclgraph); None on cpu (no graphs)."""
        if self.name == "cuda":
            return torch.cuda.CUDAGraph()
        if self.name == "npu":
            return torch.npu.NPUGraph()
        return None

    def graph_pool(self):
        """A memory-pool handle the captured graphs share (they never run at the same time)."""
        mod = self.module()
        return mod.graph_pool_handle() if mod is not None else None

    def capture(self, graph, pool):
        """Context manager capturing this stream's work into `graph` (torch.cuda.graph / torch.npu.graph)."""
        return self.module().graph(graph, pool=pool)


# Below this hidden size a CPU rank runs fastest on one intra-op thread: its matmuls are too small to
# repay waking more threads every op (docs/benchmarks.md, "CPU threads"; measured with `bench serve`).
CPU_ONE_THREAD_BELOW_HIDDEN = 1024


def cpu_threads(hidden_size: int | None = None, local_ranks: int = 1) -> int:
    """Intra-op threads for one CPU rank: GLM5_CPU_THREADS, else OMP_NUM_THREADS, else 1 for a model with
    hidden_size below CPU_ONE_THREAD_BELOW_HIDDEN, else this node's cores shared between its ranks."""
    forced = envs.cpu_threads()
    if forced is not None:
        return forced
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    if hidden_size is not None and hidden_size < CPU_ONE_THREAD_BELOW_HIDDEN:
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, local_ranks))


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


def _npu_missing() -> str | None:
    """Why the npu platform cannot be used here (None if it can)."""
    if importlib.util.find_spec("torch_npu") is None:
        return ("torch_npu is not installed; on an Ascend host with CANN run `bash scripts/setup.sh --npu` "
                "(torch_npu 2.13 needs CANN 9.2.0), elsewhere use cpu or cuda")
    try:
        import torch_npu  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the reason goes into the message
        return (f"torch_npu fails to import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "source CANN's set_env.sh (e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh) and check that its "
                "release matches torch_npu's")
    if not (getattr(torch, "npu", None) and torch.npu.is_available()):
        return "torch_npu is installed but no NPU is visible; check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES"
    return None


@functools.lru_cache(maxsize=None)
def _detect(forced: str | None, source: str = "GLM5_DEVICE") -> Platform:
    """The platform; `forced` names one (from `source`: the GLM5_DEVICE variable or the --device flag)."""
    if forced:
        given = f"{source}={forced}" if source == "GLM5_DEVICE" else f"{source} {forced}"
        if forced not in _DIST_BACKENDS:
            raise ValueError(f"{given} is not a platform; use one of npu, cuda, cpu")
        if forced == "cuda" and not torch.cuda.is_available():
            fix = "unset it or set it to cpu" if source == "GLM5_DEVICE" else "pass --device cpu (or auto)"
            why = ("this torch is a CPU build" if torch.version.cuda is None
                   else "no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"{given}: {why}; {fix}")
        if forced == "npu":
            missing = _npu_missing()
            if missing:
                raise ValueError(f"{given}: {missing}")
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
    """The platform owning `device` ("cpu", "cuda:1", "npu"...; the --device flag), or the detected one if
    None / auto. Parsed here, not by torch.device: torch rejects "npu" until torch_npu is imported."""
    if device is None or device == "auto":
        return current_platform()
    kind = device.type if isinstance(device, torch.device) else str(device).split(":", 1)[0]
    return _detect(kind, "--device")
