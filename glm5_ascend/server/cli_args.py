"""`glm5-ascend serve`: vLLM's `vllm serve` flags, so a vLLM command line works unchanged.

Flags are supported, accepted and ignored (they tune something this engine does
not have), or refused with one line naming the fix; docs/api.md lists which.
Heavy imports wait until ``main`` so `--help` and flag errors are instant.
"""
from __future__ import annotations

import argparse
import json
import logging

logger = logging.getLogger(__name__)

# vLLM flags that take a value and change nothing here (documented as ignored in docs/api.md).
IGNORED_VALUE_FLAGS = [
    "--tokenizer-mode", "--revision", "--code-revision", "--tokenizer-revision", "--download-dir",
    "--config-format", "--max-seq-len-to-capture", "--swap-space", "--cpu-offload-gb",
    "--compilation-config", "--chat-template-content-format",
    "--tool-parser-plugin", "--hf-config-path", "--disable-log-stats-interval", "--max-num-partial-prefills",
    "--scheduling-policy", "--response-role", "--allowed-origins", "--allowed-methods",
    "--allowed-headers", "--middleware", "--limit-mm-per-prompt", "--mm-processor-kwargs",
    "--override-neuron-config", "--worker-cls", "--ssl-ca-certs", "--ssl-cert-reqs", "--prefix-caching-hash-algo",
    "--long-prefill-token-threshold", "--max-long-partial-prefills", "--async-scheduling",
    "--kv-transfer-config", "--additional-config", "--logits-processors",
    "--guided-decoding-backend", "--reasoning-parser-plugin", "--api-server-count", "--max-parallel-loading-workers",
]
IGNORED_SWITCHES = [
    "--disable-log-stats", "--disable-log-requests",
    "--disable-custom-all-reduce", "--disable-frontend-multiprocessing",
    "--enable-server-load-tracking", "--disable-uvicorn-access-log",
    "--disable-sliding-window", "--disable-cascade-attn",
    "--enable-log-outputs", "--disable-fastapi-docs", "--use-v2-block-manager", "--enable-sleep-mode",
    "--no-enable-log-requests", "--exclude-tools-when-tool-choice-none",
]


class _Once(argparse.Action):
    """Store a value-taking flag that is accepted for compatibility and ignored."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.ignored_flags = [*getattr(namespace, "ignored_flags", []), option_string]


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's `serve` flags: the engine's (EngineArgs) and the server's (names, defaults and meanings as in vLLM)."""
    from glm5_ascend.engine.arg_utils import EngineArgs
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint directory (default: the built-in tiny model on the CPU)")
    EngineArgs.add_cli_args(p)
    p.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use for the model")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0: every interface, as vLLM; "
                   "127.0.0.1: this machine only). Anything reachable from a network wants --api-key")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    p.add_argument("--api-key", action="extend", nargs="+", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* (repeatable; else VLLM_API_KEY)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds the requests in flight get to finish after the first SIGTERM / Ctrl-C (new ones get "
                        "503 at once); then each is aborted with an error (a stream's last event). A second signal "
                        "aborts them at once")
    p.add_argument("--tokenizer-pool-size", type=int, default=2,
                   help="threads that tokenize and render chat templates off the event loop (so one huge "
                        "prompt never stalls the others or /health)")
    p.add_argument("--max-request-body-bytes", type=int, default=None,
                   help="larger bodies get 413 unread (default: what the longest prompt --max-model-len allows "
                        "needs, JSON-escaped, plus 1 MiB)")
    p.add_argument("--h11-max-incomplete-event-size", type=int, default=4 * 1024 * 1024,
                   help="most bytes of a request line and headers (uvicorn's h11 parser; vLLM's default)")
    p.add_argument("--h11-max-header-count", type=int, default=256,
                   help="most headers a request may carry (431 beyond; vLLM's default)")
    p.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (with --ssl-certfile)")
    p.add_argument("--ssl-certfile", default=None, help="the certificate for --ssl-keyfile")
    p.add_argument("--speculative-config", type=_json_dict, default=None,
                   help="accepted for MTP lines; speculative decoding is not implemented (a warning is logged)")
    p.add_argument("--generation-config", default="auto", help="auto (the model's) | vllm (none) | DIR")
    p.add_argument("--override-generation-config", type=_json_dict, default=None,
                   help='JSON object of sampling defaults over the generation config, e.g. {"temperature": 0.6}')
    p.add_argument("--chat-template", default=None, help="a .jinja file or the template text")
    p.add_argument("--default-chat-template-kwargs", type=_json_dict, default=None,
                   help='JSON object passed to the chat template for every request, under the request\'s own '
                        'chat_template_kwargs, e.g. \'{"enable_thinking": false}\' (thinking off by default)')
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests pass their own chat_template (else 400)")
    p.add_argument("--tool-call-parser", default=None, help="glm47 (or glm45)")
    p.add_argument("--reasoning-parser", default=None, help="glm45")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto" (needs --tool-call-parser)')
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help='show logprob tokens as "token_id:N"')
    p.add_argument("--enable-log-requests", action="store_true", help="log each request's fields (first 2000 chars)")
    p.add_argument("--enable-force-include-usage", action="store_true",
                   help="end every stream with a usage chunk, as if stream_options.include_usage were true")
    p.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="report usage.prompt_tokens_details.cached_tokens (prompt tokens served from the prefix "
                        "cache)")
    p.add_argument("--enable-per-request-metrics", action="store_true",
                   help="add a `metrics` object (time to first token, queue, generation time, mean ITL, tokens/s) "
                        "to responses of one prompt and one choice (a stream: its final usage chunk)")
    p.add_argument("--enable-request-id-headers", action="store_true",
                   help="answer every request with an X-Request-Id header (the client's own, else a new id)")
    p.add_argument("--root-path", default=None,
                   help="the path prefix under which a proxy serves this app (FastAPI's root_path)")
    p.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="serve GET /tokenizer_info (the tokenizer's class, config and chat template)")
    taken = set(p._option_string_actions)  # a flag the engine has come to implement is no longer ignored
    for flag in IGNORED_VALUE_FLAGS:
        if flag not in taken:
            p.add_argument(flag, action=_Once, help=argparse.SUPPRESS)
    for flag in IGNORED_SWITCHES:
        if flag not in taken:
            p.add_argument(flag, action="store_true", dest=f"ignored_{flag[2:].replace('-', '_')}",
                           help=argparse.SUPPRESS)


def check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot run here, in one line each (ValueError: the CLI prints it, exit code 1)."""
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two models given ({args.model_tag} and --model {args.model}); pass only one")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice requires --tool-call-parser (e.g. glm47)")
    for flag in ("tokenizer_pool_size", "h11_max_incomplete_event_size", "h11_max_header_count"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    if args.max_request_body_bytes is not None and args.max_request_body_bytes < 1024:
        raise ValueError(f"--max-request-body-bytes {args.max_request_body_bytes} must be >= 1024")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout {args.shutdown_timeout} must be >= 0 seconds")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} must be in 1..65535")
    if args.tool_call_parser:
        from glm5_ascend.server.tool_parsers import get_tool_parser
        get_tool_parser(args.tool_call_parser)
    if args.reasoning_parser:
        from glm5_ascend.server.reasoning import get_reasoning_parser
        get_reasoning_parser(args.reasoning_parser)
    if args.speculative_config is not None:
        logger.warning("--speculative-config %s: MTP speculative decoding is not implemented; serving without "
                       "it (same outputs, no speed-up)", json.dumps(args.speculative_config))
    for flag in getattr(args, "ignored_flags", []) + [f"--{k[8:].replace('_', '-')}" for k, v in vars(args).items()
                                                       if k.startswith("ignored_") and v is True]:
        logger.info("%s is accepted for vLLM compatibility and has no effect here", flag)


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line before loading the model, not after, when the address is taken."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e}); use an address such as 0.0.0.0") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                             "or stop the process using it") from None


def main(args: argparse.Namespace) -> int:
    """Serve until interrupted (or until a rank dies: then exit 1 with a line naming it); user errors
    raise ValueError (one line from the CLI). A node without rank 0 (--headless, a torchrun rank > 0)
    runs its ranks only."""
    from glm5_ascend.engine.arg_utils import EngineArgs
    check_args(args)
    config = EngineArgs.from_cli_args(args, model=args.model_tag or args.model).create_engine_config()
    if config.parallel.headless:
        from glm5_ascend.engine.executor import run_node
        logger.info("Headless: ranks %d..%d of %d, no HTTP server", config.parallel.first_rank,
                    config.parallel.first_rank + config.parallel.num_local_ranks - 1, config.parallel.world_size)
        return run_node(config)
    _check_port_free(args.host, args.port)
    from glm5_ascend.server.assembly import run_server
    return run_server(args, config)
