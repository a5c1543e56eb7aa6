"""`glm5-ascend launch`: dry runs against hand-checked goldens, the serve-command contract, the files, exec."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from glm5_ascend.launcher import launch
from tests.launcher.conftest import GOLDEN, fake_host

CASES = [("a3-1node.yaml", "a3-1node.txt", 1, 16), ("a3-2node.yaml", "a3-2node.txt", 2, 32),
         ("a2-2node.json", "a2-2node.txt", 2, 16)]


def _args(desc, out_dir=None, node_rank=None, dry_run=True):
    return argparse.Namespace(cluster_file=str(desc), dry_run=dry_run, node_rank=node_rank,
                              output_dir=None if out_dir is None else str(out_dir))


def _dry_run(capsys, desc, out_dir=None, node_rank=None, host=None) -> str:
    assert launch.main(_args(desc, out_dir, node_rank), host=host or fake_host()) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("desc, expected, nodes, world", CASES)
def test_dry_run_matches_the_golden_output(golden, tmp_path, capsys, desc, expected, nodes, world):
    out = _dry_run(capsys, desc, tmp_path).replace(str(tmp_path), "<OUT>")
    if os.environ.get("GLM5_UPDATE_GOLDEN") == "1":  # only after hand-checking the new output
        (golden / expected).write_text(out)
    assert out == (golden / expected).read_text()
    assert out.count("=== node ") == nodes
    ranks = [int(r) for r in re.findall(r'"rank_id": "(\d+)"', out)]
    assert ranks == list(range(world)) * nodes  # every node's table holds the whole cluster, ranks in order


@pytest.mark.parametrize("desc, expected, nodes, world", CASES)
def test_written_files_are_what_the_dry_run_prints(golden, tmp_path, capsys, desc, expected, nodes, world):
    out = _dry_run(capsys, desc, tmp_path)
    for n in range(nodes):
        cmd = (tmp_path / f"node{n}.cmd").read_text()
        env = (tmp_path / f"node{n}.env").read_text()
        table = json.loads((tmp_path / f"node{n}.ranktable.json").read_text())
        assert cmd.strip() in out and env.strip() in out
        assert f"export RANK_TABLE_FILE={tmp_path / f'node{n}.ranktable.json'}" in env
        assert sum(len(s["device"]) for s in table["server_list"]) == world


def test_node_rank_prints_only_that_node(golden, tmp_path, capsys):
    out = _dry_run(capsys, "a3-2node.yaml", tmp_path, node_rank=1)
    assert out.count("=== node ") == 1 and "=== node 1 of 2: a3-node1" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node1.cmd", "node1.env", "node1.ranktable.json"]


def test_dry_run_without_output_dir_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "glm5-model").symlink_to(GOLDEN / "glm5-model")
    out = _dry_run(capsys, GOLDEN / "a3-1node.yaml")
    assert f"RANK_TABLE_FILE={tmp_path / 'glm5-launch' / 'node0.ranktable.json'}" in out  # where a launch writes it
    assert not (tmp_path / "glm5-launch").exists()


def _commands(tmp_path, nodes):
    return [shlex.split((tmp_path / f"node{n}.cmd").read_text()) for n in range(nodes)]


def test_the_serve_commands_follow_the_contract(golden, tmp_path, capsys):
    _dry_run(capsys, "a3-2node.yaml", tmp_path)
    head, worker = _commands(tmp_path, 2)
    common = ["glm5-ascend", "serve", "glm5-model", "--device", "npu", "--tensor-parallel-size", "16",
              "--data-parallel-size", "2", "--enable-expert-parallel", "--nnodes", "2"]
    assert head[:len(common)] == common and worker[:len(common)] == common
    assert head[len(common):] == ["--node-rank", "0", "--master-addr", "10.10.0.1", "--master-port", "29501",
                                  "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "glm-5"]
    assert worker[len(common):] == ["--node-rank", "1", "--master-addr", "10.10.0.1", "--master-port", "29501",
                                    "--headless", "--served-model-name", "glm-5"]


def test_one_node_omits_the_multi_node_and_dp_flags(golden, tmp_path, capsys):
    _dry_run(capsys, "a3-1node.yaml", tmp_path)
    (cmd,) = _commands(tmp_path, 1)
    assert not {"--nnodes", "--node-rank", "--master-addr", "--master-port", "--data-parallel-size",
                "--headless"} & set(cmd)
    assert cmd[cmd.index("--host"):cmd.index("--host") + 4] == ["--host", "0.0.0.0", "--port", "8000"]


def test_cuda_and_cpu_descriptions_emit_only_what_applies(tmp_path, capsys):
    desc = tmp_path / "gpu.yaml"
    desc.write_text("device: cuda\nmodel: /m\ndevices_per_node: 2\nlayout: {tensor_parallel_size: 2}\n"
                    "network: {ifname: eth0}\nnodes: [{host: g, address: 10.0.0.1, device_ids: [2, 3]}]\n")
    out = _dry_run(capsys, desc, tmp_path)
    env = (tmp_path / "node0.env").read_text().splitlines()
    assert env == ["export GLOO_SOCKET_IFNAME=eth0", "export NCCL_SOCKET_IFNAME=eth0",
                   "export CUDA_VISIBLE_DEVICES=2,3", "export OMP_NUM_THREADS=1"]
    assert "rank table" not in out and not (tmp_path / "node0.ranktable.json").exists()
    assert "--device cuda --tensor-parallel-size 2 --host 0.0.0.0 --port 8000" in out
    desc.write_text(desc.read_text().replace("cuda", "cpu"))
    _dry_run(capsys, desc, tmp_path)
    assert (tmp_path / "node0.env").read_text() == "export GLOO_SOCKET_IFNAME=eth0\n"


def test_sourcing_the_env_file_drops_a_stale_hccl_if_ip(golden, tmp_path, capsys):
    _dry_run(capsys, "a3-1node.yaml", tmp_path)
    r = subprocess.run(["bash", "-c", f". {shlex.quote(str(tmp_path / 'node0.env'))}; env"], capture_output=True,
                       text=True, env={"PATH": os.environ["PATH"], "HCCL_IF_IP": "10.9.9.9"}, check=True)
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert "HCCL_IF_IP" not in env  # it outranks HCCL_SOCKET_IFNAME, so a leftover one would win
    assert env["HCCL_SOCKET_IFNAME"] == "enp189s0f0"
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == ",".join(map(str, range(16)))


def test_local_tools_fill_this_node_and_must_agree_with_the_description(golden, tmp_path, capsys):
    def run(argv):  # an A3 host whose hccn_tool / npu-smi answer for every die
        d = int(argv[argv.index("-i") + 1])
        if argv[0] == "hccn_tool":
            return f"vnic link status: UP\nvnic ipaddr: 192.168.1.{d + 1}\nvnic netmask: 255.255.255.0\n"
        chip = int(argv[argv.index("-c") + 1])
        die = 2 * d + chip
        return f"\tSDID                           : {(die // 2 << 18) | (die % 2 << 16) | die}\n\tSuper Pod ID : 0\n"
    host = fake_host(run=run, interfaces=lambda: {"enp189s0f0": ["10.10.0.1"]})
    out = _dry_run(capsys, "a3-2node.yaml", tmp_path, host=host)
    assert out.replace(str(tmp_path), "<OUT>") == (GOLDEN / "a3-2node.txt").read_text()

    def wrong(argv):
        text = run(argv)
        return text.replace("192.168.1.4\n", "192.168.1.99\n")
    with pytest.raises(ValueError, match=r"node a3-node0 device 3: the host reports ip 192\.168\.1\.99 but .* says "
                                         r"192\.168\.1\.4; fix nodes\[0\]\.device_ips\[3\]"):
        _dry_run(capsys, "a3-2node.yaml", tmp_path,
                 host=fake_host(run=wrong, interfaces=lambda: {"enp189s0f0": ["10.10.0.1"]}))


def test_missing_device_facts_name_the_node_and_device(tmp_path, capsys):
    text = (GOLDEN / "a2-2node.json").read_text()
    raw = json.loads(text)
    raw["nodes"][1]["device_ips"][5] = None
    desc = tmp_path / "c.json"
    desc.write_text(json.dumps(raw))
    with pytest.raises(ValueError) as e:
        _dry_run(capsys, desc, tmp_path)
    assert str(e.value) == (f"node a2-node1 device 5: no device IP (hccn_tool -ip is not on this host or this is "
                            f"another node); add nodes[1].device_ips to {desc}")


def _launch_host(**kw):
    return fake_host(interfaces=lambda: {"enp189s0f0": ["10.10.0.2"]}, **kw)


def test_launch_runs_preflight_writes_the_files_and_execs_serve(golden, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HCCL_IF_IP", "10.9.9.9")
    calls = []
    rc = launch.main(_args("a3-2node.yaml", tmp_path, dry_run=False), host=_launch_host(),
                     exec_fn=lambda file, argv, env: calls.append((file, argv, env)))
    assert rc == 0
    (file, argv, env), = calls
    cmd = shlex.split((tmp_path / "node1.cmd").read_text())  # found itself as node 1 by its address
    assert argv[0] == file and argv[-len(cmd) + 1:] == cmd[1:]
    assert "HCCL_IF_IP" not in env and env["HCCL_SOCKET_IFNAME"] == "enp189s0f0"
    assert env["RANK_TABLE_FILE"] == str(tmp_path / "node1.ranktable.json")
    assert json.loads(Path(env["RANK_TABLE_FILE"]).read_text())["version"] == "1.2"
    err = capsys.readouterr().err
    assert "preflight a3-node1: devices: 16 on this host" in err
    digest = hashlib.sha256((GOLDEN / "glm5-model" / "config.json").read_bytes()).hexdigest()
    assert f"config.json sha256 {digest}" in err


def test_launch_stops_at_the_first_failed_check(golden, tmp_path, capsys):
    calls = []
    with pytest.raises(RuntimeError, match="node a3-node1: .* this host has 8 device"):
        launch.main(_args("a3-2node.yaml", tmp_path, dry_run=False), host=_launch_host(device_count=lambda k: 8),
                    exec_fn=lambda *a: calls.append(a))
    assert calls == [] and not (tmp_path / "node1.cmd").exists()


def test_launch_execs_in_place_so_signals_reach_the_server(tmp_path):
    """A real launch in a child process: the fake `glm5-ascend` it execs keeps the child's pid (no orphan)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "glm5-ascend"
    fake.write_text(f'#!/bin/sh\necho "$$" > {tmp_path}/pid\necho "$@" > {tmp_path}/args\n'
                    f'echo "$OMP_NUM_THREADS $HCCL_IF_IP" > {tmp_path}/env\n')
    fake.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    desc = tmp_path / "cpu.yaml"
    desc.write_text(f"device: cpu\nmodel: {GOLDEN / 'glm5-model'}\ndevices_per_node: 2\n"
                    f"layout: {{tensor_parallel_size: 2}}\nhttp: {{host: 127.0.0.1, port: {port}}}\n"
                    "env: {OMP_NUM_THREADS: 3}\nnodes: [{host: me, address: 127.0.0.1}]\n")
    code = ("import sys; from glm5_ascend.launcher.launch import add_arguments, main; import argparse; "
            "p = argparse.ArgumentParser(); add_arguments(p); sys.exit(main(p.parse_args(sys.argv[1:])))")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HCCL_IF_IP": "stale"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(desc), "--node-rank", "0", "--output-dir",
                             str(tmp_path / "out")], env=env, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert int((tmp_path / "pid").read_text()) == proc.pid
    assert (tmp_path / "args").read_text().split() == [
        "serve", str(GOLDEN / "glm5-model"), "--device", "cpu", "--tensor-parallel-size", "2", "--host", "127.0.0.1",
        "--port", str(port)]
    assert (tmp_path / "env").read_text().split() == ["3", "stale"]  # cpu: HCCL is not this launch's business


def test_serve_parser_accepts_the_emitted_commands(golden, tmp_path, capsys):
    """The other half of the contract: `glm5-ascend serve` parses every flag launch emits."""
    from glm5_ascend.server import cli_args
    parser = argparse.ArgumentParser()
    cli_args.add_arguments(parser)
    if "--nnodes" not in parser._option_string_actions:
        pytest.skip("the serve parser has no --nnodes yet (the multi-node engine is not merged)")
    _dry_run(capsys, "a3-2node.yaml", tmp_path)
    for n, cmd in enumerate(_commands(tmp_path, 2)):
        a = parser.parse_args(cmd[2:])
        assert (a.tensor_parallel_size, a.data_parallel_size, a.enable_expert_parallel) == (16, 2, True)
        assert (a.nnodes, a.node_rank, a.master_addr, a.master_port, bool(a.headless)) == (2, n, "10.10.0.1",
                                                                                          29501, n > 0)


def test_cli_registers_launch():
    from glm5_ascend import cli
    assert cli._COMMANDS["launch"][0] == "glm5_ascend.launcher.launch"
    parser = argparse.ArgumentParser()
    launch.add_arguments(parser)
    a = parser.parse_args(["c.yaml", "--dry-run", "--node-rank", "1", "--output-dir", "o"])
    assert (a.cluster_file, a.dry_run, a.node_rank, a.output_dir) == ("c.yaml", True, 1, "o")


def test_dry_run_elsewhere_notes_that_hccl_buffsize_is_not_sized(tmp_path, capsys):
    raw = json.loads((GOLDEN / "a2-2node.json").read_text())
    raw["model"] = str(tmp_path / "not-here")
    desc = tmp_path / "c.json"
    desc.write_text(json.dumps(raw))
    assert launch.main(_args(desc, tmp_path), host=fake_host()) == 0
    out, err = capsys.readouterr()
    assert "export HCCL_BUFFSIZE=200\n" in out
    assert err == (f"note: {tmp_path / 'not-here'}/config.json is not readable here, so HCCL_BUFFSIZE is not sized for "
                   "MC2; the preflight on each node checks it\n")
