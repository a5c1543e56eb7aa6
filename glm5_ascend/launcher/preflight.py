"""Checks `glm5-ascend launch` runs on a node before it starts anything.

Each failure is one line naming the node and the fix. What the checks ask of the host (device
count, interfaces, binding, routing, tools) goes through `Host`, so tests fake any of it.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from glm5_ascend.launcher.cluster import Cluster, Node
from glm5_ascend.launcher.ranktable import Runner, parse_npu_smi_count, run_tool


class PreflightError(RuntimeError):
    """A check failed: one line naming the node and the fix."""


def parse_ip_addr(text: str) -> dict[str, list[str]]:
    """{interface: [addresses]} from `ip -o addr` (`2: eth0    inet 10.0.0.1/24 brd ... scope global eth0`)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"\s*\d+:\s+(\S+?)(?:@\S+)?\s+inet6?\s+([0-9A-Fa-f:.]+)(?:/\d+)?", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def _interfaces(run: Runner) -> dict[str, list[str]] | None:
    out = run(["ip", "-o", "addr"])
    return parse_ip_addr(out) if out else None


def _hostname_addresses() -> set[str]:
    try:
        return {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return set()


def _bind(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, port))


def _route(address: str, port: int) -> None:
    # connect() on a UDP socket asks the kernel for a route and sends nothing.
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((address, port))


def _resolve(name: str) -> str:
    return socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0]


def _device_count(kind: str, run: Runner) -> int | None:
    if kind in ("a2", "a3"):
        out = run(["npu-smi", "info", "-l"])
        if out and parse_npu_smi_count(out) is not None:
            return parse_npu_smi_count(out)
        from glm5_ascend.platform import npu_available
        if npu_available():
            import torch
            return torch.npu.device_count()
        return 0
    if kind == "cuda":
        import torch
        return torch.cuda.device_count()
    return None  # cpu: no devices to count


@dataclass
class Host:
    """What preflight and node detection ask of this machine; tests replace any field."""

    run: Runner = run_tool
    interfaces: Callable[[], dict[str, list[str]] | None] | None = None  # None: `ip -o addr` via run
    hostname: Callable[[], str] = socket.gethostname
    hostname_addresses: Callable[[], set[str]] = _hostname_addresses
    device_count: Callable[[str], int | None] | None = None  # None: npu-smi / torch via run
    bind: Callable[[str, int], None] = _bind
    route: Callable[[str, int], None] = _route
    resolve: Callable[[str], str] = _resolve

    def nics(self) -> dict[str, list[str]] | None:
        return self.interfaces() if self.interfaces else _interfaces(self.run)

    def devices(self, kind: str) -> int | None:
        return self.device_count(kind) if self.device_count else _device_count(kind, self.run)

    def addresses(self) -> set[str]:
        nics = self.nics() or {}
        return {a for addrs in nics.values() for a in addrs} | set(self.hostname_addresses())


def find_local_node(c: Cluster, host: Host) -> Node:
    """The node whose address belongs to this host (else whose host name is this host's)."""
    mine = host.addresses()
    hits = [n for n in c.nodes if n.address in mine]
    if not hits:
        hits = [n for n in c.nodes if n.host == host.hostname()]
    if len(hits) == 1:
        return hits[0]
    if hits:
        names = ", ".join(f"{n.host} ({n.address})" for n in hits)
        raise PreflightError(f"this host matches several nodes of {c.source} ({names}); pass --node-rank N")
    shown = ", ".join(sorted(mine)[:6]) or "none found"
    raise PreflightError(f"no node of {c.source} has an address of this host ({shown}) or its name "
                         f"{host.hostname()!r}; fix nodes[].address or pass --node-rank N")


def check_devices(c: Cluster, node: Node, host: Host) -> str:
    """The host has the devices the description gives this node."""
    count = host.devices(c.device)
    if count is None:
        return "devices: cpu ranks (nothing to count)"
    need = max(node.device_ids) + 1
    if count < need:
        where = {"a2": "npu-smi info -l", "a3": "npu-smi info -l", "cuda": "torch.cuda.device_count()"}[c.device]
        raise PreflightError(f"node {node.host}: {c.source} uses {c.device} device ids {list(node.device_ids)} but "
                             f"this host has {count} device(s) ({where}); fix devices_per_node or "
                             f"nodes[{node.index}].device_ids")
    return f"devices: {count} on this host, using {list(node.device_ids)}"


def check_network(c: Cluster, node: Node, host: Host) -> str:
    """The NIC named for this node exists here and (with HCCL_IF_IP) carries the node's address."""
    ifname = c.node_ifname(node)
    if not ifname:
        return "network: no NIC named (one node: libraries choose)"
    nics = host.nics()
    if nics is None:
        return f"network: {ifname} not checked (`ip -o addr` unavailable)"
    if ifname not in nics:
        raise PreflightError(f"node {node.host}: interface {ifname!r} is not on this host (ip -o addr lists "
                             f"{', '.join(sorted(nics))}); fix network.ifname or nodes[{node.index}].ifname")
    if c.is_npu and c.hccl_via == "if_ip" and node.address not in nics[ifname]:
        raise PreflightError(f"node {node.host}: HCCL_IF_IP would be {node.address}, which is not on {ifname} "
                             f"({', '.join(nics[ifname]) or 'no address'}); fix nodes[{node.index}].address or use "
                             "network.hccl: ifname")
    return f"network: {ifname} ({', '.join(nics[ifname])})"


def check_ports(c: Cluster, node: Node, host: Host) -> str:
    """Node 0 can bind the rendezvous and HTTP ports; other nodes can reach node 0's address."""
    master = c.nodes[0].address
    if node.index == 0:
        binds = [("http", c.http_host, c.http_port, f"http.port (or stop what listens on {c.http_port})")]
        if len(c.nodes) > 1:
            binds.insert(0, ("master", master, c.master_port, "master_port (or stop what listens on it)"))
        for what, addr, port, fix in binds:
            try:
                host.bind(addr, port)
            except OSError as e:
                raise PreflightError(f"node {node.host}: cannot bind the {what} address {addr}:{port} "
                                     f"({e.strerror or e}); change {fix}") from None
        return "ports: " + ", ".join(f"{a}:{p} free" for _, a, p, _ in binds)
    try:
        resolved = host.resolve(master)
        host.route(resolved, c.master_port)
    except OSError as e:
        raise PreflightError(f"node {node.host}: node 0's address {master} is not reachable from here "
                             f"({e.strerror or e}); fix nodes[0].address or this host's routes") from None
    return f"ports: node 0 ({master}) routable; its store on port {c.master_port} may start later"


def check_model(c: Cluster, node: Node):
    """(ModelConfig, config.json sha256) of the checkpoint; raises naming the node."""
    from glm5_ascend.config import ModelConfig
    try:
        cfg = ModelConfig.from_pretrained(c.model)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise PreflightError(f"node {node.host}: model {c.model}: {e}".replace("\n", " ")) from None
    digest = hashlib.sha256((Path(c.model) / "config.json").read_bytes()).hexdigest()
    return cfg, digest


def check_model_layout(c: Cluster, cfg) -> None:
    """Splits the engine will make of this model must divide evenly."""
    if cfg.num_attention_heads % c.tp:
        raise PreflightError(f"{c.source}: layout.tensor_parallel_size {c.tp} does not divide the model's "
                             f"num_attention_heads={cfg.num_attention_heads}; pick a divisor")
    if c.ep and cfg.n_routed_experts % c.world:
        raise PreflightError(f"{c.source}: {cfg.n_routed_experts} routed experts do not split over "
                             f"{c.world} expert-parallel ranks; change the layout or turn off enable_expert_parallel")


def mc2_tokens_per_rank(c: Cluster) -> int:
    """Tokens one rank may send through MC2 dispatch per step: the description's, else the device's maximum."""
    from glm5_ascend.ops.moe.mc2_limits import MC2_LIMITS
    return c.mc2_tokens_per_rank or MC2_LIMITS[c.device].max_tokens_per_rank


def mc2_buffsize_mb(c: Cluster, cfg) -> int | None:
    """HCCL_BUFFSIZE (MB) MC2 needs for this layout and model; None when MC2 is not used."""
    if not (c.is_npu and c.ep and c.world > 1):
        return None
    from glm5_ascend.ops.moe.mc2_limits import hccl_buffsize_mb
    return hccl_buffsize_mb(cfg.hidden_size, cfg.num_experts_per_tok, c.world, mc2_tokens_per_rank(c), c.device,
                            n_routed_experts=cfg.n_routed_experts)


def check_hccl_buffsize(c: Cluster, node: Node, env: dict, cfg) -> list[str]:
    """HCCL_BUFFSIZE covers MC2's documented need; returns the notes (MC2 limits this layout breaks)."""
    need = mc2_buffsize_mb(c, cfg)
    if need is None:
        return ["HCCL_BUFFSIZE: no MC2 (expert parallelism off or one rank)"]
    value = env.get("HCCL_BUFFSIZE", "200")  # HCCL's own default when unset
    try:
        have = int(value)
    except ValueError:
        raise PreflightError(f"node {node.host}: HCCL_BUFFSIZE={value!r} is not a whole number of MB; "
                             f"fix env.HCCL_BUFFSIZE in {c.source}") from None
    tokens = mc2_tokens_per_rank(c)
    if have < need:
        raise PreflightError(f"node {node.host}: HCCL_BUFFSIZE={have} MB is below the {need} MB MC2 dispatch/combine "
                             f"need at {tokens} tokens per rank over EP {c.world}; raise env.HCCL_BUFFSIZE to {need} "
                             "or lower layout.mc2_tokens_per_rank")
    from glm5_ascend.ops.moe.mc2_limits import mc2_violations
    notes = [f"HCCL_BUFFSIZE: {have} MB >= {need} MB needed by MC2 at {tokens} tokens per rank"]
    for v in mc2_violations(cfg.hidden_size, cfg.num_experts_per_tok, c.world, tokens, c.device,
                            cfg.n_routed_experts):
        notes.append(f"warning: MC2 on {c.device}: {v} (the engine must use another EP path)")
    return notes


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def run_preflight(c: Cluster, node: Node, env: dict, host: Host) -> list[str]:
    """Every check for `node`, in order; returns the report lines, raises PreflightError on the first failure."""
    lines = [check_devices(c, node, host), check_network(c, node, host), check_ports(c, node, host)]
    cfg, digest = check_model(c, node)
    lines.append(f"model: {c.model} config.json sha256 {digest} (compare across nodes)")
    check_model_layout(c, cfg)
    lines += check_hccl_buffsize(c, node, env, cfg)
    mine = host.addresses()
    if mine and node.address not in mine:  # --node-rank may name another machine
        lines.append(f"warning: {node.address} (nodes[{node.index}].address) is not an address of this host; "
                     "check --node-rank")
    if len(c.nodes) > 1 and any(is_loopback(n.address) for n in c.nodes):
        lines.append("warning: a loopback node address only works when every node is this host")
    return lines
