"""The FastAPI app: its assembly from `serve`'s flags, vLLM's routes, error bodies, API-key check, and the
engine's lifespan."""
from __future__ import annotations

import argparse
import asyncio
import copy
import hmac
import json
import logging
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

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

    PATHS = ("/v1/completions", "/v1/chat/completions")

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


_GEN_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(args: argparse.Namespace, model_dir: str) -> dict:
    """Sampling defaults from generation_config.json (vLLM's --generation-config auto), plus overrides."""
    raw: dict = {}
    if args.generation_config != "vllm":
        folder = Path(model_dir if args.generation_config == "auto" else args.generation_config)
        path = folder / "generation_config.json"
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}); fix it or pass --generation-config vllm") from None
        elif args.generation_config != "auto":
            raise ValueError(f"--generation-config {args.generation_config}: no generation_config.json there")
    raw.update(args.override_generation_config or {})
    out = {_GEN_KEYS[k]: v for k, v in raw.items() if k in _GEN_KEYS and v is not None}
    if out:
        logger.info("Default sampling parameters from the generation config: %s", out)
    return out


def build_app_from_args(args: argparse.Namespace, engine) -> FastAPI:
    """The app over a started engine (LLMEngine or DPEngine), from `serve`'s flags (no server started yet)."""
    from glm5_ascend import envs
    from glm5_ascend.engine.async_engine import AsyncEngine
    from glm5_ascend.server.chat_template import default_template, load_chat_template

    model = engine.config.model_path
    override_template = load_chat_template(args.chat_template)
    defaults = generation_defaults(args, model)
    if engine.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer and the server needs one (chat templates, text "
                         "prompts, detokenized output); pass --tokenizer DIR")
    try:  # the server's own tokenizer: the step thread keeps the engine's to itself
        tokenizer = copy.deepcopy(engine.tokenizer)
    except Exception:  # noqa: BLE001 - sharing is safe for encode/decode, only slower under contention
        tokenizer = engine.tokenizer
    # vLLM names the model as given on the command line; the built-in one goes by its cache name.
    names = args.served_model_name or [args.model_tag or args.model or Path(model).name]
    metrics_holder: list = []
    async_engine = AsyncEngine(engine, on_request_done=lambda s: metrics_holder[0].observe(s))
    ctx_holder: list = []
    metrics = Metrics(names[0], engine.max_model_len, lambda: {
        **async_engine.stats, "tokenize_seconds": ctx_holder[0].tokenize_seconds if ctx_holder else 0.0})
    metrics_holder.append(metrics)
    ctx = ServingContext(
        engine=async_engine, tokenizer=tokenizer, served_names=names, model_path=str(model),
        max_model_len=engine.max_model_len, vocab_size=engine.config.model.vocab_size,
        kv_capacity_tokens=engine.kv_capacity_tokens, max_num_seqs=engine.config.scheduler.max_num_seqs,
        max_logprobs=args.max_logprobs, default_sampling={k: v for k, v in defaults.items() if k != "max_tokens"},
        default_max_tokens=defaults.get("max_tokens"), chat_template=default_template(tokenizer, override_template),
        tool_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        trust_request_chat_template=args.trust_request_chat_template, log_requests=args.enable_log_requests,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        default_chat_template_kwargs=args.default_chat_template_kwargs or {})
    ctx_holder.append(ctx)
    from glm5_ascend.server.limits import RequestLimitMiddleware, default_body_limit, prompt_char_bound
    ctx.max_prompt_chars = prompt_char_bound(tokenizer, engine.max_model_len)
    ctx.start_pool(args.tokenizer_pool_size)
    body_limit = args.max_request_body_bytes or default_body_limit(ctx.max_prompt_chars, engine.max_model_len)
    logger.info("Requests: texts over %d characters are refused untokenized; bodies over %d bytes get 413",
                ctx.max_prompt_chars, body_limit)
    app = build_app(ctx, metrics, args.api_key or envs.api_keys(), docs=not args.ignored_disable_fastapi_docs)
    app.add_middleware(RequestLimitMiddleware, max_body=body_limit, max_headers=args.h11_max_header_count)
    return app


def build_app(ctx: ServingContext, metrics: Metrics, api_keys: list[str] | None = None,
              docs: bool = True) -> FastAPI:
    """The app; its lifespan starts and stops the AsyncEngine's step thread."""
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
    app = FastAPI(title="glm5-ascend", version=__version__, lifespan=lifespan,
                  description="vLLM-compatible OpenAI API serving GLM-5.", **hidden)
    app.state.app = state
    _install_error_handlers(app)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    app.add_middleware(_LoadMiddleware, state=state)
    if api_keys:
        app.add_middleware(_ApiKeyMiddleware, keys=api_keys)
    _add_routes(app, state)
    return app


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
