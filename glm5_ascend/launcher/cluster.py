"""The cluster description `glm5-ascend launch` reads (YAML or JSON), parsed and checked.

One file describes the whole deployment; every node reads the same file. A malformed file is one
error line naming the key path and the fix (`cluster.yaml: nodes[1].address: missing; ...`).

    device: a3                      # a2 | a3 (Ascend NPUs), cuda, cpu
    model: /data/GLM-5-w8a8         # the checkpoint, same path on every node
    devices_per_node: 16
    layout: {tensor_parallel_size: 16, data_parallel_size: 2, enable_expert_parallel: true}
    master_port: 29501              # node 0's rendezvous store
    http: {host: 0.0.0.0, port: 8000}
    network: {ifname: enp189s0f0, hccl: ifname}
    env: {HCCL_BUFFSIZE: 4096}      # added to / overriding the emitted defaults
    serve_args: [--served-model-name, glm-5]
    nodes:
      - {host: a3-node0, address: 10.0.0.1, device_ips: [...], super_device_ids: [...], super_pod_id: 0}
      - {host: a3-node1, address: 10.0.0.2, ...}

docs/deployment.md documents every key.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

NPU_KINDS = ("a2", "a3")
DEVICE_KINDS = (*NPU_KINDS, "cuda", "cpu")
DEFAULT_MASTER_PORT = 29501  # the engine's default across nodes (engine/arg_utils.py)

# Variables the launcher derives from the description; `env:` may not set them (they would disagree).
MANAGED_ENV = ("HCCL_SOCKET_IFNAME", "HCCL_IF_IP", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
               "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "RANK_TABLE_FILE")
# serve flags the launcher writes itself, with the key that sets each.
MANAGED_FLAGS = {
    "--device": "device", "--tensor-parallel-size": "layout.tensor_parallel_size", "-tp": "layout.tensor_parallel_size",
    "--data-parallel-size": "layout.data_parallel_size", "-dp": "layout.data_parallel_size",
    "--enable-expert-parallel": "layout.enable_expert_parallel", "--nnodes": "nodes", "--node-rank": "nodes",
    "--master-addr": "nodes[0].address", "--master-port": "master_port", "--headless": "nodes",
    "--host": "http.host", "--port": "http.port", "--model": "model",
    # vLLM's other multi-node form; the engine refuses it together with --nnodes
    "--data-parallel-size-local": "nodes", "--data-parallel-start-rank": "nodes",
    "--data-parallel-address": "nodes[0].address", "--data-parallel-rpc-port": "master_port",
}

_TOP = {"device", "model", "devices_per_node", "layout", "master_port", "http", "network", "env", "serve_args",
        "nodes"}
_LAYOUT = {"tensor_parallel_size", "data_parallel_size", "enable_expert_parallel", "mc2_tokens_per_rank"}
_HTTP = {"host", "port"}
_NETWORK = {"ifname", "hccl"}
_NODE = {"host", "address", "device_ids", "device_ips", "super_device_ids", "super_pod_id", "ifname"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}\Z")  # Linux IFNAMSIZ is 16 with the NUL


class ClusterError(ValueError):
    """A malformed description: one line, `FILE: key.path: problem; fix`."""


@dataclass(frozen=True)
class Node:
    """One machine: its name, address, devices and (NPU) device facts known in advance."""

    index: int
    host: str
    address: str
    device_ids: tuple[int, ...]
    device_ips: tuple[str | None, ...]  # one per device; None where the description leaves it out
    super_device_ids: tuple[int | None, ...]  # A3 only
    super_pod_id: str | None  # A3 only
    ifname: str | None


@dataclass(frozen=True)
class Cluster:
    """A validated description."""

    source: str  # the file, for messages
    device: str
    model: str
    devices_per_node: int
    tp: int
    dp: int
    ep: bool
    mc2_tokens_per_rank: int | None
    master_port: int
    http_host: str
    http_port: int
    ifname: str | None
    hccl_via: str  # "ifname" -> HCCL_SOCKET_IFNAME, "if_ip" -> HCCL_IF_IP
    env: dict
    serve_args: tuple[str, ...]
    nodes: tuple[Node, ...]

    @property
    def is_npu(self) -> bool:
        return self.device in NPU_KINDS

    @property
    def world(self) -> int:
        return len(self.nodes) * self.devices_per_node

    @property
    def serve_device(self) -> str:
        """The value of `serve --device`."""
        return "npu" if self.is_npu else self.device

    def node_ifname(self, node: Node) -> str | None:
        return node.ifname or self.ifname


class _Reader:
    """Typed access to the raw mapping, raising ClusterError with the key path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str, fix: str) -> ClusterError:
        return ClusterError(f"{self.source}: {path}: {problem}; {fix}")

    def mapping(self, value, path: str, allowed: set[str], fix: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping, got {_kind(value)}", fix)
        for key in value:
            if key not in allowed:
                near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"allowed keys: {', '.join(sorted(allowed))}"
                raise self.fail(_join(path, key), "unknown key", f"remove it ({hint})")
        return value

    def get(self, m: dict, key: str, path: str, typ, fix: str, default=..., check=None):
        full = _join(path, key)
        if key not in m or m[key] is None:
            if default is ...:
                raise self.fail(full, "missing", fix)
            return default
        value = m[key]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(full, f"must be an integer, got {_kind(value)} {value!r}", fix)
        if typ is not int and not isinstance(value, typ):
            raise self.fail(full, f"must be {_type_name(typ)}, got {_kind(value)} {value!r}", fix)
        if check is not None and not check(value):
            raise self.fail(full, f"invalid value {value!r}", fix)
        return value


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _type_name(typ) -> str:
    return {str: "a string", bool: "true or false", list: "a list", dict: "a mapping"}.get(typ, str(typ))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def load(path: str | Path) -> Cluster:
    """Read and validate a description file (YAML, or JSON by its .json suffix)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ClusterError(f"{path}: cannot read the cluster description ({e.strerror}); "
                           "pass an existing file") from None
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml
            raw = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parser error is the user's file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first}); "
                           "fix the syntax") from None
    return parse(raw, str(path))


def parse(raw, source: str = "cluster") -> Cluster:
    """Validate a parsed description (a dict) into a Cluster."""
    r = _Reader(source)
    top = r.mapping(raw, "", _TOP, "write the description as a mapping of keys (see docs/deployment.md)")
    device = r.get(top, "device", "", str, f"set device to one of {', '.join(DEVICE_KINDS)}",
                   check=lambda v: v in DEVICE_KINDS)
    model = r.get(top, "model", "", str, "set model to the checkpoint directory (the same path on every node)",
                  check=lambda v: v.strip() != "")
    per_node = r.get(top, "devices_per_node", "", int, "set devices_per_node to the devices each node uses "
                     "(A2: 8, A3: 16)", check=lambda v: v >= 1)
    tp, dp, ep, mc2 = _layout(r, top)
    port = r.get(top, "master_port", "", int, "use a free TCP port in 1024-65535", default=DEFAULT_MASTER_PORT,
                 check=lambda v: 1024 <= v <= 65535)
    http = r.mapping(top.get("http") or {}, "http", _HTTP, "write http as {host: 0.0.0.0, port: 8000}")
    host = r.get(http, "host", "http", str, "set http.host to the address the API listens on", default="0.0.0.0")
    http_port = r.get(http, "port", "http", int, "use a TCP port in 1-65535", default=8000,
                      check=lambda v: 1 <= v <= 65535)
    ifname, via = _network(r, top)
    env = _env(r, top)
    serve_args = _serve_args(r, top)
    nodes = _nodes(r, top, device, per_node)
    c = Cluster(source, device, model, per_node, tp, dp, ep, mc2, port, host, http_port, ifname, via, env, serve_args,
                nodes)
    _cross_checks(r, c)
    return c


def _layout(r: _Reader, top: dict):
    lay = r.mapping(r.get(top, "layout", "", dict, "add layout: {tensor_parallel_size: N}"), "layout", _LAYOUT,
                    "write layout as {tensor_parallel_size: N, data_parallel_size: M, enable_expert_parallel: true}")
    tp = r.get(lay, "tensor_parallel_size", "layout", int, "set the devices that split each layer (e.g. 16)",
               check=lambda v: v >= 1)
    dp = r.get(lay, "data_parallel_size", "layout", int, "set the engine replicas (default 1)", default=1,
               check=lambda v: v >= 1)
    ep = r.get(lay, "enable_expert_parallel", "layout", bool, "write true or false", default=False)
    mc2 = r.get(lay, "mc2_tokens_per_rank", "layout", int, "set the most tokens one rank sends through MC2 "
                "dispatch in a step (A2 <= 256, A3 <= 512)", default=None, check=lambda v: v >= 1)
    return tp, dp, ep, mc2


def _network(r: _Reader, top: dict):
    net = r.mapping(top.get("network") or {}, "network", _NETWORK,
                    "write network as {ifname: NIC, hccl: ifname | if_ip}")
    ifname = r.get(net, "ifname", "network", str, "give the host NIC name as `ip -o addr` shows it (e.g. enp189s0f0)",
                   default=None, check=lambda v: bool(_IFNAME.match(v)))
    via = r.get(net, "hccl", "network", str, "write ifname (HCCL_SOCKET_IFNAME; needed on direct-out RoCE) or "
                "if_ip (HCCL_IF_IP = the node's address)", default="ifname", check=lambda v: v in ("ifname", "if_ip"))
    return ifname, via


def _env(r: _Reader, top: dict) -> dict:
    env = top.get("env") or {}
    if not isinstance(env, dict):
        raise r.fail("env", f"must be a mapping, got {_kind(env)}", "write env as {NAME: value}")
    out = {}
    for name, value in env.items():
        path = f"env.{name}"
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise r.fail(path, "is not an environment variable name", "use letters, digits and _")
        if name in MANAGED_ENV:
            raise r.fail(path, "is set by the launcher", "remove it (network.ifname, network.hccl and "
                         "nodes[].device_ids set it)")
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (str, int, float)):
            raise r.fail(path, f"must be a string or number, got {_kind(value)}", "quote the value")
        out[name] = str(value)
    return out


def _serve_args(r: _Reader, top: dict) -> tuple[str, ...]:
    args = top.get("serve_args") or []
    if not isinstance(args, list):
        raise r.fail("serve_args", f"must be a list of strings, got {_kind(args)}",
                     "write serve_args as [--served-model-name, glm-5]")
    for i, a in enumerate(args):
        if not isinstance(a, str):
            raise r.fail(f"serve_args[{i}]", f"must be a string, got {_kind(a)} {a!r}", "quote it")
        flag = a.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            raise r.fail(f"serve_args[{i}]", f"{flag} is set by the launcher", f"remove it and set "
                         f"{MANAGED_FLAGS[flag]} instead")
    return tuple(args)


def _nodes(r: _Reader, top: dict, device: str, per_node: int) -> tuple[Node, ...]:
    raw = r.get(top, "nodes", "", list, "list the nodes: [{host: name, address: IP}, ...]",
                check=lambda v: len(v) >= 1)
    nodes = tuple(_node(r, n, f"nodes[{i}]", i, device, per_node) for i, n in enumerate(raw))
    for field in ("host", "address"):
        seen = {}
        for n in nodes:
            value = getattr(n, field)
            if value in seen:
                raise r.fail(f"nodes[{n.index}].{field}", f"{value!r} is also nodes[{seen[value]}]'s",
                             "give every node its own")
            seen[value] = n.index
    return nodes


def _node(r: _Reader, raw, path: str, index: int, device: str, per_node: int) -> Node:
    m = r.mapping(raw, path, _NODE, "write the node as {host: name, address: IP}")
    host = r.get(m, "host", path, str, "give the node's host name", check=lambda v: v.strip() != "")
    address = r.get(m, "address", path, str, "give the node's IP address (e.g. 10.0.0.1)", check=_is_ip)
    ids = r.get(m, "device_ids", path, list, f"list {per_node} device ids", default=list(range(per_node)))
    for j, d in enumerate(ids):
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise r.fail(f"{path}.device_ids[{j}]", f"must be a device number, got {_kind(d)} {d!r}",
                         "use device numbers (0, 1, ...)")
    if len(ids) != per_node or len(set(ids)) != per_node:
        raise r.fail(f"{path}.device_ids", f"{ids} is not {per_node} distinct device ids",
                     f"list exactly devices_per_node={per_node} ids, each once")
    ips = _per_device(r, m, "device_ips", path, per_node, str, _is_ip, "an IP address from hccn_tool")
    sdids = _per_device(r, m, "super_device_ids", path, per_node, int, lambda v: v >= 0,
                        "the SDID from npu-smi info -t spod-info")
    pod = m.get("super_pod_id")
    if pod is not None and (isinstance(pod, bool) or not isinstance(pod, (str, int))):
        raise r.fail(f"{path}.super_pod_id", f"must be a string or integer, got {_kind(pod)}",
                     "use the Super Pod ID from npu-smi info -t spod-info")
    if device != "a3":
        for key in ("super_device_ids", "super_pod_id"):
            if m.get(key) is not None:
                raise r.fail(f"{path}.{key}", f"applies to a3 only (device is {device})", "remove it")
    ifname = r.get(m, "ifname", path, str, "give the host NIC name (e.g. enp189s0f0)", default=None,
                   check=lambda v: bool(_IFNAME.match(v)))
    return Node(index, host, address, tuple(ids), ips, sdids, None if pod is None else str(pod), ifname)


def _per_device(r: _Reader, m: dict, key: str, path: str, per_node: int, typ, check, what: str) -> tuple:
    values = m.get(key)
    if values is None:
        return (None,) * per_node
    if not isinstance(values, list) or len(values) != per_node:
        raise r.fail(f"{path}.{key}", f"must list {per_node} values (one per device, null where unknown)",
                     f"give {what} for each of the {per_node} devices")
    for j, v in enumerate(values):
        if v is None:
            continue
        ok = isinstance(v, typ) and not isinstance(v, bool) and check(v)
        if not ok:
            raise r.fail(f"{path}.{key}[{j}]", f"invalid value {v!r}", f"give {what}")
    return tuple(values)


def _cross_checks(r: _Reader, c: Cluster) -> None:
    """Rules that span keys: the layout against the device count, NPU networking."""
    world = c.world
    if c.tp * c.dp != world:
        raise r.fail("layout", f"tensor_parallel_size {c.tp} x data_parallel_size {c.dp} = {c.tp * c.dp} ranks, but "
                     f"{len(c.nodes)} node(s) x devices_per_node {c.devices_per_node} = {world} devices",
                     "make TP x DP equal the device count")
    per = c.devices_per_node
    if c.tp % per and per % c.tp:
        raise r.fail("layout.tensor_parallel_size", f"{c.tp} neither divides nor is a multiple of the {per} devices "
                     "per node, so a TP group would straddle nodes unevenly", f"use a divisor or multiple of {per}")
    if c.mc2_tokens_per_rank is not None and not (c.is_npu and c.ep):
        raise r.fail("layout.mc2_tokens_per_rank", "applies to a2/a3 with enable_expert_parallel only", "remove it")
    if c.is_npu and len(c.nodes) > 1 and not all(c.node_ifname(n) for n in c.nodes):
        raise r.fail("network.ifname", "missing for a multi-node NPU cluster",
                     "give the host NIC that carries HCCL's and Gloo's setup traffic (ip -o addr)")
