"""`python -m glm5_ascend.server` flags: bad values give one line and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CASES = [
    (["--port", "abc"], 2, "--port"),
    (["--dtype", "int8"], 2, "--dtype"),
    (["--no-such-flag"], 2, "unrecognized arguments"),
    (["--speculative-config", "{not json"], 2, "not valid JSON"),
    (["--max-model-len", "lots"], 2, "number of tokens"),
    (["-tp", "2"], 1, "glm5-ascend launch"),
    (["--data-parallel-size", "2"], 1, "glm5-ascend launch"),
    (["--quantization", "fp8"], 1, "--quantization"),
    (["--kv-cache-dtype", "fp8"], 1, "--kv-cache-dtype"),
    (["--tool-call-parser", "hermes"], 1, "unknown tool parser"),
    (["--reasoning-parser", "deepseek_r1"], 1, "unknown reasoning parser"),
    (["--enable-auto-tool-choice"], 1, "--tool-call-parser"),
    (["--max-logprobs", "50"], 1, "--max-logprobs"),
    (["--chat-template", "/no/such/template.jinja"], 1, "no such file"),
    (["--max-model-len", "1M"], 1, "max_position_embeddings"),
    (["--block-size", "100"], 1, "--block-size"),
    (["/no/such/checkpoint"], 1, "config.json"),
    (["--device", "tpu"], 1, "--device"),
    (["--gpu-memory-utilization", "2"], 1, "--gpu-memory-utilization"),
    (["--override-generation-config", "[1]"], 2, "JSON object"),
]


@pytest.fixture(scope="module")
def results(tiny_model_dir):
    """Run every case at once (each is a short-lived process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "glm5_ascend.server", "--port", "1", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for args, _, _ in CASES]
    return [p.communicate(timeout=120) + (p.returncode,) for p in procs]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(c[0]) for c in CASES])
def test_bad_flag(results, i):
    args, code, needle = CASES[i]
    out, err, rc = results[i]
    assert rc == code, (args, rc, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and needle in lines[0], err
