"""The router's end of Decode/StreamBatched: one call per decode worker, shared by every request
the router decodes there (runtime/token_batches.py is the worker's end).

    Generate thread:  feed.start(request_id, sampling[, prompt_ids]) -> FeedStream; stream.next(timeout) per entry
    reader thread:    reads TokenBatch messages, hands each entry to its request's FeedStream

One message per decode step carries every request's new tokens, instead of one message per
request and token: per message, Python gRPC costs a thread handoff and a C-core round trip on
each end. A call that breaks (the worker died, restarted or drained away) fails every request
on it with UNAVAILABLE and marks the worker down; the next start opens a new call.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterator

import grpc

from splitserve.protos import internal_pb2, internal_pb2_grpc

log = logging.getLogger(__name__)


class FeedError(Exception):
    """A request's tokens stopped: `code` (grpc.StatusCode) says why, as the worker or the call put it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


_CANCELLED = object()  # queued by FeedStream.cancel


class FeedCancelled(Exception):
    """FeedStream.cancel() was called (the client went away)."""


class FeedStream:
    """One request's entries (internal_pb2.RequestTokens) from the shared call, in order."""

    def __init__(self, feed: "TokenFeed", request_id: str, call: object):
        self.feed = feed
        self.request_id = request_id
        self.call = call  # the call it was started on: a break of that call ends it
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._held = None  # an end found behind entries by next_ready(), for the call after

    def next(self, timeout: float | None) -> internal_pb2.RequestTokens:
        """The next entry; raises queue.Empty after `timeout` s, FeedError if the request stopped
        without finishing, FeedCancelled after cancel()."""
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = self._items.get(timeout=timeout)
        if item is _CANCELLED:
            raise FeedCancelled(f"request {self.request_id} was cancelled")
        if isinstance(item, FeedError):
            raise item
        if item.error_code:
            code = getattr(grpc.StatusCode, item.error_code, grpc.StatusCode.UNKNOWN)
            raise FeedError(code, item.error)
        return item

    def next_ready(self, timeout: float | None) -> list[internal_pb2.RequestTokens]:
        """The next entry and every entry already queued behind it, so that a reader that fell
        behind catches up in one go; raises as next() does. An end queued behind entries (an
        error, a cancel) is raised by the call after, once those entries are passed on."""
        entries = [self.next(timeout)]
        while self._held is None:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                break
            if item is _CANCELLED or isinstance(item, FeedError) or item.error_code:
                self._held = item
            else:
                entries.append(item)
        return entries

    def cancel(self) -> None:
        """Wakes a thread blocked in next() (thread-safe; CallScope.cancelling calls it)."""
        self._items.put(_CANCELLED)

    def close(self) -> None:
        """Stops delivery to this stream (its request is done or released)."""
        self.feed._forget(self)

    def _put(self, item) -> None:
        self._items.put(item)


class TokenFeed:
    """The StreamBatched call to one decode worker. `on_broken(why)`: called when the call ends other
    than by close() (the router marks the worker down until its health check answers again)."""

    def __init__(self, stub: internal_pb2_grpc.DecodeStub, on_broken: Callable[[str], None]):
        self._stub = stub
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self._call = None
        self._outgoing: queue.SimpleQueue | None = None
        self._streams: dict[str, FeedStream] = {}

    def start(self, request_id: str, sampling: internal_pb2.ResolvedSampling, prompt_ids: list[int] = ()
              ) -> FeedStream:
        """Starts decoding a reserved request; its entries arrive on the returned stream. `prompt_ids`:
        sent only with a repetition penalty (the worker penalises them)."""
        with self._lock:
            if self._call is None:
                self._open_call()
            stream = self._streams[request_id] = FeedStream(self, request_id, self._call)
            self._outgoing.put(internal_pb2.DecodeRequest(request_id=request_id, sampling=sampling,
                                                          prompt_ids=prompt_ids))
        return stream

    def close(self) -> None:
        """Ends the call (the worker releases whatever is still on it)."""
        with self._lock:
            call, self._call = self._call, None
            if self._outgoing is not None:
                self._outgoing.put(None)
            self._outgoing = None  # closed: its end is not the worker's fault
        if call is not None:
            call.cancel()

    def _open_call(self) -> None:
        outgoing: queue.SimpleQueue = queue.SimpleQueue()

        def requests() -> Iterator[internal_pb2.DecodeRequest]:
            while (item := outgoing.get()) is not None:
                yield item

        call = self._stub.StreamBatched(requests())  # no deadline: it lives as long as the worker
        self._call, self._outgoing = call, outgoing
        threading.Thread(target=self._read, args=(call,), name="token-feed", daemon=True).start()

    def _read(self, call) -> None:
        why = "the decode worker ended the token stream"
        try:
            for batch in call:
                for entry in batch.requests:
                    with self._lock:
                        stream = self._streams.get(entry.request_id)
                    if stream is not None:
                        stream._put(entry)
        except grpc.RpcError as e:
            why = f"decode token stream failed: {e.code().name} {e.details()}"
        except Exception as e:  # noqa: BLE001 - whatever ends the reader, no request may wait on it forever
            log.exception("token feed reader failed")
            why = f"decode token stream failed: {e!r}"
        finally:
            self._broken(call, why)

    def _broken(self, call, why: str) -> None:
        """The call ended: every request still on it fails UNAVAILABLE (a status about the call, not the
        request), and the next start opens a new call."""
        with self._lock:
            closing = self._call is None and self._outgoing is None
            if self._call is call:
                self._call = None
                self._outgoing.put(None)
            broken = [s for s in self._streams.values() if s.call is call]
            for stream in broken:
                del self._streams[stream.request_id]
        if not closing:
            self._on_broken(why)
        for stream in broken:
            stream._put(FeedError(grpc.StatusCode.UNAVAILABLE, why))
        if broken:
            log.warning("%s; %d requests on it failed", why, len(broken))

    def _forget(self, stream: FeedStream) -> None:
        with self._lock:
            if self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]
