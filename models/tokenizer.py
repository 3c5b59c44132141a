"""Tokenizer (HF tokenizer.json via the `tokenizers` library) and incremental detokenizer."""

from __future__ import annotations

from pathlib import Path

import tokenizers


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tok = tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @classmethod
    def maybe_load(cls, model_dir: str | Path) -> "Tokenizer | None":
        path = Path(model_dir) / "tokenizer.json"
        return cls.from_file(path) if path.exists() else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas without re-decoding the whole output.

    Decodes a short window (tokens since the last emitted boundary) and holds text back
    while it ends in an incomplete UTF-8 sequence ("\ufffd"), as byte-level BPE splits
    characters across tokens.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids or [])[-4:]  # context for leading-space rules
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read])
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta
