"""The KV data socket's ticket book on a fake clock: one use per ticket, expiry told apart from
a ticket that never was, and expired tickets dropped after EXPIRED_KEPT_S."""

import pytest

from splitserve.runtime.kv_tickets import EXPIRED_KEPT_S, TicketBook, TicketExpired, TicketRefused


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_ticket_admits_once_within_its_lease():
    clock = Clock()
    book = TicketBook(clock)
    ticket = book.issue("a", lease_s=5)
    assert book.redeem("a", ticket) == 105.0
    with pytest.raises(TicketRefused) as e:
        book.redeem("a", ticket)
    assert not isinstance(e.value, TicketExpired)  # used: told apart from expired only by its holder
    with pytest.raises(TicketRefused):
        book.redeem("b", ticket)  # another request's id


def test_a_late_ticket_is_expired_until_it_is_dropped():
    clock = Clock()
    book = TicketBook(clock)
    late, later = book.issue("late", lease_s=1), book.issue("later", lease_s=1)
    clock.now += 2
    book.issue("other", lease_s=1)  # issuing purges, but keeps what expired within EXPIRED_KEPT_S
    with pytest.raises(TicketExpired):
        book.redeem("late", late)
    clock.now += EXPIRED_KEPT_S
    book.issue("another", lease_s=1)
    with pytest.raises(TicketRefused) as e:
        book.redeem("later", later)
    assert not isinstance(e.value, TicketExpired)  # dropped: now it is unknown
    assert len(book) == 2  # "another", and "other", which expired 59 s ago: kept still


def test_a_wrong_ticket_is_refused_and_the_right_one_still_works():
    book = TicketBook(Clock())
    ticket = book.issue("a", lease_s=5)
    with pytest.raises(TicketRefused) as e:
        book.redeem("a", bytes(len(ticket)))
    assert not isinstance(e.value, TicketExpired)
    assert book.redeem("a", ticket) == 105.0


def test_renewing_an_unused_ticket_extends_it_and_a_used_one_is_not_revived():
    clock = Clock()
    book = TicketBook(clock)
    ticket = book.issue("queued", lease_s=2)
    clock.now += 1.5
    assert book.renew("queued", lease_s=2) is True
    clock.now += 1.5  # past the first lease, within the renewed one
    assert book.redeem("queued", ticket) == 103.5
    assert book.renew("queued", lease_s=2) is False  # used: nothing to renew
    with pytest.raises(TicketRefused):
        book.redeem("queued", ticket)
    assert book.renew("never-issued", lease_s=2) is False
