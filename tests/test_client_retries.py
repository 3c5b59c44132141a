"""The SDK's retries stay inside the call's deadline: a router that answers UNAVAILABLE slowly
must not stretch a 1 s call to several seconds (each retry used to get a whole new timeout)."""

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest

from splitserve.protos import serving_pb2_grpc
from splitserve.runtime.client import AsyncClient, Client, SplitserveError

SLOW_S = 0.6  # how long the fake router takes to answer UNAVAILABLE


class SlowlyUnavailable(serving_pb2_grpc.ServingServicer):
    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()

    def Generate(self, request, context):
        with self._lock:
            self.calls += 1
        time.sleep(SLOW_S)
        context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is reachable")


@pytest.fixture
def router():
    servicer = SlowlyUnavailable()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    serving_pb2_grpc.add_ServingServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def _check(error: SplitserveError, elapsed: float, servicer: SlowlyUnavailable, timeout: float) -> None:
    # First attempt: 0.6 s, backoff 0.2 s, second attempt cut by the deadline at 1.0 s. Before
    # the fix: three attempts of 0.6 s and two backoffs, 2.5 s.
    assert servicer.calls == 2, f"{servicer.calls} attempts; expected one retry inside {timeout} s"
    assert error.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert elapsed < timeout + 0.4, f"a {timeout} s call took {elapsed:.2f} s"


def test_retries_do_not_outlast_the_timeout(router):
    address, servicer = router
    start = time.monotonic()
    with Client(address, max_retries=2, timeout=1.0) as client:
        with pytest.raises(SplitserveError) as err:
            client.generate(token_ids=[5, 6, 7], max_tokens=2)
    _check(err.value, time.monotonic() - start, servicer, 1.0)


def test_async_retries_do_not_outlast_the_timeout(router):
    address, servicer = router

    async def main():
        async with AsyncClient(address, max_retries=2) as client:
            start = time.monotonic()
            with pytest.raises(SplitserveError) as err:
                await client.generate(token_ids=[5, 6, 7], max_tokens=2, timeout=1.0)
            return err.value, time.monotonic() - start

    error, elapsed = asyncio.run(main())
    _check(error, elapsed, servicer, 1.0)


def test_without_a_timeout_every_retry_is_made(router):
    address, servicer = router
    with Client(address, max_retries=2) as client:
        with pytest.raises(SplitserveError) as err:
            client.generate(token_ids=[5, 6, 7], max_tokens=2)
    assert err.value.code is grpc.StatusCode.UNAVAILABLE and servicer.calls == 3
