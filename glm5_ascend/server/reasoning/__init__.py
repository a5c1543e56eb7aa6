"""Reasoning parsers by their vLLM ``--reasoning-parser`` name."""

from __future__ import annotations

from .glm45 import Glm45ReasoningParser, thinking_enabled

_PARSERS = {"glm45": Glm45ReasoningParser}


def get_reasoning_parser(name: str) -> type[Glm45ReasoningParser]:
    """Return the parser class registered under ``name``."""
    try:
        return _PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(_PARSERS))
        raise ValueError(
            f"unknown reasoning parser {name!r}; known: {known}"
        ) from None


__all__ = ["Glm45ReasoningParser", "get_reasoning_parser", "thinking_enabled"]
