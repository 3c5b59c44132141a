"""The colocated engine: prefill and decode on one mesh, one page pool, no transfer.

One step reads like the design diagram:
    plan = scheduler.schedule()                 # admit waiting requests, pick running ones
    prefill(plan.prefill) -> first tokens, K/V -> insert into their pages
    decode(plan.decode)   -> one token each
    emit: stop rules, detokenize, free pages of finished requests
It is the baseline for every disaggregated comparison and the fast path for offline batch.
Test it like any engine: add requests, call step() until done, compare with transformers.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

from splitserve.models.loader import LoadedModel
from splitserve.runtime.model_runner import ModelRunner, RunnerConfig
from splitserve.runtime.logprobs import TokenLogprobs
from splitserve.runtime.page_allocator import PageAllocator
from splitserve.runtime.request import Completion, FinishReason, Request, TokenEvent, check_bias_ids, check_prompt_ids
from splitserve.runtime.sampling_params import SamplingParams
from splitserve.runtime.scheduler import Scheduler, SchedulerConfig
from splitserve.runtime.stop_rules import finish_reason_after_token, looks_for_stop_strings, stop_reason
from splitserve.runtime.text_stream import TextStream


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int = 1024
    max_batch: int = 16
    max_prefill_batch: int = 8
    max_prefill_tokens: int = 4096
    attention_impl: str = "auto"
    prefix_cache_pages: int = 0  # prefix caching's pool, sink page included (RunnerConfig); 0: off


class ColocatedEngine:
    def __init__(self, model: LoadedModel, config: EngineConfig = EngineConfig()):
        self.model = model
        self.config = config
        self.runner = ModelRunner(model, RunnerConfig(
            page_size=config.page_size, num_pages=config.num_pages, max_batch=config.max_batch,
            max_prefill_batch=config.max_prefill_batch, attention_impl=config.attention_impl,
            prefix_cache_pages=config.prefix_cache_pages,
        ))
        self.allocator = PageAllocator(config.num_pages)
        self.scheduler = Scheduler(SchedulerConfig(
            max_batch=config.max_batch, max_prefill_batch=config.max_prefill_batch,
            max_prefill_tokens=config.max_prefill_tokens, page_size=config.page_size,
            max_model_len=model.config.max_model_len,
        ), self.allocator)
        self._text: dict[str, TextStream] = {}
        self._requests: dict[str, Request] = {}  # added and not yet released
        self._ids = itertools.count()

    # -- requests -------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        prompt_ids = params.truncated(prompt_ids, self.model.config.max_model_len)
        check_prompt_ids(prompt_ids, self.model.config.vocab_size)
        check_bias_ids(params, self.model.config.vocab_size, self.model.config.eos_token_ids)
        if params.structured_outputs is not None:
            self.runner.grammar.check(params)
        request = Request(request_id or f"req-{next(self._ids)}", prompt_ids, params.with_seed())
        self.scheduler.add(request)
        self._requests[request.request_id] = request
        self._text[request.request_id] = TextStream(self.model.tokenizer, request.prompt_ids, request.params.stop,
                                                    request.params.include_stop_str_in_output,
                                                    request.params.skip_special_tokens)
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stops a request wherever it is; its pages are free when this returns."""
        self.scheduler.abort(request_id)

    def is_finished(self, request_id: str) -> bool:
        return self._requests[request_id].finished

    def release(self, request_id: str) -> Completion:
        """Forgets a finished (or aborts an unfinished) request and returns its result."""
        if not self._requests[request_id].finished:
            self.abort(request_id)
        request = self._requests.pop(request_id)
        completion = self._completion(request)
        self._text.pop(request_id, None)
        return completion

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        plan = self.scheduler.schedule()
        events: list[TokenEvent] = []
        if plan.prefill:
            events += self._emit(plan.prefill, *self._run_prefill(plan.prefill))
        if plan.decode:
            events += self._emit(plan.decode, *self._run_decode(plan.decode), self.runner.grammar.take_failed())
        return events

    def _run_prefill(self, requests: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        (tokens, logprobs, prompt_logprobs), ks, vs, lengths = self.runner.prefill_sampled(
            [r.prompt_ids for r in requests], [r.params for r in requests], [0] * len(requests))
        self.runner.insert(ks, vs, [r.pages for r in requests], lengths)
        for request, entries, cached in zip(requests, prompt_logprobs, self.runner.last_cached_tokens):
            request.prompt_logprobs = entries
            request.cached_prompt_tokens = cached
        return tokens, logprobs

    def _run_decode(self, requests: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        return self.runner.decode_sampled(
            tokens=[r.output_ids[-1] for r in requests],
            positions=[r.num_tokens - 1 for r in requests],
            page_lists=[r.pages for r in requests],
            sampling=[r.params for r in requests],
            steps=[len(r.output_ids) for r in requests],
            request_ids=[r.request_id for r in requests],
            prompts=[r.prompt_ids for r in requests],
        )

    def _emit(self, requests: list[Request], tokens: list[int], logprobs: list[TokenLogprobs | None],
              failed: dict[str, str] | None = None) -> list[TokenEvent]:
        """`failed`: requests whose structured output failed in this step; they end with its error."""
        now = time.perf_counter()
        events = []
        for request, token, token_logprobs in zip(requests, tokens, logprobs):
            if failed and request.request_id in failed:
                request.finish_s = now
                self.scheduler.finish(request, FinishReason.ABORT)
                events.append(TokenEvent(request.request_id, token, "", FinishReason.ABORT,
                                         error=failed[request.request_id]))
                continue
            request.output_ids.append(token)
            if token_logprobs is not None:
                request.output_logprobs.append(token_logprobs)
            request.first_token_s = request.first_token_s or now
            reason = finish_reason_after_token(request, self.model.config.eos_token_ids)
            delta, stopped = self._text[request.request_id].add(token, stop_token=reason is FinishReason.STOP,
                                                                last=reason is not None,
                                                                find_stop=looks_for_stop_strings(request))
            if stopped:
                reason = FinishReason.STOP
            if reason is FinishReason.STOP:
                request.stop_reason = stop_reason(request, self.model.config.eos_token_ids,
                                                  self._text[request.request_id].stop_string)
            if reason is not None:
                request.finish_s = now
                self.scheduler.finish(request, reason)
            events.append(TokenEvent(request.request_id, token, delta, reason, token_logprobs))
        return events

    # -- convenience ----------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams) -> list[Completion]:
        """Runs every prompt to completion with continuous batching; results in input order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        request_ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return [self.release(rid) for rid in request_ids]

    def _completion(self, r: Request) -> Completion:
        return Completion(
            text=self._text[r.request_id].text, token_ids=list(r.output_ids), prompt_token_ids=list(r.prompt_ids),
            finish_reason=r.finish_reason.value, ttft_s=(r.first_token_s or r.arrival_s) - r.arrival_s,
            latency_s=(r.finish_s or r.arrival_s) - r.arrival_s,
            logprobs=list(r.output_logprobs) if r.params.logprobs is not None else None, stop_reason=r.stop_reason,
            prompt_logprobs=r.prompt_logprobs, cached_prompt_tokens=r.cached_prompt_tokens,
        )
