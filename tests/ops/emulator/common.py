"""What every emulated op shares: the official error style and the dtype policy."""
from __future__ import annotations

import torch

# Official: the DSA kernels take bfloat16 / float16. The emulator also accepts float32 (on CPU) so the
# float32 tests and the fp32 model parity run through the npu wrappers; the wrappers themselves refuse
# float32 on a real NPU device.
HALF_OR_FP32 = (torch.bfloat16, torch.float16, torch.float32)
MAX_INT64 = 9223372036854775807


class EmulatorLimit(NotImplementedError):
    """An official option the emulator does not model (the npu backend never passes it)."""


def require(cond: bool, op: str, msg: str) -> None:
    """The real ops fail with a RuntimeError naming the violated rule; so do we."""
    if not cond:
        raise RuntimeError(f"{op}: {msg}")


def limit(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise EmulatorLimit(f"{op} (emulator): {msg}")


def undefined_like(shape, dtype, device) -> torch.Tensor:
    """Output the docs call undefined: NaN / an out-of-range index, so a wrapper that reads it fails."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)
