"""Sends a workload to an OpenAI-compatible completions server over HTTP (splitserve's
openai-server, vLLM's, SGLang's) and times every streamed chunk, as driver.py does through the SDK.

Each request is `POST {base}/v1/completions` with the prompt (token ids, or the text), max_tokens,
`ignore_eos` (vLLM's extra field, which splitserve takes too), temperature 0, and a stream with
`include_usage`. As in `vllm bench serve`:
- every chunk with choices is an arrival (its text may be empty: a special token, part of a character);
- the latency ends at the last such chunk (not at the usage chunk or `[DONE]`);
- the output length is the usage's `completion_tokens`. HTTP chunks do not say how many tokens each
  holds, so the chunks count one each and the last takes the rest (TPOT needs only the total; ITL
  is the gaps between chunks either way). A stream without a usage chunk or `[DONE]` is a failure.
The prompt length is the usage's `prompt_tokens`. HTTPS is checked against the system's roots
(`SSL_CERT_FILE=ca.pem` for a private CA).
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


DEFAULT_TIMEOUT_S = 6 * 3600  # a request's whole time when --timeout is not given (vllm bench serve's)


def v1_url(base_url: str) -> str:
    """http://HOST:PORT[/v1][/] -> http://HOST:PORT/v1."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def bearer(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


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
        return v1_url(self.base_url)


def model_card(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> dict:
    """The first model `GET /v1/models` lists (its "id" is what `vllm bench serve` sends when not told;
    vLLM's and splitserve's cards carry "max_model_len"). ValueError naming the problem."""
    import urllib.error
    import urllib.request

    url = v1_url(base_url) + "/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=bearer(api_key)), timeout=timeout_s) as reply:
            models = json.loads(reply.read())["data"]
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise ValueError(f"cannot reach {url}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{url} did not answer with OpenAI's model list: {e}") from None
    if not models:
        raise ValueError(f"{url} lists no model")
    return models[0]


async def run(target: OpenAITarget, requests: list[BenchRequest], records: list[RequestRecord],
              limit: asyncio.Semaphore | None, timeout_s: float | None, bar) -> float:
    """Sends every request at its record's scheduled time; returns the run's wall time."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s or DEFAULT_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout,
                                     headers=bearer(target.api_key)) as session:
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
        # vllm bench serve's latency ends at the last chunk with choices, not after the usage and [DONE]
        record.end_s = record.chunk_s[-1] if record.success else time.perf_counter() - t0
    bar.update(1)


async def _read_stream(reply, record: RequestRecord, t0: float) -> None:
    usage, done = None, False
    async for raw in reply.content:  # server-sent events: "data: {...}" lines
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            record.error = f"error event: {error.get('message', error) if isinstance(error, dict) else error}"
            return
        if event.get("usage"):
            usage = event["usage"]
        if event.get("choices"):  # as vllm bench serve: any chunk of the choice, text or not
            record.chunk_s.append(time.perf_counter() - t0)
            record.chunk_tokens.append(1)
    if not done:
        record.error = "the stream ended before data: [DONE]"
        return
    if usage is None:
        record.error = "the stream had no usage chunk (the server ignored stream_options.include_usage)"
        return
    record.prompt_len = usage["prompt_tokens"]  # what the server counted
    record.chunk_tokens = spread(len(record.chunk_tokens), usage["completion_tokens"])


def spread(chunks: int, tokens: int) -> list[int]:
    """`tokens` over `chunks` arrivals: one each while they last, the rest on the last one."""
    counts = [1] * min(chunks, tokens) + [0] * max(chunks - tokens, 0)
    if counts:
        counts[-1] += tokens - sum(counts)
    return counts
