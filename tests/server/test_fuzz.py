"""Schemathesis against /openapi.json: no generated request, valid or not, gets a 5xx.

Bounded to about 100 examples in all, on a server whose outputs are capped at a few tokens so
the random requests stay fast.
"""
from __future__ import annotations

import pytest

from tests.server.conftest import start_server

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e .[dev])")
hypothesis = pytest.importorskip("hypothesis")

EXAMPLES_PER_OPERATION = {"POST": 15, "GET": 2}  # ~100 examples over the routes, both modes


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, tmp_path_factory):
    srv = start_server(["--max-model-len", "256", "--max-num-seqs", "8", "--uvicorn-log-level", "warning",
                        "--override-generation-config", '{"max_new_tokens": 4}',
                        "--enable-auto-tool-choice", "--tool-call-parser", "glm47", "--reasoning-parser", "glm45"],
                       tmp_path_factory)
    yield srv
    srv.stop()


def _operations(url: str):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
    return ops


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(fuzz_server, mode):
    from hypothesis import HealthCheck, Phase, given, settings

    seen: list[tuple[str, int]] = []
    for op in _operations(fuzz_server.url):
        if op.method.upper() not in EXAMPLES_PER_OPERATION or op.path in ("/docs", "/redoc"):
            continue
        if mode == "negative" and not op.body:
            continue  # a route without a body or parameters has no invalid input
        strategy = op.as_strategy(schemathesis.GenerationMode(mode))

        @settings(max_examples=EXAMPLES_PER_OPERATION[op.method.upper()] // (1 if mode == "positive" else 2),
                  deadline=None, database=None, phases=[Phase.generate], derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case):
            response = case.call(base_url=fuzz_server.url, timeout=60)
            seen.append((op.path, response.status_code))
            assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:500])
            if response.status_code == 400:
                err = response.json()["error"]
                assert err["code"] == 400 and err["message"]

        check()
    assert len(seen) >= 10
    assert any(path == "/v1/chat/completions" for path, _ in seen)
    assert fuzz_server.proc.poll() is None
