"""Batched token sampling with vLLM's semantics, vectorized on the device.

Order: the structured-output bitmask (constrained rows only), then logit_bias / allowed_token_ids,
min_tokens, penalties, then greedy argmax or temperature, min_p, top_k, top_p and a draw. Logprobs
are those of the model's distribution after the bitmask (vLLM applies it before its sampler) and
before every other step.

Per step, the host only walks the batch's parameters into a few small tensors (one copy each to the
device); every row is processed by the same batched ops, and the results come back in one copy at
the end. A seeded request draws its noise from its own generator, so its tokens do not depend on
its batch-mates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glm5_ascend.engine.sequence import Sequence
from glm5_ascend.engine.structured_outputs import apply_bitmask

_EPS = 1e-5


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # logprob of each sampled token (0.0 where the row asks for no logprobs)
    top: list[tuple[list[int], list[float], int] | None]  # (top ids, top logprobs, sampled rank)
    pinned: list[tuple[list[int], list[float], list[int]] | None] | None = None  # logprob_token_ids: ids, lps, ranks


class Sampler:
    def __init__(self, eos_token_ids: set[int], generator: torch.Generator):
        self.eos_token_ids = eos_token_ids
        self.generator = generator

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: float32 [B, V], one row per sequence being sampled; the constrained rows are masked in
        place (the step's logits have no other reader)."""
        B, V = logits.shape
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None and s.grammar.active]
        if constrained:
            apply_bitmask(logits, constrained, [seqs[i].grammar for i in constrained])
        work = logits.clone(memory_format=torch.contiguous_format) if any(_processed(s) for s in seqs) else logits
        self._mask_and_bias(work, seqs, V)
        self._penalize(work, seqs, V)
        tokens = work.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if s.params.temperature >= _EPS]
        if random_rows:
            self._draw(work, tokens, seqs, random_rows)
        return self._results(logits, tokens, seqs)

    # ---------------------------------------------------------------- logit processing
    def _mask_and_bias(self, logits: torch.Tensor, seqs: list[Sequence], V: int) -> None:
        """allowed_token_ids, then logit_bias, then min_tokens' ban on EOS and stop tokens: each one
        scatter over the (row, token) pairs of every row that asks for it."""
        allow_r, allow_t, bias_r, bias_t, bias_v, ban_r, ban_t = [], [], [], [], [], [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.allowed_token_ids is not None:
                ids = [t for t in p.allowed_token_ids if 0 <= t < V]
                allow_r.append(i)
                allow_t.append(ids)
            if p.logit_bias:
                for tok, bias in p.logit_bias.items():
                    if 0 <= tok < V:
                        bias_r.append(i)
                        bias_t.append(tok)
                        bias_v.append(bias)
            if seq.num_output_tokens < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
                for t in banned:
                    if 0 <= t < V:
                        ban_r.append(i)
                        ban_t.append(t)
        dev = logits.device
        if allow_r:
            rows = _dev(torch.tensor(allow_r), dev)
            local = [j for j, ids in enumerate(allow_t) for _ in ids]
            mask = torch.full((len(allow_r), V), float("-inf"), device=dev)
            mask[_dev(torch.tensor(local, dtype=torch.long), dev),
                 _dev(torch.tensor([t for ids in allow_t for t in ids], dtype=torch.long), dev)] = 0.0
            logits.index_add_(0, rows, mask)
        if bias_r:
            logits.index_put_((_dev(torch.tensor(bias_r), dev), _dev(torch.tensor(bias_t), dev)),
                              _dev(torch.tensor(bias_v, dtype=logits.dtype), dev), accumulate=True)
        if ban_r:
            logits.index_put_((_dev(torch.tensor(ban_r), dev), _dev(torch.tensor(ban_t), dev)),
                              torch.tensor(float("-inf"), device=dev))

    @staticmethod
    def _penalize(logits: torch.Tensor, seqs: list[Sequence], V: int) -> None:
        """Repetition (prompt and output tokens), frequency and presence penalties, for the rows that set
        any: scatters over the flat (row, token) positions of those tokens only, never a [B, V] pass."""
        rep_pos, rep_val, out_pos, freq, pres = [], [], [], [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty:
                continue
            out = [i * V + t for t in seq.output_ids if t < V]
            if p.repetition_penalty != 1.0:
                seen = set(out).union(i * V + t for t in seq.token_ids[: seq.num_prompt_tokens] if t < V)
                rep_pos.extend(seen)
                rep_val.extend([p.repetition_penalty] * len(seen))
            if p.frequency_penalty or p.presence_penalty:
                out_pos.extend(out)
                freq.extend([-p.frequency_penalty] * len(out))
                pres.extend((pos, -p.presence_penalty) for pos in set(out))
        flat, dev = logits.view(-1), logits.device
        if rep_pos:
            pos = _dev(torch.tensor(rep_pos, dtype=torch.long), dev)
            rep = _dev(torch.tensor(rep_val, dtype=logits.dtype), dev)
            vals = flat.index_select(0, pos)
            flat.index_copy_(0, pos, torch.where(vals > 0, vals / rep, vals * rep))
        if out_pos:
            flat.index_add_(0, _dev(torch.tensor(out_pos, dtype=torch.long), dev),
                            _dev(torch.tensor(freq, dtype=logits.dtype), dev))
            flat.index_add_(0, _dev(torch.tensor([q for q, _ in pres], dtype=torch.long), dev),
                            _dev(torch.tensor([v for _, v in pres], dtype=logits.dtype), dev))

    # ---------------------------------------------------------------- random sampling
    def _draw(self, logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        """Temperature, min_p, top_k, top_p and an exponential-race draw for the non-greedy rows."""
        dev, V = logits.device, logits.shape[1]
        params = [seqs[i].params for i in rows]
        scal = _dev(torch.tensor([(p.temperature, p.min_p, p.top_k if 0 < p.top_k < V else V, p.top_p)
                                  for p in params], dtype=torch.float32), dev)
        temp, min_p, top_k, top_p = scal.unbind(1)
        idx = _dev(torch.tensor(rows), dev)
        probs = torch.softmax(logits.index_select(0, idx) / temp[:, None], dim=-1)
        use_min_p = any(p.min_p > 0 for p in params)
        use_top_k = any(0 < p.top_k < V for p in params)
        use_top_p = any(p.top_p < 1.0 for p in params)
        if use_min_p or use_top_k or use_top_p:
            # One sort serves all three: each keeps a prefix of the sorted order. When every row has a
            # top_k, that prefix is at most the largest k long: a partial sort (topk) is enough.
            if all(0 < p.top_k < V for p in params):
                sp, order = probs.topk(max(p.top_k for p in params), dim=-1)
            else:
                sp, order = probs.sort(dim=-1, descending=True)
            if use_min_p:
                sp = sp.masked_fill(sp < min_p[:, None] * sp[:, :1], 0.0)
            if use_top_k:
                kth = sp.gather(1, (top_k.long() - 1)[:, None])
                sp = sp.masked_fill(sp < kth, 0.0)
            if use_top_p:
                cum = sp.cumsum(dim=-1)
                sp = sp.masked_fill((cum - sp) > top_p[:, None] * cum[:, -1:], 0.0)  # smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter_(1, order, sp)
        probs = probs / probs.sum(-1, keepdim=True)
        q = torch.empty_like(probs)
        free = [j for j, i in enumerate(rows) if seqs[i].generator is None]
        if len(free) == len(rows):
            q.exponential_(generator=self.generator)
        else:
            for j, i in enumerate(rows):
                if seqs[i].generator is not None:
                    q[j].exponential_(generator=seqs[i].generator)
            if free:
                q[_dev(torch.tensor(free), dev)] = torch.empty(len(free), V, device=dev).exponential_(
                    generator=self.generator)
        tokens.index_copy_(0, idx, (probs / q).argmax(dim=-1))

    # ---------------------------------------------------------------- results, one copy to the host
    @staticmethod
    def _results(logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """Tokens, and for the rows that ask for logprobs (logprobs or logprob_token_ids) the sampled
        token's logprob and rank, the top ones and the pinned ones, from the model's logits (after any
        bitmask) minus their logsumexp: no [B, V] pass for rows that ask nothing. One copy to the host."""
        B, V = logits.shape
        dev = logits.device
        # A row pinning logprob_token_ids also reports its sampled token's rank (as logprobs=0 would).
        wants = [0 if s.params.logprobs is None and s.params.logprob_token_ids else s.params.logprobs
                 for s in seqs]
        wants = [V if w == -1 else w for w in wants]  # -1: the whole vocabulary
        lp_rows = [i for i, w in enumerate(wants) if w is not None]
        cols = [tokens[:, None].to(logits.dtype)]  # float32 holds ids and ranks < 2**24 exactly
        k = P = 0
        if lp_rows:
            idx = _dev(torch.tensor(lp_rows), dev)
            sub = logits if len(lp_rows) == B else logits.index_select(0, idx)
            sampled = sub.gather(1, tokens.index_select(0, idx)[:, None])
            lse = torch.logsumexp(sub, dim=-1, keepdim=True)
            lp = [sampled - lse, ((sub > sampled).sum(-1, keepdim=True) + 1).to(sub.dtype)]
            k = max(wants[i] for i in lp_rows)
            if k:
                top, top_ids = sub.topk(k, dim=-1)
                lp += [top_ids.to(sub.dtype), top - lse]
            P = max((len(seqs[i].params.logprob_token_ids or ()) for i in lp_rows), default=0)
            if P:
                ids = torch.zeros(len(lp_rows), P, dtype=torch.long)
                for j, i in enumerate(lp_rows):
                    pin = [min(t, V - 1) for t in seqs[i].params.logprob_token_ids or ()]
                    ids[j, :len(pin)] = torch.tensor(pin, dtype=torch.long)
                pin = sub.gather(1, _dev(ids, dev))
                asc = sub.sort(dim=-1).values
                lp += [pin - lse, (V - torch.searchsorted(asc, pin.contiguous(), right=True) + 1).to(sub.dtype)]
            lp = torch.cat(lp, dim=1)
            cols.append(lp if len(lp_rows) == B else torch.zeros(B, lp.shape[1], device=dev).index_copy_(0, idx, lp))
        host = torch.cat(cols, dim=1).tolist()
        token_ids, logprobs, tops, pinned = [], [], [], []
        for i, (r, w) in enumerate(zip(host, wants)):
            token_ids.append(int(r[0]))
            logprobs.append(r[1] if w is not None else 0.0)  # unreported: a row without logprobs shows none
            tops.append(None if w is None else ([int(t) for t in r[3:3 + w]], r[3 + k:3 + k + w], int(r[2])))
            pin = seqs[i].params.logprob_token_ids
            base = 3 + 2 * k
            pinned.append((list(pin), r[base:base + len(pin)], [int(x) for x in r[base + P:base + P + len(pin)]])
                          if pin else None)
        return SampleResult(token_ids, logprobs, tops, pinned if P else None)


def _processed(seq: Sequence) -> bool:
    """Whether the row's logits change before sampling (then the batch works on a copy)."""
    p = seq.params
    return bool(p.allowed_token_ids is not None or p.logit_bias or seq.num_output_tokens < p.min_tokens
                or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)


def _dev(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device: an asynchronous copy from pinned memory off the CPU."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
