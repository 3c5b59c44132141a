"""Offline batch inference: a JSONL file of requests through one engine or a running router.

    requests = read_requests(input)       # every line -> BatchRequest | BadLine, unique ids
    done     = recover_output(output)     # cut a torn tail; the ids a previous run finished
    bad lines not yet done -> {"id", "error"} lines at once
    backend.run(the rest, recorder)       # recorder appends one line per finished request

Backends:
- InProcessBackend: ONE ColocatedEngine with continuous batching. Up to `max_in_flight`
  requests are added at a time (twice the engine's batch by default, so the scheduler
  always has the next ones waiting when a slot or pages free up); each step() emits
  tokens, and a request that finishes is released and written at once, so its line is
  on disk while the rest keep running. A line with n > 1 is n engine requests (sequence i
  with seed + i, as the router runs them), written when the last of them finishes. A
  request the engine rejects (ValueError: empty, token ids outside the vocabulary, longer
  than the context or the page pool) becomes an error line, as does a chat the model's
  template refuses (or a model without one).
- RemoteBackend: `concurrency` threads each run Client.generate_n; the calling thread
  writes lines as calls complete (one writer, no lock). INVALID_ARGUMENT/OUT_OF_RANGE/
  FAILED_PRECONDITION describe the request and become error lines; any other failure (router down, deadline)
  stops the run with BatchAborted, so a re-run retries those requests instead of
  recording a transient failure as the answer.

Crash safety lives in batch_io: each line is one append, and the next run cuts a torn
tail and skips the ids present, so after any crash no request is repeated and none lost.
Test with a small model: run a file, kill -9 mid-way, re-run, compare with the engine.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from splitserve.runtime.batch_io import BadLine, BatchRequest, read_requests
from splitserve.runtime.batch_output import NativeOutput, OpenAIOutput, ResultWriter, recover_output
from splitserve.runtime.request import Completion


class BatchAborted(RuntimeError):
    """A failure that is not about one request (e.g. the router went away): stop, resume later."""


@dataclasses.dataclass
class BatchStats:
    done: int = 0  # results written by this run
    errors: int = 0  # error lines written by this run
    skipped: int = 0  # lines already in the output file
    output_tokens: int = 0
    wall_s: float = 0.0  # from the first line written to the last (model load excluded)

    @property
    def requests_per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary_line(self) -> str:
        return (f"batch: {self.done} done, {self.errors} errors, {self.skipped} skipped (already in the output), "
                f"{self.output_tokens} output tokens in {self.wall_s:.2f} s: {self.requests_per_s:.2f} requests/s, "
                f"{self.tokens_per_s:.1f} tokens/s")

    def to_json_dict(self) -> dict:
        return dict(dataclasses.asdict(self), requests_per_s=self.requests_per_s, tokens_per_s=self.tokens_per_s)


class Recorder:
    """Writes each outcome as one output line and counts it (stats and progress bar)."""

    def __init__(self, writer: ResultWriter, stats: BatchStats, bar: tqdm,
                 output: NativeOutput | OpenAIOutput = NativeOutput()):
        self._writer, self.stats, self._bar, self._output = writer, stats, bar, output
        self._start = time.perf_counter()

    def completed(self, request: BatchRequest, completions: list[Completion]) -> None:
        """`completions`: the request's n, in index order."""
        self._writer.write(self._output.result(request, completions))
        self.stats.done += 1
        self.stats.output_tokens += sum(len(c.token_ids) for c in completions)
        self._tick()

    def error(self, request_id, line: int, message: str) -> None:
        self._writer.write(self._output.error(request_id, f"line {line}: {message}"))
        self.stats.errors += 1
        self._tick()

    def _tick(self) -> None:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{self.stats.output_tokens / elapsed:.1f} tok/s, {self.stats.errors} errors",
                                  refresh=False)
        self._bar.update(1)


@dataclasses.dataclass
class _Sequences:
    """A request's n completions as they finish (None until then)."""

    request: BatchRequest
    completions: list[Completion | None]
    error: str | None = None  # a sequence that stopped unfinished makes the line an error line


class Backend(Protocol):
    def run(self, requests: list[BatchRequest], recorder: Recorder) -> None: ...


def run_batch(input_path: str | Path, output_path: str | Path, backend: Backend, *,
              progress: bool = True, output: NativeOutput | OpenAIOutput = NativeOutput()) -> BatchStats:
    """Runs every line of `input_path` not yet in `output_path`; appends one line per input line,
    shaped by `output` (splitserve's lines, or the OpenAI Batch API's)."""
    if Path(output_path).exists() and os.path.samefile(input_path, output_path):
        raise ValueError(f"--output {output_path} is the input file: results go to a file of their own")
    items = read_requests(input_path)
    done = recover_output(output_path, openai=isinstance(output, OpenAIOutput))
    todo = [item for item in items if item.id not in done]
    stats = BatchStats(skipped=len(items) - len(todo))
    with ResultWriter(output_path) as writer, tqdm(total=len(todo), unit="req", file=sys.stderr,
                                                  disable=not progress, dynamic_ncols=True) as bar:
        recorder = Recorder(writer, stats, bar, output)
        start = time.perf_counter()
        try:
            for bad in (item for item in todo if isinstance(item, BadLine)):
                recorder.error(bad.id, bad.line, bad.error)
            runnable = []
            for request in (item for item in todo if isinstance(item, BatchRequest)):
                if (why := output.refuses(request)) is not None:
                    recorder.error(request.id, request.line, why)
                else:
                    runnable.append(output.prepared(request))
            backend.run(runnable, recorder)
        finally:
            stats.wall_s = time.perf_counter() - start
    return stats


class InProcessBackend:
    def __init__(self, engine, max_in_flight: int | None = None):
        """engine: a ColocatedEngine. max_in_flight: engine requests added at once (default 2x its
        batch; a line with n sequences adds all n, so up to n - 1 past it)."""
        self.engine = engine
        self.max_in_flight = max_in_flight or 2 * engine.config.max_batch

    def run(self, requests: list[BatchRequest], recorder: Recorder) -> None:
        prompts = []
        for request in requests:
            try:
                prompt_ids = request.params.truncated(self._prompt_ids(request), self.engine.model.config.max_model_len)
                prompts.append((prompt_ids, request))
            except ValueError as e:
                recorder.error(request.id, request.line, str(e))
        # The whole file is known: admit in prompt-length order. A prefill batch is padded to its
        # longest prompt and a decode step's page table to its longest context, so neighbours of
        # similar length waste least. Results are written as they finish, in any order anyway.
        prompts.sort(key=lambda item: len(item[0]))
        queue = collections.deque(prompts)
        in_flight: dict[str, tuple[_Sequences, int]] = {}  # engine request id -> its request's sequences, index
        while queue or in_flight:
            self._fill(queue, in_flight, recorder)
            if in_flight and not self.engine.has_unfinished():
                raise RuntimeError(f"engine idle with {len(in_flight)} requests in flight")
            for event in self.engine.step() if in_flight else ():
                if event.finish_reason is not None:
                    sequences, index = in_flight.pop(event.request_id)
                    sequences.completions[index] = self.engine.release(event.request_id)
                    sequences.error = sequences.error or event.error
                    if all(c is not None for c in sequences.completions):
                        if sequences.error:
                            recorder.error(sequences.request.id, sequences.request.line, sequences.error)
                        else:
                            recorder.completed(sequences.request, sequences.completions)

    def _fill(self, queue: collections.deque, in_flight: dict, recorder: Recorder) -> None:
        while queue and len(in_flight) < self.max_in_flight:
            prompt_ids, request = queue.popleft()
            params = request.params.with_seed()  # n > 1: sequence i samples with seed + i, as the router's
            sequences = _Sequences(request, [None] * params.n)
            added = []
            try:
                for index in range(params.n):
                    added.append(self.engine.add_request(prompt_ids, params.child(index) if params.n > 1 else params))
                    in_flight[added[-1]] = (sequences, index)
            except ValueError as e:
                for engine_id in added:
                    del in_flight[engine_id]
                    self.engine.release(engine_id)
                recorder.error(request.id, request.line, str(e))

    def _prompt_ids(self, request: BatchRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        tokenizer = self.engine.model.tokenizer
        if tokenizer is None:
            raise ValueError("the model has no tokenizer: give prompt_token_ids instead of prompt")
        if request.messages is None:
            return tokenizer.encode(request.prompt)
        template = self.engine.model.chat_template
        if template is None:
            raise ValueError("the model has no chat template (chat_template.jinja or tokenizer_config.json's "
                             "chat_template): give the prompt as text")
        # The rendered text holds the template's special tokens already (as the router does).
        return tokenizer.encode(template.render(request.messages, tools=_tools(request)), add_special_tokens=False)


# A busy router (RESOURCE_EXHAUSTED: at its admission limit, or no KV pages within its wait) is
# asked again after these waits, the last repeated, for up to BUSY_PATIENCE_S per request: a
# batch is not in a hurry, and stopping it would leave the rest of the file for a re-run.
BUSY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
BUSY_PATIENCE_S = 600.0


class RemoteBackend:
    def __init__(self, client, concurrency: int = 32, *, busy_backoff_s=BUSY_BACKOFF_S,
                 busy_patience_s: float = BUSY_PATIENCE_S):
        """client: a splitserve.runtime.client.Client (thread-safe); concurrency: calls in flight."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.client, self.concurrency = client, concurrency
        self.busy_backoff_s, self.busy_patience_s = busy_backoff_s, busy_patience_s

    def run(self, requests: list[BatchRequest], recorder: Recorder) -> None:
        import grpc

        from splitserve.runtime.client import SplitserveError

        # The request's own fault (FAILED_PRECONDITION: text or a chat for a model without a
        # tokenizer or chat template): the same answer on any retry, so it is the line's result.
        request_errors = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                          grpc.StatusCode.FAILED_PRECONDITION)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="batch") as pool:
            futures = {pool.submit(self._generate, r): r for r in requests}
            try:
                for future in as_completed(futures):
                    request = futures[future]
                    try:
                        completions = future.result()
                    except SplitserveError as e:
                        if e.code not in request_errors:
                            raise BatchAborted(f"request {request.id!r} (line {request.line}) failed: {e}") from e
                        recorder.error(request.id, request.line, f"{e.code.name}: {e.message}")
                    else:
                        recorder.completed(request, completions)
            finally:
                for future in futures:
                    future.cancel()  # no-op for finished ones; queued ones never start

    def _generate(self, request: BatchRequest) -> list[Completion]:
        import grpc

        from splitserve.runtime.client import SplitserveError

        give_up = time.monotonic() + self.busy_patience_s
        for attempt in itertools.count():
            try:
                return self._generate_once(request)
            except SplitserveError as e:
                wait_s = self.busy_backoff_s[min(attempt, len(self.busy_backoff_s) - 1)]
                if e.code is not grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() + wait_s > give_up:
                    raise
                time.sleep(wait_s)
        raise AssertionError("unreachable")

    def _generate_once(self, request: BatchRequest) -> list[Completion]:
        from splitserve.runtime.client import sampling_kwargs

        token_ids = list(request.prompt_token_ids) if request.prompt_token_ids is not None else None
        return self.client.generate_n(request.prompt, token_ids=token_ids, messages=request.messages,
                                      tools=_tools(request), **sampling_kwargs(request.params))


def _tools(request: BatchRequest) -> list[dict] | None:
    """The tools an OpenAI chat line gives its template (runtime/openai_tools.py), or None."""
    return list(request.tool_use.tools) if request.tool_use is not None else None
