"""Batched token sampling with vLLM's semantics.

Order: logit_bias / allowed_token_ids, min_tokens, penalties, then greedy argmax or temperature,
min_p, top_k, top_p and a draw. Logprobs are those of the raw model distribution (vLLM's default),
taken before any of these steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glm5_ascend.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # raw logprob of each sampled token
    top: list[tuple[list[int], list[float], int] | None]  # (top ids, top logprobs, sampled rank)


class Sampler:
    def __init__(self, eos_token_ids: set[int], generator: torch.Generator):
        self.eos_token_ids = eos_token_ids
        self.generator = generator

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: float32 [B, V], one row per sequence being sampled."""
        B, V = logits.shape
        raw = torch.log_softmax(logits, dim=-1)
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            self._process_row(logits, i, seq, V)
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=logits.device)
        greedy = temps < 1e-5
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            rows = (~greedy).nonzero().flatten().tolist()
            probs = self._probs(logits[rows] / temps[rows, None], [seqs[r].params for r in rows])
            q = torch.empty_like(probs)
            for j, r in enumerate(rows):
                q[j].exponential_(generator=seqs[r].generator or self.generator)
            tokens[rows] = (probs / q).argmax(dim=-1)
        sampled_lp = raw.gather(1, tokens[:, None]).squeeze(1)
        top = self._top_logprobs(raw, tokens, sampled_lp, seqs)
        return SampleResult(tokens.tolist(), sampled_lp.tolist(), top)

    def _process_row(self, logits: torch.Tensor, i: int, seq: Sequence, V: int) -> None:
        p = seq.params
        row = logits[i]
        if p.allowed_token_ids is not None:
            mask = torch.full_like(row, float("-inf"))
            ids = torch.tensor([t for t in p.allowed_token_ids if 0 <= t < V], dtype=torch.long, device=row.device)
            mask[ids] = 0.0
            row += mask
        if p.logit_bias:
            for tok, bias in p.logit_bias.items():
                if 0 <= tok < V:
                    row[tok] += bias
        if seq.num_output_tokens < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            ids = [t for t in banned if 0 <= t < V]
            if ids:
                row[ids] = float("-inf")
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            self._penalize(row, seq, V)

    @staticmethod
    def _penalize(row: torch.Tensor, seq: Sequence, V: int) -> None:
        p = seq.params
        out = torch.tensor(seq.output_ids, dtype=torch.long, device=row.device)
        counts = torch.bincount(out[out < V], minlength=V).to(row.dtype) if out.numel() else torch.zeros_like(row)
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            prompt = torch.tensor(seq.token_ids[: seq.num_prompt_tokens], dtype=torch.long, device=row.device)
            seen[prompt[prompt < V]] = True
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalized, row))
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _probs(logits: torch.Tensor, params) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)
        for j, p in enumerate(params):
            row = probs[j]
            if p.min_p > 0:
                row[row < p.min_p * row.max()] = 0.0
            if p.top_k and p.top_k < row.numel():
                kth = row.topk(p.top_k).values[-1]
                row[row < kth] = 0.0
            if p.top_p < 1.0:
                sorted_p, idx = row.sort(descending=True)
                cum = sorted_p.cumsum(0)
                drop = (cum - sorted_p) > p.top_p * cum[-1]  # keep the smallest set reaching top_p
                row[idx[drop]] = 0.0
        return probs / probs.sum(-1, keepdim=True)

    @staticmethod
    def _top_logprobs(raw, tokens, sampled_lp, seqs):
        wants = [s.params.logprobs for s in seqs]
        if all(w is None for w in wants):
            return [None] * len(seqs)
        k = max(w or 0 for w in wants)
        top_lp, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], tokens[:, None][:, :0])
        ranks = (raw > sampled_lp[:, None]).sum(-1) + 1
        out = []
        for i, w in enumerate(wants):
            if w is None:
                out.append(None)
            else:
                out.append((top_ids[i, :w].tolist(), top_lp[i, :w].tolist(), int(ranks[i])))
        return out
