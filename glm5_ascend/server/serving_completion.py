"""/v1/completions: prompts (text, token ids, or a list of either) in, choices out, streamed or not."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from glm5_ascend.engine.beam_search import BeamSearchParams
from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.engine.sequence import RequestOutput
from glm5_ascend.server.errors import BadRequest
from glm5_ascend.server.outputs import ChoiceStream, cached_tokens, completion_logprobs, prompt_logprobs_json, sse
from glm5_ascend.server.outputs import stream_usage, timing_metrics, usage
from glm5_ascend.server.protocol import CompletionRequest
from glm5_ascend.server.serving_tokens import ServingContext

@dataclass
class _Prompt:
    text: str | None  # what echo shows (the prompt's text; decoded ids); None without echo
    ids: list[int]
    params: SamplingParams
    echo_only: bool = False  # echo with max_tokens=0 (scoring a prompt): one token is run, none is shown
    beam: BeamSearchParams | None = None


async def merge(gens: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(index, item) from several async generators as items arrive; cancelling it cancels them all."""
    if len(gens) == 1:
        async for item in gens[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator) -> None:
        try:
            async for item in gen:
                await queue.put((i, item))
            await queue.put((i, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class CompletionServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def prepare(self, req: CompletionRequest) -> list[_Prompt]:
        """Tokenize and check every prompt; all are refused before any is queued."""
        ctx = self.ctx
        if req.suffix:
            raise BadRequest("suffix is not currently supported", param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise BadRequest("best_of is not supported; drop it or set it equal to n.", param="best_of")
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)) or raw == []:
            raw = [raw]
        prompts = []
        for p in raw:
            ids = ctx.encode(p, req.add_special_tokens is not False) if isinstance(p, str) else list(p)
            ids = ctx.truncate(ids, req.truncate_prompt_tokens, req.truncation_side)
            ctx.check_ids(ids)
            echo_only = bool(req.echo) and req.max_tokens == 0
            max_tokens = 1 if echo_only else ctx.max_tokens(len(ids), req.max_tokens)
            prompt_lp = req.prompt_logprobs
            if req.echo and req.logprobs is not None:
                prompt_lp = max(prompt_lp or 0, req.logprobs)  # echoed tokens carry logprobs too
            if echo_only:
                ctx.max_tokens(len(ids), 1)  # the prompt must still fit
                if req.logprob_token_ids:
                    raise BadRequest("logprob_token_ids needs generated tokens, and echo with max_tokens=0 generates "
                                     "none; drop it or ask for tokens.", param="logprob_token_ids")
            params = ctx.sampling_params(req, max_tokens, req.logprobs, prompt_lp)
            echo_text = (p if isinstance(p, str) else ctx.tok.decode(ids)) if req.echo else None
            prompts.append(_Prompt(echo_text, ids, params, echo_only, ctx.beam_params(req, params)))
        return prompts

    @staticmethod
    def _shown(req: CompletionRequest) -> int:
        """How many logprobs a token shows besides its own: the top `logprobs`, or every pinned id (-1)."""
        return -1 if req.logprob_token_ids else req.logprobs

    def _prompt_text(self, p: _Prompt) -> str:
        return p.text or ""

    async def generate(self, req: CompletionRequest, request_id: str) -> tuple[list[_Prompt], AsyncIterator]:
        raw = req.prompt
        for p in [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []:
            if isinstance(p, str):  # refused before any of the prompts is tokenized
                self.ctx.reject_long_text(len(p))
        prompts = await self.ctx.off_loop(self.prepare, req)
        # The engine gets token ids only: no copy of the prompt text outlives tokenization there.
        gens = [self.ctx.generate(p.ids, p.params, p.beam, request_id) for p in prompts]
        return prompts, merge(gens)

    # ---------------------------------------------------------------- one response
    async def full(self, req: CompletionRequest, request_id: str, model: str) -> dict:
        prompts, stream = await self.generate(req, request_id)
        finals: dict[int, RequestOutput] = {}
        async for i, out in stream:
            finals[i] = out
        choices, completion_tokens = [], 0
        for i, p in enumerate(prompts):
            out = finals[i]
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                choices.append(self._choice(req, p, out, o, i * p.params.n + o.index))
        n_prompt = sum(len(p.ids) for p in prompts)
        return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": choices,
                "usage": usage(n_prompt, completion_tokens, cached_tokens(self.ctx, finals.values())),
                "system_fingerprint": None, "service_tier": None, "kv_transfer_params": None,
                "metrics": self._metrics(prompts, finals.get(0), completion_tokens)}

    def _metrics(self, prompts: list[_Prompt], out: RequestOutput | None, n_tokens: int) -> dict | None:
        """--enable-per-request-metrics: for one prompt and one choice only, as vLLM."""
        if not self.ctx.per_request_metrics or len(prompts) != 1 or prompts[0].params.n != 1 or out is None:
            return None
        return timing_metrics(out, n_tokens)

    def _choice(self, req, p: _Prompt, out: RequestOutput, o, index: int) -> dict:
        ctx, as_id = self.ctx, self.ctx.as_ids(req)
        text = "" if p.echo_only else o.text
        logprobs = None
        if req.echo:
            text = self._prompt_text(p) + text
        if req.logprobs is not None:
            ids, entries = ([], []) if p.echo_only else (list(o.token_ids), list(o.logprobs or []))
            if req.echo:
                prompt_entries = out.prompt_logprobs or [None] * len(p.ids)
                ids, entries = p.ids + ids, list(prompt_entries) + entries
            logprobs = completion_logprobs(ctx, ids, entries, self._shown(req), 0, as_id)
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": o.finish_reason,
                  "stop_reason": o.stop_reason,
                  "prompt_logprobs": prompt_logprobs_json(ctx, out.prompt_logprobs) if req.prompt_logprobs
                  is not None else None}
        asked = bool(req.return_token_ids)
        choice["token_ids"], choice["prompt_token_ids"] = (list(o.token_ids), list(p.ids)) if asked else (None, None)
        return choice

    # ---------------------------------------------------------------- streaming
    async def stream(self, req: CompletionRequest, request_id: str, model: str) -> AsyncIterator[str]:
        """SSE events; the caller adds errors and ``[DONE]``. Validation errors raise before the first event."""
        prompts, outputs = await self.generate(req, request_id)
        return self._events(req, request_id, model, prompts, outputs)

    async def _events(self, req, request_id, model, prompts, outputs) -> AsyncIterator[str]:
        ctx, created, as_id = self.ctx, int(time.time()), self.ctx.as_ids(req)
        include_usage, continuous = stream_usage(req.stream_options, ctx.force_include_usage)
        n = prompts[0].params.n
        head = {"id": request_id, "object": "text_completion", "created": created, "model": model}
        states: dict[int, ChoiceStream] = {}
        offsets: dict[int, int] = {}  # text_offset of each choice's next logprob token
        last: dict[int, RequestOutput] = {}  # each prompt's latest output
        async for i, out in outputs:
            p, last[i] = prompts[i], out
            for o in out.outputs:
                index = i * n + o.index
                state = states.setdefault(index, ChoiceStream())
                if state.done:
                    continue
                delta, new_ids, entries = state.advance(o)
                if p.echo_only:  # the one token run to score the prompt is not shown
                    delta, new_ids, entries = "", [], []
                if not delta and not new_ids and not o.finish_reason:
                    continue
                first, state.started = not state.started, True
                prefix = self._prompt_text(p) if req.echo and first else ""
                logprobs = None
                if req.logprobs is not None:
                    ids = new_ids
                    if req.echo and first:
                        ids = p.ids + ids
                        entries = list(out.prompt_logprobs or [None] * len(p.ids)) + entries
                    logprobs = completion_logprobs(ctx, ids, entries, self._shown(req), offsets.get(index, 0), as_id)
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
                choice = {"index": index, "text": prefix + delta, "logprobs": logprobs,
                          "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                choice["token_ids"] = new_ids if req.return_token_ids else None
                choice["prompt_token_ids"] = list(p.ids) if req.return_token_ids and first else None
                body = {**head, "choices": [choice],
                        "usage": usage(len(p.ids), len(o.token_ids)) if continuous else None}
                yield sse(body)
        if include_usage:
            n_tokens = sum(s.tokens for s in states.values())
            total = usage(sum(len(p.ids) for p in prompts), n_tokens, cached_tokens(ctx, last.values()))
            final = {**head, "choices": [], "usage": total}
            metrics = self._metrics(prompts, last.get(0), n_tokens)
            if metrics is not None:
                final["metrics"] = metrics
            yield sse(final)
