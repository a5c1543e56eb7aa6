"""GLM tool-call (glm47) and reasoning (glm45) parsers: one-shot results and
the property that any chunking of the stream reassembles to the same thing."""

from __future__ import annotations

import json
import random
import re

import pytest

from glm5_ascend.server.reasoning import Glm45ReasoningParser, get_reasoning_parser
from glm5_ascend.server.reasoning import thinking_enabled
from glm5_ascend.server.tool_parsers import Glm47ToolParser, get_tool_parser


def _fn(name, **props):
    properties = {k: {"type": t} for k, t in props.items()}
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": properties}}}


TOOLS = [
    _fn("get_weather", city="string", days="integer"),
    _fn("search", query="string"),
    _fn("set_config", zip="string", code=["string", "null"], options="object",
        enabled="boolean", ratio="number", tags="array", nothing="null",
        pair="array"),
]
WEATHER = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
           "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>")
PARIS = ("get_weather", {"city": "Paris", "days": 3})

# (text, expected content, expected [(name, arguments dict)])
TOOL_CASES = {
    "plain": ("Hello! How can I help you today?", "Hello! How can I help you today?", []),
    "lookalike_tags": ("a < b, <tool_c and </tool_call> text", "a < b, <tool_c and </tool_call> text", []),
    "only_whitespace": ("\n\n", "\n\n", []),
    "empty": ("", None, []),
    "content_then_call": ("Let me check the weather.\n" + WEATHER, "Let me check the weather.\n", [PARIS]),
    "multi_whitespace_unicode": (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
        "<arg_key> days </arg_key>\n<arg_value>2</arg_value>\n</tool_call>\n"
        "<tool_call> search <arg_key>query</arg_key><arg_value>  café ☕ 🌧️ </arg_value></tool_call>",
        None, [("get_weather", {"city": "北京", "days": 2}), ("search", {"query": "  café ☕ 🌧️ "})]),
    "json_types": (
        "<tool_call>set_config<arg_key>zip</arg_key><arg_value>02134</arg_value>"
        "<arg_key>code</arg_key><arg_value>123</arg_value>"
        '<arg_key>options</arg_key><arg_value>{"a": [1, 2, {"b": null}], "名": "值"}</arg_value>'
        "<arg_key>enabled</arg_key><arg_value>true</arg_value>"
        "<arg_key>ratio</arg_key><arg_value>0.5</arg_value>"
        '<arg_key>tags</arg_key><arg_value>["x", "y"]</arg_value>'
        "<arg_key>nothing</arg_key><arg_value>null</arg_value></tool_call>",
        None, [("set_config", {"zip": "02134", "code": "123",
                               "options": {"a": [1, 2, {"b": None}], "名": "值"},
                               "enabled": True, "ratio": 0.5, "tags": ["x", "y"],
                               "nothing": None})]),
    "python_literals": (
        "<tool_call>set_config<arg_key>enabled</arg_key><arg_value>True</arg_value>"
        "<arg_key>nothing</arg_key><arg_value>None</arg_value>"
        "<arg_key>pair</arg_key><arg_value>(1, 2)</arg_value>"
        "<arg_key>options</arg_key><arg_value>{'k': 'v', 'n': False}</arg_value></tool_call>",
        None, [("set_config", {"enabled": True, "nothing": None, "pair": [1, 2],
                               "options": {"k": "v", "n": False}})]),
    "no_args_and_unknown_tool": (
        "Listing.<tool_call>list_files</tool_call><tool_call>mystery"
        "<arg_key>x</arg_key><arg_value>42</arg_value><arg_key>y</arg_key>"
        "<arg_value>hello world</arg_value><arg_key>z</arg_key><arg_value>NaN</arg_value>"
        "<arg_key>s</arg_key><arg_value>{1, 2}</arg_value></tool_call>",
        "Listing.", [("list_files", {}),
                     ("mystery", {"x": 42, "y": "hello world", "z": "NaN", "s": "{1, 2}"})]),
    "value_with_tag_lookalikes": (
        "<tool_call>search<arg_key>query</arg_key><arg_value>a <b> </arg_val <tool_call x"
        "</arg_value></tool_call>",
        None, [("search", {"query": "a <b> </arg_val <tool_call x"})]),
    "whitespace_prefix_dropped": ("  \n" + WEATHER + "\n", None, [PARIS]),
    "text_after_call": (WEATHER + "\nDone.", "\nDone.", [PARIS]),
    "unterminated": ("I'll call it.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par",
                     "I'll call it.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par", []),
    "unterminated_bare": ("<tool_call>get_wea", "<tool_call>get_wea", []),
    "complete_then_unterminated": (WEATHER + "\n<tool_call>get_weather<arg_key>city",
                                   "\n<tool_call>get_weather<arg_key>city", [PARIS]),
    "junk_between_pairs": (
        "<tool_call>f<arg_key>a</arg_key>junk<arg_key>b</arg_key><arg_value>1</arg_value>"
        "<arg_key>c</arg_key> <arg_value>[]</arg_value>x</tool_call>",
        None, [("f", {"a</arg_key>junk<arg_key>b": 1, "c": []})]),
}


def splits(text, n_random=60, full_3way_max=130):
    """Chunkings: whole, char-by-char, all 2-way, 3-way (all if short), random."""
    n = len(text)
    yield [text]
    yield list(text)
    for i in range(n + 1):
        yield [text[:i], text[i:]]
    step = 1 if n <= full_3way_max else max(1, n // 40)
    for i in range(0, n + 1, step):
        for j in range(i, n + 1, step):
            yield [text[:i], text[i:j], text[j:]]
    rng = random.Random(n)
    for _ in range(n_random):
        cuts = sorted(rng.sample(range(n + 1), min(n + 1, rng.randint(1, 12))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [n])]


def stream_tools(parser, chunks):
    """Stream chunks; returns (content, [[id, name, args]], deltas)."""
    content, calls, deltas = "", [], []
    for res in [parser.extract_streaming(c) for c in chunks] + [parser.finish()]:
        assert res.content != ""  # empty content must be None
        content += res.content or ""
        for d in res.tool_calls:
            deltas.append(d)
            if d.index == len(calls):  # first delta of a call carries the header
                assert d.id and d.type == "function" and d.name is not None
                calls.append([d.id, d.name, ""])
            else:
                assert d.index == len(calls) - 1 and d.id is None and d.name is None
            calls[d.index][2] += d.arguments or ""
    return content, calls, deltas


def _expected(case):
    text, content, calls = TOOL_CASES[case]
    return text, content, [(n, json.dumps(a, ensure_ascii=False)) for n, a in calls]


@pytest.mark.parametrize("case", list(TOOL_CASES))
def test_tool_oneshot(case):
    text, content, calls = _expected(case)
    got = Glm47ToolParser(TOOLS).extract_tool_calls(text)
    assert got.content == content
    assert got.tools_called == bool(calls)
    assert [(c.name, c.arguments) for c in got.tool_calls] == calls
    for c in got.tool_calls:
        assert c.type == "function" and re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", c.id)


@pytest.mark.parametrize("case", list(TOOL_CASES))
def test_tool_streaming_split_invariance(case):
    text, content, calls = _expected(case)
    for chunks in splits(text):
        parser = Glm47ToolParser(TOOLS)
        got_content, got_calls, _ = stream_tools(parser, chunks)
        assert got_content == (content or ""), chunks
        done = [(n, a) for _, n, a in got_calls[:len(calls)]]
        assert done == calls, chunks
        # An unterminated call may already have streamed its header and some
        # arguments before finish() turned its text into content.
        assert len(got_calls) - len(calls) in (0, 1), chunks
        assert [c.id for c in parser.streamed_tool_calls] == [c[0] for c in got_calls[:len(calls)]]


def test_tool_streaming_is_incremental():
    parser = Glm47ToolParser(TOOLS)
    text = "Sure.\n" + WEATHER
    events = []
    for ch in text:
        res = parser.extract_streaming(ch)
        if res.content:
            events.append(("content", res.content))
        events += [("name", d.name) if d.name else ("args", d.arguments) for d in res.tool_calls]
    res = parser.finish()
    assert res.content is None and not res.tool_calls
    assert "".join(v for k, v in events if k == "content") == "Sure.\n"
    assert [e for e in events if e[0] != "content"] == [
        ("name", "get_weather"), ("args", '{"city": "Paris"'), ("args", ', "days": 3'), ("args", "}")]


def test_tool_partial_tag_held_back():
    parser = Glm47ToolParser(TOOLS)
    assert parser.extract_streaming("Hi <tool_").content == "Hi "
    assert parser.extract_streaming("x").content == "<tool_x"
    assert parser.extract_streaming(" <tool").content == " "
    res = parser.extract_streaming("_call>list_files</tool_call>")
    assert res.content is None
    assert [(d.index, d.name, d.arguments) for d in res.tool_calls] == [(0, "list_files", "{}")]


def test_tool_header_before_arguments_complete():
    parser = Glm47ToolParser(TOOLS)
    res = parser.extract_streaming("<tool_call>search\n<arg_key>query</arg_key><arg_value>ab")
    assert [(d.index, d.type, d.name, d.arguments) for d in res.tool_calls] == [
        (0, "function", "search", None)]
    assert parser.extract_streaming("c</arg_value>").tool_calls[0].arguments == '{"query": "abc"'


def test_registries():
    assert get_tool_parser("glm47") is Glm47ToolParser
    assert get_tool_parser("glm45") is Glm47ToolParser
    assert get_reasoning_parser("glm45") is Glm45ReasoningParser
    with pytest.raises(ValueError, match="glm45, glm47"):
        get_tool_parser("hermes")
    with pytest.raises(ValueError, match="known: glm45"):
        get_reasoning_parser("deepseek_r1")


# (text, enable_thinking, reasoning, content)
REASONING_CASES = {
    "tagged": ("<think>Let me think.</think>The answer is 4.", True, "Let me think.", "The answer is 4."),
    "no_start_tag": ("The user asks...\n</think>\nHi", True, "The user asks...\n", "\nHi"),
    "leading_newline_tag": ("\n<think>abc</think>", True, "abc", None),
    "unterminated": ("still thinking <no end", True, "still thinking <no end", None),
    "partial_end_at_eos": ("reasoning</thi", True, "reasoning</thi", None),
    "content_only": ("</think>only content", True, None, "only content"),
    "unicode_second_end": ("思考中 🤔</think>答案 </think> again", True, "思考中 🤔", "答案 </think> again"),
    "start_lookalike": ("<thinkx</think>y", True, "<thinkx", "y"),
    "whitespace": ("  ", True, "  ", None),
    "empty": ("", True, None, None),
    "disabled": ("<think>x</think>y", False, None, "<think>x</think>y"),
    "disabled_plain": ("Hello", False, None, "Hello"),
}


def stream_reasoning(parser, chunks):
    reasoning = content = ""
    for r, c in [parser.extract_streaming(ch) for ch in chunks] + [parser.finish()]:
        assert r != "" and c != ""
        assert "<think>" not in (r or "") and "</think>" not in (r or "")
        reasoning, content = reasoning + (r or ""), content + (c or "")
    return reasoning, content


@pytest.mark.parametrize("case", list(REASONING_CASES))
def test_reasoning(case):
    text, enabled, reasoning, content = REASONING_CASES[case]
    assert Glm45ReasoningParser(enabled).extract_reasoning(text) == (reasoning, content)
    for chunks in splits(text):
        got = stream_reasoning(Glm45ReasoningParser(enabled), chunks)
        assert got == (reasoning or "", content or ""), chunks


def test_reasoning_delta_spanning_end_tag_is_split():
    parser = Glm45ReasoningParser()
    assert parser.extract_streaming("<think>abc</th") == ("abc", None)
    assert parser.extract_streaming("ink>\nHello") == (None, "\nHello")
    assert parser.extract_streaming(" world") == (None, " world")
    assert parser.finish() == (None, None)


def test_thinking_switch():
    assert thinking_enabled(None) and thinking_enabled({"enable_thinking": True})
    assert not thinking_enabled({"enable_thinking": False})
    assert not thinking_enabled({"thinking": False})
    assert not Glm45ReasoningParser.from_chat_template_kwargs({"thinking": False}).enable_thinking


CHAIN_TEXT = (
    "<think>The user wants the weather in 巴黎 and Tokyo. I'll call get_weather twice.</think>"
    "I'll check both cities.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
    "<arg_value>巴黎</arg_value>\n</tool_call>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
    "<arg_value>Tokyo</arg_value>\n<arg_key>days</arg_key>\n<arg_value>5</arg_value>\n</tool_call>")


def test_reasoning_then_tools_chain():
    """The server's pipeline: reasoning parser first, its content to the tool parser."""
    reasoning, content = Glm45ReasoningParser().extract_reasoning(CHAIN_TEXT)
    tools = Glm47ToolParser(TOOLS).extract_tool_calls(content or "")
    assert reasoning.startswith("The user wants") and tools.content == "I'll check both cities.\n"
    expected = [(c.name, c.arguments) for c in tools.tool_calls]
    assert expected == [("get_weather", '{"city": "巴黎"}'),
                        ("get_weather", '{"city": "Tokyo", "days": 5}')]
    for chunks in splits(CHAIN_TEXT, n_random=100):
        rp, tp = Glm45ReasoningParser(), Glm47ToolParser(TOOLS)
        got_reasoning, fed = "", []
        for r, c in [rp.extract_streaming(ch) for ch in chunks] + [rp.finish()]:
            got_reasoning += r or ""
            fed.append(c or "")
        got_content, got_calls, _ = stream_tools(tp, fed)
        assert got_reasoning == reasoning and got_content == tools.content
        assert [(n, a) for _, n, a in got_calls] == expected
