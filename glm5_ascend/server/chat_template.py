"""Chat template: which one is used, and rendering OpenAI messages through it.

The model's own template (tokenizer_config.json / chat_template.jinja) is used
unless ``--chat-template`` overrides it. OpenAI clients send tool-call
arguments as a JSON string while GLM templates iterate over them as a mapping,
so arguments are decoded into dicts before rendering.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glm5_ascend.server.errors import BadRequest

# Keys a request's chat_template_kwargs may not override: they are the renderer's own arguments.
_RESERVED_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "return_dict", "return_tensors", "padding", "truncation",
    "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask", "sanitize_control_tokens"})


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file path or the template text itself (vLLM's rule)."""
    if not value:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except OSError as e:  # e.g. a name too long to be a path: it is the template itself
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"--chat-template {value!r} cannot be read ({e}); pass a readable file or the template text")
    if not any(c in value for c in "{}\n"):
        raise ValueError(f"--chat-template {value!r} looks like a path, but no such file exists; "
                         "pass an existing .jinja file or the template text itself")
    return value


def default_template(tokenizer, override: str | None) -> str | None:
    """The template requests use: the override, else the tokenizer's own (None when it has none)."""
    if override:
        return override
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):  # named templates: vLLM takes "default"
        tmpl = tmpl.get("default") or next(iter(tmpl.values()), None)
    return tmpl or None


def _text_of(content: Any) -> str | None:
    """OpenAI content (a string or a list of parts) as the plain text GLM templates expect."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise BadRequest(f"Content part of type {kind!r} is not supported by this text-only model; "
                             "send text parts only.", param="messages")
    return "\n".join(texts)


def _decode_arguments(call: dict) -> dict:
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise BadRequest("Each tool call needs a `function` object with `name` and `arguments`.", param="messages")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise BadRequest(f"Tool call arguments of {fn.get('name')!r} are not valid JSON ({e}); "
                             "send a JSON object string.", param="messages") from None
    if args is not None and not isinstance(args, dict):
        raise BadRequest(f"Tool call arguments of {fn.get('name')!r} must be a JSON object.", param="messages")
    return {**call, "function": {**fn, "arguments": args or {}}}


def to_template_messages(messages: list) -> list[dict]:
    """Request messages (pydantic or dicts) as template-ready dicts."""
    out = []
    for m in messages:
        msg = m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else dict(m)
        if msg.get("role") == "developer":  # OpenAI's newer name for the system turn
            msg["role"] = "system"
        if "content" in msg:
            msg["content"] = _text_of(msg["content"])
        if msg.get("tool_calls"):
            msg["tool_calls"] = [_decode_arguments(c) for c in msg["tool_calls"]]
        out.append(msg)
    return out


def render_chat(tokenizer, template: str | None, messages: list, tools: list | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                chat_template_kwargs: dict | None = None, documents: list | None = None) -> str:
    """The prompt text for a conversation. Template failures are the client's: BadRequest."""
    if not template:
        raise BadRequest("As of transformers v4.44, default chat template is no longer allowed, so you must "
                         "provide a chat template if the tokenizer does not define one (--chat-template).")
    conv = to_template_messages(messages)
    tool_dicts = [t.model_dump(exclude_none=True) if hasattr(t, "model_dump") else t for t in tools] if tools else None
    kwargs = {k: v for k, v in (chat_template_kwargs or {}).items() if k not in _RESERVED_KWARGS}
    if continue_final_message and (not conv or conv[-1].get("role") != "assistant"):
        raise BadRequest("continue_final_message needs the last message to be from the assistant.",
                         param="continue_final_message")
    try:
        text = tokenizer.apply_chat_template(
            conv, tools=tool_dicts, documents=documents, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message, **kwargs)
    except BadRequest:
        raise
    except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception(), bad content types
        raise BadRequest(f"The chat template could not render these messages: {e}") from None
    if not isinstance(text, str):
        raise BadRequest("The chat template did not produce text.")
    return text
