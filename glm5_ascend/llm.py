"""LLM: vLLM's offline API (generate / chat) over LLMEngine."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from glm5_ascend.engine.llm_engine import LLMEngine, create_engine_config
from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.engine.sequence import RequestOutput


def resolve_model(model: str | None) -> str:
    """The model directory; None means the built-in tiny model (created once in the cache)."""
    if model:
        return model
    from glm5_ascend.model.tiny import default_model_path
    return str(default_model_path())


class LLM:
    """Offline inference: `LLM(model=DIR).generate(prompts, SamplingParams(...))`.

    Arguments follow vLLM's EngineArgs names; model=None serves the built-in tiny model.
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 enable_prefix_caching: bool = True, tensor_parallel_size: int = 1, block_size: int = 128,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_chunked_prefill: bool = True,
                 num_gpu_blocks_override: int | None = None, trust_remote_code: bool = False,
                 skip_tokenizer_init: bool = False, **kwargs):
        if kwargs:
            raise TypeError(f"LLM() got unsupported argument(s) {', '.join(sorted(kwargs))}; see docs/api.md")
        config = create_engine_config(
            resolve_model(model), tokenizer, dtype, device, max_model_len, seed, enable_prefix_caching,
            tensor_parallel_size, block_size, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization,
            enable_chunked_prefill, num_gpu_blocks_override, skip_tokenizer_init=skip_tokenizer_init)
        self.llm_engine = LLMEngine(config)
        self._counter = itertools.count()

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
