"""The KV data socket's wire protocol, and its sending end.

gRPC-Python moves bulk bytes at well under half of what a plain socket does on these hosts
(scripts/bench/RESULTS.md), so a request's KV payload can travel over a TCP connection of its own
(TLS when the worker's port has it), while reservations, tickets and tokens stay on gRPC. One
connection carries one request's KV, then closes:

    sender (send_kv)                                        decode worker (kv_listener.py)
    hello   b"SSKV", u8 version, u16 n + request id,
            u8 n + ticket                              ──►  ticket redeemed (kv_tickets.py)
    frames  u32 n + one encoded KVChunk frame, ...     ──►  the same checks as TransferKV
    end     u32 0xFFFFFFFF                             ──►  (kv_receive.py)
                                                       ◄──  answer: u8 gRPC status code,
                                                            u64 KV bytes accepted, u32 n + message

The frames are exactly TransferKV's (runtime/kv_wire.py): header, payloads, checksummed trailer.
The worker answers as soon as it knows: a refusal can come before the end (a bad ticket, the
header of a released request). The sender looks for an answer before each frame and stops
sending once there is one; the worker reads and discards what was already on its way, so that
the sender's writes finish and it reads the answer rather than a reset. Integers are big-endian.
"""

from __future__ import annotations

import dataclasses
import select
import socket
import ssl
import struct
import time
from collections.abc import Iterable

import grpc

MAGIC, VERSION = b"SSKV", 1
END_OF_FRAMES = 0xFFFFFFFF
_LENGTH = struct.Struct("!I")
_ANSWER = struct.Struct("!BQI")  # code, bytes accepted, message length
MAX_MESSAGE_BYTES = 4096
# A request id in the hello: the worker refuses a longer one before it reads it (the hello comes
# before the ticket, so anyone can send one); a longer id goes through TransferKV instead.
MAX_REQUEST_ID_BYTES = 1024
_SMALL_PART_BYTES = 64 << 10
_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclasses.dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    received_bytes: int = 0
    message: str = ""

    def encode(self) -> bytes:
        message = self.message.encode()[:MAX_MESSAGE_BYTES]
        return _ANSWER.pack(self.code.value[0], self.received_bytes, len(message)) + message


class KVSocketRefused(Exception):
    """The decode worker answered with an error status (the codes TransferKV uses)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


def fits_hello(request_id: str) -> bool:
    """Whether the data socket takes this request id (else send its KV through TransferKV)."""
    return len(request_id.encode()) <= MAX_REQUEST_ID_BYTES


def encode_hello(request_id: str, ticket: bytes) -> bytes:
    rid = request_id.encode()
    if not fits_hello(request_id) or len(ticket) > 0xFF:
        raise ValueError(f"request id ({len(rid)} bytes; at most {MAX_REQUEST_ID_BYTES}) or ticket "
                         f"({len(ticket)} bytes; at most 255) too long for the KV data socket")
    return MAGIC + bytes([VERSION]) + struct.pack("!H", len(rid)) + rid + bytes([len(ticket)]) + ticket


def split_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"KV data address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def resolve_data_address(advertised: str, worker_address: str) -> str:
    """The data address to dial: a worker listening on every interface (0.0.0.0, ::) advertises that
    wildcard, so the host is taken from the address its gRPC port was reached at."""
    host, port = split_address(advertised)
    if host not in ("0.0.0.0", "::", ""):
        return advertised
    worker_host, _ = split_address(worker_address)
    return f"[{worker_host}]:{port}" if ":" in worker_host else f"{worker_host}:{port}"


# ---- sending ----------------------------------------------------------------------------------


def send_kv(address: str, request_id: str, ticket: bytes, frames: Iterable[tuple], *, timeout_s: float,
            ssl_context: ssl.SSLContext | None = None) -> int:
    """Sends one request's frames (each a tuple of buffers, kv_wire.kv_frame_parts) to the data socket
    at `address`; returns the KV bytes the worker accepted.

    Raises KVSocketRefused with the worker's code when it refuses, TimeoutError past `timeout_s`,
    and another OSError when the connection fails without an answer (the worker is gone).
    """
    deadline = time.monotonic() + timeout_s
    host, port = split_address(address)
    raw = socket.create_connection((host, port), timeout=max(timeout_s, 0.001))
    conn = None
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the end marker must not wait for an ACK
        conn = _Connection(ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context else raw, deadline)
        answer = conn.send_all(request_id, ticket, frames)
    finally:
        (conn.sock if conn is not None else raw).close()
    if answer.code is not grpc.StatusCode.OK:
        raise KVSocketRefused(answer.code, answer.message)
    return answer.received_bytes


class _Connection:
    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._early = b""  # answer bytes read while checking for an answer

    def send_all(self, request_id: str, ticket: bytes, frames: Iterable[tuple]) -> Answer:
        try:
            self._write([encode_hello(request_id, ticket)])
            for parts in frames:
                if self._answer_waiting():
                    return self._read_answer()  # refused: the rest is not wanted
                length = _LENGTH.pack(sum(len(p) for p in parts))
                if len(parts[0]) <= _SMALL_PART_BYTES:  # a frame's head: joined to its length (TLS: one record)
                    self._write([length + bytes(parts[0]), *parts[1:]])
                else:
                    self._write([length, *parts])
            self._write([_LENGTH.pack(END_OF_FRAMES)])
        except (BrokenPipeError, ConnectionResetError) as e:
            try:  # the worker may have answered before it closed
                return self._read_answer()
            except OSError:
                raise e from None
        return self._read_answer()

    def _timeout(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("KV data socket: the transfer's deadline passed")
        return left

    def _write(self, parts: list) -> None:
        self.sock.settimeout(self._timeout())
        if self._tls:  # SSLSocket has no sendmsg
            for part in parts:
                self.sock.sendall(part)
            return
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:  # one scatter write per frame: the KV block goes from the layer to the kernel
            sent = self.sock.sendmsg(views)
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0], sent = views[0][sent:], 0

    def _answer_waiting(self) -> bool:
        if self._early or (self._tls and self.sock.pending()):
            return True
        if not select.select([self.sock], [], [], 0)[0]:
            return False
        if not self._tls:
            return True  # an answer, or the end of the connection
        self.sock.setblocking(False)  # readable may be TLS housekeeping, not data: peek for real
        try:
            self._early = self.sock.recv(MAX_MESSAGE_BYTES)
            return True  # data, or b"" at the end of the connection
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False

    def _read_answer(self) -> Answer:
        head = self._read(_ANSWER.size)
        code, received, size = _ANSWER.unpack(head)
        message = self._read(size).decode(errors="replace")
        return Answer(_CODES.get(code, grpc.StatusCode.UNKNOWN), received, message)

    def _read(self, size: int) -> bytes:
        data = bytearray(self._early[:size])
        self._early = self._early[size:]
        while len(data) < size:
            self.sock.settimeout(self._timeout())
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionResetError("the decode worker closed the KV data connection without an answer")
            data += chunk
        return bytes(data)
