"""A stand-in `torch_npu` for hosts without an NPU: exactly the ops the npu backend calls.

Each function has the official torch-npu signature (checked against the wheel by
tests/ops/test_npu_contract.py), the official output shapes and dtypes, the documented limits of the
active device profile (profiles.py: a2 or a3, default a3) and reference math. It is installed into
sys.modules only by test fixtures (`installed()`), only where no real torch_npu exists; it never
registers torch.npu, so the platform stays cpu. While installed, no torch.distributed collective may
run on a registered MC2 communicator (mc2.guard). `capturable()` (capture.py) fails on host syncs made
outside the emulated kernels.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib.machinery
import importlib.util
import sys
import types

from . import capture, mc2

from . import profiles
from .capture import HostSync, capturable
from .dsa import (npu_interleave_rope, npu_lightning_indexer, npu_scatter_nd_update_, npu_scatter_pa_kv_cache,
                  npu_sparse_flash_attention)
from .mc2 import comm_name, npu_moe_distribute_combine_v2, npu_moe_distribute_dispatch_v2, register_group
from .moe import (npu_grouped_matmul, npu_moe_gating_top_k, npu_moe_init_routing_v2, npu_moe_token_unpermute,
                  npu_swiglu)
from .quant import npu_dynamic_quant, npu_quant_matmul

OPS = (
    "npu_interleave_rope", "npu_lightning_indexer", "npu_sparse_flash_attention", "npu_scatter_pa_kv_cache",
    "npu_scatter_nd_update_",
    "npu_moe_gating_top_k", "npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu",
    "npu_moe_token_unpermute", "npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2",
    "npu_dynamic_quant", "npu_quant_matmul",
)
EMULATED = True
# Modules that `import torch_npu` at their top; dropped on install/uninstall so they bind the right one.
_NPU_MODULES = ("glm5_ascend.ops.dsa.npu", "glm5_ascend.ops.moe.npu", "glm5_ascend.ops.quant.npu")

__all__ = list(OPS) + ["register_group", "comm_name", "installed", "real_torch_npu_present", "capturable",
                       "HostSync", "profiles", "use_profile"]


def real_torch_npu_present() -> bool:
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return not getattr(mod, "EMULATED", False)
    return importlib.util.find_spec("torch_npu") is not None


def _counting_module():
    """A fresh `torch_npu` module whose ops count their calls (signatures kept via functools.wraps)."""
    calls = collections.Counter()
    mod = types.ModuleType("torch_npu", __doc__)
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)  # find_spec("torch_npu") must not fail
    mod.EMULATED, mod.calls, mod.register_group = True, calls, register_group
    this = sys.modules[__name__]
    for name in OPS:
        fn = getattr(this, name)

        @functools.wraps(fn)
        def counted(*args, __fn=fn, __name=name, **kwargs):
            calls[__name] += 1
            with capture.kernel():  # the kernel's own reads are not the wrapper's host syncs
                return __fn(*args, **kwargs)
        setattr(mod, name, counted)
    return mod


@contextlib.contextmanager
def use_profile(name: str):
    """Both sides on device profile `name` (a2 | a3): the limits the emulator enforces, and the npu
    backend's own choice (GLM5_NPU_DEVICE). On a real NPU only the backend's is set."""
    import os
    previous = os.environ.get("GLM5_NPU_DEVICE")
    os.environ["GLM5_NPU_DEVICE"] = name
    try:
        with profiles.use(name):
            yield
    finally:
        if previous is None:
            os.environ.pop("GLM5_NPU_DEVICE", None)
        else:
            os.environ["GLM5_NPU_DEVICE"] = previous


@contextlib.contextmanager
def installed(profile: str | None = None):
    """sys.modules['torch_npu'] = the emulator for the duration; yields it (its `.calls` counts op calls).

    profile: a2 | a3 for both the emulator and the backend (use_profile); None leaves both as they are
    (the emulator's default is a3, the backend's GLM5_NPU_DEVICE or a3). Where a real torch_npu exists
    this installs nothing and yields the real module.
    """
    if real_torch_npu_present():
        import torch_npu
        with contextlib.ExitStack() as stack:
            if profile is not None:
                stack.enter_context(use_profile(profile))
            yield torch_npu
        return
    from glm5_ascend import ops
    previous = sys.modules.get("torch_npu")
    for name in _NPU_MODULES:
        sys.modules.pop(name, None)
    mod = sys.modules["torch_npu"] = _counting_module()
    ops.rebind()  # ops bound before this point hold the previous torch_npu's backend functions
    mc2.reset()
    stack = contextlib.ExitStack()
    stack.enter_context(mc2.guard())
    if profile is not None:
        stack.enter_context(use_profile(profile))
    try:
        with stack:
            yield mod
    finally:
        ops.rebind()
        for name in _NPU_MODULES:
            sys.modules.pop(name, None)
        if previous is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous
