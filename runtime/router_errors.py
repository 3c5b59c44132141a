"""The error a routed request fails with, and which worker status codes reach the client as they are."""

from __future__ import annotations

import grpc


class RouterError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def passed_through(code: grpc.StatusCode) -> grpc.StatusCode:
    """Codes that describe the request pass through to the client; anything else is the worker's fault."""
    passed = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
    return code if code in passed else grpc.StatusCode.UNAVAILABLE
