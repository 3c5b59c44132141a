"""TokenFeed, the router's end of Decode/StreamBatched, against a scripted worker on a real gRPC
server: entries reach their own request, a broken call fails every request on it and the next
start opens a new call, a cancel wakes a waiting request, and keepalive pings end a call whose
peer went silent (and do not end an idle one)."""

import queue
import threading
import time
from concurrent import futures

import grpc
import pytest

from splitserve.protos import internal_pb2, internal_pb2_grpc
from splitserve.runtime import grpc_common
from splitserve.runtime.token_feed import FeedCancelled, FeedError, TokenFeed
from tcp_relay import TcpRelay


class ScriptedDecode(internal_pb2_grpc.DecodeServicer):
    """Per call: answers each started request with its id's length as a token; a request named
    "break" makes the call fail UNAVAILABLE."""

    def __init__(self):
        self.calls = 0

    def StreamBatched(self, request_iterator, context):
        self.calls += 1
        for request in request_iterator:
            if request.request_id == "break":
                context.abort(grpc.StatusCode.UNAVAILABLE, "worker went away")
            yield internal_pb2.TokenBatch(requests=[internal_pb2.RequestTokens(
                request_id=request.request_id, token_ids=[len(request.request_id)])])


@pytest.fixture
def feed_and_worker():
    server = grpc.server(futures.ThreadPoolExecutor(8))
    worker = ScriptedDecode()
    internal_pb2_grpc.add_DecodeServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    broken = queue.SimpleQueue()
    feed = TokenFeed(internal_pb2_grpc.DecodeStub(channel), on_broken=broken.put)
    yield feed, worker, broken
    feed.close()
    channel.close()
    server.stop(0)


def test_entries_reach_their_request_and_a_broken_call_fails_the_rest(feed_and_worker):
    feed, worker, broken = feed_and_worker
    sampling = internal_pb2.ResolvedSampling(max_tokens=4)
    a, bb = feed.start("a", sampling), feed.start("bb", sampling)
    assert list(bb.next(timeout=10).token_ids) == [2]
    assert list(a.next(timeout=10).token_ids) == [1]
    waiting = feed.start("ccc", sampling)
    assert list(waiting.next(timeout=10).token_ids) == [3]
    feed.start("break", sampling)  # the call fails: every request still on it hears UNAVAILABLE
    for stream in (a, bb, waiting):
        with pytest.raises(FeedError) as err:
            stream.next(timeout=10)
        assert err.value.code is grpc.StatusCode.UNAVAILABLE and "worker went away" in str(err.value)
    assert "worker went away" in broken.get(timeout=10)
    again = feed.start("dddd", sampling)  # a new call
    assert list(again.next(timeout=10).token_ids) == [4] and worker.calls == 2


def test_cancel_wakes_a_waiting_request_and_close_is_not_a_worker_fault(feed_and_worker):
    feed, _, broken = feed_and_worker
    stream = feed.start("x", internal_pb2.ResolvedSampling(max_tokens=4))
    stream.next(timeout=10)
    threading.Timer(0.1, stream.cancel).start()
    with pytest.raises(FeedCancelled):
        stream.next(timeout=10)  # nothing more comes for "x": only the cancel ends the wait
    with pytest.raises(queue.Empty):
        stream.next(timeout=0.05)  # after the cancel, nothing else is queued
    feed.close()
    with pytest.raises(queue.Empty):
        broken.get(timeout=0.5)  # the router closing its own call marks no worker down


# -- keepalive: a peer that goes silent without closing its connection ------------------------------
class HeldDecode(internal_pb2_grpc.DecodeServicer):
    """Answers each started request with one token and keeps the call open; `ended` is set when the
    call ends on the worker's side."""

    def __init__(self):
        self.calls = 0
        self.ended = threading.Event()

    def StreamBatched(self, request_iterator, context):
        self.calls += 1
        context.add_callback(self.ended.set)
        for request in request_iterator:
            yield internal_pb2.TokenBatch(requests=[internal_pb2.RequestTokens(
                request_id=request.request_id, token_ids=[len(request.request_id)])])


@pytest.fixture
def feed_through_relay(monkeypatch):
    """A TokenFeed whose call passes through a TcpRelay, with the production server and channel
    set-up (grpc_common) and pings every 0.25 s."""
    monkeypatch.setattr(grpc_common, "KEEPALIVE", grpc_common.Keepalive(time_ms=250, timeout_ms=2500))
    server = grpc_common.make_server(max_workers=8)
    worker = HeldDecode()
    internal_pb2_grpc.add_DecodeServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    relay = TcpRelay(f"127.0.0.1:{port}")
    channels = grpc_common.ChannelPool()
    broken = queue.SimpleQueue()
    feed = TokenFeed(internal_pb2_grpc.DecodeStub(channels.get(relay.address)), on_broken=broken.put)
    yield feed, worker, relay, broken
    feed.close()
    channels.close()
    relay.close()
    server.stop(0)


def test_a_silent_worker_fails_the_feed_within_the_keepalive(feed_through_relay):
    feed, worker, relay, broken = feed_through_relay
    sampling = internal_pb2.ResolvedSampling(max_tokens=4)
    stream = feed.start("a", sampling)
    assert list(stream.next(timeout=10).token_ids) == [1]
    relay.go_silent()
    started = time.monotonic()
    with pytest.raises(FeedError) as err:
        stream.next(timeout=20)  # without pings, nothing would end this wait
    assert err.value.code is grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 10
    broken.get(timeout=5)  # the worker is marked down
    assert worker.ended.wait(10)  # and the worker's pings end its side: what the call held is released


def test_an_idle_feed_outlives_many_keepalive_pings(feed_through_relay):
    feed, worker, _, broken = feed_through_relay
    sampling = internal_pb2.ResolvedSampling(max_tokens=4)
    assert list(feed.start("a", sampling).next(timeout=10).token_ids) == [1]
    time.sleep(4)  # 8 or more pings each way on a call with nothing to send (a server with gRPC's
    # default policy closes the connection after the third, GOAWAY too_many_pings)
    with pytest.raises(queue.Empty):
        broken.get(timeout=0.05)  # the worker accepted the router's pings (no GOAWAY too_many_pings)
    assert list(feed.start("bb", sampling).next(timeout=10).token_ids) == [2]
    assert worker.calls == 1 and not worker.ended.is_set()


class RepeatingDecode(internal_pb2_grpc.DecodeServicer):
    """Answers each started request with `max_tokens` messages of one token each, 1, 2, 3, ..., sent
    at once, then a message that fails the request NOT_FOUND."""

    def StreamBatched(self, request_iterator, context):
        for request in request_iterator:
            for token in range(1, request.sampling.max_tokens + 1):
                yield internal_pb2.TokenBatch(requests=[internal_pb2.RequestTokens(
                    request_id=request.request_id, token_ids=[token])])
            yield internal_pb2.TokenBatch(requests=[internal_pb2.RequestTokens(
                request_id=request.request_id, error_code="NOT_FOUND", error="gone")])


def test_a_reader_behind_takes_every_waiting_entry_at_once_and_then_the_error():
    server = grpc_common.make_server(max_workers=4)
    internal_pb2_grpc.add_DecodeServicer_to_server(RepeatingDecode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channels = grpc_common.ChannelPool()
    feed = TokenFeed(internal_pb2_grpc.DecodeStub(channels.get(f"127.0.0.1:{port}")), on_broken=lambda why: None)
    try:
        stream = feed.start("r", internal_pb2.ResolvedSampling(max_tokens=5))
        deadline = time.monotonic() + 10
        while stream._items.qsize() < 6 and time.monotonic() < deadline:  # five entries and the error
            time.sleep(0.01)  # arrive while nobody reads
        assert [t for e in stream.next_ready(timeout=10) for t in e.token_ids] == [1, 2, 3, 4, 5]
        with pytest.raises(FeedError) as err:  # the error comes after the entries before it
            stream.next_ready(timeout=10)
        assert err.value.code is grpc.StatusCode.NOT_FOUND and "gone" in str(err.value)
    finally:
        feed.close()
        channels.close()
        server.stop(0)
