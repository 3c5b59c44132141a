"""gRPC Prefill service: first token back at once, KV streamed to the decode worker."""

from __future__ import annotations

import concurrent.futures
import logging
import ssl
import time

import grpc

from splitserve.protos import internal_pb2, internal_pb2_grpc
from splitserve.runtime.decode_service import transfer_kv_callable
from splitserve.runtime.deadlines import NO_DEADLINE_S, DeadlinePassed
from splitserve.runtime.drain import Admission
from splitserve.runtime.grpc_common import ChannelPool
from splitserve.runtime.kv_socket import KVSocketRefused, fits_hello, send_kv
from splitserve.runtime.kv_wire import kv_chunks, kv_frame_parts
from splitserve.runtime.metrics import WorkerMetrics
from splitserve.runtime.prefill_engine import PrefillEngine, PrefillJob, PrefillQueueFull
from splitserve.runtime.proto_convert import sampling_from_internal
from splitserve.runtime.request import check_bias_ids

log = logging.getLogger(__name__)

KV_TRANSFER_TIMEOUT_S = 120.0


class KVSender:
    """Sends one request's KV to its decode worker: over the worker's KV data socket when the job
    carries its address and ticket (runtime/kv_socket.py), else through Decode/TransferKV. A data
    port that refuses the connection (nothing sent yet) falls back to TransferKV, as does a
    request id too long for the socket's hello."""

    def __init__(self, channels: ChannelPool, chunk_bytes: int = 1 << 20, metrics: WorkerMetrics | None = None,
                 ssl_context: ssl.SSLContext | None = None):
        self.channels = channels
        self.chunk_bytes = chunk_bytes
        self.metrics = metrics or WorkerMetrics()
        self.ssl_context = ssl_context  # TLS of the data socket connections (InternalSecurity.kv_data_client_context)

    def __call__(self, job: PrefillJob, first_token, k_layers, v_layers) -> None:
        """first_token: an int or a callable giving it (called for the trailer); the layers may be lazy."""
        timeout = KV_TRANSFER_TIMEOUT_S
        if job.deadline is not None:  # nobody waits for the KV past the request's deadline
            timeout = max(0.0, min(timeout, job.deadline - time.monotonic()))
        deadline = time.monotonic() + timeout
        by_socket = bool(job.kv_data_address) and fits_hello(job.request_id)
        with self.metrics.kv_transfer("sent", "socket" if by_socket else "grpc") as timer:
            try:
                if by_socket:
                    try:
                        timer.bytes = self._by_socket(job, first_token, k_layers, v_layers, timeout)
                        return
                    except ConnectionRefusedError as e:  # before the hello: no frame consumed, no ticket used
                        log.warning("KV data socket %s refused the connection (%s); sending the KV of %s "
                                    "through TransferKV", job.kv_data_address, e, job.request_id)
                        timer.transport = "grpc"
                timer.bytes = self._by_grpc(job, first_token, k_layers, v_layers,
                                            max(0.0, deadline - time.monotonic()))
            except (grpc.RpcError, KVSocketRefused) as e:
                code, details = (e.code, e.message) if isinstance(e, KVSocketRefused) else (e.code(), e.details())
                if code is not grpc.StatusCode.NOT_FOUND:
                    raise
                # The reservation is gone: the client cancelled (or its deadline passed) after the prefill.
                log.info("KV of %s not sent: %s", job.request_id, details)
                timer.failed = True

    def _by_socket(self, job: PrefillJob, first_token, k_layers, v_layers, timeout: float) -> int:
        frames = kv_frame_parts(job.request_id, first_token, k_layers, v_layers, chunk_bytes=self.chunk_bytes)
        return send_kv(job.kv_data_address, job.request_id, job.kv_ticket, frames, timeout_s=timeout,
                       ssl_context=self.ssl_context)

    def _by_grpc(self, job: PrefillJob, first_token, k_layers, v_layers, timeout: float) -> int:
        transfer = transfer_kv_callable(self.channels.get(job.decode_address))
        frames = kv_chunks(job.request_id, first_token, k_layers, v_layers, chunk_bytes=self.chunk_bytes)
        return transfer(frames, timeout=timeout).received_bytes


class PrefillService(internal_pb2_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine, admission: Admission, *, mesh: str, platform: str,
                 role: str = "prefill", page_size: int = 0, dtype: str = "", prefix_cache_block: int = 0):
        self.engine = engine
        self.admission = admission
        self.mesh, self.platform, self.role = mesh, platform, role
        self.page_size, self.dtype = page_size, dtype  # reported by Stats
        self.prefix_cache_block = prefix_cache_block

    def Run(self, request, context):
        with self.admission.admitted_or_abort(context):
            return self._run(request, context)

    def _run(self, request, context):
        vocab = self.engine.runner.model.config.vocab_size
        if not request.prompt_ids or any(not 0 <= t < vocab for t in request.prompt_ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"prompt must be 1+ token ids in [0, {vocab})")
        if len(request.prompt_ids) > (context_len := self.engine.runner.max_model_len):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"prompt of {len(request.prompt_ids)} tokens exceeds the model's context of {context_len}")
        try:
            params = sampling_from_internal(request.sampling)
            check_bias_ids(params, vocab, self.engine.runner.model.config.eos_token_ids)
            if params.structured_outputs is not None:
                self.engine.runner.grammar.check(params)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        job = PrefillJob(request.request_id, list(request.prompt_ids), params, request.decode_address,
                         deadline=_deadline(context), kv_data_address=request.kv_data_address,
                         kv_ticket=request.kv_ticket)
        try:
            future = self.engine.submit(job)
        except PrefillQueueFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        # The router gave up: skip the prefill if not started, or its remaining chunks.
        context.add_callback(lambda: (future.cancel(), job.abandoned.set()))
        try:
            token = future.result()
        except concurrent.futures.CancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "prefill cancelled")
        except DeadlinePassed as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        response = internal_pb2.PrefillResponse(first_token=token)
        if job.first_logprobs is not None:
            response.first_logprobs.CopyFrom(job.first_logprobs.to_proto(internal_pb2.TokenLogprobs))
        for entry in job.prompt_logprobs or ():
            response.prompt_logprobs.append(entry.to_proto(internal_pb2.TokenLogprobs))
        response.cached_tokens = job.cached_tokens
        return response

    def Stats(self, request, context):
        engine = self.engine
        return internal_pb2.WorkerStats(role=self.role, mesh=self.mesh, platform=self.platform,
                                        page_size=self.page_size, dtype=self.dtype, running=engine.in_flight, prefilled=engine.prefilled,
                                        dropped_cancelled=engine.dropped_cancelled,
                                        dropped_expired=engine.dropped_expired,
                                        prefix_cache_block=self.prefix_cache_block)


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline on time.monotonic()'s clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE_S else time.monotonic() + remaining
