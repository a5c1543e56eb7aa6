"""Shutdown with streams open: new work refused at once, a bounded grace period, then every open stream gets a
final error event and [DONE]; the process exits with no traceback (a real server, real streaming clients)."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import ServerProcess

LONG = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 6000, "ignore_eos": True,
        "stream": True, "temperature": 0}


class _Stream(threading.Thread):
    """One streaming chat request; records its SSE data lines and when each arrived."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.events, self.first = url, [], threading.Event()
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self):
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=LONG, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        if len(self.events) >= 3:
                            self.first.set()
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.error = e
        finally:
            self.ended_at = time.monotonic()
            self.first.set()


def _start(tmp_path, grace: float) -> tuple[ServerProcess, list[_Stream]]:
    srv = ServerProcess(["--shutdown-timeout", str(grace), "--max-num-seqs", "8"], tmp_path).wait_ready()
    streams = [_Stream(srv.url) for _ in range(3)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first.wait(120) and s.error is None, s.error
    return srv, streams


def _check_ended_with_an_error(streams: list[_Stream]) -> None:
    for s in streams:
        s.join(30)
        assert not s.is_alive() and s.error is None, s.error
        assert s.events[-1] == "[DONE]", s.events[-3:]
        err = json.loads(s.events[-2])["error"]
        assert err["code"] == 503 and "shutting down" in err["message"]
        assert all("error" not in json.loads(e) for e in s.events[:-2])  # tokens streamed until then


def _check_clean_exit(srv: ServerProcess, deadline: float) -> str:
    srv.proc.wait(deadline)
    log = srv.log_tail(100_000)
    srv.stop()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    return log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_refuses_new_work_then_ends_streams_after_the_grace_period(tmp_path, sig):
    grace = 3.0
    srv, streams = _start(tmp_path, grace)
    t0 = time.monotonic()
    srv.proc.send_signal(sig)
    time.sleep(0.5)
    try:  # the listener is closed at once (a refused connection), or a late request gets 503
        late = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert late.status_code == 503
    except httpx.ConnectError:
        pass
    assert all(s.is_alive() for s in streams)  # running requests keep streaming during the grace period
    _check_ended_with_an_error(streams)
    ended = max(s.ended_at for s in streams) - t0
    assert grace - 0.5 <= ended <= grace + 5, ended
    _check_clean_exit(srv, 20)
    assert srv.proc.returncode in (130, -signal.SIGTERM, 0), srv.proc.returncode


def test_second_signal_aborts_at_once(tmp_path):
    srv, streams = _start(tmp_path, grace=300)  # a grace period the test could never wait out
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert all(s.is_alive() for s in streams)
    srv.proc.send_signal(signal.SIGINT)
    _check_ended_with_an_error(streams)
    assert max(s.ended_at for s in streams) - t0 < 10
    _check_clean_exit(srv, 20)
    assert srv.proc.returncode == 130
