"""Per-device limits the emulated ops enforce: Atlas A2 and Atlas A3, written from the op documentation.

Sources (quoted next to each figure):
  [dispatch]  Ascend/op-plugin docs/context/torch_npu-npu_moe_distribute_dispatch_v2.md (参数说明, 约束说明)
  [combine]   Ascend/op-plugin docs/context/torch_npu-npu_moe_distribute_combine_v2.md and the CANN
              ops-transformer aclnnMoeDistributeCombineV2.md (the newer text where the two differ)
Only the MC2 ops differ between A2 and A3; the DSA, gating, routing and grouped-matmul limits are the
same on both and live with their ops (dsa.py, moe.py). This table is the emulator's own reading, kept
apart from ops/moe/mc2_limits.py (the backend's and launcher's); tests/ops/test_npu_limits.py checks
that the two agree, so a slip in either shows.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    # [dispatch] BS: "A2: 取值范围为0<BS≤256"; "A3: 取值范围为0<BS≤512"
    mc2_max_bs: int
    # [dispatch] ep_world_size: A2 "comm_alg设置为"fullmesh"时，ep_world_size取值范围为16、32、64、128、256";
    # A3 "取值支持[2, 768]"
    mc2_ep_sizes: tuple | None
    mc2_ep_range: tuple | None
    # [dispatch] H: A2 "comm_alg设置为"fullmesh"时，H的取值范围(0, 7168]，且保证是32的整数倍"; A3 "取值为[1024, 8192]"
    mc2_h_min: int
    mc2_h_max: int
    mc2_h_multiple: int
    # [dispatch] moe_expert_num: A2 "还需满足moe_expert_num/(ep_world_size - shared_expert_rank_num) <= 24"
    mc2_max_local_experts: int | None
    # [dispatch] A2: shared_expert_num "暂不支持该参数，使用默认值即可"; group_tp / tp_world_size "不支持TP域通信，
    # 使用默认值即可"; shared_expert_rank_num "不支持共享专家，使用默认值即可"; expert_shard_type "暂不支持该参数";
    # elastic_info "预留参数，当前版本不支持"; zero/copy/const_expert_num "当前版本不支持，传0即可".
    # A3: expert_scales "暂不支持该参数，使用默认值即可"; [combine] expand_scales A2 "必选参数", A3 "暂不支持该参数".
    a2_argument_rules: bool


# Both: [dispatch] "K：表示选取topK个专家，取值范围为0<K≤16"; "moe_expert_num ... 取值范围[1, 1024]，并且满足以下条件：
# moe_expert_num%(ep_world_size - shared_expert_rank_num)=0"; expert_ids "value取值范围为[0, moe_expert_num)，且同一行中
# 的K个value不能重复"; "group_ep、ep_world_size、... global_bs网络中不同层中也需保持一致"; "该通信域中不允许有其他算子".
MC2_MAX_K = 16
MC2_MAX_EXPERTS = 1024

PROFILES = {
    "a2": Profile("a2", mc2_max_bs=256, mc2_ep_sizes=(16, 32, 64, 128, 256), mc2_ep_range=None, mc2_h_min=32,
                  mc2_h_max=7168, mc2_h_multiple=32, mc2_max_local_experts=24, a2_argument_rules=True),
    "a3": Profile("a3", mc2_max_bs=512, mc2_ep_sizes=None, mc2_ep_range=(2, 768), mc2_h_min=1024, mc2_h_max=8192,
                  mc2_h_multiple=1, mc2_max_local_experts=None, a2_argument_rules=False),
}
DEFAULT = "a3"
_active = [PROFILES[DEFAULT]]


def active() -> Profile:
    return _active[0]


@contextlib.contextmanager
def use(name: str):
    """Make `name` the profile the emulated ops enforce for the duration."""
    previous = _active[0]
    _active[0] = PROFILES[name]
    try:
        yield _active[0]
    finally:
        _active[0] = previous
