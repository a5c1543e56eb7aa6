"""SamplingParams with vLLM's names, defaults and validation messages."""
from __future__ import annotations

from dataclasses import dataclass, field

_EPS = 1e-5
_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """vLLM's structured-output constraint: exactly one of json (a JSON schema, dict or string), regex,
    choice, grammar (EBNF), json_object or structural_tag (xgrammar's JSON form). The engine compiles
    it with xgrammar (engine/structured_outputs.py) and masks every sampled token to it."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    # JSON: forbid properties and items the schema does not declare (xgrammar's strict mode, vLLM's
    # behaviour); response_format json_schema with "strict": false turns it off.
    strict: bool = True
    # Leave the output unconstrained until this token (the reasoning parser's end of thinking, e.g.
    # </think>) has been sampled: reasoning is free text, the answer after it is constrained.
    start_after_token_id: int | None = None

    def __post_init__(self):
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) > 1:
            raise ValueError("You can only use one kind of structured outputs constraint but multiple are "
                             f"specified: {', '.join(given)}.")
        if not given:
            raise ValueError("You must use one kind of structured outputs constraint (json, regex, choice, "
                             "grammar, json_object or structural_tag) but none is specified.")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs choice must be a non-empty list of strings.")
        for k in ("regex", "grammar", "structural_tag"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"structured_outputs {k} must be a non-empty string.")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    logprob_token_ids: list[int] | None = None  # logprobs of these ids at every step, beside the top ones
    structured_outputs: StructuredOutputsParams | None = None
    detokenize: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._verify()

    def _verify(self) -> None:
        def bad(msg: str):
            raise ValueError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not 0.0 < self.repetition_penalty <= 2.0 ** 31:
            bad(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not 0.0 <= self.temperature < float("inf"):
            bad(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < -1):
                bad(f"{name} must be non-negative or -1, got {v}.")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}.")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop cannot contain an empty string.")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            bad("allowed_token_ids must not be empty.")
        if self.logprob_token_ids is not None and (
                not isinstance(self.logprob_token_ids, list)
                or any(not isinstance(t, int) or t < 0 for t in self.logprob_token_ids)):
            bad(f"logprob_token_ids must be a list of non-negative integers, got {self.logprob_token_ids!r}.")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    def clone(self, **changes) -> "SamplingParams":
        import dataclasses
        return dataclasses.replace(self, **changes)
