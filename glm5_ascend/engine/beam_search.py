"""Beam search as vLLM's OpenAI server runs it (`use_beam_search`): over the ordinary engine, a token a step.

Each step runs every live beam as a one-token request asking for the top 2 x beam_width logprobs; with the
prefix cache only the tokens past a beam's last full cached block are computed again. Every candidate (the
beam plus one of those tokens) is scored by its cumulative logprob; the best beam_width go on. A candidate
ending in EOS is set aside as finished. At the end the finished and the live beams are ranked by cumulative
logprob / length ** length_penalty (the length counting the prompt, without a final EOS) and the best
beam_width are the choices, best first.

``BeamSearch`` is that state machine; ``beam_search`` drives it over an AsyncEngine.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.engine.sequence import CompletionOutput, Logprob, RequestOutput


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams: beam_width is the request's n."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam search needs n >= 1 beams, got {self.beam_width}.")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")


@dataclass
class Beam:
    tokens: list[int]  # the prompt and the generated tokens
    cum_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # per generated token, its own first
    finish_reason: str | None = None
    stop_reason: int | None = None


def beam_score(tokens: list[int], cum_logprob: float, eos_token_ids, length_penalty: float) -> float:
    """vLLM's ranking: cumulative logprob over the length (prompt included, a final EOS not) ** length_penalty."""
    n = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    return cum_logprob / (max(n, 1) ** length_penalty)


class BeamSearch:
    """The beams of one prompt. A driver runs ``step_params`` once for each of ``live`` (in order) and hands the
    finished outputs to ``advance``, until ``done``; then ``outputs`` are the choices."""

    def __init__(self, prompt_ids: list[int], params: BeamSearchParams, eos_token_ids, seed: int | None = None):
        self.prompt_len, self.params, self.eos = len(prompt_ids), params, set(eos_token_ids)
        self.live = [Beam(list(prompt_ids))]
        self.finished: list[Beam] = []
        self.steps = 0
        # Raw logprobs rank the candidates; the temperature only picks the one sampled token a step adds to them.
        self.step_params = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width, temperature=params.temperature,
                                          seed=seed, ignore_eos=True, detokenize=False)

    @property
    def done(self) -> bool:
        return not self.live or self.steps >= self.params.max_tokens

    def _key(self, beam: Beam) -> float:
        return beam_score(beam.tokens, beam.cum_logprob, self.eos, self.params.length_penalty)

    def advance(self, outputs: list[RequestOutput]) -> None:
        """One step: ``outputs[i]`` is the one-token output of ``live[i]``."""
        if len(outputs) != len(self.live):
            raise ValueError(f"beam search step got {len(outputs)} outputs for {len(self.live)} beams")
        candidates = []
        for beam, out in zip(self.live, outputs):
            entry = (out.outputs[0].logprobs or [{}])[0]
            for tid, lp in entry.items():
                step = {tid: lp, **{t: v for t, v in entry.items() if t != tid}}  # the chosen token first
                cand = Beam(beam.tokens + [tid], beam.cum_logprob + lp.logprob, beam.logprobs + [step])
                if tid in self.eos and not self.params.ignore_eos:
                    cand.finish_reason, cand.stop_reason = "stop", tid
                    self.finished.append(cand)
                else:
                    candidates.append(cand)
        # sorted() is stable: equal scores keep beam order, then the engine's logprob order.
        self.live = sorted(candidates, key=self._key, reverse=True)[:self.params.beam_width]
        self.steps += 1

    def best(self) -> list[Beam]:
        return sorted(self.finished + self.live, key=self._key, reverse=True)[:self.params.beam_width]

    def outputs(self, decode: Callable[[list[int]], str] | None) -> list[CompletionOutput]:
        """The choices, best first. decode turns generated ids into text (None: no text). A beam that ended
        on EOS lists the EOS id only with include_stop_str_in_output, and never shows its text (vLLM's rule)."""
        outs = []
        for i, beam in enumerate(self.best()):
            ids = beam.tokens[self.prompt_len:]
            text_ids = ids[:-1] if beam.finish_reason == "stop" else ids  # vLLM never shows the EOS's text
            if beam.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                ids = text_ids  # nor, by default, its id (its logprob stays in cumulative_logprob)
            outs.append(CompletionOutput(
                index=i, text=decode(text_ids) if decode is not None else "", token_ids=ids,
                cumulative_logprob=beam.cum_logprob, logprobs=beam.logprobs,
                finish_reason=beam.finish_reason or "length", stop_reason=beam.stop_reason))
        return outs


async def beam_search(engine, prompt_ids: list[int], params: BeamSearchParams, request_id: str, eos_token_ids,
                      decode: Callable[[list[int]], str] | None = None,
                      seed: int | None = None) -> AsyncIterator[RequestOutput]:
    """Beam search over an AsyncEngine: yields one finished RequestOutput holding beam_width choices. Closing it
    aborts the step in flight."""
    search = BeamSearch(prompt_ids, params, eos_token_ids, seed)

    async def last(gen) -> RequestOutput:
        out = None
        async for out in gen:
            pass
        return out

    while not search.done:
        outs = await asyncio.gather(*(
            last(engine.generate(beam.tokens, search.step_params, f"{request_id}-beam{search.steps}-{i}"))
            for i, beam in enumerate(search.live)))
        search.advance(list(outs))
    yield RequestOutput(request_id, None, list(prompt_ids), search.outputs(decode), finished=True)
