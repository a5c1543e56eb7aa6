"""Tests for the tiny model's byte-level tokenizer and GLM-5 chat template."""

import json
import random

import jinja2
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from glm5_ascend.model.tiny_tokenizer import (
    EOS_TOKENS, SPECIAL_TOKENS, bytes_to_unicode, load_chat_template, special_token_ids,
    write_tiny_tokenizer,
)

# Spelled out again so a reorder in the module is caught (ids are part of the model).
EXPECTED_SPECIALS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
    "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>",
]
TOOLS_HEADER = (
    "<|system|># Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, output the function name and arguments within the "
    "following XML format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key>"
    "<arg_value>{arg-value-1}</arg_value>...</tool_call>"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tok")
    assert write_tiny_tokenizer(d) == 256 + len(EXPECTED_SPECIALS)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_loads_fast_with_expected_config(tok):
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.is_fast
    assert len(tok) == 278
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == 256
    assert tok.model_max_length == 202752
    assert EOS_TOKENS == ["<|endoftext|>", "<|user|>", "<|observation|>"]


def test_special_tokens_single_with_fixed_ids(tok):
    assert SPECIAL_TOKENS == EXPECTED_SPECIALS
    assert special_token_ids() == {t: 256 + i for i, t in enumerate(EXPECTED_SPECIALS)}
    for i, t in enumerate(EXPECTED_SPECIALS):
        assert tok.convert_tokens_to_ids(t) == 256 + i
        assert tok.encode(t) == [256 + i]
        assert tok.encode(f"a{t}b") == [ord("a"), 256 + i, ord("b")]
    assert tok.encode("<|user|>hi") == [263, ord("h"), ord("i")]


def test_byte_tokens_in_byte_order(tok):
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256)) and len(set(mapping.values())) == 256
    assert tok.convert_ids_to_tokens(list(range(256))) == [mapping[b] for b in range(256)]
    assert tok.encode("A \x00\n") == [65, 32, 0, 10]
    assert tok.encode("é") == list("é".encode())


def test_no_automatic_bos_eos(tok):
    text = "hello world, 你好"
    assert tok.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=False)
    assert tok.encode(text) == list(text.encode())


def _random_text(rng):
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
              (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    chars = []
    for _ in range(rng.randrange(0, 40)):
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        chars.append(chr(c) if not 0xD800 <= c <= 0xDFFF else " ")  # no lone surrogates
        if rng.random() < 0.1:
            chars.append(rng.choice([" ", "  ", "\n", "\r\n", "\t", " ."]))
    return "".join(chars)


def test_roundtrip_arbitrary_unicode(tok):
    rng = random.Random(1234)
    samples = [_random_text(rng) for _ in range(400)]
    samples += ["", " ", "  leading", "trailing  ", "a\u0301", "👨‍👩‍👧", "\x00\x1b[0m", "\ufffd",
                "中文 text ,mixed . spaces", "<|user|>literal<think>x</think>"]
    for s in samples:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, repr(s)
    assert tok.batch_decode([tok.encode(s) for s in samples[:20]]) == samples[:20]


def test_skip_special_tokens(tok):
    ids = tok.encode("[gMASK]<sop><|user|>Hi 你好<|assistant|><think>r</think>ok<|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "Hi 你好rok"


def test_split_multibyte_char_needs_incremental_detok(tok):
    ids = tok.encode("😀")
    assert ids == list("😀".encode()) and len(ids) == 4
    # Any strict prefix is invalid UTF-8: decoded alone it yields U+FFFD,
    # so streaming must hold bytes back until a full character arrives.
    for k in range(1, 4):
        assert "\ufffd" in tok.decode(ids[:k])
    assert tok.decode(ids[:2]) + tok.decode(ids[2:]) != "😀"
    assert tok.decode(ids) == "😀"


def test_deterministic_files(tok_dir, tmp_path):
    write_tiny_tokenizer(tmp_path)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"]:
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == load_chat_template()
    assert (tmp_path / "chat_template.jinja").read_text() == load_chat_template()


def test_template_system_user(tok):
    msgs = [{"role": "system", "content": "You are X"}, {"role": "user", "content": "Hi"}]
    assert render(tok, msgs, add_generation_prompt=True) == (
        "[gMASK]<sop><|system|>You are X<|user|>Hi<|assistant|><think>")
    assert render(tok, msgs) == "[gMASK]<sop><|system|>You are X<|user|>Hi"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert ids[:3] == [258, 260, 262] and ids[-2:] == [264, 268]


def test_template_thinking_disabled(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    assert render(tok, msgs, add_generation_prompt=True, enable_thinking=False) == (
        "[gMASK]<sop><|user|>Hi<|assistant|></think>")
    assert render(tok, msgs, add_generation_prompt=True, enable_thinking=True) == (
        "[gMASK]<sop><|user|>Hi<|assistant|><think>")


def test_template_reasoning_only_after_last_user(tok):
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning": "r2"},
    ]
    assert render(tok, msgs) == (
        "[gMASK]<sop><|user|>q1<|assistant|></think>a1<|user|>q2<|assistant|><think>r2</think>a2")
    msgs.append({"role": "user", "content": "q3"})
    assert render(tok, msgs, add_generation_prompt=True) == (
        "[gMASK]<sop><|user|>q1<|assistant|></think>a1<|user|>q2<|assistant|></think>a2"
        "<|user|>q3<|assistant|><think>")


def test_template_tools_and_tool_calls(tok):
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Paris and 北京?"},
        {"role": "assistant", "content": "", "reasoning_content": "use tool", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Paris", "days": 2}}},
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "北京", "opts": {"u": "c"}}}},
        ]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
    ]
    expected = (
        "[gMASK]<sop>" + TOOLS_HEADER + json.dumps(tool, ensure_ascii=False) + "\n" + TOOLS_FOOTER
        + "<|system|>Be brief.<|user|>Paris and 北京?<|assistant|><think>use tool</think>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value>"
        '<arg_key>opts</arg_key><arg_value>{"u": "c"}</arg_value></tool_call>'
        "<|observation|><tool_response>sunny</tool_response><tool_response>rain</tool_response>"
        "<|assistant|><think>"
    )
    assert render(tok, msgs, tools=[tool], add_generation_prompt=True) == expected


def test_template_rejects_string_arguments(tok):
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    with pytest.raises(jinja2.TemplateError, match="mapping"):
        render(tok, msgs)


def test_template_list_of_parts(tok):
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "Sys"}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello "},
                                     {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]},
        {"role": "tool", "content": [{"type": "text", "text": "out"}]},
    ]
    assert render(tok, msgs) == (
        "[gMASK]<sop><|system|>Sys<|user|>Hello world<|assistant|></think>Hi!"
        "<|observation|><tool_response>out</tool_response>")
