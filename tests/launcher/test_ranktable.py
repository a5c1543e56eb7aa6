"""Rank tables against JSON Schemas written from HCCL's v1.0 / v1.2 docs, and the tool-output parsers."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from glm5_ascend.launcher.cluster import load, parse
from glm5_ascend.launcher.preflight import parse_ip_addr
from glm5_ascend.launcher.ranktable import (DeviceFacts, build_rank_table, parse_hccn_ip, parse_hccn_vnic,
                                            parse_npu_smi_count, parse_spod_info, probe_local_devices)
from tests.launcher.conftest import GOLDEN

SCHEMAS = Path(__file__).parent / "schemas"


def _validator(version: str):
    schema = json.loads((SCHEMAS / f"ranktable-v{version}.schema.json").read_text())
    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _semantics(table: dict, per_node: int) -> None:
    """What the schema cannot say: ranks 0..world-1 contiguous per server, pods name listed servers."""
    ranks = [int(d["rank_id"]) for s in table["server_list"] for d in s["device"]]
    assert ranks == list(range(len(ranks)))
    assert int(table["server_count"]) == len(table["server_list"])
    assert all(len(s["device"]) == per_node for s in table["server_list"])
    if "super_pod_list" in table:
        listed = [x["server_id"] for p in table["super_pod_list"] for x in p["server_list"]]
        assert listed == [s["server_id"] for s in table["server_list"]]


@pytest.mark.parametrize("desc, version", [("a3-1node.yaml", "1.2"), ("a3-2node.yaml", "1.2"),
                                           ("a2-2node.json", "1.0")])
def test_emitted_tables_match_the_documented_schema(desc, version):
    c = load(GOLDEN / desc)
    table = build_rank_table(c)
    _validator(version).validate(table)
    _semantics(table, c.devices_per_node)
    assert table["version"] == version


def test_the_schemas_reject_what_hccl_rejects():
    c = load(GOLDEN / "a3-2node.yaml")
    v12, v10 = _validator("1.2"), _validator("1.0")
    table = build_rank_table(c)
    bad = copy.deepcopy(table)
    del bad["server_list"][0]["device"][3]["super_device_id"]  # RanktableCheck: super_device_id[] is invalid
    assert not v12.is_valid(bad)
    bad = copy.deepcopy(table)
    bad["server_list"][1]["device"][0]["rank_id"] = 16  # numbers are strings
    assert not v12.is_valid(bad)
    bad = copy.deepcopy(table)
    bad["server_list"][0]["device"][0]["device_ip"] = "192.168.1.300"
    assert not v12.is_valid(bad)
    a2 = build_rank_table(load(GOLDEN / "a2-2node.json"))
    assert not v12.is_valid(a2) and not v10.is_valid(table)
    bad = copy.deepcopy(a2)
    del bad["server_list"][1]["device"][2]["device_ip"]  # mandatory across servers
    assert not v10.is_valid(bad)
    one = copy.deepcopy(a2)
    one["server_list"], one["server_count"] = one["server_list"][:1], "1"
    del one["server_list"][0]["device"][2]["device_ip"]  # optional on one server
    assert v10.is_valid(one)


def _a3(pods):
    nodes = [{"host": f"n{i}", "address": f"10.0.0.{i + 1}", "device_ips": [f"10.1.{i}.{d}" for d in range(2)],
              "super_device_ids": [i * 4 + d for d in range(2)], "super_pod_id": p} for i, p in enumerate(pods)]
    return parse({"device": "a3", "model": "/m", "devices_per_node": 2, "network": {"ifname": "eth0"},
                  "layout": {"tensor_parallel_size": 2, "data_parallel_size": len(pods)}, "nodes": nodes}, "c.yaml")


def test_super_pods_group_their_servers_in_order():
    table = build_rank_table(_a3(["0", "0", "7"]))
    assert [(p["super_pod_id"], [s["server_id"] for s in p["server_list"]]) for p in table["super_pod_list"]] == [
        ("0", ["10.0.0.1", "10.0.0.2"]), ("7", ["10.0.0.3"])]
    _validator("1.2").validate(table)
    with pytest.raises(ValueError, match="node n2: Super Pod 0's nodes are not listed together in c.yaml; reorder"):
        build_rank_table(_a3(["0", "7", "0"]))


def test_missing_a3_facts_name_node_and_device():
    raw_nodes = [{"host": "n0", "address": "10.0.0.1", "device_ips": ["10.1.0.0", "10.1.0.1"],
                  "super_device_ids": [0, None]}]
    c = parse({"device": "a3", "model": "/m", "devices_per_node": 2, "layout": {"tensor_parallel_size": 2},
               "nodes": raw_nodes}, "c.yaml")
    with pytest.raises(ValueError, match=r"node n0 device 1: no super_device_id \(npu-smi is not on this host or this "
                                         r"is another node\); add nodes\[0\]\.super_device_ids to c\.yaml"):
        build_rank_table(c)
    raw_nodes[0]["super_device_ids"] = [0, 1]
    c = parse({"device": "a3", "model": "/m", "devices_per_node": 2, "layout": {"tensor_parallel_size": 2},
               "nodes": raw_nodes}, "c.yaml")
    with pytest.raises(ValueError, match=r"node n0: no Super Pod ID .* add nodes\[0\]\.super_pod_id to c\.yaml"):
        build_rank_table(c)
    facts = {0: DeviceFacts(super_pod_id="3"), 1: DeviceFacts(super_pod_id="3")}
    assert build_rank_table(c, 0, facts)["super_pod_list"][0]["super_pod_id"] == "3"  # the host's tools fill it


# Outputs as the tools' documentation shows them.
HCCN_IP = "ipaddr:10.20.0.10\nnetmask:255.255.255.0\n"
HCCN_VNIC = "vnic link status: UP\nvnic ipaddr: 192.168.2.199\nvnic netmask: 255.255.255.0\n"
SPOD_PLAIN = ("\tSDID                           : 38600711\n\tSuper Pod Size                 : 48\n"
              "\tSuper Pod ID                   : 2\n\tServer Index                   : 9\n")
SPOD_TABLE = ("+-----------------------------+------------------------+\n"
              "| SDID                 : 37748736 | Super Pod Size : 48 |\n"
              "| Super Pod ID                 : 3          | Pod ID : 1          |\n"
              "+-----------------------------+------------------------+\n")
NPU_LIST_A2 = "\tTotal Count                    : 8\n\n" + "".join(
    f"\tNPU ID                         : {i}\n\tChip Count                     : 1\n\n" for i in range(8))
NPU_LIST_A3 = NPU_LIST_A2.replace("Chip Count                     : 1", "Chip Count                     : 2")
IP_O_ADDR = ("1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
             "2: enp189s0f0    inet 10.10.0.1/24 brd 10.10.0.255 scope global enp189s0f0\\       valid_lft forever\n"
             "2: enp189s0f0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever\n"
             "5: bond0.100@bond0    inet 172.16.0.11/16 scope global bond0.100\n")


def test_tool_output_parsers():
    assert parse_hccn_ip(HCCN_IP) == "10.20.0.10" and parse_hccn_ip(HCCN_VNIC) is None
    assert parse_hccn_vnic(HCCN_VNIC) == "192.168.2.199" and parse_hccn_vnic(HCCN_IP) is None
    assert parse_spod_info(SPOD_PLAIN) == (38600711, "2")
    assert parse_spod_info(SPOD_TABLE) == (37748736, "3")
    assert parse_spod_info("This device does not support querying spod-info.\n") == (None, None)
    assert parse_npu_smi_count(NPU_LIST_A2) == 8 and parse_npu_smi_count(NPU_LIST_A3) == 16
    assert parse_npu_smi_count("Total Count : 4\n") == 4 and parse_npu_smi_count("") is None
    assert parse_ip_addr(IP_O_ADDR) == {"lo": ["127.0.0.1"], "enp189s0f0": ["10.10.0.1", "fe80::1"],
                                        "bond0.100": ["172.16.0.11"]}


def test_probe_asks_each_die_of_its_card_and_chip():
    asked = []

    def run(argv):
        asked.append(argv)
        return HCCN_VNIC if argv[0] == "hccn_tool" else SPOD_PLAIN
    facts = probe_local_devices("a3", (4, 5), run)
    assert ["npu-smi", "info", "-t", "spod-info", "-i", "2", "-c", "1"] in asked  # die 5 = card 2, chip 1
    assert ["hccn_tool", "-i", "5", "-vnic", "-g"] in asked
    assert facts[5] == DeviceFacts("192.168.2.199", 38600711, "2")
    assert probe_local_devices("a2", (0,), lambda argv: HCCN_IP if argv[3] == "-ip" else None) == {
        0: DeviceFacts("10.20.0.10")}
    assert probe_local_devices("a2", (0,), lambda argv: None) == {0: DeviceFacts()}  # no tools: nothing known
