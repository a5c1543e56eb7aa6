"""Tool-call parser for GLM-4.5 / 4.7 / 5 markup.

The model writes calls as::

    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>

Both the one-shot and the streaming paths build the arguments JSON from the
same per-argument fragments, so a streamed call concatenates to exactly the
string the one-shot parse returns.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
KEY_START = "<arg_key>"
_PAIR_RE = re.compile(
    r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL
)


@dataclass
class ToolCall:
    """One complete call, as the OpenAI API reports it."""

    id: str
    type: str
    name: str
    arguments: str  # JSON object text


@dataclass
class DeltaToolCall:
    """A streamed piece of a call; the first piece of a call has id/type/name."""

    index: int
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass
class ExtractedToolCalls:
    tools_called: bool
    tool_calls: list[ToolCall]
    content: str | None


@dataclass
class DeltaResult:
    content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _is_string_schema(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return False
    t = schema.get("type")
    # ["string", "null"] is a nullable string: still keep the raw text.
    if isinstance(t, list):
        return "string" in t and all(x in ("string", "null") for x in t)
    return t == "string"


def _string_keys(tools: list | None) -> dict[str, set[str]]:
    """Map tool name -> argument names whose schema type is string."""
    out: dict[str, set[str]] = {}
    for tool in tools or []:
        if hasattr(tool, "model_dump"):  # accept pydantic request objects too
            tool = tool.model_dump()
        fn = (tool or {}).get("function") or {}
        props = (fn.get("parameters") or {}).get("properties") or {}
        if isinstance(props, dict) and fn.get("name"):
            out[fn["name"]] = {k for k, s in props.items() if _is_string_schema(s)}
    return out


def convert_value(raw: str, is_string: bool) -> Any:
    """Decode one <arg_value>: JSON, then a Python literal, else the raw text."""
    if is_string:
        return raw
    text = raw.strip()
    for load in (json.loads, ast.literal_eval):
        try:
            value = load(text)
            # Sets, bytes, NaN/inf etc. have no JSON form: treat as text.
            json.dumps(value, allow_nan=False)
            return value
        except Exception:  # noqa: BLE001 - any decode failure means "try next"
            continue
    return raw


def _fragment(first: bool, key: str, value: Any) -> str:
    # Matches json.dumps(dict, ensure_ascii=False) piece by piece.
    return (
        ("{" if first else ", ")
        + json.dumps(key, ensure_ascii=False)
        + ": "
        + json.dumps(value, ensure_ascii=False)
    )


def _closing(n_args: int) -> str:
    return "}" if n_args else "{}"


class _Out:
    """Collects one streaming step's output into a DeltaResult."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: list[DeltaToolCall] = []

    def header(self, index: int, call_id: str, name: str) -> None:
        self.calls.append(DeltaToolCall(index, call_id, "function", name))

    def args(self, index: int, text: str) -> None:
        last = self.calls[-1] if self.calls else None
        if last is not None and last.index == index:
            last.arguments = (last.arguments or "") + text
        else:
            self.calls.append(DeltaToolCall(index, arguments=text))

    def result(self) -> DeltaResult:
        return DeltaResult("".join(self.content) or None, self.calls)


class Glm47ToolParser:
    """Parses GLM tool-call markup; one instance per choice when streaming."""

    def __init__(self, tools: list[dict] | None = None) -> None:
        self._string_keys = _string_keys(tools)
        # Streaming state. _buf is unprocessed text outside a call, or the
        # body of the current call (after <tool_call>) while _in_call.
        self._buf = ""
        self._in_call = False
        self._header_sent = False
        self._name = ""
        self._id = ""
        self._scan_pos = 0
        self._n_args = 0
        self._args_text = ""
        # Whitespace-only text of the current content segment is held back:
        # the one-shot parse drops such segments once a call completes.
        self._seg_ws = ""
        self._seg_has_text = False
        self.streamed_tool_calls: list[ToolCall] = []

    # -- shared ---------------------------------------------------------
    def _arg(self, name: str, index: int, key: str, raw: str) -> str:
        key = key.strip()
        is_str = key in self._string_keys.get(name, ())
        return _fragment(index == 0, key, convert_value(raw, is_str))

    def _parse_call(self, body: str) -> ToolCall:
        k = body.find(KEY_START)
        name = (body if k < 0 else body[:k]).strip()
        frags = []
        if k >= 0:
            for m in _PAIR_RE.finditer(body, k):
                frags.append(self._arg(name, len(frags), m.group(1), m.group(2)))
        args = "".join(frags) + _closing(len(frags))
        return ToolCall(new_tool_call_id(), "function", name, args)

    # -- one-shot -------------------------------------------------------
    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """Parse a whole completion."""
        calls: list[ToolCall] = []
        segments: list[str] = []
        pos = 0
        while True:
            start = text.find(CALL_START, pos)
            end = text.find(CALL_END, start + len(CALL_START)) if start >= 0 else -1
            if end < 0:  # no more calls; an unterminated one stays text
                segments.append(text[pos:])
                break
            segments.append(text[pos:start])
            calls.append(self._parse_call(text[start + len(CALL_START) : end]))
            pos = end + len(CALL_END)
        if not calls:
            return ExtractedToolCalls(False, [], text or None)
        content = "".join(s for s in segments if s.strip())
        return ExtractedToolCalls(True, calls, content or None)

    # -- streaming ------------------------------------------------------
    def extract_streaming(self, delta_text: str) -> DeltaResult:
        """Feed the next piece of text; returns what can be emitted now."""
        out = _Out()
        self._buf += delta_text
        while self._step_call(out) if self._in_call else self._step_text(out):
            pass
        return out.result()

    def finish(self) -> DeltaResult:
        """End of stream: flush held-back text (an unterminated call is content)."""
        out = _Out()
        raw = (CALL_START + self._buf) if self._in_call else self._buf
        self._buf, self._in_call = "", False
        self._content(raw, out)
        if self._seg_ws and not self.streamed_tool_calls:
            out.content.append(self._seg_ws)
        self._seg_ws = ""
        return out.result()

    def _content(self, text: str, out: _Out) -> None:
        if not text:
            return
        if self._seg_has_text:
            out.content.append(text)
            return
        self._seg_ws += text
        if self._seg_ws.strip():
            out.content.append(self._seg_ws)
            self._seg_ws, self._seg_has_text = "", True

    def _step_text(self, out: _Out) -> bool:
        buf = self._buf
        start = buf.find(CALL_START)
        if start < 0:
            # Hold back a possible "<tool_c" until the next delta decides.
            cut = len(buf) - partial_tag_len(buf, CALL_START)
            self._content(buf[:cut], out)
            self._buf = buf[cut:]
            return False
        self._content(buf[:start], out)
        self._buf = buf[start + len(CALL_START) :]
        self._in_call, self._header_sent = True, False
        self._n_args, self._args_text = 0, ""
        return True

    def _step_call(self, out: _Out) -> bool:
        body = self._buf
        end = body.find(CALL_END)
        region = body if end < 0 else body[:end]
        index = len(self.streamed_tool_calls)
        if not self._header_sent:
            k = region.find(KEY_START)
            if k < 0 and end < 0:
                return False  # name not complete yet
            self._name = (region if k < 0 else region[:k]).strip()
            self._id = new_tool_call_id()
            self._scan_pos = k if k >= 0 else len(region)
            self._header_sent = True
            out.header(index, self._id, self._name)
        # A pair wholly inside the text seen so far is final: later text
        # cannot change an earlier non-greedy match.
        for m in _PAIR_RE.finditer(region, self._scan_pos):
            frag = self._arg(self._name, self._n_args, m.group(1), m.group(2))
            self._n_args += 1
            self._args_text += frag
            self._scan_pos = m.end()
            out.args(index, frag)
        if end < 0:
            return False
        closing = _closing(self._n_args)
        out.args(index, closing)
        self.streamed_tool_calls.append(
            ToolCall(self._id, "function", self._name, self._args_text + closing)
        )
        self._buf = body[end + len(CALL_END) :]
        self._in_call = False
        # The call completed, so whitespace held before it is dropped.
        self._seg_ws, self._seg_has_text = "", False
        return True
