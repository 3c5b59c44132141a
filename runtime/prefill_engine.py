"""The prefill worker's engine loop: batches queued prompts, returns first tokens at once.

    gRPC threads: submit() ──► queue ──► engine thread: dispatch a batch's prefill (bucketed),
                                            │ one device computation per layer, no waiting
                                            ├ K/V per layer ──► sender pool, at once: each layer
                                            │                   copied to host and streamed to the
                                            │                   decode worker as soon as it is done
                                            │                   (colocated: handed over on device)
                                            └ first tokens ───► futures (the router's TTFT); the
                                                                senders put it in the trailer
The senders start before the prefill has finished, so the transfer of early layers overlaps
the later layers, and the rest of it overlaps the next batch; it never delays a first token.

Chunked prefill (RunnerConfig.prefill_chunk_tokens): a longer prompt waits in a queue of its own
and is prefilled alone, one chunk per turn (runtime/chunked_prefill.py). While it runs, its chunks
alternate with batches of the short prompts that arrived meanwhile, and on a colocated worker each
chunk is one device turn, so decode steps run in between too.

Backpressure: the queue holds at most `max_queued` jobs; submit() past that raises
PrefillQueueFull at once (the service answers RESOURCE_EXHAUSTED). A job whose caller
cancelled, or whose deadline passed while it waited, is dropped when a batch is formed and
never reaches the device; the counters (prefilled, dropped_*) show it in WorkerStats.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Generator

from splitserve.runtime.deadlines import DeadlinePassed
from splitserve.runtime.device_turns import DeviceTurns, no_turns
from splitserve.runtime.host_kv import BatchHostKV, PrefilledRow
from splitserve.runtime.logprobs import TokenLogprobs
from splitserve.runtime.metrics import WorkerMetrics
from splitserve.runtime.model_runner import ModelRunner
from splitserve.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# The router admits 1024 requests by default (runtime/admission.py) and spreads them over the
# prefill workers; a single worker holding more than this is far behind, better told at once.
DEFAULT_MAX_QUEUED = 1024


@dataclasses.dataclass
class PrefillJob:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    decode_address: str  # "" = nobody wants the KV
    first_token: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    submitted_at: float = dataclasses.field(default_factory=time.perf_counter)  # for the queue-time metric
    deadline: float | None = None  # time.monotonic() past which nobody waits for it; None: no limit
    kv_data_address: str = ""  # the decode worker's KV data socket; "": send through TransferKV
    kv_ticket: bytes = dataclasses.field(default=b"", repr=False)  # admits this request's KV there, once
    first_logprobs: TokenLogprobs | None = None  # set before first_token's result when params.logprobs is set
    prompt_logprobs: list[TokenLogprobs] | None = None  # likewise, when params.prompt_logprobs is set
    cached_tokens: int = 0  # likewise: prompt tokens found in the prefix cache
    # Set when the caller is gone (its RPC ended): a prompt being prefilled in chunks stops at the next chunk.
    abandoned: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class PrefillQueueFull(Exception):
    """The engine's queue is at its bound; the message names it."""


# send_kv(job, kv): delivers the KV to job.decode_address; called while the prefill may still
# be computing, so it waits for job.first_token.result() only when it needs the token.
SendKV = Callable[[PrefillJob, PrefilledRow], None]


@dataclasses.dataclass
class _Chunking:
    """A long prompt being prefilled in chunks: its job, and the steps left (None until it starts)."""
    job: PrefillJob
    steps: Generator | None = None


class PrefillEngine:
    def __init__(self, runner: ModelRunner, send_kv: SendKV, *, max_prefill_batch: int,
                 max_prefill_tokens: int = 8192, sender_threads: int = 4, max_queued: int = DEFAULT_MAX_QUEUED,
                 clock: Callable[[], float] = time.monotonic, metrics: WorkerMetrics | None = None,
                 turns: DeviceTurns | None = None):
        """`turns`: shared with a decode engine on the same device (runtime/device_turns.py); a batch
        holds its turn until its first tokens are out."""
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.runner = runner
        self._device_turn = turns.turn if turns is not None else no_turns
        self.metrics = metrics or WorkerMetrics()
        self.send_kv = send_kv
        self.max_prefill_batch = max_prefill_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queued = max_queued
        self.clock = clock
        self._lock = threading.Condition()
        self._jobs: collections.deque[PrefillJob] = collections.deque()  # FIFO
        self._long_jobs: collections.deque[PrefillJob] = collections.deque()  # to prefill in chunks; FIFO
        self._chunking: _Chunking | None = None  # the long prompt being prefilled, at most one
        self._chunk_went_last = False  # alternation: a chunk, a batch of short prompts, a chunk, ...
        self._stopping = False
        self._senders = concurrent.futures.ThreadPoolExecutor(sender_threads, thread_name_prefix="kv-send")
        self._running = 0  # jobs taken off the queue whose first token is not out yet
        # Counters since start (WorkerStats): requests run on the device, and dropped before it.
        self.prefilled = self.dropped_cancelled = self.dropped_expired = 0
        self._sends_lock = threading.Lock()
        self._sends_pending = 0  # KV transfers submitted and not yet finished

    @property
    def in_flight(self) -> int:
        """Jobs queued or being prefilled."""
        with self._lock:
            return len(self._jobs) + len(self._long_jobs) + self._running

    def submit(self, job: PrefillJob) -> concurrent.futures.Future:
        """Queues the job; raises PrefillQueueFull at once when max_queued jobs already wait."""
        chunked = self.runner.chunked is not None and self.runner.chunked.wants(job.prompt_ids, job.params)
        with self._lock:
            waiting = len(self._jobs) + len(self._long_jobs)
            if waiting >= self.max_queued:
                raise PrefillQueueFull(f"prefill queue is full: {waiting} requests wait "
                                       f"(the limit is {self.max_queued})")
            (self._long_jobs if chunked else self._jobs).append(job)
            self._lock.notify()
        return job.first_token

    @property
    def idle(self) -> bool:
        """No prompt waits or runs, and every KV transfer has ended (a drain waits for this)."""
        with self._sends_lock:
            sends = self._sends_pending
        return self.in_flight == 0 and sends == 0

    def stop(self) -> None:
        """The loop ends once the jobs already queued are done."""
        with self._lock:
            self._stopping = True
            self._lock.notify()

    def run_forever(self) -> None:
        try:
            while (work := self._next_work()) is not None:
                if isinstance(work, _Chunking):
                    self._prefill_chunk(work)
                else:
                    self._prefill(work)
        except Exception:  # noqa: BLE001 - a dead engine must take the worker down
            log.exception("prefill engine loop crashed; exiting")
            os._exit(1)

    def _next_work(self) -> list[PrefillJob] | _Chunking | None:
        """A batch of short prompts, or the long prompt whose next chunk is due; None once stopped.

        Oldest first; a long prompt starts when it is older than every waiting short one, and
        while it runs it alternates with batches of them. Each job taken is marked running (it can
        no longer be cancelled); cancelled and expired jobs are dropped here, never reaching the device.
        """
        with self._lock:
            while True:
                now = self.clock()
                if self._chunking is None and self._long_jobs and (
                        not self._jobs or self._long_jobs[0].submitted_at <= self._jobs[0].submitted_at):
                    job = self._long_jobs.popleft()
                    if self._take(job, now):
                        self._chunking = _Chunking(job)
                        self._running += 1
                    continue
                if self._chunking is not None and (not self._jobs or not self._chunk_went_last):
                    self._chunk_went_last = True
                    return self._chunking
                if self._jobs:
                    batch = self._take_batch(now)
                    if batch:
                        self._chunk_went_last = False
                        self._running += len(batch)
                        return batch
                    continue  # all of them were dropped
                if self._stopping:
                    return None
                self._lock.wait()

    def _take_batch(self, now: float) -> list[PrefillJob]:
        """Short prompts off the queue within the batch and token limits (the lock is held)."""
        batch, tokens = [], 0
        while self._jobs and len(batch) < self.max_prefill_batch:
            job = self._jobs[0]
            if batch and tokens + len(job.prompt_ids) > self.max_prefill_tokens:
                break  # starts the next batch
            self._jobs.popleft()
            if self._take(job, now):
                batch.append(job)
                tokens += len(job.prompt_ids)
        return batch

    def _take(self, job: PrefillJob, now: float) -> bool:
        """True if the job is to run (now marked running); else it is dropped and counted."""
        if not job.first_token.set_running_or_notify_cancel():
            self.dropped_cancelled += 1
            return False
        if job.expired(now):
            self.dropped_expired += 1
            job.first_token.set_exception(DeadlinePassed(
                f"request {job.request_id}: its deadline passed while it waited for prefill; not run"))
            return False
        return True

    def _prefill(self, live: list[PrefillJob]) -> None:
        with self._lock:
            self.prefilled += len(live)
        started = time.perf_counter()
        for job in live:
            self.metrics.prefill_queue_time.observe(started - job.submitted_at)
        try:
            with self._device_turn():
                tokens = self._run_on_device(live)
        except Exception as e:  # noqa: BLE001 - their callers and senders hear why; then the loop exits the worker
            for job in live:
                job.first_token.set_exception(e)
            raise
        finally:
            with self._lock:
                self._running -= len(live)
        for job, token in zip(live, tokens):
            job.first_token.set_result(token)

    def _prefill_chunk(self, chunking: _Chunking) -> None:
        """The long prompt's next chunk, in one device turn; after the last, its first token. A prompt
        whose caller left, or whose deadline passed, stops between chunks."""
        job = chunking.job
        if chunking.steps is not None and (job.abandoned.is_set() or job.expired(self.clock())):
            self._stop_chunking(chunking)
            return
        if chunking.steps is None:
            with self._lock:
                self.prefilled += 1
            self.metrics.prefill_queue_time.observe(time.perf_counter() - job.submitted_at)
            chunking.steps = self.runner.chunked.run(job.prompt_ids, job.params, 0)
        try:
            with self._device_turn():
                try:
                    next(chunking.steps)
                    return  # more chunks to go
                except StopIteration as last:
                    first, ks, vs, job.cached_tokens = last.value
                    tokens = self._hand_over([job], first, ks, vs)
        except Exception as e:  # noqa: BLE001 - as _prefill
            job.first_token.set_exception(e)
            self._chunking_ended()
            raise
        self._chunking_ended()
        job.first_token.set_result(tokens[0])

    def _stop_chunking(self, chunking: _Chunking) -> None:
        job = chunking.job
        chunking.steps.close()
        # Counted as prefilled (it reached the device), not as dropped (WorkerStats: dropped before it).
        log.info("request %s: prefill stopped between chunks (%s)", job.request_id,
                 "its caller left" if job.abandoned.is_set() else "its deadline passed")
        job.first_token.set_exception(concurrent.futures.CancelledError() if job.abandoned.is_set() else DeadlinePassed(
            f"request {job.request_id}: its deadline passed during its prefill; stopped between chunks"))
        self._chunking_ended()

    def _chunking_ended(self) -> None:
        with self._lock:
            self._chunking = None
            self._running -= 1

    def _run_on_device(self, live: list[PrefillJob]) -> list[int]:
        """Dispatches the batch, hands each row's KV to a sender at once, and waits for the first tokens."""
        first, ks, vs, _ = self.runner.prefill_async([j.prompt_ids for j in live], [j.params for j in live],
                                                     [0] * len(live))
        for job, cached in zip(live, self.runner.last_cached_tokens):
            job.cached_tokens = cached
        return self._hand_over(live, first, ks, vs)

    def _hand_over(self, live: list[PrefillJob], first, ks, vs) -> list[int]:
        """Hands each row's K/V (device arrays, maybe still computing) to a sender; waits for the first tokens."""
        host = BatchHostKV(ks, vs) if any(j.decode_address for j in live) else None
        for row, job in enumerate(live):
            if job.decode_address:
                with self._sends_lock:
                    self._sends_pending += 1
                self._senders.submit(self._send, job, PrefilledRow(ks, vs, row, len(job.prompt_ids), host))
        params = [j.params for j in live]
        tokens, logprobs = first.to_host(params)  # waits for the last layer and the sampler
        for job, job_logprobs in zip(live, logprobs):
            job.first_logprobs = job_logprobs
        if any(p.prompt_logprobs is not None for p in params):
            for job, entries in zip(live, first.prompt_to_host(params, [len(j.prompt_ids) for j in live])):
                job.prompt_logprobs = entries
        return tokens

    def _send(self, job: PrefillJob, kv: PrefilledRow) -> None:
        try:
            self.send_kv(job, kv)
        except Exception:  # noqa: BLE001 - one failed transfer must not stop the others
            log.exception("KV transfer of %s to %s failed", job.request_id, job.decode_address)
        finally:
            with self._sends_lock:
                self._sends_pending -= 1
