"""Decides when a request is done: eos, stop token ids, stop strings, max_tokens (none of them
before min_tokens, as vLLM's stop checker)."""

from __future__ import annotations

from splitserve.runtime.request import FinishReason, Request


def finish_reason_after_token(request: Request, eos_token_ids: tuple[int, ...]) -> FinishReason | None:
    token = request.output_ids[-1]
    params = request.params
    if len(request.output_ids) < params.min_tokens:  # the sampler held EOS and stop ids back; nothing else ends it
        return None
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
        return FinishReason.STOP
    if len(request.output_ids) >= params.max_tokens:
        return FinishReason.LENGTH
    return None


def stop_reason(request: Request, eos_token_ids: tuple[int, ...], stop_string: str | None) -> str | int | None:
    """What ended a request that finished with "stop", as vLLM's stop_reason: the stop string, or the
    stop token id; None for EOS (which wins over a stop id that is also EOS, as in vLLM)."""
    if stop_string is not None:
        return stop_string
    token = request.output_ids[-1]
    if not request.params.ignore_eos and token in eos_token_ids:
        return None
    return token if token in request.params.stop_token_ids else None


def looks_for_stop_strings(request: Request) -> bool:
    """Whether the newest token's text is searched for stop strings: only after the min_tokens-th
    token, as vLLM's (V1) detokenizer, so a stop string must end past that token's text."""
    return len(request.output_ids) > request.params.min_tokens


def find_stop_string(text: str, stop: tuple[str, ...], new_chars: int) -> int | None:
    """Index where the earliest stop string starts, if one ends within the last `new_chars`."""
    found = find_stop_span(text, stop, new_chars)
    return found[0] if found is not None else None


def find_stop_span(text: str, stop: tuple[str, ...], new_chars: int) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string that ends within the last `new_chars`, if any.

    Only the tail that could hold a newly completed one is searched, for each stop string its own:
    one window for all (sized by the longest) found a short stop string that had ended earlier,
    which min_tokens lets stream past.
    """
    hits = [(i, i + len(s)) for s in stop if (i := text.find(s, max(0, len(text) - new_chars - len(s) + 1))) != -1]
    return min(hits) if hits else None
