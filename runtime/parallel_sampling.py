"""n > 1: one client request run as n router requests, their events interleaved on one stream.

As vLLM does, sequence i is the request with `n=1` and seed + i (SamplingParams.child); each has
its own reservation, prefill and decode (no prompt KV is shared between them yet), and takes n
places of the router's admission limit (runtime/serving_service.py). The sequences share the
call's scope: the client's cancel or deadline reaches all of them; the first that fails cancels
the others and its error is the call's. The call ends only once every sequence has (each
releases its decode pages on its way out), or END_WAIT_S after the cancel.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

from splitserve.runtime.deadlines import CallScope
from splitserve.runtime.router import Router, RouterEvent
from splitserve.runtime.sampling_params import SamplingParams

END_WAIT_S = 10.0  # after a cancel, how long the call waits for its sequences to release what they hold


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

    running = 0
    try:
        for index in range(params.n):
            threading.Thread(target=run, args=(index,), name=f"{request_id or 'req'}-seq{index}", daemon=True).start()
            running += 1
        while running:
            index, event, error = arrivals.get()
            if event is not None:
                yield index, event
                continue
            running -= 1  # that sequence has ended
            if error is not None:
                raise error
    finally:
        if running:  # a sequence failed, or the caller stopped reading: stop the others, and wait for them
            scope.cancel()
            _wait_for_ends(arrivals, running)


def _wait_for_ends(arrivals: queue.SimpleQueue, running: int) -> None:
    deadline = time.monotonic() + END_WAIT_S
    while running:
        try:
            _, event, _ = arrivals.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return  # they are daemon threads: the process does not wait for them either
        running -= event is None
