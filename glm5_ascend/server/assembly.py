"""The server put together from `serve`'s flags: sampling defaults, the AsyncEngine, the ServingContext,
metrics and the app (``build_app_from_args``), then uvicorn with signal handling (``run_server``).

cli_args.py only declares and checks the flags; api_server.py only defines the app's routes.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# generation_config.json keys -> request fields whose server-side default they set.
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


def _server_tokenizer(engine):
    """The server's own tokenizer: the step thread keeps the engine's to itself."""
    if engine.tokenizer is None:
        raise ValueError(f"{engine.config.model_path} has no tokenizer and the server needs one (chat templates, "
                         "text prompts, detokenized output); pass --tokenizer DIR")
    try:
        return copy.deepcopy(engine.tokenizer)
    except Exception:  # noqa: BLE001 - sharing is safe for encode/decode, only slower under contention
        return engine.tokenizer


def _cache_info(engine) -> dict:
    """vllm:cache_config_info's labels: the cache configuration, as strings."""
    cache = engine.config.cache
    return {"block_size": cache.block_size, "cache_dtype": "auto", "enable_prefix_caching": cache.enable_prefix_caching,
            "gpu_memory_utilization": cache.gpu_memory_utilization,
            "num_gpu_blocks": engine.kv_capacity_tokens // cache.block_size, "engine": 0}


def build_app_from_args(args: argparse.Namespace, engine):
    """The app over a started engine (LLMEngine or DPEngine), from `serve`'s flags (no server started yet)."""
    from glm5_ascend import envs
    from glm5_ascend.engine.async_engine import AsyncEngine
    from glm5_ascend.server.api_server import build_app
    from glm5_ascend.server.chat_template import default_template, load_chat_template
    from glm5_ascend.server.limits import RequestLimitMiddleware, default_body_limit, prompt_char_bound
    from glm5_ascend.server.metrics import Metrics
    from glm5_ascend.server.serving_tokens import ServingContext

    model = engine.config.model_path
    override_template = load_chat_template(args.chat_template)
    defaults = generation_defaults(args, model)
    tokenizer = _server_tokenizer(engine)
    # vLLM names the model as given on the command line; the built-in one goes by its cache name.
    names = args.served_model_name or [args.model_tag or args.model or Path(model).name]
    async_engine = AsyncEngine(engine)
    ctx = ServingContext(
        engine=async_engine, tokenizer=tokenizer, served_names=names, model_path=str(model),
        max_model_len=engine.max_model_len, vocab_size=engine.config.model.vocab_size,
        kv_capacity_tokens=engine.kv_capacity_tokens, max_num_seqs=engine.config.scheduler.max_num_seqs,
        max_logprobs=engine.config.max_logprobs, eos_token_ids=frozenset(engine.eos_token_ids),
        default_sampling={k: v for k, v in defaults.items() if k != "max_tokens"},
        default_max_tokens=defaults.get("max_tokens"), chat_template=default_template(tokenizer, override_template),
        tool_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        trust_request_chat_template=args.trust_request_chat_template, log_requests=args.enable_log_requests,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        default_chat_template_kwargs=args.default_chat_template_kwargs or {},
        force_include_usage=args.enable_force_include_usage, prompt_tokens_details=args.enable_prompt_tokens_details,
        per_request_metrics=args.enable_per_request_metrics)
    metrics = Metrics(names[0], engine.max_model_len,
                      lambda: {**async_engine.stats, "tokenize_seconds": ctx.tokenize_seconds}, _cache_info(engine))
    async_engine.on_request_done = metrics.observe
    async_engine.on_step = metrics.observe_step
    ctx.max_prompt_chars = prompt_char_bound(tokenizer, engine.max_model_len)
    ctx.start_pool(args.tokenizer_pool_size)
    body_limit = args.max_request_body_bytes or default_body_limit(ctx.max_prompt_chars, engine.max_model_len)
    logger.info("Requests: texts over %d characters are refused untokenized; bodies over %d bytes get 413",
                ctx.max_prompt_chars, body_limit)
    app = build_app(ctx, metrics, args.api_key or envs.api_keys(), docs=not args.ignored_disable_fastapi_docs,
                    root_path=args.root_path or "", request_id_headers=args.enable_request_id_headers,
                    tokenizer_info=args.enable_tokenizer_info_endpoint)
    app.add_middleware(RequestLimitMiddleware, max_body=body_limit, max_headers=args.h11_max_header_count)
    return app


def run_server(args: argparse.Namespace, config) -> int:
    """Start the engine, serve until interrupted (or until a rank dies: then 1, with a line naming it)."""
    import warnings

    import uvicorn

    from glm5_ascend.engine.executor import start_engine
    engine = start_engine(config)
    app = None
    try:
        app = build_app_from_args(args, engine)
        state = app.state.app
        server = _server_class(uvicorn)(uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
            access_log=not args.ignored_disable_uvicorn_access_log, timeout_keep_alive=5,
            # a backstop only: the app ends every request when the grace period is over
            timeout_graceful_shutdown=args.shutdown_timeout + 10, ssl_keyfile=args.ssl_keyfile,
            http="h11", h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            ssl_certfile=args.ssl_certfile), state, args.shutdown_timeout)
        if config.parallel.world_size > 1:  # a dead rank ends the server: 503 first, for the balancers
            state.ctx.engine.on_dead = lambda reason: _exit_soon(server)
            engine.cluster.on_fault(state.ctx.engine.kill)
        logger.info("Serving on http://%s:%d", args.host, args.port)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server.run()
    finally:
        engine.shutdown()
    dead = app.state.app.ctx.engine.dead_reason
    if dead and config.parallel.world_size > 1:
        import sys
        print(f"glm5-ascend: error: {dead}; the server stopped", file=sys.stderr, flush=True)
        return 1
    return 0


def _server_class(uvicorn):
    """uvicorn.Server whose signals drain the app instead of waiting on (or cancelling) its streams."""

    class Server(uvicorn.Server):
        def __init__(self, config, state, grace: float):
            super().__init__(config)
            self.state, self.grace, self.loop = state, grace, None

        async def serve(self, sockets=None) -> None:
            import asyncio
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            """First SIGTERM / Ctrl-C: stop accepting, give requests in flight the grace period, then end them
            with an error; a second: end them now. Never force_exit (it skips the engine's shutdown and leaves
            tasks to be cancelled with tracebacks). uvicorn re-raises the signals once stopped."""
            self._captured_signals.append(sig)
            first = not self.should_exit
            self.should_exit = True
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.state.begin_shutdown if first else self.state.abort_all,
                                               *((self.grace,) if first else ()))

    return Server


def _exit_soon(server, delay: float = 5.0) -> None:
    """Stop serving after `delay` s, in which /health answers 503."""
    import threading
    timer = threading.Timer(delay, lambda: setattr(server, "should_exit", True))
    timer.daemon = True
    timer.start()
