"""Reasoning parser for GLM-4.5 / 4.7 / 5 ``<think>...</think>`` output.

With thinking on, everything up to the first ``</think>`` is reasoning (an
optional leading ``<think>`` is dropped) and the rest is content; with
thinking off, everything is content. Empty parts are reported as None.
"""

from __future__ import annotations

from typing import Any

THINK_START = "<think>"
THINK_END = "</think>"


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def thinking_enabled(chat_template_kwargs: dict[str, Any] | None) -> bool:
    """False when the request sets ``enable_thinking`` or ``thinking`` to false."""
    kwargs = chat_template_kwargs or {}
    for key in ("enable_thinking", "thinking"):
        if kwargs.get(key) is not None and not kwargs[key]:
            return False
    return True


class Glm45ReasoningParser:
    """Splits reasoning from content; one instance per choice when streaming."""

    def __init__(self, enable_thinking: bool = True) -> None:
        self.enable_thinking = enable_thinking
        # "start": may still see a leading <think>; "reasoning": looking for
        # </think>; "content": everything else passes through.
        self._state = "start" if enable_thinking else "content"
        self._buf = ""

    @classmethod
    def from_chat_template_kwargs(
        cls, chat_template_kwargs: dict[str, Any] | None
    ) -> "Glm45ReasoningParser":
        return cls(thinking_enabled(chat_template_kwargs))

    def extract_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """Parse a whole completion into (reasoning, content)."""
        if not self.enable_thinking:
            return None, text or None
        head = text.lstrip()
        if head.startswith(THINK_START):
            text = head[len(THINK_START) :]
        reasoning, sep, content = text.partition(THINK_END)
        return reasoning or None, (content or None) if sep else None

    def extract_streaming(self, delta_text: str) -> tuple[str | None, str | None]:
        """Feed the next piece of text; returns (reasoning_delta, content_delta)."""
        if self._state == "content":
            return None, delta_text or None
        self._buf += delta_text
        if self._state == "start":
            head = self._buf.lstrip()
            if head.startswith(THINK_START):
                self._buf = head[len(THINK_START) :]
            elif THINK_START.startswith(head):
                return None, None  # only whitespace / part of "<think>" so far
            self._state = "reasoning"
        end = self._buf.find(THINK_END)
        if end >= 0:
            reasoning = self._buf[:end]
            content = self._buf[end + len(THINK_END) :]
            self._buf, self._state = "", "content"
            return reasoning or None, content or None
        # Hold back a possible "</thi" until the next delta decides.
        cut = len(self._buf) - _partial_tag_len(self._buf, THINK_END)
        reasoning, self._buf = self._buf[:cut], self._buf[cut:]
        return reasoning or None, None

    def finish(self) -> tuple[str | None, str | None]:
        """End of stream: held-back text was reasoning after all."""
        reasoning, self._buf = self._buf, ""
        return reasoning or None, None
