"""Which engine each process runs: rank 0 serves requests; every other rank follows or leads.

- rank 0: `start_engine` -> an LLMEngine (one process, or DP group 0's leader over its TP peers), or
  with data parallelism a DPEngine that also drives the other DP groups' leaders;
- TP rank 0 of DP group d > 0: an LLMEngine fed by rank 0 (dp_engine.serve_dp_group);
- any other rank: its leader's follower (ModelRunner.follow).
"""
from __future__ import annotations

import logging

from glm5_ascend.config import EngineConfig
from glm5_ascend.engine.cluster import Cluster

logger = logging.getLogger(__name__)


def start_engine(config: EngineConfig, tokenizer=None):
    """The engine of the process that hosts rank 0 (the caller of LLM(...) or `serve`)."""
    from glm5_ascend.engine.llm_engine import LLMEngine
    pc = config.parallel
    if pc.world_size == 1:
        _cpu_threads(config)
        return LLMEngine(config, tokenizer)
    if pc.first_rank != 0:
        raise ValueError("this process does not host rank 0; run it with --headless (workers only)")
    logger.info("Starting %d ranks (TP %d x DP %d%s), %d in this node", pc.world_size, pc.tensor_parallel_size,
                pc.data_parallel_size, ", experts over all" if pc.enable_expert_parallel else "", pc.num_local_ranks)
    cluster = Cluster.start(config)
    try:
        engine = LLMEngine(config, tokenizer, cluster=cluster)
        if pc.data_parallel_size == 1:
            return engine
        from glm5_ascend.engine.dp_engine import DPEngine
        return DPEngine(engine, cluster)
    except BaseException:
        cluster.shutdown()
        raise


def _cpu_threads(config: EngineConfig) -> None:
    """One process on the CPU: intra-op threads by model size (GLM5_CPU_THREADS / OMP_NUM_THREADS override)."""
    import torch

    from glm5_ascend.platform import cpu_threads, platform_for_device
    if platform_for_device(config.device).name == "cpu":
        n = cpu_threads(config.model.hidden_size)
        if n != torch.get_num_threads():
            logger.info("CPU: %d intra-op thread(s) for hidden_size %d (GLM5_CPU_THREADS overrides)", n,
                        config.model.hidden_size)
            torch.set_num_threads(n)


def run_rank(cluster: Cluster) -> None:
    """A rank other than 0: load its shard, then lead its DP group for rank 0, or follow its leader."""
    ps = cluster.ps
    if ps.is_tp_leader:
        from glm5_ascend.engine.dp_engine import serve_dp_group
        from glm5_ascend.engine.llm_engine import LLMEngine
        serve_dp_group(LLMEngine(cluster.config, cluster=cluster))
    else:
        cluster.build_runner().follow()


def run_node(config: EngineConfig) -> int:
    """A node (or torchrun rank) without rank 0: its ranks work until rank 0 shuts them down."""
    cluster = Cluster.start(config)
    try:
        run_rank(cluster)
    finally:
        cluster.shutdown()
    return 0
