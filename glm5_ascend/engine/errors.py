"""Engine failures the server maps to HTTP statuses (500 for one request, 503 once the engine is dead)."""
from __future__ import annotations


class EngineError(RuntimeError):
    """A step failed while this request was in flight (the server answers 500)."""


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more (a rank died, or the step loop stopped); restart it."""
