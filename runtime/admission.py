"""The router's admission limit: at most N requests inside the router at once.

A request is admitted when its Generate call arrives and leaves when the call ends, whatever
stage it is in (waiting for decode pages, in a prefill queue, streaming tokens); a call with n
sequences (runtime/parallel_sampling.py) is n requests. Past the
limit a new call is refused at once with RESOURCE_EXHAUSTED, never queued: a client that is
told "busy" can back off or go to another replica, where one queued behind a long backlog
only learns it when its deadline has passed. (TGI's --max-concurrent-requests works the same.)

Every queue behind the router is bounded too: the line for decode pages (runtime/page_reservations.py,
by this limit), each prefill worker's queue (runtime/prefill_engine.py), each decode worker's
reservations (by its page pool).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator

# vLLM's benchmark sends 1000 requests at once by default (--num-prompts 1000, rate inf); a
# default below that would turn a normal benchmark run into errors.
DEFAULT_MAX_CONCURRENT_REQUESTS = 1024


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS

    def __post_init__(self):
        if self.max_concurrent_requests < 1:
            raise ValueError(f"--max-concurrent-requests must be >= 1, got {self.max_concurrent_requests}")


class AdmissionRejected(Exception):
    """The router is at its limit; the message names it."""


class AdmissionGate:
    """Counts admitted requests; thread-safe (each gRPC handler thread calls `admit`)."""

    def __init__(self, config: AdmissionConfig = AdmissionConfig()):
        self.limit = config.max_concurrent_requests
        self._lock = threading.Lock()
        self._admitted = 0
        self.rejected = 0  # calls refused since start

    @property
    def admitted(self) -> int:
        with self._lock:
            return self._admitted

    @contextlib.contextmanager
    def admit(self, places: int = 1) -> Iterator[None]:
        """Holds `places` places (a call with n sequences runs n requests) for the duration of the
        block; raises AdmissionRejected if they are not all free."""
        with self._lock:
            if self._admitted + places > self.limit:
                self.rejected += 1
                asked = f" ({places} asked by this call's n)" if places > 1 else ""
                raise AdmissionRejected(
                    f"the router is at its limit of {self.limit} concurrent requests{asked} "
                    f"(--max-concurrent-requests); retry later")
            self._admitted += places
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= places
