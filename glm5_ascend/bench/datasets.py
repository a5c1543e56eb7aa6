"""Request sets for `glm5-ascend bench serve`: random token prompts and ShareGPT conversations.

Token counting goes through a `Tokenizer`: a local Hugging Face tokenizer when one is at hand, else the
server's own `/tokenize` and `/detokenize` routes, so a remote server can be benchmarked without its files.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

# ShareGPT speaker names seen in the wild for the two sides of a turn.
_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "bard", "model"}
# Pruning limits of vLLM's ShareGPT sampler, kept so figures stay comparable with `vllm bench serve`.
_MIN_TOKENS, _MAX_PROMPT, _MAX_TOTAL = 4, 1024, 2048
# Text the remote tokenizer turns into a pool of ordinary (non-special) token ids.
_POOL_TEXT = (
    "The quick brown fox jumps over the lazy dog while seven wizards quietly hex jumbo vats. "
    "Benchmarks measure latency, throughput and tail behaviour; 0123456789 !?.,;:()[]{}<>+-*/=_ "
    "Sparse attention selects tokens, experts route hidden states, caches keep blocks of keys."
)


@dataclass
class SampleRequest:
    """One benchmark request. `prompt` is token ids when the backend takes them, else text."""

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def candidate_ids(self) -> list[int]: ...


class LocalTokenizer:
    """A Hugging Face tokenizer loaded from a path (or hub id)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a tokenizer from {path!r} ({e}); pass --tokenizer PATH") from None
        self.name = path

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def candidate_ids(self) -> list[int]:
        """Vocabulary ids that are neither special nor added and decode to clean text alone."""
        banned = set(self.tok.all_special_ids) | set(getattr(self.tok, "added_tokens_decoder", {}) or {})
        ids = [i for i in sorted(set(self.tok.get_vocab().values())) if i not in banned]
        texts = self.tok.batch_decode([[i] for i in ids])
        # A lone byte of a multi-byte character decodes to U+FFFD and re-encodes as several tokens.
        return [i for i, t in zip(ids, texts) if t and "\ufffd" not in t]


class RemoteTokenizer:
    """Counts tokens with the server's /tokenize and /detokenize (used when no local tokenizer exists)."""

    def __init__(self, base_url: str, model: str, headers: dict[str, str], timeout: float = 60.0):
        import httpx
        self.client = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, trust_env=False)
        self.model = model
        self.name = f"{base_url}/tokenize"

    def _post(self, route: str, body: dict) -> dict:
        import httpx
        try:
            r = self.client.post(route, json={"model": self.model, **body})
        except httpx.HTTPError as e:
            raise RuntimeError(f"{self.name}: {e}; pass --tokenizer PATH to count tokens locally") from None
        if r.status_code != 200:
            raise RuntimeError(f"POST {route} answered {r.status_code} ({r.text[:200]}); "
                               "pass --tokenizer PATH to count tokens locally")
        return r.json()

    def encode(self, text: str) -> list[int]:
        return list(self._post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"])

    def decode(self, ids: list[int]) -> str:
        return self._post("/detokenize", {"tokens": list(ids)})["prompt"]

    def candidate_ids(self) -> list[int]:
        # The server's vocabulary is unknown; ids it produces for ordinary text are safe to recombine.
        return sorted(set(self.encode(_POOL_TEXT)))


def _length_range(length: int, ratio: float) -> tuple[int, int]:
    """Inclusive bounds for lengths drawn around `length` with --random-range-ratio."""
    low = max(1, int(np.floor(length * (1 - ratio))))
    return low, max(low, int(np.ceil(length * (1 + ratio))))


def _settle(tok: Tokenizer, ids: list[int], pool: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Ids of the same length whose decoded text re-encodes to exactly themselves, when reachable.

    Completions take the ids as they are; chat prompts are text, so this keeps their length exact
    for most tokenizers (tokens can merge across a boundary when decoded together).
    """
    n = len(ids)
    for _ in range(8):
        again = tok.encode(tok.decode(ids))
        if again == ids:
            break
        ids = again[:n]
        if len(ids) < n:
            ids += rng.choice(pool, n - len(ids)).tolist()
    return ids


def random_requests(tok: Tokenizer, num_prompts: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0,
                    as_text: bool = False) -> list[SampleRequest]:
    """`num_prompts` prompts of `prefix_len` shared + about `input_len` random tokens each.

    Lengths are drawn uniformly within +-range_ratio of the given values; with ratio 0 every prompt
    has exactly prefix_len + input_len tokens. Prompts are token-id lists, or with `as_text` their
    decoded text, settled so that it re-encodes to the same length.
    """
    rng = np.random.default_rng(seed)
    pool = np.asarray(tok.candidate_ids(), dtype=np.int64)
    if pool.size == 0:
        raise ValueError(f"tokenizer {tok.name} has no ordinary tokens to build random prompts from")
    in_lo, in_hi = _length_range(input_len, range_ratio)
    out_lo, out_hi = _length_range(output_len, range_ratio)
    prefix = rng.choice(pool, prefix_len).tolist() if prefix_len else []
    if as_text and prefix:
        prefix = _settle(tok, prefix, pool, rng)
    requests = []
    for _ in range(num_prompts):
        body = rng.choice(pool, int(rng.integers(in_lo, in_hi + 1))).tolist()
        if as_text:
            body = _settle(tok, body, pool, rng)
        ids = prefix + body
        requests.append(SampleRequest(prompt=tok.decode(ids) if as_text else ids, prompt_len=len(ids),
                                      expected_output_len=int(rng.integers(out_lo, out_hi + 1))))
    return requests


def load_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(first human turn, the assistant answer that follows it) of every usable conversation."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--dataset-path {path}: no such file (a ShareGPT JSON list is expected)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--dataset-path {path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"--dataset-path {path}: expected a JSON list of {{\"conversations\": [...]}}")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        pair = _first_exchange(turns) if isinstance(turns, list) else None
        if pair:
            pairs.append(pair)
    return pairs


def _first_exchange(turns: list) -> tuple[str, str] | None:
    for i, turn in enumerate(turns[:-1]):
        if not isinstance(turn, dict) or turn.get("from") not in _HUMAN:
            continue
        reply = turns[i + 1]
        if isinstance(reply, dict) and reply.get("from") in _ASSISTANT:
            prompt, answer = turn.get("value"), reply.get("value")
            if isinstance(prompt, str) and isinstance(answer, str) and prompt:
                return prompt, answer
        return None
    return None


def sharegpt_requests(tok: Tokenizer, path: str | Path, num_prompts: int,
                      output_len: int | None = None, seed: int = 0) -> list[SampleRequest]:
    """`num_prompts` ShareGPT prompts in seeded random order, pruned like vLLM's sampler.

    The output length is the answer's token count unless `output_len` fixes it. If fewer usable
    conversations exist than asked for, they are repeated.
    """
    pairs = load_sharegpt(path)
    random.Random(seed).shuffle(pairs)
    requests: list[SampleRequest] = []
    for prompt, answer in pairs:
        if len(requests) == num_prompts:
            break
        prompt_len = len(tok.encode(prompt))
        out_len = output_len if output_len is not None else len(tok.encode(answer))
        too_short = prompt_len < _MIN_TOKENS or (output_len is None and out_len < _MIN_TOKENS)
        if too_short or prompt_len > _MAX_PROMPT or prompt_len + out_len > _MAX_TOTAL:
            continue
        requests.append(SampleRequest(prompt=prompt, prompt_len=prompt_len, expected_output_len=out_len))
    if not requests:
        raise ValueError(f"--dataset-path {path}: no conversation with a human turn and an answer "
                         f"of {_MIN_TOKENS}..{_MAX_PROMPT} prompt tokens")
    if len(requests) < num_prompts:
        logger.warning("ShareGPT has %d usable conversations; repeating them to reach %d prompts",
                       len(requests), num_prompts)
        requests = [requests[i % len(requests)] for i in range(num_prompts)]
    return requests
