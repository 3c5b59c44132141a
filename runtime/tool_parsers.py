"""Tool calls in a model's answer, read as vLLM's tool parsers read them (`openai-server --tool-call-parser`).

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number of them; the
                 text before the first is the message's content. Qwen2.5, Qwen3 and Hermes 2/3's chat
                 templates ask the model for this form.
    llama3_json  an answer that begins with "{" (after an optional <|python_tag|>) is one or more
                 JSON objects {"name": ..., "parameters": {...}} separated by ";" (Llama 3.1-3.3's
                 JSON tool calling); any other answer is content.
    mistral      [TOOL_CALLS] and a JSON list of {"name", "arguments"} (Mistral 7B v0.3), or
                 [TOOL_CALLS]name[ARGS]{...} for each call (Mistral's tokenizer v11 and later); the
                 text before is content. [TOOL_CALLS] is a special token: read with its text.

Each parser is a stream: `feed(text)` takes the answer's next text and `finish()` ends it; both give
a Delta of content to show and calls completed. A whole answer is one feed and the finish
(`parse`), so a streamed answer and an unstreamed one read the same. A call that does not parse
(bad JSON, no name) is shown as content, as vLLM does: the model did not make a call.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import string
import uuid
from typing import Protocol


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's form


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = dataclasses.field(default_factory=call_id)

    def json(self) -> dict:
        """OpenAI's tool_calls entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class Delta:
    content: str = ""
    calls: tuple[ToolCall, ...] = ()


class ToolParser(Protocol):
    KEEPS_SPECIAL_TOKENS: bool  # the answer is read with its special tokens' text (vLLM's adjust_request)

    @staticmethod
    def new_call_id() -> str: ...  # the ids its models' templates take back

    def feed(self, text: str) -> Delta: ...
    def finish(self) -> Delta: ...


def parse(parser: ToolParser, text: str) -> tuple[str, tuple[ToolCall, ...]]:
    """(content, calls) of a whole answer."""
    first, last = parser.feed(text), parser.finish()
    return first.content + last.content, first.calls + last.calls


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; a client's may not


def strict_json(text: str):
    """json.loads without NaN and Infinity (ValueError)."""
    return json.loads(text, parse_constant=_no_constant)


def call_from_json(obj, arguments_keys: tuple[str, ...]) -> ToolCall | None:
    """{"name": str, <one of arguments_keys>: object (or its JSON text)} -> ToolCall, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = next((obj[k] for k in arguments_keys if k in obj), {})
    if isinstance(arguments, str):
        try:
            arguments = strict_json(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class HermesParser:
    START, END = "<tool_call>", "</tool_call>"
    # Some checkpoints (Hermes 2 Pro) make the markers special tokens: the answer's text must keep them.
    KEEPS_SPECIAL_TOKENS = True
    new_call_id = staticmethod(call_id)

    def __init__(self):
        self._pending = ""  # text not yet shown: a possible start of START, or a call not yet ended
        self._in_call = False
        self._called = False  # after the first call, text between calls is not content

    def feed(self, text: str) -> Delta:
        self._pending += text
        content, calls = [], []
        while True:
            if self._in_call:
                end = self._pending.find(self.END)
                if end < 0:
                    break
                raw = self._pending[:end + len(self.END)]
                self._pending, self._in_call = self._pending[end + len(self.END):], False
                call = self._call(raw[len(self.START):-len(self.END)])
                if call is None:
                    content.append(raw)
                else:
                    calls.append(call)
                    self._called = True
                continue
            start = self._pending.find(self.START)
            if start < 0:
                keep = _held_back(self._pending, self.START)
                shown, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
                if not self._called:
                    content.append(shown)
                break
            if not self._called:
                content.append(self._pending[:start])
            self._pending, self._in_call = self._pending[start:], True
        return Delta("".join(content), tuple(calls))

    def finish(self) -> Delta:
        """What is left: a last call without its end tag (the model ended there, or a stop string was
        "</tool_call>") is a call if its JSON is whole, as vLLM reads it, else content (cut off by
        max_tokens); text held back is content."""
        rest, self._pending = self._pending, ""
        if self._in_call:
            call = self._call(rest[len(self.START):])
            return Delta("", (call,)) if call is not None else Delta(rest)
        return Delta("" if self._called else rest)

    @staticmethod
    def _call(body: str) -> ToolCall | None:
        try:
            return call_from_json(strict_json(body), ("arguments", "parameters"))
        except ValueError:
            return None


class Llama3JsonParser:
    PYTHON_TAG = "<|python_tag|>"
    KEEPS_SPECIAL_TOKENS = False  # the JSON is ordinary text; the tag (special) is read if it is there
    new_call_id = staticmethod(call_id)

    def __init__(self):
        self._head = ""  # the answer's start, until it tells whether the answer is calls
        self._calls: bool | None = None  # None: not yet known
        self._body = ""

    def feed(self, text: str) -> Delta:
        if self._calls is False:
            return Delta(text)
        if self._calls:
            self._body += text
            return Delta()
        self._head += text
        stripped = self._head.lstrip()
        if stripped.startswith(self.PYTHON_TAG) or stripped.startswith("{"):
            self._calls, self._body = True, self._head
            return Delta()
        if not stripped or self.PYTHON_TAG.startswith(stripped):
            return Delta()  # whitespace, or perhaps the tag: wait
        self._calls = False
        return Delta(self._head)

    def finish(self) -> Delta:
        if not self._calls:
            return Delta(self._head if self._calls is None else "")
        calls = self._parse(self._body)
        return Delta(self._body) if calls is None else Delta("", calls)

    def _parse(self, text: str) -> tuple[ToolCall, ...] | None:
        text = text.strip()
        text = text[len(self.PYTHON_TAG):].lstrip() if text.startswith(self.PYTHON_TAG) else text
        decoder, calls, at = json.JSONDecoder(parse_constant=_no_constant), [], 0
        while at < len(text):
            try:
                obj, at = decoder.raw_decode(text, at)
            except ValueError:
                return None
            call = call_from_json(obj, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)
            while at < len(text) and text[at] in " \t\r\n;":
                at += 1
        return tuple(calls) or None


class MistralParser:
    """[TOOL_CALLS] then the calls: a JSON list [{"name", "arguments"}, ...] (Mistral 7B v0.3, Mixtral
    8x22B), or name[ARGS]{...} once per call, each after its own [TOOL_CALLS] (tokenizer v11 and
    later). The text before the first marker is content; after it, the answer is read whole at the end."""

    MARKER, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    KEEPS_SPECIAL_TOKENS = True  # [TOOL_CALLS] is a control token: without its text there is no call to see

    def __init__(self):
        self._pending = ""  # content not yet shown (a possible start of the marker), or the calls
        self._in_calls = False

    def feed(self, text: str) -> Delta:
        self._pending += text
        if self._in_calls:
            return Delta()
        start = self._pending.find(self.MARKER)
        if start >= 0:
            shown, self._pending, self._in_calls = self._pending[:start], self._pending[start:], True
            return Delta(shown)
        keep = _held_back(self._pending, self.MARKER)
        shown, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return Delta(shown)

    def finish(self) -> Delta:
        rest, self._pending = self._pending, ""
        if not self._in_calls:
            return Delta(rest)
        calls = self._parse(rest)
        return Delta(rest) if calls is None else Delta("", calls)

    def _parse(self, text: str) -> tuple[ToolCall, ...] | None:
        parts = [p.strip() for p in text.split(self.MARKER)[1:]]
        parts = [p for p in parts if p]  # "[TOOL_CALLS][TOOL_CALLS]f..." : an empty one is no call
        if len(parts) == 1 and parts[0][:1] in "[{":  # the JSON list (or one object); text after it is left
            try:
                listed, _ = json.JSONDecoder(parse_constant=_no_constant).raw_decode(parts[0])
            except ValueError:
                return None
            listed = [listed] if isinstance(listed, dict) else listed
            calls = [call_from_json(obj, ("arguments",)) for obj in listed] if isinstance(listed, list) else [None]
        else:  # name[ARGS]{...} each; without [ARGS] the name ends at the first "{", as vLLM reads it
            calls = [self._named_call(part) for part in parts]
        if not calls or None in calls:
            return None
        return tuple(dataclasses.replace(c, id=self.new_call_id()) for c in calls)

    def _named_call(self, part: str) -> ToolCall | None:
        name, args, arguments = part.partition(self.ARGS)
        if not args:
            brace = part.find("{")
            name, arguments = (part[:brace], part[brace:]) if brace > 0 else (part, "")
        name = name.split(self.CALL_ID)[0].strip()  # name[CALL_ID]id[ARGS]{...}: the id is the model's, not used
        try:
            return call_from_json({"name": name, "arguments": strict_json(arguments)}, ("arguments",))
        except ValueError:
            return None

    @staticmethod
    def new_call_id() -> str:
        """Mistral's templates refuse a history whose call ids are not 9 letters or digits (vLLM's ids too)."""
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}


def _held_back(text: str, marker: str) -> int:
    """How many of text's last characters could begin `marker` (shown once they cannot)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
