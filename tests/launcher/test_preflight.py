"""Preflight: every check, provoked, gives one line naming the node and the fix."""
from __future__ import annotations

import errno
import hashlib
import socket

import pytest

from glm5_ascend.launcher.cluster import load, parse
from glm5_ascend.launcher.preflight import (PreflightError, _bind, check_devices, check_hccl_buffsize, check_model,
                                            check_model_layout, check_network, check_ports, find_local_node,
                                            run_preflight)
from tests.launcher.conftest import GOLDEN, fake_host

MODEL = str(GOLDEN / "glm5-model")


def _a3_two_nodes(**over):
    c = load(GOLDEN / "a3-2node.yaml")
    return c.__class__(**{**c.__dict__, "model": MODEL, **over})


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_a_good_node_passes_every_check():
    c = _a3_two_nodes()
    host = fake_host(interfaces=lambda: {"enp189s0f0": ["10.10.0.2"]})
    lines = run_preflight(c, c.nodes[1], {"HCCL_BUFFSIZE": "3296"}, host)
    assert lines[0] == "devices: 16 on this host, using [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]"
    assert lines[1] == "network: enp189s0f0 (10.10.0.2)"
    assert lines[2] == "ports: node 0 (10.10.0.1) routable; its store on port 29501 may start later"
    digest = hashlib.sha256((GOLDEN / "glm5-model" / "config.json").read_bytes()).hexdigest()
    assert lines[3] == f"model: {MODEL} config.json sha256 {digest} (compare across nodes)"
    assert lines[4] == "HCCL_BUFFSIZE: 3296 MB >= 3296 MB needed by MC2 at 512 tokens per rank"
    assert len(lines) == 5
    lines = run_preflight(c, c.nodes[0], {"HCCL_BUFFSIZE": "3296"}, host)  # --node-rank 0 on node 1's host
    assert lines[-1] == "warning: 10.10.0.1 (nodes[0].address) is not an address of this host; check --node-rank"


def test_too_few_devices():
    c = _a3_two_nodes()
    with pytest.raises(PreflightError) as e:
        check_devices(c, c.nodes[0], fake_host(device_count=lambda kind: 8))
    assert _one_line(e) == ("node a3-node0: a3-2node.yaml uses a3 device ids [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, "
                            "12, 13, 14, 15] but this host has 8 device(s) (npu-smi info -l); fix devices_per_node or "
                            "nodes[0].device_ids").replace("a3-2node.yaml", str(GOLDEN / "a3-2node.yaml"))


def test_device_count_comes_from_npu_smi():
    c = _a3_two_nodes()
    list_a3 = "\tTotal Count : 8\n" + "\tNPU ID : 0\n\tChip Count : 2\n" * 8
    host = fake_host(device_count=None, run=lambda argv: list_a3 if argv[:3] == ["npu-smi", "info", "-l"] else None)
    assert check_devices(c, c.nodes[0], host).startswith("devices: 16 on this host")
    with pytest.raises(PreflightError, match="this host has 8 device"):
        check_devices(c, c.nodes[0], fake_host(device_count=None, run=lambda argv: list_a3.replace(": 2", ": 1")))


def test_master_port_taken_on_node_0_with_a_real_socket():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        c = parse({"device": "cpu", "model": MODEL, "devices_per_node": 1, "layout": {"tensor_parallel_size": 2},
                   "master_port": port, "http": {"host": "127.0.0.1", "port": 1},
                   "nodes": [{"host": "a", "address": "127.0.0.1"}, {"host": "b", "address": "127.0.0.2"}]}, "c.yaml")
        host = fake_host(bind=_bind)  # the real bind
        with pytest.raises(PreflightError) as e:
            check_ports(c, c.nodes[0], host)
    assert _one_line(e) == (f"node a: cannot bind the master address 127.0.0.1:{port} (Address already in use); "
                            "change master_port (or stop what listens on it)")


def test_http_port_taken_on_node_0():
    c = _a3_two_nodes()

    def bind(addr, port):
        if port == 8000:
            raise OSError(errno.EADDRINUSE, "Address already in use")
    with pytest.raises(PreflightError) as e:
        check_ports(c, c.nodes[0], fake_host(bind=bind))
    assert _one_line(e) == ("node a3-node0: cannot bind the http address 0.0.0.0:8000 (Address already in use); "
                            "change http.port (or stop what listens on 8000)")
    assert check_ports(c, c.nodes[0], fake_host()) == "ports: 10.10.0.1:29501 free, 0.0.0.0:8000 free"


def test_master_unreachable_from_other_nodes():
    c = _a3_two_nodes()

    def route(addr, port):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")
    with pytest.raises(PreflightError) as e:
        check_ports(c, c.nodes[1], fake_host(route=route))
    assert _one_line(e) == ("node a3-node1: node 0's address 10.10.0.1 is not reachable from here (Network is "
                            "unreachable); fix nodes[0].address or this host's routes")

    def resolve(name):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(PreflightError, match="node a3-node1: node 0's address 10.10.0.1 is not reachable"):
        check_ports(c, c.nodes[1], fake_host(resolve=resolve))


def test_network_interface_checks():
    c = _a3_two_nodes()
    with pytest.raises(PreflightError) as e:
        check_network(c, c.nodes[1], fake_host(interfaces=lambda: {"lo": ["127.0.0.1"], "eth0": ["10.10.0.2"]}))
    assert _one_line(e) == ("node a3-node1: interface 'enp189s0f0' is not on this host (ip -o addr lists eth0, lo); "
                            "fix network.ifname or nodes[1].ifname")
    c = load(GOLDEN / "a2-2node.json")  # network.hccl: if_ip
    with pytest.raises(PreflightError) as e:
        check_network(c, c.nodes[0], fake_host(interfaces=lambda: {"enp67s0f5": ["172.16.0.99"]}))
    assert _one_line(e) == ("node a2-node0: HCCL_IF_IP would be 172.16.0.11, which is not on enp67s0f5 "
                            "(172.16.0.99); fix nodes[0].address or use network.hccl: ifname")
    assert check_network(c, c.nodes[0], fake_host(interfaces=lambda: None)).endswith("not checked (`ip -o addr` "
                                                                                     "unavailable)")


def test_model_path_and_config(tmp_path):
    c = _a3_two_nodes(model=str(tmp_path / "missing"))
    with pytest.raises(PreflightError) as e:
        check_model(c, c.nodes[1])
    assert _one_line(e) == (f"node a3-node1: model {tmp_path}/missing: {tmp_path}/missing/config.json: no "
                            "config.json; pass --model a GLM-5 checkpoint directory")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PreflightError, match=r"node a3-node1: model .*: not valid JSON .*; re-download the checkpoint"):
        check_model(_a3_two_nodes(model=str(tmp_path)), c.nodes[1])


def test_layout_must_split_the_model():
    from glm5_ascend.config import ModelConfig
    cfg = ModelConfig.from_pretrained(MODEL)
    c = parse({"device": "cpu", "model": MODEL, "devices_per_node": 3, "layout": {"tensor_parallel_size": 3},
               "nodes": [{"host": "a", "address": "10.0.0.1"}]}, "c.yaml")
    with pytest.raises(PreflightError) as e:
        check_model_layout(c, cfg)
    assert _one_line(e) == ("c.yaml: layout.tensor_parallel_size 3 does not divide the model's "
                            "num_attention_heads=64; pick a divisor")
    c = parse({"device": "cpu", "model": MODEL, "devices_per_node": 8,
               "layout": {"tensor_parallel_size": 8, "data_parallel_size": 3, "enable_expert_parallel": True},
               "nodes": [{"host": h, "address": f"10.0.0.{i}"} for i, h in enumerate("abc")]}, "c.yaml")
    with pytest.raises(PreflightError, match="256 routed experts do not split over 24 expert-parallel ranks"):
        check_model_layout(c, cfg)


def test_hccl_buffsize_must_cover_mc2():
    from glm5_ascend.config import ModelConfig
    cfg = ModelConfig.from_pretrained(MODEL)
    c = _a3_two_nodes()
    with pytest.raises(PreflightError) as e:
        check_hccl_buffsize(c, c.nodes[0], {"HCCL_BUFFSIZE": "200"}, cfg)
    assert _one_line(e) == ("node a3-node0: HCCL_BUFFSIZE=200 MB is below the 3296 MB MC2 dispatch/combine need at "
                            "512 tokens per rank over EP 32; raise env.HCCL_BUFFSIZE to 3296 or lower "
                            "layout.mc2_tokens_per_rank")
    with pytest.raises(PreflightError, match="below the 3296 MB"):
        check_hccl_buffsize(c, c.nodes[0], {}, cfg)  # unset: HCCL's 200 MB
    with pytest.raises(PreflightError, match=r"HCCL_BUFFSIZE='2G' is not a whole number of MB"):
        check_hccl_buffsize(c, c.nodes[0], {"HCCL_BUFFSIZE": "2G"}, cfg)
    small = _a3_two_nodes(mc2_tokens_per_rank=16)
    assert check_hccl_buffsize(small, c.nodes[0], {"HCCL_BUFFSIZE": "200"}, cfg) == [
        "HCCL_BUFFSIZE: 200 MB >= 103 MB needed by MC2 at 16 tokens per rank"]  # 3296 x 16/512
    a2 = load(GOLDEN / "a2-2node.json")
    a2_ep8 = a2.__class__(**{**a2.__dict__, "nodes": a2.nodes[:1], "dp": 1})
    notes = check_hccl_buffsize(a2_ep8, a2.nodes[0], {"HCCL_BUFFSIZE": "1000"}, cfg)
    assert notes[1] == ("warning: MC2 on a2: EP size 8 is not one of 16, 32, 64, 128, 256 (the engine must use another "
                        "EP path)")


def test_finding_this_node():
    c = _a3_two_nodes()
    assert find_local_node(c, fake_host(interfaces=lambda: {"eth0": ["10.10.0.2"]})).index == 1
    assert find_local_node(c, fake_host(hostname=lambda: "a3-node0")).index == 0
    with pytest.raises(PreflightError) as e:
        find_local_node(c, fake_host(interfaces=lambda: {"eth0": ["10.9.9.9"]}))
    assert _one_line(e).endswith("has an address of this host (10.9.9.9) or its name 'test-host'; fix nodes[].address "
                                 "or pass --node-rank N")
    with pytest.raises(PreflightError, match=r"matches several nodes .* \(a3-node0 \(10\.10\.0\.1\), a3-node1 "
                                             r"\(10\.10\.0\.2\)\); pass --node-rank N"):
        find_local_node(c, fake_host(hostname_addresses=lambda: {"10.10.0.1", "10.10.0.2"}))


def test_node_rank_out_of_range(capsys, tmp_path):
    import argparse
    from glm5_ascend.launcher import launch
    args = argparse.Namespace(cluster_file=str(GOLDEN / "a2-2node.json"), dry_run=False, node_rank=2,
                              output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--node-rank 2 is not a node of .*a2-2node\.json \(0\.\.1\)"):
        launch.main(args, host=fake_host(), exec_fn=lambda *a: None)
