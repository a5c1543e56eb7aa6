"""Tool-call parsers by their vLLM ``--tool-call-parser`` name."""

from __future__ import annotations

from .glm47 import (
    DeltaResult,
    DeltaToolCall,
    ExtractedToolCalls,
    Glm47ToolParser,
    ToolCall,
)

# glm45 and glm47 share the <tool_call>/<arg_key>/<arg_value> markup.
_PARSERS = {"glm47": Glm47ToolParser, "glm45": Glm47ToolParser}


def get_tool_parser(name: str) -> type[Glm47ToolParser]:
    """Return the parser class registered under ``name``."""
    try:
        return _PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(_PARSERS))
        raise ValueError(f"unknown tool parser {name!r}; known: {known}") from None


__all__ = [
    "DeltaResult",
    "DeltaToolCall",
    "ExtractedToolCalls",
    "Glm47ToolParser",
    "ToolCall",
    "get_tool_parser",
]
