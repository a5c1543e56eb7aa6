"""`glm5-ascend launch`: one cluster description -> each node's environment, rank table and serve command.

    glm5-ascend launch cluster.yaml --dry-run [--node-rank N] [--output-dir DIR]
        prints (and with --output-dir writes nodeN.env, nodeN.ranktable.json, nodeN.cmd) for every
        node, or node N only; starts nothing.
    glm5-ascend launch cluster.yaml [--node-rank N] [--output-dir DIR]
        on each node: finds this node (by its addresses, or --node-rank), runs the preflight checks,
        writes the files, then execs `glm5-ascend serve ...` with the environment, so signals reach
        the server directly and nothing is left behind.

Every node runs the same `serve` line but for --node-rank, and node 0 alone serves HTTP (the others
get --headless). The environment follows vllm-ascend's GLM-5 recipes; docs/deployment.md gives the
sources and the description's keys.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from glm5_ascend.launcher import cluster as cluster_mod
from glm5_ascend.launcher import preflight
from glm5_ascend.launcher.cluster import Cluster, Node
from glm5_ascend.launcher.ranktable import build_rank_table, dumps, probe_local_devices

DEFAULT_OUTPUT_DIR = "glm5-launch"
# HCCL's documented default (hicann/hccl HCCL_BUFFSIZE.md) and vllm-ascend's GLM-5 recipes' value.
DEFAULT_HCCL_BUFFSIZE_MB = 200


@dataclass(frozen=True)
class NodePlan:
    """Everything one node needs: the environment (set, and unset), the rank table and the command."""

    node: Node
    env: dict
    unset: tuple[str, ...]
    rank_table: dict | None
    rank_table_path: str | None
    command: list[str]


def serve_command(c: Cluster, node: Node) -> list[str]:
    """The `glm5-ascend serve` argv of `node` (the contract the engine implements)."""
    cmd = ["glm5-ascend", "serve", c.model, "--device", c.serve_device, "--tensor-parallel-size", str(c.tp)]
    if c.dp > 1:
        cmd += ["--data-parallel-size", str(c.dp)]
    if c.ep:
        cmd.append("--enable-expert-parallel")
    if len(c.nodes) > 1:
        cmd += ["--nnodes", str(len(c.nodes)), "--node-rank", str(node.index), "--master-addr", c.nodes[0].address,
                "--master-port", str(c.master_port)]
    cmd += ["--host", c.http_host, "--port", str(c.http_port)] if node.index == 0 else ["--headless"]
    return cmd + list(c.serve_args)


def node_env(c: Cluster, node: Node, rank_table_path: str | None, hccl_buffsize_mb: int) -> tuple[dict, tuple]:
    """(variables to set, variables to unset) for `node`; the description's `env` overrides the defaults."""
    ifname = c.node_ifname(node)
    ids = ",".join(map(str, node.device_ids))
    env, unset = {}, ()
    if c.is_npu:
        if c.hccl_via == "if_ip":
            env["HCCL_IF_IP"] = node.address
        elif ifname:
            env["HCCL_SOCKET_IFNAME"] = ifname
            unset = ("HCCL_IF_IP",)  # HCCL_IF_IP outranks HCCL_SOCKET_IFNAME: a stale one in the shell would win
        if ifname:
            env["GLOO_SOCKET_IFNAME"] = env["TP_SOCKET_IFNAME"] = ifname
        env.update({
            "HCCL_BUFFSIZE": str(hccl_buffsize_mb),
            "HCCL_CONNECT_TIMEOUT": "1800",  # HCCL's 120 s is shorter than a 744B checkpoint's load on a late node
            "HCCL_EXEC_TIMEOUT": "1800",
            "HCCL_OP_EXPANSION_MODE": "AIV",
            "ASCEND_RT_VISIBLE_DEVICES": ids,
            "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
            "OMP_PROC_BIND": "false",
            "OMP_NUM_THREADS": "1",
            "TASK_QUEUE_ENABLE": "1",
            "RANK_TABLE_FILE": rank_table_path,
        })
    elif c.device == "cuda":
        if ifname:
            env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = ifname
        env.update({"CUDA_VISIBLE_DEVICES": ids, "OMP_NUM_THREADS": "1"})
    elif ifname:  # cpu: the engine sizes each rank's threads itself, so no OMP_NUM_THREADS here
        env["GLOO_SOCKET_IFNAME"] = ifname
    env.update(c.env)
    return env, unset


def model_config(c: Cluster):
    """The checkpoint's ModelConfig, or None when it is not readable from here (a dry run elsewhere)."""
    from glm5_ascend.config import ModelConfig
    try:
        return ModelConfig.from_pretrained(c.model)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def default_hccl_buffsize(c: Cluster, cfg, notes: list[str]) -> int:
    """HCCL_BUFFSIZE to emit: HCCL's default, raised to what MC2 dispatch/combine need for this layout."""
    if not (c.is_npu and c.ep and c.world > 1):
        return DEFAULT_HCCL_BUFFSIZE_MB
    if cfg is None:
        notes.append(f"note: {c.model}/config.json is not readable here, so HCCL_BUFFSIZE is not sized for MC2; "
                     "the preflight on each node checks it")
        return DEFAULT_HCCL_BUFFSIZE_MB
    return max(DEFAULT_HCCL_BUFFSIZE_MB, preflight.mc2_buffsize_mb(c, cfg))


def plan_node(c: Cluster, node: Node, out_dir: Path, buffsize: int, local: tuple[int, dict] | None) -> NodePlan:
    """The plan of one node; `local` = (node index, device facts from this host's tools)."""
    table = path = None
    if c.is_npu:
        path = str(out_dir / f"node{node.index}.ranktable.json")
        index, facts = local if local else (None, None)
        table = build_rank_table(c, index, facts)
    env, unset = node_env(c, node, path, buffsize)
    return NodePlan(node, env, unset, table, path, serve_command(c, node))


def render_env(p: NodePlan) -> str:
    lines = [f"unset {name}" for name in p.unset]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in p.env.items()]
    return "\n".join(lines) + "\n"


def render(c: Cluster, p: NodePlan) -> str:
    """The dry-run text of one node."""
    n, per = p.node.index, c.devices_per_node
    out = [f"=== node {n} of {len(c.nodes)}: {p.node.host} ({p.node.address}), ranks {n * per}-{(n + 1) * per - 1} "
           f"of {c.world} ===", f"--- environment (node{n}.env) ---", render_env(p).rstrip("\n")]
    if p.rank_table is not None:
        out += [f"--- rank table ({p.rank_table_path}) ---", dumps(p.rank_table)]
    out += [f"--- command (node{n}.cmd) ---", shlex.join(p.command), ""]
    return "\n".join(out)


def write_files(p: NodePlan, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    n = p.node.index
    (out_dir / f"node{n}.env").write_text(render_env(p))
    (out_dir / f"node{n}.cmd").write_text(shlex.join(p.command) + "\n")
    if p.rank_table is not None:
        (out_dir / f"node{n}.ranktable.json").write_text(dumps(p.rank_table) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cluster_file", metavar="CLUSTER_FILE", help="cluster description (YAML or JSON; see "
                   "docs/deployment.md)")
    p.add_argument("--dry-run", action="store_true", help="print every node's environment, rank table and command; "
                   "start nothing")
    p.add_argument("--node-rank", type=int, default=None, help="this node's index in the description (default: the "
                   "node whose address is this host's); with --dry-run, print only this node")
    p.add_argument("--output-dir", default=None, help=f"where nodeN.env, nodeN.ranktable.json and nodeN.cmd go "
                   f"(default ./{DEFAULT_OUTPUT_DIR}; a dry run writes them only when given)")


def _local(c: Cluster, host: preflight.Host, node_rank: int | None, strict: bool) -> Node | None:
    if node_rank is not None:
        if not 0 <= node_rank < len(c.nodes):
            raise ValueError(f"--node-rank {node_rank} is not a node of {c.source} (0..{len(c.nodes) - 1})")
        return c.nodes[node_rank]
    try:
        return preflight.find_local_node(c, host)
    except preflight.PreflightError:
        if strict:
            raise
        return None  # a dry run from a machine outside the cluster: everything from the description


def _facts(c: Cluster, node: Node | None, host: preflight.Host):
    if node is None or not c.is_npu:
        return None
    return node.index, probe_local_devices(c.device, node.device_ids, host.run)


def main(args: argparse.Namespace, host: preflight.Host | None = None, exec_fn=os.execvpe) -> int:
    host = host or preflight.Host()
    c = cluster_mod.load(args.cluster_file)
    out_dir = Path(args.output_dir or DEFAULT_OUTPUT_DIR).absolute()
    notes: list[str] = []
    cfg = model_config(c)
    buffsize = default_hccl_buffsize(c, cfg, notes)
    if args.dry_run:
        local = _local(c, host, None, strict=False)
        facts = _facts(c, local, host)
        chosen = c.nodes if args.node_rank is None else [_local(c, host, args.node_rank, strict=True)]
        plans = [plan_node(c, n, out_dir, buffsize, facts) for n in chosen]
        for line in notes:
            print(line, file=sys.stderr)
        for p in plans:
            print(render(c, p))
            if args.output_dir:
                write_files(p, out_dir)
        return 0
    node = _local(c, host, args.node_rank, strict=True)
    plan = plan_node(c, node, out_dir, buffsize, _facts(c, node, host))
    for line in notes + preflight.run_preflight(c, node, plan.env, host):
        print(f"preflight {node.host}: {line}", file=sys.stderr)
    write_files(plan, out_dir)
    argv = _executable() + plan.command[1:]
    env = {k: v for k, v in os.environ.items() if k not in plan.unset}
    env.update(plan.env)
    print(f"launch {node.host}: {shlex.join(plan.command)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    exec_fn(argv[0], argv, env)  # replaces this process: the server gets the signals, no orphan is left
    return 0


def _executable() -> list[str]:
    """`glm5-ascend` if installed as a console script, else this interpreter running the CLI module."""
    found = shutil.which("glm5-ascend")
    return [found] if found else [sys.executable, "-m", "glm5_ascend.cli"]
