"""The hand-written KVChunk codec against protobuf's own encoder and parser, and on hostile bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.protos import internal_pb2
from splitserve.runtime.kv_codec import KVTransferError, decode_chunk, encode_payload

UINT32 = st.integers(0, 2**32 - 1)
PAYLOAD_FIELDS = ("layer", "is_value", "kv_head_start", "kv_head_count", "token_start", "token_count", "data")


@settings(max_examples=300, deadline=None, database=None)
@given(layer=UINT32, is_value=st.booleans(), h0=UINT32, hc=UINT32, t0=UINT32, tc=UINT32,
       data=st.binary(max_size=3000))
def test_encoded_payload_is_what_protobuf_parses(layer, is_value, h0, hc, t0, tc, data):
    frame = encode_payload(layer=layer, is_value=is_value, kv_head_start=h0, kv_head_count=hc,
                           token_start=t0, token_count=tc, data=memoryview(data))
    want = internal_pb2.KVPayload(layer=layer, is_value=is_value, kv_head_start=h0, kv_head_count=hc,
                                  token_start=t0, token_count=tc, data=data)
    parsed = internal_pb2.KVChunk.FromString(frame)
    assert parsed.WhichOneof("kind") == "payload" and parsed.payload == want
    # protobuf writes the same bytes (fields in number order, zeros omitted)
    assert frame == internal_pb2.KVChunk(payload=want).SerializeToString()


@settings(max_examples=300, deadline=None, database=None)
@given(layer=UINT32, is_value=st.booleans(), h0=UINT32, hc=UINT32, t0=UINT32, tc=UINT32,
       data=st.binary(max_size=3000))
def test_decode_reads_what_protobuf_writes(layer, is_value, h0, hc, t0, tc, data):
    message = internal_pb2.KVChunk(payload=internal_pb2.KVPayload(
        layer=layer, is_value=is_value, kv_head_start=h0, kv_head_count=hc, token_start=t0, token_count=tc,
        data=data))
    chunk = decode_chunk(message.SerializeToString())
    assert chunk.kind == "payload"
    got = {name: getattr(chunk.payload, name) for name in PAYLOAD_FIELDS}
    assert got == {name: getattr(message.payload, name) for name in PAYLOAD_FIELDS}
    assert isinstance(chunk.payload.data, memoryview)  # no copy of the KV bytes


def test_payload_data_is_a_view_of_the_frame():
    block = np.arange(1024, dtype=np.float32).reshape(16, 2, 32)
    frame = encode_payload(layer=1, is_value=True, kv_head_start=0, kv_head_count=2, token_start=3,
                           token_count=16, data=memoryview(block.view(np.uint8).reshape(-1)))
    chunk = decode_chunk(frame)
    assert chunk.payload.data.obj is frame
    assert np.array_equal(np.frombuffer(chunk.payload.data, np.float32).reshape(16, 2, 32), block)


def test_header_and_trailer_and_unknown_fields():
    header = internal_pb2.KVHeader(request_id="r", num_layers=2, num_kv_heads=3, head_dim=4, num_tokens=5,
                                   dtype="bfloat16")
    chunk = decode_chunk(internal_pb2.KVChunk(header=header).SerializeToString())
    assert chunk.kind == "header" and chunk.header == header
    trailer = internal_pb2.KVTrailer(total_bytes=2**40 + 3, crc32=0xDEADBEEF, first_token=9)
    assert decode_chunk(internal_pb2.KVChunk(trailer=trailer).SerializeToString()).trailer == trailer
    # A field this version does not know (number 9, varint and bytes) is skipped, as protobuf does.
    frame = b"\x48\x05" + internal_pb2.KVChunk(trailer=trailer).SerializeToString() + b"\x4a\x02ab"
    assert decode_chunk(frame).trailer == trailer
    assert internal_pb2.KVChunk.FromString(frame).trailer == trailer


@pytest.mark.parametrize("frame,match", [
    (b"", "empty"),
    (b"\x48\x05", "empty"),  # only an unknown field
    (b"\x12", "truncated varint"),
    (b"\x12\x05\x08", "claims 5 bytes"),
    (b"\x12\x00\x1a\x00", "both 'payload' and 'trailer'"),
    (b"\x10\x01", "wire type 0, expected a message"),  # payload as a varint
    (b"\x12\x02\x3a\x05", "claims 5 bytes"),  # data longer than the payload
    (b"\x12\x02\x08\x80", "truncated varint"),
    (b"\x12\x02\x3d\x00", "truncated"),  # a fixed32 with no bytes
    (b"\x12\x01\x0b", "unsupported wire type 3"),  # a group
    (b"\x12\x02\x0a\x00", "'layer' has wire type 2"),
    (b"\x12\x02\x38\x01", "data has wire type 0"),
    (b"\x12\x0b" + b"\x08" + b"\xff" * 10, "varint longer than 10 bytes"),
    (b"\x00\x00", "field number 0"),
    (b"\x0a\x02\xff\xff", "header is not a valid protobuf message"),
])
def test_malformed_frames_raise_kv_transfer_error(frame, match):
    with pytest.raises(KVTransferError, match=match):
        decode_chunk(frame)


@settings(max_examples=2000, deadline=None, database=None)
@given(st.one_of(
    st.binary(max_size=64),
    # mutate a valid frame: a random byte changed, or cut short
    st.tuples(st.integers(0, 40), st.integers(0, 255), st.booleans()).map(lambda t: _mutated(*t)),
))
def test_random_bytes_only_ever_raise_kv_transfer_error(frame):
    try:
        chunk = decode_chunk(frame)
    except KVTransferError:
        return
    assert chunk.kind in ("header", "payload", "trailer")


_VALID = encode_payload(layer=3, is_value=True, kv_head_start=1, kv_head_count=2, token_start=300,
                        token_count=7, data=b"0123456789abcdef")


def _mutated(position: int, value: int, cut: bool) -> bytes:
    frame = bytearray(_VALID)
    if cut:
        return bytes(frame[: position % len(frame)])
    frame[position % len(frame)] = value
    return bytes(frame)
