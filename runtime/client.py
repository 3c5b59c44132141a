"""Python client SDK for a splitserve router: `Client` (blocking) and `AsyncClient` (asyncio).

    from splitserve.runtime.client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("The weather today is", max_tokens=16).text)

Every failure raises `SplitserveError` (gRPC status code + the server's message). A call
is retried only when that is safe: on UNAVAILABLE before the first token arrived, and only
while its deadline leaves time (the timeout bounds the call, retries included).
Closing a stream (leaving the loop, `close()`, or cancelling the task) cancels the
request on the server, which frees its KV pages at once.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.protos import serving_pb2, serving_pb2_grpc
from splitserve.runtime.client_types import (
    Chunk, Completion, CompletionBuilder, ModelInfo, SequencesBuilder, SplitserveError, TokenLogprobs, build_request,
    chunk_from_proto,
)
from splitserve.runtime.grpc_common import public_channel_options
from splitserve.runtime.sampling_params import SamplingParams

__all__ = ["Client", "AsyncClient", "Completion", "Chunk", "ModelInfo", "SplitserveError", "TokenLogprobs"]

RETRY_BACKOFF_S = (0.2, 0.5, 1.0)


def _retry_delay(error: grpc.RpcError, received: bool, attempt: int, max_retries: int,
                 end: float | None) -> float | None:
    """Seconds to wait before retrying, or None: only UNAVAILABLE before the first token is safe,
    and only if the call's deadline (`end`, time.monotonic()) is not reached by then."""
    if received or error.code() is not grpc.StatusCode.UNAVAILABLE or attempt >= max_retries:
        return None
    delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
    if end is not None and time.monotonic() + delay >= end:
        return None
    return delay


def _time_left(end: float | None) -> float | None:
    """The timeout for the next attempt: what is left of the whole call's deadline. A deadline already
    past is DEADLINE_EXCEEDED here: gRPC given a timeout of 0 may still finish a fast call on loopback."""
    if end is None:
        return None
    left = end - time.monotonic()
    if left <= 0:
        raise SplitserveError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's timeout passed before it was sent")
    return left


def _credentials(tls) -> grpc.ChannelCredentials | None:
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, (str, os.PathLike)):  # a PEM file of the CA that signed the router's certificate
        return grpc.ssl_channel_credentials(root_certificates=Path(tls).read_bytes())
    return tls  # a grpc.ChannelCredentials the caller built (client certificate, ...)


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class _Options:
    def __init__(self, address: str, api_key: str | None, tls, timeout: float | None, max_retries: int):
        if not address:
            raise ValueError("address is required, e.g. '127.0.0.1:50051'")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.address, self.timeout, self.max_retries = address, timeout, max_retries
        self.credentials = _credentials(tls)
        self.metadata = _metadata(api_key)

    def prepare(self, prompt, token_ids, messages, timeout,
                sampling) -> tuple[serving_pb2.GenerateRequest, float | None]:
        """The Generate request and its deadline (a time.monotonic() instant, or None), for the
        sync and async streams alike."""
        kw = _sampling_kwargs(**sampling)
        request_id = kw.pop("request_id", "") or uuid.uuid4().hex[:16]
        ids = list(token_ids) if token_ids is not None else None
        request = build_request(prompt, ids, messages=messages, request_id=request_id, **kw)
        timeout = timeout if timeout is not None else self.timeout
        return request, None if timeout is None else time.monotonic() + timeout


def _sampling_kwargs(max_tokens=16, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=(), stop_token_ids=(),
                     ignore_eos=False, min_tokens=0, logprobs=None, include_stop_str_in_output=False,
                     presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, truncate_prompt_tokens=None,
                     n=1, min_p=0.0, logit_bias=None, allowed_token_ids=None, prompt_logprobs=None,
                     structured_outputs=None, skip_special_tokens=True, tools=None, request_id=""):
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                stop=stop,
                stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, min_tokens=min_tokens, logprobs=logprobs,
                include_stop_str_in_output=include_stop_str_in_output, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                truncate_prompt_tokens=truncate_prompt_tokens, n=n, logit_bias=logit_bias,
                allowed_token_ids=allowed_token_ids, prompt_logprobs=prompt_logprobs,
                structured_outputs=structured_outputs, skip_special_tokens=skip_special_tokens, tools=tools,
                request_id=request_id)


def sampling_kwargs(params: SamplingParams) -> dict:
    """A SamplingParams as the sampling keyword arguments of stream / generate_n (n included)."""
    return dict(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k, min_p=params.min_p, seed=params.seed, stop=params.stop,
                stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos, min_tokens=params.min_tokens,
                logprobs=params.logprobs, include_stop_str_in_output=params.include_stop_str_in_output,
                presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                repetition_penalty=params.repetition_penalty, truncate_prompt_tokens=params.truncate_prompt_tokens,
                n=params.n, logit_bias=dict(params.logit_bias), allowed_token_ids=params.allowed_token_ids,
                prompt_logprobs=params.prompt_logprobs, structured_outputs=params.structured_outputs,
                skip_special_tokens=params.skip_special_tokens)


def _one_sequence(sampling: dict) -> None:
    if sampling.get("n", 1) != 1:
        raise ValueError(f"generate returns one completion: use generate_n for n={sampling['n']}")


class Client:
    """Blocking client.

    Args:
        address: the router, "host:port".
        api_key: sent as "authorization: Bearer KEY" on every call.
        tls: None/False for plaintext, True for TLS with the system roots, the path of a
            PEM file of the CA that signed the router's certificate, or a grpc.ChannelCredentials.
        timeout: default deadline in seconds for each call, its retries included (None: no deadline).
        max_retries: retries on UNAVAILABLE before the first token.

    Example:
        >>> with Client("127.0.0.1:50051") as client:              # doctest: +SKIP
        ...     for chunk in client.stream("Once upon", max_tokens=8):
        ...         print(chunk.text, end="", flush=True)
    """

    def __init__(self, address: str, *, api_key: str | None = None, tls=None, timeout: float | None = None,
                 max_retries: int = 2):
        self._opts = _Options(address, api_key, tls, timeout, max_retries)
        creds = self._opts.credentials
        options = public_channel_options()
        self._channel = (grpc.secure_channel(address, creds, options=options) if creds
                         else grpc.insecure_channel(address, options=options))
        self._stub = serving_pb2_grpc.ServingStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
               messages: Sequence[Mapping[str, str]] | None = None,
               timeout: float | None = None, **sampling) -> Iterator[Chunk]:
        """Yields a Chunk per streamed message; closing the iterator cancels the request.

        Example:
            >>> for chunk in Client("127.0.0.1:50051").stream(token_ids=[1, 5, 9], max_tokens=4):  # doctest: +SKIP
            ...     print(chunk.token_ids, chunk.finish_reason)
        """
        request, end = self._opts.prepare(prompt, token_ids, messages, timeout, sampling)
        for attempt in range(self._opts.max_retries + 1):
            call = self._stub.Generate(request, timeout=_time_left(end), metadata=self._opts.metadata)
            received = False
            try:
                for msg in call:
                    received = True
                    yield chunk_from_proto(msg)
                return
            except grpc.RpcError as e:
                delay = _retry_delay(e, received, attempt, self._opts.max_retries, end)
                if delay is None:
                    raise SplitserveError.from_rpc(e) from None
                time.sleep(delay)
            finally:
                call.cancel()  # no-op when finished; cancels on the server when the caller stopped early

    def generate(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                 messages: Sequence[Mapping[str, str]] | None = None,
                 timeout: float | None = None, **sampling) -> Completion:
        """One whole completion.

        Example:
            >>> out = Client("127.0.0.1:50051").generate("Hello", max_tokens=8, seed=1)  # doctest: +SKIP
            >>> out.finish_reason, len(out.token_ids)                                   # doctest: +SKIP
            ('length', 8)
        """
        _one_sequence(sampling)
        builder = CompletionBuilder(time.perf_counter(), sampling.get("prompt_logprobs") is not None)
        for chunk in self.stream(prompt, token_ids=token_ids, messages=messages, timeout=timeout, **sampling):
            builder.add(chunk, time.perf_counter())
        return builder.build(time.perf_counter())

    def generate_n(self, prompt: str | None = None, *, n: int, token_ids: Sequence[int] | None = None,
                   messages: Sequence[Mapping[str, str]] | None = None,
                   timeout: float | None = None, **sampling) -> list[Completion]:
        """n completions of one prompt (vLLM's and OpenAI's `n`), in index order; sequence i samples
        with seed + i. `stream(..., n=n)` gives the same chunks interleaved, each with its `index`."""
        builder = SequencesBuilder(time.perf_counter(), n, sampling.get("prompt_logprobs") is not None)
        for chunk in self.stream(prompt, token_ids=token_ids, messages=messages, timeout=timeout, n=n, **sampling):
            builder.add(chunk, time.perf_counter())
        return builder.build(time.perf_counter())

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model and the workers behind the router.

        Example:
            >>> Client("127.0.0.1:50051").model_info().max_model_len                     # doctest: +SKIP
            2048
        """
        wait = self._opts.timeout if timeout is None else timeout  # 0 is a deadline already past, not none
        wait = _time_left(None if wait is None else time.monotonic() + wait)
        try:
            reply = self._stub.ModelInfo(serving_pb2.ModelInfoRequest(), timeout=wait,
                                         metadata=self._opts.metadata)
        except grpc.RpcError as e:
            raise SplitserveError.from_rpc(e) from None
        return ModelInfo.from_proto(reply)

    def health(self, *, timeout: float | None = 5.0) -> str:
        """grpc.health.v1 status of the router: "SERVING", "NOT_SERVING", ...

        Example:
            >>> Client("127.0.0.1:50051").health()                                      # doctest: +SKIP
            'SERVING'
        """
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, metadata=self._opts.metadata)
        except grpc.RpcError as e:
            raise SplitserveError.from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class AsyncClient:
    """asyncio client with the same methods as Client (each a coroutine; stream is an async iterator).

    Example:
        >>> async def main():                                                 # doctest: +SKIP
        ...     async with AsyncClient("127.0.0.1:50051") as client:
        ...         async for chunk in client.stream("Once upon", max_tokens=8):
        ...             print(chunk.text, end="")
    """

    def __init__(self, address: str, *, api_key: str | None = None, tls=None, timeout: float | None = None,
                 max_retries: int = 2):
        self._opts = _Options(address, api_key, tls, timeout, max_retries)
        creds = self._opts.credentials
        options = public_channel_options()
        self._channel = (grpc.aio.secure_channel(address, creds, options=options) if creds
                         else grpc.aio.insecure_channel(address, options=options))
        self._stub = serving_pb2_grpc.ServingStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def stream(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                     messages: Sequence[Mapping[str, str]] | None = None,
                     timeout: float | None = None, **sampling) -> AsyncIterator[Chunk]:
        """Async iterator of Chunks; leaving the loop early cancels the request on the server."""
        import asyncio

        request, end = self._opts.prepare(prompt, token_ids, messages, timeout, sampling)
        for attempt in range(self._opts.max_retries + 1):
            call = self._stub.Generate(request, timeout=_time_left(end), metadata=self._opts.metadata)
            received = False
            try:
                async for msg in call:
                    received = True
                    yield chunk_from_proto(msg)
                return
            except grpc.RpcError as e:
                delay = _retry_delay(e, received, attempt, self._opts.max_retries, end)
                if delay is None:
                    raise SplitserveError.from_rpc(e) from None
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def generate(self, prompt: str | None = None, *, token_ids: Sequence[int] | None = None,
                       messages: Sequence[Mapping[str, str]] | None = None,
                       timeout: float | None = None, **sampling) -> Completion:
        _one_sequence(sampling)
        builder = CompletionBuilder(time.perf_counter(), sampling.get("prompt_logprobs") is not None)
        async for chunk in self.stream(prompt, token_ids=token_ids, messages=messages, timeout=timeout, **sampling):
            builder.add(chunk, time.perf_counter())
        return builder.build(time.perf_counter())

    async def generate_n(self, prompt: str | None = None, *, n: int, token_ids: Sequence[int] | None = None,
                         messages: Sequence[Mapping[str, str]] | None = None,
                         timeout: float | None = None, **sampling) -> list[Completion]:
        """As Client.generate_n."""
        builder = SequencesBuilder(time.perf_counter(), n, sampling.get("prompt_logprobs") is not None)
        async for chunk in self.stream(prompt, token_ids=token_ids, messages=messages, timeout=timeout, n=n,
                                       **sampling):
            builder.add(chunk, time.perf_counter())
        return builder.build(time.perf_counter())

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        wait = self._opts.timeout if timeout is None else timeout  # 0 is a deadline already past, not none
        wait = _time_left(None if wait is None else time.monotonic() + wait)
        try:
            reply = await self._stub.ModelInfo(serving_pb2.ModelInfoRequest(), timeout=wait,
                                               metadata=self._opts.metadata)
        except grpc.RpcError as e:
            raise SplitserveError.from_rpc(e) from None
        return ModelInfo.from_proto(reply)

    async def health(self, *, timeout: float | None = 5.0) -> str:
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, metadata=self._opts.metadata)
        except grpc.RpcError as e:
            raise SplitserveError.from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
