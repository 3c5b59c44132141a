"""A decode worker's KV data socket: each request's KV frames over a TCP connection of its own.

    accept thread ──► one handler thread per connection (at most max_connections at once; more
                      wait in the kernel's backlog)
    handler: TLS handshake (when the worker has TLS) → hello: request id + ticket → ticket
             redeemed (kv_tickets.py) → frames read with recv_into into one reusable buffer →
             KVReceiver.receive, the code TransferKV runs → answer → close

The protocol is in kv_socket.py. Every read has a deadline for its whole stage, not per recv():
the TLS handshake and the hello together within hello_timeout_s of the accept (so a peer without
a ticket, trickling bytes, holds a slot no longer than that), then the frames before the ticket's
lease ends (the reservation is gone after that anyway), so a sender that stalls or vanishes
mid-frame ends as a cut-off transfer: its reservation is dropped and its pages freed. A frame is
at most max_frame_bytes, and a connection holds one frame buffer beyond the KV being assembled;
buffers are reused across connections (a fresh one would pay first-touch page faults on every
request). An accept() that fails for want of descriptors or memory is retried after a pause.

Draining: only Reserve issues tickets, and a draining worker refuses Reserve, so the connections
that can still succeed belong to reservations already held; they are served (admitted work runs
to its end, as TransferKV does) and any other gets UNAVAILABLE. `close()`, after the drain, stops
accepting and waits for the connections in flight.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import ssl
import struct
import threading
import time

import grpc

from splitserve.runtime.drain import Admission, State
from splitserve.runtime.grpc_common import INTERNAL_MAX_MESSAGE_BYTES
from splitserve.runtime.kv_codec import KVTransferError
from splitserve.runtime.kv_receive import KVReceiver, KVRefused
from splitserve.runtime.kv_socket import END_OF_FRAMES, MAGIC, MAX_REQUEST_ID_BYTES, VERSION, Answer
from splitserve.runtime.kv_tickets import TicketBook, TicketExpired, TicketRefused
from splitserve.runtime.metrics import WorkerMetrics

log = logging.getLogger(__name__)

ACCEPT_POLL_S = 0.2  # how soon the accept loop notices close()
DISCARD_LIMIT_BYTES = 64 << 20  # after a refusal: what is read and dropped so the sender sees the answer
DISCARD_TIMEOUT_S = 5.0
IDLE_FRAME_BUFFERS = 4  # kept for the next connections (each at most max_frame_bytes; usually ~1 MiB)
ACCEPT_BACKOFF_S = (0.1, 1.0)  # after a failed accept(): the first wait, and the most it doubles to
# accept() failures that pass: out of descriptors or memory for now, or (Linux, accept(2)) a network
# error of the connection being taken. Any other (EBADF, EINVAL: the socket is broken) is fatal.
TRANSIENT_ACCEPT_ERRORS = frozenset({
    errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO, errno.EPERM,
    errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
    errno.ENETUNREACH,
})
LOGGED_ID_CHARS = 64  # of a request id no ticket vouches for: the peer chose it, up to 1 KiB


@dataclasses.dataclass(frozen=True)
class KVListenerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    max_connections: int = 64  # handler threads at once
    hello_timeout_s: float = 10.0  # TLS handshake + hello
    max_frame_bytes: int = INTERNAL_MAX_MESSAGE_BYTES  # as the gRPC ports' message cap

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"KV data port must be in [0, 65535], got {self.port}")
        if self.max_connections < 1 or self.hello_timeout_s <= 0 or self.max_frame_bytes < 1:
            raise ValueError(f"invalid KV listener limits: {self}")


class KVListener:
    def __init__(self, receiver: KVReceiver, config: KVListenerConfig = KVListenerConfig(), *,
                 tickets: TicketBook | None = None, ssl_context: ssl.SSLContext | None = None,
                 admission: Admission | None = None, metrics: WorkerMetrics | None = None):
        self.receiver, self.config = receiver, config
        self.tickets = tickets or TicketBook()
        self.metrics = metrics or WorkerMetrics()
        self._ssl, self._admission = ssl_context, admission
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._socket = socket.create_server((config.host.strip("[]"), config.port), family=family,
                                            backlog=config.max_connections)
        self._socket.settimeout(ACCEPT_POLL_S)
        self.port = self._socket.getsockname()[1]
        host = config.host.strip("[]")
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._lock = threading.Lock()
        self._handlers: set[threading.Thread] = set()
        self._buffers: list[bytearray] = []  # idle frame buffers, at most IDLE_FRAME_BUFFERS
        self._closing = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True)

    def start(self) -> None:
        self._acceptor.start()

    def issue_ticket(self, request_id: str, lease_s: float) -> bytes:
        return self.tickets.issue(request_id, lease_s)

    def renew_ticket(self, request_id: str, lease_s: float) -> None:
        self.tickets.renew(request_id, lease_s)

    def close(self, grace_s: float = 5.0) -> None:
        """Stops accepting; waits up to grace_s for the connections in flight."""
        self._closing.set()
        if self._acceptor.is_alive():
            self._acceptor.join()
        self._socket.close()
        deadline = time.monotonic() + grace_s
        with self._lock:
            handlers = list(self._handlers)
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- accepting ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        try:
            self._accept_until_closed()
        except Exception:  # noqa: BLE001 - a worker that cannot take KV any more must not limp on
            log.exception("KV data listener crashed; exiting")
            os._exit(1)

    def _accept_until_closed(self) -> None:
        backoff_s = 0.0  # the last wait after a failed accept(); 0 once one succeeds
        while not self._closing.is_set():
            if not self._slots.acquire(timeout=ACCEPT_POLL_S):
                continue
            try:
                conn, peer = self._socket.accept()
            except (TimeoutError, socket.timeout):
                self._slots.release()
                continue
            except OSError as e:
                self._slots.release()
                if e.errno not in TRANSIENT_ACCEPT_ERRORS:
                    raise
                backoff_s = self._back_off(e, backoff_s)
                continue
            backoff_s = 0.0
            # One deadline from here for the TLS handshake and the whole hello, not per read.
            hello_deadline = time.monotonic() + self.config.hello_timeout_s
            thread = threading.Thread(target=self._serve, args=(conn, peer, hello_deadline), name="kv-receive",
                                      daemon=True)
            with self._lock:
                self._handlers.add(thread)
            thread.start()

    def _back_off(self, error: OSError, last_s: float) -> float:
        """Waits after a failed accept() (out of descriptors, say: retrying at once would spin, and
        the connections in flight free some as they end); returns the wait, doubling up to 1 s."""
        wait_s = min(2 * last_s, ACCEPT_BACKOFF_S[1]) if last_s else ACCEPT_BACKOFF_S[0]
        log.warning("KV data listener: accept() failed (%s); retrying in %.1f s", error, wait_s)
        self._closing.wait(wait_s)
        return wait_s

    def _serve(self, conn: socket.socket, peer, hello_deadline: float) -> None:
        reader = None
        try:
            conn = self._handshake(conn, hello_deadline)
            reader = _Reader(conn, self._take_buffer(), self.config.max_frame_bytes, hello_deadline)
            self._connection(reader, peer)
        except OSError as e:  # the TLS handshake failed, or the peer went away
            log.warning("KV data connection from %s failed: %s", peer, e)
        except Exception:  # noqa: BLE001 - a bug: the receiver has dropped the reservation; say so loudly
            log.exception("KV data connection from %s: unexpected error", peer)
        finally:
            conn.close()
            if reader is not None:
                self._give_back(reader.buffer)  # grown to this connection's largest frame
            self._slots.release()
            with self._lock:
                self._handlers.discard(threading.current_thread())

    def _handshake(self, conn: socket.socket, deadline: float) -> socket.socket:
        """The TLS handshake, if the port has TLS, by the hello's deadline. One timeout covers it
        all: SSLSocket.do_handshake counts its timeout from its start, not per read."""
        if self._ssl is None:
            return conn
        tls = self._ssl.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        try:  # wrap_socket took over conn's descriptor: closing conn no longer closes it
            tls.settimeout(_time_left(deadline, "the TLS handshake did not finish within the hello timeout"))
            tls.do_handshake()
        except OSError:  # SSLError and TimeoutError among them
            tls.close()
            raise
        return tls

    # -- one connection -------------------------------------------------------------------------
    def _connection(self, reader: _Reader, peer) -> None:
        try:
            request_id, ticket = reader.hello()
        except KVTransferError as e:
            return reader.answer(Answer(grpc.StatusCode.INVALID_ARGUMENT, message=str(e)), refused=True)
        try:
            lease_end = self._deadline(self.tickets.redeem(request_id, ticket))
        except TicketRefused as e:
            return reader.answer(self._refusal(e, request_id, peer), refused=True)
        reader.limit(lease_end, "the ticket's lease ended before the KV did")
        with self.metrics.kv_transfer("received", "socket") as timer:
            try:
                timer.bytes = self.receiver.receive(reader.frames(), request_id=request_id)
            except KVRefused as e:
                timer.failed = True
                return reader.answer(Answer(e.code, message=e.message), refused=True)
            except OSError as e:  # cut off; the receiver dropped the reservation
                timer.failed = True
                log.warning("KV data connection for %s from %s cut off: %s", request_id, peer, e)
                code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(e, TimeoutError) else grpc.StatusCode.UNAVAILABLE
                return reader.answer(Answer(code, message=f"KV transfer was cut off: {e}"), refused=True)
        reader.answer(Answer(grpc.StatusCode.OK, timer.bytes))

    def _refusal(self, error: TicketRefused, request_id: str, peer) -> Answer:
        """The answer to a refused ticket. Expired: NOT_FOUND, as TransferKV answers for a reservation
        whose lease ended (the sender logs that at INFO); the ticket matched, so its holder learns
        nothing new. Any other (unknown, used, another request's): UNAUTHENTICATED, as the book
        gives those one refusal so that a stranger cannot probe for live request ids. An expired
        ticket is kept for EXPIRED_KEPT_S (kv_tickets.py); after that it looks unknown."""
        if isinstance(error, TicketExpired):
            log.info("KV data connection from %s for request %s refused: its ticket expired",
                     peer, _clipped(request_id))
            return Answer(grpc.StatusCode.NOT_FOUND, message=str(error))
        log.warning("KV data connection from %s for request %s refused: no valid ticket", peer, _clipped(request_id))
        if self._admission is not None and self._admission.state is State.DRAINING:
            return Answer(grpc.StatusCode.UNAVAILABLE, message=f"{self._admission.name} is draining; {error}")
        return Answer(grpc.StatusCode.UNAUTHENTICATED, message=str(error))

    def _deadline(self, lease_end: float) -> float:
        """The ticket's lease end, from the ticket book's clock onto time.monotonic()'s."""
        return time.monotonic() + (lease_end - self.tickets.clock())

    def _take_buffer(self) -> bytearray:
        with self._lock:
            return self._buffers.pop() if self._buffers else bytearray()

    def _give_back(self, buffer: bytearray) -> None:
        with self._lock:
            if len(self._buffers) < IDLE_FRAME_BUFFERS:
                self._buffers.append(buffer)


def _clipped(text: str) -> str:
    """A peer-chosen string fit for a log line: its start, and its length if cut."""
    if len(text) <= LOGGED_ID_CHARS:
        return repr(text)
    return f"{text[:LOGGED_ID_CHARS]!r}... ({len(text)} chars)"


def _time_left(deadline: float, late: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(late)
    return left


class _Reader:
    """Reads one connection: the hello, then frames into a reusable buffer (no bytes per frame)."""

    def __init__(self, sock: socket.socket, buffer: bytearray, max_frame_bytes: int, hello_deadline: float):
        self.sock, self.max_frame_bytes = sock, max_frame_bytes
        self.buffer = buffer
        self._small = bytearray(MAX_REQUEST_ID_BYTES)  # the hello's fields and frame lengths
        self.limit(hello_deadline, "the hello did not arrive within the hello timeout")

    def limit(self, deadline: float, late: str) -> None:
        """Every read from now on ends by `deadline` (time.monotonic()) or fails: TimeoutError(late)."""
        self.deadline, self._late = deadline, late

    def hello(self) -> tuple[str, bytes]:
        head = self._small_read(len(MAGIC) + 3)
        if head[: len(MAGIC)] != MAGIC or head[len(MAGIC)] != VERSION:
            raise KVTransferError("not a splitserve KV data connection (bad magic or version)")
        rid_len = struct.unpack("!H", head[len(MAGIC) + 1:])[0]
        if rid_len > MAX_REQUEST_ID_BYTES:  # refused unread: the peer has shown no ticket yet
            raise KVTransferError(f"the request id in the hello is {rid_len} bytes, over the limit of "
                                  f"{MAX_REQUEST_ID_BYTES}")
        try:
            request_id = self._small_read(rid_len).decode()
        except UnicodeDecodeError:
            raise KVTransferError("the request id in the hello is not UTF-8") from None
        ticket = self._small_read(self._small_read(1)[0])
        return request_id, ticket

    def frames(self):
        """Yields each frame as a memoryview into the buffer, valid until the next one is asked for."""
        while True:
            (size,) = struct.unpack("!I", self._small_read(4))
            if size == END_OF_FRAMES:
                return
            if size > self.max_frame_bytes:
                raise KVTransferError(f"a frame of {size} bytes exceeds the limit of {self.max_frame_bytes}")
            if len(self.buffer) < size:
                self.buffer = bytearray(size)  # grows to the largest frame seen, then is reused
            yield self._read_into(memoryview(self.buffer)[:size])

    def answer(self, answer: Answer, *, refused: bool = False) -> None:
        """Sends the answer; after a refusal, discards what the sender still had on its way. Both
        together within DISCARD_TIMEOUT_S, however slowly the peer reads or sends."""
        self.limit(time.monotonic() + DISCARD_TIMEOUT_S, "the answer was not taken in time")
        try:
            self._check_deadline()
            self.sock.sendall(answer.encode())  # at most ~4 KiB: one send() within the timeout just set
            if refused:
                self._discard()
        except OSError:
            pass  # the sender is gone (or too slow): nobody to tell

    def _discard(self) -> None:
        left = DISCARD_LIMIT_BYTES
        scratch = memoryview(self.buffer if len(self.buffer) >= 1 << 16 else bytearray(1 << 16))
        while left > 0:
            self._check_deadline()
            n = self.sock.recv_into(scratch)
            if n == 0:
                return
            left -= n

    def _check_deadline(self) -> None:
        self.sock.settimeout(_time_left(self.deadline, self._late))

    def _small_read(self, size: int) -> bytes:
        return bytes(self._read_into(memoryview(self._small)[:size]))

    def _read_into(self, view: memoryview) -> memoryview:
        got = 0
        while got < len(view):
            self._check_deadline()  # each read gets only what is left: a trickling peer cannot outlast it
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionResetError(f"the sender closed the connection {len(view) - got} bytes into a read")
            got += n
        return view
