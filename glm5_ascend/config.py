"""Configuration: ModelConfig (fields = Hugging Face config.json keys) and the engine's configs.

All configs are frozen dataclasses that validate in __post_init__, so a bad value fails at
start-up with one line naming the field and the fix.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

ARCHITECTURE = "GlmMoeDsaForCausalLM"

# Keys every GLM-5 config.json must carry; everything else has the transformers default.
_REQUIRED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
    "num_experts_per_tok", "moe_intermediate_size", "intermediate_size", "index_topk",
    "index_head_dim", "index_n_heads",
)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    if value is None or value == "auto":
        return default
    if isinstance(value, torch.dtype):
        return value
    key = str(value).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"dtype {value!r} is not supported; use auto, bfloat16, float16 or float32")
    return _DTYPES[key]


@dataclass(frozen=True)
class ModelConfig:
    """GLM-5 (GlmMoeDsaForCausalLM) hyper-parameters, named as in config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    index_topk: int
    index_head_dim: int
    index_n_heads: int
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    first_k_dense_replace: int = 3
    mlp_layer_types: tuple[str, ...] = ()
    indexer_types: tuple[str, ...] = ()
    rope_parameters: dict = field(default_factory=lambda: {"rope_theta": 10000.0, "rope_type": "default"})
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 202752
    num_nextn_predict_layers: int = 0
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "bfloat16"
    quantization_config: dict | None = None

    def __post_init__(self):
        for f in _REQUIRED:
            value = getattr(self, f)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.json: {f}={value!r} must be a positive integer")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"config.json: n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"config.json: topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ValueError("config.json: group-limited routing scores a group by its top-2 experts; each group needs >= 2 experts")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(f"config.json: num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group groups ({self.topk_group * per_group})")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.index_head_dim:
            raise ValueError(f"config.json: qk_rope_head_dim={self.qk_rope_head_dim} must be even and <= index_head_dim={self.index_head_dim}")
        if self.scoring_func != "sigmoid":
            raise ValueError(f"config.json: scoring_func={self.scoring_func!r}; GLM-5 routing is sigmoid")
        if self.hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act={self.hidden_act!r}; only silu is supported")
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - {"dense", "sparse"}:
            raise ValueError(f"config.json: mlp_layer_types must list 'dense'/'sparse' for each of the {self.num_hidden_layers} layers")
        if len(self.indexer_types) != self.num_hidden_layers or set(self.indexer_types) - {"full", "shared"}:
            raise ValueError(f"config.json: indexer_types must list 'full'/'shared' for each of the {self.num_hidden_layers} layers")
        if self.indexer_types[0] != "full":
            raise ValueError("config.json: indexer_types[0] must be 'full': a 'shared' layer reuses the previous layer's top-k")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if "rope_theta" not in self.rope_parameters:
            raise ValueError("config.json: rope_parameters needs rope_theta")
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"config.json: rope_type={rope_type!r} is not supported; use default or yarn")
        if self.quantization_config is not None:
            _check_quantization(self.quantization_config)

    # ---- derived ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mtp_layer_index(self) -> int | None:
        """Index of the first MTP layer in checkpoint names (model.layers.{N}.*), if any."""
        return self.num_hidden_layers if self.num_nextn_predict_layers > 0 else None

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        rp = self.rope_parameters
        if rp.get("rope_type", "default") != "default" and rp.get("mscale_all_dim"):
            factor = rp["factor"]
            mscale = 0.1 * rp["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
            scale *= mscale * mscale
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == "sparse"

    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Build from a config.json dict, deriving the per-layer schedules as transformers does."""
        archs = raw.get("architectures") or [ARCHITECTURE]
        if ARCHITECTURE not in archs and raw.get("model_type") != "glm_moe_dsa":
            raise ValueError(f"config.json: architectures={archs} is not {ARCHITECTURE}; this engine serves GLM-5 only")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"config.json: missing required field(s) {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in raw.items() if k in known}
        n = raw["num_hidden_layers"]
        kw["mlp_layer_types"] = tuple(raw.get("mlp_layer_types") or _mlp_types(raw, n))
        kw["indexer_types"] = tuple(raw.get("indexer_types") or _indexer_types(raw, n))
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope = dict(rope)
        rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        kw["rope_parameters"] = rope
        eos = raw.get("eos_token_id")
        kw["eos_token_id"] = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        kw["dtype"] = str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16")
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "ModelConfig":
        """config.json of checkpoint `path`, with `overrides` (vLLM's --hf-overrides) applied to its fields."""
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file}: no config.json; pass --model a GLM-5 checkpoint directory")
        try:
            raw = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e}); re-download the checkpoint") from None
        described = _msmodelslim_quantization(Path(path))
        if described is not None and raw.get("quantization_config") is None:
            raw = {**raw, "quantization_config": described}
        if overrides:
            unknown = sorted(set(overrides) - set(raw) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"--hf-overrides: {', '.join(unknown)} is not a field of {cfg_file} or of GLM-5's "
                                 "configuration; check the spelling")
            n = overrides.get("num_hidden_layers")
            raw = {**raw, **overrides}
            for key in ("index_topk_pattern", "mlp_layer_types", "indexer_types"):  # per-layer schedules
                if n is not None and key in raw and key not in overrides and len(raw[key]) > n:
                    raw[key] = raw[key][:n]  # fewer layers keep the first layers' schedule
        return cls.from_dict(raw)


def _mlp_types(raw: dict, n: int) -> list[str]:
    # transformers' GlmMoeDsaConfig rule: the first first_k_dense_replace layers dense, all others MoE
    # (it ignores moe_layer_freq, which GLM-5 sets to 1).
    k = min(raw.get("first_k_dense_replace", 3), n)
    return ["dense"] * k + ["sparse"] * (n - k)


def _indexer_types(raw: dict, n: int) -> list[str]:
    pattern = raw.get("index_topk_pattern")
    if pattern is not None:
        if isinstance(pattern, str):
            bad = set(pattern) - {"F", "S"}
            if bad or len(pattern) != n:
                raise ValueError(f"config.json: index_topk_pattern must be {n} letters of F/S, got {pattern!r}")
            return [{"F": "full", "S": "shared"}[c] for c in pattern]
        return list(pattern)
    freq = max(raw.get("index_topk_freq", 1), 1)
    offset = raw.get("index_skip_topk_offset", 2)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 128
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None  # override of the memory-derived count

    def __post_init__(self):
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size {self.block_size} must be a positive power of two (Ascend kernels take 128)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization {self.gpu_memory_utilization} must be in (0, 1]")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"--num-gpu-blocks-override {self.num_blocks} must be >= 1")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"--max-num-batched-tokens {self.max_num_batched_tokens} < --max-model-len {self.max_model_len} "
                "needs chunked prefill; enable it or raise --max-num-batched-tokens")


@dataclass(frozen=True)
class GraphConfig:
    """Graph-captured decode (CUDA graphs on cuda, aclgraph on npu; docs/architecture.md).

    capture_sizes: the decode batch sizes captured at start-up, ascending; a decode batch runs as the
    graph of the next size up (padded), a larger one eagerly. Empty: everything eager. On the CPU
    there is no graph to capture: given sizes (tests) run the same padded path eagerly.
    """

    capture_sizes: tuple[int, ...] = ()

    @classmethod
    def build(cls, enforce_eager: bool, sizes: list[int] | None, max_size: int | None, max_num_seqs: int,
              graphs_native: bool) -> "GraphConfig":
        if enforce_eager or (sizes is None and not graphs_native):
            return cls()
        if sizes is not None and any(s < 1 for s in sizes):
            raise ValueError(f"--cuda-graph-sizes {' '.join(map(str, sizes))}: sizes must be >= 1")
        if max_size is not None and max_size < 1:
            raise ValueError(f"--max-cudagraph-capture-size {max_size} must be >= 1")
        cap = min(max_num_seqs, max_size if max_size is not None else 512)
        if sizes is None:  # vLLM's default: 1, 2, 4, then every multiple of 8
            sizes = [1, 2, 4] + list(range(8, cap + 1, 8))
            if cap not in sizes:
                sizes.append(cap)
        return cls(tuple(sorted({s for s in sizes if s <= cap})))


@dataclass(frozen=True)
class ParallelConfig:
    """The layout (TP x DP ranks, EP over all of them) and which of its global ranks this process hosts.

    Global rank r is TP rank r % tp of DP group r // tp. With `launcher="spawn"` this process is
    `first_rank` and starts `first_rank + 1 .. first_rank + num_local_ranks - 1` itself (one node);
    with `launcher="torchrun"` every rank is its own process, started by torchrun.
    """

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    first_rank: int = 0
    num_local_ranks: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port, on one node only
    headless: bool = False  # this node runs workers only; the HTTP server lives with rank 0
    launcher: str = "spawn"  # spawn | torchrun
    device_index: int | None = None  # torchrun's LOCAL_RANK; spawn: rank - first_rank

    def __post_init__(self):
        for name in ("tensor_parallel_size", "data_parallel_size", "num_local_ranks"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if not 0 <= self.first_rank <= self.world_size - self.num_local_ranks:
            raise ValueError(f"this node's ranks {self.first_rank}..{self.first_rank + self.num_local_ranks - 1} "
                             f"fall outside TP x DP = {self.world_size}; check --node-rank / --nnodes")
        if self.launcher not in ("spawn", "torchrun"):
            raise ValueError(f"launcher {self.launcher!r} must be spawn or torchrun")
        if self.headless and self.first_rank == 0 and self.launcher == "spawn":
            raise ValueError("--headless on the node that hosts rank 0: the HTTP server runs there; drop --headless "
                             "(or give this node --node-rank > 0)")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"--master-port {self.master_port} must be in 1..65535")
        if self.multi_node and self.master_port is None:
            raise ValueError("serving across nodes needs --master-port (node 0's rendezvous port)")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size

    @property
    def expert_parallel_size(self) -> int:
        return self.world_size if self.enable_expert_parallel else 1

    @property
    def multi_node(self) -> bool:
        """Ranks live outside this process tree (other nodes, or torchrun's processes)."""
        return self.launcher == "torchrun" or self.num_local_ranks < self.world_size

    def check_model(self, m: "ModelConfig") -> None:
        """Every split the layout makes divides its dimension; the error names the dimension and sizes that fit."""
        tp, ep = self.tensor_parallel_size, self.expert_parallel_size
        splits = [("num_attention_heads", m.num_attention_heads, tp, "--tensor-parallel-size"),
                  ("vocab_size", m.vocab_size, tp, "--tensor-parallel-size"),
                  ("intermediate_size", m.intermediate_size, tp, "--tensor-parallel-size"),
                  ("moe_intermediate_size x n_shared_experts", m.moe_intermediate_size * m.n_shared_experts, tp,
                   "--tensor-parallel-size")]
        if ep > 1:
            splits.append(("n_routed_experts", m.n_routed_experts, ep,
                           "TP x DP (the expert-parallel size with --enable-expert-parallel)"))
        else:
            splits.append(("moe_intermediate_size", m.moe_intermediate_size, tp, "--tensor-parallel-size "
                           "(routed experts are split over TP without --enable-expert-parallel)"))
        for name, value, parts, flag in splits:
            if value % parts:
                fits = [d for d in (1, 2, 4, 8, 16, 32, 64) if value % d == 0]
                raise ValueError(f"{flag} = {parts} does not divide the model's {name}={value}; "
                                 f"sizes that divide it: {', '.join(map(str, fits))}")


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    dtype: torch.dtype
    device: str
    seed: int = 0
    tokenizer_path: str | None = None
    skip_tokenizer_init: bool = False  # token ids in and out, no text (vLLM's flag)
    load_format: str = "auto"  # auto | safetensors: the checkpoint's weights; dummy: random weights
    graphs: GraphConfig = field(default_factory=GraphConfig)
    structured_outputs: dict = field(default_factory=dict)  # --structured-outputs-config (vLLM's keys)
    max_logprobs: int = 20  # most logprobs / prompt_logprobs per request (--max-logprobs; -1 resolved to vocab)

    def __post_init__(self):
        self.parallel.check_model(self.model)
        limit = self.model.max_position_embeddings
        if self.scheduler.max_model_len > limit:
            raise ValueError(f"--max-model-len {self.scheduler.max_model_len} exceeds the model's max_position_embeddings {limit}")


# ---- quantized checkpoints (glm5_ascend/model/quant.py reads them; docs/checkpoints.md) ----
QUANT_METHODS = ("fp8", "msmodelslim")
MSMODELSLIM_DESCRIPTION = "quant_model_description.json"


def _check_quantization(qc: Any) -> None:
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in QUANT_METHODS:
        raise ValueError(f"config.json: quantization_config.quant_method={method!r} is not supported; this engine "
                         "loads fp8 (GLM-5-FP8) and msmodelslim W8A8_DYNAMIC checkpoints; convert others with "
                         "`glm5-ascend convert SRC DST --to bf16`")
    if method == "fp8":
        fmt, block = qc.get("fmt", "e4m3"), qc.get("weight_block_size")
        if fmt != "e4m3":
            raise ValueError(f"config.json: quantization_config.fmt={fmt!r}; only e4m3 FP8 is supported")
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"config.json: quantization_config.weight_block_size={block!r} must be two positive "
                             "integers, e.g. [128, 128]")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"config.json: quantization_config.activation_scheme={qc['activation_scheme']!r}; "
                             "only dynamic is supported")


def _msmodelslim_quantization(root: Path) -> dict | None:
    """quantization_config for a checkpoint with msmodelslim's description file: its quant type and the
    modules it keeps FLOAT (the model runs every other linear it can in W8A8)."""
    desc = root / MSMODELSLIM_DESCRIPTION
    if not desc.is_file():
        return None
    try:
        types = json.loads(desc.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{desc}: not valid JSON ({e}); re-download the checkpoint") from None
    kind = types.get("model_quant_type") if isinstance(types, dict) else None
    if kind != "W8A8_DYNAMIC":
        raise ValueError(f"{desc}: model_quant_type={kind!r} is not supported; serve a W8A8_DYNAMIC checkpoint "
                         "(glm5-ascend convert SRC DST --to w8a8 writes one)")
    bad = sorted(n for n, t in types.items() if n.endswith(".weight") and t not in ("W8A8_DYNAMIC", "FLOAT"))
    if bad:
        raise ValueError(f"{desc}: tensor {bad[0]} is {types[bad[0]]}; only W8A8_DYNAMIC and FLOAT tensors are "
                         "supported")
    float_modules = sorted(n[:-len(".weight")] for n, t in types.items() if n.endswith(".weight") and t == "FLOAT")
    return {"quant_method": "msmodelslim", "model_quant_type": kind, "float_modules": float_modules}
