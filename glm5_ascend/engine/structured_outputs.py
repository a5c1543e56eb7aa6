"""Structured outputs: grammars compiled by xgrammar, one matcher per sequence, a token bitmask per step.

The engine owns one ``StructuredOutputs`` (the tokenizer's xgrammar TokenizerInfo and a compiler
whose cache keys on the grammar text). The server compiles each request's constraint in its worker
pool first (a bad schema, regex or grammar becomes a 400 before the request is queued); the engine's
own compile at ``add_request`` then hits the cache. Each sequence gets a ``SequenceGrammar``: the
sampler asks it for the next token's bitmask, and the engine feeds it every sampled token.

Preemption keeps a sequence's generated tokens (they are recomputed, not resampled), so its matcher
stays valid and needs no rollback; a finished sequence drops its matcher.
"""
from __future__ import annotations

import json
import logging
import re
import threading

import torch

from glm5_ascend.engine.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s*\S+:\d+:\s*")
_CHECK_FAILED = re.compile(r"Check failed: \(.*?\) is false:\s*")


def _one_line(e: Exception) -> str:
    """xgrammar's C++ errors start with a timestamp and a source path and may span lines."""
    text = _CPP_PREFIX.sub("", str(e)).strip()
    text = _CHECK_FAILED.sub("", text)
    return " ".join(text.split())


class StructuredOutputs:
    """Per-engine xgrammar state; thread-safe (the server's worker pool and the step thread compile)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], disable_any_whitespace: bool = False):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.disable_any_whitespace = disable_any_whitespace  # --structured-outputs-config's, for every request
        self.eos_token_ids = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._compiler = None

    @property
    def compiler(self):
        """Built on first use: the TokenizerInfo reads the whole vocabulary once per engine."""
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.eos_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_limit_bytes=256 << 20)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams):
        """The xgrammar CompiledGrammar of spec (cached); ValueError naming the problem if it is invalid."""
        kind = spec.kind
        try:
            compiled = self._compile(spec, kind)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar raises RuntimeError from C++
            raise ValueError(f"Invalid structured outputs {kind}: {_one_line(e)}") from None
        if self._matches_nothing(compiled):
            raise ValueError(f"Invalid structured outputs {kind}: it matches no text at all (no token can start "
                             "it, and it does not accept an empty answer)")
        return compiled

    def _matches_nothing(self, compiled) -> bool:
        import xgrammar as xgr
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask)
        return not bool(bitmask.any())

    def _compile(self, spec: StructuredOutputsParams, kind: str):
        c = self.compiler
        no_space = spec.disable_any_whitespace or self.disable_any_whitespace
        if kind == "json":
            schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
            try:
                parsed = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the schema is not valid JSON ({e})") from None
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
            return c.compile_json_schema(schema, any_whitespace=not no_space, strict_mode=spec.strict)
        if kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=not no_space)
        if kind == "regex":
            return c.compile_regex(spec.regex)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(
                json.dumps(choice, ensure_ascii=False) for choice in spec.choice))
        if kind == "grammar":
            return c.compile_grammar(spec.grammar)
        return c.compile_structural_tag(spec.structural_tag)

    def warm_up(self, device: torch.device) -> None:
        """Compile the device's bitmask kernel now (xgrammar's Triton kernel on CUDA compiles on first
        use, seconds), not on the first constrained request."""
        if device.type == "cpu":
            return
        logits = torch.zeros(2, self.vocab_size, device=device)
        apply_bitmask(logits, [0], [_AllowAll()])
        apply_bitmask(logits, [0, 1], [_AllowAll(), _AllowAll()])

    def sequence_grammar(self, spec: StructuredOutputsParams) -> "SequenceGrammar":
        import xgrammar as xgr
        return SequenceGrammar(xgr.GrammarMatcher(self.compile(spec)), spec.start_after_token_id)


class SequenceGrammar:
    """One sequence's matcher. Inactive until start_after_token_id is sampled (when set), and again
    once the grammar has ended (it accepted a stop token) or broke (a token it could not accept,
    e.g. min_tokens banned the only allowed EOS): from there the sequence samples freely, as vLLM's."""

    __slots__ = ("matcher", "start_after", "started", "failed")

    def __init__(self, matcher, start_after: int | None):
        self.matcher, self.start_after = matcher, start_after
        self.started = start_after is None
        self.failed = False

    @property
    def active(self) -> bool:
        return self.started and not self.failed and not self.matcher.is_terminated()

    def accept(self, token: int) -> None:
        if not self.started:
            self.started = token == self.start_after
            return
        if self.failed or self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token):
            logger.warning("structured outputs: the grammar cannot accept sampled token %d (the request's "
                           "other constraints leave no token it allows); the rest is unconstrained", token)
            self.failed = True


class _AllowAll:
    """A stand-in grammar for warm-up: its bitmask stays all ones."""

    class matcher:  # noqa: N801 - mimics SequenceGrammar.matcher
        @staticmethod
        def fill_next_token_bitmask(bitmask, index):
            return False


def apply_bitmask(logits: torch.Tensor, rows: list[int], grammars: list[SequenceGrammar]) -> None:
    """Mask logits[rows] (float32 [B, V], in place) to the tokens each grammar allows next.

    The bitmasks are filled on the host (one int32 row of ceil(V / 32) words per constrained row), sent
    to the device in one copy and applied there to the constrained rows only."""
    import xgrammar as xgr
    B, V = logits.shape
    if logits.device.type == "cpu":  # xgrammar's CPU kernel masks the indexed rows in place
        bitmask = xgr.allocate_token_bitmask(B, V)
        for i, g in zip(rows, grammars):
            g.matcher.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=V, indices=rows)
        return
    bitmask = xgr.allocate_token_bitmask(len(rows), V)  # only the constrained rows cross to the device
    for j, g in enumerate(grammars):
        g.matcher.fill_next_token_bitmask(bitmask, j)
    bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    if len(rows) == B:
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=V)
        return
    idx = torch.tensor(rows, dtype=torch.long).pin_memory().to(logits.device, non_blocking=True)
    sub = logits.index_select(0, idx)
    xgr.apply_token_bitmask_inplace(sub, bitmask, vocab_size=V)
    logits.index_copy_(0, idx, sub)


def tool_call_structural_tag(tools: list[dict], choice, parallel_tool_calls: bool,
                             disable_any_whitespace: bool = False) -> str:
    """The structural tag (JSON) that forces GLM-4.7 / GLM-5 tool calls
    (``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>``) whose arguments
    follow each tool's parameter schema: one call of the named tool (choice a name), or under
    "required" one or more calls (just one without parallel_tool_calls) and no other text.

    tools: OpenAI function tools ({"type": "function", "function": {name, parameters}}).
    The markers are matched as the tokenizer's dedicated special tokens (what the glm47 parser reads).
    disable_any_whitespace: at most one whitespace character (GLM's newline) between the parts."""
    ws = 1 if disable_any_whitespace else None
    import xgrammar as xgr
    from xgrammar.structural_tag import OrFormat, TagFormat, TagsWithSeparatorFormat
    if isinstance(choice, str):  # "required": xgrammar's glm_4_7 tags, minus the free text around them
        st = xgr.get_model_structural_tag("glm_4_7", tools=tools, tool_choice="required", reasoning="disabled",
                                          token_markers=True, max_whitespace_cnt=ws)
        tags = st.format.tags  # one per tool, each <tool_call> NAME ARGS </tool_call>
        call = TagFormat(begin=tags[0].begin, content=OrFormat(elements=[t.content for t in tags]), end=tags[0].end)
        st.format = TagsWithSeparatorFormat(tags=[call], separator="\n", at_least_one=True,
                                            stop_after_first=not parallel_tool_calls)
        return st.model_dump_json()
    st = xgr.get_model_structural_tag("glm_4_7", tools=tools, reasoning="disabled",
                                      tool_choice={"type": "function", "function": {"name": choice["name"]}},
                                      token_markers=True, max_whitespace_cnt=ws)
    return st.model_dump_json()
