"""The two shapes of a batch output line: splitserve's own, and the OpenAI Batch API's.

    native  {"id", "text", "token_ids", "finish_reason", "prompt_tokens"[, "logprobs"][, "prompt_logprobs"]
             [, "stop_reason"][, "cached_prompt_tokens": prompt tokens a prefix cache gave, when some]}
            or  {"id", "error"}
    openai  {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <completion>},
             "error": null}
            or, for a request that cannot run, {"id", "custom_id", "response": {"status_code": 400,
             "request_id"}, "error": "<message>"}            (as vLLM's run-batch writes them)

The OpenAI body is a text completion (`/v1/completions`, native prompt lines too) or a chat
completion (a line with messages): one choice per completion (`n` of them; a native line holds
one, so n > 1 gets an error line there), each with vLLM's "stop_reason" (the stop string or
stop token id that ended it, else null; a native line has it only then), `usage` in tokens,
logprobs in OpenAI's shapes (runtime/openai_logprobs.py: tokens named by their text with a
tokenizer, else "token_id:N"), echo as openai-server gives it. A native line has logprobs as
[{"logprob", "top": [[token id, logprob], ...]}, ...] (prompt_logprobs likewise, one per prompt
token after the first, each with its "rank" in the vocabulary), and no echo. Every line begins with
{"id": ...} so that a torn tail is recognised the same way (runtime/batch_io.py), and
`input_id(record)` gives back the input line's id from either shape, and `recover_output` cuts a
torn tail off an existing output file and returns the ids it holds, for resuming.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import uuid
from pathlib import Path

from splitserve.runtime import openai_api
from splitserve.runtime.batch_io import BatchRequest
from splitserve.runtime.openai_logprobs import TokenText
from splitserve.runtime.openai_tools import ToolAnswer
from splitserve.runtime.tool_parsers import PARSERS
from splitserve.runtime.request import Completion

FORMATS = ("native", "openai")


class NativeOutput:
    def refuses(self, request: BatchRequest) -> str | None:
        """Why this output cannot hold the request's result (then it is not run), or None."""
        if request.params.n > 1:
            return "n > 1 is written with --output-format openai (one choice per completion)"
        if request.echo:
            return "echo is written with --output-format openai (a native line has no prompt text)"
        if request.tool_use is not None:
            return "tools are written with --output-format openai (the calls go in its tool_calls)"
        return None

    def prepared(self, request: BatchRequest) -> BatchRequest:
        """The request as it is run (OpenAIOutput's may differ)."""
        return request

    def result(self, request: BatchRequest, completions: list[Completion]) -> dict:
        """`completions`: the request's n (one here: refuses() turned away the others)."""
        (completion,) = completions
        line = {"id": request.id, "text": completion.text, "token_ids": list(completion.token_ids),
                "finish_reason": completion.finish_reason, "prompt_tokens": len(completion.prompt_token_ids)}
        if completion.logprobs is not None:
            line["logprobs"] = [lp.to_json_dict() for lp in completion.logprobs]
        if completion.prompt_logprobs is not None:
            line["prompt_logprobs"] = [lp.to_json_dict() for lp in completion.prompt_logprobs]
        if completion.stop_reason is not None:
            line["stop_reason"] = completion.stop_reason
        if completion.cached_prompt_tokens:
            line["cached_prompt_tokens"] = completion.cached_prompt_tokens
        return line

    def error(self, request_id, message: str) -> dict:
        return {"id": request_id, "error": message}


class OpenAIOutput:
    """`model`: the name the bodies report (the served model's); `tokenizer`: the model's
    (models/tokenizer.py), to name logprobs' tokens by their text and echo token-id prompts."""

    def __init__(self, model: str, tokenizer=None, tool_call_parser: str | None = None):
        """`tool_call_parser`: how the model writes tool calls (runtime/tool_parsers.py), for lines with
        tools and tool_choice "auto", as openai-server's flag of that name."""
        if tool_call_parser is not None and tool_call_parser not in PARSERS:
            raise ValueError(f"unknown tool call parser {tool_call_parser!r} (known: {', '.join(PARSERS)})")
        self.model = model
        self.token_text = TokenText(tokenizer)
        self.tool_call_parser = tool_call_parser

    def refuses(self, request: BatchRequest) -> str | None:
        if request.echo and request.prompt is None and not self.token_text.has_tokenizer:
            return ("echo of a prompt given as token ids needs the model's tokenizer (a tokenizer.json in the "
                    "model's directory; with --address, --tokenizer MODEL)")
        if request.tool_use is not None and request.tool_use.choice == "auto" and self.tool_call_parser is None:
            return '"auto" tool choice needs the calls read out of the answers: run with --tool-call-parser'
        return None

    def prepared(self, request: BatchRequest) -> BatchRequest:
        """With tools read by a parser that wants special tokens' text (hermes, mistral), asks for it."""
        if request.tool_use is not None and request.tool_use.keeps_special_tokens(self.tool_call_parser):
            return dataclasses.replace(request, params=dataclasses.replace(request.params, skip_special_tokens=False))
        return request

    def result(self, request: BatchRequest, completions: list[Completion]) -> dict:
        """`completions`: the request's n, in index order: one choice each."""
        echo_texts = None
        if request.echo:
            prompt = request.prompt if request.prompt is not None else request.prompt_token_ids
            echo_texts = [openai_api.echo_text(prompt, completions[0].prompt_token_ids, self.token_text)]
        tool_answer = (functools.partial(ToolAnswer, request.tool_use, self.tool_call_parser)
                       if request.tool_use is not None else None)
        body = openai_api.completion_body(request.messages is not None, self.model, [completions], self.token_text,
                                          echo_texts, request.echo_only, tool_answer)
        return self._line(request.id, {"status_code": 200, "request_id": _request_id(), "body": body}, None)

    def error(self, request_id, message: str) -> dict:
        return self._line(request_id, {"status_code": 400, "request_id": _request_id(), "body": None}, message)

    @staticmethod
    def _line(custom_id, response: dict, error: str | None) -> dict:
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


def _request_id() -> str:
    return f"splitserve-batch-{uuid.uuid4().hex}"


class ResultWriter:
    """Appends whole JSON lines: one os.write per line on an O_APPEND fd; fsync in batches."""

    def __init__(self, path: str | Path, fsync_every: int = 64, fsync_interval_s: float = 1.0):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fsync_every, self._fsync_interval_s = fsync_every, fsync_interval_s
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        while written < len(data):  # a short write (huge line, full disk): finish it; recovery cuts a torn tail
            written += os.write(self._fd, data[written:])
        self._unsynced += 1
        if self._unsynced >= self._fsync_every or time.monotonic() - self._last_sync >= self._fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._fd)
        self._unsynced, self._last_sync = 0, time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- resuming: what an existing output file already holds --------------------------------------
def recover_output(path: str | Path, *, openai: bool = False) -> set:
    """Cuts a torn last line off an existing output file; returns the ids it already holds.

    A torn line is one without its newline, or a last line that is not a whole result (a crash
    can leave both); either must begin as ResultWriter's lines do. A whole result that only
    lacks its newline gets it. Any other bad line means the file is not ours (an input file,
    notes), and lines of the other shape than `openai` asks for would mix two formats in one
    file: raise, changing nothing.
    """
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends in a newline
    if tail and _output_record(tail) is not None:  # whole, only its newline missing
        lines.append(tail)
        tail = b""
        data += b"\n"
        with open(path, "ab") as f:
            f.write(b"\n")
            os.fsync(f.fileno())
    if tail and not _torn_result(tail):
        raise ValueError(f"{path}: its last line is not a result line ({tail[:60]!r}); "
                         f"is this another file? (refusing to append to it)")
    keep = len(data) - len(tail)
    records = []
    for n, raw in enumerate(lines, start=1):
        record = _output_record(raw)
        if record is None and n == len(lines) and not tail and _torn_result(raw):
            keep -= len(raw) + 1  # a bad last line: torn before a later crash wrote its newline
        elif record is None:
            raise ValueError(f"{path}: line {n} is not a result line ({raw[:60]!r}); "
                             f"is this another file? (refusing to append to it)")
        else:
            records.append(record)
    if other := [r for r in records if _is_openai_line(r) != openai]:
        found, asked = ("openai", "native") if openai is False else ("native", "openai")
        raise ValueError(f"{path} holds {found} lines ({len(other)}) and this run writes {asked} ones; re-run with "
                         f"--output-format {found}, or write to a new file")
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return {input_id(r) for r in records}


def input_id(record: dict):
    """The input line's id of an output line, in either format."""
    return record["custom_id"] if _is_openai_line(record) else record["id"]


def _is_openai_line(record: dict) -> bool:
    return "custom_id" in record and "response" in record


def _output_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    is_result = isinstance(record, dict) and "id" in record and (
        "text" in record or "error" in record or _is_openai_line(record))
    return record if is_result else None


def _torn_result(raw: bytes) -> bool:
    """Whether a broken line may be the start of one of ResultWriter's: it begins as they do (with
    the id) and is cut short. A whole JSON line is never torn: one that is not a result (a request
    line, say, which begins the same way) is someone else's, and must not be cut."""
    if not (raw.startswith(_RESULT_START) or _RESULT_START.startswith(raw)):
        return False
    try:
        json.loads(raw)
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError for a character cut in two
        return True
    return False


_RESULT_START = b'{"id": '  # how every line written here begins (json.dumps)
