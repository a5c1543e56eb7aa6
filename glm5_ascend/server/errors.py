"""vLLM's error bodies and the exceptions that carry them through the server.

Every error a client can cause is raised as an ``APIError`` and rendered as
``{"error": {"message", "type", "param", "code"}}`` with ``code`` repeating
the HTTP status, exactly as vLLM answers.
"""
from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          501: "NotImplementedError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error with an HTTP status, sent to the client as vLLM's error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, value: Any = None):
        if value is not None:
            # vLLM's VLLMValidationError (the length checks) appends "(parameter=..., value=...)".
            extras = [f"parameter={param}"] if param is not None else []
            message = f"{message} ({', '.join(extras + [f'value={value}'])})"
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


class BadRequest(APIError):
    def __init__(self, message: str, param: str | None = None, value: Any = None):
        super().__init__(message, 400, param, value)


class NotFound(APIError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, 404, param)


class EngineDead(APIError):
    """The step loop has stopped for good; /health answers 503 from now on."""

    def __init__(self, message: str = "The engine has died; restart the server."):
        super().__init__(message, 503)


def error_body(message: str, status: int, param: str | None = None, err_type: str | None = None) -> dict:
    """vLLM's ``ErrorResponse`` as a dict."""
    if err_type is None:
        err_type = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def error_response(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


def api_error_response(err: APIError) -> JSONResponse:
    return error_response(err.message, err.status, err.param)


def sse_error(err: APIError) -> str:
    """A mid-stream error as one SSE event (the caller then sends ``[DONE]``)."""
    return f"data: {json.dumps(error_body(err.message, err.status, err.param))}\n\n"


# Path parts pydantic adds for the member of a union it tried: a model's name, or a validator's wrapper
# ("function-after[_check_prefix(), TokenizeChatRequest]"). Request fields are snake_case.
_UNION_MEMBER = re.compile(r"[A-Z]\w*|function-\w+\[.*\]")


_RANGE_TYPES = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                "finite_number", "too_short", "too_long"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable line from pydantic/FastAPI validation errors, plus the offending field."""
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _UNION_MEMBER.fullmatch(str(x))]
        where = ".".join(loc)
        if param is None and loc:
            param = loc[0]
        msg = str(e.get("msg", "invalid value"))
        if e.get("type") == "json_invalid":
            ctx = (e.get("ctx") or {}).get("error", "")
            parts.append(f"The request body is not valid JSON ({ctx}); send a JSON object.")
            param = None
        elif e.get("type") == "missing":
            parts.append(f"Field required: `{where}`." if where else msg)
        elif e.get("type") in _RANGE_TYPES:  # as vLLM shows pydantic's error, its type included
            text = f"{msg} [type={e['type']}, input_value={e.get('input')!r}]"
            parts.append(f"{where}: {text}" if where else text)
        else:
            parts.append(f"{where}: {msg}" if where else msg)
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more error(s)")
    return "; ".join(parts) or "Invalid request.", param
