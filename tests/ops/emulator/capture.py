"""Capturable mode: fail when wrapper code syncs with the host, as an aclgraph capture would.

A graph capture (aclgraph on the NPU, CUDA graphs on a GPU) records device work only; anything that
makes the host wait for a device value (.item(), int(t), bool(t), .tolist(), .cpu(), boolean-mask
indexing, nonzero, and ops whose output size depends on data: unique, masked_select, bincount,
repeat_interleave with tensor repeats) cannot be captured. Inside `capturable()` those calls raise
HostSync, except while an emulated torch_npu kernel runs (`kernel()`): a real kernel does its work on
the device, and the emulator's reference math may read values freely.

Tensors here live on the CPU, where none of these calls costs anything, so the detector watches the
calls themselves, not their cost.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_state = threading.local()


class HostSync(AssertionError):
    """A wrapper synchronised with the host inside capturable()."""


def _kernel_depth() -> int:
    return getattr(_state, "kernel", 0)


@contextlib.contextmanager
def kernel():
    """Marks an emulated kernel call: host reads inside it are the kernel's business."""
    _state.kernel = _kernel_depth() + 1
    try:
        yield
    finally:
        _state.kernel -= 1


def _flag(what: str) -> None:
    raise HostSync(f"host sync in capturable code: {what}")


def _is_mask(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


# Reads of device values onto the host, and ops whose output size depends on the data.
_SYNCS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
          "unique_consecutive", "_unique2", "masked_select", "bincount"}


def _sync_in(func, args, kwargs) -> str | None:
    name = getattr(func, "__name__", "")
    owner = "Tensor" if getattr(func, "__qualname__", "").startswith(("Tensor.", "TensorBase.")) else "torch"
    what = f"{owner}.{name}"
    if name in _SYNCS:
        return what
    if name in ("__getitem__", "__setitem__") and len(args) > 1 and _is_mask(args[1]):
        return what + " with a boolean mask"
    if name in ("index_put_", "index_put") and len(args) > 1 and _is_mask(args[1]):
        return what + " with a boolean mask"
    if name == "repeat_interleave":
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return what + " with tensor repeats"
    if name == "where" and len(args) + len(kwargs) == 1:
        return what + " (one argument: nonzero)"
    return None


class _Detector(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _kernel_depth() == 0:
            what = _sync_in(func, args, kwargs)
            if what:
                _flag(what)
        return func(*args, **kwargs)


@contextlib.contextmanager
def capturable():
    """Raise HostSync on any host sync made outside emulated kernels for the duration (a TorchFunctionMode,
    so every torch function and Tensor method is seen; nothing is patched)."""
    with _Detector():
        yield
