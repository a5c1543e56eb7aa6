"""LLM: vLLM's offline API (generate / chat) over LLMEngine."""
from __future__ import annotations

import atexit
import itertools
from collections.abc import Sequence as Seq

from glm5_ascend.engine.arg_utils import EngineArgs, engine_args_from_kwargs, resolve_model
from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.engine.sequence import RequestOutput

__all__ = ["LLM", "resolve_model"]


class LLM:
    """Offline inference: `LLM(model=DIR).generate(prompts, SamplingParams(...))`.

    Keywords are EngineArgs' (vLLM's names: tensor_parallel_size, data_parallel_size,
    enable_expert_parallel, max_model_len...); model=None serves the built-in tiny model. With more
    than one rank the worker processes are started here and stopped by `shutdown()` (or at exit).
    """

    def __init__(self, model: str | None = None, **kwargs):
        from glm5_ascend.engine.executor import start_engine
        args = kwargs.pop("engine_args", None) or engine_args_from_kwargs(model, kwargs)
        self.llm_engine = start_engine(args.create_engine_config())
        self._counter = itertools.count()
        if self.llm_engine.config.parallel.world_size > 1:
            atexit.register(self.shutdown)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLM":
        return cls(engine_args=args)

    def shutdown(self) -> None:
        """Stop the worker processes (a no-op with one process); this LLM cannot generate after it."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def _tokenizer(self):
        if self.llm_engine.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]} prompts, "
                             "or LLM(..., tokenizer=PATH) for text")
        return self.llm_engine.tokenizer

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._tokenizer().encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, (list, tuple)):  # a bare list of token ids, as older vLLM scripts pass
            return None, list(prompt)
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._prompt_ids(prompt["prompt"])
        raise ValueError(f"a prompt must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def generate(self, prompts=None, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False, prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        prompts: a string, a {"prompt_token_ids": [...]} dict, or a list of them (a list of token-id
        lists also works); prompt_token_ids= is older vLLM's keyword for the latter.
        """
        if prompts is None and prompt_token_ids is not None:
            prompts = [list(ids) for ids in prompt_token_ids]
        if prompts is None:
            raise ValueError("generate() needs prompts")
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                and not isinstance(prompts[0], (str, dict, list, tuple))):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        parsed = [self._prompt_ids(p) for p in prompts]
        for _, ids in parsed:  # validate every prompt before any is queued
            engine.validate_prompt(ids)
        order = []
        for (text, ids), p in zip(parsed, params_list):
            rid = str(next(self._counter))
            engine.add_request(rid, ids, p, prompt=text)
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in order]

    def chat(self, messages, sampling_params: SamplingParams | None = None, chat_template: str | None = None,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
             tools: list[dict] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (or a list of them) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self._tokenizer()
        prompts = []
        for conv in convs:
            ids = tok.apply_chat_template(conv, tools=tools, chat_template=chat_template,
                                          add_generation_prompt=add_generation_prompt, tokenize=True,
                                          return_dict=False, **(chat_template_kwargs or {}))
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)
