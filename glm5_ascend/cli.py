"""`glm5-ascend` subcommands. Flag names follow vLLM's so a `vllm serve ...` line works unchanged."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# subcommand -> (module with add_arguments(parser) and main(args) -> int, help)
_COMMANDS = {
    "serve": ("glm5_ascend.server.cli_args", "serve the OpenAI-compatible HTTP API (like `vllm serve`)"),
    "generate": ("glm5_ascend.generate_cmd", "print a completion of --prompt"),
    "make-tiny": ("glm5_ascend.model.tiny_cmd", "write the built-in tiny GLM-5 checkpoint to a directory"),
    "convert": ("glm5_ascend.model.convert_cmd", "rewrite a checkpoint as bf16, w8a8 (msmodelslim layout) or fp8, "
                                                 "streaming and resumable"),
    "plan": ("glm5_ascend.launcher.plan", "whether a device layout fits the model, and a decode speed bound"),
    "launch": ("glm5_ascend.launcher.launch", "start this node's part of a cluster description (or --dry-run: print "
                                              "every node's environment, rank table and serve command)"),
}
_BENCH = {
    "serve": ("glm5_ascend.bench.serve", "benchmark a running vLLM-compatible server (like `vllm bench serve`)"),
    "ops": ("glm5_ascend.bench.ops", "time each operator at GLM-5 shapes against the device's peak"),
    "latency": ("glm5_ascend.bench.latency", "time one batch from prompt to last token, beside the device's "
                                             "bounds (like `vllm bench latency`)"),
    "throughput": ("glm5_ascend.bench.throughput", "offline throughput of many requests, beside the device's "
                                                   "bounds (like `vllm bench throughput`)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the problem and the fix, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, unless it is None / off or the help already says it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add(sub, name: str, module: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help)
    mod = importlib.import_module(module)
    mod.add_arguments(p)
    p.set_defaults(_main=mod.main)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="glm5-ascend", description="Serve GLM-5 on Ascend NPUs, CUDA GPUs or the CPU.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in _COMMANDS.items():
        if _available(module):
            _add(sub, name, module, help_text)
    bench = sub.add_parser("bench", help="benchmarks (serve, ops, latency, throughput)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=_Parser)
    for name, (module, help_text) in _BENCH.items():
        if _available(module):
            _add(bench_sub, name, module, help_text)
    return parser


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version() -> str:
    from glm5_ascend import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_main"):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # user-caused: one line, no traceback
        print(f"glm5-ascend: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
