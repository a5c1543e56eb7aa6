"""Which Atlas generation (a2 | a3) the npu backend is running on: the op limits differ between them.

GLM5_NPU_DEVICE (envs.npu_device) decides when set. Otherwise the NPU's name does, as torch_npu reports
it through torch.npu.get_device_name(): Atlas A2 chips are "Ascend910B1".."Ascend910B4", Atlas A3
dies "Ascend910_93xx" (vllm-ascend tells them apart the same way, by SoC version 220-225 vs 250-255).
Where torch.npu does not exist (the CPU host, where tests stand the contract emulator in for
torch_npu) the default is a3, and the tests set GLM5_NPU_DEVICE to choose.

No torch_npu import here: torch.npu exists once ops/*/npu.py imported torch_npu.
"""
from __future__ import annotations

import functools

import torch

from glm5_ascend import envs

PROFILES = ("a2", "a3")
_NAME_PREFIXES = (("Ascend910B", "a2"), ("Ascend910_93", "a3"))


def device_profile() -> str:
    """'a2' or 'a3' for the current process (GLM5_NPU_DEVICE, else the NPU's name, else a3 off-NPU)."""
    return envs.npu_device() or _detected()


@functools.lru_cache(maxsize=None)
def _detected() -> str:
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return "a3"
    name = npu.get_device_name()
    return profile_of_name(name)


def profile_of_name(name: str) -> str:
    """The profile of an NPU name as torch.npu.get_device_name() gives it; one-line error if unknown."""
    for prefix, profile in _NAME_PREFIXES:
        if name.startswith(prefix):
            return profile
    raise RuntimeError(f"NPU {name!r} is neither an Atlas A2 (Ascend910B*) nor an A3 (Ascend910_93*) part, whose "
                       "op limits the npu backend knows; set GLM5_NPU_DEVICE=a2 or a3 if it behaves as one")
