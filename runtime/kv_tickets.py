"""One-time tickets that admit a sender to a decode worker's KV data socket. Plain Python.

The data socket (runtime/kv_listener.py) is a bare TCP port, so it cannot check the internal
token the way gRPC interceptors do. Instead Decode/Reserve, which that token protects, issues a
fresh random ticket for each reservation and returns it with the data address; the router hands
both to the prefill worker that will send the KV. A connection must present the request id and
its ticket before anything else; a ticket works once, only for its own request, and only until
the reservation's lease ends. Tickets are compared in constant time and never logged.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import threading
import time
from typing import Callable

TICKET_BYTES = 16
# An expired ticket stays this long, so that a sender arriving late hears "expired" (NOT_FOUND, as
# TransferKV answers) rather than "no valid ticket"; the book still holds at most the tickets
# issued within one lease plus this.
EXPIRED_KEPT_S = 60.0


class TicketRefused(Exception):
    """The ticket admits nothing: unknown, already used, for another request, or expired."""


class TicketExpired(TicketRefused):
    """The ticket matched, but its reservation's lease had ended (the sender was too late)."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    ticket: bytes = dataclasses.field(repr=False)
    expires_at: float  # on the book's clock


class TicketBook:
    """Tickets by request id. Thread-safe: gRPC threads issue, listener threads redeem."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def issue(self, request_id: str, lease_s: float) -> bytes:
        """A new ticket for `request_id`, good for one connection within `lease_s` seconds; it
        replaces any earlier ticket of that id."""
        if not request_id or lease_s <= 0:
            raise ValueError(f"need a request id and a lease > 0, got {request_id!r} and {lease_s}")
        ticket = secrets.token_bytes(TICKET_BYTES)
        with self._lock:
            now = self.clock()
            # Bounded: every entry leaves once used, or EXPIRED_KEPT_S after it expired.
            for rid in [r for r, e in self._entries.items() if e.expires_at + EXPIRED_KEPT_S < now]:
                del self._entries[rid]
            self._entries[request_id] = _Entry(ticket, now + lease_s)
        return ticket

    def renew(self, request_id: str, lease_s: float) -> bool:
        """An unused ticket of `request_id` stays good for `lease_s` from now (never shorter than it
        was), as its reservation's lease does; False if there is none (used, expired and dropped, or
        never issued: a transfer already underway keeps the limit it had)."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is None:
                return False
            self._entries[request_id] = dataclasses.replace(
                entry, expires_at=max(entry.expires_at, self.clock() + lease_s))
            return True

    def redeem(self, request_id: str, ticket: bytes) -> float:
        """Uses up the ticket; returns when its lease ends (on the book's clock). Raises TicketRefused."""
        with self._lock:
            entry = self._entries.get(request_id)
            # One message for "no such ticket" and "wrong ticket": the caller learns nothing it
            # could use to find a live request id.
            if entry is None or not hmac.compare_digest(entry.ticket, ticket):
                raise TicketRefused(f"no valid ticket for request {request_id!r} (unknown, already used, "
                                    "or issued for another request)")
            del self._entries[request_id]  # one use, whatever happens next
        if self.clock() > entry.expires_at:
            raise TicketExpired(f"the ticket for request {request_id!r} expired with its reservation's lease")
        return entry.expires_at

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
