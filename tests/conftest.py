"""Shared fixtures: the built-in tiny model in a per-session cache dir, HF reference checkpoints."""
from __future__ import annotations

import os

import pytest

# Device for the engine tests: cpu in CI; GLM5_TEST_DEVICE=cuda runs the same tests on a GPU.
TEST_DEVICE = os.environ.get("GLM5_TEST_DEVICE", "cpu")


def _triton_interpreter_works() -> bool:
    """Triton installed, no CUDA GPU, and not Triton < 3.7 with NumPy >= 2.4 (that interpreter fails
    converting loop bounds)."""
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        return False
    import torch
    if torch.cuda.is_available():
        return False
    from importlib.metadata import PackageNotFoundError, version
    try:
        tri_version = version("triton")
    except PackageNotFoundError:  # shipped under another name (pytorch-triton): ask the module
        import triton
        tri_version = triton.__version__
    tri = tuple(int(x) for x in tri_version.split(".")[:2])
    npy = tuple(int(x) for x in version("numpy").split(".")[:2])
    return not (tri < (3, 7) and npy >= (2, 4))


# Without a GPU, the cuda backend's Triton kernels run in Triton's CPU interpreter where it works
# (tests/ops/test_cuda.py, small float32 cases). Set before any kernel module is imported.
if "TRITON_INTERPRET" not in os.environ and _triton_interpreter_works():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Point GLM5_CACHE_DIR at a temp dir so tests never touch (or depend on) the user's cache."""
    if "GLM5_TEST_KEEP_CACHE" not in os.environ:
        os.environ["GLM5_CACHE_DIR"] = str(tmp_path_factory.mktemp("glm5-cache"))
    yield


@pytest.fixture(autouse=True)
def _fresh_op_bindings():
    """Ops bind their backend on first call (glm5_ascend.ops.rebind); a test that changed
    GLM5_OPS_BACKEND* or torch_npu must not leave its bindings to the next."""
    from glm5_ascend import ops
    ops.rebind()
    yield
    ops.rebind()


@pytest.fixture(scope="session")
def tiny_model_dir():
    from glm5_ascend.model.tiny import default_model_path
    return str(default_model_path())
