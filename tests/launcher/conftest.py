"""Shared pieces of the launcher tests: the golden inputs and a host whose every answer is faked."""
from __future__ import annotations

from pathlib import Path

import pytest

from glm5_ascend.launcher.preflight import Host

GOLDEN = Path(__file__).parent / "golden"


def fake_host(**kw) -> Host:
    """A host without Ascend tools, NICs or devices unless a test gives them; binds and routes succeed."""
    base = dict(run=lambda argv: None, interfaces=lambda: {}, hostname=lambda: "test-host",
                hostname_addresses=lambda: set(), device_count=lambda kind: 16, bind=lambda host, port: None,
                route=lambda addr, port: None, resolve=lambda name: name)
    base.update(kw)
    return Host(**base)


@pytest.fixture
def golden(monkeypatch):
    """Run from the golden directory, where the descriptions' `model: glm5-model` resolves."""
    monkeypatch.chdir(GOLDEN)
    return GOLDEN
