"""Byte-level tokenizer and GLM-5 chat template for the built-in tiny model.

The tokenizer is built locally with the `tokenizers` library (no hub access):
256 byte tokens (ids 0..255, GPT-2 byte-to-unicode symbols in byte order), no
merges, then GLM-5's special tokens as added special tokens (ids 256..).
Every string round-trips exactly, which is all a random-weight model needs.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
    "<tool_response>", "</tool_response>",
]
# GLM-5 stops on these: end of text, the next user turn, or a tool call
# handing control to the caller (which answers with an observation).
EOS_TOKENS: list[str] = ["<|endoftext|>", "<|user|>", "<|observation|>"]
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 202752
NUM_BYTE_TOKENS = 256
CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode char (the GPT-2 byte-level scheme).

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...)
    are shifted to 256+n in byte order so no symbol is whitespace/control.
    """
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)}
    mapping: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def special_token_ids() -> dict[str, int]:
    """Deterministic ids of the special tokens (they follow the byte tokens)."""
    return {tok: NUM_BYTE_TOKENS + i for i, tok in enumerate(SPECIAL_TOKENS)}


def load_chat_template() -> str:
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


def build_backend_tokenizer():
    """The `tokenizers.Tokenizer` object (byte-level BPE, no merges)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    byte_map = bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(NUM_BYTE_TOKENS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Only fixes offsets; adds no BOS/EOS (the chat template writes [gMASK]<sop>).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # normalized=False: match the literal text, so "<|user|>" is always one token.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tokenizer_config(chat_template: str) -> dict:
    """Contents of tokenizer_config.json."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "extra_special_tokens": [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        "add_bos_token": False,
        "add_eos_token": False,
        # Cleanup would rewrite " ." -> "." and break exact round-trips.
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")


def write_tiny_tokenizer(out_dir: str | Path) -> int:
    """Write tokenizer files into `out_dir`; return the vocabulary size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_backend_tokenizer()
    chat_template = load_chat_template()
    _write_text(out / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    config = tokenizer_config(chat_template)
    _write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                   "additional_special_tokens": config["extra_special_tokens"]}
    _write_text(out / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
    _write_text(out / "chat_template.jinja", chat_template)
    return tok.get_vocab_size(with_added_tokens=True)
