"""Shared fixtures: the built-in tiny model in a per-session cache dir, HF reference checkpoints."""
from __future__ import annotations

import os

import pytest

# Device for the engine tests: cpu in CI; GLM5_TEST_DEVICE=cuda runs the same tests on a GPU.
TEST_DEVICE = os.environ.get("GLM5_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Point GLM5_CACHE_DIR at a temp dir so tests never touch (or depend on) the user's cache."""
    if "GLM5_TEST_KEEP_CACHE" not in os.environ:
        os.environ["GLM5_CACHE_DIR"] = str(tmp_path_factory.mktemp("glm5-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_model_dir():
    from glm5_ascend.model.tiny import default_model_path
    return str(default_model_path())
