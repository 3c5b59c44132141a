"""Shared-secret auth as gRPC interceptors: the public API key and the internal token.

    client ──authorization: Bearer KEY──► router (RequireSecret on every method but health/reflection)
    router, prefill ──authorization: Bearer TOKEN──► workers (RequireSecret on Prefill and Decode)

Both use the `authorization` header because gRPC redacts it in its own HTTP traces
(GRPC_TRACE=http); a custom header would be printed there in full.

The caller side attaches its secret on the channel (AttachMetadata), so no call site can
forget it. Secrets are compared in constant time and never logged or echoed in an error.
Secrets come from a file flag or an environment variable, never from a command-line value
(anyone on the host can read argv with `ps`).
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

API_KEY_ENV = "SPLITSERVE_API_KEY"
INTERNAL_TOKEN_ENV = "SPLITSERVE_INTERNAL_TOKEN"
AUTH_HEADER, BEARER = "authorization", "Bearer "
# Open without a secret: they reveal no data (status; the public schema) and load balancers probe them.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def read_secret(env_var: str, path: str | None, what: str) -> str | None:
    """The secret in file `path` if given, else in $env_var, else None. Surrounding whitespace is dropped."""
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the {what} file {path}: {e.strerror}") from None
        if not value:
            raise ValueError(f"the {what} file {path} is empty")
        return value
    return os.environ.get(env_var, "").strip() or None


class RequireSecret(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer SECRET` with UNAUTHENTICATED; `open_prefixes` pass."""

    def __init__(self, secret: str, *, what: str, open_prefixes: tuple[str, ...] = OPEN_SERVICES):
        if not secret:
            raise ValueError(f"the {what} is empty")
        self._expected = (BEARER + secret).encode()
        self._what, self._open = what, open_prefixes

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(self._open):
            return continuation(details)
        sent = [value for key, value in details.invocation_metadata or () if key == AUTH_HEADER]
        if len(sent) == 1 and hmac.compare_digest(_as_bytes(sent[0]), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        problem = f"invalid {self._what}" if sent else f"missing {self._what} ('{AUTH_HEADER}: {BEARER}...')"
        return _deny(handler, details.method, problem)


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _deny(handler: grpc.RpcMethodHandler, method: str, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED without reading the request."""

    def reject(_request, context: grpc.ServicerContext):
        log.warning("rejected %s from %s: %s", method, context.peer(), problem)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[handler.request_streaming, handler.response_streaming]
    return make(reject)


class AttachMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (a secret) to every call on a channel."""

    def __init__(self, *pairs: tuple[str, str]):
        self._pairs = tuple(pairs)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, tuple(details.metadata or ()) + self._pairs,
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def require_api_key(api_key: str) -> RequireSecret:
    """The router's check; the SDK sends `authorization: Bearer KEY`."""
    return RequireSecret(api_key, what="API key")


def require_internal_token(token: str) -> RequireSecret:
    """The workers' check: Prefill and Decode; health stays open for the router's readiness probe."""
    return RequireSecret(token, what="internal token")


def attach_internal_token(token: str) -> AttachMetadata:
    return AttachMetadata((AUTH_HEADER, BEARER + token))
