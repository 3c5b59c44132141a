"""A request's output text: incremental detokenization plus stop strings.

Used wherever tokens turn into text (the colocated engine, the router), so both cut
text at a stop string the same way: the stop string itself is not part of the text.

Streamed text never shows a piece of a stop string: text that could be the start of one
(" onc" while "e f" is a stop string and the text ends in "e") is held back until the next
token settles it, or the request ends. So the deltas always add up to the final text.
With include_stop (vLLM's include_stop_str_in_output) the text ends with the stop string
instead, and nothing is held back (it would be shown either way); a stop token's text is kept
too, as vLLM keeps it (EOS, a special token, decodes to nothing).
"""

from __future__ import annotations

from splitserve.models.tokenizer import IncrementalDetokenizer, Tokenizer
from splitserve.runtime.stop_rules import find_stop_span


class TextStream:
    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int], stop: tuple[str, ...],
                 include_stop: bool = False, skip_special_tokens: bool = True):
        self._detok = (IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
                       if tokenizer is not None else None)
        self._stop = stop
        self._include_stop = include_stop
        self._sent = 0  # characters of the text handed out so far
        self.stop_string: str | None = None  # the stop string that ended the text, once one has

    @property
    def text(self) -> str:
        return self._detok.text if self._detok is not None else ""

    def add(self, token: int, *, stop_token: bool = False, last: bool = False,
            find_stop: bool = True) -> tuple[str, bool]:
        """Adds a token; returns (new text, whether a stop string ended the text).

        `last`: the request ends with this token (length, EOS, a stop token), so nothing is held
        back. `stop_token`: the token ended the request as EOS or one of stop_token_ids; it adds no
        text unless include_stop, and then its text is searched for stop strings too (as vLLM; its
        id stays in the token ids either way). `find_stop`:
        False while min_tokens is not reached (stop strings are not looked for yet).
        """
        if self._detok is None:
            return "", False
        stopped = False
        if not stop_token or self._include_stop:  # a stop token's text is kept only with include_stop
            delta = self._detok.add(token)
            span = find_stop_span(self._detok.text, self._stop, len(delta)) if find_stop else None
            if span is not None:
                self.stop_string = self._detok.text[span[0]: span[1]]
                self._detok.text = self._detok.text[: span[1] if self._include_stop else span[0]]
                stopped = True
        text = self._detok.text
        held = 0 if stopped or last or self._include_stop else _stop_prefix_length(text, self._stop)
        end = len(text) - held
        delta, self._sent = text[self._sent:end], max(self._sent, end)
        return delta, stopped


def _stop_prefix_length(text: str, stop: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that is the start of a stop string (not all of it)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
