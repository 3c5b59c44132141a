"""The KV data socket: real sockets on loopback into a real DecodeService and KVListener.

The decode side runs in this process (demo model), behind a real gRPC server for Reserve and
a real KVListener; senders are this process's threads, raw sockets, or a child process that is
SIGKILLed mid-transfer. Checked: the socket path takes exactly the KV that TransferKV takes;
tickets admit once, for their own request, within the lease; fuzzed and truncated streams are
refused and never decoded; a sender that dies, stalls or sends garbage costs no page; a
draining worker still takes the KV of reservations it holds; TLS with client certificates.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certs import make_pki
from decode_worker import decode_worker
from kv_fuzz import RESERVED_TOKENS, layers, valid_frames, with_id, transfers
from splitserve.protos import internal_pb2
from splitserve.runtime.grpc_common import ChannelPool
from splitserve.runtime.kv_listener import KVListener, KVListenerConfig
from splitserve.runtime.kv_receive import KVReceiver
from splitserve.runtime.kv_socket import (END_OF_FRAMES, MAGIC, MAX_REQUEST_ID_BYTES, VERSION, KVSocketRefused,
                                          encode_hello, send_kv)
from splitserve.runtime.kv_wire import kv_chunks, kv_frame_parts, receive_kv
from splitserve.runtime.prefill_engine import PrefillJob
from splitserve.runtime.metrics import WorkerMetrics
from splitserve.runtime.prefill_service import KVSender
from splitserve.runtime.sampling_params import SamplingParams
from splitserve.runtime.tls import TLSConfig, client_ssl_context, server_ssl_context

FUZZ_CASES = 600  # a fresh draw every run (database=None); 1500 took 15 s of CI, near its 30-minute budget
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED}
HELLO_TIMEOUT_S = 1.0
Code = grpc.StatusCode


class Decode:
    """The decode worker under test: engine, Reserve over gRPC, the listener."""

    def __init__(self, engine, stub, transfer, listener, admission, address):
        self.engine, self.stub, self.transfer, self.listener, self.admission = (engine, stub, transfer, listener,
                                                                                 admission)
        self.address = address  # the gRPC port's
        self.total = engine.stats()["total_pages"]

    def reserve(self, rid: str, lease_s: float = 30, tokens: int = RESERVED_TOKENS) -> tuple[str, bytes]:
        reply = self.stub.Reserve(internal_pb2.ReserveRequest(request_id=rid, num_tokens=tokens, lease_s=lease_s),
                                  timeout=10)
        assert reply.kv_data_address == self.listener.address and len(reply.kv_ticket) == 16
        return reply.kv_data_address, reply.kv_ticket

    def release(self, rid: str) -> bool:
        return self.stub.Release(internal_pb2.ReleaseRequest(request_id=rid), timeout=10).released

    def free(self) -> int:
        return self.engine.stats()["free_pages"]

    def held(self, rid: str) -> bool:
        with self.engine._lock:
            return rid in self.engine.scheduler.slots

    def wait_all_free(self, what: str, timeout_s: float = 3.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.free() != self.total:
            assert time.monotonic() < deadline, f"pages not freed: {what}"
            time.sleep(0.01)

    def assert_serves(self, rid: str, listener: KVListener | None = None, ssl_context=None) -> None:
        """A valid transfer still goes through (on `listener`, else the worker's own), and its pages
        come back."""
        address, ticket = self.reserve(rid)
        if listener is not None:  # its own ticket: the listener shares the worker's ticket book
            address, ticket = listener.address, listener.issue_ticket(rid, 30)
        k, v = _kv(7, 12)
        try:
            sent = send_kv(address, rid, ticket, kv_frame_parts(rid, 3, k, v), timeout_s=10, ssl_context=ssl_context)
            assert sent == 2 * _nbytes(k)
        finally:
            assert self.release(rid)
        self.wait_all_free(f"after {rid}")


@pytest.fixture(scope="module")
def decode(tmp_path_factory):
    with decode_worker(tmp_path_factory.mktemp("cache"), "socket-tested decode worker",
                       KVListenerConfig(hello_timeout_s=HELLO_TIMEOUT_S)) as worker:
        yield Decode(worker.engine, worker.stub, worker.transfer, worker.listener, worker.admission, worker.address)


def _kv(seed: int, num_tokens: int):
    rng = np.random.default_rng(seed)
    return layers(rng, num_tokens), layers(rng, num_tokens)


def _nbytes(layers_) -> int:
    return sum(x.nbytes for x in layers_)


def _framed(frames, end: bool = True) -> bytes:
    """Frames as the data socket carries them after the hello."""
    out = b"".join(struct.pack("!I", len(f)) + f for f in frames)
    return out + struct.pack("!I", END_OF_FRAMES) if end else out


def _read_answer(sock: socket.socket, timeout_s: float = 10.0) -> tuple[grpc.StatusCode, int, str] | None:
    """The worker's answer (code, bytes, message), or None if it closed without one."""
    sock.settimeout(timeout_s)
    data = b""
    while len(data) < 13 or len(data) < 13 + struct.unpack("!I", data[9:13])[0]:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    code, received, size = struct.unpack("!BQI", data[:13])
    return next(c for c in Code if c.value[0] == code), received, data[13:13 + size].decode()


def _exchange(address: str, payload: bytes, *, shut: bool = True):
    """Sends raw bytes, ends the sending side, returns the answer (None if the connection just closed)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            sock.sendall(payload)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the worker refused early and stopped reading
        return _read_answer(sock)


def _refused(call) -> KVSocketRefused:
    with pytest.raises(KVSocketRefused) as err:
        call()
    return err.value


def _raw_hello(rid: bytes, ticket: bytes) -> bytes:
    """A hello as a peer may write it, without encode_hello's limits."""
    return MAGIC + bytes([VERSION]) + struct.pack("!H", len(rid)) + rid + bytes([len(ticket)]) + ticket


@contextlib.contextmanager
def _own_listener(decode, ssl_context=None, *, prepare=lambda listener: None, **config):
    """A listener of its own (its own slots, accept loop and buffers) on the worker's ticket book;
    `prepare` gets it before its accept loop starts."""
    listener = KVListener(KVReceiver(decode.engine), KVListenerConfig(hello_timeout_s=HELLO_TIMEOUT_S, **config),
                          tickets=decode.listener.tickets, ssl_context=ssl_context)
    prepare(listener)
    listener.start()
    try:
        yield listener
    finally:
        listener.close(1.0)


def _trickle(sock, data: bytes, gap_s: float = 0.3):
    """Sends `data` a byte every gap_s until the worker ends the connection; returns its answer
    (None if it closed without one), or "open" if all of `data` went and it is still open."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            return _read_answer(sock, timeout_s=gap_s)
        except TimeoutError:
            continue  # nothing yet: the next byte
        except OSError:  # reset or (TLS) cut without close_notify: ended all the same
            return None
    return "open"


# -- the same KV as TransferKV -----------------------------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [200, 1000, 1 << 20])  # split by KV heads, by tokens, one chunk per layer
def test_the_socket_takes_exactly_what_transfer_kv_takes(decode, chunk_bytes):
    k, v = _kv(chunk_bytes, 33)
    rid_socket, rid_grpc = f"same-socket-{chunk_bytes}", f"same-grpc-{chunk_bytes}"
    address, ticket = decode.reserve(rid_socket)
    decode.reserve(rid_grpc)
    by_socket = send_kv(address, rid_socket, ticket, kv_frame_parts(rid_socket, 9, k, v, chunk_bytes=chunk_bytes),
                        timeout_s=10)
    by_grpc = decode.transfer(kv_chunks(rid_grpc, 9, k, v, chunk_bytes=chunk_bytes), timeout=10).received_bytes
    assert by_socket == by_grpc == 2 * _nbytes(k)
    with decode.engine._lock:  # no stream is open, so the KV waits in its slot, as received
        slots = decode.engine.scheduler.slots
        got_socket, got_grpc = slots[rid_socket], slots[rid_grpc]
        assert got_socket.output_ids == got_grpc.output_ids == [9] and got_socket.prompt_len == 33
        for a, b, sent in zip(got_socket.kv[0] + got_socket.kv[1], got_grpc.kv[0] + got_grpc.kv[1], k + v):
            assert a.tobytes() == b.tobytes() == sent.tobytes()
    assert decode.release(rid_socket) and decode.release(rid_grpc)
    decode.wait_all_free("after the comparison")


# -- tickets -----------------------------------------------------------------------------------
def test_a_wrong_ticket_is_refused_and_the_reservation_stays(decode):
    address, _ = decode.reserve("wrong-ticket")
    k, v = _kv(1, 10)
    for ticket in (secrets.token_bytes(16), b"", secrets.token_bytes(200)):
        err = _refused(lambda: send_kv(address, "wrong-ticket", ticket, kv_frame_parts("wrong-ticket", 1, k, v),
                                       timeout_s=10))
        assert err.code is Code.UNAUTHENTICATED and "no valid ticket" in err.message
    assert decode.held("wrong-ticket")  # a stranger cannot cancel someone else's request
    assert decode.release("wrong-ticket")
    decode.assert_serves("after-wrong-ticket")


def test_a_ticket_works_once(decode):
    address, ticket = decode.reserve("once")
    k, v = _kv(2, 10)
    assert send_kv(address, "once", ticket, kv_frame_parts("once", 1, k, v), timeout_s=10) == 2 * _nbytes(k)
    err = _refused(lambda: send_kv(address, "once", ticket, kv_frame_parts("once", 1, k, v), timeout_s=10))
    assert err.code is Code.UNAUTHENTICATED
    assert decode.release("once")
    decode.assert_serves("after-once")


def test_a_ticket_admits_only_its_own_request(decode):
    address, ticket_a = decode.reserve("owner-a")
    _, ticket_b = decode.reserve("owner-b")
    k, v = _kv(3, 10)
    # Presented for another request id: it is not that request's ticket.
    err = _refused(lambda: send_kv(address, "owner-b", ticket_a, kv_frame_parts("owner-b", 1, k, v), timeout_s=10))
    assert err.code is Code.UNAUTHENTICATED
    # Presented for its own request, but the KV header names another: refused, and the ticket's
    # reservation is dropped (its one ticket is spent); the other request is untouched.
    err = _refused(lambda: send_kv(address, "owner-a", ticket_a, kv_frame_parts("owner-b", 1, k, v), timeout_s=10))
    assert err.code is Code.PERMISSION_DENIED and "owner-a" in err.message
    assert not decode.held("owner-a") and decode.held("owner-b")
    assert send_kv(address, "owner-b", ticket_b, kv_frame_parts("owner-b", 1, k, v), timeout_s=10) == 2 * _nbytes(k)
    assert decode.release("owner-b")
    decode.wait_all_free("after the owner tests")


def test_an_expired_ticket_is_refused(decode):
    address, ticket = decode.reserve("expiring", lease_s=0.3)
    time.sleep(0.6)
    k, v = _kv(4, 10)
    err = _refused(lambda: send_kv(address, "expiring", ticket, kv_frame_parts("expiring", 1, k, v), timeout_s=10))
    # As TransferKV answers for a reservation whose lease ended: the sender logs it, no traceback.
    assert err.code is Code.NOT_FOUND and "expired" in err.message
    decode.wait_all_free("the lease expired")
    decode.assert_serves("after-expiry")


def test_a_refused_request_id_is_logged_clipped_and_an_overlong_one_is_not_read(decode, caplog):
    caplog.set_level(logging.INFO, logger="splitserve.runtime.kv_listener")
    long_id = "x" * MAX_REQUEST_ID_BYTES
    answer = _exchange(decode.listener.address, _raw_hello(long_id.encode(), secrets.token_bytes(16)))
    assert answer is not None and answer[0] is Code.UNAUTHENTICATED
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals and all(long_id not in m and len(m) < 300 for m in refusals), refusals
    assert f"({MAX_REQUEST_ID_BYTES} chars)" in refusals[-1]
    answer = _exchange(decode.listener.address, _raw_hello(b"y" * 60000, secrets.token_bytes(16)))
    assert answer is not None and answer[0] is Code.INVALID_ARGUMENT and "over the limit" in answer[2], answer
    with pytest.raises(ValueError, match="too long"):
        encode_hello("z" * (MAX_REQUEST_ID_BYTES + 1), secrets.token_bytes(16))
    decode.assert_serves("after-long-ids")


def test_every_retry_reservation_gets_its_own_ticket(decode):
    tickets = {decode.reserve(rid)[1] for rid in ("retried", "retried-retry1", "retried-retry2")}
    assert len(tickets) == 3
    for rid in ("retried", "retried-retry1", "retried-retry2"):
        assert decode.release(rid)


# -- damaged streams ---------------------------------------------------------------------------
def _expected_kv(intact_frames):
    kv = receive_kv(intact_frames, expected=decode_expectation())
    return kv.k_layers + kv.v_layers, kv.first_token


def decode_expectation():
    from splitserve.runtime.kv_wire import KVLayoutExpectation

    return KVLayoutExpectation(num_layers=4, num_kv_heads=4, head_dim=32, dtypes_allowed=("float32",),
                               max_tokens=2048, vocab_size=2048)


SOCKET_DAMAGE = ["frames", "frames", "frames", "cut_connection", "no_end", "oversized_frame", "garbage_hello"]


def test_fuzzed_socket_streams_never_give_bad_kv_and_leave_no_pages(decode):
    seen, counter = {}, iter(range(10**9))

    @settings(max_examples=FUZZ_CASES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(transfers(), st.sampled_from(SOCKET_DAMAGE), st.floats(0, 1))
    def case(transfer_case, damage, where):
        frames, kind, intact = transfer_case
        rid = f"sfuzz-{next(counter)}"
        address, ticket = decode.reserve(rid)
        frames, intact = with_id(frames, rid), with_id(intact, rid)
        hello = encode_hello(rid, ticket)
        if damage == "frames":  # the sender's own code, with the damaged frames
            try:
                received = send_kv(address, rid, ticket, [(f,) for f in frames], timeout_s=10)
                code = Code.OK
            except KVSocketRefused as e:
                code, received = e.code, 0
            label = kind
            assert code is Code.OK or code in REFUSALS, f"{kind}: {code}"
            if kind == "intact":
                assert code is Code.OK
            if code is Code.OK:  # whatever was done to the stream, KV that is taken is the KV that was sent
                want, first = _expected_kv(intact)
                with decode.engine._lock:
                    slot = decode.engine.scheduler.slots[rid]
                    assert [a.tobytes() for a in slot.kv[0] + slot.kv[1]] == [w.tobytes() for w in want]
                assert received == sum(w.nbytes for w in want)
        else:
            label = damage
            stream = hello + _framed(intact)
            if damage == "cut_connection":  # the sender dies somewhere after its hello
                cut = len(hello) + int(where * (len(stream) - len(hello) - 1))
                host, port = address.rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=10) as sock:
                    sock.sendall(stream[:cut])
                answer = None
            elif damage == "no_end":
                answer = _exchange(address, hello + _framed(intact, end=False))
            elif damage == "oversized_frame":  # from one past the limit to one short of the end marker
                size = (16 << 20) + 1 + int(where * (END_OF_FRAMES - 2 - (16 << 20)))
                answer = _exchange(address, hello + struct.pack("!I", size) + b"x" * 64)
                assert answer is not None and answer[0] is Code.INVALID_ARGUMENT, answer
                assert "exceeds the limit" in answer[2], answer
            else:
                answer = _exchange(address, secrets.token_bytes(8 + int(where * 64)))
            code = answer[0] if answer else None
            if damage in ("cut_connection", "no_end", "oversized_frame"):  # admitted, then failed: dropped
                assert code in (None, Code.UNAVAILABLE, Code.INVALID_ARGUMENT), f"{damage}: {answer}"
                deadline = time.monotonic() + 3
                while decode.held(rid):
                    assert time.monotonic() < deadline, f"{damage}: reservation not dropped"
                    time.sleep(0.005)
            else:
                assert code is Code.INVALID_ARGUMENT and decode.held(rid), answer
        decode.release(rid)
        seen[(label, getattr(code, "name", None))] = seen.get((label, getattr(code, "name", None)), 0) + 1
        assert decode.free() == decode.total

    start = time.monotonic()
    case()
    print(f"\nfuzz KV data socket: {sum(seen.values())} connections in {time.monotonic() - start:.1f}s: "
          f"{dict(sorted(seen.items(), key=str))}")
    assert decode.engine.stats() == dict(free_pages=decode.total, total_pages=decode.total, running=0, waiting=0)
    decode.assert_serves("after-fuzz")


@pytest.mark.parametrize("size", [(16 << 20) + 1, 0xFFFFFFFE])  # one past the limit; the largest before the end marker
def test_a_frame_over_the_limit_is_refused_unread(decode, size):
    address, ticket = decode.reserve(f"oversized-{size}")
    answer = _exchange(address, encode_hello(f"oversized-{size}", ticket) + struct.pack("!I", size) + b"x" * 64)
    assert answer is not None and answer[0] is Code.INVALID_ARGUMENT, answer
    assert f"a frame of {size} bytes exceeds the limit" in answer[2], answer
    assert not decode.held(f"oversized-{size}")  # admitted, then refused: dropped
    decode.wait_all_free("after an oversized frame")


# -- senders that die, stall or talk nonsense ------------------------------------------------
SENDER = """
import socket, struct, sys, time
from splitserve.runtime.kv_socket import encode_hello
host, port, rid, ticket, stream = sys.argv[1], int(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4]), bytes.fromhex(sys.argv[5])
s = socket.create_connection((host, port))
s.sendall(encode_hello(rid, ticket) + stream)
print("sent", flush=True)
time.sleep(60)
"""


def test_a_sender_killed_mid_transfer_frees_the_reservation_at_once(decode):
    address, ticket = decode.reserve("killed", lease_s=60)
    frames = valid_frames("killed", 20, 0, 512)
    host, port = address.rsplit(":", 1)
    sender = subprocess.Popen([sys.executable, "-c", SENDER, host, port, "killed", ticket.hex(),
                               _framed(frames[:4], end=False).hex()], stdout=subprocess.PIPE, text=True)
    try:
        assert sender.stdout.readline().strip() == "sent"
        time.sleep(0.2)
        assert decode.held("killed")  # the header and payloads are in; the rest would come
        sender.send_signal(signal.SIGKILL)
        sender.wait(10)
        start = time.monotonic()
        decode.wait_all_free("after the sender was killed", timeout_s=2.0)
        print(f"\nsender SIGKILLed mid-transfer: reservation dropped {time.monotonic() - start:.3f}s later")
    finally:
        sender.kill()
        sender.wait()
    assert not decode.held("killed")
    decode.assert_serves("after-kill")


def test_a_sender_that_stalls_mid_frame_is_cut_at_the_end_of_its_lease(decode):
    address, ticket = decode.reserve("stalled", lease_s=1.0)
    frames = valid_frames("stalled", 20, 0, 512)
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        start = time.monotonic()
        stream = encode_hello("stalled", ticket) + _framed(frames[:3], end=False)
        sock.sendall(stream + struct.pack("!I", len(frames[3])) + frames[3][:100])  # and then nothing
        answer = _read_answer(sock, timeout_s=10)
        waited = time.monotonic() - start
    assert answer is not None and answer[0] is Code.DEADLINE_EXCEEDED and "cut off" in answer[2]
    assert 0.8 < waited < 3.0
    decode.wait_all_free("after the stalled sender")
    decode.assert_serves("after-stall")


def test_a_sender_that_trickles_one_frame_is_cut_at_the_end_of_its_lease(decode):
    """A byte every 0.3 s never lets a single read time out; the lease still ends the transfer."""
    address, ticket = decode.reserve("trickle", lease_s=1.0)
    frames = valid_frames("trickle", 20, 0, 512)
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(encode_hello("trickle", ticket) + _framed(frames[:3], end=False)
                     + struct.pack("!I", len(frames[3])))
        answer = _trickle(sock, frames[3][:20])  # 6 s of trickle if nobody cuts it
        waited = time.monotonic() - start
    assert answer not in (None, "open") and answer[0] is Code.DEADLINE_EXCEEDED, answer
    assert waited < 3.0
    decode.wait_all_free("after the trickling sender")
    decode.assert_serves("after-trickle")


def test_garbage_and_silent_connections_are_closed_and_cost_nothing(decode):
    host, port = decode.listener.address.rsplit(":", 1)
    answer = _exchange(decode.listener.address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer is not None and answer[0] is Code.INVALID_ARGUMENT and "not a splitserve KV" in answer[2]
    with socket.create_connection((host, int(port)), timeout=10) as silent:
        start = time.monotonic()
        assert silent.recv(1) == b""  # closed once the hello is overdue
        assert HELLO_TIMEOUT_S * 0.8 < time.monotonic() - start < HELLO_TIMEOUT_S + 3
    decode.wait_all_free("after garbage")
    decode.assert_serves("after-garbage")


@pytest.mark.parametrize("how", ["plain", "tls_hello", "tls_handshake"])
def test_a_trickled_hello_is_cut_at_the_hello_timeout_and_frees_its_slot(decode, tmp_path, how):
    """A byte every 0.3 s never lets one read time out; the hello's deadline (from the accept, over
    the TLS handshake and the hello) still closes it, and its slot (the only one) serves again."""
    tls = None
    if how != "plain":
        pki = make_pki(tmp_path / "pki", "kv")
        tls = TLSConfig(pki.cert, pki.key, pki.ca)
    server_tls = server_ssl_context(tls, require_client_cert=True) if tls else None
    with _own_listener(decode, server_tls, max_connections=1) as listener:
        host, port = listener.address.rsplit(":", 1)
        hello = encode_hello("trickled-hello", secrets.token_bytes(16))  # 38 bytes: 11 s of trickle
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            start = time.monotonic()
            if how == "plain":
                answer = _trickle(raw, hello)
            elif how == "tls_hello":  # time spent before the handshake counts too (0.3: leaves a slow
                time.sleep(HELLO_TIMEOUT_S * 0.3)  # loaded machine room for the client's own handshake)
                with client_ssl_context(tls).wrap_socket(raw, server_hostname=host) as sock:
                    answer = _trickle(sock, hello)
            else:
                answer = _trickle(raw, _client_hello(client_ssl_context(tls), host))
            waited = time.monotonic() - start
        assert answer is None, answer  # closed, without an answer
        assert HELLO_TIMEOUT_S * 0.8 < waited < 3 * HELLO_TIMEOUT_S, waited
        decode.assert_serves(f"after-trickled-hello-{how}", listener, client_ssl_context(tls) if tls else None)


def _client_hello(context: ssl.SSLContext, host: str) -> bytes:
    """The bytes a TLS client opens with (its ClientHello), to send by hand."""
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=host)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class _FailingAccept:
    """A listening socket whose accept() fails with `error` the first `times` calls."""

    def __init__(self, sock: socket.socket, error: int, times: int):
        self.sock, self.error, self.left = sock, error, times

    def accept(self):
        if self.left:
            self.left -= 1
            raise OSError(self.error, os.strerror(self.error))
        return self.sock.accept()

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize("error", [errno.EMFILE, errno.ECONNABORTED])
def test_a_failing_accept_backs_off_and_the_listener_keeps_serving(decode, monkeypatch, error):
    exits, flaky = [], []
    monkeypatch.setattr(os, "_exit", exits.append)  # the old way out; must not be taken

    def fail_first_accepts(listener):
        flaky.append(_FailingAccept(listener._socket, error, times=2))
        listener._socket = flaky[0]

    with _own_listener(decode, prepare=fail_first_accepts, max_connections=1) as listener:
        decode.assert_serves(f"after-accept-{errno.errorcode[error]}", listener)
        assert flaky[0].left == 0 and not exits


# -- draining and closing ------------------------------------------------------------------------
def test_a_draining_worker_takes_the_kv_of_held_reservations_only(decode):
    address, ticket = decode.reserve("held-at-drain")
    k, v = _kv(5, 10)
    decode.admission.start_draining()
    try:
        err = _refused(lambda: send_kv(address, "stranger", secrets.token_bytes(16),
                                       kv_frame_parts("stranger", 1, k, v), timeout_s=10))
        assert err.code is Code.UNAVAILABLE and "draining" in err.message
        assert send_kv(address, "held-at-drain", ticket, kv_frame_parts("held-at-drain", 1, k, v),
                       timeout_s=10) == 2 * _nbytes(k)
    finally:
        decode.admission.open()
    assert decode.release("held-at-drain")


def test_close_stops_accepting_and_finishes_the_transfer_in_flight(decode):
    listener = KVListener(KVReceiver(decode.engine), tickets=decode.listener.tickets)
    listener.start()
    decode.reserve("in-flight")
    ticket = listener.issue_ticket("in-flight", 30)
    k, v = _kv(6, 10)
    frames = list(kv_frame_parts("in-flight", 1, k, v, chunk_bytes=1000))
    started, closing = threading.Event(), threading.Event()
    result = {}

    def frames_with_a_pause():
        for i, parts in enumerate(frames):
            if i == 2:
                started.set()
                closing.wait(10)
                time.sleep(0.2)  # close() is under way
            yield parts

    def send():
        result["bytes"] = send_kv(listener.address, "in-flight", ticket, frames_with_a_pause(), timeout_s=20)

    sender = threading.Thread(target=send)
    sender.start()
    assert started.wait(10)
    closer = threading.Thread(target=listener.close, args=(10.0,))
    closer.start()
    closing.set()
    closer.join(15)
    sender.join(15)
    assert result.get("bytes") == 2 * _nbytes(k)  # the transfer in flight finished
    host, port = listener.address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5)
    assert decode.release("in-flight")


# -- TLS -----------------------------------------------------------------------------------------
def test_tls_with_client_certificates(decode, tmp_path):
    pki, other = make_pki(tmp_path / "pki", "kv"), make_pki(tmp_path / "other", "other")
    tls = TLSConfig(pki.cert, pki.key, pki.ca)
    listener = KVListener(KVReceiver(decode.engine), tickets=decode.listener.tickets,
                          ssl_context=server_ssl_context(tls, require_client_cert=True))
    listener.start()
    try:
        k, v = _kv(8, 10)

        def send(rid, context):
            decode.reserve(rid)
            ticket = listener.issue_ticket(rid, 30)
            try:
                return send_kv(listener.address, rid, ticket, kv_frame_parts(rid, 1, k, v), timeout_s=10,
                               ssl_context=context)
            finally:
                decode.release(rid)

        decode.assert_serves("tls-ok", listener, client_ssl_context(tls))
        no_client_cert = ssl.create_default_context(cafile=pki.ca)
        with pytest.raises(OSError):  # the handshake or the first read fails: no certificate, no entry
            send("tls-no-cert", no_client_cert)
        with pytest.raises(ssl.SSLCertVerificationError):  # a worker the CA did not sign is not trusted
            send("tls-other-ca", client_ssl_context(TLSConfig(other.cert, other.key, other.ca)))
        with pytest.raises(OSError):
            send("tls-plaintext", None)
        decode.wait_all_free("after the TLS tests")
    finally:
        listener.close(1.0)


def test_the_listener_config_is_validated():
    with pytest.raises(ValueError, match="port"):
        KVListenerConfig(port=70000)
    with pytest.raises(ValueError, match="limits"):
        KVListenerConfig(max_connections=0)



def test_a_wildcard_data_address_is_dialled_at_the_workers_own_host():
    from splitserve.runtime.kv_socket import resolve_data_address, split_address

    assert resolve_data_address("0.0.0.0:7001", "10.0.0.3:50062") == "10.0.0.3:7001"
    assert resolve_data_address("[::]:7001", "[fd00::3]:50062") == "[fd00::3]:7001"
    assert resolve_data_address("10.0.0.9:7001", "10.0.0.3:50062") == "10.0.0.9:7001"
    assert split_address("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="host:port"):
        split_address("nohost")


def test_frame_buffers_are_reused_across_connections(decode):
    """A fresh buffer per connection would pay first-touch page faults on every request."""
    k, v = _kv(9, 33)
    grown = []  # each connection's buffer once given back (held: an id stays unique while it lives)
    with _own_listener(decode) as listener:
        for rid in ("buffers-1", "buffers-2", "buffers-3"):
            decode.reserve(rid)
            ticket = listener.issue_ticket(rid, 30)
            frames = kv_frame_parts(rid, 1, k, v, chunk_bytes=1 << 20)
            assert send_kv(listener.address, rid, ticket, frames, timeout_s=10) == 2 * _nbytes(k)
            assert decode.release(rid)
            deadline = time.monotonic() + 5  # the handler gives its buffer back after answering, then ends
            while listener._handlers:
                assert time.monotonic() < deadline, "the connection's handler did not end"
                time.sleep(0.01)
            assert len(listener._buffers) == 1 and len(listener._buffers[0]) >= k[0].nbytes, listener._buffers
            grown.append(listener._buffers[0])
    assert len({id(b) for b in grown}) == 1  # the very buffer the first connection grew, every time
    decode.wait_all_free("after the buffer reuse test")


def test_a_data_port_that_refuses_connections_falls_back_to_transfer_kv(decode):
    _, ticket = decode.reserve("fallback")
    with socket.socket() as closed:  # bound, never listening: a connection to it is refused
        closed.bind(("127.0.0.1", 0))
        job = PrefillJob("fallback", [1, 2, 3], SamplingParams(), decode.address,
                         kv_data_address=f"127.0.0.1:{closed.getsockname()[1]}", kv_ticket=ticket)
        k, v = _kv(10, 12)
        metrics, channels = WorkerMetrics(), ChannelPool()
        try:
            KVSender(channels, metrics=metrics)(job, 4, k, v)
        finally:
            channels.close()
    get = metrics.registry.get_sample_value  # counted once, as a gRPC transfer that succeeded
    assert get("splitserve_kv_transfers_total", {"direction": "sent", "transport": "grpc"}) == 1
    assert get("splitserve_kv_transfers_total", {"direction": "sent", "transport": "socket"}) is None
    assert get("splitserve_kv_transfer_failures_total", {"direction": "sent"}) in (None, 0)
    assert get("splitserve_kv_transfer_bytes_total", {"direction": "sent"}) == 2 * _nbytes(k)
    with decode.engine._lock:  # the KV came through TransferKV, whole
        slot = decode.engine.scheduler.slots["fallback"]
        assert slot.output_ids == [4] and [a.tobytes() for a in slot.kv[0] + slot.kv[1]] == [
            x.tobytes() for x in k + v]
    assert decode.release("fallback")
    decode.wait_all_free("after the fallback")
