"""The decode worker's engine loop: one thread owns the device; gRPC threads talk to it.

    gRPC threads                       engine thread (run_forever)
    reserve / kv_arrived / stream  ──► DecodeScheduler (under a lock)
                                       loop: expire leases → schedule → insert admitted KV
                                             → one decode step for all running → emit
    Stream handlers  ◄── per request, an output of (token, finish_reason, logprobs) items: a queue of
                         its own (Stream), or its share of a batched call's next message
                         (StreamBatched: runtime/token_batches.py), flushed once per step

Backpressure: every queue here is bounded. Reservations (running or waiting) hold at least one
page each, so there are never more than the pool's pages; the batch is at most max_batch; a
stream's output queue holds at most its max_tokens tokens and the end marker; a KV transfer
gets receive buffers only for a request reserved and still waiting for its KV (checked on
the header), so transfers cannot outnumber reservations. Past the pages, Reserve answers
RESOURCE_EXHAUSTED and the router waits (bounded) or refuses. The loop sleeps on a condition
variable when idle, and wakes for new work or the next lease deadline.
A crash in the loop is logged and stops the process (STYLE 14): nothing limps on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Protocol

from splitserve.runtime.decode_scheduler import DecodeScheduler, DecodeSlot
from splitserve.runtime.device_turns import DeviceTurns, no_turns
from splitserve.runtime.model_runner import ModelRunner
from splitserve.runtime.page_allocator import PageAllocator
from splitserve.runtime.request import FinishReason, check_bias_ids, check_prompt_ids
from splitserve.runtime.sampling_params import SamplingParams
from splitserve.runtime.stop_rules import finish_reason_after_token

log = logging.getLogger(__name__)

END = None  # queued after the last token of a stream


class StreamError(Exception):
    """Queued to a stream whose request can no longer be decoded (lease expired, bad KV; its
    structured output failed: INVALID_ARGUMENT). `code`: the grpc.StatusCode name the call ends with."""

    def __init__(self, message: str, code: str = "UNAVAILABLE"):
        super().__init__(message)
        self.code = code


class StreamOutput(Protocol):
    """Where a request's items go: (token, finish reason or None, TokenLogprobs or None), then END
    or a StreamError."""

    def put(self, item) -> None: ...

    def flush(self) -> None:
        """Called after a step's (or a release's) items: a batching output sends them now."""


class QueueOutput(queue.Queue):
    """One request's own queue (Decode/Stream): each item is taken as it comes."""

    def flush(self) -> None:
        pass


class DecodeEngine:
    def __init__(self, runner: ModelRunner, *, max_batch: int, turns: DeviceTurns | None = None):
        """`turns`: shared with a prefill engine on the same device (runtime/device_turns.py)."""
        if max_batch > runner.config.max_batch:  # its penalty rows (and batch buckets) are sized by the runner's
            raise ValueError(f"decode max_batch {max_batch} exceeds the runner's {runner.config.max_batch}")
        self.runner = runner
        self._device_turn = turns.turn if turns is not None else no_turns
        self.eos_token_ids = runner.model.config.eos_token_ids
        self.scheduler = DecodeScheduler(PageAllocator(runner.config.num_pages),
                                         page_size=runner.config.page_size, max_batch=max_batch,
                                         max_tokens_per_seq=runner.max_model_len)
        self._lock = threading.Condition()
        self._outputs: dict[str, StreamOutput] = {}
        self._stopped = False
        self.steps = 0

    # -- called from gRPC threads ---------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int, lease_s: float) -> int:
        with self._lock:
            self.scheduler.reserve(request_id, num_tokens, lease_s)
            self._lock.notify()
            return self.scheduler.allocator.free_count

    def renew(self, request_id: str, lease_s: float) -> None:
        """Extends the reservation's lease (the loop's next wake-up can only move later, so no notify)."""
        with self._lock:
            self.scheduler.renew(request_id, lease_s)

    def claim_kv(self, request_id: str) -> None:
        """A transfer for the request begins; raises UnknownRequest (or ValueError) unless one is expected."""
        with self._lock:
            self.scheduler.claim_kv(request_id)

    def kv_arrived(self, request_id: str, kv, prompt_len: int, first_token: int) -> None:
        with self._lock:
            self.scheduler.kv_arrived(request_id, kv, prompt_len, first_token)
            self._lock.notify()

    def open_stream(self, request_id: str, params: SamplingParams, out: StreamOutput | None = None,
                    prompt_ids: list[int] = ()) -> StreamOutput:
        """Starts decoding the request once its KV is in; its tokens go to `out` (default: a
        QueueOutput of its own), which is returned. `prompt_ids`: needed with a repetition penalty."""
        check_prompt_ids(prompt_ids, self.runner.model.config.vocab_size, may_be_empty=True)
        config = self.runner.model.config
        check_bias_ids(params, config.vocab_size, config.eos_token_ids)  # the step builds its bias row from them
        if params.structured_outputs is not None:
            self.runner.grammar.check(params)  # and its token masks from this
        with self._lock:
            self.scheduler.stream_opened(request_id, params, prompt_ids)
            out = self._outputs[request_id] = QueueOutput() if out is None else out
            self._lock.notify()
            return out

    def release(self, request_id: str, error: str | None = None) -> bool:
        """Frees the request's pages now; a waiting stream ends (with `error` if given)."""
        with self._lock:
            out = self._outputs.pop(request_id, None)
            if out is not None:
                out.put(StreamError(error) if error else END)
                out.flush()
            slot = self.scheduler.slots.get(request_id)
            if slot is not None and slot.kv is not None:  # arrived, never inserted: reuse its buffers
                self.runner.recycle_host_kv(slot.kv)
            return self.scheduler.release(request_id)

    def stats(self) -> dict:
        with self._lock:
            return dict(free_pages=self.scheduler.allocator.free_count,
                        total_pages=self.scheduler.allocator.capacity,
                        running=self.scheduler.num_running, waiting=self.scheduler.num_waiting)

    @property
    def idle(self) -> bool:
        """No reservation is held: nothing waits for KV, nothing decodes (a drain waits for this)."""
        with self._lock:
            return not self.scheduler.slots

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()

    # -- the engine thread ----------------------------------------------------------------
    def run_forever(self) -> None:
        try:
            while self._step_or_wait():
                pass
        except Exception:  # noqa: BLE001 - a dead engine must take the worker down
            log.exception("decode engine loop crashed; exiting")
            os._exit(1)

    def _step_or_wait(self) -> bool:
        with self._lock:
            if self._stopped:
                return False
            for request_id in self.scheduler.expire_leases():
                log.warning("reservation %s expired before its KV or stream arrived", request_id)
                out = self._outputs.pop(request_id, None)
                if out is not None:
                    out.put(StreamError(f"request {request_id}: its KV did not arrive before the lease expired"))
                    out.flush()
            plan = self.scheduler.schedule()
            if plan.empty:
                deadline = self.scheduler.next_lease_deadline()
                timeout = None if deadline is None else max(0.0, deadline - self.scheduler.clock()) + 0.01
                self._lock.wait(timeout)
                return True
            admitted = [(s, s.kv) for s in plan.admit]
            for slot in plan.admit:
                slot.kv = None  # the host copy is no longer needed once inserted
        with self._device_turn():
            if admitted:
                self.runner.insert_kv([kv for _, kv in admitted], [s.pages for s, _ in admitted],
                                      [s.prompt_len for s, _ in admitted])
            tokens, logprobs = self.runner.decode_sampled(
                tokens=[s.output_ids[-1] for s in plan.decode],
                positions=[s.num_tokens - 1 for s in plan.decode],
                page_lists=[s.pages for s in plan.decode],
                sampling=[s.params for s in plan.decode],
                steps=[len(s.output_ids) for s in plan.decode],
                request_ids=[s.request_id for s in plan.decode],
                prompts=[s.prompt_ids for s in plan.decode],
            )
            failed = self.runner.grammar.take_failed()
        self.steps += 1
        self._emit(plan.decode, tokens, logprobs, failed)
        return True

    def _emit(self, slots: list[DecodeSlot], tokens: list[int], logprobs: list, failed: dict[str, str]) -> None:
        """`failed`: requests whose structured output failed in this step (their token is not theirs)."""
        with self._lock:
            flushes = set()  # one per batched call (its outputs share one flush), one per own queue
            for slot, token, token_logprobs in zip(slots, tokens, logprobs):
                if slot.request_id not in self.scheduler.slots:
                    continue  # released while the step ran: its pages are already free
                if slot.request_id in failed:
                    self.scheduler.finish(slot, FinishReason.ABORT)
                    out = self._outputs.pop(slot.request_id, None)
                    if out is not None:
                        why = f"request {slot.request_id}: {failed[slot.request_id]}"
                        out.put(StreamError(why, "INVALID_ARGUMENT"))
                        flushes.add(out.flush)
                    continue
                slot.output_ids.append(token)
                reason = finish_reason_after_token(slot, self.eos_token_ids)
                out = self._outputs.get(slot.request_id)
                if out is not None:
                    out.put((token, reason, token_logprobs))
                    flushes.add(out.flush)
                if reason is not None:
                    self.scheduler.finish(slot, reason)
                    if out is not None:
                        out.put(END)
                    self._outputs.pop(slot.request_id, None)
            for flush in flushes:
                flush()
