"""Decides when a request is done: eos, stop token ids, stop strings, max_tokens."""

from __future__ import annotations

from splitserve.runtime.request import FinishReason, Request


def finish_reason_after_token(request: Request, eos_token_ids: tuple[int, ...]) -> FinishReason | None:
    token = request.output_ids[-1]
    params = request.params
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
        return FinishReason.STOP
    if len(request.output_ids) >= params.max_tokens:
        return FinishReason.LENGTH
    return None


def find_stop_string(text: str, stop: tuple[str, ...], new_chars: int) -> int | None:
    """Index where the earliest stop string starts, if one ends within the last `new_chars`.

    Only the tail that could contain a newly completed stop string is searched.
    """
    if not stop:
        return None
    window_start = max(0, len(text) - new_chars - max(len(s) for s in stop) + 1)
    hits = [i for s in stop if (i := text.find(s, window_start)) != -1]
    return min(hits) if hits else None
