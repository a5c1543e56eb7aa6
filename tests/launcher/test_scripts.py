"""scripts/*.sh: each parses (bash -n), states what it cannot load yet, and its dry run emits the right command."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.launcher.conftest import GOLDEN

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
MODEL = str(GOLDEN / "glm5-model")
LAYOUTS = ["a3-1node-w8a8-tp16-ep.sh", "a3-2node-bf16-dp2-tp16-ep.sh", "a2-2node-w8a8-dp2-tp8-ep.sh", "gpu-tp8.sh"]


def _csv(values) -> str:
    return ",".join(map(str, values))


def _run(script: str, tmp_path: Path, **env) -> list[list[str]]:
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DRY_RUN": "1",
            "OUTPUT_DIR": str(tmp_path / "out"), **env}
    r = subprocess.run(["bash", str(SCRIPTS / script)], capture_output=True, text=True, env=full, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines() if line.startswith("glm5-ascend serve ")]


@pytest.mark.parametrize("script", LAYOUTS)
def test_scripts_parse_and_say_what_is_not_loadable_yet(script):
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)
    head = (SCRIPTS / script).read_text().split("set -euo pipefail")[0]
    quantized = re.search(r"w8a8|gpu", script) is not None
    assert ("cannot load W8A8 checkpoints yet" in head or "cannot load FP8 checkpoints yet" in head) == quantized


def test_a3_one_node(tmp_path):
    (cmd,) = _run("a3-1node-w8a8-tp16-ep.sh", tmp_path, MODEL=MODEL, NODE0_ADDR="10.0.0.5",
                  DEVICE_IPS=_csv(f"10.1.0.{d}" for d in range(1, 17)), SUPER_DEVICE_IDS=_csv(range(16)),
                  SUPER_POD_ID="0", EXTRA_ARGS="--max-model-len 40960")
    assert cmd == ["glm5-ascend", "serve", MODEL, "--device", "npu", "--tensor-parallel-size", "16",
                   "--enable-expert-parallel", "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "glm-5",
                   "--max-model-len", "40960"]
    assert (tmp_path / "out" / "node0.ranktable.json").is_file()


def test_a3_two_nodes(tmp_path):
    env = dict(MODEL=MODEL, NODE0_ADDR="10.0.0.1", NODE1_ADDR="10.0.0.2", IFNAME="enp189s0f0", SUPER_POD_ID="0",
               NODE0_DEVICE_IPS=_csv(f"10.1.0.{d}" for d in range(16)), NODE0_SUPER_DEVICE_IDS=_csv(range(16)),
               NODE1_DEVICE_IPS=_csv(f"10.1.1.{d}" for d in range(16)),
               NODE1_SUPER_DEVICE_IDS=_csv(range(1 << 22, (1 << 22) + 16)))
    head, worker = _run("a3-2node-bf16-dp2-tp16-ep.sh", tmp_path, **env)
    base = ["glm5-ascend", "serve", MODEL, "--device", "npu", "--tensor-parallel-size", "16",
            "--data-parallel-size", "2", "--enable-expert-parallel", "--nnodes", "2"]
    assert head == base + ["--node-rank", "0", "--master-addr", "10.0.0.1", "--master-port", "29501", "--host",
                           "0.0.0.0", "--port", "8000", "--served-model-name", "glm-5"]
    assert worker == base + ["--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29501",
                             "--headless", "--served-model-name", "glm-5"]
    assert "export HCCL_SOCKET_IFNAME=enp189s0f0" in (tmp_path / "out" / "node1.env").read_text()


def test_a2_two_nodes_one_node_rank(tmp_path):
    env = dict(MODEL=MODEL, NODE0_ADDR="10.0.0.1", NODE1_ADDR="10.0.0.2", IFNAME="eth0", HCCL_VIA="if_ip",
               NODE_RANK="1", MASTER_PORT="29600",
               NODE0_DEVICE_IPS=_csv(f"10.1.0.{d}" for d in range(8)),
               NODE1_DEVICE_IPS=_csv(f"10.1.1.{d}" for d in range(8)))
    (cmd,) = _run("a2-2node-w8a8-dp2-tp8-ep.sh", tmp_path, **env)
    assert cmd == ["glm5-ascend", "serve", MODEL, "--device", "npu", "--tensor-parallel-size", "8",
                   "--data-parallel-size", "2", "--enable-expert-parallel", "--nnodes", "2", "--node-rank", "1",
                   "--master-addr", "10.0.0.1", "--master-port", "29600", "--headless", "--served-model-name", "glm-5"]
    assert "export HCCL_IF_IP=10.0.0.2" in (tmp_path / "out" / "node1.env").read_text()


def test_gpu_tp8_is_the_seed_line(tmp_path):
    (cmd,) = _run("gpu-tp8.sh", tmp_path, NODE0_ADDR="10.0.0.9")
    assert cmd == ["glm5-ascend", "serve", "zai-org/GLM-5-FP8", "--device", "cuda", "--tensor-parallel-size", "8",
                   "--host", "0.0.0.0", "--port", "8000", "--gpu-memory-utilization", "0.85", "--tool-call-parser",
                   "glm47", "--reasoning-parser", "glm45", "--enable-auto-tool-choice", "--served-model-name", "glm-5"]
    assert (tmp_path / "out" / "node0.env").read_text() == ("export CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7\n"
                                                           "export OMP_NUM_THREADS=1\n")


def test_multi_node_scripts_demand_the_addresses(tmp_path):
    r = subprocess.run(["bash", str(SCRIPTS / "a2-2node-w8a8-dp2-tp8-ep.sh")], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "DRY_RUN": "1"}, cwd=tmp_path)
    assert r.returncode != 0 and "set NODE0_ADDR to node 0's host address" in r.stderr
