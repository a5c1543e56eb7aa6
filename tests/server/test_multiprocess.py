"""`serve` across processes and (local) nodes, started the way operators start it: parity, the seed's
line with a tool call, two nodes, torchrun, `glm5-ascend launch`, and faults (a killed or hung rank,
SIGTERM, a missing node at startup). Every process is a real one on 127.0.0.1 with gloo."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from glm5_ascend import LLM, SamplingParams
from tests.server.conftest import ServerProcess, free_port
from tests.server.scripted_model import make_scripted

MODEL = "glm-5"
SEED_LINE = ["--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.85", "--tool-call-parser", "glm47",
             "--reasoning-parser", "glm45", "--enable-auto-tool-choice", "--served-model-name", MODEL]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "look x up",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                                                          "required": ["x"]}}}]
PROMPTS = [[7, 8, 9], list(range(20, 61)), [99] * 17, list(range(100, 103)), list(range(3, 90, 2)), [5, 6]]
ENV = {"OMP_NUM_THREADS": "1"}


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE  # dead, waiting for a reaper (none in some containers)
    except psutil.NoSuchProcess:
        return False


def _assert_all_gone(procs: list[psutil.Process], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(map(_running, procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in procs if _running(p)]
    assert not alive, [(p.pid, p.name()) for p in alive]


def _complete(url: str, prompts=PROMPTS, max_tokens: int = 12) -> list[list[int]]:
    """Greedy completions of every prompt at once (so every DP group gets work)."""
    def one(p):
        body = {"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    llm = LLM(tiny_model_dir)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=12,
                                                                                  ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


class Headless:
    """A `serve --headless` node (no HTTP), output in a log file."""

    def __init__(self, args: list[str], log_dir: Path, env: dict | None = None, cmd: list[str] | None = None):
        self.log_path = log_dir / f"node-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        base = cmd or [sys.executable, "-m", "glm5_ascend.server"]
        self.proc = subprocess.Popen(base + args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **ENV, **(env or {})})

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def test_dp2_tp2_ep_server_equals_one_process(tiny_model_dir, expected, tmp_path):
    srv = ServerProcess(["-tp", "2", "-dp", "2", "--enable-expert-parallel"], tmp_path, ENV).wait_ready(180)
    try:
        kids = _descendants(srv.proc.pid)
        assert _complete(srv.url) == expected
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'vllm:request_success_total{finished_reason="length",model_name="tiny-glm5-v2"} 6.0' in metrics
    finally:
        srv.stop()
    assert srv.proc.returncode == -signal.SIGTERM, srv.log_tail()  # uvicorn re-raises the signal it handled
    _assert_all_gone(kids, timeout=5)  # SIGTERM (ServerProcess.stop) left no rank behind


def test_seed_line_serves_a_tool_call(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.convert_tokens_to_ids
    chain = [ids("<think>"), ids("</think>"), ids("<tool_call>"), *tok.encode("f", add_special_tokens=False),
             ids("<arg_key>"), *tok.encode("x", add_special_tokens=False), ids("</arg_key>"), ids("<arg_value>"),
             *tok.encode("7", add_special_tokens=False), ids("</arg_value>"), ids("</tool_call>"), ids("<|observation|>")]
    model = make_scripted(tiny_model_dir, tmp_path / "scripted", chain)
    srv = ServerProcess([str(model), *SEED_LINE], tmp_path, ENV).wait_ready(180)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "What is x?"}]
        for kwargs in ({"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}, {}):
            r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=40, **kwargs)
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            (call,) = choice.message.tool_calls
            assert call.function.name == "f" and json.loads(call.function.arguments) == {"x": 7}
        stream = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=40,
                                                stream=True)
        deltas = [c.choices[0] for c in stream if c.choices]
        names = [tc.function.name for d in deltas for tc in d.delta.tool_calls or [] if tc.function.name]
        assert names == ["f"] and deltas[-1].finish_reason == "tool_calls"
    finally:
        srv.stop()


def test_two_nodes_on_one_host(tiny_model_dir, expected, tmp_path):
    port = free_port()
    common = ["-tp", "2", "-dp", "2", "--enable-expert-parallel", "--nnodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(port)]
    node1 = Headless([*common, "--node-rank", "1"], tmp_path)  # DP group 1 (leader + follower) lives here
    srv = ServerProcess([*common, "--node-rank", "0"], tmp_path, ENV)
    try:
        srv.wait_ready(180)
        assert _complete(srv.url) == expected
        node1_kids = _descendants(node1.proc.pid)
        srv.stop()
        node1.proc.wait(30)  # rank 0's shutdown reaches the other node
        assert node1.proc.returncode == 0, node1.log()
        _assert_all_gone(node1_kids)
    finally:
        srv.stop()
        node1.stop()


def test_torchrun(tiny_model_dir, expected, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "glm5_ascend.server"]
    run = Headless(["--host", "127.0.0.1", "--port", str(port), "-tp", "2"], tmp_path, cmd=cmd)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and run.proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert run.proc.poll() is None, run.log()
        assert _complete(url, PROMPTS[:2]) == expected[:2]
    finally:
        kids = _descendants(run.proc.pid)
        run.stop()
        _assert_all_gone(kids)


def test_launch_two_node_description(tiny_model_dir, expected, tmp_path):
    port = free_port()
    desc = {"device": "cpu", "model": tiny_model_dir, "devices_per_node": 1, "master_port": free_port(),
            "layout": {"tensor_parallel_size": 2}, "http": {"host": "127.0.0.1", "port": port},
            "nodes": [{"host": "node0", "address": "127.0.0.1"}, {"host": "node1", "address": "127.0.0.2"}]}
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(desc))
    launch = [sys.executable, "-m", "glm5_ascend.cli", "launch", str(path), "--output-dir", str(tmp_path / "out")]
    nodes = [Headless(["--node-rank", str(n)], tmp_path, cmd=launch) for n in (1, 0)]
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert all(n.proc.poll() is None for n in nodes), [n.log() for n in nodes]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=tiny_model_dir, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
        assert (tmp_path / "out" / "node1.cmd").read_text().split()[-1] == "--headless"
    finally:
        for n in reversed(nodes):
            n.stop()


def _wait_health(url: str, status: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == status:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/health did not answer {status} within {timeout} s")


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_rank_turns_health_503_and_stops_the_server(tiny_model_dir, tmp_path, how):
    srv = ServerProcess(["-tp", "2", "-dp", "2"], tmp_path, ENV).wait_ready(180)
    try:
        kids = _descendants(srv.proc.pid)
        victim = next(p for p in kids if "spawn_main" in " ".join(p.cmdline()))
        os.kill(victim.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        took = _wait_health(srv.url, 503, 60)
        assert took < 60
        srv.proc.wait(60)
        assert srv.proc.returncode == 1
        errors = [line for line in srv.log_tail(20000).splitlines() if line.startswith("glm5-ascend: error:")]
        assert len(errors) == 1 and f"pid {victim.pid}" in errors[0] and "rank " in errors[0], srv.log_tail()
        assert ("SIGKILL" if how == "killed" else "no heartbeat") in errors[0], errors
        _assert_all_gone(kids)  # the stopped one too: it dies with its parent
    finally:
        srv.stop()


def test_missing_node_at_startup_is_a_clear_error(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, **ENV, "GLM5_STARTUP_TIMEOUT": "4"}
    common = [sys.executable, "-m", "glm5_ascend.server", "-tp", "2", "--nnodes", "2", "--master-port", str(port)]
    lone0 = subprocess.run([*common, "--node-rank", "0", "--port", str(free_port())], capture_output=True, text=True,
                           env=env, timeout=120)
    lone1 = subprocess.run([*common, "--node-rank", "1"], capture_output=True, text=True, env=env, timeout=120)
    for out, needle in ((lone0, "rank(s) 1 of 2 did not join within 4 s"),
                        (lone1, f"rank 1 cannot reach node 0's rendezvous at 127.0.0.1:{port} within 4 s")):
        assert out.returncode == 1, out.stderr
        lines = [line for line in out.stderr.splitlines() if "error" in line.lower()]
        assert len(lines) == 1 and needle in lines[0], out.stderr
        assert "Traceback" not in out.stderr
