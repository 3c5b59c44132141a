"""Sends a workload to an OpenAI-compatible completions server over HTTP (splitserve's
openai-server, vLLM's, SGLang's) and times every streamed chunk, as driver.py does through the SDK.

Each request is `POST {base}/v1/completions` with the prompt (token ids, or the text), max_tokens,
`ignore_eos` (vLLM's extra field, which splitserve takes too), temperature 0, and a stream with
`include_usage`. Every chunk of the choice is an arrival (its text may be empty: a special token,
a part of a character). As in `vllm bench serve`, the
output length is the usage's `completion_tokens`: HTTP chunks do not say how many tokens each
holds, so every chunk counts one and the last one takes the difference (TPOT needs only the total;
ITL is the gaps between chunks either way). The prompt length is the usage's `prompt_tokens`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time

from splitserve.runtime.client import ModelInfo
from splitserve.runtime.serving_bench.metrics import RequestRecord
from splitserve.runtime.serving_bench.workloads import BenchRequest


@dataclasses.dataclass(frozen=True)
class OpenAITarget:
    """`base_url`: the server, e.g. http://127.0.0.1:8000 (a trailing /v1 is taken too); `model`: the
    served model's name; `info`: the model's facts (vocabulary, EOS ids, context) from its checkpoint."""

    base_url: str
    model: str
    info: ModelInfo
    api_key: str | None = None

    @property
    def v1(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def served_model(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> str:
    """The first model `GET /v1/models` lists (what `vllm bench serve` sends when not told)."""
    import urllib.request

    target = OpenAITarget(base_url, "", None, api_key)  # type: ignore[arg-type]
    request = urllib.request.Request(target.v1 + "/models", headers=target.headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        models = json.loads(reply.read())["data"]
    if not models:
        raise ValueError(f"{target.v1}/models lists no model")
    return models[0]["id"]


async def run(target: OpenAITarget, requests: list[BenchRequest], records: list[RequestRecord],
              limit: asyncio.Semaphore | None, timeout_s: float | None, bar) -> float:
    """Sends every request at its record's scheduled time; returns the run's wall time."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout,
                                     headers=target.headers) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(_one(session, target, req, rec, t0, limit, bar) for req, rec in zip(requests, records)))
        return time.perf_counter() - t0


async def _one(session, target: OpenAITarget, request: BenchRequest, record: RequestRecord, t0: float,
               limit: asyncio.Semaphore | None, bar) -> None:
    await asyncio.sleep(max(0.0, t0 + record.scheduled_s - time.perf_counter()))
    prompt = list(request.token_ids) if request.token_ids is not None else request.text
    body = {"model": target.model, "prompt": prompt, "max_tokens": request.output_len, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    async with limit or contextlib.nullcontext():
        record.start_s = time.perf_counter() - t0
        try:
            async with session.post(target.v1 + "/completions", json=body) as reply:
                if reply.status != 200:
                    record.error = f"HTTP {reply.status}: {(await reply.text())[:300]}"
                else:
                    await _read_stream(reply, record, t0)
        except Exception as e:  # noqa: BLE001 - one request's failure must not lose the run's records
            record.error = f"{type(e).__name__}: {e}"
        record.end_s = time.perf_counter() - t0
    bar.update(1)


async def _read_stream(reply, record: RequestRecord, t0: float) -> None:
    usage = None
    async for raw in reply.content:  # server-sent events: "data: {...}" lines
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            record.error = f"error event: {event['error'].get('message', event['error'])}"
            return
        if event.get("usage"):
            usage = event["usage"]
        if event.get("choices"):  # as vllm bench serve: any chunk of the choice, text or not
            record.chunk_s.append(time.perf_counter() - t0)
            record.chunk_tokens.append(1)
    if usage is None:
        record.error = "the stream ended without a usage chunk (stream_options.include_usage)"
        return
    record.prompt_len = usage["prompt_tokens"]  # what the server counted
    if record.chunk_tokens:
        record.chunk_tokens[-1] += usage["completion_tokens"] - len(record.chunk_tokens)
