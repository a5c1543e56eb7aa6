"""Request bodies parsed and validated in the worker pool, not on the event loop.

FastAPI validates a declared body model on the event loop: a chat of 50,000 messages held it for about
half a second, and /health with it. The generation routes and /tokenize therefore read the raw body and
hand JSON decoding and pydantic validation to the pool; the errors are the ones FastAPI gave (400 with
the field named). Both hold the GIL while they run, so a body that is refused anyway (a chat too long
for the context) is refused from the decoded JSON, before validation (`precheck`). /openapi.json still
documents each body: `Body.openapi` declares the schema, `document_bodies` adds the models to the
components.
"""
from __future__ import annotations

import json

from fastapi import FastAPI, Request
from pydantic import TypeAdapter, ValidationError

from glm5_ascend.server.errors import BadRequest, validation_message

_UNPARSABLE = "The request body could not be parsed (invalid UTF-8 or JSON); send UTF-8 JSON."


class Body:
    """One route's body type: a pydantic model (or annotated union) under a schema name."""

    def __init__(self, name: str, tp, precheck=None):
        self.name, self.adapter, self.precheck = name, TypeAdapter(tp), precheck

    def parse(self, raw: bytes):
        """JSON bytes -> the validated model (in a pool thread); BadRequest as FastAPI's errors read."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise BadRequest(_UNPARSABLE) from None
        if self.precheck is not None and isinstance(data, dict):
            self.precheck(data)  # refusals that need no validation: pydantic holds the GIL while it validates
        try:
            return self.adapter.validate_python(data)
        except ValidationError as e:
            message, param = validation_message(list(e.errors(include_url=False)))
            raise BadRequest(message, param) from None

    def openapi(self) -> dict:
        """openapi_extra for the route."""
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{self.name}"}}}}}


async def read_body(request: Request, body: Body, off_loop):
    """The request's validated body; decoding and validation run through `off_loop` (the pool)."""
    return await off_loop(body.parse, await request.body())


def document_bodies(app: FastAPI, bodies: list[Body]) -> None:
    """Add the bodies' JSON schemas (and the models they use) to /openapi.json's components."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()  # FastAPI caches this dict; completing it in place completes the cache
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for body in bodies:
            js = body.adapter.json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in js.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components[body.name] = js
        return schema
    app.openapi = openapi
