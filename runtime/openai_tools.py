"""Chat completions with tools: OpenAI's `tools` and `tool_choice`, as vLLM serves them.

    tools          the functions the model may call: the chat template describes them in the prompt
    tool_choice    "auto" (the default with tools): the model decides; its answer is read by the
                   server's parser (openai-server --tool-call-parser, runtime/tool_parsers.py), and
                   without one "auto" is refused, as vLLM refuses it
                   "none" (the default without tools): no calls are read (the tools are still in the
                   prompt, as vLLM's default has it)
                   "required": the answer is forced (structured outputs) to a JSON list of calls
                   [{"name": ..., "parameters": {...}}], at least one, of the given tools
                   {"type": "function", "function": {"name": N}}: the answer is forced to N's
                   arguments (its parameters' JSON Schema)
A choice with calls has message.tool_calls and finish_reason "tool_calls" ("stop" for a named
function, as OpenAI answers it); its content is the text before the calls, or null.

`ToolAnswer` turns an answer's text into (content, calls), whole or as it streams. The forced
choices need no parser: the text is the JSON their schema allows.
"""

from __future__ import annotations

import dataclasses
import json

from splitserve.models.chat_messages import check_tools
from splitserve.runtime import tool_parsers
from splitserve.runtime.sampling_params import check_text
from splitserve.runtime.structured_outputs import StructuredOutputs
from splitserve.runtime.tool_parsers import Delta, ToolCall

CHOICES = ("none", "auto", "required")
ANY_OBJECT = {"type": "object"}


@dataclasses.dataclass(frozen=True)
class ToolUse:
    """A request's tools and how they may be called. `function`: the named one, when the choice names one."""

    tools: tuple[dict, ...]
    choice: str  # "none" | "auto" | "required" | "function"
    function: str | None = None

    def keeps_special_tokens(self, parser: str | None) -> bool:
        """Whether the answer's text must keep special tokens: for a parser that reads markers some
        checkpoints make special (hermes, mistral), as vLLM's parsers ask (adjust_request)."""
        return self.choice == "auto" and parser is not None and tool_parsers.PARSERS[parser].KEEPS_SPECIAL_TOKENS

    def structured_outputs(self) -> StructuredOutputs | None:
        """What the answer is forced to: the named function's arguments, or a list of calls."""
        if self.choice == "function":
            return StructuredOutputs(json=_parameters(self._tool(self.function)))
        if self.choice == "required":
            return StructuredOutputs(json=_calls_schema(self.tools))
        return None

    def _tool(self, name: str) -> dict:
        return next(t for t in self.tools if t["function"]["name"] == name)


def read(fields: dict, where: str = "") -> ToolUse | None:
    """The body's tools and tool_choice (null is absent), or None when it has none; ValueError names
    the problem."""
    tools, choice = fields.get("tools"), fields.get("tool_choice")
    if tools is None or tools == []:  # [] is no tools (OpenAI's clients send it)
        if choice is not None and choice != "none":
            raise ValueError(f"{where}tool_choice {json.dumps(choice)[:80]} needs {where}tools")
        return None
    try:
        tools = tuple(check_tools(tools))
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    for i, tool in enumerate(tools):  # they travel in the proto as UTF-8 text
        check_text(json.dumps(tool, ensure_ascii=False), f"{where}tools[{i}]")
    if choice is None or choice in CHOICES:
        return ToolUse(tools, choice or "auto")
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (isinstance(name, str) and choice.get("type") == "function" and set(choice) == {"type", "function"}):
        raise ValueError(f"{where}tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                         f"\"function\": {{\"name\": ...}}}}, got {json.dumps(choice)[:80]}")
    if name not in [t["function"]["name"] for t in tools]:
        raise ValueError(f"{where}tool_choice names the function {json.dumps(name)[:80]}, which is not in "
                         f"{where}tools")
    return ToolUse(tools, "function", name)


class ToolAnswer:
    """One choice's answer, read for calls as it comes (`feed`, then `finish`)."""

    def __init__(self, use: ToolUse, parser: str | None):
        self.use = use
        self.called = False  # a call was made (the stream showed one)
        self._parser = tool_parsers.PARSERS[parser]() if use.choice == "auto" else None
        # A forced call's id as the server's parser would make it (Mistral's templates want theirs back).
        self._new_id = tool_parsers.PARSERS[parser].new_call_id if parser is not None else tool_parsers.call_id
        self._text = ""  # "required": the whole answer, read at the end
        self._named_id: str | None = None
        self._calls_made = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content to show, tool_calls deltas of OpenAI's stream) for the answer's next text."""
        if self.use.choice == "function":
            return "", self._named_delta(text)
        if self.use.choice == "required":
            self._text += text
            return "", []
        if self._parser is None:
            return text, []
        return self._shown(self._parser.feed(text))

    def finish(self) -> tuple[str, list[dict]]:
        if self.use.choice == "required":
            calls = _required_calls(self._text, self._new_id)
            return (self._text, []) if calls is None else self._shown(Delta("", calls))
        if self._parser is None:
            return "", []
        return self._shown(self._parser.finish())

    def whole(self, text: str) -> tuple[str | None, list[dict]]:
        """(message content, tool_calls) of a whole answer: the content is null beside calls when it
        is only white space."""
        content, deltas = self.feed(text)
        more, rest = self.finish()
        calls = [{key: value for key, value in d.items() if key != "index"} for d in deltas + rest]
        content += more
        if self.use.choice == "function":
            calls = [{"id": self._named_id or self._new_id(), "type": "function",
                      "function": {"name": self.use.function, "arguments": text}}]
        return (None if calls and not content.strip() else content), calls

    def finish_reason(self, reason: str | None) -> str | None:
        """"tool_calls" for an answer that called (and was not cut off), as vLLM and OpenAI answer."""
        if reason == "stop" and self.called and self.use.choice != "function":
            return "tool_calls"
        return reason

    def _named_delta(self, text: str) -> list[dict]:
        if self._named_id is None:
            self._named_id, self.called = self._new_id(), True
            return [{"index": 0, "id": self._named_id, "type": "function",
                     "function": {"name": self.use.function, "arguments": text}}]
        return [{"index": 0, "function": {"arguments": text}}] if text else []

    def _shown(self, delta: Delta) -> tuple[str, list[dict]]:
        deltas = [{"index": self._calls_made + i, **call.json()} for i, call in enumerate(delta.calls)]
        self._calls_made += len(deltas)
        self.called = self.called or bool(deltas)
        return delta.content, deltas


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or ANY_OBJECT


def _calls_schema(tools: tuple[dict, ...]) -> dict:
    """A JSON list of at least one {"name", "parameters"} call of the given tools (vLLM's schema).
    Each tool's `$defs` move to the list's root, where their "#/$defs/..." references point once the
    parameters are nested (pydantic writes them); ValueError when two tools define a name differently."""
    defs: dict[str, object] = {}
    one_of_each = []
    for t in tools:
        parameters = dict(_parameters(t))
        for name, definition in parameters.pop("$defs", {}).items():
            if defs.setdefault(name, definition) != definition:
                raise ValueError(f"tool_choice \"required\": tools define $defs {json.dumps(name)} differently "
                                 "(their parameters share one schema)")
        one_of_each.append({"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                            "parameters": parameters},
                            "required": ["name", "parameters"]})
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_of_each}}
    return {**schema, "$defs": defs} if defs else schema


def _required_calls(text: str, new_id) -> tuple[ToolCall, ...] | None:
    try:
        listed = tool_parsers.strict_json(text)
    except ValueError:
        return None  # cut off by max_tokens: shown as the text it is
    if not isinstance(listed, list):
        return None
    calls = [tool_parsers.call_from_json(obj, ("parameters",)) for obj in listed]
    return None if not calls or None in calls else tuple(dataclasses.replace(c, id=new_id()) for c in calls)
