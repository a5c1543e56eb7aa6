"""Tokens in and out: the path every route shares from a request to engine inputs.

``ServingContext`` resolves the model name, tokenizes and checks prompts with
vLLM's messages, builds SamplingParams, decodes logprob tokens, and serves
/tokenize and /detokenize.
"""
from __future__ import annotations

import asyncio
import copy
import itertools
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from glm5_ascend.engine.beam_search import BeamSearchParams, beam_search
from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.server.chat_template import render_chat
from glm5_ascend.server.errors import BadRequest, NotFound
from glm5_ascend.server.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from glm5_ascend.server.structured import request_constraint

# Request fields whose server-side default may come from the model's generation_config.json.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


@dataclass
class ServingContext:
    """Everything a route needs besides the request: engine, tokenizer, names and limits."""

    engine: object  # AsyncEngine
    tokenizer: object
    served_names: list[str]
    model_path: str
    max_model_len: int
    vocab_size: int
    kv_capacity_tokens: int
    max_num_seqs: int = 256
    max_logprobs: int = 20
    eos_token_ids: frozenset = frozenset()  # the engine's: where a beam ends
    default_sampling: dict = field(default_factory=dict)  # from generation_config.json
    default_max_tokens: int | None = None  # generation_config.json max_new_tokens
    chat_template: str | None = None
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    enable_auto_tool_choice: bool = False
    trust_request_chat_template: bool = False
    log_requests: bool = False
    return_tokens_as_token_ids: bool = False  # --return-tokens-as-token-ids: the default per request
    default_chat_template_kwargs: dict = field(default_factory=dict)  # --default-chat-template-kwargs
    force_include_usage: bool = False  # --enable-force-include-usage
    prompt_tokens_details: bool = False  # --enable-prompt-tokens-details
    per_request_metrics: bool = False  # --enable-per-request-metrics
    max_prompt_chars: int | None = None  # a longer text surely exceeds max_model_len (limits.prompt_char_bound)
    pool: ThreadPoolExecutor | None = None  # tokenization and templates, off the event loop (start_pool)
    created: int = field(default_factory=lambda: int(time.time()))
    tokenize_seconds: float = 0.0  # chat templates + tokenization, for `bench serve`'s time breakdown
    _token_text: dict = field(default_factory=dict)
    _counter: itertools.count = field(default_factory=itertools.count)
    _local: threading.local = field(default_factory=threading.local)

    # ---------------------------------------------------------------- the worker pool
    def start_pool(self, workers: int) -> None:
        """`workers` threads, each with its own tokenizer copy (HF tokenizers may refuse concurrent use)."""
        def init():
            try:
                self._local.tokenizer = copy.deepcopy(self.tokenizer)
            except Exception:  # noqa: BLE001 - sharing works, only slower under contention
                self._local.tokenizer = self.tokenizer
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="glm5-tokenize", initializer=init)

    async def off_loop(self, fn, *args):
        """fn(*args) in the worker pool, so the event loop keeps answering (health checks, streams)."""
        if self.pool is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    @property
    def tok(self):
        """This thread's tokenizer: a pool worker's own copy, else the shared one."""
        return getattr(self._local, "tokenizer", None) or self.tokenizer

    def reject_long_text(self, chars: int, param: str = "input_tokens", messages: int = 0) -> None:
        """Refuse, before any tokenizing or rendering, a text whose length alone proves it exceeds
        max_model_len; a chat's `messages` add at least one token each (their role marker)."""
        if self.max_prompt_chars is None:
            return
        at_least = -(-chars * self.max_model_len // self.max_prompt_chars) + messages
        if at_least >= self.max_model_len:  # as the exact check: a prompt must leave room for one token
            what = f"{chars} characters" + (f" in {messages} messages" if messages else "")
            raise BadRequest(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                             f"request has at least {at_least} input tokens ({what}). Please reduce the length "
                             "of the input messages.", param=param, value=at_least)

    # ---------------------------------------------------------------- names and ids
    def model_name(self, requested: str | None) -> str:
        """The served name a request addresses; empty means the first one (vLLM's rule)."""
        if not requested:
            return self.served_names[0]
        if requested in self.served_names:
            return requested
        raise NotFound(f"The model `{requested}` does not exist.", param="model")

    @staticmethod
    def request_id(prefix: str, header: str | None, given: str | None) -> str:
        return f"{prefix}-{header or given or uuid.uuid4().hex}"

    def engine_id(self, request_id: str) -> str:
        """A unique engine id, even when clients reuse X-Request-Id / request_id."""
        return f"{request_id}#{next(self._counter)}"

    def precheck_chat(self, body: dict) -> None:
        """On a decoded, not yet validated body: refuse a chat whose messages cannot fit (reject_long_text)."""
        from glm5_ascend.server.limits import text_chars
        messages = body.get("messages")
        if isinstance(messages, list):
            chars = sum(text_chars(m.get("content")) for m in messages if isinstance(m, dict))
            self.reject_long_text(chars, "messages", len(messages))

    # ---------------------------------------------------------------- prompts
    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        t0 = time.perf_counter()
        try:
            ids = list(self.tok.encode(text, add_special_tokens=bool(add_special_tokens)))
        except (TypeError, UnicodeError):  # e.g. a lone surrogate ("\ud800") that JSON allowed through
            raise BadRequest("The prompt is not valid Unicode text (it holds a lone surrogate); "
                             "send valid UTF-8 text.", param="prompt") from None
        finally:
            self.tokenize_seconds += time.perf_counter() - t0
        return ids

    def check_ids(self, ids: list[int], param: str = "prompt") -> None:
        if not ids:
            raise BadRequest("The prompt is empty; send at least one token.", param=param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"Token id {bad} is out of vocabulary (vocab_size={self.vocab_size}).", param=param)

    def truncate(self, ids: list[int], k: int | None, side: str | None = None) -> list[int]:
        """truncate_prompt_tokens: keep the last k tokens (-1: max_model_len), or the first k with
        truncation_side "right"."""
        if k is None:
            return ids
        if k == -1:
            k = self.max_model_len
        if k > self.max_model_len:
            raise BadRequest(f"truncate_prompt_tokens value ({k}) is greater than max_model_len "
                             f"({self.max_model_len}). Please, select a smaller truncation size.",
                             param="truncate_prompt_tokens")
        if not k:
            return ids
        return ids[:k] if side == "right" else ids[-k:]

    def max_tokens(self, n_prompt: int, requested: int | None) -> int:
        """vLLM's length checks; the output budget (request, generation config, or what is left)."""
        if n_prompt >= self.max_model_len:
            raise BadRequest(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                             f"your request has {n_prompt} input tokens. Please reduce the length of the input "
                             "messages.", param="input_tokens", value=n_prompt)
        left = self.max_model_len - n_prompt
        if requested is not None and requested > left:
            raise BadRequest(f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This model's "
                             f"maximum context length is {self.max_model_len} tokens and your request has "
                             f"{n_prompt} input tokens ({requested} > {self.max_model_len} - {n_prompt}).",
                             param="max_tokens", value=requested)
        budget = min([left] + [v for v in (requested, self.default_max_tokens) if v is not None])
        if n_prompt + budget > self.kv_capacity_tokens:  # only when the cache is smaller than max_model_len
            raise BadRequest(f"The request needs {n_prompt + budget} tokens of KV cache but the whole cache holds "
                             f"{self.kv_capacity_tokens}; it can never run. Shorten the prompt or max_tokens.",
                             param="max_tokens")
        return budget

    def chat_template_kwargs(self, req) -> dict:
        """The server's --default-chat-template-kwargs, with the request's own on top (vLLM's merge)."""
        return {**self.default_chat_template_kwargs, **(req.chat_template_kwargs or {})}

    def render_chat(self, req) -> str:
        """The prompt text of a chat (or chat /tokenize) request."""
        template = self.chat_template
        if req.chat_template:
            if not self.trust_request_chat_template:
                raise BadRequest("Chat template is passed with request, but --trust-request-chat-template is "
                                 "not set. Refused request with untrusted chat template.", param="chat_template")
            template = req.chat_template
        t0 = time.perf_counter()
        text = render_chat(self.tok, template, req.messages, req.tools, bool(req.add_generation_prompt),
                           bool(req.continue_final_message), self.chat_template_kwargs(req), req.documents)
        self.tokenize_seconds += time.perf_counter() - t0
        return text

    # ---------------------------------------------------------------- sampling
    def sampling_params(self, req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
                        skip_special_tokens: bool | None = None) -> SamplingParams:
        """SamplingParams from request fields; every refusal is a BadRequest naming the field."""
        n = 1 if req.n is None else req.n
        if n > self.max_num_seqs:
            raise BadRequest(f"n={n} is larger than --max-num-seqs {self.max_num_seqs}; ask for fewer choices.",
                             param="n")
        if req.priority:
            raise BadRequest(f"Got priority {req.priority} but Priority scheduling is not enabled.", param="priority")
        constraint = request_constraint(self, req)  # compiles it: call from the worker pool
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None:
                asked = self.vocab_size if value == -1 else value
                if asked < 0 or asked > self.max_logprobs:
                    kind = "sample" if name == "logprobs" else "prompt"
                    raise BadRequest(f"Requested {kind} logprobs of {asked}, which is greater than max allowed: "
                                     f"{self.max_logprobs}", param=name)
        pinned = None
        if req.logprob_token_ids and logprobs is not None:  # vLLM: these ids replace the top ones
            bad = [t for t in req.logprob_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise BadRequest(f"logprob_token_ids {bad[:10]} are out of vocabulary (vocab_size="
                                 f"{self.vocab_size}); send ids in [0, {self.vocab_size}).", param="logprob_token_ids")
            pinned, logprobs = list(dict.fromkeys(req.logprob_token_ids)), None
        d = self.default_sampling

        def pick(name):
            value = getattr(req, name, None)
            return value if value is not None else d.get(name, SAMPLING_DEFAULTS[name])

        try:
            return SamplingParams(
                n=n, presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=pick("repetition_penalty"), temperature=pick("temperature"),
                top_p=pick("top_p"), top_k=pick("top_k"), min_p=pick("min_p"), seed=req.seed, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=bool(req.ignore_eos), max_tokens=max_tokens,
                min_tokens=req.min_tokens or 0, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                include_stop_str_in_output=bool(req.include_stop_str_in_output),
                skip_special_tokens=(bool(req.skip_special_tokens) if skip_special_tokens is None
                                     else skip_special_tokens),
                spaces_between_special_tokens=bool(req.spaces_between_special_tokens),
                logit_bias=self._logit_bias(req.logit_bias), allowed_token_ids=self._allowed(req.allowed_token_ids),
                logprob_token_ids=pinned, structured_outputs=constraint)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def beam_params(self, req, params: SamplingParams) -> BeamSearchParams | None:
        """vLLM's BeamSearchParams for a `use_beam_search` request (None without it): n beams; the request's
        temperature, else the generation config's, else 1.0."""
        if not req.use_beam_search:
            return None
        if req.logprob_token_ids:
            raise BadRequest("logprob_token_ids cannot be used with beam search; drop one of them.",
                             param="logprob_token_ids")
        if params.structured_outputs is not None:
            raise BadRequest("beam search does not apply structured outputs (response_format, structured_outputs, "
                             "a required or named tool choice); drop use_beam_search or the constraint.",
                             param="use_beam_search")
        if 2 * params.n > self.max_logprobs:
            raise BadRequest(f"beam search with n={params.n} ranks {2 * params.n} candidates per beam, more than "
                             f"--max-logprobs {self.max_logprobs}; use n <= {self.max_logprobs // 2} or raise "
                             "--max-logprobs.", param="n")
        temperature = req.temperature if req.temperature is not None else self.default_sampling.get("temperature", 1.0)
        return BeamSearchParams(beam_width=params.n, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
                                temperature=temperature, include_stop_str_in_output=params.include_stop_str_in_output,
                                length_penalty=1.0 if req.length_penalty is None else req.length_penalty)

    def generate(self, ids: list[int], params: SamplingParams, beam: BeamSearchParams | None, request_id: str):
        """The engine's RequestOutputs for one prompt: a plain request, or a beam search (one final output)."""
        rid = self.engine_id(request_id)
        if beam is None:
            return self.engine.generate(ids, params, rid)
        skip = params.skip_special_tokens
        return beam_search(self.engine, ids, beam, rid, self.eos_token_ids, seed=params.seed,
                           decode=lambda t: self.tokenizer.decode(t, skip_special_tokens=skip))

    def _logit_bias(self, bias: dict | None) -> dict[int, float] | None:
        if not bias:
            return None
        out, not_ids, out_of_vocab, not_finite = {}, [], [], []
        for key, value in bias.items():  # every bad key is named, not only the first
            try:
                tid = int(key)
            except ValueError:
                not_ids.append(key)
                continue
            if not 0 <= tid < self.vocab_size:
                out_of_vocab.append(tid)
            elif not math.isfinite(value):
                not_finite.append(key)
            else:
                out[tid] = min(100.0, max(-100.0, value))  # OpenAI's and vLLM's clamp
        problems = []
        if not_ids:
            problems.append(f"keys {not_ids} are not token ids (integers or strings of integers)")
        if out_of_vocab:
            problems.append(f"token_id(s) {out_of_vocab} in logit_bias contain out-of-vocab token ids. "
                            f"Vocabulary size: {self.vocab_size}")
        if not_finite:
            problems.append(f"the values for keys {not_finite} are not finite numbers")
        if problems:
            raise BadRequest("logit_bias: " + "; ".join(problems) + ".", param="logit_bias")
        return out

    def _allowed(self, ids: list[int] | None) -> list[int] | None:
        if ids is None:
            return None
        if not ids:
            raise BadRequest("allowed_token_ids is not allowed to be empty.", param="allowed_token_ids")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise BadRequest("allowed_token_ids contains out-of-vocab token id!", param="allowed_token_ids")
        return ids

    # ---------------------------------------------------------------- output text
    def as_ids(self, req) -> bool:
        """Whether logprob tokens are shown as "token_id:N"."""
        v = req.return_tokens_as_token_ids
        return self.return_tokens_as_token_ids if v is None else bool(v)

    def token_text(self, tid: int, as_id: bool = False) -> str:
        """One token decoded on its own, as vLLM shows logprob tokens (cached)."""
        if as_id:
            return f"token_id:{tid}"
        text = self._token_text.get(tid)
        if text is None:
            text = self.tokenizer.decode([tid], skip_special_tokens=False)
            self._token_text[tid] = text
        return text


# -------------------------------------------------------------------- /tokenize, /detokenize
def tokenize(ctx: ServingContext, req: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
    ctx.model_name(req.model)
    if isinstance(req, TokenizeChatRequest):
        text = ctx.render_chat(req)
        add_special = bool(req.add_special_tokens)
    else:
        text, add_special = req.prompt, req.add_special_tokens is not False
    ids = ctx.encode(text, add_special)
    strs = ctx.tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(ctx: ServingContext, req: DetokenizeRequest) -> dict:
    ctx.model_name(req.model)
    bad = next((t for t in req.tokens if not 0 <= t < ctx.vocab_size), None)
    if bad is not None:
        raise BadRequest(f"Token id {bad} is out of vocabulary (vocab_size={ctx.vocab_size}).", param="tokens")
    return {"prompt": ctx.tok.decode(req.tokens)}
