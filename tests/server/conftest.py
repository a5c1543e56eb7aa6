"""Real server processes for the HTTP tests: `python -m glm5_ascend.server` on 127.0.0.1.

One server with the GLM-5 flags (parsers, MTP speculative config, served-name aliases) is
shared by every module that needs the default setup; modules that need other flags start
their own. The tiny model is written once into the session's GLM5_CACHE_DIR first.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

MODEL = "glm-5"
# A `vllm serve` line for GLM-5, as operators write it (only the program name differs).
GLM5_FLAGS = [
    "--served-model-name", MODEL, "glm5-alias", "--max-model-len", "1024", "--max-num-seqs", "64",
    "--enable-auto-tool-choice", "--tool-call-parser", "glm47", "--reasoning-parser", "glm45",
    "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 1}', "--trust-remote-code",
    "--gpu-memory-utilization", "0.9", "--uvicorn-log-level", "warning",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `python -m glm5_ascend.server` child; its output goes to a log file (a pipe could fill)."""

    def __init__(self, args: list[str], log_dir: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        # One intra-op thread: the tiny model is ~4x slower on CPU with two, and tests run on 2 cores.
        inherited = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "GLM5_API_KEY")}
        full_env = {**inherited, "OMP_NUM_THREADS": "1", **(env or {})}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "glm5_ascend.server", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def start_server(args: list[str], tmp_path_factory, env: dict | None = None) -> ServerProcess:
    return ServerProcess(args, tmp_path_factory.mktemp("server-logs"), env).wait_ready()


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """The shared GLM-5-flavoured server."""
    srv = start_server(GLM5_FLAGS, tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments dropped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(values: dict[str, float], name: str, **labels) -> float:
    """Sum of the series called name whose labels include the given ones."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def sse_events(lines) -> list:
    """The JSON payloads of an SSE body (``[DONE]`` kept as the string)."""
    import json
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(resp: httpx.Response, status: int, param: str | None = "__any__") -> dict:
    """The response is vLLM's error body with this status; returns the inner error."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    if param != "__any__":
        assert err["param"] == param, err
    return err
