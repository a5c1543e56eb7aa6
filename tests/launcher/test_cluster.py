"""Cluster descriptions: valid ones parse; each malformed one is one line naming the key path and the fix."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from glm5_ascend.launcher.cluster import ClusterError, load, parse
from tests.launcher.conftest import GOLDEN

BASE = {
    "device": "a2", "model": "/m", "devices_per_node": 8,
    "layout": {"tensor_parallel_size": 8, "data_parallel_size": 2, "enable_expert_parallel": True},
    "network": {"ifname": "eth0"},
    "nodes": [{"host": "n0", "address": "10.0.0.1"}, {"host": "n1", "address": "10.0.0.2"}],
}


def _with(path: str, value):
    """BASE with the value at a dotted path replaced (the `_DELETE` sentinel removes the key)."""
    raw = copy.deepcopy(BASE)
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    obj = raw
    for key in parents:
        obj = obj[int(key)] if key.isdigit() else obj[key]
    key = int(last) if last.isdigit() else last
    if value is _DELETE:
        del obj[key]
    else:
        obj[key] = value
    return raw


_DELETE = object()


def test_a_valid_description_parses_with_defaults():
    c = parse(BASE, "c.yaml")
    assert (c.device, c.tp, c.dp, c.ep, c.world, c.serve_device) == ("a2", 8, 2, True, 16, "npu")
    assert (c.master_port, c.http_host, c.http_port, c.hccl_via) == (29501, "0.0.0.0", 8000, "ifname")
    assert c.nodes[1].device_ids == tuple(range(8)) and c.nodes[1].device_ips == (None,) * 8
    assert c.node_ifname(c.nodes[0]) == "eth0"


def test_the_golden_descriptions_load():
    assert load(GOLDEN / "a3-2node.yaml").nodes[1].super_device_ids[0] == 1 << 22
    assert load(GOLDEN / "a2-2node.json").hccl_via == "if_ip"


ERRORS = [
    (_with("device", _DELETE), "device: missing; set device to one of a2, a3, cuda, cpu"),
    (_with("device", "a5"), "device: invalid value 'a5'; set device to one of a2, a3, cuda, cpu"),
    (_with("devices_per_node", "8"), "devices_per_node: must be an integer, got a string '8'; set devices_per_node"),
    (_with("nodse", []), "nodse: unknown key; remove it (did you mean 'nodes'?)"),
    (_with("nodes[1].adress", "x"), "nodes[1].adress: unknown key; remove it (did you mean 'address'?)"),
    (_with("nodes[1].address", _DELETE), "nodes[1].address: missing; give the node's IP address"),
    (_with("nodes[1].address", "node-1"), "nodes[1].address: invalid value 'node-1'; give the node's IP address"),
    (_with("nodes[1].address", "10.0.0.1"), "nodes[1].address: '10.0.0.1' is also nodes[0]'s; give every node"),
    (_with("nodes[0].device_ips", ["10.1.0.1"]), "nodes[0].device_ips: must list 8 values (one per device, null where "
                                                 "unknown); give an IP address from hccn_tool"),
    (_with("nodes[0].device_ids", [0, 1, 2, 3, 4, 5, 6, 6]), "nodes[0].device_ids: [0, 1, 2, 3, 4, 5, 6, 6] is not 8 "
                                                             "distinct device ids"),
    (_with("nodes[0].super_pod_id", 1), "nodes[0].super_pod_id: applies to a3 only (device is a2); remove it"),
    (_with("nodes", []), "nodes: invalid value []; list the nodes"),
    (_with("layout.tensor_parallel_size", True), "layout.tensor_parallel_size: must be an integer, got a boolean"),
    (_with("layout.data_parallel_size", 3), "layout: tensor_parallel_size 8 x data_parallel_size 3 = 24 ranks, but 2 "
                                            "node(s) x devices_per_node 8 = 16 devices; make TP x DP equal"),
    (_with("layout.enable_expert_parallel", "yes"), "layout.enable_expert_parallel: must be true or false"),
    (_with("network.hccl", "ip"), "network.hccl: invalid value 'ip'; write ifname (HCCL_SOCKET_IFNAME; needed on "
                                  "direct-out RoCE) or if_ip"),
    (_with("network", _DELETE), "network.ifname: missing for a multi-node NPU cluster; give the host NIC"),
    (_with("env", {"HCCL_IF_IP": "1.2.3.4"}), "env.HCCL_IF_IP: is set by the launcher; remove it"),
    (_with("env", {"HCCL_BUFFSIZE": [1]}), "env.HCCL_BUFFSIZE: must be a string or number, got a list"),
    (_with("serve_args", ["--port", "9000"]), "serve_args[0]: --port is set by the launcher; remove it and set "
                                              "http.port instead"),
    (_with("serve_args", ["--tensor-parallel-size=4"]), "serve_args[0]: --tensor-parallel-size is set by the launcher"),
    (_with("serve_args", "--max-num-seqs 8"), "serve_args: must be a list of strings, got a string"),
    (_with("master_port", 80), "master_port: invalid value 80; use a free TCP port in 1024-65535"),
    (_with("http", {"port": 0}), "http.port: invalid value 0; use a TCP port in 1-65535"),
    (_with("layout.mc2_tokens_per_rank", 0), "layout.mc2_tokens_per_rank: invalid value 0"),
]


@pytest.mark.parametrize("raw, expected", ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_each_malformed_description_is_one_line_naming_the_key_and_fix(raw, expected):
    with pytest.raises(ClusterError) as e:
        parse(raw, "c.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("c.yaml: ")
    assert expected in msg


def test_a3_keys_tp_straddling_nodes_and_mc2_without_ep():
    raw = _with("device", "a3")
    raw["nodes"][0]["super_device_ids"] = [0, 1, 2, 3, 4, 5, 6, "x"]
    with pytest.raises(ClusterError, match=r"nodes\[0\]\.super_device_ids\[7\]: invalid value 'x'; give the SDID"):
        parse(raw, "c.yaml")
    raw = _with("layout", {"tensor_parallel_size": 4, "data_parallel_size": 3})
    raw["devices_per_node"] = 6
    with pytest.raises(ClusterError, match="4 neither divides nor is a multiple of the 6 devices per node"):
        parse(raw, "c.yaml")
    raw = _with("layout", {"tensor_parallel_size": 8, "data_parallel_size": 2, "mc2_tokens_per_rank": 64})
    with pytest.raises(ClusterError, match="mc2_tokens_per_rank: applies to a2/a3 with enable_expert_parallel only"):
        parse(raw, "c.yaml")


def test_file_errors(tmp_path):
    with pytest.raises(ClusterError, match=r"nope\.yaml: cannot read the cluster description"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "c.yaml"
    bad.write_text("device: a2\nnodes: [\n")
    with pytest.raises(ClusterError, match=r"c\.yaml: not valid YAML \(.*\); fix the syntax") as e:
        load(bad)
    assert "\n" not in str(e.value)
    bad = tmp_path / "c.json"
    bad.write_text("{'device': 1}")
    with pytest.raises(ClusterError, match=r"c\.json: not valid JSON"):
        load(bad)
    bad.write_text(json.dumps(["a2"]))
    with pytest.raises(ClusterError, match="must be a mapping, got a list"):
        load(bad)


def test_the_cli_reports_a_bad_description_in_one_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("device: a2\nmodel: /m\ndevices_per_node: 8\nlayout: {tensor_parallel_size: 8}\n"
                   "nodes: [{host: n0, adress: 10.0.0.1}]\n")
    r = subprocess.run([sys.executable, "-m", "glm5_ascend.cli", "launch", str(bad), "--dry-run"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"glm5-ascend: error: {bad}: nodes[0].adress: unknown key; remove it "
                        "(did you mean 'address'?)\n")
