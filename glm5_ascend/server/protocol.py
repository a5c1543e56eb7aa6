"""Request and response schemas with vLLM's names (OpenAI's plus vLLM's extras).

Requests are validated here. A field vLLM implements and this server does not is a 400 naming it (unless it
holds its default); a field unknown to vLLM too is ignored with a logged warning, as vLLM does. Responses
are built as plain dicts by the serving modules (faster on the streaming path);
the response models below document them in /openapi.json and the tests check
every body against them.
"""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

logger = logging.getLogger(__name__)
_INT64 = 2 ** 63
# vLLM request fields this server does not implement, with the value that asks for nothing (accepted).
UNSUPPORTED_FIELDS = {"bad_words": None, "logits_processors": None, "prompt_embeds": None,
                      "kv_transfer_params": None, "mm_processor_kwargs": None, "cache_salt": None,
                      "vllm_xargs": None, "thinking_token_budget": None}
Int64 = Field(default=None, ge=-_INT64, le=_INT64 - 1)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool | None = False  # vLLM's default: `stream_options: {}` sends no usage chunk
    continuous_usage_stats: bool | None = False


class StructuredOutputsRequest(_Request):
    """vLLM's ``structured_outputs``: exactly one constraint kind (json, regex, choice, grammar,
    json_object, structural_tag). disable_fallback, disable_additional_properties and
    whitespace_pattern are accepted for compatibility (xgrammar is the one backend here)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_schema: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool | None = False
    disable_fallback: bool | None = False
    disable_additional_properties: bool | None = False
    whitespace_pattern: str | None = None


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int | None = 1
    seed: int | None = Int64
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    echo: bool | None = False
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    request_id: str | None = None
    priority: int | None = 0
    structured_outputs: StructuredOutputsRequest | None = None
    # Older vLLM's structured-output fields, read when structured_outputs is absent.
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    truncation_side: Literal["left", "right"] | None = None  # with truncate_prompt_tokens: which end is cut
    logprob_token_ids: list[int] | None = None  # with logprobs: these ids' logprobs instead of the top ones
    use_beam_search: bool | None = False  # n beams (engine/beam_search.py)
    length_penalty: float | None = 1.0
    early_stopping: bool | str | None = False  # accepted and unused, as in vLLM's beam search
    # Declared so that a request using them is refused by name (_refuse_unsupported), not silently ignored.
    bad_words: list[str] | None = None
    logits_processors: list[Any] | None = None
    prompt_embeds: Any = None
    kv_transfer_params: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    cache_salt: str | None = None
    vllm_xargs: dict[str, Any] | None = None
    thinking_token_budget: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown(cls, data):
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                logger.warning("The following fields were present in the request but ignored: %s",
                               sorted(map(str, unknown))[:20])
        return data

    @field_validator(*UNSUPPORTED_FIELDS)
    @classmethod
    def _refuse_unsupported(cls, value, info):
        default = UNSUPPORTED_FIELDS[info.field_name]
        if value is not None and value != default and value != []:
            raise ValueError(f"`{info.field_name}` is not supported by this server (vLLM implements it, glm5-ascend "
                             "does not); drop it from the request")
        return value

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`.")
        return self


class CompletionRequest(_SamplingRequest):
    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int | None = 16
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool | None = True

    @model_validator(mode="after")
    def _check(self):
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("`logprobs` must be a positive value.")
        return self


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatMessage(BaseModel):
    """One conversation turn; extra keys (name, tool_call_id, ...) reach the template."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class _ChatFields(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = False
    documents: list[dict[str, str]] | None = None

    @model_validator(mode="after")
    def _check_prefix(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self


class ChatCompletionRequest(_ChatFields, _SamplingRequest):
    max_tokens: int | None = Field(default=None, description="deprecated: use max_completion_tokens")
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None:
            if self.top_logprobs < 0 and self.top_logprobs != -1:
                raise ValueError("`top_logprobs` must be a positive value or -1.")
            if self.top_logprobs != 0 and not self.logprobs:
                raise ValueError("when using `top_logprobs`, `logprobs` must be set to true.")
        if self.tool_choice is None:
            self.tool_choice = "auto" if self.tools else "none"
        if self.tool_choice != "none" and not self.tools:
            raise ValueError("When using `tool_choice`, `tools` must be set.")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"Tool '{self.tool_choice.function.name}' has not been passed in `tools`.")
        return self


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_ChatFields):
    model: str | None = None
    return_token_strs: bool | None = False


def _tokenize_kind(body: Any) -> str | None:
    if isinstance(body, dict):
        return "TokenizeChatRequest" if "messages" in body else (
            "TokenizeCompletionRequest" if "prompt" in body else None)
    if isinstance(body, (TokenizeChatRequest, TokenizeCompletionRequest)):
        return type(body).__name__
    return None


# /tokenize takes a text (`prompt`) or a chat (`messages`); the body's keys pick which, so an error names
# the fields of that one form (tags are class names: validation_message drops them from error paths).
TokenizeRequest = Annotated[
    Union[Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")],
          Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")]],
    Discriminator(_tokenize_kind, custom_error_type="prompt_or_messages_missing",
                  custom_error_message="Field required: `prompt` (a text) or `messages` (a chat).")]


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses (documentation + tests)
class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(_Response):
    error: ErrorInfo


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int | None = 0
    total_tokens: int
    prompt_tokens_details: dict | None = None


class ModelPermission(_Response):
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission]


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogProbs(_Response):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None
    kv_transfer_params: dict | None = None
    metrics: dict[str, float | None] | None = None  # --enable-per-request-metrics


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Response):
    content: list[ChatLogprob] | None = None


class FunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class ToolCallOut(_Response):
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall
    index: int | None = None


class ChatMessageOut(_Response):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    refusal: str | None = None
    annotations: list | None = None
    audio: dict | None = None
    function_call: dict | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    prompt_token_ids: list[int] | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None
    kv_transfer_params: dict | None = None
    metrics: dict[str, float | None] | None = None  # --enable-per-request-metrics


class ChatStreamChoice(_Response):
    index: int
    delta: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None
    metrics: dict[str, float | None] | None = None  # the final usage chunk, with --enable-per-request-metrics


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str
