"""A request's structured-output fields -> the engine's constraint, compiled in the worker pool.

Sources, one per request: vLLM's ``structured_outputs`` (or older vLLM's ``guided_*`` fields),
``response_format`` (``json_object``, ``json_schema`` with ``strict``, ``structural_tag``), or a chat
``tool_choice`` of ``"required"`` or a named function, which constrains the answer to GLM-4.7 / GLM-5
tool calls whose arguments follow the tools' parameter schemas. With a reasoning parser and thinking
on, the reasoning is left free and the constraint starts after ``</think>``. Every invalid constraint
is a 400 naming the field.
"""
from __future__ import annotations

import json

from glm5_ascend.engine.sampling_params import StructuredOutputsParams
from glm5_ascend.engine.structured_outputs import StructuredOutputs, tool_call_structural_tag
from glm5_ascend.server.errors import BadRequest
from glm5_ascend.server.protocol import NamedToolChoice
from glm5_ascend.server.reasoning import thinking_enabled

_RESPONSE_FORMATS = ("text", "json_object", "json_schema", "structural_tag")
_GUIDED = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
           ("guided_grammar", "grammar"))


def request_constraint(ctx, req) -> StructuredOutputsParams | None:
    """The request's constraint (None: unconstrained), already compiled into the engine's cache."""
    found = [c for c in (_from_structured_outputs(req), _from_response_format(req), _from_tool_choice(req))
             if c is not None]
    if not found:
        return None
    if len(found) > 1:
        names = " and ".join(param for _, param in found)
        raise BadRequest(f"Only one structured output constraint per request: got {names}; drop all but one.",
                         param=found[1][1])
    kwargs, param = found[0]
    compiler = _compiler(ctx)
    if callable(kwargs):  # a tool-call tag, built for the engine's whitespace setting
        kwargs = kwargs(bool(compiler and compiler.disable_any_whitespace))
    if getattr(req, "messages", None) is not None and ctx.reasoning_parser \
            and thinking_enabled(ctx.chat_template_kwargs(req)):
        end = ctx.tok.convert_tokens_to_ids("</think>")
        if isinstance(end, int) and end != getattr(ctx.tok, "unk_token_id", None):
            kwargs["start_after_token_id"] = end
    try:
        spec = StructuredOutputsParams(**kwargs)
        if compiler is None:
            raise ValueError("structured outputs need the model's tokenizer, and this server runs without one")
        compiler.compile(spec)
    except ValueError as e:
        raise BadRequest(f"{param}: {e}", param=param) from None
    return spec


def _compiler(ctx):
    """The engine's StructuredOutputs (its compile cache serves the engine's own compile at admission);
    for an engine without one (a stand-in), one of the server's own, to check constraints."""
    found = getattr(getattr(ctx.engine, "engine", None), "structured_outputs", None)
    if found is None and ctx.tokenizer is not None:
        found = ctx.__dict__.get("_structured_outputs")
        if found is None:
            eos = {ctx.tokenizer.eos_token_id} - {None}
            found = ctx.__dict__["_structured_outputs"] = StructuredOutputs(ctx.tokenizer, ctx.vocab_size, eos)
    return found


def _from_structured_outputs(req):
    so = req.structured_outputs
    if so is None:
        guided = {kind: getattr(req, name) for name, kind in _GUIDED if getattr(req, name, None) is not None}
        return (guided, next(name for name, kind in _GUIDED if kind in guided)) if guided else None
    kwargs = {"json": so.json_schema, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
              "json_object": so.json_object, "structural_tag": so.structural_tag,
              "disable_any_whitespace": bool(so.disable_any_whitespace)}
    return kwargs, "structured_outputs"


def _from_response_format(req):
    rf = req.response_format
    if rf is None:
        return None
    kind = rf.get("type")
    if kind not in _RESPONSE_FORMATS:
        raise BadRequest(f"response_format type {kind!r} is not supported; use one of "
                         f"{', '.join(_RESPONSE_FORMATS)}.", param="response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}, "response_format"
    if kind == "structural_tag":
        return {"structural_tag": json.dumps(rf)}, "response_format"
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema"), (dict, bool)):
        raise BadRequest('response_format type "json_schema" needs a "json_schema" object with the JSON schema '
                         'under "schema".', param="response_format")
    return {"json": js["schema"], "strict": js.get("strict") is not False}, "response_format"


def _from_tool_choice(req):
    choice = getattr(req, "tool_choice", None)
    if not getattr(req, "tools", None) or not (choice == "required" or isinstance(choice, NamedToolChoice)):
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    named = {"name": choice.function.name} if isinstance(choice, NamedToolChoice) else "required"

    def build(no_space: bool) -> dict:
        try:
            tag = tool_call_structural_tag(tools, named, req.parallel_tool_calls is not False, no_space)
        except ValueError as e:  # xgrammar's check of the tool list (pydantic's ValidationError is one)
            raise BadRequest(f"tools: {' '.join(str(e).split())}", param="tools") from None
        return {"structural_tag": tag}
    return build, "tool_choice"
