"""Batch inference files: parse the input JSONL, append results crash-safely to the output JSONL.

Plain Python, no JAX: tested without a model.

Input, one request a line, in either of two formats:
    {"id": "a", "prompt": "text" | "prompt_token_ids": [1, 2] | "messages": [{"role", "content"}, ...],
     "max_tokens": 16, "temperature": 0, ...}
    {"custom_id": "a", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
     "body": {"prompt": "..." | "messages": [...], "max_tokens": ..., ...}}      (OpenAI batch format)
An OpenAI line's body is read by runtime/openai_api.py, as the OpenAI-compatible server reads
one. Chat messages are rendered later by the model's chat template (models/chat_template.py), as
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

from splitserve.runtime import openai_api
from splitserve.runtime.openai_tools import ToolUse
from splitserve.runtime.request_fields import (SAMPLING_FIELDS, STRUCTURED_FIELDS, chat_messages, reject_unknown,
                                               sampling_params, text_field, token_ids_field)
from splitserve.runtime.sampling_params import INT32_MAX, SamplingParams, check_text

NATIVE_FIELDS = ("id", "prompt", "prompt_token_ids", "messages") + SAMPLING_FIELDS + STRUCTURED_FIELDS
OPENAI_FIELDS = ("custom_id", "method", "url", "body")


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    id: str | int
    line: int  # 1-based line number in the input file
    params: SamplingParams
    prompt: str | None = None  # exactly one of prompt / prompt_token_ids / messages
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] | None = None  # a chat: {"role", "content"} each
    echo: bool = False  # an OpenAI completions line's echo (runtime/openai_api.py)
    echo_only: bool = False  # echo with max_tokens 0: the one token made is not shown
    tool_use: ToolUse | None = None  # an OpenAI chat line's tools and tool_choice (runtime/openai_tools.py)


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
            body = _openai_body(obj)
            return BatchRequest(request_id, line, body.params, body.prompt, body.prompt_token_ids, body.messages,
                                body.echo, body.echo_only, body.tool_use)
        reject_unknown(obj, NATIVE_FIELDS, "")
        prompt, token_ids = text_field(obj, "prompt"), token_ids_field(obj, "prompt_token_ids")
        messages = chat_messages(obj["messages"], "messages") if "messages" in obj else None
        given = sum(x is not None for x in (prompt, token_ids, messages))
        if given == 0:
            raise ValueError("missing prompt (or prompt_token_ids, or messages)")
        if given > 1:
            raise ValueError("give only one of prompt, prompt_token_ids and messages")
        if prompt is not None:
            check_text(prompt, "the prompt")
        if token_ids is not None and (bad := [t for t in token_ids if not 0 <= t <= INT32_MAX]):
            raise ValueError(f"prompt token ids must be in [0, {INT32_MAX}], got {bad[0]}")
        return BatchRequest(request_id, line, sampling_params(obj), prompt, token_ids, messages)
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


def _openai_body(obj: dict) -> openai_api.OpenAIRequest:
    """A line of OpenAI's batch format: {"custom_id", "method": "POST", "url", "body"}."""
    reject_unknown(obj, OPENAI_FIELDS, "")
    if obj.get("method", "POST") != "POST":
        raise ValueError(f"method must be POST, got {json.dumps(obj['method'])}")
    body = openai_api.parse_body(obj.get("url"), obj.get("body"), where="body.")
    if body.stream:
        raise ValueError("body.stream must be false in a batch")
    if len(body.prompts) > 1:
        raise ValueError(f"body.prompt holds {len(body.prompts)} prompts: a batch line takes one (write a line "
                         "for each)")
    return body
