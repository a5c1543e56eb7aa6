"""EngineArgs: the one source of engine arguments, with vLLM's names.

`LLM(**kwargs)`, the `serve` / `generate` flags and the engine configuration all come from this
dataclass: each field is one keyword argument and one flag (`max_num_seqs` <-> `--max-num-seqs`),
so an argument is added here once. Parallel and multi-node arguments resolve, with the environment
torchrun sets, into the ParallelConfig of this process (which global ranks it hosts, where the
rendezvous is).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field, fields

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports torch; `serve --help` and flag errors must not wait for it
    from glm5_ascend.config import EngineConfig, ParallelConfig

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def int_with_suffix(text: str) -> int:
    """vLLM's human-readable sizes: 8k = 8000, 8K = 8192, 1m = 1e6, 1M = 2**20."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens (e.g. 8192, 8k, 32K)")
    value, unit = float(m.group(1)), m.group(2)
    scale = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[unit]
    return int(value * scale)


def json_object(text: str) -> dict:
    """A JSON object flag value (--hf-overrides '{"num_hidden_layers": 4}')."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}); give an object such as "
                                         "'{\"num_hidden_layers\": 4}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; give one such as "
                                         "'{\"num_hidden_layers\": 4}'")
    return value


def _arg(default, help: str, *, flags: tuple[str, ...] = (), type=None, choices=None,  # noqa: A002
         nargs=None):
    return field(default=default, metadata={"help": help, "flags": flags, "type": type, "choices": choices,
                                            "nargs": nargs})


def resolve_model(model: str | None) -> str:
    """The model directory; None means the built-in tiny model (created once in the cache)."""
    if model:
        return str(model)
    from glm5_ascend.model.tiny import default_model_path
    return str(default_model_path())


# --quantization values (vLLM's / vllm-ascend's names) -> the checkpoint format they declare
_QUANTIZATION = {"fp8": "fp8", "ascend": "msmodelslim", "w8a8": "msmodelslim"}


@dataclass(kw_only=True)
class EngineArgs:
    """Engine arguments; names, defaults and meanings as in vLLM's EngineArgs."""

    model: str | None = _arg(None, "checkpoint directory (default: the built-in tiny model)")
    tokenizer: str | None = _arg(None, "tokenizer directory (default: the model's)")
    skip_tokenizer_init: bool = _arg(False, "no tokenizer: token ids in and out")
    trust_remote_code: bool = _arg(False, "accepted for vLLM compatibility; GLM-5 needs no remote code")
    dtype: str = _arg("auto", "weight and activation dtype (auto: the checkpoint's)",
                      choices=("auto", "half", "float16", "bfloat16", "float", "float32"))
    device: str = _arg("auto", "auto | npu | cuda | cpu")
    seed: int = _arg(0, "random seed of the engine's sampler", type=int)
    max_model_len: int | None = _arg(None, "context length (default: the model's max_position_embeddings); "
                                           "8k = 8000, 8K = 8192", type=int_with_suffix)
    max_num_seqs: int = _arg(256, "sequences per step", type=int)
    max_num_batched_tokens: int | None = _arg(None, "tokens per step (default: max(8192, max_model_len "
                                                    "without chunked prefill))", type=int_with_suffix)
    gpu_memory_utilization: float = _arg(0.9, "share of device memory for weights and KV cache", type=float)
    block_size: int = _arg(128, "tokens per KV-cache block (the Ascend kernels take 128)", type=int)
    num_gpu_blocks_override: int | None = _arg(None, "KV-cache blocks, instead of the memory-derived count",
                                               type=int)
    enable_prefix_caching: bool = _arg(True, "reuse cached KV blocks of shared prompt prefixes")
    enable_chunked_prefill: bool = _arg(True, "split long prompts over steps, mixed with decodes")
    quantization: str | None = _arg(None, "the checkpoint's format, detected when left out: fp8 (GLM-5-FP8) or "
                                          "ascend / w8a8 (msmodelslim W8A8_DYNAMIC); given, it must match",
                                    flags=("-q",))
    max_logprobs: int = _arg(20, "most logprobs / prompt_logprobs a request may ask for; -1: no cap (the whole "
                                 "vocabulary, which can take much host memory)", type=int)
    kv_cache_dtype: str = _arg("auto", "KV-cache dtype (only auto: the model's dtype)")
    load_format: str = _arg("auto", "auto / safetensors: the checkpoint's weights; dummy: random weights at the "
                                    "model's real size, no checkpoint files needed (benchmarks)",
                            choices=("auto", "safetensors", "dummy"))
    hf_overrides: dict | None = _arg(None, "JSON object of config.json fields to override, e.g. "
                                           "'{\"num_hidden_layers\": 4}'", type=json_object)
    structured_outputs_config: dict | None = _arg(
        None, "JSON object of vLLM's structured-output options: backend (xgrammar, the one here), "
              "disable_any_whitespace (constrained JSON and tool calls without free whitespace)", type=json_object)
    # ---- graph-captured decode ----
    enforce_eager: bool = _arg(False, "run decode eagerly: capture no CUDA / NPU graphs")
    cuda_graph_sizes: list[int] | None = _arg(None, "decode batch sizes to capture (default: 1 2 4 8 16 24 ... "
                                                    "up to the capture limit)", type=int, nargs="+")
    max_cudagraph_capture_size: int | None = _arg(None, "largest decode batch captured (default: "
                                                        "min(--max-num-seqs, 512)); larger ones run eagerly",
                                                  type=int)
    # ---- parallel layout ----
    tensor_parallel_size: int = _arg(1, "devices that split each layer (attention heads, MLPs, vocab)",
                                     flags=("-tp",), type=int)
    data_parallel_size: int = _arg(1, "engine replicas for attention (each with its own batch and KV cache)",
                                   flags=("-dp",), type=int)
    pipeline_parallel_size: int = _arg(1, "pipeline stages (only 1: GLM-5 is served with TP/DP/EP)",
                                       flags=("-pp",), type=int)
    enable_expert_parallel: bool = _arg(False, "split the routed experts over all TP x DP devices")
    distributed_executor_backend: str | None = _arg(
        None, "mp: spawn a process per device (default with more than one); external_launcher: "
              "every rank was started by torchrun; uni: one process", choices=("mp", "external_launcher", "uni"))
    # ---- many nodes (vLLM's flags) ----
    nnodes: int = _arg(1, "nodes the TP x DP ranks span; each runs world/nnodes ranks", type=int)
    node_rank: int = _arg(0, "this node's index (0 serves HTTP, the others run workers only)", type=int)
    master_addr: str = _arg("127.0.0.1", "address of node 0, where every rank meets (torch.distributed's store)")
    master_port: int | None = _arg(None, "port of that store (default: a free port on one node, 29501 across "
                                         "nodes)", type=int)
    headless: bool = _arg(False, "run this node's workers only, no HTTP server")
    data_parallel_size_local: int | None = _arg(None, "DP ranks on this node (vLLM's multi-node DP form)",
                                                type=int)
    data_parallel_start_rank: int = _arg(0, "first DP rank on this node", type=int)
    data_parallel_address: str | None = _arg(None, "address of the node with DP rank 0 (then --master-addr)")
    data_parallel_rpc_port: int | None = _arg(None, "rendezvous port with --data-parallel-address", type=int)

    # ---------------------------------------------------------------- CLI
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """One flag per field (`--max-num-seqs`), with vLLM's short forms and help."""
        for f in fields(cls):
            if f.name in skip:
                continue
            meta = f.metadata
            names = [f"--{f.name.replace('_', '-')}", *meta["flags"]]
            kw = {"dest": f.name, "default": f.default, "help": meta["help"]}
            if f.type in ("bool", bool):
                kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
            else:
                kw["type"] = meta["type"] or str
                if meta["choices"]:
                    kw["choices"] = meta["choices"]
                if meta["nargs"]:
                    kw["nargs"] = meta["nargs"]
            parser.add_argument(*names, **kw)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides) -> "EngineArgs":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    # ---------------------------------------------------------------- configuration
    def create_engine_config(self, environ: dict | None = None) -> EngineConfig:
        """The validated engine configuration of this process; errors name the flag and the fix."""
        import torch

        from glm5_ascend.config import (CacheConfig, EngineConfig, GraphConfig, ModelConfig, SchedulerConfig,
                                        parse_dtype)
        from glm5_ascend.platform import platform_for_device
        self._check()
        model = resolve_model(self.model)
        mcfg = ModelConfig.from_pretrained(model, self.hf_overrides)
        self._check_quantization(model, mcfg)
        default = mcfg.torch_dtype()
        torch_dtype = parse_dtype(self.dtype, default) if default == torch.float32 or self.dtype != "auto" else default
        max_len = self.max_model_len if self.max_model_len is not None else mcfg.max_position_embeddings
        if max_len < 2:
            raise ValueError(f"--max-model-len {max_len} must be at least 2")
        batched = self.max_num_batched_tokens or max(8192, max_len if not self.enable_chunked_prefill else 0)
        return EngineConfig(
            model_path=model, model=mcfg,
            cache=CacheConfig(self.block_size, self.enable_prefix_caching, self.gpu_memory_utilization,
                              self.num_gpu_blocks_override),
            scheduler=SchedulerConfig(self.max_num_seqs, batched, max_len, self.enable_chunked_prefill),
            parallel=self.parallel_config(os.environ if environ is None else environ),
            dtype=torch_dtype, device=self.device, seed=self.seed, tokenizer_path=self.tokenizer,
            skip_tokenizer_init=self.skip_tokenizer_init, load_format=self.load_format,
            graphs=GraphConfig.build(self.enforce_eager, self.cuda_graph_sizes, self.max_cudagraph_capture_size,
                                     self.max_num_seqs, platform_for_device(self.device).supports_graphs()),
            structured_outputs=self._structured_outputs_config(),
            max_logprobs=mcfg.vocab_size if self.max_logprobs == -1 else self.max_logprobs)

    def _structured_outputs_config(self) -> dict:
        cfg = dict(self.structured_outputs_config or {})
        unknown = set(cfg) - {"backend", "disable_any_whitespace", "reasoning_parser"}
        if unknown:
            raise ValueError(f"--structured-outputs-config: unknown keys {sorted(unknown)}; this engine takes "
                             "backend and disable_any_whitespace")
        if cfg.get("backend", "auto") not in ("auto", "xgrammar"):
            raise ValueError(f"--structured-outputs-config backend {cfg['backend']!r} is not available; "
                             "xgrammar is the one backend here (use auto or xgrammar)")
        return {"disable_any_whitespace": bool(cfg.get("disable_any_whitespace", False))}

    def _check(self) -> None:
        if self.quantization not in (None, "None", "none") + tuple(_QUANTIZATION):
            raise ValueError(f"--quantization {self.quantization} is not supported; use fp8 or ascend (w8a8), or "
                             "leave it out: the checkpoint's format is detected")
        if self.max_logprobs < -1:
            raise ValueError(f"--max-logprobs {self.max_logprobs} must be >= 0, or -1 for no cap")
        if self.kv_cache_dtype != "auto":
            raise ValueError(f"--kv-cache-dtype {self.kv_cache_dtype} is not supported; drop it (auto)")
        if not re.fullmatch(r"(auto|cpu|cuda|npu)(:\d+)?", self.device):
            raise ValueError(f"--device {self.device} is not a device here; use auto, npu, cuda or cpu")
        if self.pipeline_parallel_size != 1:
            raise ValueError(f"--pipeline-parallel-size {self.pipeline_parallel_size}: pipeline parallelism is not "
                             "supported; use --tensor-parallel-size / --data-parallel-size (with "
                             "--enable-expert-parallel) to span more devices")

    def _check_quantization(self, model: str, mcfg) -> None:
        want = _QUANTIZATION.get(self.quantization)
        have = (mcfg.quantization_config or {}).get("quant_method")
        if want is not None and have != want:
            raise ValueError(f"--quantization {self.quantization}: {model} is {have or 'not quantized'}, not {want}; "
                             "drop --quantization (the format is detected) or `glm5-ascend convert` the checkpoint")

    def parallel_config(self, environ) -> ParallelConfig:
        """Which ranks this process hosts, from the flags (or torchrun's environment)."""
        from glm5_ascend.config import ParallelConfig
        tp, dp = self.tensor_parallel_size, self.data_parallel_size
        for name in ("tensor_parallel_size", "data_parallel_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        world = tp * dp
        common = dict(tensor_parallel_size=tp, data_parallel_size=dp,
                      enable_expert_parallel=self.enable_expert_parallel)
        torchrun = self.distributed_executor_backend == "external_launcher" or (
            self.distributed_executor_backend is None and world > 1 and all(v in environ for v in _TORCHRUN_VARS))
        if torchrun:
            return self._torchrun_config(environ, world, common)
        if self.distributed_executor_backend == "uni" and world > 1:
            raise ValueError(f"--distributed-executor-backend uni runs one process, but TP x DP = {world}; "
                             "use mp (the default)")
        if self.data_parallel_size_local is not None or self.data_parallel_address is not None:
            return self._dp_nodes_config(world, common)
        if self.nnodes > 1:
            if world % self.nnodes:
                raise ValueError(f"--nnodes {self.nnodes} does not divide TP x DP = {world} ranks; each node runs "
                                 "an equal share")
            if not 0 <= self.node_rank < self.nnodes:
                raise ValueError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1}")
            per_node = world // self.nnodes
            return ParallelConfig(**common, first_rank=self.node_rank * per_node, num_local_ranks=per_node,
                                  master_addr=self.master_addr, master_port=self.master_port or 29501,
                                  headless=self.headless or self.node_rank > 0, launcher="spawn")
        if self.node_rank:
            raise ValueError(f"--node-rank {self.node_rank} needs --nnodes > 1")
        return ParallelConfig(**common, first_rank=0, num_local_ranks=world, master_addr=self.master_addr,
                              master_port=self.master_port, headless=self.headless, launcher="spawn")

    def _dp_nodes_config(self, world: int, common: dict) -> ParallelConfig:
        from glm5_ascend.config import ParallelConfig
        tp, dp = self.tensor_parallel_size, self.data_parallel_size
        if self.nnodes > 1:
            raise ValueError("--nnodes/--node-rank and --data-parallel-size-local/--data-parallel-start-rank are "
                             "two ways to span nodes; use one")
        local = self.data_parallel_size_local if self.data_parallel_size_local is not None else dp
        start = self.data_parallel_start_rank
        if local < 1 or start < 0 or start + local > dp:
            raise ValueError(f"--data-parallel-start-rank {start} with --data-parallel-size-local {local} exceeds "
                             f"--data-parallel-size {dp}")
        addr = self.data_parallel_address or self.master_addr
        port = self.data_parallel_rpc_port or self.master_port or (29501 if local < dp else None)
        return ParallelConfig(**common, first_rank=start * tp, num_local_ranks=local * tp, master_addr=addr,
                              master_port=port, headless=self.headless or start > 0, launcher="spawn")

    @staticmethod
    def _torchrun_config(environ, world: int, common: dict) -> ParallelConfig:
        from glm5_ascend.config import ParallelConfig
        missing = [v for v in _TORCHRUN_VARS if v not in environ]
        if missing:
            raise ValueError(f"--distributed-executor-backend external_launcher needs torchrun's {', '.join(missing)} "
                             "in the environment; start it with torchrun")
        try:
            rank, size, local = (int(environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
            port = int(environ["MASTER_PORT"])
        except ValueError:
            raise ValueError("torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_PORT must be integers") from None
        if size != world:
            raise ValueError(f"torchrun started {size} processes but TP x DP = {world}; pass --nproc-per-node "
                             f"(times --nnodes) = {world}")
        return ParallelConfig(**common, first_rank=rank, num_local_ranks=1, device_index=local,
                              master_addr=environ["MASTER_ADDR"], master_port=port, headless=rank != 0,
                              launcher="torchrun")


def engine_args_from_kwargs(model: str | None, kwargs: dict) -> EngineArgs:
    """EngineArgs from LLM(...)'s keywords; an unknown one is a TypeError naming it."""
    known = EngineArgs.field_names()
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"LLM() got unsupported argument(s) {', '.join(unknown)}; see docs/api.md")
    return EngineArgs(model=model, **kwargs)

