"""gRPC Decode service: reservations (with KV data tickets), the KV transfer stream, token streams
(one call per request, or many requests per call: runtime/token_batches.py)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import grpc

from splitserve.protos import internal_pb2, internal_pb2_grpc
from splitserve.runtime.decode_engine import END, DecodeEngine, StreamError
from splitserve.runtime.decode_scheduler import UnknownRequest
from splitserve.runtime.drain import Admission
from splitserve.runtime.kv_receive import KVReceiver, KVRefused
from splitserve.runtime.metrics import WorkerMetrics
from splitserve.runtime.page_allocator import OutOfPages
from splitserve.runtime.proto_convert import sampling_from_internal
from splitserve.runtime.token_batches import AlreadyStarted, BatchedCall, CallClosed

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0


class KVDataSocket(Protocol):
    """What Reserve needs of the KV data listener (runtime/kv_listener.py)."""

    address: str

    def issue_ticket(self, request_id: str, lease_s: float) -> bytes: ...

    def renew_ticket(self, request_id: str, lease_s: float) -> None: ...


class DecodeService(internal_pb2_grpc.DecodeServicer):
    """`kv_data`: the worker's KV data socket; None (--kv-transport grpc): KV comes through TransferKV only."""

    def __init__(self, engine: DecodeEngine, admission: Admission, *, mesh: str, platform: str,
                 role: str = "decode", metrics: WorkerMetrics | None = None, receiver: KVReceiver | None = None,
                 kv_data: KVDataSocket | None = None, page_size: int = 0, dtype: str = ""):
        self.engine = engine
        self.admission = admission  # new reservations only; the transfers and streams of held ones go on
        self.metrics = metrics or WorkerMetrics()
        self.mesh, self.platform, self.role = mesh, platform, role
        self.page_size, self.dtype = page_size, dtype  # reported by Stats
        self.receiver = receiver or KVReceiver(engine)
        self.kv_data = kv_data
        self._batched_lock = threading.Lock()
        self._batched_calls: set[BatchedCall] = set()  # StreamBatched calls in progress
        self._refusing_batched_calls = False  # the worker is stopping

    def Reserve(self, request, context):
        with self.admission.admitted_or_abort(context):
            return self._reserve(request, context)

    def _reserve(self, request, context):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # the caller has given up: reserve nothing
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the reservation's deadline passed before it was made")
        lease = request.lease_s if request.lease_s > 0 else DEFAULT_LEASE_S
        try:
            free = self.engine.reserve(request.request_id, request.num_tokens, lease)
        except OutOfPages as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode worker is out of KV pages: {e}")
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.kv_data is None:
            return internal_pb2.ReserveResponse(free_pages=free)
        # A ticket per reservation, valid for its lease: the only key to the data socket.
        return internal_pb2.ReserveResponse(free_pages=free, kv_data_address=self.kv_data.address,
                                            kv_ticket=self.kv_data.issue_ticket(request.request_id, lease))

    def Renew(self, request, context):
        """Not behind the drain's admission: a held reservation's life goes on while the worker drains."""
        lease = request.lease_s if request.lease_s > 0 else DEFAULT_LEASE_S
        try:
            self.engine.renew(request.request_id, lease)
        except UnknownRequest as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        if self.kv_data is not None:
            self.kv_data.renew_ticket(request.request_id, lease)
        return internal_pb2.RenewResponse()

    def TransferKV(self, request_iterator, context):
        """`request_iterator` yields raw KVChunk frames (see add_decode_service)."""
        with self.metrics.kv_transfer("received") as timer:  # an abort raises: counted as a failure
            try:
                timer.bytes = self.receiver.receive(request_iterator)
            except KVRefused as e:
                context.abort(e.code, e.message)
            return internal_pb2.TransferKVResponse(received_bytes=timer.bytes)

    def Stream(self, request, context):
        try:
            out = self.engine.open_stream(request.request_id, sampling_from_internal(request.sampling),
                                          prompt_ids=list(request.prompt_ids))
        except UnknownRequest as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # Client gone or cancelled: free the pages now (a no-op once finished).
        context.add_callback(lambda: self.engine.release(request.request_id))
        while True:
            item = out.get()
            if item is END:
                return
            if isinstance(item, StreamError):
                context.abort(getattr(grpc.StatusCode, item.code), str(item))
            token, reason, logprobs = item
            message = internal_pb2.DecodeTokens(token_ids=[token], finish_reason=reason.value if reason else "")
            if logprobs is not None:
                message.logprobs.append(logprobs.to_proto(internal_pb2.TokenLogprobs))
            yield message
            if reason is not None:
                return

    def StreamBatched(self, request_iterator, context):
        """Each DecodeRequest read starts a request; yields one TokenBatch per decode step. The call
        ends when the router cancels it or goes away (its open requests are then released), or once
        the router has half-closed it and none of its requests is open."""
        call = BatchedCall()
        with self._batched_lock:
            refused = self._refusing_batched_calls
            if not refused:
                self._batched_calls.add(call)
        if refused:
            context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker is stopping")

        def ended():
            with self._batched_lock:
                self._batched_calls.discard(call)
            call.close()  # first: a request that starts after this is refused, not left running
            for request_id in call.open_requests():
                self.engine.release(request_id)

        if not context.add_callback(ended):
            ended()
            return

        def start_requests():
            try:
                for request in request_iterator:
                    self._start_batched(call, request)
            except Exception as e:  # noqa: BLE001 - the call broke; ended() releases what it held
                log.debug("StreamBatched request stream ended: %s", e)
            finally:
                call.half_close()

        threading.Thread(target=start_requests, name="stream-batched", daemon=True).start()
        yield from call.messages()

    def stop_batched_calls(self, grace_s: float) -> None:
        """The worker is stopping: refuses new StreamBatched calls, lets the requests decoding on
        the open ones finish for up to `grace_s`, then ends the calls (what is left on them is
        released). Without this a router's call, which has no deadline and outlives its requests,
        would hold the server's stop for its whole grace period."""
        with self._batched_lock:
            self._refusing_batched_calls = True
        deadline = time.monotonic() + grace_s
        while not self.engine.idle and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._batched_lock:
            calls = list(self._batched_calls)
        for call in calls:
            call.close()

    def _start_batched(self, call: BatchedCall, request) -> None:
        try:
            sampling = sampling_from_internal(request.sampling)
            self.engine.open_stream(request.request_id, sampling, call.output(request.request_id),
                                    prompt_ids=list(request.prompt_ids))
        except CallClosed:
            return  # nobody is listening; the reservation's lease (or the router's Release) frees it
        except AlreadyStarted as e:
            log.warning("StreamBatched: %s; the second start is ignored", e)
        except UnknownRequest as e:
            call.fail(request.request_id, grpc.StatusCode.NOT_FOUND.name, str(e))
        except ValueError as e:
            call.fail(request.request_id, grpc.StatusCode.INVALID_ARGUMENT.name, str(e))
        except Exception as e:  # noqa: BLE001 - one bad start must not stop the call's other requests
            log.exception("starting %s on a batched call failed", request.request_id)
            call.fail(request.request_id, grpc.StatusCode.INTERNAL.name, f"decode worker failed to start it: {e}")

    def Release(self, request, context):
        return internal_pb2.ReleaseResponse(released=self.engine.release(request.request_id))

    def Stats(self, request, context):
        return internal_pb2.WorkerStats(role=self.role, mesh=self.mesh, platform=self.platform,
                                        page_size=self.page_size, dtype=self.dtype, **self.engine.stats())


def add_decode_service(server: grpc.Server, servicer: DecodeService) -> None:
    """Registers the Decode service like the generated `add_DecodeServicer_to_server`, except that
    TransferKV hands the handler raw frames (no deserializer): runtime/kv_codec.py parses them
    without copying the KV through protobuf. Clients call it with `transfer_kv_callable`."""
    pb = internal_pb2
    handlers = {
        "Reserve": grpc.unary_unary_rpc_method_handler(
            servicer.Reserve, pb.ReserveRequest.FromString, pb.ReserveResponse.SerializeToString),
        "Renew": grpc.unary_unary_rpc_method_handler(
            servicer.Renew, pb.RenewRequest.FromString, pb.RenewResponse.SerializeToString),
        "TransferKV": grpc.stream_unary_rpc_method_handler(
            servicer.TransferKV, None, pb.TransferKVResponse.SerializeToString),
        "Stream": grpc.unary_stream_rpc_method_handler(
            servicer.Stream, pb.DecodeRequest.FromString, pb.DecodeTokens.SerializeToString),
        "StreamBatched": grpc.stream_stream_rpc_method_handler(
            servicer.StreamBatched, pb.DecodeRequest.FromString, pb.TokenBatch.SerializeToString),
        "Release": grpc.unary_unary_rpc_method_handler(
            servicer.Release, pb.ReleaseRequest.FromString, pb.ReleaseResponse.SerializeToString),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, pb.StatsRequest.FromString, pb.WorkerStats.SerializeToString),
    }
    if set(handlers) != {m.name for m in _DECODE_SERVICE.methods}:
        raise RuntimeError("add_decode_service is out of date with protos/internal.proto")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_DECODE_SERVICE.full_name, handlers),))


def transfer_kv_callable(channel: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    """Decode/TransferKV taking encoded KVChunk frames (bytes) as its request stream."""
    return channel.stream_unary(f"/{_DECODE_SERVICE.full_name}/TransferKV", request_serializer=None,
                                response_deserializer=internal_pb2.TransferKVResponse.FromString)


_DECODE_SERVICE = internal_pb2.DESCRIPTOR.services_by_name["Decode"]
