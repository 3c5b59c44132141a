"""Faults injected into real stacks: workers SIGKILLed mid-request, a KV transfer cut, restarts.

Each test that kills a worker has a stack of its own (module fixtures, killing tests last).
The numbers each fault cost are printed (pytest -s) and recorded in scripts/bench/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import struct
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stack import launched
from splitserve.protos import internal_pb2, internal_pb2_grpc, serving_pb2
from splitserve.runtime.decode_service import transfer_kv_callable
from splitserve.runtime.grpc_common import ChannelPool, make_server
from splitserve.runtime.kv_socket import encode_hello
from splitserve.runtime.kv_wire import kv_chunks
from splitserve.runtime.sampling_params import SamplingParams

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclasses.dataclass
class StreamResult:
    tokens: int = 0
    reason: str = ""
    code: grpc.StatusCode | None = None
    details: str = ""
    ended_at: float | None = None


class BackgroundStream:
    """One Generate stream read on a thread of its own, so a test can fault a worker meanwhile."""

    def __init__(self, stack, prompt: list[int], max_tokens: int):
        self.result = StreamResult()
        request = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=prompt),
                                              sampling=serving_pb2.SamplingParams(max_tokens=max_tokens,
                                                                                  ignore_eos=True))
        self._call = stack.serving.Generate(request, timeout=120)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for msg in self._call:
                self.result.tokens += len(msg.token_ids)
                self.result.reason = msg.finish_reason or self.result.reason
        except grpc.RpcError as e:
            self.result.code, self.result.details = e.code(), e.details()
        self.result.ended_at = time.monotonic()

    def cancel(self) -> None:
        self._call.cancel()

    def wait(self, timeout_s: float) -> StreamResult:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"a client stream hung for {timeout_s}s"
        return self.result


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout_s}s"
        time.sleep(interval_s)


def health_status(channel: grpc.Channel) -> int | None:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
    except grpc.RpcError:
        return None


def decode_stats(stack, address: str):
    # Generous: on 2 loaded cores a fresh connection to a busy worker has taken over 5 s (CI).
    return internal_pb2_grpc.DecodeStub(stack.worker_channel(address)).Stats(internal_pb2.StatsRequest(), timeout=30,
                                                                             wait_for_ready=True)


def addresses(stack, role: str) -> list[str]:
    return [w.address for w in stack.workers() if w.role == role]


def prompt(seed: int, length: int = 12) -> list[int]:
    return np.random.default_rng(seed).integers(3, 2048, size=length).tolist()


# -- decode workers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_decoders():
    with launched("demo", "--decode-workers", "2", "--num-pages", "256", "--page-size", "8") as stack:
        yield stack


def test_sigkill_of_a_decode_worker_ends_its_streams_and_launch_restarts_it(two_decoders):
    stack = two_decoders
    victim, survivor = addresses(stack, "decode")
    victim_pid = stack.worker_pid(victim)
    streams = [BackgroundStream(stack, prompt(i), max_tokens=300) for i in range(6)]
    wait_for(lambda: all(s.result.tokens >= 3 for s in streams), 60, "every stream got its first tokens")
    on_victim = decode_stats(stack, victim).running
    assert on_victim and decode_stats(stack, survivor).running == len(streams) - on_victim

    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    results = [s.wait(120) for s in streams]
    lost = [r for r in results if r.code is not None]
    # Every stream on the dead worker ends at once with UNAVAILABLE; the others finish normally.
    assert len(lost) == on_victim
    assert all(r.code is grpc.StatusCode.UNAVAILABLE and r.ended_at - killed_at < 5 for r in lost), lost
    assert all(r.reason == "length" and r.tokens == 300 for r in results if r.code is None)
    # New requests go to the survivor while the victim is down.
    for i in range(4):
        assert stack.generate(prompt(100 + i), max_tokens=8, ignore_eos=True)[2] == "length"

    # launch restarts it on the same port; it answers NOT_SERVING while it warms up, then SERVING.
    new_pid = wait_for(lambda: (pid := stack.worker_pid(victim)) != victim_pid and pid, 30, "a restarted worker")
    channel = grpc.insecure_channel(victim)
    seen = []
    wait_for(lambda: seen.append(health_status(channel)) or seen[-1] == SERVING, 120, "the restarted worker serves",
             interval_s=0.01)
    channel.close()
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, set(seen)
    assert any("restarting it in" in line and victim.rsplit(":")[1] in line for line in stack.lines)

    # The router takes it back: with both idle, two long streams (one after the other, so the
    # second sees the first's pages gone) land on different workers.
    time.sleep(1.0)  # > the router's probe interval
    back = []
    for i in range(2):
        back.append(BackgroundStream(stack, prompt(200 + i), max_tokens=1500))
        wait_for(lambda: back[-1].result.tokens >= 2, 30, "the new stream started")
    assert decode_stats(stack, victim).running == 1 and decode_stats(stack, survivor).running == 1
    for s in back:
        s.cancel()
    assert stack.worker_pid(victim) == new_pid
    print(f"\nFAULT decode SIGKILL: {len(streams)} streams in flight, {on_victim} on the victim ended UNAVAILABLE "
          f"in {max(r.ended_at - killed_at for r in lost):.2f}s, {len(streams) - len(lost)} completed")



def test_sigterm_of_a_decode_worker_drains_it(two_decoders):
    stack = two_decoders
    stream = BackgroundStream(stack, prompt(400), max_tokens=300)
    wait_for(lambda: stream.result.tokens >= 1, 30, "the stream started", interval_s=0.001)
    target = next(a for a in addresses(stack, "decode")
                  if (st := decode_stats(stack, a)).free_pages < st.total_pages)
    target_pid = stack.worker_pid(target)
    decode = internal_pb2_grpc.DecodeStub(stack.worker_channel(target))
    # A reservation whose KV never comes keeps the drain going until it is released.
    decode.Reserve(internal_pb2.ReserveRequest(request_id="held", num_tokens=16, lease_s=60), timeout=5)
    os.kill(target_pid, signal.SIGTERM)
    channel = grpc.insecure_channel(target)
    wait_for(lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 5, "NOT_SERVING")
    channel.close()
    with pytest.raises(grpc.RpcError) as err:
        decode.Reserve(internal_pb2.ReserveRequest(request_id="late", num_tokens=16, lease_s=5), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
    for i in range(3):  # meanwhile new requests go to the other worker
        assert stack.generate(prompt(410 + i), max_tokens=8, ignore_eos=True)[2] == "length"
    result = stream.wait(120)  # admitted before the drain: it runs to its end
    assert result.code is None and result.reason == "length" and result.tokens == 300
    assert os.path.exists(f"/proc/{target_pid}") and not _zombie(target_pid), "exited while a reservation was held"
    assert decode.Release(internal_pb2.ReleaseRequest(request_id="held"), timeout=5).released
    port = target.rsplit(":", 1)[1]
    wait_for(lambda: any(f"--port {port} exited with code 0" in line for line in stack.lines), 15, "a clean exit")
    print(f"\nFAULT decode worker SIGTERM: 1 stream + 1 held reservation in flight, stream completed "
          f"({result.tokens} tokens), 1 new reservation refused (draining), 3 new requests served elsewhere, exit 0")


# -- prefill workers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_prefillers():
    with launched("demo", "--prefill-workers", "2", "--num-pages", "256", "--page-size", "8") as stack:
        yield stack


class DyingPrefill(internal_pb2_grpc.PrefillServicer):
    """A prefill worker that dies in the middle of its KV transfer, as a SIGKILLed one would.

    It opens the transfer to the reserved decode worker, sends the header and a few chunks, then
    answers the router UNAVAILABLE and cuts the transfer: before that answer ("cut_first") or
    `late_s` after it ("cut_late": the decode worker drops the reservation while the router
    already retries elsewhere). A real SIGKILL cannot be timed into this window reliably.
    `transport`: "socket" sends over the KV data socket with the ticket the router passed on;
    "grpc" through TransferKV, which stays open to senders that do not use the socket.
    """

    def __init__(self, channels: ChannelPool, order: str, transport: str, late_s: float = 0.5):
        self.channels, self.order, self.transport, self.late_s = channels, order, transport, late_s
        self.request_ids: list[str] = []
        self.transports: list[str] = []

    def Run(self, request, context):
        self.request_ids.append(request.request_id)
        layers = [np.ones((len(request.prompt_ids), 4, 32), np.float32)] * 4  # the demo model's KV layout
        frames = kv_chunks(request.request_id, 7, layers, layers, chunk_bytes=1024)
        assert request.kv_data_address and len(request.kv_ticket) == 16  # the router passed them on
        cut = self._socket(request, frames) if self.transport == "socket" else self._grpc(request, frames)
        if self.order == "cut_first":
            cut()
            time.sleep(0.3)  # the decode worker notices and drops the reservation
        else:
            threading.Timer(self.late_s, cut).start()
        context.abort(grpc.StatusCode.UNAVAILABLE, "simulated crash of a prefill worker")

    def _grpc(self, request, frames):
        self.transports.append("grpc")
        three_sent, never = threading.Event(), threading.Event()

        def partial():
            for i, frame in enumerate(frames):
                if i == 3:
                    three_sent.set()
                    never.wait()  # the rest never comes: the transfer stays open until cancelled
                yield frame

        transfer = transfer_kv_callable(self.channels.get(request.decode_address)).future(partial(), timeout=30)
        three_sent.wait(10)
        return transfer.cancel

    def _socket(self, request, frames):
        """The hello, the header and two payloads, as a process would before its SIGKILL closed the socket."""
        self.transports.append("socket")
        host, port = request.kv_data_address.rsplit(":", 1)
        conn = socket.create_connection((host, int(port)), timeout=10)
        sent = [next(frames) for _ in range(3)]
        conn.sendall(encode_hello(request.request_id, request.kv_ticket)
                     + b"".join(struct.pack("!I", len(f)) + f for f in sent))
        return conn.close


@pytest.mark.parametrize("transport", ["socket", "grpc"])
@pytest.mark.parametrize("order", ["cut_first", "cut_late"])
def test_prefill_dying_mid_transfer_is_retried_with_a_fresh_reservation(two_prefillers, order, transport):
    from splitserve.models.metadata import load_metadata
    from splitserve.runtime.router import Router

    stack = two_prefillers
    decode = addresses(stack, "decode")[0]
    real_prefill = addresses(stack, "prefill")[0]
    p = prompt(7, length=30)
    # 150 tokens take over a second here, so the retry still decodes when a "cut_late" cut comes (0.5 s).
    want = stack.generate(p, max_tokens=150, ignore_eos=True)[0]
    channels = ChannelPool(token=stack.internal_token())
    dying = DyingPrefill(channels, order, transport)
    server = make_server()
    internal_pb2_grpc.add_PrefillServicer_to_server(dying, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:  # the dying worker comes first, so the router tries it first
        router = Router(load_metadata("demo"), prefill=[f"127.0.0.1:{port}", real_prefill], decode=[decode],
                        colocated=[], channels=channels)
        events = list(router.generate(p, SamplingParams(max_tokens=150, ignore_eos=True)))
    finally:
        server.stop(0)
        channels.close()
    assert [t for e in events for t in e.token_ids] == want and events[-1].finish_reason == "length"
    assert len(dying.request_ids) == 1 and dying.transports == [transport]  # tried once, then skipped
    total = decode_stats(stack, decode).total_pages
    wait_for(lambda: decode_stats(stack, decode).free_pages == total, 5, "every reserved page is free again")
    print(f"\nFAULT prefill cut mid-transfer ({order}, {transport}): 1 request, {len(events)} tokens as expected after "
          f"{len(dying.request_ids)} failed attempt, {total} of {total} decode pages free after")


class QueuedPrefill(internal_pb2_grpc.PrefillServicer):
    """A prefill worker with a long queue: each Run waits `wait_s`, then runs on a real worker, unless
    the router cancelled it meanwhile. `during_wait(request)` runs as the wait begins."""

    def __init__(self, channels: ChannelPool, real: str, wait_s: float, during_wait=None):
        self.real, self.wait_s, self.during_wait = internal_pb2_grpc.PrefillStub(channels.get(real)), wait_s, during_wait
        self.cancelled: list[str] = []

    def Run(self, request, context):
        if self.during_wait is not None:
            self.during_wait(request)
        time.sleep(self.wait_s)
        if not context.is_active():
            self.cancelled.append(request.request_id)
            return internal_pb2.PrefillResponse()
        return self.real.Run(request, timeout=30)


@pytest.mark.parametrize("case", ["renewed", "not renewed", "reservation lost"])
def test_a_prompt_queued_past_its_lease_keeps_its_decode_pages(two_prefillers, monkeypatch, case):
    """The router renews the decode reservation while the prompt waits for prefill (over three
    leases here). Without the renewals the lease ends first and the request fails, as it did before; a
    renewal that finds the reservation gone fails the request and cancels its queued prefill."""
    from splitserve.models.metadata import load_metadata
    from splitserve.runtime import page_reservations, router as router_module
    from splitserve.runtime.router import Router, RouterError

    stack = two_prefillers
    decode = addresses(stack, "decode")[0]
    decode_stub = internal_pb2_grpc.DecodeStub(stack.worker_channel(decode))
    p = prompt(11, length=30)
    want = stack.generate(p, max_tokens=24, ignore_eos=True)[0]
    monkeypatch.setattr(page_reservations, "RESERVE_LEASE_S", 0.6)
    monkeypatch.setattr(page_reservations, "RENEW_EVERY_S", 0.2)  # a renewal's own timeout
    monkeypatch.setattr(router_module, "RENEW_EVERY_S", 60.0 if case == "not renewed" else 0.2)
    lose = (lambda r: decode_stub.Release(internal_pb2.ReleaseRequest(request_id=r.request_id), timeout=5)
            if case == "reservation lost" else None)
    channels = ChannelPool(token=stack.internal_token())
    queued = QueuedPrefill(channels, addresses(stack, "prefill")[0], wait_s=2.0, during_wait=lose)
    server = make_server()
    internal_pb2_grpc.add_PrefillServicer_to_server(queued, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        router = Router(load_metadata("demo"), prefill=[f"127.0.0.1:{port}"], decode=[decode], colocated=[],
                        channels=channels)
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        if case == "renewed":
            events = list(router.generate(p, params))
            assert [t for e in events for t in e.token_ids] == want and events[-1].finish_reason == "length"
        elif case == "not renewed":
            with pytest.raises(RouterError, match="no reservation"):  # the decode worker dropped it
                list(router.generate(p, params))
        else:
            with pytest.raises(RouterError, match="lost the request's KV pages") as e:
                list(router.generate(p, params))
            assert e.value.code is grpc.StatusCode.UNAVAILABLE
            wait_for(lambda: len(queued.cancelled) == 1, 5, "the queued prefill is cancelled")
        router.close()
    finally:
        server.stop(0)
        channels.close()
    with pytest.raises(grpc.RpcError) as e:
        decode_stub.Renew(internal_pb2.RenewRequest(request_id="never-reserved", lease_s=5), timeout=5)
    assert e.value.code() is grpc.StatusCode.NOT_FOUND
    total = decode_stats(stack, decode).total_pages
    wait_for(lambda: decode_stats(stack, decode).free_pages == total, 5, "every reserved page is free again")

def test_sigkill_of_a_prefill_worker_is_retried_transparently(two_prefillers):
    stack = two_prefillers
    victim = addresses(stack, "prefill")[0]  # first in the router's list: it gets the first request
    decode = addresses(stack, "decode")[0]
    prompts = [prompt(300 + i, length=20) for i in range(8)]
    want = [stack.generate(q, max_tokens=16, ignore_eos=True)[0] for q in prompts]
    victim_pid = stack.worker_pid(victim)
    os.kill(victim_pid, signal.SIGSTOP)  # requests sent to it now wait inside its prefill
    try:
        results: list = [None] * len(prompts)

        def run(i):
            results[i] = stack.generate(prompts[i], max_tokens=16, ignore_eos=True)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
        for t in threads:
            t.start()
            time.sleep(0.05)
        time.sleep(2.0)  # everything sent to the other prefill worker has finished by now
        stuck = sum(r is None for r in results)
        assert stuck >= 1
        assert decode_stats(stack, decode).free_pages < decode_stats(stack, decode).total_pages  # theirs
    finally:
        os.kill(victim_pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert [r[0] for r in results] == want and all(r[2] == "length" for r in results)
    total = decode_stats(stack, decode).total_pages
    wait_for(lambda: decode_stats(stack, decode).free_pages == total, 5, "every reserved page is free again")
    retried = sum("retrying elsewhere" in line and victim in line for line in stack.lines)
    assert retried >= 1
    print(f"\nFAULT prefill SIGKILL: {len(prompts)} requests, {stuck} unfinished at the kill, {retried} of them "
          f"sent to the victim and retried; all {len(prompts)} completed with the expected tokens, 0 pages leaked")



# -- launch: SIGTERM -------------------------------------------------------------------------
def test_sigterm_of_launch_drains_in_flight_streams_then_exits_0():
    with launched("demo", "--num-pages", "256", "--page-size", "8", "--drain-timeout-s", "60") as stack:
        workers = stack.worker_pids()
        # The demo model decodes 600 tokens in a second or two: to keep the stream in flight while the
        # router starts draining, the decode worker is paused as soon as it has decoded a token (so
        # the KV has arrived: a pause before that could outlast the reservation's lease on a busy host).
        decode_pid = stack.worker_pid(addresses(stack, "decode")[0])
        streams = [BackgroundStream(stack, prompt(500), max_tokens=600)]
        wait_for(lambda: streams[0].result.tokens >= 2, 60, "the stream started", interval_s=0.001)
        os.kill(decode_pid, signal.SIGSTOP)
        try:
            _refused_while_draining(stack, streams)
        finally:
            os.kill(decode_pid, signal.SIGCONT)
        results = [s.wait(120) for s in streams]
        assert all(r.code is None and r.reason == "length" and r.tokens == 600 for r in results), results
        assert stack.process.wait(60) == 0
        assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in workers)
        print(f"\nFAULT launch SIGTERM: {len(streams)} streams in flight, {len(streams)} completed, "
              "1 new request refused UNAVAILABLE (draining), exit code 0")


def test_sigterm_while_starting_stops_at_once(tmp_path):
    """A full warm-up compiles for minutes on a CPU: SIGTERM in the middle used to be noted and
    ignored until the start was over (launch then printed "ready" and drained, ~2 minutes)."""
    import subprocess
    import sys

    from stack import _assert_gone, _children

    env = dict(os.environ, JAX_PLATFORMS="cpu", SPLITSERVE_CACHE=str(tmp_path))  # nothing compiled yet
    env.pop("XLA_FLAGS", None)
    env.pop("SPLITSERVE_COMPILE_CACHE", None)  # not the session's shared one: the warm-up must compile
    process = subprocess.Popen([sys.executable, "-m", "splitserve.runtime.cli", "launch", "--model", "demo",
                                "--port", "0", "--platform", "cpu", "--warmup", "full"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    # The decode worker has its model and KV cache: the workers are compiling their warm-up.
    wait_for(lambda: any("KV cache:" in line for line in lines), 120, "the decode worker was built")
    time.sleep(3.0)
    workers = _children(process.pid)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    took = time.monotonic() - signalled
    reader.join(10)
    rest = "".join(lines)
    assert process.returncode == 128 + signal.SIGTERM, rest[-3000:]
    assert "ready on" not in rest and "SIGTERM while starting" in rest
    assert took < 20, f"launch took {took:.1f} s to stop:\n{rest[-3000:]}"
    _assert_gone(workers)
    print(f"\nFAULT launch SIGTERM during warm-up: exited {took:.1f} s later, rc {process.returncode}")


def test_a_second_sigint_stops_launch_without_waiting_for_the_drain():
    with launched("demo", "--num-pages", "256", "--page-size", "8", "--drain-timeout-s", "60") as stack:
        decode_pid = stack.worker_pid(addresses(stack, "decode")[0])
        stream = BackgroundStream(stack, prompt(501), max_tokens=600)
        wait_for(lambda: stream.result.tokens >= 2, 60, "the stream started", interval_s=0.001)
        os.kill(decode_pid, signal.SIGSTOP)  # the drain would wait up to its 60 s for this stream
        try:
            stack.process.send_signal(signal.SIGINT)
            wait_for(lambda: health_status(stack.channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 5,
                     "the router is draining")
            again = time.monotonic()
            stack.process.send_signal(signal.SIGINT)
            assert stack.process.wait(10) == 128 + signal.SIGINT
            took = time.monotonic() - again
        finally:
            os.kill(decode_pid, signal.SIGCONT)
        assert took < 5 and stream.wait(30).code is not None
        print(f"\nFAULT launch second SIGINT while draining: exited {took:.1f} s later")


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def _refused_while_draining(stack, streams) -> None:
    """SIGTERM to launch: the router reports NOT_SERVING and refuses new work while `streams` go on."""
    stack.process.send_signal(signal.SIGTERM)
    wait_for(lambda: health_status(stack.channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 5,
             "the router reports NOT_SERVING")
    with pytest.raises(grpc.RpcError) as err:
        stack.generate(prompt(510), max_tokens=8)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
    assert all(s.result.ended_at is None for s in streams), [s.result for s in streams]


class CancellingPrefill(internal_pb2_grpc.PrefillServicer):
    """A prefill worker that ends every Run with CANCELLED, as a server stopping mid-call does."""

    def Run(self, request, context):
        context.abort(grpc.StatusCode.CANCELLED, "the worker is stopping")


def test_a_call_the_worker_cancelled_reaches_the_client_as_unavailable():
    """Not UNKNOWN: the client did not cancel, and UNAVAILABLE tells it to retry."""
    from splitserve.models.metadata import load_metadata
    from splitserve.runtime.router import Router, RouterError

    server = make_server()
    internal_pb2_grpc.add_PrefillServicer_to_server(CancellingPrefill(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channels = ChannelPool()
    try:  # max_tokens=1: no decode reservation, so the decode address is never dialled
        router = Router(load_metadata("demo"), prefill=[f"127.0.0.1:{port}"], decode=["127.0.0.1:1"], colocated=[],
                        channels=channels)
        with pytest.raises(RouterError) as err:
            list(router.generate([1, 2, 3], SamplingParams(max_tokens=1)))
    finally:
        server.stop(0)
        channels.close()
    assert err.value.code is grpc.StatusCode.UNAVAILABLE and "the worker is stopping" in str(err.value)
