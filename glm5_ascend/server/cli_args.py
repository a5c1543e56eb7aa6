"""`glm5-ascend serve`: vLLM's `vllm serve` flags, so a vLLM command line works unchanged.

Flags are supported, accepted and ignored (they tune something this engine does
not have), or refused with one line naming the fix; docs/api.md lists which.
Heavy imports wait until ``main`` so `--help` and flag errors are instant.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import warnings

logger = logging.getLogger(__name__)

# vLLM flags that take a value and change nothing here (documented as ignored in docs/api.md).
IGNORED_VALUE_FLAGS = [
    "--tokenizer-mode", "--revision", "--code-revision", "--tokenizer-revision", "--download-dir",
    "--load-format", "--config-format", "--max-seq-len-to-capture", "--swap-space", "--cpu-offload-gb",
    "--distributed-executor-backend", "--compilation-config", "--chat-template-content-format",
    "--tool-parser-plugin", "--hf-config-path", "--disable-log-stats-interval", "--max-num-partial-prefills",
    "--scheduling-policy", "--response-role", "--hf-overrides", "--allowed-origins", "--allowed-methods",
    "--allowed-headers", "--root-path", "--middleware", "--limit-mm-per-prompt", "--mm-processor-kwargs",
    "--override-neuron-config", "--worker-cls", "--ssl-ca-certs", "--ssl-cert-reqs", "--prefix-caching-hash-algo",
    "--long-prefill-token-threshold", "--max-long-partial-prefills", "--cuda-graph-sizes", "--async-scheduling",
    "--kv-transfer-config", "--additional-config", "--logits-processors", "--structured-outputs-config",
    "--guided-decoding-backend", "--reasoning-parser-plugin", "--api-server-count", "--max-parallel-loading-workers",
]
IGNORED_SWITCHES = [
    "--trust-remote-code", "--enforce-eager", "--disable-log-stats", "--disable-log-requests",
    "--disable-custom-all-reduce", "--disable-frontend-multiprocessing", "--enable-prompt-tokens-details",
    "--enable-server-load-tracking", "--enable-force-include-usage", "--disable-uvicorn-access-log",
    "--skip-tokenizer-init", "--disable-sliding-window", "--disable-cascade-attn", "--enable-request-id-headers",
    "--enable-log-outputs", "--disable-fastapi-docs", "--use-v2-block-manager", "--enable-sleep-mode",
    "--no-enable-log-requests", "--enable-tokenizer-info-endpoint", "--exclude-tools-when-tool-choice-none",
]


class _Once(argparse.Action):
    """Store a value-taking flag that is accepted for compatibility and ignored."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.ignored_flags = [*getattr(namespace, "ignored_flags", []), option_string]


def _int_with_suffix(text: str) -> int:
    """vLLM's human-readable sizes: 8k = 8000, 8K = 8192, 1m = 1e6, 1M = 2**20."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens (e.g. 8192, 8k, 32K)")
    value, unit = float(m.group(1)), m.group(2)
    scale = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[unit]
    return int(value * scale)


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's `serve` flags (names, defaults and meanings as in vLLM)."""
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint directory (default: the built-in tiny model on the CPU)")
    p.add_argument("--model", default=None, help="same as the positional MODEL")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use for the model")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--api-key", action="extend", nargs="+", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* (repeatable; else VLLM_API_KEY)")
    p.add_argument("--ssl-keyfile", default=None)
    p.add_argument("--ssl-certfile", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    p.add_argument("--device", default="auto", help="auto | npu | cuda | cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=_int_with_suffix, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=_int_with_suffix, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--quantization", "-q", default=None)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--speculative-config", type=_json_dict, default=None,
                   help="accepted for MTP lines; speculative decoding is not implemented (a warning is logged)")
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--generation-config", default="auto", help="auto (the model's) | vllm (none) | DIR")
    p.add_argument("--override-generation-config", type=_json_dict, default=None)
    p.add_argument("--chat-template", default=None, help="a .jinja file or the template text")
    p.add_argument("--trust-request-chat-template", action="store_true")
    p.add_argument("--tool-call-parser", default=None, help="glm47 (or glm45)")
    p.add_argument("--reasoning-parser", default=None, help="glm45")
    p.add_argument("--enable-auto-tool-choice", action="store_true")
    p.add_argument("--return-tokens-as-token-ids", action="store_true")
    p.add_argument("--enable-log-requests", action="store_true")
    for flag in IGNORED_VALUE_FLAGS:
        p.add_argument(flag, action=_Once, help=argparse.SUPPRESS)
    for flag in IGNORED_SWITCHES:
        p.add_argument(flag, action="store_true", dest=f"ignored_{flag[2:].replace('-', '_')}",
                       help=argparse.SUPPRESS)


def check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot run here, in one line each (ValueError: the CLI prints it, exit code 1)."""
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two models given ({args.model_tag} and --model {args.model}); pass only one")
    for name in ("pipeline_parallel_size", "data_parallel_size"):
        if getattr(args, name) != 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: serving across processes is "
                             "not implemented yet (README, Features); use 1")
    if args.tensor_parallel_size != 1:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size}: serving across processes is not "
                         "implemented yet (README, Features); use -tp 1")
    if args.quantization not in (None, "None", "none"):
        raise ValueError(f"--quantization {args.quantization} is not supported; serve the BF16 checkpoint")
    if args.kv_cache_dtype != "auto":
        raise ValueError(f"--kv-cache-dtype {args.kv_cache_dtype} is not supported; drop it (auto)")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice requires --tool-call-parser (e.g. glm47)")
    if args.max_logprobs < 0:
        raise ValueError(f"--max-logprobs {args.max_logprobs} must be >= 0")
    if not re.fullmatch(r"(auto|cpu|cuda|npu)(:\d+)?", args.device):
        raise ValueError(f"--device {args.device} is not a device here; use auto, npu, cuda or cpu")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} must be in 1..65535")
    from glm5_ascend.engine.sampling_params import MAX_LOGPROBS
    if args.max_logprobs > MAX_LOGPROBS:
        raise ValueError(f"--max-logprobs {args.max_logprobs} exceeds the engine's limit of {MAX_LOGPROBS}")
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


_GEN_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(args: argparse.Namespace, model_dir: str) -> dict:
    """Sampling defaults from generation_config.json (vLLM's --generation-config auto), plus overrides."""
    from pathlib import Path
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


def build_app_from_args(args: argparse.Namespace):
    """Load the engine and assemble the app (no server started yet)."""
    import copy
    from pathlib import Path

    from glm5_ascend import envs
    from glm5_ascend.engine.async_engine import AsyncEngine
    from glm5_ascend.engine.llm_engine import LLMEngine, create_engine_config
    from glm5_ascend.llm import resolve_model
    from glm5_ascend.server.api_server import build_app
    from glm5_ascend.server.chat_template import default_template, load_chat_template
    from glm5_ascend.server.metrics import Metrics
    from glm5_ascend.server.serving_tokens import ServingContext

    model = resolve_model(args.model_tag or args.model)
    override_template = load_chat_template(args.chat_template)
    defaults = generation_defaults(args, model)
    config = create_engine_config(
        model, args.tokenizer, args.dtype, args.device, args.max_model_len, args.seed, args.enable_prefix_caching,
        args.tensor_parallel_size, args.block_size, args.max_num_seqs, args.max_num_batched_tokens,
        args.gpu_memory_utilization, args.enable_chunked_prefill, args.num_gpu_blocks_override)
    engine = LLMEngine(config)
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
    bm = engine.block_manager
    ctx = ServingContext(
        engine=async_engine, tokenizer=tokenizer, served_names=names, model_path=str(model),
        max_model_len=engine.max_model_len, vocab_size=engine.config.model.vocab_size,
        kv_capacity_tokens=bm.num_blocks * bm.block_size, max_num_seqs=args.max_num_seqs,
        max_logprobs=args.max_logprobs, default_sampling={k: v for k, v in defaults.items() if k != "max_tokens"},
        default_max_tokens=defaults.get("max_tokens"), chat_template=default_template(tokenizer, override_template),
        tool_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        trust_request_chat_template=args.trust_request_chat_template, log_requests=args.enable_log_requests,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids)
    ctx_holder.append(ctx)
    return build_app(ctx, metrics, args.api_key or envs.api_keys(), docs=not args.ignored_disable_fastapi_docs)


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
    """Serve until interrupted; user errors raise ValueError (one line from the CLI)."""
    check_args(args)
    _check_port_free(args.host, args.port)
    import uvicorn
    app = build_app_from_args(args)
    logger.info("Serving on http://%s:%d", args.host, args.port)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                    access_log=not args.ignored_disable_uvicorn_access_log, timeout_keep_alive=5,
                    ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    return 0
