"""The two shapes of a batch output line: splitserve's own, and the OpenAI Batch API's.

    native  {"id", "text", "token_ids", "finish_reason", "prompt_tokens"[, "logprobs"]}  or  {"id", "error"}
    openai  {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <completion>},
             "error": null}
            or, for a request that cannot run, {"id", "custom_id", "response": {"status_code": 400,
             "request_id"}, "error": "<message>"}            (as vLLM's run-batch writes them)

The OpenAI body is a text completion (`/v1/completions`, native prompt lines too) or a chat
completion (a line with messages): one choice, `usage` in tokens; a request that asks for
logprobs gets an error line there (OpenAI's logprobs name tokens by their text, which a batch
run against a router does not have), and its native line has them as
[{"logprob", "top": [[token id, logprob], ...]}, ...]. Every line begins with
{"id": ...} so that a torn tail is recognised the same way (runtime/batch_io.py), and
`input_id(record)` gives back the input line's id from either shape, for resuming.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from splitserve.runtime.batch_io import BatchRequest
from splitserve.runtime.request import Completion

FORMATS = ("native", "openai")


class NativeOutput:
    def refuses(self, request: BatchRequest) -> str | None:
        """Why this output cannot hold the request's result (then it is not run), or None."""
        return None

    def result(self, request: BatchRequest, completion: Completion) -> dict:
        line = {"id": request.id, "text": completion.text, "token_ids": list(completion.token_ids),
                "finish_reason": completion.finish_reason, "prompt_tokens": len(completion.prompt_token_ids)}
        if completion.logprobs is not None:
            line["logprobs"] = [lp.to_json_dict() for lp in completion.logprobs]
        return line

    def error(self, request_id, message: str) -> dict:
        return {"id": request_id, "error": message}


class OpenAIOutput:
    """`model`: the name the bodies report (the served model's)."""

    def __init__(self, model: str):
        self.model = model

    def refuses(self, request: BatchRequest) -> str | None:
        if request.params.logprobs is not None:
            return "logprobs are written with --output-format native only (OpenAI's name tokens by their text)"
        return None

    def result(self, request: BatchRequest, completion: Completion) -> dict:
        prompt_tokens, completion_tokens = len(completion.prompt_token_ids), len(completion.token_ids)
        chat = request.messages is not None
        choice = {"index": 0, "logprobs": None, "finish_reason": completion.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": completion.text}
        else:
            choice["text"] = completion.text
        body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}
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
