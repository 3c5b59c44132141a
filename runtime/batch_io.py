"""Batch inference files: parse the input JSONL, append results crash-safely to the output JSONL.

Plain Python, no JAX: tested without a model.

Input, one request a line, in either of two formats:
    {"id": "a", "prompt": "text" | "prompt_token_ids": [1, 2] | "messages": [{"role", "content"}, ...],
     "max_tokens": 16, "temperature": 0, ...}
    {"custom_id": "a", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
     "body": {"prompt": "..." | "messages": [...], "max_tokens": ..., ...}}      (OpenAI batch format)
Chat messages are rendered later by the model's chat template (models/chat_template.py), as
vLLM renders /v1/chat/completions; a model without one answers such a line with an error.
Every non-blank line becomes exactly one `BatchRequest` or `BadLine`, each with a unique id:
a line without a usable id (bad JSON, no id, an id already used above) gets "line-N".

Output, one result a line: {"id", "text", "token_ids", "finish_reason", "prompt_tokens"} or
{"id", "error"}, or the OpenAI Batch API's lines (runtime/batch_output.py, whose `ResultWriter`)
appends each line with one os.write on an O_APPEND fd, so a process killed at any moment
leaves whole lines plus at most one torn tail, which `recover_output` (there too) cuts off on
the next start before it reads the ids already done.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from splitserve.runtime.sampling_params import INT32_MAX, SamplingParams, check_text

DEFAULT_MAX_TOKENS = 16
OPENAI_URLS = ("/v1/completions", "/v1/chat/completions")
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "min_tokens", "logprobs", "include_stop_str_in_output", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "truncate_prompt_tokens", "n", "logit_bias",
                   "allowed_token_ids", "prompt_logprobs")
NATIVE_FIELDS = ("id", "prompt", "prompt_token_ids", "messages") + SAMPLING_FIELDS
OPENAI_FIELDS = ("custom_id", "method", "url", "body")
OPENAI_BODY_FIELDS = ("prompt", "messages", "max_completion_tokens", "model", "user", "stream",
                      "top_logprobs") + SAMPLING_FIELDS


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    id: str | int
    line: int  # 1-based line number in the input file
    params: SamplingParams
    prompt: str | None = None  # exactly one of prompt / prompt_token_ids / messages
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] | None = None  # a chat: {"role", "content"} each


@dataclasses.dataclass(frozen=True)
class BadLine:
    id: str | int
    line: int
    error: str


class _Invalid(ValueError):
    """A line that cannot become a request; carries the line's id when it had a usable one."""

    def __init__(self, message: str, request_id: str | int | None = None):
        super().__init__(message)
        self.request_id = request_id


# -- input --------------------------------------------------------------------------------
def read_requests(path: str | Path) -> list[BatchRequest | BadLine]:
    """Parses every non-blank line of a JSONL file; ids are unique across the result. A line
    that is not UTF-8 is an error of its own (decoding the whole file at once failed them all)."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM, as some editors write
    parsed = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            parsed.append(BadLine(None, n, f"not UTF-8: byte {raw[e.start]:#04x} at column {e.start + 1}"))
            continue
        if text.strip():
            parsed.append(_parse_or_error(text, n))
    return _assign_ids(parsed)


def parse_line(text: str, line: int) -> BatchRequest:
    """One input line -> BatchRequest; raises ValueError naming the problem."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Invalid(f"invalid JSON: {e}")
    if not isinstance(obj, dict):
        raise _Invalid(f"expected a JSON object, got {type(obj).__name__}")
    openai = "custom_id" in obj or "body" in obj
    request_id = _request_id(obj, "custom_id" if openai else "id")
    try:
        if openai:
            prompt, token_ids, messages, fields = _openai_fields(obj)
        else:
            _reject_unknown(obj, NATIVE_FIELDS, "")
            prompt, token_ids, fields = _prompt(obj, "prompt"), _token_ids(obj, "prompt_token_ids"), obj
            messages = _chat_messages(obj["messages"], "messages") if "messages" in obj else None
        given = sum(x is not None for x in (prompt, token_ids, messages))
        if openai and given == 0:
            raise ValueError(f"missing body.{'messages' if obj['url'].endswith('chat/completions') else 'prompt'}")
        if given == 0:
            raise ValueError("missing prompt (or prompt_token_ids, or messages)")
        if given > 1:
            raise ValueError("give only one of prompt, prompt_token_ids and messages")
        if prompt is not None:
            check_text(prompt, "the prompt")
        if token_ids is not None and (bad := [t for t in token_ids if not 0 <= t <= INT32_MAX]):
            raise ValueError(f"prompt token ids must be in [0, {INT32_MAX}], got {bad[0]}")
        return BatchRequest(request_id, line, _sampling(fields), prompt, token_ids, messages)
    except ValueError as e:
        raise _Invalid(str(e), request_id)


def _parse_or_error(text: str, line: int) -> BatchRequest | BadLine:
    try:
        return parse_line(text, line)
    except _Invalid as e:
        return BadLine(e.request_id, line, str(e))  # id None: assigned by _assign_ids


def _assign_ids(parsed: list[BatchRequest | BadLine]) -> list[BatchRequest | BadLine]:
    """Duplicate ids and missing ids become errors with a synthetic "line-N" id, unique in the file."""
    taken = {p.id for p in parsed if p.id is not None}
    first_line: dict = {}
    out = []
    for p in parsed:
        if p.id is not None and p.id in first_line:
            p = BadLine(None, p.line, f"duplicate id {json.dumps(p.id)} (first used on line {first_line[p.id]})")
        elif p.id is not None:
            first_line[p.id] = p.line
        if p.id is None:
            synthetic = f"line-{p.line}"
            while synthetic in taken:
                synthetic += "'"
            taken.add(synthetic)
            p = dataclasses.replace(p, id=synthetic)
        out.append(p)
    return out


def _request_id(obj: dict, key: str) -> str | int:
    if key not in obj:
        raise _Invalid(f"missing {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise _Invalid(f"{key} must be a non-empty string or an integer, got {json.dumps(value)}")
    if isinstance(value, str):
        try:
            check_text(value, key)
        except ValueError as e:  # no id the output could carry: the error line gets a "line-N" id
            raise _Invalid(str(e)) from None
    return value


def _reject_unknown(obj: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(where + u for u in unknown)}")


def _openai_fields(obj: dict) -> tuple[str | None, tuple[int, ...] | None, tuple[dict, ...] | None, dict]:
    _reject_unknown(obj, OPENAI_FIELDS, "")
    if obj.get("method", "POST") != "POST":
        raise ValueError(f"method must be POST, got {json.dumps(obj['method'])}")
    url = obj.get("url")
    if url not in OPENAI_URLS:
        raise ValueError(f"url must be one of {', '.join(OPENAI_URLS)}, got {json.dumps(url)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ValueError(f"body must be a JSON object, got {json.dumps(body)}")
    _reject_unknown(body, OPENAI_BODY_FIELDS, "body.")
    if body.get("stream") not in (None, False):
        raise ValueError("body.stream must be false in a batch")
    fields = {k: v for k, v in body.items() if v is not None}  # null = absent, as OpenAI's API reads it
    if "max_completion_tokens" in fields:  # the newer name wins, as in vLLM's chat path
        fields["max_tokens"] = fields["max_completion_tokens"]
    _logprobs_as_vllm_reads_them(fields, chat=url == "/v1/chat/completions")
    if url == "/v1/chat/completions":
        if "prompt" in body:
            raise ValueError("/v1/chat/completions takes body.messages, not body.prompt")
        if "messages" not in body:
            return None, None, None, fields
        return None, None, _chat_messages(body["messages"], "body.messages"), fields
    if "prompt" not in body:
        return None, None, None, fields
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return None, tuple(prompt), None, fields
    if isinstance(prompt, list) and len(prompt) != 1:
        raise ValueError(f"body.prompt must be one prompt (a string or token ids), got a list of {len(prompt)}")
    prompt = _prompt({"body.prompt": prompt[0] if isinstance(prompt, list) else prompt}, "body.prompt")
    return prompt, None, None, fields


def _logprobs_as_vllm_reads_them(fields: dict, chat: bool) -> None:
    """Completions: body.logprobs is the number of top tokens. Chat: body.logprobs is a boolean and
    body.top_logprobs the number. Either becomes SamplingParams.logprobs (absent: none)."""
    top = fields.pop("top_logprobs", None)
    if not chat:
        if top is not None:
            raise ValueError("body.top_logprobs is a /v1/chat/completions field: /v1/completions takes "
                             "body.logprobs (the number of top tokens)")
        return
    wanted = fields.pop("logprobs", False)
    if not isinstance(wanted, bool):
        raise ValueError(f"body.logprobs must be a boolean in /v1/chat/completions, got {json.dumps(wanted)}")
    if top is not None and not wanted:
        raise ValueError("body.top_logprobs needs body.logprobs true")
    if wanted:
        fields["logprobs"] = 0 if top is None else top


TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}  # type -> key


def _chat_messages(messages, where: str) -> tuple[dict[str, str], ...]:
    """{"role", "content"[, "name"]} dicts with string content, as vLLM reads OpenAI's messages:
    a null or missing content is "", a list of text parts is joined with newlines."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"{where}[{i}] must be an object with a non-empty string role")
        _reject_unknown(m, ("role", "content", "name"), f"{where}[{i}].")
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
        out.append(message)
    return tuple(out)


def _text_part(part, where: str) -> str:
    if isinstance(part, str):
        return part
    key = TEXT_PARTS.get(part.get("type")) if isinstance(part, dict) else None
    if key is None or not isinstance(part.get(key), str):
        raise ValueError(f"{where}: only text parts are supported ({', '.join(TEXT_PARTS)} types, or strings)")
    return part[key]


def _prompt(obj: dict, key: str) -> str | None:
    if key not in obj:
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {json.dumps(value)}")
    if not value:
        raise ValueError(f"{key} is empty")
    return value


def _token_ids(obj: dict, key: str) -> tuple[int, ...] | None:
    if key not in obj:
        return None
    value = obj[key]
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise ValueError(f"{key} must be a list of integers, got {json.dumps(value)[:80]}")
    if not value:
        raise ValueError(f"{key} is empty")
    return tuple(value)


def _sampling(fields: dict) -> SamplingParams:
    """The sampling fields of a line (types checked here, values by SamplingParams); null = absent."""
    kw = {}
    for key, check, kind in (("max_tokens", _is_int, "an integer"), ("top_k", _is_int, "an integer"),
                             ("seed", _is_int, "an integer"), ("min_tokens", _is_int, "an integer"),
                             ("logprobs", _is_int, "an integer"), ("prompt_logprobs", _is_int, "an integer"),
                             ("temperature", _is_number, "a number"),
                             ("top_p", _is_number, "a number"), ("min_p", _is_number, "a number"),
                             ("ignore_eos", _is_bool, "a boolean"),
                             ("presence_penalty", _is_number, "a number"),
                             ("frequency_penalty", _is_number, "a number"),
                             ("repetition_penalty", _is_number, "a number"),
                             ("truncate_prompt_tokens", _is_int, "an integer"), ("n", _is_int, "an integer"),
                             ("include_stop_str_in_output", _is_bool, "a boolean")):
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
        if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
            raise ValueError(f"stop_token_ids must be a list of integers, got {json.dumps(stop_ids)[:80]}")
        kw["stop_token_ids"] = tuple(stop_ids)
    if (bias := fields.get("logit_bias")) is not None:
        if not isinstance(bias, dict):  # keys are strings in JSON ("50256"); SamplingParams reads them
            raise ValueError(f"logit_bias must be an object of token id: bias, got {json.dumps(bias)[:80]}")
        kw["logit_bias"] = bias
    if (allowed := fields.get("allowed_token_ids")) is not None:
        if not isinstance(allowed, list) or not all(_is_int(t) for t in allowed):
            raise ValueError(f"allowed_token_ids must be a list of integers, got {json.dumps(allowed)[:80]}")
        kw["allowed_token_ids"] = tuple(allowed)
    kw.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    return SamplingParams(**kw)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_bool(value) -> bool:
    return isinstance(value, bool)

