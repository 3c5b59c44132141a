"""Decode/StreamBatched on the worker: the tokens of many requests, one message per decode step.

The router opens one StreamBatched call per decode worker and sends a DecodeRequest on it for
each request it starts there. The engine puts each request's tokens into the call's pending
batch (through a RequestOutput) and flushes once per step, so a step of 64 requests costs one
gRPC message, not 64. Python gRPC pays per message on both ends (a thread handoff and a C-core
round trip each way), and per token that cost was larger than the model's on a small model
(scripts/bench/RESULTS.md, "Tokens of many requests in one message").

    engine thread: _emit ──► RequestOutput.put ──► BatchedCall pending ──flush──► outbox
    handler thread: StreamBatched yields outbox batches as TokenBatch messages
"""

from __future__ import annotations

import threading
from typing import Iterator

from splitserve.protos import internal_pb2
from splitserve.runtime.decode_engine import END, StreamError

_CLOSED = object()  # ends the handler's loop
# At most this many entries in one message when a call that fell behind sends what waited: far
# below gRPC's message size limit (an entry is a request id, a token, a few bytes more).
MAX_MERGED_ENTRIES = 4096


class CallClosed(Exception):
    """The call has ended: no request can start on it."""


class AlreadyStarted(Exception):
    """The request is already open on this call (a caller's mistake): the running one goes on."""


class BatchedCall:
    """The requests started on one StreamBatched call, and their tokens not yet sent.

    Bounded like a per-request stream: a request holds at most its max_tokens tokens here, and
    the engine decodes only started requests.
    """

    def __init__(self):
        self._lock = threading.Condition()
        self._pending: dict[str, internal_pb2.RequestTokens] = {}  # this step's entries, not yet flushed
        self._outbox: list[internal_pb2.TokenBatch | object] = []
        self._open: set[str] = set()  # started here and not ended
        self._half_closed = False  # the caller sends no more requests: close once none is open
        self._closed = False

    def output(self, request_id: str) -> "RequestOutput":
        """Registers a request starting on this call; raises CallClosed once the call has ended (its
        open requests were then already collected for release, so a later one would be missed),
        AlreadyStarted if it is open here already."""
        with self._lock:
            if self._closed:
                raise CallClosed(f"the call ended before request {request_id} could start")
            if request_id in self._open:
                raise AlreadyStarted(f"request {request_id} is already started on this call")
            self._open.add(request_id)
        return RequestOutput(self, request_id)

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def fail(self, request_id: str, code: str, message: str) -> None:
        """Ends a request that could not start (sent at once)."""
        with self._lock:
            entry = self._entry(request_id)
            entry.error_code, entry.error = code, message
            self._flush_locked()
            self._ended(request_id)

    def open_requests(self) -> list[str]:
        with self._lock:
            return sorted(self._open)

    def add(self, request_id: str, item) -> None:
        with self._lock:
            if request_id not in self._open:
                return  # ended already (its last entry is out or pending)
            entry = self._entry(request_id)
            if item is END:  # released before it finished
                entry.error_code, entry.error = "CANCELLED", f"request {request_id} was released"
                self._ended(request_id)
            elif isinstance(item, StreamError):
                entry.error_code, entry.error = item.code, str(item)
                self._ended(request_id)
            else:
                token, reason, logprobs = item
                entry.token_ids.append(token)
                if logprobs is not None:
                    entry.logprobs.append(logprobs.to_proto(internal_pb2.TokenLogprobs))
                if reason is not None:
                    entry.finish_reason = reason.value
                    self._ended(request_id)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def half_close(self) -> None:
        with self._lock:
            self._half_closed = True
            if not self._open:
                self._close_locked()

    def _close_locked(self) -> None:
        self._closed = True
        self._flush_locked()
        if _CLOSED not in self._outbox:
            self._outbox.append(_CLOSED)
        self._lock.notify()

    def _ended(self, request_id: str) -> None:
        self._open.discard(request_id)
        if self._half_closed and not self._open:
            self._close_locked()

    def messages(self) -> Iterator[internal_pb2.TokenBatch]:
        """Yields batches as they are flushed until close(); if the call fell behind, the flushes
        waiting are merged into one message (a request may then have several entries, in order)."""
        while True:
            with self._lock:
                while not self._outbox:
                    self._lock.wait()
                batches, self._outbox = self._outbox, []
            closed = any(b is _CLOSED for b in batches)
            batches = [b for b in batches if b is not _CLOSED]
            yield from _merged(batches)
            if closed:
                return

    def _entry(self, request_id: str) -> internal_pb2.RequestTokens:
        entry = self._pending.get(request_id)
        if entry is None:
            entry = self._pending[request_id] = internal_pb2.RequestTokens(request_id=request_id)
        return entry

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        self._outbox.append(internal_pb2.TokenBatch(requests=list(self._pending.values())))
        self._pending = {}
        self._lock.notify()


def _merged(batches: list[internal_pb2.TokenBatch]) -> Iterator[internal_pb2.TokenBatch]:
    """Batches that waited together, as few messages as MAX_MERGED_ENTRIES allows (order kept)."""
    merged = internal_pb2.TokenBatch()
    for batch in batches:
        if merged.requests and len(merged.requests) + len(batch.requests) > MAX_MERGED_ENTRIES:
            yield merged
            merged = internal_pb2.TokenBatch()
        merged.requests.extend(batch.requests)
    if merged.requests:
        yield merged


class RequestOutput:
    """One request's StreamOutput (runtime/decode_engine.py) on a BatchedCall."""

    def __init__(self, call: BatchedCall, request_id: str):
        self.call = call
        self.request_id = request_id
        # The call's own bound method: equal for every request of the call, so the engine, which
        # collects the flushes of a step in a set, flushes each call once, not once per request.
        self.flush = call.flush

    def put(self, item) -> None:
        self.call.add(self.request_id, item)
