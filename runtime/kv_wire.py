"""Layout-free KV wire format: one request's KV cache as a stream of KVChunk frames.

    header                     request id, num_layers, num_kv_heads, head_dim, num_tokens,
                               dtype (numpy name, e.g. "bfloat16")
    payload × N                layer 0 K, layer 0 V, layer 1 K, ... each split into blocks of
                               [token_count, kv_head_count, head_dim] bytes, token-major, native
                               (little-endian) byte order, at most ~chunk_bytes each
    trailer                    total payload bytes, zlib's crc32 over the payload bytes in order,
                               and the first token (sampled after the last layer, so it comes last)

Heads are the model's own KV heads, not the replicas a tensor-parallel layout adds
(models/head_layout.py): the sender keeps the first replica of each head
(`select_original_heads`), the receiver re-creates its own replicas (`expand_to_serving_heads`),
so any prefill mesh can feed any decode mesh.

The receiver (`KVAssembler`) validates the header against the model it serves, writes each
payload straight into preallocated arrays, and tracks which (token, head) cells of each
(layer, K/V) were written. `finish` hands the arrays out only if every cell was written exactly
once and the byte count and checksum match; any other outcome raises KVTransferError, so KV from
a broken, partial or corrupted transfer is never returned.

Frames are encoded and decoded by runtime/kv_codec.py (protobuf-compatible bytes, no copies of
the payload through protobuf). Pure numpy + protobuf: no JAX here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy dtype names
import numpy as np

from splitserve.protos import internal_pb2
from splitserve.runtime.kv_codec import (
    ChunkView,
    KVTransferError,
    crc32,
    decode_chunk,
    encode_header,
    encode_payload_parts,
    encode_trailer,
)

__all__ = ["KVTransferError", "KVAssembler", "KVLayoutExpectation", "ReceivedKV", "kv_chunks", "kv_frame_parts",
           "receive_kv"]

FrameParts = tuple  # one encoded KVChunk frame as consecutive byte buffers (bytes or memoryview)


# ---- sending ----------------------------------------------------------------------------------


def kv_chunks(
    request_id: str,
    first_token: int | Callable[[], int],
    k_layers: Sequence[np.ndarray],  # per layer [num_tokens, num_kv_heads, head_dim]
    v_layers: Sequence[np.ndarray],  # same shape and dtype as k_layers
    *,
    chunk_bytes: int = 1 << 20,
) -> Iterator[bytes]:
    """Yields header, payload chunks (per layer, K then V) and trailer as encoded KVChunk frames.

    Payloads cover whole token rows, `chunk_bytes // row_bytes` tokens each; a token row larger
    than chunk_bytes is split by KV-head range instead (one token per chunk). Only the current
    chunk's bytes are held, so memory stays bounded by about one chunk beyond the inputs.

    The layers may be lazy sequences (`len` and indexing; see model_runner.HostKV): layer i is
    read only when its turn comes, so the header and the first layers leave while the prefill
    still computes later ones. `first_token` may be a callable, called only for the trailer,
    since the first token is sampled after the last layer. Layer 0 fixes shape and dtype: bad
    inputs there raise ValueError here; a later layer that differs raises when it is reached.
    """
    # kv_frame_parts runs its checks now (the generator expression evaluates it at once).
    return (b"".join(parts) for parts in kv_frame_parts(request_id, first_token, k_layers, v_layers,
                                                         chunk_bytes=chunk_bytes))


def kv_frame_parts(
    request_id: str,
    first_token: int | Callable[[], int],
    k_layers: Sequence[np.ndarray],
    v_layers: Sequence[np.ndarray],
    *,
    chunk_bytes: int = 1 << 20,
) -> Iterator[FrameParts]:
    """The frames of `kv_chunks`, each as a tuple of buffers whose concatenation is the frame: a
    payload's KV block is a view of the layer (no copy) when it is contiguous there. A part is
    valid until the next frame is asked for. Same arguments and checks as `kv_chunks`."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if len(k_layers) == 0 or len(k_layers) != len(v_layers):
        raise ValueError(f"need the same number (>= 1) of K and V layers, got {len(k_layers)} and {len(v_layers)}")
    shape, dtype = _layer_spec(k_layers[0])
    _check_layer("V", 0, v_layers[0], shape, dtype)
    return _frames(request_id, first_token, k_layers, v_layers, shape, dtype, chunk_bytes)


def _frames(request_id, first_token, k_layers, v_layers, shape, dtype, chunk_bytes) -> Iterator[FrameParts]:
    num_tokens, num_kv_heads, head_dim = shape
    yield (encode_header(internal_pb2.KVHeader(
        request_id=request_id, num_layers=len(k_layers), num_kv_heads=num_kv_heads,
        head_dim=head_dim, num_tokens=num_tokens, dtype=dtype.name)),)

    total, crc = 0, 0
    for layer in range(len(k_layers)):
        for is_value, layers in ((False, k_layers), (True, v_layers)):
            x_thd = _check_layer("V" if is_value else "K", layer, layers[layer], shape, dtype)
            for t0, tc, h0, hc in _blocks(shape, dtype.itemsize, chunk_bytes):
                data = _block_bytes(x_thd, t0, tc, h0, hc)
                total += len(data)
                crc = crc32(data, crc)
                yield encode_payload_parts(layer=layer, is_value=is_value, kv_head_start=h0, kv_head_count=hc,
                                           token_start=t0, token_count=tc, data=data)
    token = first_token() if callable(first_token) else first_token
    yield (encode_trailer(internal_pb2.KVTrailer(total_bytes=total, crc32=crc, first_token=token)),)


def _layer_spec(x: np.ndarray) -> tuple[tuple[int, int, int], np.dtype]:
    if x.ndim != 3 or min(x.shape) < 1:
        raise ValueError(f"K layer 0: shape {list(x.shape)}, expected non-empty [num_tokens, num_kv_heads, head_dim]")
    if not x.dtype.isnative or _dtype_from_name(x.dtype.name) != x.dtype:
        raise ValueError(f"dtype {x.dtype!r} cannot be sent: it must round-trip through its name in native byte order")
    return x.shape, x.dtype


def _check_layer(name: str, i: int, x: np.ndarray, shape, dtype) -> np.ndarray:
    if x.shape != shape or x.dtype != dtype:
        raise ValueError(f"{name} layer {i}: {x.dtype}{list(x.shape)}, expected every layer to be "
                         f"{dtype}{list(shape)} [num_tokens, num_kv_heads, head_dim]")
    return x


def _blocks(shape, itemsize: int, chunk_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """(token_start, token_count, head_start, head_count) of each payload of one layer's K or V."""
    num_tokens, num_kv_heads, head_dim = shape
    head_bytes = head_dim * itemsize
    row_bytes = num_kv_heads * head_bytes
    if row_bytes <= chunk_bytes:
        tokens = chunk_bytes // row_bytes
        for t0 in range(0, num_tokens, tokens):
            yield t0, min(tokens, num_tokens - t0), 0, num_kv_heads
    else:
        heads = max(1, chunk_bytes // head_bytes)
        for t0 in range(num_tokens):
            for h0 in range(0, num_kv_heads, heads):
                yield t0, 1, h0, min(heads, num_kv_heads - h0)


def _block_bytes(x_thd: np.ndarray, t0: int, tc: int, h0: int, hc: int) -> memoryview:
    """The [tc, hc, head_dim] block at (t0, h0) as C-order bytes; a view when the block is contiguous
    (whole token rows of a C-order array), else a copy of just this block."""
    block = np.ascontiguousarray(x_thd[t0 : t0 + tc, h0 : h0 + hc])
    return memoryview(block.view(np.uint8).reshape(-1))


# ---- receiving --------------------------------------------------------------------------------

Allocate = Callable[[tuple, np.dtype], np.ndarray]  # (shape, dtype) -> an array to fill


@dataclasses.dataclass(frozen=True)
class KVLayoutExpectation:
    """What the receiving model accepts in a KV header."""

    num_layers: int
    num_kv_heads: int  # the model's, not replicated
    head_dim: int
    dtypes_allowed: tuple[str, ...]  # numpy dtype names
    max_tokens: int
    vocab_size: int | None = None  # bounds the first token in the trailer

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.dtypes_allowed:
            raise ValueError("dtypes_allowed must name at least one dtype")
        for name in self.dtypes_allowed:
            _dtype_from_name(name)  # raises on an unknown name


class KVAssembler:
    """Receives one request's KV payloads into preallocated arrays; see the module docstring.

    Usage: `asm = KVAssembler.from_header(header, expected=...)`, `asm.add(payload)` for each
    payload, then `k_layers, v_layers = asm.finish(trailer)`. Any error is a KVTransferError and
    leaves the assembler failed: later calls raise too, and no KV is ever returned.

    `allocate(shape, dtype)` provides the receive buffers (default np.empty; the decode worker
    passes a reusable pool, runtime/host_staging.py). With `pad_tokens(num_tokens)` the buffers
    have that many token rows and the returned layers are views of their first num_tokens rows
    (`layer.base` is the padded buffer), so the receiver can insert them without restacking.
    """

    def __init__(self, header: internal_pb2.KVHeader, expected: KVLayoutExpectation, *,
                 max_bytes: int | None = None, allocate: Allocate = np.empty,
                 pad_tokens: Callable[[int], int] | None = None):
        _check_header(header, expected)
        self.header, self.expected = header, expected
        self.dtype = _dtype_from_name(header.dtype)
        shape = (header.num_tokens, header.num_kv_heads, header.head_dim)
        self.expected_bytes = 2 * header.num_layers * int(np.prod(shape)) * self.dtype.itemsize
        if max_bytes is not None and self.expected_bytes > max_bytes:
            raise KVTransferError(f"request {header.request_id}: KV of {self.expected_bytes} bytes exceeds "
                                  f"the limit of {max_bytes} bytes")
        padded = shape if pad_tokens is None else (pad_tokens(header.num_tokens), *shape[1:])
        if padded[0] < shape[0]:
            raise ValueError(f"pad_tokens({shape[0]}) = {padded[0]} is smaller than the token count")
        # [layer][K=0 / V=1] -> [num_tokens, num_kv_heads, head_dim]; written[...] -> [tokens, heads]
        self._kv = [[allocate(padded, self.dtype)[: shape[0]] for _ in range(2)] for _ in range(header.num_layers)]
        self._written = np.zeros((header.num_layers, 2, header.num_tokens, header.num_kv_heads), bool)
        self.received_bytes = 0
        self._crc = 0
        self._state = "open"  # "open" | "failed: <reason>" | "finished"

    @classmethod
    def from_header(cls, header: internal_pb2.KVHeader, *, expected: KVLayoutExpectation,
                    max_bytes: int | None = None, **buffers) -> KVAssembler:
        return cls(header, expected, max_bytes=max_bytes, **buffers)

    def add(self, payload: internal_pb2.KVPayload) -> None:
        """Validates one payload and writes it into place."""
        self._check_open()
        try:
            self._add(payload)
        except KVTransferError as e:
            self._fail(str(e))
            raise

    def finish(self, trailer: internal_pb2.KVTrailer) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Checks completeness, byte count and checksum; returns (k_layers, v_layers)."""
        self._check_open()
        try:
            self._check_complete(trailer)
        except KVTransferError as e:
            self._fail(str(e))
            raise
        kv, self._kv, self._state = self._kv, None, "finished"
        return [layer[0] for layer in kv], [layer[1] for layer in kv]

    def _add(self, payload: internal_pb2.KVPayload) -> None:
        h = self.header
        where = f"request {h.request_id}: payload for layer {payload.layer} {'V' if payload.is_value else 'K'}"
        if payload.layer >= h.num_layers:
            raise KVTransferError(f"{where}: layer out of range [0, {h.num_layers})")
        t0, tc, h0, hc = payload.token_start, payload.token_count, payload.kv_head_start, payload.kv_head_count
        if tc == 0 or hc == 0:
            raise KVTransferError(f"{where}: empty range ({tc} tokens, {hc} KV heads)")
        if t0 + tc > h.num_tokens:
            raise KVTransferError(f"{where}: tokens [{t0}, {t0 + tc}) exceed num_tokens {h.num_tokens}")
        if h0 + hc > h.num_kv_heads:
            raise KVTransferError(f"{where}: KV heads [{h0}, {h0 + hc}) exceed num_kv_heads {h.num_kv_heads}")
        size = tc * hc * h.head_dim * self.dtype.itemsize
        if len(payload.data) != size:
            raise KVTransferError(f"{where}: {len(payload.data)} data bytes, expected {size} for "
                                  f"{tc} tokens x {hc} KV heads x {h.head_dim} x {self.dtype.name}")
        written = self._written[payload.layer, int(payload.is_value), t0 : t0 + tc, h0 : h0 + hc]
        if written.any():
            t, k = np.argwhere(written)[0]
            raise KVTransferError(f"{where}: token {t0 + t} KV head {h0 + k} was already received "
                                  f"(duplicate or overlapping range tokens [{t0}, {t0 + tc}) heads [{h0}, {h0 + hc}))")
        block = np.frombuffer(payload.data, self.dtype).reshape(tc, hc, h.head_dim)
        self._kv[payload.layer][int(payload.is_value)][t0 : t0 + tc, h0 : h0 + hc] = block
        written[...] = True
        self.received_bytes += size
        self._crc = crc32(payload.data, self._crc)

    def _check_complete(self, trailer: internal_pb2.KVTrailer) -> None:
        rid = self.header.request_id
        if not self._written.all():
            missing = int(self._written.size - self._written.sum())
            layer, kv, t, k = np.argwhere(~self._written)[0]
            raise KVTransferError(f"request {rid}: KV incomplete, {missing} (token, KV head) cells never arrived; "
                                  f"first: layer {layer} {'KV'[kv]} token {t} KV head {k}")
        if trailer.total_bytes != self.received_bytes:
            raise KVTransferError(f"request {rid}: trailer says {trailer.total_bytes} payload bytes, "
                                  f"received {self.received_bytes}")
        if trailer.crc32 != self._crc:
            raise KVTransferError(f"request {rid}: checksum mismatch: trailer crc32 {trailer.crc32:#010x}, "
                                  f"received data has {self._crc:#010x}")
        vocab = self.expected.vocab_size
        if trailer.first_token < 0 or (vocab is not None and trailer.first_token >= vocab):
            raise KVTransferError(f"request {rid}: trailer first_token={trailer.first_token} is outside the "
                                  f"vocabulary [0, {vocab if vocab is not None else 'vocab_size'})")

    def _check_open(self) -> None:
        if self._state != "open":
            raise KVTransferError(f"request {self.header.request_id}: KV assembler is {self._state}")

    def _fail(self, reason: str) -> None:
        self._state, self._kv = f"failed: {reason}", None  # drop the partial KV at once


@dataclasses.dataclass(frozen=True)
class ReceivedKV:
    """One request's verified KV: per layer [num_tokens, num_kv_heads, head_dim] host arrays."""

    request_id: str
    num_tokens: int
    first_token: int
    k_layers: list[np.ndarray]
    v_layers: list[np.ndarray]


def receive_kv(frames: Iterable[bytes], *, expected: KVLayoutExpectation, max_bytes: int | None = None,
               on_header: Callable[[internal_pb2.KVHeader], None] | None = None, **buffers) -> ReceivedKV:
    """Consumes a whole KV stream of encoded KVChunk frames into a ReceivedKV, or raises KVTransferError.

    The stream must be header, payloads, trailer; one that ends early (no trailer) or has
    anything after the trailer is rejected. `on_header` sees the header once it has arrived
    (before it is validated), so the caller can clean up for that request if the rest fails.
    """
    frames = iter(frames)
    first = next(frames, None)
    first = None if first is None else decode_chunk(first)
    if first is None or first.kind != "header":
        raise KVTransferError("the KV stream must start with a header")
    if on_header is not None:
        on_header(first.header)
    assembler = KVAssembler.from_header(first.header, expected=expected, max_bytes=max_bytes, **buffers)
    result = None
    for frame in frames:
        chunk: ChunkView = decode_chunk(frame)
        if result is not None:
            raise KVTransferError(f"request {first.header.request_id}: {chunk.kind!r} chunk after the trailer")
        if chunk.kind == "payload":
            assembler.add(chunk.payload)
        elif chunk.kind == "trailer":
            k_layers, v_layers = assembler.finish(chunk.trailer)
            result = ReceivedKV(first.header.request_id, first.header.num_tokens, chunk.trailer.first_token,
                                k_layers, v_layers)
        else:
            raise KVTransferError(f"request {first.header.request_id}: unexpected {chunk.kind!r} chunk after the header")
    if result is None:
        raise KVTransferError(f"request {first.header.request_id}: the KV stream ended without a trailer")
    return result


def _check_header(header: internal_pb2.KVHeader, expected: KVLayoutExpectation) -> None:
    rid = header.request_id
    if not rid:
        raise KVTransferError("KV header has an empty request_id")
    for name in ("num_layers", "num_kv_heads", "head_dim"):
        got, want = getattr(header, name), getattr(expected, name)
        if got != want:
            raise KVTransferError(f"request {rid}: KV header {name}={got}, this model has {want}")
    if not 1 <= header.num_tokens <= expected.max_tokens:
        raise KVTransferError(f"request {rid}: KV header num_tokens={header.num_tokens}, "
                              f"must be in [1, {expected.max_tokens}]")
    if header.dtype not in expected.dtypes_allowed:
        raise KVTransferError(f"request {rid}: KV dtype {header.dtype!r} not accepted, "
                              f"expected one of {list(expected.dtypes_allowed)}")


def _dtype_from_name(name: str) -> np.dtype:
    try:
        dtype = np.dtype(name)
    except TypeError as e:
        raise KVTransferError(f"unknown dtype name {name!r}") from e
    if dtype.name != name or dtype.hasobject or dtype.itemsize == 0:
        raise KVTransferError(f"dtype name {name!r} is not a canonical plain numpy dtype name")
    return dtype


# ---- head layouts -----------------------------------------------------------------------------


def original_head_indices(kv_source: Sequence[int]) -> tuple[int, ...]:
    """Serving KV head index of the first replica of each of the model's KV heads, in order."""
    num_original = max(kv_source, default=-1) + 1
    if sorted(set(kv_source)) != list(range(num_original)) or min(kv_source, default=0) < 0:
        raise ValueError(f"kv_source {tuple(kv_source)} must map serving heads onto every head 0..n-1")
    return tuple(list(kv_source).index(h) for h in range(num_original))


def select_original_heads(x_sd: np.ndarray, kv_source: Sequence[int]) -> np.ndarray:
    """[..., serving_kv_heads, head_dim] -> [..., original_kv_heads, head_dim] (first replicas), to send."""
    if x_sd.ndim < 2 or x_sd.shape[-2] != len(kv_source):
        raise ValueError(f"expected [..., {len(kv_source)} serving KV heads, head_dim], got shape {x_sd.shape}")
    return np.take(x_sd, original_head_indices(kv_source), axis=-2)


def expand_to_serving_heads(x_od: np.ndarray, kv_source: Sequence[int]) -> np.ndarray:
    """[..., original_kv_heads, head_dim] -> [..., serving_kv_heads, head_dim] (replicated), on receipt."""
    num_original = len(original_head_indices(kv_source))
    if x_od.ndim < 2 or x_od.shape[-2] != num_original:
        raise ValueError(f"expected [..., {num_original} original KV heads, head_dim], got shape {x_od.shape}")
    return np.take(x_od, np.asarray(kv_source), axis=-2)
