"""Conversions between protobuf messages and the runtime's typed objects."""

from __future__ import annotations

import json

from splitserve.models.chat_messages import ChatTemplateError
from splitserve.protos import internal_pb2, serving_pb2
from splitserve.runtime.sampling_params import SamplingParams
from splitserve.runtime.structured_outputs import StructuredOutputs

DEFAULT_MAX_TOKENS = 16


def sampling_from_public(msg: serving_pb2.SamplingParams) -> SamplingParams:
    """Resolves defaults of unset optional fields; raises ValueError naming a bad field."""
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=msg.temperature if msg.HasField("temperature") else 0.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k if msg.HasField("top_k") else 0,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        min_tokens=msg.min_tokens,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        include_stop_str_in_output=msg.include_stop_str_in_output,
        presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        truncate_prompt_tokens=msg.truncate_prompt_tokens if msg.HasField("truncate_prompt_tokens") else None,
        n=msg.n if msg.HasField("n") else 1,
        logit_bias=dict(msg.logit_bias), allowed_token_ids=tuple(msg.allowed_token_ids) or None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        structured_outputs=structured_from_proto(msg),
        skip_special_tokens=msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True,
    )


def structured_from_proto(msg) -> StructuredOutputs | None:
    """The structured_outputs field of a public SamplingParams or an internal ResolvedSampling."""
    if not msg.HasField("structured_outputs"):
        return None
    so = msg.structured_outputs
    kind = so.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_outputs is set but names none of json, json_object, regex, choice, grammar")
    return StructuredOutputs(**{kind: tuple(so.choice.choices) if kind == "choice" else getattr(so, kind)})


def structured_to_proto(so: StructuredOutputs | None, target) -> None:
    """Sets target.structured_outputs (a public or internal message) from `so` (None: leaves it unset)."""
    if so is None:
        return
    if so.choice is not None:
        target.structured_outputs.choice.choices.extend(so.choice)
    else:
        setattr(target.structured_outputs, so.kind, getattr(so, so.kind))


def sampling_to_internal(p: SamplingParams) -> internal_pb2.ResolvedSampling:
    assert p.seed is not None, "resolve the seed (SamplingParams.with_seed) before sending"
    msg = internal_pb2.ResolvedSampling(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        seed=p.seed, stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, min_tokens=p.min_tokens,
        logprobs=p.logprobs, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty, logit_bias=dict(p.logit_bias),
        allowed_token_ids=list(p.allowed_token_ids or ()), prompt_logprobs=p.prompt_logprobs,
    )
    structured_to_proto(p.structured_outputs, msg)
    return msg


def sampling_from_internal(msg: internal_pb2.ResolvedSampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k, min_p=msg.min_p,
        seed=msg.seed, stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        min_tokens=msg.min_tokens, logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        logit_bias=dict(msg.logit_bias), allowed_token_ids=tuple(msg.allowed_token_ids) or None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        structured_outputs=structured_from_proto(msg),
    )


def chat_message_to_proto(message: dict) -> serving_pb2.ChatMessage:
    """A checked chat message (models/chat_messages.py); its calls' arguments travel as JSON text."""
    calls = [serving_pb2.ToolCall(id=c.get("id", ""), name=c["function"]["name"],
                                  arguments=json.dumps(c["function"]["arguments"], ensure_ascii=False))
             for c in message.get("tool_calls", ())]
    return serving_pb2.ChatMessage(role=message["role"], content=message["content"], name=message.get("name", ""),
                                   tool_calls=calls, tool_call_id=message.get("tool_call_id", ""))


def chat_from_proto(chat: serving_pb2.ChatMessages) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) as the chat template takes them (models/chat_messages.py checks them there);
    ChatTemplateError for a tool that is not JSON text."""
    messages = []
    for m in chat.messages:
        message = {"role": m.role, "content": m.content}
        message.update({key: getattr(m, key) for key in ("name", "tool_call_id") if getattr(m, key)})
        if m.tool_calls:
            message["tool_calls"] = [{**({"id": c.id} if c.id else {}), "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        messages.append(message)
    tools = []
    for i, text in enumerate(chat.tools):
        try:
            tools.append(json.loads(text))
        except ValueError as e:
            raise ChatTemplateError(f"tools[{i}] is not JSON text: {e}") from None
    return messages, tools or None
