"""Incremental detokenization that never emits half of a multi-byte UTF-8 character."""
from __future__ import annotations

_REPLACEMENT = "\ufffd"
_CONTEXT = 6  # tokens decoded before the new ones so merges and spacing come out right


class IncrementalDetokenizer:
    """Turns a growing id list into text deltas.

    Decodes ids[prefix:] and ids[prefix:read]; the difference is the new text. While the tail
    decodes to U+FFFD (an incomplete UTF-8 sequence split across byte tokens) nothing is emitted.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.read = len(prompt_ids)
        self.prefix = max(0, self.read - _CONTEXT)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def step(self, all_ids: list[int]) -> str:
        """New text after all_ids grew by some tokens (may be "" while a character is incomplete)."""
        prefix_text = self._decode(all_ids[self.prefix:self.read])
        text = self._decode(all_ids[self.prefix:])
        if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
            new = text[len(prefix_text):]
            self.prefix, self.read = self.read, len(all_ids)
            return new
        return ""

    def flush(self, all_ids: list[int]) -> str:
        """At the end of generation: whatever is left, replacement characters included."""
        prefix_text = self._decode(all_ids[self.prefix:self.read])
        text = self._decode(all_ids[self.prefix:])
        self.read = len(all_ids)
        return text[len(prefix_text):] if len(text) > len(prefix_text) else ""
