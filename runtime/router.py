"""The router: validates, tokenizes, picks workers, streams tokens, applies stop strings.

One request, disaggregated:
    1. Decode/Reserve   pages for prompt + max_tokens on the decode worker with most free pages
                        (runtime/page_reservations.py);
                        the reply may name the worker's KV data socket and a one-time ticket
    2. Prefill/Run      on the least-loaded prefill worker, with that address and ticket; returns
                        the FIRST token (TTFT); the prefill worker streams the KV to the decode
                        worker meanwhile (over the data socket, else through TransferKV). While
                        the prompt queues there, Decode/Renew keeps the reservation's lease going
    3. Decode/StreamBatched  the remaining tokens, once the KV has arrived: one call per decode
                        worker carries every request's tokens, a message per decode step
                        (runtime/token_feed.py)
Colocated mode is the same protocol against workers that hold both roles (the KV stays
in-process). If the client goes away, the request leaves the shared token stream and its
reservation is released at once. A worker that answers UNAVAILABLE (dead, draining) is marked down and
skipped until it reports SERVING again (runtime/worker_health.py); a prefill that fails so
is retried on another prefill worker, with a fresh reservation (see _reserve_and_prefill).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import uuid
from typing import Callable, Iterator

import grpc

from splitserve.models.metadata import ModelMetadata
from splitserve.protos import internal_pb2, internal_pb2_grpc
from splitserve.runtime.deadlines import CallCancelled, CallScope
from splitserve.runtime.grpc_common import PUBLIC_MAX_MESSAGE_BYTES, ChannelPool
from splitserve.runtime.logprobs import TokenLogprobs
from splitserve.runtime.page_reservations import RENEW_EVERY_S, PageReservations, Reservation
from splitserve.runtime.prefix_affinity import PrefixAffinity
from splitserve.runtime.proto_convert import sampling_to_internal
from splitserve.runtime.request import FinishReason, check_bias_ids, check_prompt_ids
from splitserve.runtime.router_errors import RouterError, passed_through
from splitserve.runtime.sampling_params import SamplingParams
from splitserve.runtime.stop_rules import finish_reason_after_token, looks_for_stop_strings, stop_reason
from splitserve.runtime.text_stream import TextStream
from splitserve.runtime.token_feed import FeedCancelled, FeedError, TokenFeed
from splitserve.runtime.worker_health import WorkerHealth

log = logging.getLogger(__name__)


class _PrefillUnavailable(Exception):
    """The chosen prefill worker answered UNAVAILABLE: retry elsewhere."""


@dataclasses.dataclass
class WorkerHandle:
    address: str
    role: str  # "prefill" | "decode" | "colocated"
    prefill: internal_pb2_grpc.PrefillStub | None
    decode: internal_pb2_grpc.DecodeStub | None
    feed: TokenFeed | None = None  # the decode tokens of every request there (decode and colocated roles)
    in_flight: int = 0
    free_pages: int = 0
    mesh: str = ""
    platform: str = ""
    page_size: int = 0  # 0: a prefill worker (holds no pages), or not heard from yet
    dtype: str = ""
    prefix_cache_block: int = 0  # a prefill worker's prefix cache block in tokens; 0: none (or not heard from)


# How long a Prefill/Run may take, queue included, when the client set no shorter deadline. A backstop
# for a worker that never answers, not a limit on the queue: with up to 1024 queued prompts each, a
# prefill worker may hold many minutes of work, and requests queued behind it still complete (as in
# vLLM, whose queue has no timeout). A dead or silent worker ends the call much sooner (keepalive).
PREFILL_TIMEOUT_S = 3600.0

# Prompt logprobs all ride on the stream's first message, with the prompt's ids: both must fit in
# one message of the public API (less a margin for its other fields).
PROMPT_LOGPROBS_MAX_BYTES = PUBLIC_MAX_MESSAGE_BYTES - (64 << 10)


def first_message_bytes(prompt_len: int, params: SamplingParams) -> int:
    """An upper bound on the encoded prompt ids and prompt logprobs: an id is <= 5 bytes; an entry
    is a logprob (5), its two packed lists' framing (<= 6), its rank (<= 6), per top token an id
    (<= 5) and a logprob (4), and its own framing (<= 3)."""
    return prompt_len * 5 + max(prompt_len - 1, 0) * (20 + 9 * (params.prompt_logprobs or 0))


@dataclasses.dataclass(frozen=True)
class RouterEvent:
    token_ids: list[int]
    text: str
    finish_reason: str  # "" until the last event
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # one per token, when asked
    stop_reason: str | int | None = None  # on the last event: the stop string or stop token id that ended it
    # On the first event, when asked: one per prompt token after the first (runtime/prompt_logprobs.py).
    prompt_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    cached_prompt_tokens: int = 0  # on the first event: prompt tokens the prefill found in its prefix cache


@dataclasses.dataclass
class _Progress:  # what stop_rules needs of a request
    params: SamplingParams
    output_ids: list[int]


class Router:
    def __init__(self, metadata: ModelMetadata, *, prefill: list[str], decode: list[str], colocated: list[str],
                 channels: ChannelPool | None = None):
        if not colocated and (not prefill or not decode):
            raise ValueError("a router needs prefill and decode workers, or colocated workers")
        self.metadata = metadata
        self.mode = "colocated" if colocated else "disaggregated"
        self.channels = channels or ChannelPool()
        self._lock = threading.Lock()
        self._ids = itertools.count()

        def handle(address, role):
            channel = self.channels.get(address)
            decode = internal_pb2_grpc.DecodeStub(channel) if role != "prefill" else None
            feed = TokenFeed(decode, on_broken=lambda why: self.health.mark_down(address, why)) if decode else None
            return WorkerHandle(address, role, internal_pb2_grpc.PrefillStub(channel) if role != "decode" else None,
                                decode, feed)

        if colocated:
            self.workers = [handle(a, "colocated") for a in colocated]
            self.prefill_workers = self.decode_workers = self.workers
        else:
            self.prefill_workers = [handle(a, "prefill") for a in prefill]
            self.decode_workers = [handle(a, "decode") for a in decode]
            self.workers = self.prefill_workers + self.decode_workers
        self.health = WorkerHealth([w.address for w in self.workers], self.channels, on_up=self._refresh_address)
        self.pages = PageReservations(self.decode_workers, self.health, self._lock)
        self.affinity = PrefixAffinity()

    def close(self) -> None:
        """Ends the token streams to the decode workers (what is still on them is released there)."""
        for worker in self.workers:
            if worker.feed is not None:
                worker.feed.close()

    # -- workers --------------------------------------------------------------------------
    def refresh_stats(self) -> None:
        for worker in self.workers:
            try:
                self._refresh(worker)
            except grpc.RpcError as e:
                log.warning("worker %s did not answer Stats: %s", worker.address, e.code())

    def _refresh(self, worker: WorkerHandle) -> None:
        stats = (worker.decode or worker.prefill).Stats(internal_pb2.StatsRequest(), timeout=2.0)
        with self._lock:
            worker.free_pages, worker.mesh, worker.platform = stats.free_pages, stats.mesh, stats.platform
            worker.page_size, worker.dtype = stats.page_size, stats.dtype
            worker.prefix_cache_block = stats.prefix_cache_block

    def serves_with(self) -> tuple[int, str]:
        """(page size, dtype) the workers report: the decode side's pages; "" / 0 before any answered."""
        with self._lock:
            page_size = next((w.page_size for w in self.decode_workers if w.page_size), 0)
            dtype = next((w.dtype for w in self.decode_workers + self.prefill_workers if w.dtype), "")
        return page_size, dtype

    def _refresh_address(self, address: str) -> None:  # a restarted worker: its pages and its cache start afresh
        self.affinity.forget(address)
        for worker in self.workers:
            if worker.address == address:
                self._refresh(worker)

    def can_serve(self) -> bool:
        """Some prefill worker and some decode worker (or one colocated worker) is up."""
        return (any(self.health.is_up(w.address) for w in self.prefill_workers)
                and any(self.health.is_up(w.address) for w in self.decode_workers))

    def _by_load(self, exclude: set[str]) -> list[WorkerHandle]:
        with self._lock:
            return sorted((w for w in self.prefill_workers if w.address not in exclude and self.health.is_up(w.address)),
                          key=lambda w: w.in_flight)

    # -- one request ----------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        cfg = self.metadata.config
        try:
            check_prompt_ids(prompt_ids, cfg.vocab_size)
            check_bias_ids(params, cfg.vocab_size, cfg.eos_token_ids)
            if params.structured_outputs is not None:
                if self.metadata.tokenizer is None:
                    raise ValueError("structured outputs need the model's tokenizer, and this model has none")
                params.structured_outputs.check()
        except ValueError as e:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if params.prompt_logprobs is not None and (size := first_message_bytes(len(prompt_ids), params)) > \
                PROMPT_LOGPROBS_MAX_BYTES:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"prompt_logprobs={params.prompt_logprobs} for a prompt of {len(prompt_ids)} tokens "
                              f"makes a ~{size >> 20} MiB message, over the {PROMPT_LOGPROBS_MAX_BYTES >> 20} MiB "
                              f"that one may carry: ask for fewer top tokens, or a shorter prompt")
        if len(prompt_ids) + params.max_tokens > cfg.max_model_len:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                              f"the model's context of {cfg.max_model_len}")

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "",
                 scope: CallScope | None = None, on_prefill: Callable[[], None] | None = None) -> Iterator[RouterEvent]:
        """`scope`: the client call's deadline and cancellation (runtime/deadlines.py);
        `on_prefill()` is called when the request leaves the queue for a prefill worker."""
        scope = scope or CallScope()
        self.validate(prompt_ids, params)
        params = params.with_seed()  # both legs must sample with the same seed
        request_id = f"{request_id or 'req'}-{uuid.uuid4().hex[:12]}"
        sampling = sampling_to_internal(params)
        text = TextStream(self.metadata.tokenizer, prompt_ids, params.stop, params.include_stop_str_in_output,
                          params.skip_special_tokens)
        progress = _Progress(params, [])
        decode = None
        try:
            decode, request_id, first = self._reserve_and_prefill(request_id, prompt_ids, sampling, params.max_tokens,
                                                                  scope, on_prefill)
            event = self._event(first.first_token, progress, text,
                                logprobs=first.first_logprobs if first.HasField("first_logprobs") else None)
            yield dataclasses.replace(event, prompt_logprobs=[TokenLogprobs.from_proto(lp)
                                                              for lp in first.prompt_logprobs],
                                      cached_prompt_tokens=first.cached_tokens)
            if event.finish_reason:
                return
            penalised_prompt = prompt_ids if params.repetition_penalty != 1.0 else []  # only then does decode need it
            yield from self._decoded(decode, request_id, sampling, penalised_prompt, progress, text, scope)
        except FeedError as e:  # the worker stopped this request, or its token stream broke
            raise RouterError(passed_through(e.code), f"worker failed: {e}") from e
        except grpc.RpcError as e:
            if scope.cancelled and isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.CANCELLED:
                raise CallCancelled("the client cancelled the request") from None
            if not isinstance(e, grpc.Call):
                raise
            if e.code() is grpc.StatusCode.CANCELLED:  # not by this client: the worker ended the call (stopping)
                raise RouterError(grpc.StatusCode.UNAVAILABLE, f"a worker cancelled the call: {e.details()}") from e
            raise RouterError(passed_through(e.code()), f"worker failed: {e.details()}") from e
        finally:
            if decode is not None:
                self.pages.release(decode, request_id)

    def _decoded(self, decode: WorkerHandle, request_id: str, sampling, prompt_ids: list[int], progress: _Progress,
                 text: TextStream, scope: CallScope) -> Iterator[RouterEvent]:
        """The tokens after the first, from the decode worker's shared token stream: one event per
        decode step, or one for all the steps whose tokens waited while the client's stream was
        busy (as vLLM merges the outputs a slow reader has not taken yet)."""
        stream = decode.feed.start(request_id, sampling, prompt_ids)
        try:
            with scope.cancelling(stream):
                while True:
                    try:
                        entries = stream.next_ready(timeout=scope.timeout(None))
                    except queue.Empty:
                        scope.check()  # the deadline passed: DeadlinePassed
                        continue
                    except FeedCancelled:
                        raise CallCancelled("the client cancelled the request") from None
                    events = []
                    for entry in entries:
                        last = len(entry.token_ids) - 1
                        for i, token in enumerate(entry.token_ids):
                            events.append(self._event(token, progress, text, entry.finish_reason if i == last else "",
                                                      entry.logprobs[i] if entry.logprobs else None))
                            if events[-1].finish_reason:
                                yield _joined(events)
                                return
                        if entry.finish_reason:
                            if events:
                                yield _joined(events)
                            raise RouterError(grpc.StatusCode.INTERNAL,
                                              "decode worker finished a request without tokens")
                    if events:
                        yield _joined(events)
        finally:
            stream.close()

    def _event(self, token: int, progress: _Progress, text: TextStream, worker_reason: str = "",
               logprobs: internal_pb2.TokenLogprobs | None = None) -> RouterEvent:
        progress.output_ids.append(token)
        reason = finish_reason_after_token(progress, self.metadata.config.eos_token_ids)
        delta, stopped = text.add(token, stop_token=reason is FinishReason.STOP,
                                  last=reason is not None or bool(worker_reason),
                                  find_stop=looks_for_stop_strings(progress))
        if stopped:
            reason = FinishReason.STOP
        finish = reason.value if reason else worker_reason
        why = stop_reason(progress, self.metadata.config.eos_token_ids, text.stop_string) if finish == "stop" else None
        return RouterEvent([token], delta, finish, [] if logprobs is None else [TokenLogprobs.from_proto(logprobs)],
                           why)

    def _reserve_and_prefill(self, request_id: str, prompt_ids: list[int], sampling, max_tokens: int,
                             scope: CallScope, on_prefill: Callable[[], None] | None
                             ) -> tuple[WorkerHandle | None, str, internal_pb2.PrefillResponse]:
        """Reserves decode pages, then prefills; returns (decode worker or None, the id used, the
        prefill's answer: the first token and, if asked, its logprobs).

        A prefill worker that answers UNAVAILABLE (died, draining) is retried on another one, and
        each attempt reserves afresh under its own id. Why not reuse the reservation: the dead
        worker may have begun the KV transfer, and a decode worker drops a reservation whose
        transfer was cut (DecodeService._drop), at a moment of its own - possibly after the retry
        has begun. With one id per attempt that late drop can only hit the failed attempt's
        reservation, which the router releases itself anyway.
        """
        tried: set[str] = set()  # prefill workers that failed this request
        for attempt in itertools.count():
            attempt_id = request_id if attempt == 0 else f"{request_id}-retry{attempt}"
            # Each attempt's reservation comes with its own ticket: a retry never reuses one.
            reservation = self.pages.reserve(attempt_id, len(prompt_ids) + max_tokens, scope) if max_tokens > 1 else None
            decode = reservation.worker if reservation is not None else None
            try:
                if on_prefill is not None and attempt == 0:
                    on_prefill()
                return decode, attempt_id, self._prefill(attempt_id, prompt_ids, sampling, reservation, tried, scope)
            except BaseException as e:
                if decode is not None:
                    self.pages.release(decode, attempt_id)
                if not isinstance(e, _PrefillUnavailable):
                    raise
        raise AssertionError("unreachable: _prefill raises once every prefill worker was tried")

    def _prefill(self, request_id: str, prompt_ids: list[int], sampling, reservation: Reservation | None,
                 tried: set[str], scope: CallScope) -> internal_pb2.PrefillResponse:
        """Runs the prefill on the least-loaded prefill worker not in `tried`, or where the prompt's start
        is cached (runtime/prefix_affinity.py); colocated: on the worker that holds the reservation. On UNAVAILABLE marks it down, adds it to `tried` and
        raises _PrefillUnavailable."""
        candidates = self._by_load(tried)
        decode = reservation.worker if reservation is not None else None
        if self.mode == "colocated" and decode is not None:
            candidates = [decode] if decode.address not in tried else []  # the KV stays where it is reserved
        if not candidates:
            raise RouterError(grpc.StatusCode.UNAVAILABLE,
                              f"no prefill worker is reachable (failed: {sorted(tried)}; down: {self.health.down()})")
        request = internal_pb2.PrefillRequest(request_id=request_id, prompt_ids=prompt_ids, sampling=sampling,
                                              decode_address=decode.address if decode else "")
        if reservation is not None and reservation.kv_data_address:
            request.kv_data_address, request.kv_ticket = reservation.kv_data_address, reservation.kv_ticket
        with self._lock:  # chosen and counted at once, so a burst sees each other's choices
            worker = self.affinity.pick(prompt_ids, candidates)  # where the prompt's start may be cached
            worker.in_flight += 1
        try:
            call = worker.prefill.Run.future(request, timeout=scope.timeout(PREFILL_TIMEOUT_S))
            if reservation is None:
                return scope.result(call)  # a client cancel cancels the Run
            # The decode pages stay reserved however long the prompt queues; a renewal that fails cancels the Run.
            return scope.result(call, every_s=RENEW_EVERY_S,
                                while_waiting=lambda: self.pages.renew(reservation, request_id))
        except grpc.RpcError as e:
            if e.code() is not grpc.StatusCode.UNAVAILABLE:
                raise
            tried.add(worker.address)
            self.health.mark_down(worker.address, f"Prefill/Run: {e.details()}")
            log.warning("prefill of %s on %s failed (%s); retrying elsewhere", request_id, worker.address, e.details())
            raise _PrefillUnavailable() from e
        finally:
            with self._lock:
                worker.in_flight -= 1


def _joined(events: list[RouterEvent]) -> RouterEvent:
    """Consecutive events as one: their tokens and text in order, the last one's finish reason."""
    if len(events) == 1:
        return events[0]
    return RouterEvent([t for e in events for t in e.token_ids], "".join(e.text for e in events),
                       events[-1].finish_reason, [lp for e in events for lp in e.logprobs], events[-1].stop_reason,
                       [lp for e in events for lp in e.prompt_logprobs], sum(e.cached_prompt_tokens for e in events))

