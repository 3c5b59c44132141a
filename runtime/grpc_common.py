"""gRPC plumbing shared by every listener and client: message caps, listening, channels, health."""

from __future__ import annotations

import dataclasses
import threading
from concurrent import futures
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.runtime.auth import attach_internal_token

# Explicit caps on both ends; past them gRPC answers RESOURCE_EXHAUSTED before any handler runs.
# Public (router port, SDK): a Generate request is one prompt; 8 MiB holds a 1M-token prompt as
# text or as token ids, and keeps what one unauthenticated message can cost the router small.
PUBLIC_MAX_MESSAGE_BYTES = 8 << 20
# Internal (workers, router and prefill channels): a KV chunk is ~1 MiB (KVSender; <= a few MiB),
# a Prefill/Run carries one prompt (<= the public cap). 16 MiB leaves room for both.
INTERNAL_MAX_MESSAGE_BYTES = 16 << 20


def message_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


PUBLIC_OPTIONS = message_options(PUBLIC_MAX_MESSAGE_BYTES)
INTERNAL_OPTIONS = message_options(INTERNAL_MAX_MESSAGE_BYTES)
MAX_MESSAGE_BYTES, OPTIONS = INTERNAL_MAX_MESSAGE_BYTES, INTERNAL_OPTIONS  # the old names, for existing callers
# gRPC's reconnect backoff grows to 120 s by default: a worker that restarted after 20 s would
# then be unreachable for up to minutes more. Workers are on this host or this cluster's network,
# where trying again each second costs nothing.
MAX_RECONNECT_BACKOFF_MS = 1000
INTERNAL_CHANNEL_OPTIONS = INTERNAL_OPTIONS + [("grpc.initial_reconnect_backoff_ms", 100),
                                               ("grpc.min_reconnect_backoff_ms", 100),
                                               ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]


@dataclasses.dataclass(frozen=True)
class Keepalive:
    """HTTP/2 pings on open calls. A token feed (Decode/StreamBatched) is one long call per decode
    worker: if the peer stops answering without closing its TCP connection (a frozen process, a
    host gone, a network partition), nothing else would end the call until TCP gives up, which on
    Linux takes 15 minutes or more. A ping unanswered for `timeout_ms` closes the connection and
    fails its calls: the router's requests on it get UNAVAILABLE, and the worker's end is cancelled,
    which releases what those requests held."""

    time_ms: int = 5_000  # a ping after this long, on every connection with calls open
    timeout_ms: int = 5_000  # no answer within this: the connection is dead

    def channel_options(self) -> list[tuple[str, int]]:
        # max_pings_without_data=0: keep pinging on a call with nothing to send (an idle feed), else
        # gRPC stops after 2 pings and a dead peer goes unnoticed until the next request.
        # ping_timeout_ms: gRPC 1.85 waits this long (default 1 minute) for any ping's answer,
        # keepalive_timeout_ms notwithstanding.
        return [("grpc.keepalive_time_ms", self.time_ms), ("grpc.keepalive_timeout_ms", self.timeout_ms),
                ("grpc.http2.ping_timeout_ms", self.timeout_ms), ("grpc.http2.max_pings_without_data", 0)]

    def server_options(self) -> list[tuple[str, int]]:
        """The server pings its clients too (a router gone away frees its requests on the worker), and
        accepts the clients' pings: by default a server takes a ping more often than every 5 minutes
        on a quiet connection as abuse, and after 2 closes the connection (GOAWAY too_many_pings),
        which would break every idle token feed."""
        return self.channel_options() + [("grpc.http2.min_ping_interval_without_data_ms", self.time_ms // 2)]


KEEPALIVE = Keepalive()  # internal: workers, and the router's and prefill workers' channels to them
# The public port pings its clients less often and waits longer (gRPC's own default timeout): its
# clients may be far away, behind proxies; what it finds is a client gone, whose request it then ends.
PUBLIC_KEEPALIVE = Keepalive(time_ms=30_000, timeout_ms=20_000)


def public_channel_options() -> list[tuple[str, int]]:
    """The SDK's channel to a router: the public message caps, and PUBLIC_KEEPALIVE's pings, so a
    stream from a router that went silent ends UNAVAILABLE instead of waiting forever."""
    return PUBLIC_OPTIONS + PUBLIC_KEEPALIVE.channel_options()


def make_server(options: Sequence[tuple[str, int]] = INTERNAL_OPTIONS, interceptors: Sequence = (),
                max_workers: int = 256, keepalive: Keepalive | None = None) -> grpc.Server:
    """`keepalive`: the server's pings and ping policy (default: KEEPALIVE, the internal one).

    SO_REUSEPORT off: gRPC turns it on by default on Linux, so a second server on a port in use
    bound it too and took half its new connections, instead of failing to start."""
    keepalive = keepalive or KEEPALIVE
    options = list(options) + keepalive.server_options() + [("grpc.so_reuseport", 0)]
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                       interceptors=list(interceptors))


def listen(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    """Binds host:port, with TLS when `credentials` are given; returns the port."""
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:  # newer gRPC raises where older returned 0
        raise OSError(f"cannot listen on {address} (in use?): {e}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address} (in use?)")
    return bound


class ChannelPool:
    """One channel per address, created on first use, shared by threads.

    Every channel carries the internal token (a channel interceptor, so no call site can
    forget it) and uses TLS when `credentials` are given.
    """

    def __init__(self, credentials: grpc.ChannelCredentials | None = None, token: str | None = None):
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._credentials = credentials
        self._token = token

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = self._open(address)
            return self._channels[address]

    def _open(self, address: str) -> grpc.Channel:
        options = INTERNAL_CHANNEL_OPTIONS + KEEPALIVE.channel_options()
        if self._credentials is not None:
            channel = grpc.secure_channel(address, self._credentials, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, attach_internal_token(self._token)) if self._token else channel

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


def add_health(server: grpc.Server) -> health.HealthServicer:
    """Adds grpc.health.v1; overall status starts NOT_SERVING until set_serving()."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    return servicer


def set_serving(servicer: health.HealthServicer, serving: bool = True) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    servicer.set("", status)


def wait_until_serving(address: str, timeout_s: float, check_alive=None, channels: ChannelPool | None = None) -> None:
    """Blocks until the server at `address` reports SERVING; raises TimeoutError.

    `check_alive()`, if given, is called while waiting and may raise (a dead worker process).
    `channels`: the caller's pool, with its TLS settings (default: a plaintext one of its own).
    """
    import time

    pool = channels if channels is not None else ChannelPool()
    stub = health_pb2_grpc.HealthStub(pool.get(address))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if check_alive is not None:
                check_alive()
            time.sleep(0.1)
    finally:
        if channels is None:
            pool.close()
    raise TimeoutError(f"{address} did not report SERVING within {timeout_s:.0f}s")
