"""BatchedCall, the worker's end of Decode/StreamBatched: what the engine puts in comes out as
one message per flush, and each request's last entry says how it ended."""

import threading

from splitserve.runtime.decode_engine import END, StreamError
from splitserve.runtime.request import FinishReason
from splitserve.runtime.token_batches import BatchedCall


def drain(call: BatchedCall) -> list:
    """Every message the call yields until it closes (run after close or half_close)."""
    return [entries(m) for m in call.messages()]


def entries(message) -> list:
    return [(e.request_id, list(e.token_ids), e.finish_reason, e.error_code) for e in message.requests]


def test_one_message_per_flush_with_every_request_of_the_step():
    call = BatchedCall()
    messages = call.messages()
    outs = [call.output(f"r{i}") for i in range(3)]
    for step in range(2):
        for i, out in enumerate(outs):
            out.put((10 * i + step, FinishReason.LENGTH if step == 1 and i == 0 else None, None))
        for out in outs:  # the engine flushes each output it touched: the first sends, the rest have nothing
            out.flush()
        assert entries(next(messages)) == [("r0", [step], "length" if step == 1 else "", ""),
                                           ("r1", [10 + step], "", ""), ("r2", [20 + step], "", "")]
    outs[1].flush()  # nothing new: no message
    for out in outs[1:]:
        out.put((99, FinishReason.STOP, None))
    outs[2].flush()
    call.half_close()  # nothing open any more: the call ends after what is queued
    assert [entries(m) for m in messages] == [[("r1", [99], "stop", ""), ("r2", [99], "stop", "")]]
    assert len({out.flush for out in outs}) == 1  # the engine's per-step set holds one flush per call


def test_a_call_that_fell_behind_sends_what_waits_as_one_message():
    call = BatchedCall()
    out = call.output("r")
    for token in range(3):
        out.put((token, None, None))
        out.flush()
    messages = call.messages()
    first = next(messages)  # three flushes were waiting: one message, one entry per flush, in order
    assert [(e.request_id, list(e.token_ids)) for e in first.requests] == [("r", [0]), ("r", [1]), ("r", [2])]
    call.close()
    assert list(messages) == []


def test_released_failed_and_erroring_requests_end_with_a_code():
    call = BatchedCall()
    released, expired, ok = call.output("released"), call.output("expired"), call.output("ok")
    call.output("bad")
    call.fail("bad", "INVALID_ARGUMENT", "top_p must be in (0, 1]")
    released.put((5, None, None))
    released.put(END)  # released before its finish: the router hears CANCELLED
    expired.put(StreamError("its KV did not arrive before the lease expired"))
    ok.put((7, FinishReason.LENGTH, None))
    ok.put(END)  # after the finish, an END adds nothing
    released.flush()
    call.half_close()
    entries = [e for m in drain(call) for e in m]
    assert entries == [
        ("bad", [], "", "INVALID_ARGUMENT"),
        ("released", [5], "", "CANCELLED"),
        ("expired", [], "", "UNAVAILABLE"),
        ("ok", [7], "length", ""),
    ]
    assert call.open_requests() == []


def test_half_close_waits_for_open_requests_and_close_ends_at_once():
    call = BatchedCall()
    out = call.output("r")
    call.half_close()  # "r" is still open: the call goes on
    got = []
    reader = threading.Thread(target=lambda: got.extend(drain(call)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()
    out.put((1, FinishReason.STOP, None))
    out.flush()
    reader.join(5)
    assert not reader.is_alive() and got == [[("r", [1], "stop", "")]]

    cut = BatchedCall()
    cut.output("still-open").put((3, None, None))
    cut.close()  # the call ended (cancelled, or the worker stops): what was pending is sent, then the end
    assert drain(cut) == [[("still-open", [3], "", "")]]
    assert cut.open_requests() == ["still-open"]  # the service releases these


def test_merging_stops_at_the_entry_limit_and_a_closed_call_starts_nothing(monkeypatch):
    import pytest

    from splitserve.runtime import token_batches

    monkeypatch.setattr(token_batches, "MAX_MERGED_ENTRIES", 3)
    call = BatchedCall()
    outs = [call.output(f"r{i}") for i in range(2)]
    for step in range(3):  # three flushes of two entries wait: 2 + 2 > 3, so three messages
        for out in outs:
            out.put((step, None, None))
        outs[0].flush()
    call.close()
    assert [len(entries(m)) for m in call.messages()] == [2, 2, 2]
    with pytest.raises(token_batches.CallClosed):
        call.output("late")  # a request read after the call ended is refused, not left running


def test_a_second_start_of_an_open_request_leaves_it_running():
    import pytest

    from splitserve.runtime import token_batches

    call = BatchedCall()
    out = call.output("r")
    with pytest.raises(token_batches.AlreadyStarted):
        call.output("r")
    out.put((4, FinishReason.LENGTH, None))
    out.flush()
    call.half_close()
    assert drain(call) == [[("r", [4], "length", "")]]
