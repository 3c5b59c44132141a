"""A request's output text: incremental detokenization plus stop strings.

Used wherever tokens turn into text (the colocated engine, the router), so both cut
text at a stop string the same way: the stop string itself is not part of the text.
"""

from __future__ import annotations

from splitserve.models.tokenizer import IncrementalDetokenizer, Tokenizer
from splitserve.runtime.stop_rules import find_stop_string


class TextStream:
    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int], stop: tuple[str, ...]):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self._stop = stop

    @property
    def text(self) -> str:
        return self._detok.text if self._detok is not None else ""

    def add(self, token: int, *, is_eos: bool = False) -> tuple[str, bool]:
        """Adds a token; returns (new text, whether a stop string ended the text).

        An EOS token adds no text (it is a special token).
        """
        if self._detok is None or is_eos:
            return "", False
        delta = self._detok.add(token)
        cut = find_stop_string(self._detok.text, self._stop, len(delta))
        if cut is None:
            return delta, False
        delta = delta[: max(0, len(delta) - (len(self._detok.text) - cut))]
        self._detok.text = self._detok.text[:cut]
        return delta, True
