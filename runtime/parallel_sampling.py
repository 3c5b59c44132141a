"""n > 1: one client request run as n router requests, their events interleaved on one stream.

As vLLM does, sequence i is the request with `n=1` and seed + i (SamplingParams.child); each has
its own reservation, prefill and decode (no prompt KV is shared between them yet). The children
share the call's scope: the client's cancel or deadline reaches all of them, and the first child
that fails cancels the others, and its error is the call's.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

from splitserve.runtime.deadlines import CallScope
from splitserve.runtime.router import Router, RouterEvent
from splitserve.runtime.sampling_params import SamplingParams


def sequences(router: Router, prompt_ids: list[int], params: SamplingParams, request_id: str, scope: CallScope,
              on_prefill: Callable[[], None] | None = None) -> Iterator[tuple[int, RouterEvent]]:
    """(sequence index, event) as each sequence's events come; ends when every sequence has ended."""
    if params.n == 1:
        for event in router.generate(prompt_ids, params, request_id, scope, on_prefill):
            yield 0, event
        return
    params = params.with_seed()
    arrivals: queue.SimpleQueue = queue.SimpleQueue()  # (index, event or None at its end, error or None)

    def run(index: int) -> None:
        try:
            for event in router.generate(prompt_ids, params.child(index), request_id, scope, on_prefill):
                arrivals.put((index, event, None))
        except BaseException as e:  # noqa: BLE001 - handed to the call's thread, which raises it
            arrivals.put((index, None, e))
        else:
            arrivals.put((index, None, None))

    for index in range(params.n):
        threading.Thread(target=run, args=(index,), name=f"{request_id or 'req'}-seq{index}", daemon=True).start()
    running = params.n
    try:
        while running:
            index, event, error = arrivals.get()
            if error is not None:
                raise error
            if event is None:
                running -= 1
            else:
                yield index, event
    finally:
        if running:  # a sequence failed, or the caller stopped reading: stop the others
            scope.cancel()
