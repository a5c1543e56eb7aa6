"""CPU intra-op threads: chosen by model size (one thread for small models, measured in docs/benchmarks.md),
overridden by GLM5_CPU_THREADS or OMP_NUM_THREADS; spawned ranks share the cores."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from glm5_ascend.platform import CPU_ONE_THREAD_BELOW_HIDDEN, cpu_threads


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("GLM5_CPU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_size_rule(clean_env):
    assert cpu_threads(128) == 1  # the tiny model
    assert cpu_threads(CPU_ONE_THREAD_BELOW_HIDDEN - 1) == 1
    assert cpu_threads(CPU_ONE_THREAD_BELOW_HIDDEN) == 8  # every core
    assert cpu_threads(6144, local_ranks=2) == 4  # GLM-5 over two ranks of one node
    assert cpu_threads(None, local_ranks=3) == 2  # size unknown: the cores shared


def test_overrides(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(128) == 3 and cpu_threads(6144, local_ranks=4) == 3
    clean_env.setenv("GLM5_CPU_THREADS", "5")  # ours wins over OMP_NUM_THREADS
    assert cpu_threads(128) == 5
    clean_env.setenv("GLM5_CPU_THREADS", "0")
    with pytest.raises(ValueError, match=r"^GLM5_CPU_THREADS='0' must be a whole number >= 1$"):
        cpu_threads(128)


def _config(hidden: int):
    return SimpleNamespace(device="cpu", model=SimpleNamespace(hidden_size=hidden))


def test_one_process_engine_sets_torch_threads(clean_env):
    from glm5_ascend.engine.executor import _cpu_threads
    torch.set_num_threads(2)
    _cpu_threads(_config(128))
    assert torch.get_num_threads() == 1
    _cpu_threads(_config(4096))
    assert torch.get_num_threads() == 8
    clean_env.setenv("GLM5_CPU_THREADS", "2")
    _cpu_threads(_config(128))
    assert torch.get_num_threads() == 2


def test_spawned_ranks_share_the_cores_unless_told(clean_env):
    from glm5_ascend.engine.cluster import _pin_threads
    _pin_threads("cpu", 4)
    assert torch.get_num_threads() == 2
    clean_env.setenv("GLM5_CPU_THREADS", "1")
    _pin_threads("cpu", 4)
    assert torch.get_num_threads() == 1
