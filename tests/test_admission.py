"""The router's admission gate and a call's deadline/cancellation scope, without servers."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from splitserve.runtime.admission import AdmissionConfig, AdmissionGate, AdmissionRejected
from splitserve.runtime.deadlines import CallCancelled, CallScope, DeadlinePassed


def test_gate_refuses_past_its_limit_and_frees_a_place_when_a_call_ends():
    gate = AdmissionGate(AdmissionConfig(max_concurrent_requests=2))
    with gate.admit(), gate.admit():
        with pytest.raises(AdmissionRejected, match="limit of 2 concurrent requests"):
            with gate.admit():
                pass
        assert gate.admitted == 2 and gate.rejected == 1
    with pytest.raises(RuntimeError):  # a call that fails still gives its place back
        with gate.admit():
            raise RuntimeError("boom")
    assert gate.admitted == 0
    with gate.admit():
        assert gate.admitted == 1


def test_a_call_with_n_sequences_takes_n_places():
    gate = AdmissionGate(AdmissionConfig(max_concurrent_requests=4))
    with gate.admit(3):
        assert gate.admitted == 3
        with pytest.raises(AdmissionRejected, match="limit of 4 concurrent requests \\(2 asked by this call's n\\)"):
            with gate.admit(2):
                pass
        with gate.admit():
            assert gate.admitted == 4
    assert gate.admitted == 0


def test_gate_counts_exactly_under_concurrent_callers():
    gate = AdmissionGate(AdmissionConfig(max_concurrent_requests=5))
    inside, go, outcomes = threading.Barrier(5 + 1), threading.Event(), []

    def call():
        try:
            with gate.admit():
                outcomes.append("in")
                inside.wait(10)
                go.wait(10)
        except AdmissionRejected:
            outcomes.append("refused")

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    inside.wait(10)  # five are in
    extra = [threading.Thread(target=call) for _ in range(20)]
    for t in extra:
        t.start()
    for t in extra:
        t.join(10)
    go.set()
    for t in threads:
        t.join(10)
    assert outcomes.count("in") == 5 and outcomes.count("refused") == 20 and gate.admitted == 0


def test_config_is_validated():
    with pytest.raises(ValueError, match="max-concurrent-requests must be >= 1"):
        AdmissionConfig(max_concurrent_requests=0)


def test_scope_timeout_is_the_time_left_capped_and_raises_once_passed():
    now = [100.0]
    scope = CallScope(deadline=103.0, clock=lambda: now[0])
    assert scope.timeout(30.0) == 3.0 and scope.timeout(1.0) == 1.0 and scope.timeout(None) == 3.0
    now[0] = 103.0
    with pytest.raises(DeadlinePassed):
        scope.timeout(30.0)
    assert CallScope().timeout(30.0) == 30.0 and CallScope().timeout(None) is None


class FakeCall:
    """The part of a grpc.Future the scope uses."""

    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()
        return True

    def result(self):
        if not self.cancelled.wait(10):
            return "finished"
        raise grpc.FutureCancelledError()


def test_cancel_reaches_the_call_in_flight_and_only_while_it_is():
    scope = CallScope()
    done, call = FakeCall(), FakeCall()
    with scope.cancelling(done):
        pass
    threading.Timer(0.05, scope.cancel).start()
    with pytest.raises(CallCancelled):
        scope.result(call)  # blocked until the cancel from another thread
    assert call.cancelled.is_set() and not done.cancelled.is_set()
    with pytest.raises(CallCancelled):
        scope.check()
    late = FakeCall()
    with scope.cancelling(late):  # a call started after the cancel is cancelled at once
        assert late.cancelled.is_set()



class SlowCall(FakeCall):
    """Answers `after_s` after it was made, unless cancelled; waits as grpc.Future.result(timeout) does."""

    def __init__(self, after_s: float):
        super().__init__()
        self.done_at = time.monotonic() + after_s

    def result(self, timeout=None):
        left = self.done_at - time.monotonic()
        if self.cancelled.wait(min(left, timeout) if timeout is not None else left):
            raise grpc.FutureCancelledError()
        if time.monotonic() < self.done_at:
            raise grpc.FutureTimeoutError()
        return "finished"


def test_while_waiting_runs_until_the_call_answers_and_what_it_raises_cancels_the_call():
    ticks = []
    assert CallScope().result(SlowCall(0.35), every_s=0.05, while_waiting=lambda: ticks.append(1)) == "finished"
    assert 4 <= len(ticks) <= 8  # about one each 0.05 s of the 0.35 s wait

    def lost():
        raise RuntimeError("the reservation is gone")

    call = SlowCall(5.0)
    with pytest.raises(RuntimeError, match="reservation is gone"):
        CallScope().result(call, every_s=0.05, while_waiting=lost)
    assert call.cancelled.is_set()

@pytest.mark.parametrize("command", ["launch", "router"])
def test_a_bad_limit_flag_exits_with_a_one_line_reason(command):
    import subprocess
    import sys

    extra = ["--colocated", "127.0.0.1:1"] if command == "router" else []
    result = subprocess.run([sys.executable, "-m", "splitserve.runtime.cli", command, "--max-concurrent-requests", "0",
                             *extra], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"splitserve {command}: --max-concurrent-requests must be >= 1, got 0" in result.stderr
