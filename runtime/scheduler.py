"""Continuous-batching scheduler. Plain Python: no JAX import, unit-tested without a model.

Each step it returns a StepPlan: the waiting requests to prefill now (admitted FIFO while
the batch, the prefill token budget and free pages allow; pages are reserved for the
prompt plus max_tokens up front, so a running request never runs out) and the running
requests to decode. Finished or aborted requests give their pages back at once.
"""

from __future__ import annotations

import collections
import dataclasses

from splitserve.runtime.page_allocator import PageAllocator, pages_needed
from splitserve.runtime.request import FinishReason, Request


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 16  # running requests decoded together
    max_prefill_batch: int = 8  # prompts prefilled in one step
    max_prefill_tokens: int = 4096  # sum of padded prompt lengths per prefill step
    page_size: int = 16
    max_model_len: int = 2048

    def __post_init__(self):
        for name in ("max_batch", "max_prefill_batch", "max_prefill_tokens", "page_size", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    prefill: list[Request]
    decode: list[Request]

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        """Queues a request; raises ValueError if it can never fit."""
        if request.max_total_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.params.max_tokens}) "
                f"= {request.max_total_tokens} exceeds the model's context of {self.config.max_model_len}"
            )
        if self._pages_for(request) > self.allocator.capacity:
            raise ValueError(f"request needs {self._pages_for(request)} KV pages, the pool has "
                             f"{self.allocator.capacity}")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _pages_for(self, request: Request) -> int:
        return pages_needed(request.max_total_tokens, self.config.page_size)

    def schedule(self) -> StepPlan:
        decode = list(self.running.values())
        prefill: list[Request] = []
        prompt_tokens = 0
        while self.waiting and len(self.running) + len(prefill) < self.config.max_batch:
            request = self.waiting[0]
            if len(prefill) >= self.config.max_prefill_batch:
                break
            if prefill and prompt_tokens + len(request.prompt_ids) > self.config.max_prefill_tokens:
                break
            if self._pages_for(request) > self.allocator.free_count:
                break  # FIFO: wait for pages rather than let later requests overtake
            self.waiting.popleft()
            request.pages = self.allocator.allocate(self._pages_for(request))
            prefill.append(request)
            prompt_tokens += len(request.prompt_ids)
        for request in prefill:
            self.running[request.request_id] = request
        return StepPlan(prefill=prefill, decode=decode)

    def finish(self, request: Request, reason: FinishReason) -> None:
        request.finish_reason = reason
        self.running.pop(request.request_id, None)
        if request.pages:
            self.allocator.free(request.pages)
            request.pages = []

    def abort(self, request_id: str) -> Request | None:
        """Removes a request wherever it is; frees its pages. Returns it, or None if unknown."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                request.finish_reason = FinishReason.ABORT
                return request
        request = self.running.get(request_id)
        if request is not None:
            self.finish(request, FinishReason.ABORT)
        return request
