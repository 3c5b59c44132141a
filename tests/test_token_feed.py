"""TokenFeed, the router's end of Decode/StreamBatched, against a scripted worker on a real gRPC
server: entries reach their own request, a broken call fails every request on it and the next
start opens a new call, and a cancel wakes a waiting request."""

import queue
import threading
from concurrent import futures

import grpc
import pytest

from splitserve.protos import internal_pb2, internal_pb2_grpc
from splitserve.runtime.token_feed import FeedCancelled, FeedError, TokenFeed


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
