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
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import queue
import threading
from typing import Callable

import numpy as np

from splitserve.runtime.host_kv import BatchHostKV
from splitserve.runtime.model_runner import ModelRunner, PrefilledRow
from splitserve.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PrefillJob:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    decode_address: str  # "" = nobody wants the KV
    first_token: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


# send_kv(job, kv): delivers the KV to job.decode_address; called while the prefill may still
# be computing, so it waits for job.first_token.result() only when it needs the token.
SendKV = Callable[[PrefillJob, PrefilledRow], None]


class PrefillEngine:
    def __init__(self, runner: ModelRunner, send_kv: SendKV, *, max_prefill_batch: int,
                 max_prefill_tokens: int = 8192, sender_threads: int = 4):
        self.runner = runner
        self.send_kv = send_kv
        self.max_prefill_batch = max_prefill_batch
        self.max_prefill_tokens = max_prefill_tokens
        self._jobs: queue.Queue[PrefillJob | None] = queue.Queue()
        self._senders = concurrent.futures.ThreadPoolExecutor(sender_threads, thread_name_prefix="kv-send")
        self.in_flight = 0
        self._sends_lock = threading.Lock()
        self._sends_pending = 0  # KV transfers submitted and not yet finished

    def submit(self, job: PrefillJob) -> concurrent.futures.Future:
        self.in_flight += 1
        self._jobs.put(job)
        return job.first_token

    def stop(self) -> None:
        self._jobs.put(None)

    @property
    def idle(self) -> bool:
        """No prompt waits or runs, and every KV transfer has ended (a drain waits for this)."""
        with self._sends_lock:
            return self.in_flight == 0 and self._sends_pending == 0

    def run_forever(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._prefill(batch)
        except Exception:  # noqa: BLE001 - a dead engine must take the worker down
            log.exception("prefill engine loop crashed; exiting")
            os._exit(1)

    def _next_batch(self) -> list[PrefillJob] | None:
        first = self._jobs.get()
        if first is None:
            return None
        batch, tokens = [first], len(first.prompt_ids)
        while len(batch) < self.max_prefill_batch:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)
                break
            if tokens + len(job.prompt_ids) > self.max_prefill_tokens:
                self._jobs.put(job)  # next batch; order among batches is kept loosely
                break
            batch.append(job)
            tokens += len(job.prompt_ids)
        return batch

    def _prefill(self, batch: list[PrefillJob]) -> None:
        # From here on a job can no longer be cancelled: its first token will be set.
        live = [job for job in batch if job.first_token.set_running_or_notify_cancel()]
        self.in_flight -= len(batch) - len(live)
        if not live:
            return
        first, ks, vs, _ = self.runner.prefill_async([j.prompt_ids for j in live], [j.params for j in live],
                                                     [0] * len(live))
        host = BatchHostKV(ks, vs) if any(j.decode_address for j in live) else None
        for row, job in enumerate(live):
            if job.decode_address:
                with self._sends_lock:
                    self._sends_pending += 1
                self._senders.submit(self._send, job, PrefilledRow(ks, vs, row, len(job.prompt_ids), host))
        try:
            tokens = np.asarray(first)[: len(live)].tolist()  # waits for the last layer and the sampler
        except Exception as e:  # noqa: BLE001 - fail these requests (and their senders), not the worker
            for job in live:
                job.first_token.set_exception(e)
            raise
        finally:
            self.in_flight -= len(live)
        for job, token in zip(live, tokens):
            job.first_token.set_result(token)

    def _send(self, job: PrefillJob, kv: PrefilledRow) -> None:
        try:
            self.send_kv(job, kv)
        except Exception:  # noqa: BLE001 - one failed transfer must not stop the others
            log.exception("KV transfer of %s to %s failed", job.request_id, job.decode_address)
        finally:
            with self._sends_lock:
                self._sends_pending -= 1
