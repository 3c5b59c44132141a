"""An OpenAI-compatible HTTP server in front of a router, so that OpenAI's clients and tools work.

    POST /v1/completions, POST /v1/chat/completions   (streamed as server-sent events with "stream";
                                                       chat takes tools: runtime/openai_tools.py)
    GET  /v1/models, GET /health, GET /metrics (Prometheus: HTTPMetrics, runtime/metrics.py)

Bodies are read by runtime/openai_api.py (as vLLM reads them). Each prompt of a request is one
Generate call through the async SDK, n sequences included, so the router's validation, admission
and errors apply unchanged; a body with several prompts runs their calls at once (at most
openai_stream.WINDOW sequences at a time) and the first error answers it. A gRPC error becomes
the HTTP status a client of vLLM's server would get, with OpenAI's error body. A client that goes
away cancels its request on the router: `runner()` has aiohttp cancel the handler (not its
default), and leaving the SDK's stream cancels the call.

With an API key, /v1/ paths want `Authorization: Bearer KEY` (the same key the router wants).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Callable

import grpc
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from splitserve.runtime import openai_api, openai_logprobs
from splitserve.runtime.client import AsyncClient, sampling_kwargs
from splitserve.runtime.client_types import Chunk, ModelInfo, SequencesBuilder, SplitserveError
from splitserve.runtime.grpc_common import PUBLIC_MAX_MESSAGE_BYTES
from splitserve.runtime.metrics import HTTPMetrics
from splitserve.runtime.openai_stream import ChoiceCounts, StreamedChoices, merged
from splitserve.runtime.openai_tools import ToolAnswer
from splitserve.runtime.tool_parsers import PARSERS

HTTP_STATUS = {  # gRPC code -> HTTP status, as a client of vLLM's OpenAI server sees them
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 405: "MethodNotAllowedError", 413: "BadRequestError", 429: "RateLimitError"}


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return web.json_response(_error_body(status, message, param), status=status)


def _error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "BadRequestError" if 400 <= status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


_FIELD_PATH = re.compile(r"[a-z_]+(\[\d+\])*(\.[a-z_]+(\[\d+\])*)*")


def field_named(message: str) -> str | None:
    """The body field a reading error is about, for OpenAI's `param`: the one its message begins with
    ("temperature must be ...", "messages[1].content ...", "missing prompt", "unknown field foo")."""
    rest = re.sub(r"^(missing|unknown fields?) ", "", message)
    first = rest.split(" ", 1)[0].rstrip(":,")
    known = rest != message or re.split(r"[.\[]", first, maxsplit=1)[0] in openai_api.BODY_FIELDS
    return first if known and _FIELD_PATH.fullmatch(first) else None


ROUTES = ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health", "GET /metrics")
NO_ANSWER = "the router ended the call without an answer (is it shutting down?)"


def _sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class OpenAIServer:
    """`client`: an AsyncClient of the router; `model`: its ModelInfo; `served_name`: the model name
    requests may give and responses report (default: the router's)."""

    def __init__(self, client: AsyncClient, model: ModelInfo, *, api_key: str | None = None,
                 served_name: str | None = None, tokenizer=None, tool_call_parser: str | None = None):
        """`tokenizer`: the model's (models/tokenizer.py), to name tokens in logprobs by their text;
        without one they are "token_id:N". `tool_call_parser`: how the model writes tool calls
        (runtime/tool_parsers.py); without one, tool_choice "auto" is refused."""
        if tool_call_parser is not None and tool_call_parser not in PARSERS:
            raise ValueError(f"unknown tool call parser {tool_call_parser!r} (known: {', '.join(PARSERS)})")
        self.tool_call_parser = tool_call_parser
        self.client, self.model = client, model
        self.token_text = openai_logprobs.TokenText(tokenizer)
        self.name = served_name or model.name
        self._expected = f"Bearer {api_key}".encode() if api_key else None
        self._created = int(time.time())
        self.metrics = HTTPMetrics()

    def runner(self, shutdown_timeout_s: float = 60.0) -> web.AppRunner:
        """The app's runner. handler_cancellation: a client that disconnects cancels its handler, and so
        its router call, even while it waits for a non-streamed answer. On cleanup, requests in flight
        get `shutdown_timeout_s` to finish."""
        return web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                             shutdown_timeout=shutdown_timeout_s)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=PUBLIC_MAX_MESSAGE_BYTES,
                              middlewares=[self._measure, self._json_errors, self._auth])
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post(openai_api.COMPLETIONS, self.completions)
        app.router.add_post(openai_api.CHAT, self.chat_completions)
        return app

    @web.middleware
    async def _measure(self, request: web.Request, handler):
        """Counts every request by its route (an unknown path is "other": the label set stays bounded) and
        status; 499, as nginx logs it, when the handler was cancelled: its client went away (a stream whose
        write found the client gone ends normally, as 200: its status line went out), or shutdown's
        timeout ran out."""
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "other"
        started, status = time.perf_counter(), 500
        self.metrics.in_flight.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:  # aiohttp's own answers (404, 405)
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(handler=name, status=str(status)).inc()
            self.metrics.duration.labels(handler=name).observe(time.perf_counter() - started)

    async def prometheus(self, request: web.Request) -> web.Response:
        """Prometheus' text format, open as /health is (vLLM's /metrics is)."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))  # OpenMetrics when asked
        return web.Response(body=encoder(self.metrics.registry), headers={"Content-Type": content_type})

    @web.middleware
    async def _json_errors(self, request: web.Request, handler):
        """aiohttp's own 404 and 405 with OpenAI's error body (its plain text is no error to OpenAI's clients)."""
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as e:
            response = error_response(405, f"{request.method} is not allowed on {request.path} (allowed: "
                                           f"{', '.join(sorted(e.allowed_methods))})")
            response.headers["Allow"] = ",".join(sorted(e.allowed_methods))
            return response
        except web.HTTPNotFound:
            return error_response(404, f"no such path: {request.path} (served: {', '.join(ROUTES)})")

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self._expected is not None and request.path.startswith("/v1/"):
            sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(sent, self._expected):
                return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)")
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        """200 when the router serves, 503 otherwise (vLLM's /health)."""
        try:
            status = await self.client.health(timeout=5.0)
        except SplitserveError as e:
            return error_response(503, f"the router does not answer: {e.message or e.code.name}")
        return web.Response(status=200 if status == "SERVING" else 503, text=status)

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.name, "object": "model", "created": self._created, "owned_by": "splitserve",
                "root": self.model.name, "parent": None, "max_model_len": self.model.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, openai_api.COMPLETIONS)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, openai_api.CHAT)

    async def _serve(self, request: web.Request, url: str) -> web.StreamResponse:
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the body is larger than the {PUBLIC_MAX_MESSAGE_BYTES} bytes allowed")
        except (ValueError, LookupError, RecursionError) as e:  # not JSON, not UTF-8, a bad charset, too deep
            return error_response(400, f"the body is not valid JSON: {type(e).__name__}: {str(e)[:200]}")
        except web.RequestPayloadError as e:  # a bad Content-Encoding (gzip that is not), a cut-off body
            return error_response(400, f"the body could not be read: {e}")
        try:
            parsed = openai_api.parse_body(url, body)
        except ValueError as e:
            return error_response(400, str(e), field_named(str(e)))
        except RecursionError:  # nesting deep enough to defeat the messages that quote it
            return error_response(400, "the body is nested too deeply")
        if parsed.model is not None and parsed.model != self.name:
            return error_response(404, f"The model `{parsed.model}` does not exist (this server serves "
                                       f"`{self.name}`).")
        if parsed.echo and not self.token_text.has_tokenizer and any(isinstance(p, tuple) for p in parsed.prompts):
            return error_response(400, "echo of a prompt given as token ids needs the model's tokenizer "
                                       "(openai-server --tokenizer MODEL) to turn them into text")
        tool_answer = None
        if (tool_use := parsed.tool_use) is not None:
            if tool_use.choice == "auto" and self.tool_call_parser is None:
                return error_response(400, '"auto" tool choice needs the server to read tool calls: start it with '
                                           '--tool-call-parser (vLLM: --enable-auto-tool-choice --tool-call-parser)')
            tool_answer = functools.partial(ToolAnswer, tool_use, self.tool_call_parser)
        kwargs = sampling_kwargs(parsed.params)
        if tool_use is not None and tool_use.keeps_special_tokens(self.tool_call_parser):
            kwargs["skip_special_tokens"] = False
        if parsed.chat:
            tools = list(tool_use.tools) if tool_use is not None else None
            streams = [self.client.stream(messages=parsed.messages, tools=tools, **kwargs)]
        else:
            streams = [self.client.stream(p, **kwargs) if isinstance(p, str) else
                       self.client.stream(None, token_ids=p, **kwargs) for p in parsed.prompts]
        chunks = merged(streams, parsed.params.n)
        try:
            if parsed.stream:
                return await self._stream(request, parsed, chunks, tool_answer)
            return await self._complete(parsed, chunks, tool_answer)
        finally:
            await chunks.aclose()
            for stream in streams:
                await stream.aclose()  # cancels the call on the router if it has not ended

    async def _complete(self, parsed: openai_api.OpenAIRequest, chunks: AsyncIterator[tuple[int, Chunk]],
                        tool_answer: Callable[[], ToolAnswer] | None) -> web.Response:
        prompts = max(len(parsed.prompts), 1)  # chat: one "prompt", its messages
        counts = ChoiceCounts(prompts, parsed.params.n)
        builders = [SequencesBuilder(time.perf_counter(), parsed.params.n, parsed.params.prompt_logprobs is not None)
                    for _ in range(prompts)]
        try:
            async for prompt, chunk in chunks:
                builders[prompt].add(chunk, time.perf_counter())
                counts.add(prompt, chunk)
        except SplitserveError as e:
            return error_response(HTTP_STATUS.get(e.code, 500), e.message)
        if not counts.all_ended():
            return error_response(500, NO_ANSWER)
        groups = [b.build(time.perf_counter()) for b in builders]
        try:
            echo_texts = [openai_api.echo_text(p, g[0].prompt_token_ids, self.token_text)
                          for p, g in zip(parsed.prompts, groups)] if parsed.echo else None
            body = openai_api.completion_body(parsed.chat, self.name, groups, self.token_text, echo_texts,
                                              parsed.echo_only, tool_answer)
        except openai_logprobs.AnswerMismatch as e:
            return error_response(500, f"the answer could not be put together: {e}")
        return web.json_response(body)

    async def _stream(self, request: web.Request, parsed: openai_api.OpenAIRequest,
                      chunks: AsyncIterator[tuple[int, Chunk]],
                      tool_answer: Callable[[], ToolAnswer] | None) -> web.StreamResponse:
        out = openai_api.StreamChunks(parsed.chat, self.name, parsed.include_usage)
        try:  # the router refuses a bad request before its first token: that is still an HTTP error
            item = await anext(chunks)
        except SplitserveError as e:
            return error_response(HTTP_STATUS.get(e.code, 500), e.message)
        except StopAsyncIteration:
            return error_response(500, NO_ANSWER)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        choices = StreamedChoices(parsed, self.token_text, tool_answer)
        try:
            while True:
                if (choice := choices.choice(*item)) is not None:
                    await response.write(_sse(out.choice(**choice)))
                try:
                    item = await anext(chunks)
                except StopAsyncIteration:
                    break
            if not choices.counts.all_ended():  # the call ended before every choice did: not a success
                await self._write_quietly(response, _sse(_error_body(500, NO_ANSWER)), _sse("[DONE]"))
                return response
        except SplitserveError as e:  # after the first chunk: the status is sent; tell it in the stream
            await self._write_quietly(response, _sse(_error_body(HTTP_STATUS.get(e.code, 500), e.message)),
                                      _sse("[DONE]"))
            return response
        except openai_logprobs.AnswerMismatch as e:
            await self._write_quietly(response, _sse(_error_body(500, f"the answer could not be put together: {e}")),
                                      _sse("[DONE]"))
            return response
        except ConnectionResetError:  # the client went away between two chunks; the caller cancels the call
            return response
        usage = [_sse(out.usage(*choices.counts.usage()))] if parsed.include_usage else []
        await self._write_quietly(response, *usage, _sse("[DONE]"))
        return response

    @staticmethod
    async def _write_quietly(response: web.StreamResponse, *data: bytes) -> None:
        """The stream's last writes; a client already gone is no error of the server's."""
        try:
            for item in data:
                await response.write(item)
            await response.write_eof()
        except ConnectionResetError:
            pass
