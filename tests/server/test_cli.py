"""`python -m glm5_ascend.server` flags: bad values give one line and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

CASES = [
    (["--port", "abc"], 2, "--port"),
    (["--dtype", "int8"], 2, "--dtype"),
    (["--no-such-flag"], 2, "unrecognized arguments"),
    (["--speculative-config", "{not json"], 2, "not valid JSON"),
    (["--max-model-len", "lots"], 2, "number of tokens"),
    (["-tp", "3"], 1, "num_attention_heads=4"),
    (["-dp", "3", "--enable-expert-parallel"], 1, "n_routed_experts=8"),
    (["-pp", "2"], 1, "--pipeline-parallel-size"),
    (["-tp", "2", "--nnodes", "3"], 1, "--nnodes 3 does not divide"),
    (["--node-rank", "1"], 1, "needs --nnodes"),
    (["-tp", "2", "--nnodes", "2", "--node-rank", "2"], 1, "--node-rank 2"),
    (["-dp", "2", "--data-parallel-size-local", "1", "--data-parallel-start-rank", "2"], 1, "exceeds"),
    (["--quantization", "fp8"], 1, "--quantization"),
    (["--kv-cache-dtype", "fp8"], 1, "--kv-cache-dtype"),
    (["--tool-call-parser", "hermes"], 1, "unknown tool parser"),
    (["--reasoning-parser", "deepseek_r1"], 1, "unknown reasoning parser"),
    (["--enable-auto-tool-choice"], 1, "--tool-call-parser"),
    (["--max-logprobs", "-2"], 1, "--max-logprobs -2 must be >= 0, or -1"),
    (["--chat-template", "/no/such/template.jinja"], 1, "no such file"),
    (["--max-model-len", "1M"], 1, "max_position_embeddings"),
    (["--block-size", "100"], 1, "--block-size"),
    (["/no/such/checkpoint"], 1, "config.json"),
    (["--device", "tpu"], 1, "--device"),
    (["--gpu-memory-utilization", "2"], 1, "--gpu-memory-utilization"),
    (["--override-generation-config", "[1]"], 2, "JSON object"),
]


@pytest.fixture(scope="module")
def busy_port():
    """A port some other program already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tiny_model_dir, busy_port):
    """Run every case at once (each is a short-lived process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = str(s.getsockname()[1])  # released before the servers start: none of them gets to listen
    runs = [["--host", "127.0.0.1", "--port", free, *args] for args, _, _ in CASES]
    runs.append(["--host", "127.0.0.1", "--port", str(busy_port)])
    procs = [subprocess.Popen([sys.executable, "-m", "glm5_ascend.server", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for args in runs]
    return [p.communicate(timeout=120) + (p.returncode,) for p in procs]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(c[0]) for c in CASES])
def test_bad_flag(results, i):
    args, code, needle = CASES[i]
    out, err, rc = results[i]
    assert rc == code, (args, rc, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and needle in lines[0], err


def test_port_in_use_fails_before_loading_the_model(results, busy_port):
    out, err, rc = results[-1]
    assert rc == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{busy_port}" in lines[0], err
    assert "KV cache" not in err  # refused before the engine was built
