"""Every GLM5_* environment variable, typed, in one place."""
from __future__ import annotations

import os
from pathlib import Path


def _str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def ops_backend() -> str | None:
    """GLM5_OPS_BACKEND: force every op to one backend (reference | npu | cuda)."""
    return _str("GLM5_OPS_BACKEND")


def ops_backend_for(op: str) -> str | None:
    """GLM5_OPS_BACKEND_<OP>: force one op, e.g. GLM5_OPS_BACKEND_GROUPED_MLP=reference."""
    return _str(f"GLM5_OPS_BACKEND_{op.upper()}")


def ops_check_values() -> bool:
    """GLM5_OPS_CHECK_VALUES=1: also check the ops' index arguments' values (syncs the device; ops/checks.py)."""
    value = _str("GLM5_OPS_CHECK_VALUES", "0")
    if value not in ("0", "1"):
        raise ValueError(f"GLM5_OPS_CHECK_VALUES must be 0 or 1, got {value!r}")
    return value == "1"


def device() -> str | None:
    """GLM5_DEVICE: force the platform (npu | cuda | cpu)."""
    return _str("GLM5_DEVICE")


def npu_device() -> str | None:
    """GLM5_NPU_DEVICE: the Atlas generation whose op limits the npu backend follows (a2 | a3). Unset: read
    from the NPU's name (Ascend910B* is a2, Ascend910_93* is a3; ops/npu_profile.py)."""
    value = _str("GLM5_NPU_DEVICE")
    if value is not None and value not in ("a2", "a3"):
        raise ValueError(f"GLM5_NPU_DEVICE must be a2 or a3, got {value!r}")
    return value


def cache_dir() -> Path:
    """GLM5_CACHE_DIR, else $XDG_CACHE_HOME/glm5_ascend, else ~/.cache/glm5_ascend."""
    explicit = _str("GLM5_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = _str("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glm5_ascend"


def cpu_kv_cache_gib() -> float:
    """GLM5_CPU_KV_CACHE_GIB: KV cache size on the CPU platform (like vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    return float(_str("GLM5_CPU_KV_CACHE_GIB", "1"))


def cpu_threads() -> int | None:
    """GLM5_CPU_THREADS: intra-op threads of each CPU rank (unset: chosen by model size, platform.cpu_threads;
    OMP_NUM_THREADS, if set, is respected the same way)."""
    value = _str("GLM5_CPU_THREADS")
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"GLM5_CPU_THREADS={value!r} must be a whole number >= 1")
    return int(value)


def api_keys() -> list[str]:
    """VLLM_API_KEY / GLM5_API_KEY: API keys accepted by the server, comma separated."""
    keys = []
    for name in ("VLLM_API_KEY", "GLM5_API_KEY"):
        value = _str(name)
        if value:
            keys.extend(k.strip() for k in value.split(",") if k.strip())
    return keys


def _seconds(name: str, default: float) -> float:
    value = _str(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{name}={value!r} must be positive")
    return seconds


def startup_timeout() -> float:
    """GLM5_STARTUP_TIMEOUT: seconds rank 0 waits for every rank (node) to join, and a node for rank 0's store."""
    return _seconds("GLM5_STARTUP_TIMEOUT", 600.0)


def collective_timeout() -> float:
    """GLM5_COLLECTIVE_TIMEOUT: seconds a collective of the model may wait for a peer before the engine stops
    (below /health's 60 s promise; every rank does the same work between two collectives)."""
    return _seconds("GLM5_COLLECTIVE_TIMEOUT", 50.0)


def heartbeat_timeout() -> float:
    """GLM5_HEARTBEAT_TIMEOUT: seconds without a heartbeat after which rank 0 declares a rank dead."""
    return _seconds("GLM5_HEARTBEAT_TIMEOUT", 20.0)
