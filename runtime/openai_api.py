"""OpenAI's completions and chat completions API: request bodies in, response bodies out.

Used by the OpenAI-compatible HTTP server (runtime/openai_server.py) and by batch files in
OpenAI's batch format (runtime/batch_io.py, runtime/batch_output.py). Plain Python, no JAX.

Bodies are read as vLLM reads them: its extra sampling fields (top_k, min_p, stop_token_ids,
ignore_eos, repetition_penalty, ...) are taken, null is absent, `max_completion_tokens` wins over
`max_tokens`, completions' `logprobs` is a number and chat's a boolean with `top_logprobs`.
Absent fields take splitserve's defaults (max_tokens 16, greedy), as the batch runner's.
Responses carry vLLM's `stop_reason` in each choice (the stop string or stop token id that ended
it, else null) and `usage` in tokens.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import time
import uuid

from splitserve.runtime.logprobs import TokenLogprobs
from splitserve.runtime.request import Completion
from splitserve.runtime.request_fields import (SAMPLING_FIELDS, chat_messages, is_int, reject_unknown,
                                               sampling_params, text_field)
from splitserve.runtime.sampling_params import INT32_MAX, SamplingParams, check_text

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
URLS = (COMPLETIONS, CHAT)
# Fields that change nothing here (bookkeeping of OpenAI's platform), taken and ignored as vLLM does.
IGNORED_FIELDS = ("user", "store", "metadata", "service_tier", "parallel_tool_calls")
# Features not served here, taken only at the value that leaves them off (clients send those).
OFF_VALUES = {"echo": (False,), "best_of": (1,), "suffix": ("",), "response_format": ({"type": "text"},),
              "tools": ([],), "tool_choice": ("none",)}
BODY_FIELDS = ("prompt", "messages", "max_completion_tokens", "model", "stream", "stream_options",
               "top_logprobs") + SAMPLING_FIELDS + IGNORED_FIELDS + tuple(OFF_VALUES)


@dataclasses.dataclass(frozen=True)
class OpenAIRequest:
    """One request body, read. Exactly one of prompt / prompt_token_ids / messages is set."""

    chat: bool
    params: SamplingParams
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] | None = None
    model: str | None = None  # the model the body names, if it names one
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def parse_body(url: str, body, where: str = "") -> OpenAIRequest:
    """A body for `url` (COMPLETIONS or CHAT) -> OpenAIRequest; raises ValueError naming the problem.
    `where` prefixes field names in messages ("body." in a batch line)."""
    if url not in URLS:
        raise ValueError(f"url must be one of {', '.join(URLS)}, got {json.dumps(url)}")
    if not isinstance(body, dict):
        raise ValueError(f"{where.rstrip('.') or 'the body'} must be a JSON object, got {json.dumps(body)[:80]}")
    reject_unknown(body, BODY_FIELDS, where)
    chat = url == CHAT
    fields = {k: v for k, v in body.items() if v is not None}  # null = absent, as OpenAI's API reads it
    for key, off in OFF_VALUES.items():  # by type too: true is not 1, nor 0 false
        if key in fields and not any(type(fields[key]) is type(v) and fields[key] == v for v in off):
            raise ValueError(f"{where}{key} {json.dumps(fields[key])[:60]} is not supported (only "
                             f"{' or '.join(json.dumps(v) for v in off)}, or leaving it out)")
    stream = fields.get("stream", False)
    if not isinstance(stream, bool):
        raise ValueError(f"{where}stream must be a boolean, got {json.dumps(stream)}")
    include_usage = _include_usage(fields.get("stream_options"), stream, where)
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"{where}model must be a string, got {json.dumps(model)}")
    if "max_completion_tokens" in fields:  # the newer name wins, as in vLLM's chat path
        fields["max_tokens"] = fields["max_completion_tokens"]
    _logprobs_as_vllm_reads_them(fields, chat, where)
    prompt = token_ids = messages = None
    if chat:
        if "prompt" in fields:
            raise ValueError(f"{CHAT} takes {where}messages, not {where}prompt")
        if "messages" not in fields:
            raise ValueError(f"missing {where}messages")
        messages = chat_messages(fields["messages"], f"{where}messages")
    else:
        if "messages" in fields:
            raise ValueError(f"{COMPLETIONS} takes {where}prompt, not {where}messages ({CHAT} takes those)")
        if "prompt" not in fields:
            raise ValueError(f"missing {where}prompt")
        prompt, token_ids = _completion_prompt(fields["prompt"], where)
    return OpenAIRequest(chat, sampling_params(fields), prompt, token_ids, messages, model, stream, include_usage)


def _include_usage(options, stream: bool, where: str) -> bool:
    """stream_options.include_usage; true when stream_options is given without it, as vLLM reads it."""
    if options is None:
        return False
    if not stream:  # as vLLM refuses it
        raise ValueError(f"{where}stream_options is only for streamed requests ({where}stream true)")
    if not isinstance(options, dict):
        raise ValueError(f"{where}stream_options must be an object, got {json.dumps(options)[:80]}")
    reject_unknown(options, ("include_usage", "continuous_usage_stats"), f"{where}stream_options.")
    if options.get("continuous_usage_stats"):
        raise ValueError(f"{where}stream_options.continuous_usage_stats is not supported (the usage comes in "
                         "the last chunk)")
    if "include_usage" not in options:
        return True
    value = options["include_usage"]
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{where}stream_options.include_usage must be a boolean, got {json.dumps(value)}")
    return bool(value)  # null: none, as vLLM reads it


def _completion_prompt(prompt, where: str) -> tuple[str | None, tuple[int, ...] | None]:
    """(text, None) or (None, token ids): one prompt, as a string, token ids, or a list of one of them."""
    if isinstance(prompt, list) and len(prompt) == 1 and not is_int(prompt[0]):  # ["text"] or [[ids]]
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        if bad := [t for t in prompt if not 0 <= t <= INT32_MAX]:
            raise ValueError(f"prompt token ids must be in [0, {INT32_MAX}], got {bad[0]}")
        return None, tuple(prompt)
    if isinstance(prompt, list):
        raise ValueError(f"{where}prompt must be one prompt (a string or token ids), got a list of {len(prompt)}")
    text = text_field({f"{where}prompt": prompt}, f"{where}prompt")
    check_text(text, "the prompt")
    return text, None


def _logprobs_as_vllm_reads_them(fields: dict, chat: bool, where: str) -> None:
    """Completions: logprobs is the number of top tokens. Chat: logprobs is a boolean and
    top_logprobs the number. Either becomes SamplingParams.logprobs (absent: none)."""
    top = fields.pop("top_logprobs", None)
    if not chat:
        if top is not None:
            raise ValueError(f"{where}top_logprobs is a {CHAT} field: {COMPLETIONS} takes "
                             f"{where}logprobs (the number of top tokens)")
        return
    wanted = fields.pop("logprobs", False)
    if not isinstance(wanted, bool):
        raise ValueError(f"{where}logprobs must be a boolean in {CHAT}, got {json.dumps(wanted)}")
    if top is not None and not wanted:
        raise ValueError(f"{where}top_logprobs needs {where}logprobs true")
    if wanted:
        fields["logprobs"] = 0 if top is None else top


# -- responses ----------------------------------------------------------------------------------
def response_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """The bytes of a token, for logprobs: by the model's tokenizer, or "token_id:N" without one, as
    vLLM's --return-tokens-as-token-ids names them."""

    def __init__(self, tokenizer=None):
        self._tokenizer = tokenizer

    def bytes(self, token_id: int) -> bytes:
        if self._tokenizer is None:
            return f"token_id:{token_id}".encode()
        return self._tokenizer.token_bytes(token_id)


def _finite(logprob: float) -> float:
    """-inf and NaN are not JSON: vLLM's floor, -9999.0."""
    return logprob if logprob >= -9999.0 else -9999.0


class ChoiceLogprobs:
    """One choice's "logprobs" in OpenAI's shapes, built part by part as its tokens come.

    Completions: {"text_offset", "token_logprobs", "tokens", "top_logprobs": [{token: logprob}]},
    each top dict holding the sampled token too, as vLLM's. Chat: {"content": [{"token", "logprob",
    "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.

    A token's text is its bytes decoded after the choice's earlier tokens: a token that ends inside
    a UTF-8 character has the text "" and the token that completes the character carries all of it
    (as vLLM corrects them), so the texts join into the choice's text and offsets add up. "bytes"
    are the token's own. A top token's text is read at the same point as the sampled one's.
    """

    def __init__(self, chat: bool, text: TokenText):
        self.chat, self.text = chat, text
        self.offset = 0  # completions: the next token's character offset in the choice's text
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def part(self, token_ids: list[int], logprobs: list[TokenLogprobs]) -> dict:
        entries = []
        for token, lp in zip(token_ids, logprobs):
            top = [(self._read(t), _finite(v), self.text.bytes(t)) for t, v in lp.top]
            raw = self.text.bytes(token)
            entries.append(((self._utf8.decode(raw), _finite(lp.logprob), raw), top))
        if self.chat:
            return {"content": [dict(_chat_entry(*sampled), top_logprobs=[_chat_entry(*t) for t in top])
                                for sampled, top in entries]}
        out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for (text, logprob, _), top in entries:
            ranked: dict[str, float] = {}
            for alt_text, alt_logprob, _ in top:  # most likely first: a text two tokens share keeps the likelier
                ranked.setdefault(alt_text, alt_logprob)
            ranked.setdefault(text, logprob)
            for key, value in (("text_offset", self.offset), ("token_logprobs", logprob), ("tokens", text),
                               ("top_logprobs", ranked)):
                out[key].append(value)
            self.offset += len(text)
        return out

    def _read(self, token: int) -> str:
        """A top token's text where the next token stands, leaving the choice's decoder as it is."""
        reader = codecs.getincrementaldecoder("utf-8")("replace")
        reader.setstate(self._utf8.getstate())
        return reader.decode(self.text.bytes(token))


def _chat_entry(text: str, logprob: float, raw: bytes) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


def completion_body(chat: bool, model: str, completions: list[Completion], token_text: TokenText | None = None
                    ) -> dict:
    """A text completion or chat completion: one choice per completion, in index order; logprobs
    where the request asked for them, tokens named by `token_text`."""
    choices = []
    for index, completion in enumerate(completions):
        logprobs = None
        if completion.logprobs is not None:
            logprobs = ChoiceLogprobs(chat, token_text or TokenText()).part(completion.token_ids, completion.logprobs)
        choice = {"index": index, "logprobs": logprobs, "finish_reason": completion.finish_reason,
                  "stop_reason": completion.stop_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": completion.text}
        else:
            choice["text"] = completion.text
        choices.append(choice)
    return {"id": response_id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(len(completions[0].prompt_token_ids), sum(len(c.token_ids) for c in completions))}


class StreamChunks:
    """The chunk objects of one streamed response (each sent as an SSE `data:` line): every chunk
    shares the response's id and creation time; with include_usage, each has "usage": null and a
    last one without choices carries the usage, as OpenAI streams it."""

    def __init__(self, chat: bool, model: str, include_usage: bool):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id, self.created = response_id(chat), int(time.time())

    def choice(self, index: int, text: str, finish_reason: str | None = None, stop_reason=None,
               first: bool = False, logprobs: dict | None = None) -> dict:
        """A chunk of one choice: its new text (a chat's first chunk also names the role), and the
        logprobs of its new tokens (ChoiceLogprobs.part) when the request asked."""
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return self._chunk([choice])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = usage(prompt_tokens, completion_tokens)
        return chunk

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk
