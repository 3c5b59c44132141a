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
from typing import Callable

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

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class PrefillQueueFull(Exception):
    """The engine's queue is at its bound; the message names it."""


# send_kv(job, kv): delivers the KV to job.decode_address; called while the prefill may still
# be computing, so it waits for job.first_token.result() only when it needs the token.
SendKV = Callable[[PrefillJob, PrefilledRow], None]


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
        self._jobs: collections.deque[PrefillJob] = collections.deque()  # FIFO, at most max_queued
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
            return len(self._jobs) + self._running

    def submit(self, job: PrefillJob) -> concurrent.futures.Future:
        """Queues the job; raises PrefillQueueFull at once when max_queued jobs already wait."""
        with self._lock:
            if len(self._jobs) >= self.max_queued:
                raise PrefillQueueFull(f"prefill queue is full: {len(self._jobs)} requests wait "
                                       f"(the limit is {self.max_queued})")
            self._jobs.append(job)
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
            while (batch := self._next_batch()) is not None:
                self._prefill(batch)
        except Exception:  # noqa: BLE001 - a dead engine must take the worker down
            log.exception("prefill engine loop crashed; exiting")
            os._exit(1)

    def _next_batch(self) -> list[PrefillJob] | None:
        """The next jobs to run, oldest first, within the batch and token limits; None once stopped.

        Each job taken is marked running (it can no longer be cancelled); cancelled and expired
        jobs are dropped here, so they never take a place in a batch.
        """
        with self._lock:
            batch, tokens = [], 0
            while not batch:
                while not self._jobs:
                    if self._stopping:
                        return None
                    self._lock.wait()
                now = self.clock()
                while self._jobs and len(batch) < self.max_prefill_batch:
                    job = self._jobs[0]
                    if batch and tokens + len(job.prompt_ids) > self.max_prefill_tokens:
                        break  # starts the next batch
                    self._jobs.popleft()
                    if self._take(job, now):
                        batch.append(job)
                        tokens += len(job.prompt_ids)
            self._running += len(batch)
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

    def _run_on_device(self, live: list[PrefillJob]) -> list[int]:
        """Dispatches the batch, hands each row's KV to a sender at once, and waits for the first tokens."""
        first, ks, vs, _ = self.runner.prefill_async([j.prompt_ids for j in live], [j.params for j in live],
                                                     [0] * len(live))
        for job, cached in zip(live, self.runner.last_cached_tokens):
            job.cached_tokens = cached
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
