"""The FastAPI app: vLLM's routes, error bodies, API-key check, and the engine's lifespan (assembly.py builds
it from `serve`'s flags)."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm5_ascend import __version__
from glm5_ascend.engine.async_engine import EngineDeadError, EngineError
from glm5_ascend.server import protocol as P
from glm5_ascend.server.bodies import Body, document_bodies, read_body
from glm5_ascend.server.errors import APIError, BadRequest, api_error_response, error_response, sse_error
from glm5_ascend.server.errors import validation_message
from glm5_ascend.server.metrics import CONTENT_TYPE, Metrics
from glm5_ascend.server.serving_chat import ChatServing
from glm5_ascend.server.serving_completion import CompletionServing
from glm5_ascend.server.serving_tokens import ServingContext, detokenize, tokenize

logger = logging.getLogger(__name__)
_ERRORS = {400: {"model": P.ErrorResponse}, 404: {"model": P.ErrorResponse}}


class _ApiKeyMiddleware:
    """401 {"error": "Unauthorized"} on /v1/* without a valid ``Authorization: Bearer`` key (vLLM's rule)."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.tokens = [f"Bearer {k}".encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not any(hmac.compare_digest(given, t) for t in self.tokens):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _LoadMiddleware:
    """Counts generation requests in flight for /load, from arrival until the response is fully sent."""

    PATHS = ("/v1/completions", "/v1/chat/completions", "/invocations")

    def __init__(self, app, state: "_App"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        self.state.load += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.load -= 1


class _RequestIdMiddleware:
    """--enable-request-id-headers: every response carries X-Request-Id, the client's own or a new one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = dict(scope["headers"]).get(b"x-request-id") or uuid.uuid4().hex.encode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", rid)]}
            await send(message)
        await self.app(scope, receive, send_with_id)


def _as_api_error(e: BaseException) -> APIError:
    """Map whatever a request raised to the status vLLM would answer."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(str(e), 503)
    if isinstance(e, EngineError):
        return APIError(str(e), 500)
    if isinstance(e, ValueError):
        return BadRequest(str(e))
    if isinstance(e, NotImplementedError):
        return APIError(str(e) or "Not implemented.", 501)
    logger.error("request failed", exc_info=e)
    return APIError(f"Internal server error: {type(e).__name__}", 500)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(request: Request, coro):
    """The JSON answer of a non-streaming handler; a client that hangs up cancels it (and aborts its request)."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (work, watch):
            if not t.done():
                t.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    return JSONResponse(work.result())


class _App:
    """Route bodies, with the state they share."""

    def __init__(self, ctx: ServingContext, metrics: Metrics):
        self.ctx, self.metrics = ctx, metrics
        self.completions, self.chat = CompletionServing(ctx), ChatServing(ctx)
        self.load = 0  # generation requests in flight (/load)
        self.draining = False  # shutting down: new requests get 503

    def begin_shutdown(self, grace: float) -> None:
        """On the event loop, at the first SIGTERM / Ctrl-C: refuse new requests now (/health turns 503 so
        balancers stop sending); requests in flight get `grace` seconds, then abort_all ends them."""
        if self.draining:
            return
        self.draining = True
        n = self.ctx.engine.num_in_flight
        if n:
            logger.info("Shutting down: %d request(s) in flight get %g s to finish (a second signal aborts them "
                        "now)", n, grace)
        asyncio.get_running_loop().call_later(grace, self.abort_all)

    def abort_all(self) -> None:
        """End every request in flight: a stream gets one error event and [DONE], a JSON request a 503."""
        n = self.ctx.engine.abort_all(APIError(
            "The server is shutting down; this request was aborted. Retry it (on another replica).", 503))
        if n:
            logger.info("Shutting down: aborted %d request(s) still in flight", n)

    async def generate(self, request: Request, req, serving, prefix: str):
        """Shared body of /v1/completions and /v1/chat/completions."""
        try:
            if self.ctx.engine.errored:
                raise EngineDeadError("The engine has died; restart the server.")
            if self.draining:
                raise APIError("The server is shutting down and takes no new requests; send it elsewhere.", 503)
            model = self.ctx.model_name(req.model)
            rid = ServingContext.request_id(prefix, request.headers.get("x-request-id"), req.request_id)
            if self.ctx.log_requests:
                logger.info("Received request %s: %s", rid, req.model_dump_json(exclude_unset=True)[:2000])
            if req.stream:
                events = await serving.stream(req, rid, model)
                return StreamingResponse(self._sse(events), media_type="text/event-stream")
            return await _cancel_on_disconnect(request, serving.full(req, rid, model))
        except Exception as e:  # noqa: BLE001 - every failure becomes vLLM's error body
            return api_error_response(_as_api_error(e))

    @staticmethod
    async def _sse(events):
        try:
            async for event in events:
                yield event
        except Exception as e:  # noqa: BLE001 - after the 200 an error is one data: event
            yield sse_error(_as_api_error(e))
        yield "data: [DONE]\n\n"


def build_app(ctx: ServingContext, metrics: Metrics, api_keys: list[str] | None = None, docs: bool = True,
              root_path: str = "", request_id_headers: bool = False, tokenizer_info: bool = False) -> FastAPI:
    """The app; its lifespan starts and stops the AsyncEngine's step thread. root_path, request_id_headers and
    tokenizer_info are vLLM's --root-path, --enable-request-id-headers and --enable-tokenizer-info-endpoint."""
    state = _App(ctx, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        ctx.engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            ctx.engine.shutdown()
            if ctx.pool is not None:
                ctx.pool.shutdown(wait=False, cancel_futures=True)

    hidden = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="glm5-ascend", version=__version__, lifespan=lifespan, root_path=root_path,
                  description="vLLM-compatible OpenAI API serving GLM-5.", **hidden)
    app.state.app = state
    _install_error_handlers(app)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    app.add_middleware(_LoadMiddleware, state=state)
    if api_keys:
        app.add_middleware(_ApiKeyMiddleware, keys=api_keys)
    if request_id_headers:
        app.add_middleware(_RequestIdMiddleware)
    _add_routes(app, state)
    if tokenizer_info:
        _add_tokenizer_info(app, ctx)
    return app


def _invocation_kind(raw: bytes) -> str:
    """Which generation route an /invocations body is for (in the pool: it decodes the JSON)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("The request body could not be parsed (invalid UTF-8 or JSON); send UTF-8 JSON.") from None
    if isinstance(data, dict) and "messages" in data:
        return "chat"
    if isinstance(data, dict) and "prompt" in data:
        return "completion"
    raise BadRequest("/invocations takes a chat completion body (with `messages`) or a completion body (with "
                     "`prompt`); this one has neither.")


def _add_tokenizer_info(app: FastAPI, ctx: ServingContext) -> None:
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """The tokenizer's class and its JSON-serializable init settings, plus the chat template in use."""
        tok = ctx.tokenizer
        info = {"tokenizer_class": type(tok).__name__}
        for key, value in (getattr(tok, "init_kwargs", None) or {}).items():
            if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
                info[key] = value
            elif hasattr(value, "content"):  # AddedToken
                info[key] = str(value.content)
        info["chat_template"] = ctx.chat_template
        return JSONResponse(json.loads(json.dumps(info, default=str)))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "The request body could not be parsed (invalid UTF-8 or JSON); send UTF-8 JSON."
        return error_response(detail, exc.status_code)

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return api_error_response(exc)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        return api_error_response(_as_api_error(exc))


def _add_routes(app: FastAPI, s: _App) -> None:
    ctx = s.ctx

    @app.get("/health", response_class=Response)
    async def health():
        return Response(status_code=503 if ctx.engine.errored or s.draining else 200)

    # Two routes, not one api_route with two methods: those share an operation id in /openapi.json.
    @app.get("/ping", response_class=Response)
    async def ping_get():
        return await health()

    @app.post("/ping", response_class=Response)
    async def ping_post():
        return await health()

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/load")
    async def load():
        return {"server_load": s.load}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        return Response(s.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=P.ModelList)
    async def models():
        perm = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": ctx.created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False}
        cards = [{"id": name, "object": "model", "created": ctx.created, "owned_by": "vllm", "root": ctx.model_path,
                  "parent": None, "max_model_len": ctx.max_model_len, "permission": [perm]}
                 for name in ctx.served_names]
        return JSONResponse({"object": "list", "data": cards})

    # These bodies are decoded and validated in the worker pool (bodies.py), not by FastAPI on the loop.
    cmpl_body = Body("CompletionRequest", P.CompletionRequest)
    chat_body = Body("ChatCompletionRequest", P.ChatCompletionRequest, precheck=ctx.precheck_chat)
    tok_body = Body("TokenizeRequest", P.TokenizeRequest, precheck=ctx.precheck_chat)
    document_bodies(app, [cmpl_body, chat_body, tok_body])

    @app.post("/v1/completions", responses={200: {"model": P.CompletionResponse}, **_ERRORS},
              openapi_extra=cmpl_body.openapi())
    async def completions(request: Request):
        try:
            req = await read_body(request, cmpl_body, ctx.off_loop)
        except APIError as e:
            return api_error_response(e)
        return await s.generate(request, req, s.completions, "cmpl")

    @app.post("/v1/chat/completions", responses={200: {"model": P.ChatCompletionResponse}, **_ERRORS},
              openapi_extra=chat_body.openapi())
    async def chat_completions(request: Request):
        try:
            req = await read_body(request, chat_body, ctx.off_loop)
        except APIError as e:
            return api_error_response(e)
        return await s.generate(request, req, s.chat, "chatcmpl")

    @app.post("/invocations", responses={200: {"model": P.ChatCompletionResponse}, **_ERRORS})
    async def invocations(request: Request):
        """SageMaker's route, as vLLM serves it: a chat body (`messages`) or a completion body (`prompt`)."""
        try:
            head = await ctx.off_loop(_invocation_kind, await request.body())
            body, prefix, serving = ((chat_body, "chatcmpl", s.chat) if head == "chat"
                                     else (cmpl_body, "cmpl", s.completions))
            req = await read_body(request, body, ctx.off_loop)
        except APIError as e:
            return api_error_response(e)
        return await s.generate(request, req, serving, prefix)

    @app.post("/tokenize", responses={200: {"model": P.TokenizeResponse}, **_ERRORS},
              openapi_extra=tok_body.openapi())
    async def tokenize_route(request: Request):
        try:
            req = await read_body(request, tok_body, ctx.off_loop)
            return JSONResponse(await ctx.off_loop(tokenize, ctx, req))
        except Exception as e:  # noqa: BLE001
            return api_error_response(_as_api_error(e))

    @app.post("/detokenize", responses={200: {"model": P.DetokenizeResponse}, **_ERRORS})
    async def detokenize_route(req: P.DetokenizeRequest):
        try:
            return JSONResponse(await ctx.off_loop(detokenize, ctx, req))
        except Exception as e:  # noqa: BLE001
            return api_error_response(_as_api_error(e))
