"""Sends a workload to a router through the SDK's AsyncClient and times every streamed chunk
(or, for an OpenAITarget, to an OpenAI-compatible server over HTTP: openai_driver.py).

One asyncio task per request sleeps until its arrival offset, waits for a slot when
--max-concurrency is set (as vLLM does, its timing starts once it has one), then streams
it with ignore_eos. No retries: a failed request is recorded with its error, not hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import numpy as np

from splitserve.runtime.client import AsyncClient, Client, ModelInfo, SplitserveError
from splitserve.runtime.serving_bench import openai_driver
from splitserve.runtime.serving_bench.arrivals import arrival_offsets
from splitserve.runtime.serving_bench.metrics import RequestRecord
from splitserve.runtime.serving_bench.openai_driver import OpenAITarget
from splitserve.runtime.serving_bench.workloads import BenchRequest


@dataclasses.dataclass(frozen=True)
class Arrivals:
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def __post_init__(self):
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")


@dataclasses.dataclass
class RunResult:
    request_rate: float
    duration_s: float
    records: list[RequestRecord]


Target = str | OpenAITarget  # a router's HOST:PORT, or an OpenAI-compatible server


def fetch_model_info(target: Target, timeout_s: float = 30.0) -> ModelInfo:
    if isinstance(target, OpenAITarget):
        return target.info
    with Client(target, timeout=timeout_s) as client:
        return client.model_info()


def run_workload(target: Target, requests: list[BenchRequest], arrivals: Arrivals, *, seed: int,
                 timeout_s: float | None = None, progress: bool = False) -> RunResult:
    offsets = arrival_offsets(len(requests), arrivals.request_rate, arrivals.burstiness, np.random.default_rng(seed))
    return asyncio.run(_run(target, requests, offsets, arrivals, timeout_s, progress))


async def _run(target: Target, requests, offsets, arrivals: Arrivals, timeout_s, progress) -> RunResult:
    from tqdm import tqdm

    records = [RequestRecord(i, r.kind, r.prompt_len, r.output_len, float(offsets[i])) for i, r in enumerate(requests)]
    limit = asyncio.Semaphore(arrivals.max_concurrency) if arrivals.max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, unit="req", leave=False)
    if isinstance(target, OpenAITarget):
        duration = await openai_driver.run(target, requests, records, limit, timeout_s, bar)
    else:
        async with AsyncClient(target, timeout=timeout_s, max_retries=0) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(_one(client, req, rec, t0, limit, bar) for req, rec in zip(requests, records)))
            duration = time.perf_counter() - t0
    bar.close()
    return RunResult(arrivals.request_rate, duration, records)


async def _one(client: AsyncClient, request: BenchRequest, record: RequestRecord, t0: float,
               limit: asyncio.Semaphore | None, bar) -> None:
    await asyncio.sleep(max(0.0, t0 + record.scheduled_s - time.perf_counter()))
    async with limit or contextlib.nullcontext():
        record.start_s = time.perf_counter() - t0
        prompt = dict(token_ids=list(request.token_ids)) if request.token_ids is not None else dict(prompt=request.text)
        try:
            async for chunk in client.stream(**prompt, max_tokens=request.output_len, ignore_eos=True):
                now = time.perf_counter() - t0
                if chunk.prompt_token_ids:
                    record.prompt_len = len(chunk.prompt_token_ids)  # what the server counted
                if chunk.token_ids:
                    record.chunk_s.append(now)
                    record.chunk_tokens.append(len(chunk.token_ids))
        except SplitserveError as e:
            record.error = str(e)
        except Exception as e:  # noqa: BLE001 - one request's failure must not lose the run's records
            record.error = f"{type(e).__name__}: {e}"
        record.end_s = time.perf_counter() - t0
    bar.update(1)
