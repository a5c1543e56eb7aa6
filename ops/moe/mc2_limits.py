"""MC2 expert-parallel dispatch / combine: the documented limits and the HCCL_BUFFSIZE they need.

Pure Python (no torch, no torch_npu) so the launcher can size HCCL_BUFFSIZE on any host. Every
figure comes from the op documentation of `torch_npu.npu_moe_distribute_dispatch_v2`
(Ascend/op-plugin docs/context/torch_npu-npu_moe_distribute_dispatch_v2.md, section 约束说明, and
the same text in aclnnMoeDistributeDispatchV2.md of the CANN ops-transformer repository). "/" in
those formulas is integer division.

The engine calls the op as ops/moe/npu.py does: no TP domain, no shared-expert ranks
(shared_expert_rank_num=0; shared_expert_num=0 on A3, its default on A2, which does not support it
and whose formula does not use it), no quantisation, comm_alg "fullmesh" on A2 (which "" would pick
unless HCCL_INTRA_PCIE_ENABLE=1 and HCCL_INTRA_ROCE_ENABLE=0) and "" on A3 ("fullmesh_v1").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Mc2Limits:
    """What one device kind's MC2 kernels accept (per EP rank unless said otherwise)."""

    max_tokens_per_rank: int  # BS, the tokens one rank dispatches in one call
    ep_world_sizes: tuple[int, ...] | None  # allowed EP sizes as a list, or None when a range applies
    ep_world_size_range: tuple[int, int] | None  # inclusive
    hidden_range: tuple[int, int]  # inclusive bounds of H
    hidden_multiple: int  # H must be a multiple of this (1: no rule)
    max_top_k: int  # K
    max_experts: int  # moe_expert_num
    max_local_experts: int | None  # moe_expert_num / ep_world_size, where the device bounds it


MC2_LIMITS = {
    # Atlas A2 (910B), comm_alg "fullmesh":
    #   "BS ... 取值范围为0<BS≤256";  "ep_world_size 取值范围为16、32、64、128、256";
    #   "H 的取值范围(0, 7168]，且保证是32的整数倍";  "0<K≤16";  "moe_expert_num 取值范围[1, 1024]";
    #   "moe_expert_num/(ep_world_size - shared_expert_rank_num) <= 24".
    "a2": Mc2Limits(max_tokens_per_rank=256, ep_world_sizes=(16, 32, 64, 128, 256), ep_world_size_range=None,
                    hidden_range=(32, 7168), hidden_multiple=32, max_top_k=16, max_experts=1024,
                    max_local_experts=24),
    # Atlas A3 (910C, one die = one rank):
    #   "BS ... 取值范围为0<BS≤512";  "ep_world_size 取值支持[2, 768]";  "H 取值为[1024, 8192]";
    #   "0<K≤16";  "moe_expert_num 取值范围[1, 1024]".
    "a3": Mc2Limits(max_tokens_per_rank=512, ep_world_sizes=None, ep_world_size_range=(2, 768),
                    hidden_range=(1024, 8192), hidden_multiple=1, max_top_k=16, max_experts=1024,
                    max_local_experts=None),
}


def _align(x: int, to: int) -> int:
    return (x + to - 1) // to * to


def _limits(device: str) -> Mc2Limits:
    if device not in MC2_LIMITS:
        raise ValueError(f"MC2 limits are documented for a2 and a3, not {device!r}")
    return MC2_LIMITS[device]


def hccl_buffsize_bytes(hidden_size: int, top_k: int, ep_world_size: int, max_tokens_per_rank: int, device: str,
                        *, n_routed_experts: int | None = None, shared_expert_num: int = 0) -> int:
    """Bytes of HCCL buffer one MC2 communicator needs (the documented lower bound).

    A2, comm_alg "fullmesh":
        HCCL_BUFFSIZE >= 2 * (BS * ep_world_size * min(local_expert_num, K) * H * sizeof(uint16) + 2MB)
    A3, comm_alg "fullmesh_v1" or "":
        HCCL_BUFFSIZE >= 2 * (local_expert_num * max_bs * ep_world_size * Align512(Align32(2 * H) + 64)
                              + (K + shared_expert_num) * max_bs * Align512(2 * H))
    local_expert_num = n_routed_experts / ep_world_size. On A2, without n_routed_experts, K bounds
    min(local_expert_num, K); A3 needs it.
    """
    _limits(device)
    h, k, ep, bs = hidden_size, top_k, ep_world_size, max_tokens_per_rank
    if min(h, k, ep, bs) < 1:
        raise ValueError("hidden_size, top_k, ep_world_size and max_tokens_per_rank must be positive")
    local = None if n_routed_experts is None else n_routed_experts // ep
    if device == "a2":
        per_rank = min(local, k) if local is not None else k
        return 2 * (bs * ep * per_rank * h * 2 + 2 * MiB)
    if local is None:
        raise ValueError("the A3 formula needs n_routed_experts (local_expert_num = n_routed_experts / ep_world_size)")
    token_row = _align(_align(2 * h, 32) + 64, 512)  # Align512(Align32(2 * H) + 64)
    return 2 * (local * bs * ep * token_row + (k + shared_expert_num) * bs * _align(2 * h, 512))


def hccl_buffsize_mb(hidden_size: int, top_k: int, ep_world_size: int, max_tokens_per_rank: int, device: str,
                     *, n_routed_experts: int | None = None, shared_expert_num: int = 0) -> int:
    """HCCL_BUFFSIZE (MB, the variable's unit, rounded up) that MC2 dispatch / combine need on `device`."""
    return math.ceil(hccl_buffsize_bytes(hidden_size, top_k, ep_world_size, max_tokens_per_rank, device,
                                         n_routed_experts=n_routed_experts,
                                         shared_expert_num=shared_expert_num) / MiB)


def mc2_violations(hidden_size: int, top_k: int, ep_world_size: int, max_tokens_per_rank: int, device: str,
                   n_routed_experts: int) -> list[str]:
    """The documented MC2 limits this layout breaks, one phrase each (empty: MC2 can run it)."""
    lim = _limits(device)
    out = []
    if max_tokens_per_rank > lim.max_tokens_per_rank:
        out.append(f"{max_tokens_per_rank} tokens per rank exceeds {device}'s {lim.max_tokens_per_rank}")
    if lim.ep_world_sizes is not None and ep_world_size not in lim.ep_world_sizes:
        out.append(f"EP size {ep_world_size} is not one of {', '.join(map(str, lim.ep_world_sizes))}")
    if lim.ep_world_size_range and not lim.ep_world_size_range[0] <= ep_world_size <= lim.ep_world_size_range[1]:
        out.append(f"EP size {ep_world_size} is outside [{lim.ep_world_size_range[0]}, {lim.ep_world_size_range[1]}]")
    lo, hi = lim.hidden_range
    if not lo <= hidden_size <= hi or hidden_size % lim.hidden_multiple:
        rule = f"[{lo}, {hi}]" + (f", a multiple of {lim.hidden_multiple}" if lim.hidden_multiple > 1 else "")
        out.append(f"hidden_size {hidden_size} is outside {rule}")
    if not 0 < top_k <= lim.max_top_k:
        out.append(f"top-k {top_k} is outside (0, {lim.max_top_k}]")
    if not 0 < n_routed_experts <= lim.max_experts or n_routed_experts % ep_world_size:
        out.append(f"{n_routed_experts} experts do not split evenly over EP {ep_world_size} "
                   f"(at most {lim.max_experts})")
    elif lim.max_local_experts and n_routed_experts // ep_world_size > lim.max_local_experts:
        out.append(f"{n_routed_experts // ep_world_size} experts per rank exceeds {lim.max_local_experts}")
    return out
