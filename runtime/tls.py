"""TLS for every listener and internal channel, and the rule for where a server may listen.

One certificate per process (`--tls-cert`/`--tls-key`): served on its port and, with
mutual TLS, presented as its client certificate on internal channels. `--tls-ca` is the
internal CA and turns on mutual TLS: workers then accept only callers (the router, prefill
workers) whose client certificate it signed, and callers verify workers against it.

    router public port   TLS (cert, key)                 clients verify with their own roots
    worker port          TLS (cert, key) [+ client CA]   callers verify with --tls-ca
    router → worker      TLS [+ client certificate]      prefill → decode (TransferKV) the same
    KV data socket       the worker port's settings, through Python's ssl (server_ssl_context /
                         client_ssl_context): same certificate, same CA, same checks

A process with TLS talks TLS to its workers; without --tls-ca it verifies them against the
system roots and presents no client certificate.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import ssl
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    cert: str | None = None  # PEM certificate chain of this process
    key: str | None = None   # PEM private key of that certificate
    ca: str | None = None    # PEM internal CA: turns on mutual TLS for internal traffic

    def __post_init__(self):
        if bool(self.cert) != bool(self.key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.ca and not self.cert:
            raise ValueError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key: "
                             "the certificate is also this process's client certificate")

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @property
    def mutual(self) -> bool:
        return self.ca is not None


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror}") from None


def check_files(tls: TLSConfig) -> None:
    """Raises ValueError now if a file is unreadable, rather than after a model has loaded."""
    for path, what in ((tls.cert, "TLS certificate"), (tls.key, "TLS key"), (tls.ca, "TLS CA")):
        if path:
            _read(path, what)


def server_credentials(tls: TLSConfig, *, require_client_cert: bool) -> grpc.ServerCredentials | None:
    """None without TLS. `require_client_cert` (workers, with --tls-ca): callers must present one the CA signed."""
    if not tls.enabled:
        return None
    pair = (_read(tls.key, "TLS key"), _read(tls.cert, "TLS certificate"))
    client_auth = require_client_cert and tls.mutual
    return grpc.ssl_server_credentials([pair], root_certificates=_read(tls.ca, "TLS CA") if client_auth else None,
                                       require_client_auth=client_auth)


def internal_channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials | None:
    """Credentials for channels to workers: None (plaintext) without TLS."""
    if not tls.enabled:
        return None
    if not tls.mutual:
        return grpc.ssl_channel_credentials()  # the system roots
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca, "TLS CA"),
                                        private_key=_read(tls.key, "TLS key"),
                                        certificate_chain=_read(tls.cert, "TLS certificate"))


def server_ssl_context(tls: TLSConfig, *, require_client_cert: bool) -> ssl.SSLContext | None:
    """The `server_credentials` of a raw socket (the KV data listener): None without TLS."""
    if not tls.enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if require_client_cert and tls.mutual:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=tls.ca)
    # No TLS 1.3 session tickets: a connection carries one transfer, and a ticket arriving after
    # the handshake would look to the sender like the worker's early answer (kv_socket.py).
    context.num_tickets = 0
    return context


def https_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """An HTTPS server's context (openai-server): this process's certificate, TLS 1.2 or later, no
    client certificate; None without TLS."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    return context


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The `internal_channel_credentials` of a raw socket: the worker's certificate is checked against
    --tls-ca (else the system roots) and its name against the host dialled; with --tls-ca this
    process's certificate is presented as its client certificate. None without TLS."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(cafile=tls.ca) if tls.mutual else ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.mutual:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable from outside


def check_listen_address(host: str, tls: TLSConfig, allow_insecure: bool) -> None:
    """Plaintext is for loopback. Elsewhere it needs --allow-insecure, and still logs a warning.

    Raises ValueError (the CLI turns it into a one-line exit) when neither TLS nor the flag is given.
    """
    if tls.enabled or is_loopback(host):
        return
    if not allow_insecure:
        raise ValueError(f"refusing to listen on {host} without TLS: anyone who can reach it could read and send "
                         "its traffic. Give --tls-cert and --tls-key, listen on 127.0.0.1, or pass "
                         "--allow-insecure (e.g. on a private network behind a TLS-terminating proxy).")
    log.warning("listening on %s WITHOUT TLS (--allow-insecure): traffic, API keys and tokens are readable "
                "on the network", host)
