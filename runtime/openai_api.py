"""OpenAI's completions and chat completions API: request bodies in, response bodies out.

Used by the OpenAI-compatible HTTP server (runtime/openai_server.py) and by batch files in
OpenAI's batch format (runtime/batch_io.py, runtime/batch_output.py). Plain Python, no JAX.

Bodies are read as vLLM reads them: its extra sampling fields (top_k, min_p, stop_token_ids,
ignore_eos, repetition_penalty, ...) are taken, null is absent, `max_completion_tokens` wins over
`max_tokens`, completions' `logprobs` is a number and chat's a boolean with `top_logprobs`.
Absent fields take splitserve's defaults (max_tokens 16, greedy), as the batch runner's.
Completions take several prompts in one body (choice i * n + j is prompt i's sequence j) and
`echo` (each choice's text and logprobs begin with its prompt's; with max_tokens 0 only the prompt's,
the one token generated left out), as vLLM and lm-evaluation-harness's scoring use them.
Responses carry vLLM's `stop_reason` in each choice (the stop string or stop token id that ended
it, else null) and `usage` in tokens.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable

from splitserve.runtime import openai_tools
from splitserve.runtime.openai_logprobs import ChoiceLogprobs, TokenText, joined, prompt_logprobs_json
from splitserve.runtime.request import Completion
from splitserve.runtime.request_fields import (SAMPLING_FIELDS, STRUCTURED_FIELDS, chat_messages, is_int,
                                               reject_unknown, sampling_params, text_field)
from splitserve.runtime.sampling_params import INT32_MAX, SamplingParams, check_text

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
URLS = (COMPLETIONS, CHAT)
# Fields that change nothing here (bookkeeping of OpenAI's platform), taken and ignored as vLLM does.
IGNORED_FIELDS = ("user", "store", "metadata", "service_tier", "parallel_tool_calls")
# Features not served here, taken only at the value that leaves them off (clients send those).
OFF_VALUES = {"best_of": (1,), "suffix": ("",)}
CHAT_OFF_VALUES = {"echo": (False,)}  # chat's echo (of the last message) is not served; completions' is
COMPLETIONS_OFF_VALUES = {"tools": ([],), "tool_choice": ("none",)}  # tools are chat's (runtime/openai_tools.py)
BODY_FIELDS = ("prompt", "messages", "max_completion_tokens", "model", "stream", "stream_options",
               "top_logprobs", "echo") + SAMPLING_FIELDS + STRUCTURED_FIELDS + IGNORED_FIELDS + tuple(OFF_VALUES) + \
    tuple(COMPLETIONS_OFF_VALUES)
MAX_PROMPTS = 1024  # prompts in one completions body: a bound on what one body holds

Prompt = str | tuple[int, ...]  # a text, or token ids


@dataclasses.dataclass(frozen=True)
class OpenAIRequest:
    """One request body, read: completions have `prompts`, chat has `messages`."""

    chat: bool
    params: SamplingParams
    prompts: tuple[Prompt, ...] = ()
    messages: tuple[dict[str, str], ...] | None = None
    model: str | None = None  # the model the body names, if it names one
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    echo: bool = False  # completions: each choice's text (and logprobs) begin with its prompt's
    echo_only: bool = False  # echo with max_tokens 0: the one token generated is left out, as vLLM does
    tool_use: openai_tools.ToolUse | None = None  # chat: the tools the model may call, and how

    @property
    def prompt(self) -> str | None:
        """A one-prompt body's text prompt (None for token ids, chat, or several prompts)."""
        return self.prompts[0] if len(self.prompts) == 1 and isinstance(self.prompts[0], str) else None

    @property
    def prompt_token_ids(self) -> tuple[int, ...] | None:
        """A one-prompt body's token ids (None for a text, chat, or several prompts)."""
        return self.prompts[0] if len(self.prompts) == 1 and isinstance(self.prompts[0], tuple) else None


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
    for key, off in {**OFF_VALUES, **(CHAT_OFF_VALUES if chat else COMPLETIONS_OFF_VALUES)}.items():  # by type: true is not 1
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
    sent_as = {}  # fields read under another name: their errors name the field sent
    if "max_completion_tokens" in fields:  # the newer name wins, as in vLLM's chat path
        fields["max_tokens"] = fields["max_completion_tokens"]
        sent_as["max_tokens"] = "max_completion_tokens"
    if chat and fields.get("top_logprobs") is not None:
        sent_as["logprobs"] = "top_logprobs"
    _logprobs_as_vllm_reads_them(fields, chat, where)
    echo, echo_only = _echo(fields, chat, where)
    _prompt_logprobs_as_vllm_reads_them(fields, stream, echo, where)
    prompts, messages = (), None
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
        prompts = _completion_prompts(fields["prompt"], where)
    tool_use = openai_tools.read(fields, where) if chat else None
    try:
        params = sampling_params(fields)
    except ValueError as e:
        message = str(e)
        field = message.split(" ", 1)[0]
        raise ValueError(sent_as[field] + message[len(field):] if field in sent_as else message) from None
    if tool_use is not None and (forced := tool_use.structured_outputs()) is not None:
        if params.structured_outputs is not None:
            raise ValueError(f"{where}tool_choice {json.dumps(fields['tool_choice'])[:80]} forces the answer's form, "
                             f"and so does {next(k for k in STRUCTURED_FIELDS if fields.get(k) is not None)}: "
                             "give one")
        params = dataclasses.replace(params, structured_outputs=forced)
    return OpenAIRequest(chat, params, prompts, messages, model, stream, include_usage, echo, echo_only, tool_use)


def _echo(fields: dict, chat: bool, where: str) -> tuple[bool, bool]:
    """(echo, echo only): completions' echo, and max_tokens 0 with it, read as one token that is not
    shown (vLLM's "echo without generation")."""
    echo = fields.pop("echo", False)
    if not isinstance(echo, bool):  # chat's was checked against CHAT_OFF_VALUES
        raise ValueError(f"{where}echo must be a boolean, got {json.dumps(echo)}")
    if chat or not echo:
        return False, False
    if fields.get("max_tokens") == 0 and is_int(fields["max_tokens"]):
        if fields.get("min_tokens"):
            raise ValueError(f"{where}min_tokens {json.dumps(fields['min_tokens'])} with {where}echo and "
                             f"{where}max_tokens 0: no token is generated to count")
        fields["max_tokens"] = 1
        return True, True
    return True, False


def _prompt_logprobs_as_vllm_reads_them(fields: dict, stream: bool, echo: bool, where: str) -> None:
    """vLLM's prompt_logprobs go in non-streamed answers only (refused with stream, but for 0, which
    no stream shows). echo with logprobs needs them, for the prompt's tokens: as many top tokens as
    prompt_logprobs says, else as logprobs says."""
    asked = fields.get("prompt_logprobs")
    if stream and is_int(asked) and asked != 0:
        raise ValueError(f"{where}prompt_logprobs are not available when {where}stream is true")
    if echo and fields.get("logprobs") is not None:
        fields.setdefault("prompt_logprobs", fields["logprobs"])
    elif stream and asked == 0 and is_int(asked):
        del fields["prompt_logprobs"]  # not shown, so not made


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


def _completion_prompts(prompt, where: str) -> tuple[Prompt, ...]:
    """A string, token ids, or a list of strings or of token-id lists (several prompts)."""
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        return (_token_ids(prompt, f"{where}prompt"),)
    if not isinstance(prompt, list):
        return (_text_prompt(prompt, f"{where}prompt"),)
    if not prompt:
        raise ValueError(f"{where}prompt must not be an empty list")
    if len(prompt) > MAX_PROMPTS:
        raise ValueError(f"{where}prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} go in one body")
    if len({isinstance(p, list) for p in prompt}) > 1:  # as vLLM's schema: one kind or the other
        raise ValueError(f"{where}prompt must be a list of strings or a list of token-id lists, not both")
    return tuple(_token_ids(p, f"{where}prompt[{i}]") if isinstance(p, list) else _text_prompt(p, f"{where}prompt[{i}]")
                 for i, p in enumerate(prompt))


def _token_ids(ids: list, where: str) -> tuple[int, ...]:
    if not ids or not all(is_int(t) for t in ids):
        raise ValueError(f"{where} must be a string or a non-empty list of token ids, got {json.dumps(ids)[:80]}")
    if bad := [t for t in ids if not 0 <= t <= INT32_MAX]:
        raise ValueError(f"{where}: token ids must be in [0, {INT32_MAX}], got {bad[0]}")
    return tuple(ids)


def _text_prompt(text, where: str) -> str:
    text = text_field({where: text}, where)
    check_text(text, "the prompt")
    return text


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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens` when a prefix cache gave some (as vLLM
    reports them, absent otherwise)."""
    d = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        d["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return d


def echo_text(prompt: Prompt, prompt_ids: list[int] | tuple[int, ...], token_text: TokenText) -> str:
    """What echo shows of a prompt: a text as sent; token ids as the router read them, decoded."""
    return prompt if isinstance(prompt, str) else token_text.prompt(tuple(prompt_ids))


def completion_body(chat: bool, model: str, groups: list[list[Completion]], token_text: TokenText | None = None,
                    echo_texts: list[str] | None = None, echo_only: bool = False,
                    tool_answer: Callable[[], openai_tools.ToolAnswer] | None = None) -> dict:
    """A text completion or chat completion. `groups`: each prompt's completions (its n), in index
    order; choice i * n + j is prompt i's sequence j, as vLLM numbers them. Logprobs where the request
    asked for them, tokens named by `token_text`; `echo_texts`: each prompt's text, when it echoes;
    `tool_answer`: a chat with tools, a reader of each choice's calls."""
    text = token_text or TokenText()
    choices = []
    for i, group in enumerate(groups):
        for completion in group:
            echo = None if echo_texts is None else echo_texts[i]
            choices.append(_choice(len(choices), completion, chat, text, echo, echo_only))
            if tool_answer is not None:
                _read_calls(choices[-1], tool_answer())
    body = {"id": response_id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(sum(len(g[0].prompt_token_ids) for g in groups),
                           sum(len(c.token_ids) for g in groups for c in g),
                           sum(g[0].cached_prompt_tokens for g in groups))}
    first = groups[0][0]
    if chat and first.prompt_logprobs is not None:  # vLLM's chat has them once, beside the choices
        body["prompt_logprobs"] = prompt_logprobs_json(first.prompt_token_ids, first.prompt_logprobs, text)
    return body


def _choice(index: int, completion: Completion, chat: bool, text: TokenText, echo: str | None,
            echo_only: bool) -> dict:
    logprobs = None
    if completion.logprobs is not None:
        choice_logprobs, parts = ChoiceLogprobs(chat, text), []
        if echo is not None:
            parts.append(choice_logprobs.prompt_part(completion.prompt_token_ids, completion.prompt_logprobs or []))
        if not echo_only:
            parts.append(choice_logprobs.part(completion.token_ids, completion.logprobs))
        logprobs = joined(parts)
    choice = {"index": index, "logprobs": logprobs, "finish_reason": completion.finish_reason,
              "stop_reason": completion.stop_reason}
    shown = "" if echo_only else completion.text
    if chat:
        choice["message"] = {"role": "assistant", "content": shown}
    else:
        choice["text"] = shown if echo is None else echo + shown
        if completion.prompt_logprobs is not None:  # vLLM's completions have them in each choice
            choice["prompt_logprobs"] = prompt_logprobs_json(completion.prompt_token_ids, completion.prompt_logprobs,
                                                             text)
    return choice


def _read_calls(choice: dict, answer: openai_tools.ToolAnswer) -> None:
    """A chat choice's message as content and tool_calls, and its finish_reason "tool_calls" if it called."""
    content, calls = answer.whole(choice["message"]["content"])
    choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
    choice["finish_reason"] = answer.finish_reason(choice["finish_reason"])


class StreamChunks:
    """The chunk objects of one streamed response (each sent as an SSE `data:` line): every chunk
    shares the response's id and creation time; with include_usage, each has "usage": null and a
    last one without choices carries the usage, as OpenAI streams it."""

    def __init__(self, chat: bool, model: str, include_usage: bool):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id, self.created = response_id(chat), int(time.time())

    def choice(self, index: int, text: str, finish_reason: str | None = None, stop_reason=None,
               first: bool = False, logprobs: dict | None = None, tool_calls: list[dict] | None = None) -> dict:
        """A chunk of one choice: its new text (a chat's first chunk also names the role), the
        logprobs of its new tokens (ChoiceLogprobs.part) when the request asked, and a chat's
        tool_calls deltas (runtime/openai_tools.py) when it has some."""
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat:
            content = None if tool_calls and not text else text  # null beside calls, as OpenAI streams them
            choice["delta"] = {"role": "assistant", "content": content} if first else {"content": content}
            if tool_calls:
                choice["delta"]["tool_calls"] = tool_calls
        else:
            choice["text"] = text
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return self._chunk([choice])

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return chunk

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk
