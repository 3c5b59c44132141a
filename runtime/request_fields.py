"""Request fields read from JSON, as vLLM reads them: prompts, chat messages and sampling fields.

Shared by batch lines (runtime/batch_io.py) and OpenAI request bodies (runtime/openai_api.py).
Plain Python, no JAX. Types are checked here, values by SamplingParams; null is absent.
"""

from __future__ import annotations

import json

from splitserve.models.chat_messages import MESSAGE_KEYS, check_messages
from splitserve.runtime.sampling_params import SamplingParams, check_text
from splitserve.runtime.structured_outputs import StructuredOutputs, structured_outputs

DEFAULT_MAX_TOKENS = 16
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "min_tokens", "logprobs", "include_stop_str_in_output", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "truncate_prompt_tokens", "n", "logit_bias",
                   "allowed_token_ids", "prompt_logprobs", "skip_special_tokens")
# Structured outputs, under every name vLLM takes them by: its structured_outputs object, the older
# guided_* fields, and OpenAI's response_format. A request names at most one.
STRUCTURED_FIELDS = ("structured_outputs", "response_format", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
ANSWER_ONLY_KEYS = ("refusal", "function_call", "audio", "annotations", "reasoning_content")
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}  # type -> key


def reject_unknown(obj: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(where + u for u in unknown)}")


def chat_messages(messages, where: str) -> tuple[dict, ...]:
    """{"role", "content"[, "name", "tool_calls", "tool_call_id"]} dicts with string content, as vLLM
    reads OpenAI's messages: a null or missing content is "", a list of text parts is joined with
    newlines; tool calls as models/chat_messages.py checks them (arguments parsed from their JSON text)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"{where}[{i}] must be an object with a non-empty string role")
        # Keys of an answer that clients send back in the history; empty, they say nothing (vLLM takes them).
        m = {k: v for k, v in m.items() if not (k in ANSWER_ONLY_KEYS and v in (None, [], ""))}
        reject_unknown(m, MESSAGE_KEYS, f"{where}[{i}].")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # ["text", {"type": "text", "text": ...}, ...]
            content = "\n".join(_text_part(part, f"{where}[{i}].content[{j}]") for j, part in enumerate(content))
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content must be a string, got {json.dumps(content)}")
        message = {"role": m["role"], "content": content}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise ValueError(f"{where}[{i}].name must be a string, got {json.dumps(m['name'])}")
            message["name"] = m["name"]
        for key, value in message.items():
            check_text(value, "the prompt" if key == "content" else f"{where}[{i}].{key}")
        for key in ("tool_calls", "tool_call_id"):
            if m.get(key) is not None:
                message[key] = m[key]
        try:  # the tool fields' shapes; their names in the message are the body's
            message = check_messages([message])[0]
        except ValueError as e:
            raise ValueError(str(e).replace("messages[0]", f"{where}[{i}]", 1)) from None
        for key in ("tool_calls", "tool_call_id"):  # they travel in the proto as UTF-8 text
            if key in message:
                check_text(json.dumps(message[key], ensure_ascii=False), f"{where}[{i}].{key}")
        out.append(message)
    return tuple(out)


def _text_part(part, where: str) -> str:
    if isinstance(part, str):
        return part
    kind = part.get("type") if isinstance(part, dict) else None
    key = TEXT_PARTS.get(kind) if isinstance(kind, str) else None  # a list or object "type" is no part either
    if key is None or not isinstance(part.get(key), str):
        raise ValueError(f"{where}: only text parts are supported ({', '.join(TEXT_PARTS)} types, or strings)")
    return part[key]


def text_field(obj: dict, key: str) -> str | None:
    """obj[key], a non-empty string, or None when absent."""
    if key not in obj:
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {json.dumps(value)}")
    if not value:
        raise ValueError(f"{key} is empty")
    return value


def token_ids_field(obj: dict, key: str) -> tuple[int, ...] | None:
    """obj[key], a non-empty list of integers, or None when absent."""
    if key not in obj:
        return None
    value = obj[key]
    if not isinstance(value, list) or not all(is_int(t) for t in value):
        raise ValueError(f"{key} must be a list of integers, got {json.dumps(value)[:80]}")
    if not value:
        raise ValueError(f"{key} is empty")
    return tuple(value)


def sampling_params(fields: dict) -> SamplingParams:
    """The sampling fields of a request (types checked here, values by SamplingParams); null = absent."""
    kw = {}
    for key, check, kind in (("max_tokens", is_int, "an integer"), ("top_k", is_int, "an integer"),
                             ("seed", is_int, "an integer"), ("min_tokens", is_int, "an integer"),
                             ("logprobs", is_int, "an integer"), ("prompt_logprobs", is_int, "an integer"),
                             ("temperature", is_number, "a number"),
                             ("top_p", is_number, "a number"), ("min_p", is_number, "a number"),
                             ("ignore_eos", is_bool, "a boolean"),
                             ("presence_penalty", is_number, "a number"),
                             ("frequency_penalty", is_number, "a number"),
                             ("repetition_penalty", is_number, "a number"),
                             ("truncate_prompt_tokens", is_int, "an integer"), ("n", is_int, "an integer"),
                             ("include_stop_str_in_output", is_bool, "a boolean"),
                             ("skip_special_tokens", is_bool, "a boolean")):
        value = fields.get(key)
        if value is not None and not check(value):
            raise ValueError(f"{key} must be {kind}, got {json.dumps(value)}")
        if value is not None:
            kw[key] = value
    stop = fields.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a list of strings, got {json.dumps(fields['stop'])}")
        kw["stop"] = tuple(stop)
    stop_ids = fields.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(is_int(t) for t in stop_ids):
            raise ValueError(f"stop_token_ids must be a list of integers, got {json.dumps(stop_ids)[:80]}")
        kw["stop_token_ids"] = tuple(stop_ids)
    if (bias := fields.get("logit_bias")) is not None:
        if not isinstance(bias, dict):  # keys are strings in JSON ("50256"); SamplingParams reads them
            raise ValueError(f"logit_bias must be an object of token id: bias, got {json.dumps(bias)[:80]}")
        kw["logit_bias"] = bias
    if (allowed := fields.get("allowed_token_ids")) is not None:
        if not isinstance(allowed, list) or not all(is_int(t) for t in allowed):
            raise ValueError(f"allowed_token_ids must be a list of integers, got {json.dumps(allowed)[:80]}")
        kw["allowed_token_ids"] = tuple(allowed)
    if (structured := structured_field(fields)) is not None:
        kw["structured_outputs"] = structured
    kw.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    return SamplingParams(**kw)


def structured_field(fields: dict) -> StructuredOutputs | None:
    """The request's structured outputs, from whichever of STRUCTURED_FIELDS it sets (null: absent)."""
    given = [k for k in STRUCTURED_FIELDS if fields.get(k) is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} each set structured outputs: give one")
    if not given:
        return None
    key, value = given[0], fields[given[0]]
    if key == "structured_outputs":
        return structured_outputs(value)
    if key == "response_format":
        return _response_format(value)
    return StructuredOutputs(**{GUIDED[key]: value})


def _response_format(value) -> StructuredOutputs | None:
    """OpenAI's response_format: {"type": "text"} (free text), {"type": "json_object"}, or
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise ValueError("response_format json_schema must be {\"json_schema\": {\"name\": ..., \"schema\": "
                             "{...}}}")
        return StructuredOutputs(json=spec["schema"])
    raise ValueError(f"response_format must have type text, json_object or json_schema, got "
                     f"{json.dumps(value)[:80]}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_bool(value) -> bool:
    return isinstance(value, bool)
