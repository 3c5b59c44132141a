"""Damaged KV transfer streams for the fuzz tests of TransferKV and of the KV data socket.

`transfers()` draws a valid stream of encoded KVChunk frames for the reserved request "$rid"
(the demo model's layout), then damages it one way; `with_id` puts the real reserved id in.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from splitserve.protos import internal_pb2
from splitserve.runtime.kv_codec import encode_header
from splitserve.runtime.kv_wire import kv_chunks

RESERVED_TOKENS = 40


def layers(rng, num_tokens, dtype=np.float32):
    cfg = (4, 4, 32)  # demo: layers, KV heads, head_dim
    return [rng.standard_normal((num_tokens, cfg[1], cfg[2])).astype(dtype) for _ in range(cfg[0])]


def valid_frames(rid, num_tokens, seed, chunk_bytes):
    rng = np.random.default_rng(seed)
    k, v = layers(rng, num_tokens), layers(rng, num_tokens)
    return list(kv_chunks(rid, int(rng.integers(0, 2048)), k, v, chunk_bytes=chunk_bytes))


HEADER_FIELDS = {
    "num_layers": st.sampled_from([0, 1, 3, 4, 5, 2**32 - 1]),
    "num_kv_heads": st.sampled_from([0, 1, 4, 8, 2**32 - 1]),
    "head_dim": st.sampled_from([0, 16, 32, 64, 2**32 - 1]),
    "num_tokens": st.sampled_from([0, 1, 5, 39, 40, 2048, 2049, 2**32 - 1]),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8", "object", "V0", "", "float32 ", "<f4",
                              "complex64", "bool", "S4"]),
    "request_id": st.sampled_from(["$rid", "", "not-reserved", "$rid\x00"]),
}


@st.composite
def transfers(draw):
    """(frames, what was done, the intact frames): a valid stream for the reserved id ("$rid"), then damaged."""
    num_tokens = draw(st.integers(1, 24))
    frames = valid_frames("$rid", num_tokens, draw(st.integers(0, 2**16)), draw(st.sampled_from([97, 512, 4096])))
    intact = list(frames)
    kind = draw(st.sampled_from(["intact", "flip", "truncate_frame", "drop", "duplicate", "swap", "cut",
                                 "append", "random_frame", "header", "random_stream", "empty"]))
    i = draw(st.integers(0, len(frames) - 1))
    if kind == "flip":
        frame = bytearray(frames[i])
        j = draw(st.integers(0, len(frame) - 1))
        frame[j] ^= draw(st.integers(1, 255))
        frames[i] = bytes(frame)
    elif kind == "truncate_frame":
        frames[i] = frames[i][: draw(st.integers(0, len(frames[i]) - 1))]
    elif kind == "drop":
        del frames[i]
    elif kind == "duplicate":
        frames.insert(i, frames[i])
    elif kind == "swap":
        j = draw(st.integers(0, len(frames) - 1))
        frames[i], frames[j] = frames[j], frames[i]
    elif kind == "cut":
        frames = frames[:i]
    elif kind == "append":
        frames.append(draw(st.sampled_from([frames[-1], frames[1], b"", b"\x00"])))
    elif kind == "random_frame":
        frames[i] = draw(st.binary(max_size=200))
    elif kind == "header":
        fields = draw(st.fixed_dictionaries({}, optional=HEADER_FIELDS))
        header = internal_pb2.KVHeader(num_layers=4, num_kv_heads=4, head_dim=32, num_tokens=num_tokens,
                                       dtype="float32", request_id="$rid")
        for name, value in fields.items():
            setattr(header, name, value)
        frames[0] = encode_header(header)
    elif kind == "random_stream":
        frames = draw(st.lists(st.binary(max_size=300), max_size=8))
    elif kind == "empty":
        frames = []
    return frames, kind, intact


def with_id(frames, rid):
    """Puts the reserved request id where the strategy wrote "$rid" (inside valid protobuf strings:
    header frames are re-encoded, so the length prefixes stay right)."""
    out = []
    for frame in frames:
        try:
            chunk = internal_pb2.KVChunk.FromString(frame)
        except Exception:  # noqa: BLE001 - not protobuf at all: sent as it is
            out.append(frame)
            continue
        if chunk.WhichOneof("kind") == "header" and "$rid" in chunk.header.request_id:
            chunk.header.request_id = chunk.header.request_id.replace("$rid", rid)
            out.append(chunk.SerializeToString())
        else:
            out.append(frame)
    return out
