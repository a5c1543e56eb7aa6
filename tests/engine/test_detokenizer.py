"""Incremental detokenization across split UTF-8 characters."""
from __future__ import annotations

import random

from transformers import AutoTokenizer

from glm5_ascend.engine.detokenizer import IncrementalDetokenizer


def test_streamed_text_equals_whole_decode_with_split_characters(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    alphabet = "ab 中文字😀🎉é\n"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        prompt = tok.encode("prefix: ")
        ids = list(prompt)
        detok = IncrementalDetokenizer(tok, prompt)
        pieces = []
        for t in tok.encode(text):
            ids.append(t)
            piece = detok.step(ids)
            assert "\ufffd" not in piece  # never half a character
            pieces.append(piece)
        assert "".join(pieces) == text
