"""A chat as chat templates read it: messages, and the tools the model may call.

    check_messages(messages)  plain dicts of {"role", "content"[, "name", "tool_calls", "tool_call_id"]}
    check_tools(tools)        OpenAI's function tools, [{"type": "function", "function": {"name", ...}}]

Both raise ChatTemplateError (a ValueError) naming the bad entry. The forms are the ones transformers'
`apply_chat_template` documents, so a template renders the same prompt here as there:
  - an assistant turn's `tool_calls` are [{"id", "type": "function", "function": {"name", "arguments"}}]
    with `arguments` an object. OpenAI sends it as JSON text; it is parsed here, as vLLM does, since
    templates write it with `| tojson` (a string would be quoted twice);
  - a tool's result is a message of role "tool" with the `tool_call_id` it answers;
  - tools are passed on as given (templates write them with `| tojson`: their keys and order matter).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
TOOL_CALL_KEYS = ("id", "type", "function")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered: malformed, or refused by the template itself."""


def check_messages(messages) -> list[dict[str, Any]]:
    """Plain message dicts (what templates read), or ChatTemplateError. A missing or null content is ""
    (an assistant turn that only called tools, as vLLM reads it); unknown keys are refused rather than
    dropped."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    return [_check_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def _check_message(message, where: str) -> dict[str, Any]:
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or not message["role"]:
        raise ChatTemplateError(f"{where} must be an object with a non-empty string role")
    if unknown := sorted(set(message) - set(MESSAGE_KEYS)):
        raise ChatTemplateError(f"{where}: {', '.join(unknown)} not supported (a message has "
                                f"{', '.join(MESSAGE_KEYS)})")
    content = "" if message.get("content") is None else message["content"]
    if not isinstance(content, str):
        raise ChatTemplateError(f"{where}.content must be a string")
    out: dict[str, Any] = {"role": message["role"], "content": content}
    for key in ("name", "tool_call_id"):
        if message.get(key):
            if not isinstance(message[key], str):
                raise ChatTemplateError(f"{where}.{key} must be a string")
            out[key] = message[key]
    calls = message.get("tool_calls")
    if calls:  # [] and null are "no calls", as OpenAI's clients send them
        if message["role"] != "assistant":
            raise ChatTemplateError(f"{where}.tool_calls: only an assistant message calls tools, not "
                                    f"{json.dumps(message['role'])}")
        if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
            raise ChatTemplateError(f"{where}.tool_calls must be a list of tool calls")
        out["tool_calls"] = [_check_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls)]
    return out


def _check_call(call, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ChatTemplateError(f"{where} must be an object {{id, type, function: {{name, arguments}}}}")
    if unknown := sorted(set(call) - set(TOOL_CALL_KEYS)):
        raise ChatTemplateError(f"{where}: {', '.join(unknown)} not supported (a tool call has "
                                f"{', '.join(TOOL_CALL_KEYS)})")
    if call.get("type", "function") != "function":
        raise ChatTemplateError(f"{where}.type must be \"function\", got {json.dumps(call.get('type'))[:40]}")
    if call.get("id") is not None and not isinstance(call["id"], str):
        raise ChatTemplateError(f"{where}.id must be a string")
    function = call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ChatTemplateError(f"{where}.function must be an object with a non-empty string name")
    if unknown := sorted(set(function) - {"name", "arguments"}):
        raise ChatTemplateError(f"{where}.function: {', '.join(unknown)} not supported (name, arguments)")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ChatTemplateError(f"{where}.function.arguments is not valid JSON: "
                                    f"{json.dumps(arguments)[:80]}") from None
    if not isinstance(arguments, Mapping):
        raise ChatTemplateError(f"{where}.function.arguments must be a JSON object (or its text), got "
                                f"{json.dumps(arguments)[:80]}")
    out = {"id": call["id"]} if call.get("id") else {}
    return {**out, "type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}


def check_tools(tools) -> list[dict[str, Any]]:
    """OpenAI's tools: each {"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}, returned as given (the template writes them out)."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ChatTemplateError("tools must be a list of {type: \"function\", function: {...}} objects")
    checked = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ChatTemplateError(f"{where} must be an object with type \"function\" (only function tools "
                                    "are supported)")
        if unknown := sorted(set(tool) - {"type", "function"}):
            raise ChatTemplateError(f"{where}: {', '.join(unknown)} not supported (type, function)")
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ChatTemplateError(f"{where}.function must be an object with a non-empty string name")
        if unknown := sorted(set(function) - {"name", "description", "parameters", "strict"}):
            raise ChatTemplateError(f"{where}.function: {', '.join(unknown)} not supported (name, description, "
                                    "parameters, strict)")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise ChatTemplateError(f"{where}.function.description must be a string")
        if function.get("parameters") is not None and not isinstance(function["parameters"], Mapping):
            raise ChatTemplateError(f"{where}.function.parameters must be a JSON Schema object")
        checked.append(tool if isinstance(tool, dict) else dict(tool))
    names = [t["function"]["name"] for t in checked]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ChatTemplateError(f"tools: {', '.join(dupes)} named more than once")
    return checked
