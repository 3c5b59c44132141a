"""Typed results and the one error type of the client SDK."""

from __future__ import annotations

import dataclasses
import json

import grpc

from splitserve.models.chat_messages import check_messages, check_tools
from splitserve.protos import serving_pb2
from splitserve.runtime.logprobs import TokenLogprobs
from splitserve.runtime.request import Completion
from splitserve.runtime.proto_convert import chat_message_to_proto, structured_to_proto
from splitserve.runtime.sampling_params import INT32_MAX, bias_pairs, token_id
from splitserve.runtime.structured_outputs import structured_outputs as parse_structured_outputs

__all__ = ["Completion", "Chunk", "ModelInfo", "TokenLogprobs", "WorkerInfo", "SplitserveError", "build_request"]


class SplitserveError(Exception):
    """Any failed call: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self):  # pickled as (code, message): process pools and copy.copy rebuild it
        return type(self), (self.code, self.message)

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "SplitserveError":
        if isinstance(error, grpc.Call) or hasattr(error, "code"):
            return cls(error.code(), error.details() or "")
        return cls(grpc.StatusCode.UNKNOWN, str(error))


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What one streamed message brought: new tokens and text; finish_reason on the last."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_token_ids: list[int]  # on the first chunk only
    logprobs: list[TokenLogprobs] | None = None  # one per token_ids entry, when the request asked for them
    stop_reason: str | int | None = None  # on the last chunk: the stop string or stop token id that ended it
    index: int = 0  # which of the request's n sequences (stream(n=...)) this chunk continues
    # On a sequence's first chunk, when the request asked: one per prompt token after the first.
    prompt_logprobs: list[TokenLogprobs] | None = None
    cached_prompt_tokens: int = 0  # on a sequence's first chunk: prompt tokens taken from a prefix cache


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    role: str
    address: str
    mesh: str
    platform: str


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    vocab_size: int
    max_model_len: int
    dtype: str
    page_size: int
    eos_token_ids: list[int]
    workers: list[WorkerInfo]
    mode: str
    chat_template: bool = False  # generate(messages=...) is accepted

    @classmethod
    def from_proto(cls, msg: serving_pb2.ModelInfoResponse) -> "ModelInfo":
        return cls(msg.name, msg.family, msg.vocab_size, msg.max_model_len, msg.dtype, msg.page_size,
                   list(msg.eos_token_ids), [WorkerInfo(w.role, w.address, w.mesh, w.platform) for w in msg.workers],
                   msg.mode, msg.chat_template)


def build_request(prompt: str | None, token_ids: list[int] | None, *, max_tokens: int, temperature: float,
                  top_p: float, top_k: int, seed: int | None, stop, stop_token_ids, ignore_eos: bool,
                  request_id: str, messages=None, min_tokens: int = 0, logprobs: int | None = None,
                  include_stop_str_in_output: bool = False, presence_penalty: float = 0.0,
                  frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                  truncate_prompt_tokens: int | None = None, n: int = 1, min_p: float = 0.0,
                  logit_bias=None, allowed_token_ids=None, prompt_logprobs: int | None = None,
                  structured_outputs=None, skip_special_tokens: bool = True, tools=None
                  ) -> serving_pb2.GenerateRequest:
    if sum(x is not None for x in (prompt, token_ids, messages)) != 1:
        raise ValueError("give exactly one of prompt (text), token_ids or messages (a chat)")
    if messages is not None:
        messages = check_messages(messages)  # the router renders them with the model's chat template
    if tools is not None and messages is None:
        raise ValueError("tools go with messages (the chat template describes them), not with a text or token ids")
    stop = [stop] if isinstance(stop, str) else list(stop or ())  # one string is one stop string, not its letters
    stop_token_ids = list(stop_token_ids or ())
    # What the protos' integer fields cannot carry is refused here, by name (protobuf would say only
    # "Value out of range"); values they carry go to the router, which answers INVALID_ARGUMENT.
    int32 = (-INT32_MAX - 1, INT32_MAX)
    for name, value, (low, high) in (("max_tokens", max_tokens, (0, 2**32 - 1)), ("top_k", top_k, int32),
                                     ("min_tokens", min_tokens, (0, 2**32 - 1)),
                                     ("logprobs", 0 if logprobs is None else logprobs, (0, 2**32 - 1)),
                                     ("prompt_logprobs", prompt_logprobs or 0, (0, 2**32 - 1)),
                                     ("truncate_prompt_tokens", truncate_prompt_tokens or 0, int32),
                                     ("n", n, (0, 2**32 - 1)),
                                     ("seed", 0 if seed is None else seed, (0, 2**64 - 1))):
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    for name, ids in (("token_ids", token_ids or ()), ("stop_token_ids", stop_token_ids)):
        if bad := [t for t in ids if not int32[0] <= t <= int32[1]]:
            raise ValueError(f"{name} must be 32-bit integers, got {bad[0]}")
    sampling = serving_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                          min_p=min_p,
                                          stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                                          min_tokens=min_tokens, include_stop_str_in_output=include_stop_str_in_output,
                                          presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                          repetition_penalty=repetition_penalty)
    if seed is not None:
        sampling.seed = seed
    if logprobs is not None:
        sampling.logprobs = logprobs
    if prompt_logprobs is not None:
        sampling.prompt_logprobs = prompt_logprobs
    if truncate_prompt_tokens is not None:
        sampling.truncate_prompt_tokens = truncate_prompt_tokens
    if n != 1:
        sampling.n = n
    if not isinstance(skip_special_tokens, bool):  # None or "false" would read as a boolean
        raise ValueError(f"skip_special_tokens must be True or False, got {skip_special_tokens!r}")
    if not skip_special_tokens:
        sampling.skip_special_tokens = False
    sampling.logit_bias.update(bias_pairs(logit_bias))  # keys may be strings, as OpenAI's JSON has them
    if allowed_token_ids is not None:
        if isinstance(allowed_token_ids, (str, bytes)) or not allowed_token_ids:  # the proto's empty list: any id
            raise ValueError(f"allowed_token_ids must be a non-empty list of token ids (or None), "
                             f"got {allowed_token_ids!r}")
        sampling.allowed_token_ids.extend(token_id(t, "allowed_token_ids") for t in allowed_token_ids)
    # A StructuredOutputs or a dict of its fields (json: a schema, as a dict or JSON text); the
    # router compiles it, and answers INVALID_ARGUMENT with llguidance's message if it does not.
    structured_to_proto(parse_structured_outputs(structured_outputs), sampling)
    request = serving_pb2.GenerateRequest(sampling=sampling, request_id=request_id)
    if prompt is not None:
        request.text = prompt
    elif messages is not None:
        request.messages.messages.extend(chat_message_to_proto(m) for m in messages)
        request.messages.tools.extend(json.dumps(t, ensure_ascii=False) for t in check_tools(tools or ()))
    else:
        request.token_ids.ids.extend(token_ids)
    return request


def chunk_from_proto(msg: serving_pb2.GenerateResponse) -> Chunk:
    which = msg.WhichOneof("stop_reason")
    return Chunk(list(msg.token_ids), msg.text, msg.finish_reason or None, list(msg.prompt_token_ids),
                 [TokenLogprobs.from_proto(lp) for lp in msg.logprobs] if msg.logprobs else None,
                 getattr(msg, which) if which else None, msg.index,
                 [TokenLogprobs.from_proto(lp) for lp in msg.prompt_logprobs] if msg.prompt_logprobs else None,
                 msg.cached_prompt_tokens)


class SequencesBuilder:
    """Accumulates the interleaved chunks of an n-sequence request into n Completions, in index order."""

    def __init__(self, start_s: float, n: int, prompt_logprobs_asked: bool = False):
        self.sequences = [CompletionBuilder(start_s, prompt_logprobs_asked) for _ in range(n)]
        self.ends: list[float | None] = [None] * n  # when each sequence's last chunk came
        self.prompt_ids: list[int] = []

    def add(self, chunk: Chunk, now_s: float) -> None:
        if not 0 <= chunk.index < len(self.sequences):
            raise SplitserveError(grpc.StatusCode.INTERNAL, f"the router sent sequence {chunk.index} of "
                                                            f"{len(self.sequences)}")
        self.prompt_ids = self.prompt_ids or chunk.prompt_token_ids  # on the call's first chunk only
        self.sequences[chunk.index].add(chunk, now_s)
        if chunk.finish_reason:
            self.ends[chunk.index] = now_s

    def build(self, end_s: float) -> list[Completion]:
        for sequence in self.sequences:
            sequence.prompt_ids = list(self.prompt_ids)
        return [sequence.build(end_s if end is None else end) for sequence, end in zip(self.sequences, self.ends)]


class CompletionBuilder:
    """Accumulates chunks into a Completion, timing the first token and the last."""

    def __init__(self, start_s: float, prompt_logprobs_asked: bool = False):
        """`prompt_logprobs_asked`: a one-token prompt then gets [] (its message has no entries)."""
        self.start_s = start_s
        self.first_s: float | None = None
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.prompt_ids: list[int] = []
        self.finish_reason = ""
        self.logprobs: list[TokenLogprobs] | None = None
        self.stop_reason: str | int | None = None
        self.prompt_logprobs: list[TokenLogprobs] | None = [] if prompt_logprobs_asked else None
        self.cached_prompt_tokens = 0

    def add(self, chunk: Chunk, now_s: float) -> None:
        if self.first_s is None and chunk.token_ids:
            self.first_s = now_s
        self.tokens += chunk.token_ids
        self.text.append(chunk.text)
        self.prompt_ids = self.prompt_ids or chunk.prompt_token_ids
        self.finish_reason = chunk.finish_reason or self.finish_reason
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + chunk.logprobs
        if chunk.stop_reason is not None:
            self.stop_reason = chunk.stop_reason
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        self.cached_prompt_tokens = self.cached_prompt_tokens or chunk.cached_prompt_tokens

    def build(self, end_s: float) -> Completion:
        first = self.first_s if self.first_s is not None else end_s
        return Completion(text="".join(self.text), token_ids=self.tokens, prompt_token_ids=self.prompt_ids,
                          finish_reason=self.finish_reason, ttft_s=first - self.start_s, latency_s=end_s - self.start_s,
                          logprobs=self.logprobs, stop_reason=self.stop_reason, prompt_logprobs=self.prompt_logprobs,
                          cached_prompt_tokens=self.cached_prompt_tokens)
