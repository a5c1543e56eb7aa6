"""Expert parallelism in the model: N processes (gloo) give the MoE output of 1 process."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm5_ascend.config import ModelConfig
from glm5_ascend.distributed import ParallelState
from glm5_ascend.model.glm5 import GlmMoeDsaForCausalLM
from glm5_ascend.model.loader import load_weights


def _moe_out(path, ps, x):
    cfg = ModelConfig.from_pretrained(path)
    model = GlmMoeDsaForCausalLM(cfg, ps, dtype=torch.float32)
    load_weights(model, path)
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    with torch.no_grad():
        return model.model.layers[layer].mlp(x), model.model.layers[layer].mlp.experts.n_local


def _worker(rank, world, port, path, xs, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ps = ParallelState(ep_rank=rank, ep_size=world, ep_group=dist.group.WORLD)
        out, n_local = _moe_out(path, ps, xs[rank])
        results[rank] = (out, n_local)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    # Passed: leave without interpreter teardown, where gloo's threads now and then hit
    # std::terminate ("terminate called without an active exception", SIGABRT; about 1 run in 6).
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_moe_equals_single_process(tiny_model_dir, world):
    cfg = ModelConfig.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(world)
    # Uneven token counts per rank, one rank with none at all.
    sizes = [7, 0, 13, 5][:world]
    xs = [torch.randn(n, cfg.hidden_size, generator=gen) for n in sizes]
    ref, n_all = _moe_out(tiny_model_dir, ParallelState(), torch.cat(xs))
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), tiny_model_dir, xs, results), nprocs=world, join=True)
    got = torch.cat([results[r][0] for r in range(world)])
    assert all(results[r][1] == n_all // world for r in range(world))  # experts really split
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
