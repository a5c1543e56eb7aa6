"""A stand-in `torch_npu` for hosts without an NPU: exactly the ops the npu backend calls.

Each function has the official torch-npu signature (checked against the wheel by
tests/ops/test_npu_contract.py), the official output shapes and dtypes, and reference math. It is
installed into sys.modules only by test fixtures (`installed()`), only where no real torch_npu exists;
it never registers torch.npu, so the platform stays cpu.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys

from .dsa import (npu_lightning_indexer, npu_scatter_nd_update_, npu_scatter_pa_kv_cache,
                  npu_sparse_flash_attention)
from .mc2 import npu_moe_distribute_combine_v2, npu_moe_distribute_dispatch_v2, register_group
from .moe import (npu_grouped_matmul, npu_moe_gating_top_k, npu_moe_init_routing_v2, npu_moe_token_unpermute,
                  npu_swiglu)

OPS = (
    "npu_lightning_indexer", "npu_sparse_flash_attention", "npu_scatter_pa_kv_cache", "npu_scatter_nd_update_",
    "npu_moe_gating_top_k", "npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu",
    "npu_moe_token_unpermute", "npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2",
)
EMULATED = True
# Modules that `import torch_npu` at their top; dropped on install/uninstall so they bind the right one.
_NPU_MODULES = ("glm5_ascend.ops.dsa.npu", "glm5_ascend.ops.moe.npu")

__all__ = list(OPS) + ["register_group", "installed", "real_torch_npu_present"]


def real_torch_npu_present() -> bool:
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return not getattr(mod, "EMULATED", False)
    return importlib.util.find_spec("torch_npu") is not None


@contextlib.contextmanager
def installed():
    """sys.modules['torch_npu'] = this emulator for the duration (a no-op where real torch_npu exists)."""
    if real_torch_npu_present():
        yield sys.modules.get("torch_npu")
        return
    previous = sys.modules.get("torch_npu")
    for name in _NPU_MODULES:
        sys.modules.pop(name, None)
    sys.modules["torch_npu"] = sys.modules[__name__]
    try:
        yield sys.modules[__name__]
    finally:
        for name in _NPU_MODULES:
            sys.modules.pop(name, None)
        if previous is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous
