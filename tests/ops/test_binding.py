"""Each op resolves its backend once per (op, device type), not on every call (the decode hot path
calls ~40 ops a layer); rebind() makes the next call resolve again."""
import pytest
import torch

from glm5_ascend import ops


def test_backend_resolved_once_per_op_and_device(monkeypatch):
    calls = []
    real = ops.resolve
    monkeypatch.setattr(ops, "resolve", lambda op, dev: calls.append((op, dev)) or real(op, dev))
    x = torch.randn(3, 2, 8)
    cos, sin = torch.ones(3, 4), torch.zeros(3, 4)
    for _ in range(5):
        ops.interleaved_rope(x, cos, sin)
    assert calls == [("interleaved_rope", "cpu")]
    # a changed override is read only after rebind()
    monkeypatch.setenv("GLM5_OPS_BACKEND_INTERLEAVED_ROPE", "nonesuch")
    ops.interleaved_rope(x, cos, sin)
    assert len(calls) == 1
    ops.rebind()
    with pytest.raises(ValueError, match="GLM5_OPS_BACKEND_INTERLEAVED_ROPE='nonesuch' is not a backend"):
        ops.interleaved_rope(x, cos, sin)
    assert calls[-1] == ("interleaved_rope", "cpu")
