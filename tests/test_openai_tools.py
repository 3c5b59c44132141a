"""Tool calls through the OpenAI-compatible server, read by OpenAI's own client: the server on a real
HTTP port in front of a scripted router (the model's answer is the script), so that every form of
answer can be served. tests/test_openai_server.py serves tools from a launched stack."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from splitserve.runtime.client_types import Chunk, ModelInfo
from splitserve.runtime.openai_server import OpenAIServer
from test_tool_calls import TOOLS, hermes_call

MODEL = ModelInfo("m", "qwen2", 100, 64, "float32", 8, [2], [], "disaggregated", True)
ASK = [{"role": "user", "content": "Weather in Paris, and the time?"}]
CALLS_TEXT = ("Let me look.\n" + hermes_call("get_weather", {"city": "Paris", "unit": "C"}) + "\n"
              + hermes_call("now", {}))


class ScriptedRouter:
    """Answers every call with `texts` (one per sequence of n, the last repeated) in pieces of `piece`
    characters, one token each, the sequences' chunks interleaved, then "stop" for each."""

    def __init__(self, *texts: str, piece: int = 3):
        self.texts, self.piece, self.asked = texts, piece, []

    async def stream(self, prompt=None, *, token_ids=None, messages=None, n=1, **kwargs):
        self.asked.append({"messages": messages, "n": n, **kwargs})
        texts = [self.texts[min(i, len(self.texts) - 1)] for i in range(n)]
        pieces = [[t[i:i + self.piece] for i in range(0, len(t), self.piece)] for t in texts]
        for step in range(max(map(len, pieces))):
            for index, mine in enumerate(pieces):
                if step < len(mine):
                    yield Chunk([10 + step], mine[step], None, [1, 2, 3] if step == 0 else [], index=index)
        for index in range(n):
            yield Chunk([2], "", "stop", [], index=index)


def served(router: ScriptedRouter, requests, tool_call_parser: str | None = "hermes"):
    """Each of `requests` (coroutines of an AsyncOpenAI client) against a server in front of `router`."""
    async def main():
        server = OpenAIServer(router, MODEL, tool_call_parser=tool_call_parser)
        runner = server.runner()
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                          max_retries=0) as client:
                return [await r(client) for r in requests]
        finally:
            await runner.cleanup()
    return asyncio.run(main())


async def streamed(client, raw: list | None = None, **body):
    """(content, tool calls, finish_reason) of a streamed chat's choice 0, put together as OpenAI's
    clients do: a call's first delta has its id and name, later ones of the same index add to its
    arguments. `raw` gets every choice's deltas."""
    content, calls, finish = "", {}, None
    async for chunk in await client.chat.completions.create(model="m", messages=ASK, stream=True, **body):
        for choice in chunk.choices:
            if raw is not None:
                raw.append((choice.index, choice.delta, choice.finish_reason))
        choice = next((c for c in chunk.choices if c.index == 0), None)
        if choice is None:
            continue
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] = call["name"] or delta.function.name
            call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_auto_calls_are_read_whole_and_streamed_alike():
    router = ScriptedRouter(CALLS_TEXT)
    whole, (content, calls, finish) = served(router, [
        lambda c: c.chat.completions.create(model="m", messages=ASK, tools=TOOLS),
        lambda c: streamed(c, tools=TOOLS)])
    message = whole.choices[0].message
    assert message.content == "Let me look.\n" and whole.choices[0].finish_reason == "tool_calls"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("now", {})]
    assert all(t.type == "function" and t.id.startswith("chatcmpl-tool-") for t in message.tool_calls)
    assert content == message.content and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls]
    assert all(c["id"].startswith("chatcmpl-tool-") for c in calls)
    # The router was asked for the chat with the tools, for its template; nothing forced the answer,
    # and the text keeps special tokens (some checkpoints make <tool_call> one), as vLLM's hermes asks.
    assert all(a["tools"] == TOOLS and a["messages"] == tuple(ASK) and a["structured_outputs"] is None
               and a["skip_special_tokens"] is False for a in router.asked)


def test_an_answer_without_calls_is_content_and_none_reads_no_calls():
    plain = ScriptedRouter("It is sunny <tool_ maybe.")
    whole, (content, calls, finish) = served(plain, [
        lambda c: c.chat.completions.create(model="m", messages=ASK, tools=TOOLS),
        lambda c: streamed(c, tools=TOOLS)])
    assert whole.choices[0].message.content == content == "It is sunny <tool_ maybe."
    assert not whole.choices[0].message.tool_calls and not calls
    assert whole.choices[0].finish_reason == finish == "stop"
    none, = served(ScriptedRouter(CALLS_TEXT), [
        lambda c: c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none")])
    assert none.choices[0].message.content == CALLS_TEXT and not none.choices[0].message.tool_calls


def test_auto_without_a_parser_is_refused_and_says_which_flag():
    router = ScriptedRouter(CALLS_TEXT)
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
        served(router, [lambda c: c.chat.completions.create(model="m", messages=ASK, tools=TOOLS)],
               tool_call_parser=None)
    assert router.asked == []


def test_a_named_function_streams_its_arguments_and_forces_them_to_its_schema():
    arguments = '{"city": "Rome", "unit": "F"}'
    router = ScriptedRouter(arguments, piece=4)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    raw = []
    whole, (content, calls, finish) = served(router, [
        lambda c: c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=choice),
        lambda c: streamed(c, raw, tools=TOOLS, tool_choice=choice)], tool_call_parser=None)
    # As OpenAI streams a call: the first delta names it, the next ones carry its arguments' text.
    deltas = [d.tool_calls[0] for _, d, _ in raw if d.tool_calls]
    assert len(deltas) == len(arguments) // 4 + 1 and all(d.index == 0 for d in deltas)
    assert deltas[0].id.startswith("chatcmpl-tool-") and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather" and deltas[0].function.arguments == arguments[:4]
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert all(d.content is None for _, d, _ in raw if d.tool_calls)  # null beside calls, as OpenAI's
    message = whole.choices[0].message
    assert message.content is None and whole.choices[0].finish_reason == "stop"
    assert [(t.function.name, t.function.arguments) for t in message.tool_calls] == [("get_weather", arguments)]
    assert content == "" and finish == "stop" and [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", arguments)]
    forced = [json.loads(a["structured_outputs"].json) for a in router.asked]
    assert forced == [TOOLS[0]["function"]["parameters"]] * 2
    assert all(a["skip_special_tokens"] is True for a in router.asked)  # no parser reads this text


def test_required_reads_the_list_of_calls_it_forced():
    text = '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    router = ScriptedRouter(text, piece=5)
    whole, (content, calls, finish) = served(router, [
        lambda c: c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required"),
        lambda c: streamed(c, tools=TOOLS, tool_choice="required")], tool_call_parser=None)
    want = [("now", {}), ("get_weather", {"city": "Oslo"})]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in whole.choices[0].message.tool_calls] == want
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want
    assert whole.choices[0].finish_reason == finish == "tool_calls" and content == ""
    assert all(json.loads(a["structured_outputs"].json)["minItems"] == 1 for a in router.asked)


def test_each_of_n_choices_reads_its_own_calls():
    router = ScriptedRouter(CALLS_TEXT, "No call here.", piece=2)
    raw = []
    whole, _ = served(router, [
        lambda c: c.chat.completions.create(model="m", messages=ASK, tools=TOOLS, n=2),
        lambda c: streamed(c, raw, tools=TOOLS, n=2)])
    first, second = sorted(whole.choices, key=lambda c: c.index)
    assert [t.function.name for t in first.message.tool_calls] == ["get_weather", "now"]
    assert first.finish_reason == "tool_calls" and first.message.content == "Let me look.\n"
    assert not second.message.tool_calls and second.message.content == "No call here."
    assert second.finish_reason == "stop"
    for index, names, text, reason in ((0, ["get_weather", "now"], "Let me look.\n", "tool_calls"),
                                       (1, [], "No call here.", "stop")):
        mine = [(d, f) for i, d, f in raw if i == index]
        assert [c.function.name for d, _ in mine for c in d.tool_calls or ()] == names
        assert [c.index for d, _ in mine for c in d.tool_calls or ()] == list(range(len(names)))
        assert "".join(d.content or "" for d, _ in mine) == text
        assert [f for _, f in mine if f] == [reason]


@pytest.mark.parametrize("parser, text", [
    ("mistral", 'Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "C"}[TOOL_CALLS]now[ARGS]{}'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}; '
                    '{"name": "now", "parameters": {}}'),
])
def test_the_other_parsers_serve_calls_whole_and_streamed(parser, text):
    router = ScriptedRouter(text, piece=4)
    whole, (content, calls, finish) = served(router, [
        lambda c: c.chat.completions.create(model="m", messages=ASK, tools=TOOLS),
        lambda c: streamed(c, tools=TOOLS)], tool_call_parser=parser)
    want = [("get_weather", {"city": "Paris", "unit": "C"}), ("now", {})]
    message = whole.choices[0].message
    assert [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls] == want
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want
    assert whole.choices[0].finish_reason == finish == "tool_calls"
    assert (message.content or "") == content == ("Checking. " if parser == "mistral" else "")
    if parser == "mistral":  # ids its templates take back, and the control token's text asked for
        assert all(len(t.id) == 9 and t.id.isalnum() for t in message.tool_calls)
    assert all(a["skip_special_tokens"] is (parser != "mistral") for a in router.asked)
