"""Accepting one request's KV on a decode worker, whichever way its bytes came.

Decode/TransferKV (gRPC) and the KV data socket (runtime/kv_listener.py) both hand
`KVReceiver.receive` an iterator of encoded KVChunk frames. It validates and assembles them
(kv_wire.receive_kv, into the staging pool), gives the KV to the decode engine, and turns every
refusal into a `KVRefused` carrying the gRPC status code that TransferKV answers with:

    bad stream (header, payload, checksum, framing)      INVALID_ARGUMENT      reservation dropped
    no reservation (never made, released, expired)       NOT_FOUND
    the scheduler refused it (too big)                   FAILED_PRECONDITION   reservation dropped
    another transfer claimed this request first          FAILED_PRECONDITION   (that one owns it)
    a header for another request than the ticket's       PERMISSION_DENIED     reservation dropped
    the transport failed (sender gone, read timeout)     the error is re-raised, reservation dropped

"Dropped" releases the reservation with an error, so its pages are free at once and a waiting
token stream ends (Decode/Stream, or the request's entry on Decode/StreamBatched); KV from a
failed transfer is never decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc
import numpy as np

from splitserve.runtime.decode_engine import DecodeEngine
from splitserve.runtime.decode_scheduler import UnknownRequest
from splitserve.runtime.kv_wire import KVLayoutExpectation, KVTransferError, receive_kv

log = logging.getLogger(__name__)


class KVRefused(Exception):
    """The worker will not take this KV; `code` is the gRPC status TransferKV answers with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class KVReceiver:
    def __init__(self, engine: DecodeEngine):
        self.engine = engine
        cfg = engine.runner.model.config
        self.expected = KVLayoutExpectation(
            num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            dtypes_allowed=(np.dtype(engine.runner.cache_spec.dtype).name,), max_tokens=cfg.max_model_len,
            vocab_size=cfg.vocab_size,
        )

    def receive(self, frames: Iterable, *, request_id: str | None = None) -> int:
        """Takes one request's frames; returns the KV bytes accepted, or raises (see the module doc).

        `request_id`: the request the sender was admitted for (the data socket's ticket). The header
        must name it, and a failure drops that reservation even before the header has arrived.
        Without it (TransferKV) the request is known only from the header.
        """
        admitted: list[str] = [request_id] if request_id else []  # whose reservation a failure drops

        def on_header(header) -> None:
            if request_id is not None and header.request_id != request_id:
                raise KVRefused(grpc.StatusCode.PERMISSION_DENIED,
                                f"the ticket was issued for request {request_id!r}, not {header.request_id!r}")
            # Refused before any receive buffer is taken: a transfer for a request that was never
            # reserved, or was released (its client cancelled), stops at its first frame.
            try:
                self.engine.claim_kv(header.request_id)
            except ValueError as e:  # a duplicate: the reservation is the other transfer's
                admitted.clear()
                raise KVRefused(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
            if not admitted:
                admitted.append(header.request_id)

        kv = None
        try:
            runner = self.engine.runner
            kv = receive_kv(frames, expected=self.expected, allocate=runner.staging.take,
                            pad_tokens=runner.padded_prompt_len, on_header=on_header)
            self.engine.kv_arrived(kv.request_id, (kv.k_layers, kv.v_layers), kv.num_tokens, kv.first_token)
        except KVRefused as e:
            self._drop(admitted, e.message)
            raise
        except KVTransferError as e:
            self._drop(admitted, f"KV transfer rejected: {e}")
            raise KVRefused(grpc.StatusCode.INVALID_ARGUMENT, f"KV transfer rejected: {e}") from None
        except UnknownRequest as e:
            self._recycle(kv)
            raise KVRefused(grpc.StatusCode.NOT_FOUND, str(e)) from None
        except ValueError as e:  # the scheduler refused it (already has KV, does not fit, not its prompt's length)
            self._recycle(kv)
            self._drop(admitted, str(e))
            raise KVRefused(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        except Exception:  # the sender went away mid-transfer, or stopped sending
            self._drop(admitted, "KV transfer was cut off")
            raise
        return sum(a.nbytes for a in kv.k_layers + kv.v_layers)

    def _recycle(self, kv) -> None:
        if kv is not None:  # received, then refused: nobody else holds its receive buffers
            self.engine.runner.recycle_host_kv((kv.k_layers, kv.v_layers))

    def _drop(self, admitted: list[str], reason: str) -> None:
        if admitted:
            log.warning("%s: %s", admitted[0], reason)
            self.engine.release(admitted[0], error=reason)
