"""How a process protects its traffic: TLS settings and secrets in one typed value each.

InternalSecurity covers router → worker and prefill → decode traffic (workers serve with it,
callers build their channels from it); the router adds the public API key on its own port.
Secrets are dataclass fields with repr=False, so a logged config never shows them.
"""

from __future__ import annotations

import dataclasses
import ssl

import grpc

from splitserve.runtime.auth import require_internal_token
from splitserve.runtime.grpc_common import ChannelPool, listen
from splitserve.runtime.tls import (
    TLSConfig,
    client_ssl_context,
    internal_channel_credentials,
    server_credentials,
    server_ssl_context,
)


@dataclasses.dataclass(frozen=True)
class InternalSecurity:
    tls: TLSConfig = TLSConfig()
    token: str | None = dataclasses.field(default=None, repr=False)  # None: workers accept any caller

    def channels(self) -> ChannelPool:
        """The pool for calls to workers: TLS (and a client certificate) as configured, the token on every call."""
        return ChannelPool(internal_channel_credentials(self.tls), self.token)

    def worker_credentials(self) -> grpc.ServerCredentials | None:
        return server_credentials(self.tls, require_client_cert=True)

    def listen(self, server: grpc.Server, host: str, port: int) -> int:
        """Binds a worker's port: TLS as configured, client certificates required under --tls-ca."""
        return listen(server, host, port, self.worker_credentials())

    def worker_interceptors(self) -> list[grpc.ServerInterceptor]:
        return [require_internal_token(self.token)] if self.token else []

    def kv_data_server_context(self) -> ssl.SSLContext | None:
        """TLS of a decode worker's KV data socket: as its gRPC port (client certificates under --tls-ca).
        The one-time ticket from Reserve stands in for the token there (runtime/kv_tickets.py)."""
        return server_ssl_context(self.tls, require_client_cert=True)

    def kv_data_client_context(self) -> ssl.SSLContext | None:
        """TLS of a sender's connections to KV data sockets: as its KV channels."""
        return client_ssl_context(self.tls)
