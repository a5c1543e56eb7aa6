"""HCCL rank tables (v1.0 for Atlas A2, v1.2 for Atlas A3) and the device facts they need.

Formats (hicann/hccl docs/en/user_guide/cluster_info_config/rank_table_config_a2.md and _a3.md):
  - v1.0: {status, version "1.0", server_count, server_list: [{server_id, device: [{device_id,
    device_ip, rank_id}]}]}. device_ip is mandatory across servers.
  - v1.2 (A3, SuperPoD): each device also carries super_device_id (the SDID of
    `npu-smi info -t spod-info`), servers carry host_ip, and super_pod_list groups server_ids by
    super_pod_id; servers of one SuperPoD must be listed together. Each 910C chip is two dies, each
    die one device and one rank: 16 per Atlas 800 A3 node.
  - Every number is a JSON string; rank_id runs 0..world-1, contiguous per server.

Device facts come from the host's tools where they exist:
  - A2: `hccn_tool -i N -ip -g` prints `ipaddr:10.0.0.8` / `netmask:...`.
  - A3: `hccn_tool -i N -vnic -g` prints `vnic ipaddr: 192.168.2.199`, and
    `npu-smi info -t spod-info -i N//2 -c N%2` (card, chip of die N) prints `SDID : ...` and
    `Super Pod ID : ...` lines (some driver versions draw them inside a |-bordered table).
and from the description everywhere else (always for other nodes).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from glm5_ascend.launcher.cluster import Cluster, Node

Runner = Callable[[list[str]], str | None]  # argv -> stdout, or None when the tool is absent / fails

_IPV4 = r"(\d{1,3}(?:\.\d{1,3}){3})"


@dataclass(frozen=True)
class DeviceFacts:
    """What the rank table needs about one device (None: unknown)."""

    ip: str | None = None
    super_device_id: int | None = None
    super_pod_id: str | None = None


# ---------------------------------------------------------------- parsers of tool output
def parse_hccn_ip(text: str) -> str | None:
    """The address in `hccn_tool -i N -ip -g` output (`ipaddr:10.0.0.8`)."""
    m = re.search(r"^\s*ipaddr\s*:\s*" + _IPV4, text, re.M)
    return m.group(1) if m else None


def parse_hccn_vnic(text: str) -> str | None:
    """The address in `hccn_tool -i N -vnic -g` output (`vnic ipaddr: 192.168.2.199`)."""
    m = re.search(r"^\s*vnic\s+ipaddr\s*:\s*" + _IPV4, text, re.M)
    return m.group(1) if m else None


def parse_key_values(text: str) -> dict[str, str]:
    """`Key : value` pairs of npu-smi output, plain lines or |-separated table cells alike."""
    out = {}
    for line in text.splitlines():
        for cell in line.split("|"):
            key, sep, value = cell.partition(":")
            if sep and key.strip() and value.strip():
                out.setdefault(key.strip(), value.strip())
    return out


def parse_spod_info(text: str) -> tuple[int | None, str | None]:
    """(SDID, Super Pod ID) from `npu-smi info -t spod-info -i CARD -c CHIP`."""
    kv = parse_key_values(text)
    sdid = kv.get("SDID")
    return (int(sdid) if sdid and sdid.isdigit() else None), kv.get("Super Pod ID")


def parse_npu_smi_count(text: str) -> int | None:
    """Devices (dies) in `npu-smi info -l`: the sum of `Chip Count` (2 per A3 card), else `Total Count`."""
    chips = [int(m) for m in re.findall(r"^\s*Chip Count\s*:\s*(\d+)", text, re.M)]
    if chips:
        return sum(chips)
    m = re.search(r"^\s*Total Count\s*:\s*(\d+)", text, re.M)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- local tools
def run_tool(argv: list[str], timeout: float = 20.0) -> str | None:
    """stdout of a host tool, or None when it is absent or fails (the description then decides)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def probe_local_devices(device: str, device_ids: tuple[int, ...], run: Runner = run_tool) -> dict[int, DeviceFacts]:
    """Device facts of this host from hccn_tool / npu-smi, for the devices it can answer for."""
    facts = {}
    for d in device_ids:
        if device == "a2":
            out = run(["hccn_tool", "-i", str(d), "-ip", "-g"])
            facts[d] = DeviceFacts(ip=parse_hccn_ip(out) if out else None)
        elif device == "a3":
            out = run(["hccn_tool", "-i", str(d), "-vnic", "-g"])
            spod = run(["npu-smi", "info", "-t", "spod-info", "-i", str(d // 2), "-c", str(d % 2)])
            sdid, pod = parse_spod_info(spod) if spod else (None, None)
            facts[d] = DeviceFacts(ip=parse_hccn_vnic(out) if out else None, super_device_id=sdid, super_pod_id=pod)
    return facts


# ---------------------------------------------------------------- the table
def _merge(c: Cluster, node: Node, local: dict[int, DeviceFacts] | None) -> list[DeviceFacts]:
    """Facts per device of `node`: the host's tools when this is the local node, else the description.

    Where both know a value they must agree: every other node builds its table from the description.
    """
    out = []
    for j, d in enumerate(node.device_ids):
        desc = DeviceFacts(node.device_ips[j], node.super_device_ids[j], node.super_pod_id)
        tool = (local or {}).get(d, DeviceFacts())
        for field, key in (("ip", "device_ips"), ("super_device_id", "super_device_ids")):
            a, b = getattr(tool, field), getattr(desc, field)
            if a is not None and b is not None and a != b:
                raise ValueError(f"node {node.host} device {d}: the host reports {field} {a} but {c.source} says {b}; "
                                 f"fix nodes[{node.index}].{key}[{j}] (every node builds the rank table from it)")
        if tool.super_pod_id is not None and desc.super_pod_id is not None and tool.super_pod_id != desc.super_pod_id:
            raise ValueError(f"node {node.host}: npu-smi reports Super Pod ID {tool.super_pod_id} but {c.source} says "
                             f"{desc.super_pod_id}; fix nodes[{node.index}].super_pod_id")
        out.append(DeviceFacts(tool.ip or desc.ip,
                               tool.super_device_id if tool.super_device_id is not None else desc.super_device_id,
                               tool.super_pod_id or desc.super_pod_id))
    return out


def _missing(c: Cluster, node: Node, j: int, what: str, tool: str, key: str) -> ValueError:
    return ValueError(f"node {node.host} device {node.device_ids[j]}: no {what} ({tool} is not on this host or this "
                      f"is another node); add nodes[{node.index}].{key} to {c.source}")


def build_rank_table(c: Cluster, local_index: int | None = None,
                     local_facts: dict[int, DeviceFacts] | None = None) -> dict:
    """The whole cluster's rank table (the same on every node); version 1.0 on a2, 1.2 on a3."""
    if not c.is_npu:
        raise ValueError(f"rank tables are for a2/a3 clusters, not {c.device}")
    servers, pods = [], []
    rank = 0
    for node in c.nodes:
        facts = _merge(c, node, local_facts if node.index == local_index else None)
        devices = []
        for j, f in enumerate(facts):
            tool = "hccn_tool -vnic" if c.device == "a3" else "hccn_tool -ip"
            if f.ip is None:
                raise _missing(c, node, j, "device IP", tool, "device_ips")
            dev = {"device_id": str(node.device_ids[j]), "device_ip": f.ip, "rank_id": str(rank)}
            if c.device == "a3":
                if f.super_device_id is None:
                    raise _missing(c, node, j, "super_device_id", "npu-smi", "super_device_ids")
                dev = {"device_id": dev["device_id"], "super_device_id": str(f.super_device_id),
                       "device_ip": f.ip, "rank_id": dev["rank_id"]}
            devices.append(dev)
            rank += 1
        server = {"server_id": node.address, "device": devices}
        if c.device == "a3":
            server = {"server_id": node.address, "host_ip": node.address, "device": devices}
            pod = {f.super_pod_id for f in facts}
            if None in pod:
                raise ValueError(f"node {node.host}: no Super Pod ID (npu-smi is not on this host or this is another "
                                 f"node); add nodes[{node.index}].super_pod_id to {c.source}")
            _add_to_pod(c, pods, pod.pop(), node)
        servers.append(server)
    table = {"status": "completed", "version": "1.2" if c.device == "a3" else "1.0",
             "server_count": str(len(servers)), "server_list": servers}
    if c.device == "a3":
        table["super_pod_list"] = [{"super_pod_id": pid, "server_list": [{"server_id": s} for s in ids]}
                                   for pid, ids in pods]
    return table


def _add_to_pod(c: Cluster, pods: list, pod_id: str, node: Node) -> None:
    # HCCL takes each SuperPoD's servers together, SuperPoD after SuperPoD: no interleaving.
    if pods and pods[-1][0] == pod_id:
        pods[-1][1].append(node.address)
        return
    if any(pid == pod_id for pid, _ in pods):
        raise ValueError(f"node {node.host}: Super Pod {pod_id}'s nodes are not listed together in {c.source}; "
                         "reorder nodes so each SuperPoD's servers are adjacent (HCCL rejects interleaving)")
    pods.append((pod_id, [node.address]))


def dumps(table: dict) -> str:
    """JSON of a rank table, one device (innermost object) per line so a 32-rank table stays readable."""
    text = json.dumps(table, indent=2)
    return re.sub(r"\{\n\s+([^{}\[\]]*?)\n\s+\}", lambda m: "{" + re.sub(r",\n\s+", ", ", m.group(1)) + "}", text)
