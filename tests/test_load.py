"""Admission, deadlines and cancellation at every stage, a storm of streams, and fuzzed Generate
requests, all against launched stacks (router + worker processes) on the demo model.

How a request is held in a stage on purpose:
- waiting for decode pages: a first request holds nearly the whole (small) page pool;
- in the prefill queue / during prefill: a first request with a long prompt keeps the prefill
  worker busy for a second or more on this CPU (compiling its length bucket, which no test of
  this module has compiled in that stack before, then the prefill itself), and a second request
  queues behind it.
Each test checks that the hold really happened (worker stats) before it cancels, so a machine
fast enough to slip past the hold fails loudly instead of passing without testing anything.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack import launched
from splitserve.protos import internal_pb2, internal_pb2_grpc, serving_pb2

NUM_PAGES, PAGE_SIZE = 300, 8  # 299 usable pages = 2392 tokens per decode worker
# Long prompts of length buckets of their own (CPU buckets 2048 and 1536), one per test that needs a
# hold: a whole 2000-token prefill alone takes ~0.4 s on this CPU, the compile of a new bucket more.
LONG_PROMPTS = {"cancel": list(range(3, 2003)),  # 2000 tokens (251 pages)
                "deadline": list(range(3, 1403))}  # 1400 tokens (175 pages)
ALLOWED_FOR_BAD_INPUT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                         grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A compile cache of this module's own, not the session's: the long prompts' first prefills
    compile their length buckets, and that is part of what holds the prefill worker busy."""
    cache = tmp_path_factory.mktemp("load-cache")
    os.environ["SPLITSERVE_CACHE"] = str(cache)
    shared = os.environ.pop("SPLITSERVE_COMPILE_CACHE", None)  # then it is $SPLITSERVE_CACHE/jax-compile
    yield
    if shared is not None:
        os.environ["SPLITSERVE_COMPILE_CACHE"] = shared


@pytest.fixture(scope="module")
def disaggregated(cache_dir, tmp_path_factory):
    # Each stack a compile cache of its own, so each compiles the long prompts' buckets itself.
    with launched("demo", "--num-pages", str(NUM_PAGES), "--page-size", str(PAGE_SIZE), "--max-batch", "16",
                  env={"SPLITSERVE_CACHE": str(tmp_path_factory.mktemp("disaggregated-cache"))}) as stack:
        yield stack


@pytest.fixture(scope="module")
def colocated(cache_dir, tmp_path_factory):
    with launched("demo", "--mode", "colocated", "--num-pages", str(NUM_PAGES), "--page-size", str(PAGE_SIZE),
                  "--max-batch", "16", "--max-concurrent-requests", "3",
                  env={"SPLITSERVE_CACHE": str(tmp_path_factory.mktemp("colocated-cache"))}) as stack:
        yield stack


@pytest.fixture(params=["disaggregated", "colocated"])
def stack(request):
    return request.getfixturevalue(request.param)


# -- helpers ---------------------------------------------------------------------------------
def request_for(prompt, **sampling):
    return serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=prompt),
                                       sampling=serving_pb2.SamplingParams(**sampling))


def prefill_stats(stack):
    """Summed WorkerStats of the prefill-capable workers (prefill or colocated)."""
    total = collections.Counter()
    for w in stack.workers():
        if w.role in ("prefill", "colocated"):
            s = internal_pb2_grpc.PrefillStub(stack.worker_channel(w.address)).Stats(internal_pb2.StatsRequest(),
                                                                                     timeout=10)
            total.update(running=s.running, prefilled=s.prefilled,
                         dropped=s.dropped_cancelled + s.dropped_expired)
    return total


def free_pages(stack) -> int:
    return sum(s.free_pages for s in stack.decode_stats())


def total_pages(stack) -> int:
    return sum(s.total_pages for s in stack.decode_stats())


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        time.sleep(0.02)


def assert_idle(stack, timeout_s=10.0):
    """Every page back, nothing running or waiting anywhere."""
    try:
        wait_until(lambda: all(s.free_pages == s.total_pages and s.running == 0 and s.waiting == 0
                               for s in stack.decode_stats()) and prefill_stats(stack)["running"] == 0,
                   timeout_s, "the stack back to idle with every page free")
    except AssertionError as e:
        raise AssertionError(f"{e}; decode: {[str(s).replace(chr(10), ' ') for s in stack.decode_stats()]}; "
                             f"prefill: {dict(prefill_stats(stack))}; log: {[l for l in stack.lines if ('WARN' in l or 'ERROR' in l) and 'KV transfer of' not in l][-25:]}") from None


def first_tokens(call, n=1):
    got = []
    for msg in call:
        got += msg.token_ids
        if len(got) >= n:
            return got
    raise AssertionError("stream ended early")


# -- admission --------------------------------------------------------------------------------
def test_past_the_admission_limit_the_router_refuses_at_once(colocated):
    """--max-concurrent-requests 3: a fourth call is refused at once, naming the limit; once a
    call ends its place is free again."""
    calls = [colocated.serving.Generate(request_for([5, 6, 7, 8], max_tokens=300, ignore_eos=True), timeout=60)
             for _ in range(3)]
    try:
        for call in calls:
            first_tokens(call)  # admitted and streaming
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            colocated.generate([1, 2, 3], max_tokens=2)
        assert time.monotonic() - start < 1.0, "refused only after a wait"
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 3 concurrent requests" in err.value.details()
        assert "--max-concurrent-requests" in err.value.details()
        calls.pop().cancel()

        def admitted_again():
            try:
                return colocated.generate([1, 2, 3], max_tokens=2)[2] == "length"
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                return False

        wait_until(admitted_again, 5.0, "a place free again after a cancel")
    finally:
        for call in calls:
            call.cancel()
    assert_idle(colocated)


# -- cancellation and deadlines at every stage -------------------------------------------------
@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_request_waiting_for_decode_pages_stops_waiting(stack, how):
    """The holder takes 126 of 299 pages; the waiting request needs 251, and is cancelled (or its
    deadline passes): it must never reserve or prefill, even once the pool frees up. The holder
    decodes 1000 tokens, so it cannot finish (and free its pages) before the test cancels it."""
    assert_idle(stack)
    holder = stack.serving.Generate(request_for([5, 6, 7, 8], max_tokens=1000, ignore_eos=True), timeout=120)
    try:
        first_tokens(holder)
        wait_until(lambda: free_pages(stack) < 251, 10, "the holder's pages reserved")
        before = prefill_stats(stack)
        timeout = 0.6 if how == "deadline" else 60
        waiting = stack.serving.Generate(request_for([9, 10, 11], max_tokens=2000), timeout=timeout)
        time.sleep(0.3)  # it reaches the router and waits for pages
        if how == "cancel":
            waiting.cancel()
        else:
            with pytest.raises(grpc.RpcError) as err:
                list(waiting)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.2)  # the router's copy of the deadline starts when the call reaches it
    finally:
        holder.cancel()
    wait_until(lambda: free_pages(stack) == total_pages(stack), 3, "the holder's pages freed")
    time.sleep(0.5)  # a request still waiting in the router would reserve and prefill now
    assert free_pages(stack) == total_pages(stack)
    assert prefill_stats(stack)["prefilled"] == before["prefilled"], "the abandoned request was prefilled"
    assert_idle(stack)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_requests_in_the_prefill_queue_and_in_prefill_free_their_pages_at_once(stack, how):
    """A is in a long prefill, B queued behind it. Cancelling both (or B's deadline passing)
    frees their decode pages while A's prefill is still running; B never reaches the device."""
    assert_idle(stack)
    before = prefill_stats(stack)
    a = stack.serving.Generate(request_for(LONG_PROMPTS[how], max_tokens=8), timeout=120)
    wait_until(lambda: prefill_stats(stack)["running"] == 1, 10, "A in the prefill worker")
    b = stack.serving.Generate(request_for([9, 10, 11], max_tokens=8), timeout=0.5 if how == "deadline" else 60)
    try:
        wait_until(lambda: prefill_stats(stack)["running"] == 2, 2, "B queued behind A")
        assert free_pages(stack) < total_pages(stack)  # both hold decode pages
        if how == "cancel":
            b.cancel()
        else:
            with pytest.raises(grpc.RpcError) as err:
                list(b)
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        a.cancel()
        wait_until(lambda: free_pages(stack) == total_pages(stack), 0.5, "pages freed while A still prefills")
        assert prefill_stats(stack)["running"] >= 1, "A's prefill ended before the check: the hold did not work"
    finally:
        a.cancel()
        b.cancel()
    assert_idle(stack, timeout_s=60)  # A's prefill finishes; its KV finds no reservation and is refused
    after = prefill_stats(stack)
    assert after["prefilled"] - before["prefilled"] == 1, "B was prefilled after it was abandoned"
    assert after["dropped"] - before["dropped"] == 1
    assert free_pages(stack) == total_pages(stack)


def test_cancel_mid_decode_frees_pages(stack):
    assert_idle(stack)
    call = stack.serving.Generate(request_for(list(range(3, 15)), max_tokens=40, ignore_eos=True), timeout=60)
    first_tokens(call, 5)
    assert free_pages(stack) < total_pages(stack)
    call.cancel()
    wait_until(lambda: free_pages(stack) == total_pages(stack), 2, "pages freed after a cancel mid-decode")
    assert_idle(stack)


# -- the storm ---------------------------------------------------------------------------------
STORM_STREAMS = 300
STORM_BOUND_S = 30.0  # no call may take longer


async def _storm(address: str, seed: int):
    """STORM_STREAMS concurrent Generate calls: a third run to the end, a third are cancelled
    (after a random delay or a random number of tokens), a third have a short deadline.
    Prompts of at most 16 tokens and contexts of at most 64 keep to the shapes warm-up compiled."""
    from splitserve.protos import serving_pb2_grpc

    rng = np.random.default_rng(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)

        async def one(i: int):
            prompt = rng.integers(3, 2048, size=int(rng.integers(1, 17))).tolist()
            req = request_for(prompt, max_tokens=int(rng.integers(1, 48)), ignore_eos=bool(rng.integers(2)))
            kind = ("complete", "cancel", "deadline")[i % 3]
            timeout = float(rng.uniform(0.02, 1.0)) if kind == "deadline" else STORM_BOUND_S
            call = stub.Generate(req, timeout=timeout)
            cancel_after = int(rng.integers(0, 6)) if kind == "cancel" and rng.integers(2) else None
            if kind == "cancel" and cancel_after is None:
                asyncio.get_running_loop().call_later(float(rng.uniform(0, 0.5)), call.cancel)
            tokens = []
            try:
                async for msg in call:
                    tokens += msg.token_ids
                    if cancel_after is not None and len(tokens) >= cancel_after:
                        call.cancel()
                        return kind, "CANCELLED"
                    if msg.finish_reason:
                        assert len(tokens) <= req.sampling.max_tokens
                return kind, "OK"
            except asyncio.CancelledError:
                return kind, "CANCELLED"
            except grpc.aio.AioRpcError as e:
                return kind, e.code().name

        start = time.monotonic()
        results = await asyncio.gather(*(asyncio.wait_for(one(i), STORM_BOUND_S + 5) for i in range(STORM_STREAMS)),
                                       return_exceptions=True)
        return results, time.monotonic() - start


def test_storm_of_streams_with_cancels_and_deadlines_leaks_nothing(disaggregated):
    stack = disaggregated
    assert_idle(stack)
    probe = list(range(20, 32))
    want = stack.generate(probe, max_tokens=12, ignore_eos=True)[0]
    results, elapsed = asyncio.run(_storm(stack.address, seed=7))
    hung = [r for r in results if isinstance(r, BaseException)]
    assert not hung, f"{len(hung)} calls did not end within {STORM_BOUND_S + 5}s: {hung[:3]}"
    outcomes = collections.Counter(results)
    print(f"\nstorm: {STORM_STREAMS} streams in {elapsed:.1f}s: {dict(sorted(outcomes.items()))}")
    assert {code for _, code in results} <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, outcomes
    assert all(code == "OK" for kind, code in results if kind == "complete"), outcomes
    start = time.monotonic()
    assert_idle(stack)
    stats = stack.decode_stats()
    print(f"storm: idle again {time.monotonic() - start:.2f}s after the last call; free pages "
          f"{sum(s.free_pages for s in stats)}/{sum(s.total_pages for s in stats)}; prefill {dict(prefill_stats(stack))}")
    assert stack.generate(probe, max_tokens=12, ignore_eos=True)[0] == want  # still serves, same tokens


# -- fuzzed Generate requests ---------------------------------------------------------------------
FUZZ_CASES = 600  # a fresh draw every run (database=None); 1500 took 46 s of CI, near its 30-minute budget

floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -0.0, 1.0, 1e-45, -1.0, 3.4e38]))
sampling_fields = st.fixed_dictionaries({}, optional={
    "max_tokens": st.one_of(st.integers(0, 40), st.integers(2049, 2**32 - 1)),  # or past the context
    "temperature": floats, "top_p": floats,
    "top_k": st.integers(-2**31, 2**31 - 1) | st.integers(-2, 100),
    "seed": st.integers(0, 2**64 - 1) | st.integers(0, 2**32 + 1),
    "stop": st.lists(st.text(max_size=300), max_size=20),
    "stop_token_ids": st.lists(st.integers(-2**31, 2**31 - 1), max_size=8),
    "ignore_eos": st.booleans(),
})
token_ids = st.one_of(st.lists(st.integers(-2**31, 2**31 - 1) | st.integers(0, 2100), max_size=24),
                      st.integers(2049, 3000).map(lambda n: [7] * n))  # past the context: no 2048 prefill
prompts = st.one_of(st.none(), st.builds(lambda t: ("text", t), st.text(max_size=40)),
                    st.builds(lambda ids: ("token_ids", ids), token_ids))


def _fuzz_request(prompt, sampling, request_id):
    request = serving_pb2.GenerateRequest(request_id=request_id)
    for name, value in sampling.items():
        if value is not None:
            if isinstance(value, list):
                getattr(request.sampling, name).extend(value)
            else:
                setattr(request.sampling, name, value)
    if prompt is not None:
        kind, value = prompt
        if kind == "text":
            request.text = value
        else:
            request.token_ids.ids.extend(value)
    return request


def test_fuzzed_generate_requests_never_break_the_router(disaggregated):
    """Random prompts and sampling fields (negative, huge, NaN, inf, empty and long stop strings,
    odd request ids): every answer is OK, a client error, or DEADLINE_EXCEEDED (a valid request
    that runs past the 10 s each case gets), never INTERNAL/UNKNOWN/UNAVAILABLE; afterwards the
    stack serves a valid request and holds no pages."""
    stack = disaggregated
    seen = collections.Counter()
    allowed = ALLOWED_FOR_BAD_INPUT | {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}

    @settings(max_examples=FUZZ_CASES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(prompt=prompts, sampling=sampling_fields, request_id=st.text(max_size=64) | st.just("x" * 5000))
    def case(prompt, sampling, request_id):
        request = _fuzz_request(prompt, sampling, request_id)
        code, details = grpc.StatusCode.OK, ""
        try:
            for msg in stack.serving.Generate(request, timeout=10):
                assert msg.request_id == request.request_id
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        seen[code.name] += 1
        assert code in allowed, f"{code} {details!r} for {request}"
        if code in ALLOWED_FOR_BAD_INPUT:
            assert details and "worker failed" not in details, f"no reason given: {code} {details!r}"

    start = time.monotonic()
    case()
    elapsed = time.monotonic() - start
    print(f"\nfuzz Generate: {sum(seen.values())} cases in {elapsed:.1f}s: {dict(seen)}")
    assert seen["OK"] > 0 and seen["INVALID_ARGUMENT"] > 0  # both sides of the validation were reached
    assert_idle(stack)
    assert stack.generate([1, 2, 3], max_tokens=4, ignore_eos=True)[2] == "length"


RAW_CASES = 500


@st.composite
def raw_generate_messages(draw):
    """Random bytes, or a valid GenerateRequest's bytes with a few bytes flipped, cut or inserted."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    valid = draw(st.sampled_from([request_for([5, 6, 7], max_tokens=3).SerializeToString(),
                                  serving_pb2.GenerateRequest(text="Hello there", request_id="r",
                                                              sampling=serving_pb2.SamplingParams(
                                                                  max_tokens=2, stop=["x"])).SerializeToString()]))
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and i < len(data):
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[i:]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


def test_malformed_generate_messages_are_invalid_argument(disaggregated):
    """Bytes that are not a valid GenerateRequest (a client in another language can send them,
    e.g. invalid UTF-8 in `text`) are the client's mistake: INVALID_ARGUMENT, not gRPC's INTERNAL."""
    stack = disaggregated
    raw = stack.channel.unary_stream("/splitserve.v1.Serving/Generate", request_serializer=None,
                                     response_deserializer=serving_pb2.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(raw(b"\x0a\x03\xff\xfe\xfd", timeout=10))  # field 1 (text), 3 bytes of invalid UTF-8
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid splitserve.v1.GenerateRequest" in err.value.details()
    seen = collections.Counter()
    allowed = ALLOWED_FOR_BAD_INPUT | {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}

    @settings(max_examples=RAW_CASES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(raw_generate_messages())
    def case(data):
        code, details = grpc.StatusCode.OK, ""
        try:
            list(raw(data, timeout=10))
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        seen[code.name] += 1
        assert code in allowed, f"{code} {details!r} for {data!r}"

    start = time.monotonic()
    case()
    print(f"\nfuzz Generate bytes: {sum(seen.values())} cases in {time.monotonic() - start:.1f}s: {dict(seen)}")
    assert_idle(stack)
    assert stack.generate([1, 2, 3], max_tokens=4, ignore_eos=True)[2] == "length"
