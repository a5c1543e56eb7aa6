"""Request size limits: what one client may send, checked before the work it would cost.

- A text longer than the longest token (in characters) times ``--max-model-len`` must have more tokens
  than the model takes, so it is refused (400) before it is tokenized or rendered.
- A body larger than ``--max-request-body-bytes`` gets 413 before it is read (by Content-Length) or
  as soon as a chunked body passes the limit. The default fits the largest prompt the context allows.
- More than ``--h11-max-header-count`` headers get 431 (uvicorn's h11 parser already bounds their size
  with ``--h11-max-incomplete-event-size``; these two are vLLM's flags and defaults).
- After a large body the allocator is asked to hand freed memory back (glibc's malloc_trim), so one
  hostile request does not leave the server's resident memory gigabytes higher.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

from starlette.exceptions import HTTPException

from glm5_ascend.server.errors import error_response

logger = logging.getLogger(__name__)

_UTF8_JSON_BYTES_PER_CHAR = 6  # a non-ASCII character JSON-escaped as \uXXXX
_BODY_ALLOWANCE = 1 << 20  # the rest of a request: sampling fields, tools, logit_bias...
_TRIM_ABOVE = 1 << 20  # bodies larger than this trigger malloc_trim once answered
# A refused body up to this size is read and dropped before the 413: a client still sending (most do not
# read before they have sent everything) would otherwise meet a reset connection instead of the answer.
_DRAIN_AT_MOST = 64 << 20


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of the vocabulary stands for (special tokens included)."""
    vocab = tokenizer.get_vocab()
    convert = tokenizer.convert_tokens_to_string
    return max((len(convert([tok])) for tok in vocab), default=1) or 1


def prompt_char_bound(tokenizer, max_model_len: int) -> int:
    """Characters beyond which a text surely exceeds max_model_len tokens. A normalizer may shrink text
    (NFC folds a letter and its accents into one character), so with one the bound is 4x looser."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    slack = 4 if getattr(backend, "normalizer", None) is not None else 1
    return longest_token_chars(tokenizer) * max_model_len * slack


def default_body_limit(char_bound: int, max_model_len: int) -> int:
    """Bytes of the largest request a valid prompt needs: the text bound JSON-escaped, or max_model_len
    token ids, plus an allowance for everything else."""
    ids_bytes = max_model_len * 8  # "154820, "
    return max(char_bound * _UTF8_JSON_BYTES_PER_CHAR, ids_bytes) + _BODY_ALLOWANCE


def text_chars(content) -> int:
    """Characters of a chat message's content (a string or OpenAI content parts)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") if isinstance(p, dict) else len(getattr(p, "text", "") or "")
                   for p in content)
    return 0


class RequestLimitMiddleware:
    """ASGI middleware: 431 past max_headers headers, 413 past max_body bytes; malloc_trim after large bodies."""

    def __init__(self, app, max_body: int, max_headers: int, trim=None):
        self.app, self.max_body, self.max_headers = app, max_body, max_headers
        self.trim = trim or malloc_trim

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            await error_response(f"The request has {len(headers)} headers; at most {self.max_headers} are "
                                 "accepted (--h11-max-header-count).", 431)(scope, receive, send)
            return
        length = next((v for k, v in headers if k == b"content-length"), None)
        declared = int(length) if length is not None and length.isdigit() else None
        if declared is not None and declared > self.max_body:
            if declared <= _DRAIN_AT_MOST:
                await _drain(receive, declared)
            await error_response(self._too_large(declared), 413)(scope, receive, send)
            self._trim_later(declared)
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # a chunked body: no further than here
                    if message.get("more_body"):
                        await _drain(receive, _DRAIN_AT_MOST)
                    raise HTTPException(413, self._too_large(seen, at_least=True))
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            self._trim_later(max(seen, declared or 0))

    def _trim_later(self, size: int) -> None:
        if size > _TRIM_ABOVE:
            asyncio.get_running_loop().run_in_executor(None, self.trim)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return (f"The request body is {'over ' if at_least else ''}{size} bytes; at most {self.max_body} are "
                "accepted (--max-request-body-bytes), enough for the longest prompt --max-model-len allows.")


async def _drain(receive, budget: int) -> None:
    """Read and drop up to `budget` bytes of the rest of a request body (chunk by chunk: nothing is kept)."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


def malloc_trim() -> None:
    """Give freed heap memory back to the system (glibc); a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
