"""The SDK streams of one OpenAI request, as one: a completions body with several prompts is one
call per prompt (runtime/openai_server.py), and its choices are numbered across them.

    merged(streams)   (place, chunk) from every stream as each chunk comes; at most WINDOW
                      sequences at a time, so that one body does not take every admission place
                      of the router (each sequence takes one; the router refuses past its limit)
    ChoiceCounts      which choices began and ended, each prompt's ids, the tokens for the usage
    StreamedChoices   each chunk as a streamed choice (with echo, a choice's first one begins
                      with its prompt's text and logprobs)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from splitserve.runtime import openai_api, openai_logprobs, openai_tools
from splitserve.runtime.client_types import Chunk, SplitserveError
from splitserve.runtime.logprobs import TokenLogprobs

WINDOW = 64  # sequences of one body in flight at once


def _cancelled_under_it() -> SplitserveError:
    return SplitserveError(grpc.StatusCode.CANCELLED, "the call was cancelled under the server (its channel closed)")


async def merged(streams: list[AsyncIterator[Chunk]], n: int = 1) -> AsyncIterator[tuple[int, Chunk]]:
    """(the stream's place, chunk) as chunks come, each stream of `n` sequences; the first error ends
    it. The caller closes the streams; closing this stops the tasks that read them. A single stream
    is read directly, so gRPC's flow control reaches a slow client as it does without this. A call
    cancelled under its stream (its channel closed) ends it with CANCELLED, as any error."""
    if len(streams) == 1:
        try:
            async for chunk in streams[0]:
                yield 0, chunk
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or getattr(task, "cancelling", lambda: 1)():  # this task is cancelled (3.10: assume so)
                raise
            raise _cancelled_under_it() from None
        return
    window = asyncio.Semaphore(max(1, WINDOW // n))  # an SDK stream starts its call when first read
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))  # readers wait for a slow client
    ended = object()
    closing = False

    async def read(place: int, stream: AsyncIterator[Chunk]) -> None:
        async with window:
            try:
                async for chunk in stream:
                    await queue.put((place, chunk, None))
            except asyncio.CancelledError:
                if closing:  # this generator is being closed: the reader just stops
                    raise
                # The call was cancelled under the stream (its channel closed): an error, not a silent end
                await queue.put((place, None, _cancelled_under_it()))
            except Exception as e:  # noqa: BLE001 - the caller hears it, whatever it is
                await queue.put((place, None, e))
            else:
                await queue.put((place, ended, None))

    tasks = [asyncio.create_task(read(place, stream)) for place, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            place, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is ended:
                running -= 1
            else:
                yield place, chunk
    finally:
        closing = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ChoiceCounts:
    """Counts one request's chunks: choice prompt * n + sequence, as vLLM numbers them."""

    def __init__(self, prompts: int, n: int):
        self.n, self.choices = n, prompts * n
        self.started: set[int] = set()
        self.ended: set[int] = set()
        # Each prompt's ids as the router read them (truncate_prompt_tokens applied) and, when asked,
        # its prompt logprobs: both come on its call's first chunk only.
        self.prompt_ids: dict[int, list[int]] = {}
        self.prompt_logprobs: dict[int, list[TokenLogprobs]] = {}
        self.cached_tokens: dict[int, int] = {}  # each prompt's first sequence's, as the usage counts prompts once
        self.completion_tokens = 0

    def add(self, prompt: int, chunk: Chunk) -> tuple[int, bool]:
        """(the chunk's choice, whether it is that choice's first chunk)."""
        index = prompt * self.n + chunk.index
        first = index not in self.started
        self.started.add(index)
        self.prompt_ids.setdefault(prompt, chunk.prompt_token_ids)
        if chunk.index == 0 and chunk.cached_prompt_tokens:
            self.cached_tokens[prompt] = chunk.cached_prompt_tokens
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs.setdefault(prompt, chunk.prompt_logprobs)
        self.completion_tokens += len(chunk.token_ids)
        if chunk.finish_reason is not None:
            self.ended.add(index)
        return index, first

    def all_ended(self) -> bool:
        return len(self.ended) == self.choices

    def usage(self) -> tuple[int, int, int]:
        """(prompt tokens, each prompt once; completion tokens; cached prompt tokens)."""
        return (sum(len(ids) for ids in self.prompt_ids.values()), self.completion_tokens,
                sum(self.cached_tokens.values()))


class StreamedChoices:
    """Turns each chunk into the arguments of StreamChunks.choice, logprobs and echo included."""

    def __init__(self, parsed: openai_api.OpenAIRequest, token_text: openai_logprobs.TokenText,
                 tool_answer: Callable[[], openai_tools.ToolAnswer] | None = None):
        """`tool_answer`: a chat with tools, a reader of each choice's calls."""
        self.parsed, self.token_text = parsed, token_text
        self.counts = ChoiceCounts(max(len(parsed.prompts), 1), parsed.params.n)  # chat: one "prompt"
        self._logprobs: dict[int, openai_logprobs.ChoiceLogprobs] = {}  # by choice, when the request asked
        self._tool_answer = tool_answer
        self._answers: dict[int, openai_tools.ToolAnswer] = {}  # by choice, with tools

    def choice(self, prompt: int, chunk: Chunk) -> dict | None:
        """StreamChunks.choice's arguments for the chunk, or None when it shows nothing."""
        parsed = self.parsed
        index, first = self.counts.add(prompt, chunk)
        echo = parsed.echo and first
        text = "" if parsed.echo_only else chunk.text
        part = None
        if chunk.logprobs is not None:  # every token's logprobs go out, text or not
            choice_logprobs = self._logprobs.setdefault(
                index, openai_logprobs.ChoiceLogprobs(parsed.chat, self.token_text))
            parts = []
            if echo:
                parts.append(choice_logprobs.prompt_part(self.counts.prompt_ids[prompt],
                                                         self.counts.prompt_logprobs.get(prompt, [])))
            if not parsed.echo_only:
                parts.append(choice_logprobs.part(chunk.token_ids, chunk.logprobs))
            part = openai_logprobs.joined(parts) if parts else None
        if echo:
            text = openai_api.echo_text(parsed.prompts[prompt], self.counts.prompt_ids[prompt], self.token_text) + text
        finish_reason, calls = chunk.finish_reason, []
        if self._tool_answer is not None:
            if index not in self._answers:
                self._answers[index] = self._tool_answer()
            answer = self._answers[index]
            text, calls = answer.feed(text)
            if finish_reason is not None:
                more, rest = answer.finish()
                text, calls, finish_reason = text + more, calls + rest, answer.finish_reason(finish_reason)
        if not (text or finish_reason is not None or first or part or calls):
            return None
        return dict(index=index, text=text, finish_reason=finish_reason, stop_reason=chunk.stop_reason,
                    first=first, logprobs=part, tool_calls=calls)
