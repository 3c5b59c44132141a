"""The two shapes of a batch output line: splitserve's own, and the OpenAI Batch API's.

    native  {"id", "text", "token_ids", "finish_reason", "prompt_tokens"}  or  {"id", "error"}
    openai  {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <completion>},
             "error": null}
            or, for a request that cannot run, {"id", "custom_id", "response": {"status_code": 400,
             "request_id"}, "error": "<message>"}            (as vLLM's run-batch writes them)

The OpenAI body is a text completion (`/v1/completions`, native prompt lines too) or a chat
completion (a line with messages): one choice, `usage` in tokens. Every line begins with
{"id": ...} so that a torn tail is recognised the same way (runtime/batch_io.py), and
`input_id(record)` gives back the input line's id from either shape, for resuming.
"""

from __future__ import annotations

import time
import uuid

from splitserve.runtime.batch_io import BatchRequest
from splitserve.runtime.request import Completion

FORMATS = ("native", "openai")


class NativeOutput:
    def result(self, request: BatchRequest, completion: Completion) -> dict:
        return {"id": request.id, "text": completion.text, "token_ids": list(completion.token_ids),
                "finish_reason": completion.finish_reason, "prompt_tokens": len(completion.prompt_token_ids)}

    def error(self, request_id, message: str) -> dict:
        return {"id": request_id, "error": message}


class OpenAIOutput:
    """`model`: the name the bodies report (the served model's)."""

    def __init__(self, model: str):
        self.model = model

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
