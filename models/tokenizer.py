"""Tokenizer (HF tokenizer.json via the `tokenizers` library) and incremental detokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import tokenizers

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's bytes_to_unicode), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tok = tokenizer
        self._byte_level = '"ByteLevel"' in json.dumps(json.loads(tokenizer.to_str()).get("decoder"))
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @classmethod
    def maybe_load(cls, model_dir: str | Path) -> "Tokenizer | None":
        path = Path(model_dir) / "tokenizer.json"
        if not path.exists():
            return None
        try:
            return cls.from_file(path)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions for a corrupt file
            raise ValueError(f"{path} does not load: {e}") from None

    def to_json(self) -> str:
        """The tokenizer.json text (what llguidance builds its token table from)."""
        return self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: a byte-level piece mapped back to bytes, a SentencePiece
        byte (<0xNN>) or piece ("▁" is a space), an added token's text. A piece may be part of a
        UTF-8 character (decode([id]) makes that "\ufffd")."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if m := BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        if token_id in self._added:
            return self._added[token_id].encode()
        if self._byte_level:
            return bytes(BYTE_LEVEL_ALPHABET[c] if c in BYTE_LEVEL_ALPHABET else ord(c) for c in piece)
        return piece.replace("\u2581", " ").encode()


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas without re-decoding the whole output.

    Decodes a short window (tokens since the last emitted boundary) and holds text back
    while it ends in an incomplete UTF-8 sequence ("\ufffd"), as byte-level BPE splits
    characters across tokens.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or [])[-4:]  # context for leading-space rules
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        after = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta
