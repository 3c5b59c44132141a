"""KV wire format: round trips, every way a transfer can go wrong, fuzzed payloads, head layouts."""

from __future__ import annotations

import dataclasses
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.models.head_layout import head_layout_for
from splitserve.protos import internal_pb2
from splitserve.runtime import kv_wire
from splitserve.runtime.kv_wire import (
    KVAssembler,
    KVLayoutExpectation,
    KVTransferError,
    expand_to_serving_heads,
    kv_chunks,
    receive_kv,
    select_original_heads,
)


def random_kv(num_layers, num_tokens, num_kv_heads, head_dim, dtype, seed=0):
    """Per-layer K and V [num_tokens, num_kv_heads, head_dim]: random, no zeros, no two layers alike."""
    rng = np.random.default_rng(seed)

    def one():
        shape = (num_tokens, num_kv_heads, head_dim)
        return (rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)).astype(dtype)

    return [one() for _ in range(num_layers)], [one() for _ in range(num_layers)]


def expectation_for(k_layers, max_tokens=4096, dtypes=("float32", "bfloat16")):
    num_tokens, num_kv_heads, head_dim = k_layers[0].shape
    return KVLayoutExpectation(len(k_layers), num_kv_heads, head_dim, dtypes, max_tokens)


def messages(frames):
    """Encoded KVChunk frames parsed by protobuf itself: checks the codec's wire compatibility too."""
    return [internal_pb2.KVChunk.FromString(f) for f in frames]


def encoded(chunks):
    return [c.SerializeToString() for c in chunks]


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---- round trips --------------------------------------------------------------------------------

SHAPES = [  # (num_layers, num_tokens, num_kv_heads, head_dim)
    (2, 17, 4, 8),
    (1, 1, 3, 40),
    (3, 301, 3, 40),
]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunk", ["1MiB", "1000B", "row", "row-1", "head-1"])
def test_round_trip(dtype, shape, chunk):
    num_layers, num_tokens, num_kv_heads, head_dim = shape
    k, v = random_kv(*shape, dtype, seed=sum(shape))
    head_bytes = head_dim * np.dtype(dtype).itemsize
    row_bytes = num_kv_heads * head_bytes
    chunk_bytes = {"1MiB": 1 << 20, "1000B": 1000, "row": row_bytes, "row-1": row_bytes - 1,
                   "head-1": head_bytes - 1}[chunk]
    frames = list(kv_chunks("req-1", 42, k, v, chunk_bytes=chunk_bytes))
    chunks = messages(frames)

    assert chunks[0].WhichOneof("kind") == "header" and chunks[-1].WhichOneof("kind") == "trailer"
    payloads = [c.payload for c in chunks[1:-1]]
    assert all(c.WhichOneof("kind") == "payload" for c in chunks[1:-1])
    if chunk_bytes >= head_bytes:
        assert all(len(p.data) <= chunk_bytes for p in payloads)
    if chunk_bytes < row_bytes:  # split by KV-head range, one token each
        assert all(p.token_count == 1 for p in payloads)
        assert any(p.kv_head_count < num_kv_heads for p in payloads)
    assert [(p.layer, p.is_value) for p in payloads] == sorted((p.layer, p.is_value) for p in payloads)

    got = receive_kv(iter(frames), expected=expectation_for(k))
    assert (got.request_id, got.first_token, got.num_tokens) == ("req-1", 42, num_tokens)
    assert chunks[0].header.dtype == np.dtype(dtype).name
    k2, v2 = got.k_layers, got.v_layers
    assert len(k2) == len(v2) == num_layers
    for a, b in zip(k + v, k2 + v2):
        assert same_bits(a, b)


def test_round_trip_non_contiguous_input():
    k, v = random_kv(2, 9, 6, 8, np.float32)
    k = [x[:, ::2] for x in k]  # every other head: a strided view
    v = [x[:, 1::2] for x in v]
    got = receive_kv(kv_chunks("r", 0, k, v, chunk_bytes=50), expected=expectation_for(k))
    assert all(same_bits(np.ascontiguousarray(a), b) for a, b in zip(k + v, got.k_layers + got.v_layers))


def test_bad_inputs_fail_at_call_time_or_when_reached():
    k, v = random_kv(2, 5, 2, 4, np.float32)
    with pytest.raises(ValueError, match="V layer 0"):
        kv_chunks("r", 0, k, [v[0][:4], v[1]])
    frames = kv_chunks("r", 0, k, [v[0], v[1][:4]])  # a later layer is checked when its turn comes
    with pytest.raises(ValueError, match="V layer 1"):
        list(frames)
    with pytest.raises(ValueError, match="same number"):
        kv_chunks("r", 0, k, v[:1])
    with pytest.raises(ValueError, match="byte order"):
        kv_chunks("r", 0, [x.astype(">f4") for x in k], [x.astype(">f4") for x in v])
    with pytest.raises(ValueError, match="chunk_bytes"):
        kv_chunks("r", 0, k, v, chunk_bytes=0)


# ---- broken transfers ---------------------------------------------------------------------------


@pytest.fixture
def stream():
    k, v = random_kv(2, 13, 3, 8, np.float32, seed=7)
    return k, v, messages(kv_chunks("req-x", 5, k, v, chunk_bytes=200)), expectation_for(k)


def test_corrupted_byte_fails_checksum(stream):
    _, _, chunks, expected = stream
    data = bytearray(chunks[3].payload.data)
    data[len(data) // 2] ^= 0x10
    chunks[3].payload.data = bytes(data)
    with pytest.raises(KVTransferError, match="checksum mismatch"):
        receive_kv(encoded(chunks), expected=expected)


def test_dropped_chunk(stream):
    _, _, chunks, expected = stream
    del chunks[4]
    with pytest.raises(KVTransferError, match="incomplete.*never arrived"):
        receive_kv(encoded(chunks), expected=expected)


def test_duplicated_chunk(stream):
    _, _, chunks, expected = stream
    chunks.insert(5, chunks[2])
    with pytest.raises(KVTransferError, match="already received"):
        receive_kv(encoded(chunks), expected=expected)


def test_overlapping_range(stream):
    _, _, chunks, expected = stream
    asm = KVAssembler.from_header(chunks[0].header, expected=expected)
    asm.add(chunks[1].payload)  # layer 0 K, tokens [0, 2)
    p = internal_pb2.KVPayload()
    p.CopyFrom(chunks[1].payload)
    p.token_start = 1
    with pytest.raises(KVTransferError, match="token 1 KV head 0 was already received"):
        asm.add(p)


def test_wrong_trailer_total(stream):
    _, _, chunks, expected = stream
    chunks[-1].trailer.total_bytes += 4
    with pytest.raises(KVTransferError, match="trailer says"):
        receive_kv(encoded(chunks), expected=expected)


def test_truncated_stream_returns_nothing(stream):
    _, _, chunks, expected = stream
    with pytest.raises(KVTransferError, match="without a trailer"):
        receive_kv(encoded(chunks[:-1]), expected=expected)
    with pytest.raises(KVTransferError, match="must start with a header"):
        receive_kv(encoded(chunks[1:]), expected=expected)
    with pytest.raises(KVTransferError, match="must start with a header"):
        receive_kv(iter([]), expected=expected)


def test_chunks_after_trailer_or_second_header(stream):
    _, _, chunks, expected = stream
    with pytest.raises(KVTransferError, match="after the trailer"):
        receive_kv(encoded(chunks + [chunks[1]]), expected=expected)
    with pytest.raises(KVTransferError, match="unexpected 'header'"):
        receive_kv(encoded(chunks[:3] + [chunks[0]] + chunks[3:]), expected=expected)


def test_failed_assembler_stays_failed(stream):
    _, _, chunks, expected = stream
    asm = KVAssembler.from_header(chunks[0].header, expected=expected)
    bad = internal_pb2.KVPayload()
    bad.CopyFrom(chunks[1].payload)
    bad.data = bad.data[:-1]
    with pytest.raises(KVTransferError, match="data bytes"):
        asm.add(bad)
    with pytest.raises(KVTransferError, match="failed"):
        asm.add(chunks[1].payload)  # a good payload no longer helps
    with pytest.raises(KVTransferError, match="failed"):
        asm.finish(chunks[-1].trailer)


def test_finished_assembler_rejects_more(stream):
    _, _, chunks, expected = stream
    asm = KVAssembler.from_header(chunks[0].header, expected=expected)
    for c in chunks[1:-1]:
        asm.add(c.payload)
    asm.finish(chunks[-1].trailer)
    with pytest.raises(KVTransferError, match="finished"):
        asm.finish(chunks[-1].trailer)


@pytest.mark.parametrize("field,value,match", [
    ("num_layers", 3, "num_layers=3, this model has 2"),
    ("num_kv_heads", 6, "num_kv_heads=6, this model has 3"),
    ("head_dim", 16, "head_dim=16, this model has 8"),
    ("num_tokens", 0, r"num_tokens=0, must be in \[1, 4096\]"),
    ("num_tokens", 4097, "num_tokens=4097"),
    ("dtype", "float16", "'float16' not accepted"),
    ("dtype", "nonsense", "'nonsense' not accepted"),
    ("request_id", "", "empty request_id"),
])
def test_bad_header(stream, field, value, match):
    _, _, chunks, expected = stream
    header = internal_pb2.KVHeader()
    header.CopyFrom(chunks[0].header)
    setattr(header, field, value)
    with pytest.raises(KVTransferError, match=match):
        KVAssembler.from_header(header, expected=expected)


@pytest.mark.parametrize("token,ok", [(0, True), (99, True), (-1, False), (100, False)])
def test_first_token_in_trailer_must_be_in_the_vocabulary(stream, token, ok):
    k, _, chunks, _ = stream
    expected = dataclasses.replace(expectation_for(k), vocab_size=100)
    chunks[-1].trailer.first_token = token
    if ok:
        assert receive_kv(encoded(chunks), expected=expected).first_token == token
    else:
        with pytest.raises(KVTransferError, match=f"first_token={token} is outside the vocabulary"):
            receive_kv(encoded(chunks), expected=expected)


def test_lazy_layers_are_read_in_order_and_first_token_last():
    k, v = random_kv(3, 4, 2, 8, np.float32)
    reads = []

    class Lazy(list):
        def __getitem__(self, i):
            reads.append(i)
            return super().__getitem__(i)

    frames = kv_chunks("r", lambda: reads.append("token") or 7, Lazy(k), v, chunk_bytes=1 << 20)
    assert reads == [0]  # only layer 0 (shape and dtype for the header) before the first frame
    got = receive_kv(frames, expected=expectation_for(k))
    assert reads == [0, 0, 1, 2, "token"] and got.first_token == 7


def test_header_over_max_bytes(stream):
    _, _, chunks, expected = stream
    total = 2 * 2 * 13 * 3 * 8 * 4
    KVAssembler.from_header(chunks[0].header, expected=expected, max_bytes=total)
    with pytest.raises(KVTransferError, match=f"KV of {total} bytes exceeds the limit of {total - 1}"):
        KVAssembler.from_header(chunks[0].header, expected=expected, max_bytes=total - 1)


@pytest.mark.parametrize("change,match", [
    (lambda p: setattr(p, "data", p.data + b"\x01\x02\x03\x04"), "data bytes, expected"),
    (lambda p: setattr(p, "data", p.data[:-4]), "data bytes, expected"),
    (lambda p: setattr(p, "layer", 2), r"layer out of range \[0, 2\)"),
    (lambda p: setattr(p, "token_start", 12), r"tokens \[12, 14\) exceed num_tokens 13"),
    (lambda p: setattr(p, "kv_head_start", 1), r"KV heads \[1, 4\) exceed num_kv_heads 3"),
    (lambda p: setattr(p, "token_count", 0), "empty range"),
    (lambda p: setattr(p, "token_start", 2**32 - 1), "exceed num_tokens"),
])
def test_bad_payload(stream, change, match):
    _, _, chunks, expected = stream
    asm = KVAssembler.from_header(chunks[0].header, expected=expected)
    p = internal_pb2.KVPayload()
    p.CopyFrom(chunks[1].payload)
    change(p)
    with pytest.raises(KVTransferError, match=match):
        asm.add(p)


def test_expectation_validates_itself():
    with pytest.raises(ValueError, match="head_dim"):
        KVLayoutExpectation(2, 2, 0, ("float32",), 10)
    with pytest.raises(ValueError, match="at least one"):
        KVLayoutExpectation(2, 2, 8, (), 10)
    with pytest.raises(ValueError, match="unknown dtype"):
        KVLayoutExpectation(2, 2, 8, ("f32x",), 10)


# ---- fuzzing ------------------------------------------------------------------------------------

FUZZ_SHAPE = (2, 5, 3, 4)  # layers, tokens, kv heads, head_dim (float32)


FIELDS = ("layer", "kv_head_start", "kv_head_count", "token_start", "token_count", "data")


@st.composite
def payloads(draw):
    """A valid payload for FUZZ_SHAPE, then perhaps one field replaced by anything."""
    layers, tokens, heads, head_dim = FUZZ_SHAPE
    t0 = draw(st.integers(0, tokens - 1))
    h0 = draw(st.integers(0, heads - 1))
    p = internal_pb2.KVPayload(layer=draw(st.integers(0, layers - 1)), is_value=draw(st.booleans()),
                               token_start=t0, token_count=draw(st.integers(1, tokens - t0)),
                               kv_head_start=h0, kv_head_count=draw(st.integers(1, heads - h0)))
    p.data = draw(st.binary(min_size=p.token_count * p.kv_head_count * head_dim * 4,
                            max_size=p.token_count * p.kv_head_count * head_dim * 4))
    field = draw(st.sampled_from((None,) * 4 + FIELDS))
    if field == "data":
        p.data = draw(st.binary(max_size=400))
    elif field is not None:
        setattr(p, field, draw(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))))
    return p


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(payloads(), max_size=8), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_fuzzed_payloads_only_raise_kv_transfer_error(ps, total, crc):
    k, _ = random_kv(*FUZZ_SHAPE, np.float32)
    expected = expectation_for(k, max_tokens=8)
    header = internal_pb2.KVHeader(request_id="fuzz", num_layers=2, num_kv_heads=3, head_dim=4,
                                   num_tokens=5, dtype="float32")
    asm = KVAssembler.from_header(header, expected=expected)
    for p in ps:
        try:
            asm.add(p)
        except KVTransferError:
            asm = KVAssembler.from_header(header, expected=expected)  # a failed one rejects everything
    with pytest.raises(KVTransferError):  # a random trailer is wrong (or the KV incomplete)
        asm.finish(internal_pb2.KVTrailer(total_bytes=total, crc32=crc))


# ---- memory -------------------------------------------------------------------------------------


def test_chunks_are_produced_lazily(monkeypatch):
    # 4 layers x (K, V) x [1024 tokens, 8 heads, 256] float32 = 64 MiB.
    rng = np.random.default_rng(0)
    k = [rng.standard_normal((1024, 8, 256), np.float32) for _ in range(4)]
    v = [rng.standard_normal((1024, 8, 256), np.float32) for _ in range(4)]
    produced = []
    real = kv_wire._block_bytes
    monkeypatch.setattr(kv_wire, "_block_bytes", lambda *a: produced.append(len(out := real(*a))) or out)
    chunk_bytes = 1 << 20

    gen = kv_chunks("big", 0, k, v, chunk_bytes=chunk_bytes)
    assert produced == []
    next(gen)  # header
    assert produced == []
    first = internal_pb2.KVChunk.FromString(next(gen))
    assert len(first.payload.data) == chunk_bytes and produced == [chunk_bytes]

    tracemalloc.start()
    try:
        count = 1
        for _ in gen:
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 64 + 1 and sum(produced) == 64 << 20
    assert peak < 4 * chunk_bytes, f"peak {peak} bytes while streaming 64 MiB in 1 MiB chunks"


# ---- head layouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads,num_kv_heads,tp", [(6, 3, 4), (8, 2, 4), (8, 8, 2), (4, 1, 4)])
def test_head_replicas_round_trip(num_heads, num_kv_heads, tp):
    layout = head_layout_for(num_heads, num_kv_heads, tp)
    rng = np.random.default_rng(1)
    original = rng.standard_normal((5, num_kv_heads, 8)).astype(np.float32)  # [tokens, kv heads, hd]
    serving = expand_to_serving_heads(original, layout.kv_source)
    assert serving.shape == (5, layout.num_kv_heads, 8)
    assert layout.num_kv_heads % tp == 0
    for s, o in enumerate(layout.kv_source):
        np.testing.assert_array_equal(serving[:, s], original[:, o])
    np.testing.assert_array_equal(select_original_heads(serving, layout.kv_source), original)

    # Sending picks the FIRST replica of each head: mark the others and check none leak through.
    marked = serving.copy()
    firsts = [list(layout.kv_source).index(h) for h in range(num_kv_heads)]
    others = [s for s in range(layout.num_kv_heads) if s not in firsts]
    marked[:, others] = np.nan
    np.testing.assert_array_equal(select_original_heads(marked, layout.kv_source), original)


def test_head_layout_expected_replication():
    assert head_layout_for(6, 3, 4).kv_source == (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2)
    assert head_layout_for(8, 2, 4).kv_source == (0, 0, 1, 1)


def test_head_helpers_validate():
    with pytest.raises(ValueError, match="serving KV heads"):
        select_original_heads(np.zeros((2, 3, 4)), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="original KV heads"):
        expand_to_serving_heads(np.zeros((2, 3, 4)), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="every head"):
        select_original_heads(np.zeros((2, 3, 4)), (0, 2, 2))


# ---- receive buffers ----------------------------------------------------------------------------


def test_assembler_fills_padded_buffers_from_the_pool():
    from splitserve.runtime.host_staging import StagingPool

    k, v = random_kv(2, 13, 3, 8, np.float32, seed=3)
    pool = StagingPool(max_free_bytes=1 << 20)
    frames = list(kv_chunks("r", 1, k, v, chunk_bytes=100))
    for attempt in range(2):
        got = receive_kv(frames, expected=expectation_for(k), allocate=pool.take, pad_tokens=lambda n: 16)
        k2, v2 = got.k_layers, got.v_layers
        assert all(same_bits(a, b) for a, b in zip(k + v, k2 + v2))
        assert all(x.base is not None and x.base.shape == (16, 3, 8) for x in k2 + v2)
        pool.give_back([x.base for x in k2 + v2])
    assert (pool.allocated, pool.reused) == (4, 4)  # the second transfer reused all four buffers
    with pytest.raises(ValueError, match="smaller than the token count"):
        receive_kv(frames, expected=expectation_for(k), pad_tokens=lambda n: n - 1)


def test_staging_pool_is_bounded():
    from splitserve.runtime.host_staging import StagingPool

    pool = StagingPool(max_free_bytes=3 * 4096)
    arrays = [pool.take((1024,), np.float32) for _ in range(5)]
    pool.give_back(arrays)
    assert pool.free_bytes == 3 * 4096  # two were dropped, not kept
    assert pool.take((1024,), np.float32) is arrays[2] and pool.take((512,), np.float32).shape == (512,)
