"""Sharded loading: a rank's peak memory while building and loading its shard is its share, plus a margin.

Each case runs in a fresh interpreter (a used allocator would hide growth) that builds the model of
one rank of a layout and loads a ~280 MB float32 checkpoint into it, while a thread samples the
process's anonymous memory (RssAnon) every millisecond. Loading must not build a whole tensor the
rank does not own: the stated margin is the largest single piece the rank reads (the copy between
safetensors and the parameter) plus 24 MiB for the interpreter's own allocations. A loader that read
whole tensors and narrowed them would exceed it by the 128 MiB embedding and lm_head.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MiB = 1 << 20
MARGIN = 24 * MiB


def _write_checkpoint(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from glm5_ascend.config import ModelConfig
    from glm5_ascend.model.tiny import _checkpoint_shapes, tiny_config
    raw = tiny_config(65536)
    raw.update(hidden_size=512, intermediate_size=1024, moe_intermediate_size=512, num_hidden_layers=2,
               index_topk_pattern="FS", num_nextn_predict_layers=0, first_k_dense_replace=1)
    cfg = ModelConfig.from_dict(raw)
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=gen) * 0.02 for n, s in _checkpoint_shapes(cfg).items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(raw))


def _measure(path: str, tp_rank: int, tp: int, ep_rank: int, ep: int) -> dict:
    """In this (fresh) process: peak RssAnon growth while one rank builds and loads its shard."""
    import threading
    import time

    import torch

    from glm5_ascend.config import ModelConfig
    from glm5_ascend.distributed import ParallelState
    from glm5_ascend.model.glm5 import GlmMoeDsaForCausalLM
    from glm5_ascend.model.loader import load_weights

    def anon() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon")

    torch.set_num_threads(1)
    cfg = ModelConfig.from_pretrained(path)
    ps = ParallelState(tp_rank=tp_rank, tp_size=tp, ep_rank=ep_rank, ep_size=ep)
    base, peak, done = anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    model = GlmMoeDsaForCausalLM(cfg, ps, torch.float32)
    load_weights(model, path)
    done.set()
    thread.join()
    own = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return {"peak": max(peak[0], anon()) - base, "own": own, "largest": largest}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide-glm5")
    _write_checkpoint(path)
    return str(path)


def _run(checkpoint: str, *layout: int) -> dict:
    out = subprocess.run([sys.executable, __file__, checkpoint, *map(str, layout)], capture_output=True, text=True,
                         timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", [(1, 2, 0, 1), (0, 4, 0, 1), (1, 2, 1, 2)], ids=["tp2-rank1", "tp4-rank0",
                                                                                      "tp2-ep2-rank1"])
def test_rank_peak_memory_is_its_share_plus_margin(checkpoint, layout):
    whole = _run(checkpoint, 0, 1, 0, 1)
    rank = _run(checkpoint, *layout)
    tp = layout[1]
    # The share is really a share: every TP-split tensor (most of this model) shrank by the TP size.
    assert rank["own"] < whole["own"] / tp + 16 * MiB, (rank, whole)
    assert rank["peak"] <= rank["own"] + rank["largest"] + MARGIN, (rank, whole)
    # One process loads everything, within the same margin (the measurement sees what it should).
    assert whole["own"] <= whole["peak"] <= whole["own"] + whole["largest"] + MARGIN, whole


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1], *map(int, sys.argv[2:]))))
