"""/v1/chat/completions: chat template in; content, reasoning (glm45) and tool calls (glm47) out.

The same ``ChoiceParser`` turns model text into message parts for the streamed and
the whole response, so tests can feed it synthetic GLM-5 text and check exactly
what a client would see.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from glm5_ascend.engine.beam_search import BeamSearchParams
from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.server.errors import BadRequest
from glm5_ascend.server.limits import text_chars
from glm5_ascend.server.outputs import ChoiceStream, cached_tokens, chat_logprobs, prompt_logprobs_json, sse
from glm5_ascend.server.outputs import stream_usage, timing_metrics, usage
from glm5_ascend.server.protocol import ChatCompletionRequest, NamedToolChoice
from glm5_ascend.server.reasoning import get_reasoning_parser
from glm5_ascend.server.serving_tokens import ServingContext
from glm5_ascend.server.tool_parsers import get_tool_parser

DEFAULT_TOOL_PARSER = "glm47"  # parses `required` / named tool choice when no --tool-call-parser is set


# -------------------------------------------------------------------- model text -> message parts
class ChoiceParser:
    """Splits one choice's text into reasoning, content and tool calls (one-shot or streamed)."""

    def __init__(self, reasoning_parser: str | None, tool_parser: str | None, tools=None,
                 chat_template_kwargs: dict | None = None):
        self.reasoning = (get_reasoning_parser(reasoning_parser).from_chat_template_kwargs(chat_template_kwargs)
                          if reasoning_parser else None)
        self.tools = get_tool_parser(tool_parser)(tools) if tool_parser else None

    def parse(self, text: str) -> dict:
        """The whole message: {"reasoning", "content", "tool_calls"} (tool_calls a list, maybe empty)."""
        reasoning, content = self.reasoning.extract_reasoning(text) if self.reasoning else (None, text)
        calls = []
        if self.tools is not None and content:
            result = self.tools.extract_tool_calls(content)
            if result.tools_called:
                content = result.content
                calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                         for c in result.tool_calls]
        return {"reasoning": reasoning, "content": content, "tool_calls": calls}

    def feed(self, delta: str) -> dict:
        """A streamed delta's parts: any of "reasoning", "content", "tool_calls" (only non-empty ones)."""
        reasoning, content = self.reasoning.extract_streaming(delta) if self.reasoning else (None, delta)
        return self._content(reasoning, content)

    def finish(self) -> dict:
        """End of the choice: flush text the parsers held back."""
        reasoning, content = self.reasoning.finish() if self.reasoning else (None, None)
        parts = self._content(reasoning, content)
        if self.tools is not None:
            _merge(parts, self._tool_parts(self.tools.finish()))
        return parts

    @property
    def called_tools(self) -> bool:
        return bool(self.tools is not None and self.tools.streamed_tool_calls)

    def _content(self, reasoning: str | None, content: str | None) -> dict:
        parts = {"reasoning": reasoning} if reasoning else {}
        if content and self.tools is not None:
            _merge(parts, self._tool_parts(self.tools.extract_streaming(content)))
        elif content:
            parts["content"] = content
        return parts

    @staticmethod
    def _tool_parts(result) -> dict:
        parts = {"content": result.content} if result.content else {}
        calls = []
        for d in result.tool_calls:
            call = {"index": d.index}
            if d.id is not None:
                call.update(id=d.id, type=d.type or "function")
            fn = {k: v for k, v in (("name", d.name), ("arguments", d.arguments)) if v is not None}
            call["function"] = fn
            calls.append(call)
        if calls:
            parts["tool_calls"] = calls
        return parts


def _merge(parts: dict, more: dict) -> None:
    for key, value in more.items():
        if key == "tool_calls":
            parts.setdefault("tool_calls", []).extend(value)
        else:
            parts[key] = parts.get(key, "") + value


def _first_call_only(parts: dict) -> None:
    """parallel_tool_calls=false: only the first call is reported (vLLM keeps the first)."""
    calls = [c for c in parts.get("tool_calls", []) if c["index"] == 0]
    if calls:
        parts["tool_calls"] = calls
    else:
        parts.pop("tool_calls", None)


def delta_message(parts: dict) -> dict:
    """Streamed parts as an OpenAI delta; reasoning goes under both of vLLM's names."""
    delta = {}
    if parts.get("reasoning"):
        delta["reasoning"] = delta["reasoning_content"] = parts["reasoning"]
    if parts.get("content"):
        delta["content"] = parts["content"]
    if parts.get("tool_calls"):
        delta["tool_calls"] = parts["tool_calls"]
    return delta


# -------------------------------------------------------------------- the route
@dataclass
class _Prepared:
    ids: list[int]
    params: SamplingParams
    role: str
    tool_parser: str | None
    echo_text: str | None
    beam: BeamSearchParams | None = None


class ChatServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def prepare(self, req: ChatCompletionRequest) -> _Prepared:
        ctx = self.ctx
        tool_parser = self._tool_parser(req)
        text = ctx.render_chat(req)
        ids = ctx.truncate(ctx.encode(text, bool(req.add_special_tokens)), req.truncate_prompt_tokens,
                           req.truncation_side)
        ctx.check_ids(ids, param="messages")
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = ctx.max_tokens(len(ids), requested)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        # The parsers read <think>/<tool_call> markup, which the tokenizer may count as special tokens.
        keep_special = bool(ctx.reasoning_parser or tool_parser)
        params = ctx.sampling_params(req, max_tokens, logprobs, req.prompt_logprobs,
                                     skip_special_tokens=False if keep_special else None)
        role = "assistant" if req.add_generation_prompt else req.messages[-1].role
        echo_text = None
        last = req.messages[-1]
        if req.echo and last.role == role and last.content:
            echo_text = last.content if isinstance(last.content, str) else "\n".join(
                p.get("text", "") for p in last.content if isinstance(p, dict))
        return _Prepared(ids, params, role, tool_parser, echo_text, ctx.beam_params(req, params))

    def _tool_parser(self, req: ChatCompletionRequest) -> str | None:
        ctx, choice = self.ctx, req.tool_choice
        if not req.tools or choice == "none":
            return None
        if choice == "auto" and not (ctx.enable_auto_tool_choice and ctx.tool_parser):
            raise BadRequest('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                             param="tool_choice")
        return ctx.tool_parser or DEFAULT_TOOL_PARSER

    def _parser(self, req: ChatCompletionRequest, prep: _Prepared) -> ChoiceParser:
        return ChoiceParser(self.ctx.reasoning_parser, prep.tool_parser, req.tools, self.ctx.chat_template_kwargs(req))

    @staticmethod
    def _finish_reason(req: ChatCompletionRequest, reason: str | None, called: bool, streaming: bool) -> str | None:
        """vLLM: auto / required calls end with "tool_calls", a named one with "stop". The one-shot
        answer says "tool_calls" for auto calls whatever stopped the text; the stream only on a stop."""
        if not called or isinstance(req.tool_choice, NamedToolChoice):
            return reason
        if reason == "stop" or (not streaming and req.tool_choice != "required" and reason is not None):
            return "tool_calls"
        return reason

    def _logprobs(self, req, token_ids: list[int], entries: list) -> dict:
        k = -1 if req.logprob_token_ids else req.top_logprobs or 0  # pinned ids: all of them, after the token
        return chat_logprobs(self.ctx, token_ids, entries, k, self.ctx.as_ids(req))

    # ---------------------------------------------------------------- one response
    async def _prepare(self, req: ChatCompletionRequest) -> _Prepared:
        """Refuse a chat whose message text alone is too long, then render and tokenize it in the pool."""
        self.ctx.reject_long_text(sum(text_chars(m.content) for m in req.messages), "messages", len(req.messages))
        return await self.ctx.off_loop(self.prepare, req)

    async def full(self, req: ChatCompletionRequest, request_id: str, model: str) -> dict:
        prep = await self._prepare(req)
        final = None
        async for out in self.ctx.generate(prep.ids, prep.params, prep.beam, request_id):
            final = out
        choices, completion_tokens = [], 0
        for o in final.outputs:
            completion_tokens += len(o.token_ids)
            parts = self._parser(req, prep).parse(o.text)
            if req.parallel_tool_calls is False:
                parts["tool_calls"] = parts["tool_calls"][:1]
            content = parts["content"]
            if prep.echo_text:
                content = prep.echo_text + (content or "")
            if content is None and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)):
                content = ""  # vLLM answers forced tool choices with empty, not null, content
            message = {"role": prep.role, "content": content, "refusal": None, "annotations": None,
                       "audio": None, "function_call": None, "tool_calls": parts["tool_calls"],
                       "reasoning": parts["reasoning"], "reasoning_content": parts["reasoning"]}
            choice = {"index": o.index, "message": message,
                      "logprobs": self._logprobs(req, o.token_ids, o.logprobs or []) if req.logprobs else None,
                      "finish_reason": self._finish_reason(req, o.finish_reason, bool(parts["tool_calls"]), False),
                      "stop_reason": o.stop_reason,
                      "token_ids": list(o.token_ids) if req.return_token_ids else None}
            choices.append(choice)
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": choices, "usage": usage(len(prep.ids), completion_tokens, cached_tokens(self.ctx, [final])),
                "system_fingerprint": None, "service_tier": None, "kv_transfer_params": None,
                "prompt_logprobs": (prompt_logprobs_json(self.ctx, final.prompt_logprobs)
                                    if req.prompt_logprobs is not None else None),
                "prompt_token_ids": list(prep.ids) if req.return_token_ids else None,
                "metrics": self._metrics(prep, final, completion_tokens)}

    def _metrics(self, prep: _Prepared, final, n_tokens: int) -> dict | None:
        """--enable-per-request-metrics: for one choice only, as vLLM."""
        if not self.ctx.per_request_metrics or prep.params.n != 1 or final is None:
            return None
        return timing_metrics(final, n_tokens)

    # ---------------------------------------------------------------- streaming
    async def stream(self, req: ChatCompletionRequest, request_id: str, model: str) -> AsyncIterator[str]:
        """SSE events; the caller adds errors and ``[DONE]``. Validation errors raise before the first event."""
        prep = await self._prepare(req)
        return self._events(req, prep, request_id, model)

    async def _events(self, req, prep: _Prepared, request_id: str, model: str) -> AsyncIterator[str]:
        ctx, created, n = self.ctx, int(time.time()), prep.params.n
        include_usage, continuous = stream_usage(req.stream_options, ctx.force_include_usage)
        n_prompt = len(prep.ids)
        head = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(index: int, delta: dict, finish=None, stop_reason=None, logprobs=None, tokens=None,
                  n_tokens: int = 0, first: bool = False) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop_reason
            choice["token_ids"] = tokens
            body = {**head, "choices": [choice], "usage": usage(n_prompt, n_tokens) if continuous else None}
            if first:  # vLLM's first chunk carries the prompt's ids (null unless return_token_ids)
                body["prompt_token_ids"] = list(prep.ids) if req.return_token_ids else None
            return sse(body)

        def opening():
            for i in range(n):
                yield chunk(i, {"role": prep.role, "content": ""}, first=i == 0)
                if prep.echo_text:
                    yield chunk(i, {"content": prep.echo_text})

        parsers = [self._parser(req, prep) for _ in range(n)]
        states = [ChoiceStream() for _ in range(n)]
        opened, final = False, None
        async for out in ctx.generate(prep.ids, prep.params, prep.beam, request_id):
            final = out
            if not opened:  # like vLLM, the role chunk comes with the first output, after prefill
                opened = True
                for c in opening():
                    yield c
            for o in out.outputs:
                i, state = o.index, states[o.index]
                if state.done:
                    continue
                delta, new_ids, entries = state.advance(o)
                parts = parsers[i].feed(delta)
                logprobs = self._logprobs(req, new_ids, entries) if req.logprobs and new_ids else None
                tokens = new_ids if req.return_token_ids else None
                reason = None
                if o.finish_reason:
                    _merge(parts, parsers[i].finish())
                    reason = self._finish_reason(req, o.finish_reason, parsers[i].called_tools, True)
                if req.parallel_tool_calls is False:
                    _first_call_only(parts)
                # A held-back delta (stop string, parser markup) still reports its tokens' logprobs and ids.
                if parts or logprobs or reason or tokens:
                    yield chunk(i, delta_message(parts), reason, o.stop_reason, logprobs, tokens, len(o.token_ids))
        if include_usage:
            n_tokens = sum(s.tokens for s in states)
            body = {**head, "choices": [], "usage": usage(n_prompt, n_tokens, cached_tokens(ctx, [final]))}
            metrics = self._metrics(prep, final, n_tokens)
            if metrics is not None:
                body["metrics"] = metrics
            yield sse(body)
