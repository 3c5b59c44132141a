"""Decode/TransferKV through gRPC: fuzzed streams, and a sender that goes away mid-transfer.

A real DecodeService on the demo model, in this process, behind a real gRPC server on
loopback (a launched stack would spend its time in process start-up, not in the handler).
runtime/kv_codec.py has its own unit-level fuzz (tests/test_kv_codec.py); this one goes
through the server: whatever arrives, the answer is a client error, the worker keeps serving,
and no page stays taken. The damaged streams come from tests/kv_fuzz.py, which
tests/test_kv_socket.py sends over the KV data socket too.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

from splitserve.protos import internal_pb2
from splitserve.runtime.kv_wire import kv_chunks
from splitserve.runtime.sampling_params import SamplingParams
from decode_worker import decode_worker
from kv_fuzz import RESERVED_TOKENS, valid_frames, with_id, transfers

FUZZ_CASES = 500  # a fresh draw every run (database=None), so CI runs add up; 1000 took 20 s, near its 30-minute budget
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def decode(tmp_path_factory):
    with decode_worker(tmp_path_factory.mktemp("cache"), "fuzzed decode worker") as worker:
        yield worker.engine, worker.stub, worker.transfer


def test_fuzzed_kv_streams_get_client_errors_and_leave_no_pages(decode):
    engine, stub, transfer = decode
    total = engine.stats()["free_pages"]
    seen, counter = {}, iter(range(10**9))

    @settings(max_examples=FUZZ_CASES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(transfers())
    def case(transfer_case):
        frames, kind, _ = transfer_case
        rid = f"fuzz-{next(counter)}"
        stub.Reserve(internal_pb2.ReserveRequest(request_id=rid, num_tokens=RESERVED_TOKENS, lease_s=30), timeout=10)
        code, details = grpc.StatusCode.OK, ""
        try:
            transfer(iter(with_id(frames, rid)), timeout=10)
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        finally:
            stub.Release(internal_pb2.ReleaseRequest(request_id=rid), timeout=10)
        seen[(kind, code.name)] = seen.get((kind, code.name), 0) + 1
        assert code is grpc.StatusCode.OK or code in CLIENT_ERRORS, f"{kind}: {code} {details!r}"
        if kind == "intact":
            assert code is grpc.StatusCode.OK, details
        assert engine.stats()["free_pages"] == total

    start = time.monotonic()
    case()
    elapsed = time.monotonic() - start
    print(f"\nfuzz TransferKV: {sum(seen.values())} streams in {elapsed:.1f}s: {dict(sorted(seen.items()))}")
    assert engine.stats() == dict(free_pages=total, total_pages=total, running=0, waiting=0)
    # Still serves: the real KV of a real prompt decodes to the same tokens as the colocated path.
    runner = engine.runner
    prompt = list(range(3, 20))
    first, ks, vs, _ = runner.prefill([prompt], [SamplingParams(max_tokens=6)], [0])
    k_layers, v_layers = runner.kv_to_host(ks, vs, 0, len(prompt))
    sampling = internal_pb2.ResolvedSampling(max_tokens=6, top_p=1.0, seed=1, ignore_eos=True)
    stub.Reserve(internal_pb2.ReserveRequest(request_id="after", num_tokens=len(prompt) + 6, lease_s=30), timeout=10)
    transfer(kv_chunks("after", first[0], k_layers, v_layers), timeout=10)
    tokens = [t for msg in stub.Stream(internal_pb2.DecodeRequest(request_id="after", sampling=sampling), timeout=60)
              for t in msg.token_ids]
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig

    want = ColocatedEngine(runner.model, EngineConfig(page_size=8, num_pages=64)).generate(
        [prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    assert [first[0], *tokens] == want
    assert engine.stats()["free_pages"] == total


def _blocked_stream(frames, gate: threading.Event):
    yield from frames
    gate.wait(30)  # the sender stalls mid-transfer


def test_a_sender_that_goes_away_mid_transfer_frees_the_reservation(decode):
    engine, stub, transfer = decode
    total = engine.stats()["free_pages"]
    stub.Reserve(internal_pb2.ReserveRequest(request_id="cut", num_tokens=RESERVED_TOKENS, lease_s=30), timeout=10)
    assert engine.stats()["free_pages"] < total
    gate = threading.Event()
    frames = valid_frames("cut", 20, 0, 512)
    call = transfer.future(_blocked_stream(frames[:3], gate), timeout=30)
    time.sleep(0.3)  # header and two payloads are in
    call.cancel()
    deadline = time.monotonic() + 2
    while engine.stats()["free_pages"] != total:
        assert time.monotonic() < deadline, "pages not freed after the sender went away"
        time.sleep(0.02)
    gate.set()


def test_a_transfer_for_a_request_without_a_reservation_is_refused_at_its_header(decode):
    """The reservation is gone (its client cancelled): the worker answers NOT_FOUND on the header,
    without waiting for (or taking receive buffers for) the rest of the stream."""
    engine, stub, transfer = decode
    gate = threading.Event()
    frames = valid_frames("released", 20, 0, 512)
    stub.Reserve(internal_pb2.ReserveRequest(request_id="released", num_tokens=RESERVED_TOKENS, lease_s=30),
                 timeout=10)
    stub.Release(internal_pb2.ReleaseRequest(request_id="released"), timeout=10)
    allocated = engine.runner.staging.allocated + engine.runner.staging.reused
    call = transfer.future(_blocked_stream(frames[:1], gate), timeout=30)
    try:
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=5)  # the sender is still blocked after its header
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert engine.runner.staging.allocated + engine.runner.staging.reused == allocated
    finally:
        gate.set()


def _header_then_gate(frames, gate: threading.Event):
    yield frames[0]
    gate.wait(30)  # the rest comes once the duplicate has been answered
    yield from frames[1:]


def test_a_second_transfer_for_a_request_is_refused_and_leaves_the_first_alone(decode):
    """Two TransferKV calls for one request (a sender bug, or a retry racing a slow first try):
    the first to send its header owns the reservation. The other is refused with
    FAILED_PRECONDITION, and neither its refusal nor a later duplicate may drop the request
    (a duplicate used to win the race and the owner's failure then freed the pages)."""
    engine, stub, transfer = decode
    runner = engine.runner
    prompt = list(range(5, 26))
    first, ks, vs, _ = runner.prefill([prompt], [SamplingParams(max_tokens=6)], [0])
    k_layers, v_layers = runner.kv_to_host(ks, vs, 0, len(prompt))
    frames = list(kv_chunks("dup", first[0], k_layers, v_layers, chunk_bytes=4096))
    stub.Reserve(internal_pb2.ReserveRequest(request_id="dup", num_tokens=len(prompt) + 6, lease_s=30), timeout=10)
    reserved_free = engine.stats()["free_pages"]

    gate = threading.Event()
    owner = transfer.future(_header_then_gate(frames, gate), timeout=30)
    time.sleep(0.3)  # the owner's header is in
    with pytest.raises(grpc.RpcError) as err:
        transfer(iter(frames), timeout=10)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert engine.stats()["free_pages"] == reserved_free  # still reserved
    gate.set()
    owner.result(timeout=10)
    with pytest.raises(grpc.RpcError) as err:  # a duplicate after the KV is in
        transfer(iter(frames), timeout=10)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION, err.value.details()

    sampling = internal_pb2.ResolvedSampling(max_tokens=6, top_p=1.0, seed=1, ignore_eos=True)
    tokens = [t for msg in stub.Stream(internal_pb2.DecodeRequest(request_id="dup", sampling=sampling), timeout=60)
              for t in msg.token_ids]
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig

    want = ColocatedEngine(runner.model, EngineConfig(page_size=8, num_pages=64)).generate(
        [prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    assert [first[0], *tokens] == want
