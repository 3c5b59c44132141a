"""The router's public server at its admission limit: a real RouterServer on loopback whose
router holds every Generate call open (no workers needed), so the limit is reached for sure."""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.protos import serving_pb2, serving_pb2_grpc
from splitserve.runtime.admission import AdmissionConfig
from splitserve.runtime.client_types import build_request
from splitserve.runtime.router_server import RouterServer

LIMIT = 300  # above the 256 handler threads the router server once had, whatever the limit


@contextlib.contextmanager
def router_holding_calls(limit: int):
    """A router server whose every request (each sequence of n) is held open until the block ends."""
    server = RouterServer("demo", host="127.0.0.1", port=0, prefill=[], decode=[], colocated=["127.0.0.1:1"],
                          admission=AdmissionConfig(max_concurrent_requests=limit))
    release = threading.Event()

    def generate(*args, **kwargs):  # the router's generate, held open until the test ends
        release.wait(60)
        return
        yield

    server.router.generate = generate
    server.server.start()  # not start(): no worker to wait for
    server.lifecycle.open()
    try:
        yield server
    finally:
        release.set()
        server.server.stop(5).wait()
        server.router.channels.close()


@pytest.fixture
def held_router():
    with router_holding_calls(LIMIT) as server:
        yield server


def test_calls_past_the_limit_are_refused_at_once_and_health_still_answers(held_router):
    channels = [grpc.insecure_channel(held_router.address) for _ in range(4)]
    request = serving_pb2.GenerateRequest(sampling=serving_pb2.SamplingParams(max_tokens=4))
    request.token_ids.ids.extend([1, 2, 3])
    try:
        stubs = [serving_pb2_grpc.ServingStub(c) for c in channels]
        held = [stubs[i % 4].Generate(request, timeout=60) for i in range(LIMIT)]
        deadline = time.monotonic() + 30
        while held_router.admission.admitted < LIMIT:
            assert time.monotonic() < deadline, f"only {held_router.admission.admitted} of {LIMIT} calls admitted"
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stubs[0].Generate(request, timeout=10))
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and f"limit of {LIMIT}" in err.value.details()
        health = health_pb2_grpc.HealthStub(channels[1]).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - started < 5
        for call in held:
            call.cancel()
    finally:
        for channel in channels:
            channel.close()


def test_chat_messages_are_checked_by_the_router_with_the_right_status():
    """The router renders GenerateRequest.messages with the model's template before any worker
    sees the request: malformed chats and a template's refusal are INVALID_ARGUMENT, a model
    without a template FAILED_PRECONDITION."""
    import dataclasses

    from splitserve.models.chat_template import ChatTemplate

    server = RouterServer("demo", host="127.0.0.1", port=0, prefill=[], decode=[], colocated=["127.0.0.1:1"])
    seen = []

    def generate(prompt_ids, *args, **kwargs):  # no worker: record what would have been prefilled
        seen.append(prompt_ids)
        return
        yield

    server.router.generate = generate
    server.server.start()
    server.lifecycle.open()
    channel = grpc.insecure_channel(server.address)
    stub = serving_pb2_grpc.ServingStub(channel)

    def call(*messages):
        request = serving_pb2.GenerateRequest(sampling=serving_pb2.SamplingParams(max_tokens=4))
        request.messages.messages.extend(serving_pb2.ChatMessage(role=m[0], content=m[1], name=m[2] if m[2:] else "")
                                         for m in messages)
        try:
            list(stub.Generate(request, timeout=10))
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""

    metadata = server.router.metadata
    try:
        assert call(("user", "Hi")) == (grpc.StatusCode.OK, "")
        text = metadata.chat_template.render([{"role": "user", "content": "Hi"}])
        assert seen == [metadata.tokenizer.encode(text, add_special_tokens=False)]
        assert seen[0].count(metadata.config.bos_token_id) == 1  # the template's BOS, not a second one
        code, details = call()
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "non-empty list" in details
        code, details = call(("", "Hi"))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "non-empty string role" in details
        strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}{% endif %}x"
        server.router.metadata = dataclasses.replace(metadata, chat_template=ChatTemplate(strict))
        code, details = call(("assistant", "Hi"))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "refused the messages: start with a user turn" in details
        named = "{% for m in messages %}{{ m.name if m.name is defined else '-' }} {{ m.content }};{% endfor %}"
        server.router.metadata = dataclasses.replace(metadata, chat_template=ChatTemplate(named))
        assert call(("user", "Hi", "alice"), ("user", "Yo")) == (grpc.StatusCode.OK, "")
        assert seen[-1] == metadata.tokenizer.encode("alice Hi;- Yo;", add_special_tokens=False)
        # Tools and calls travel in the proto and reach the template (tests/test_tool_calls.py: as transformers).
        tooled = ("{% for t in tools %}{{ t.function.name }}({{ t.function.parameters | tojson }}) {% endfor %}"
                  "{% for m in messages %}{% for c in m.tool_calls %}{{ c.id }}={{ c.function.arguments.q }} "
                  "{% endfor %}{{ m.tool_call_id }}:{{ m.content }};{% endfor %}")
        server.router.metadata = dataclasses.replace(metadata, chat_template=ChatTemplate(tooled))
        chat = [{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"q": 7}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        request = build_request(None, None, messages=chat, tools=tools, max_tokens=4, temperature=0.0, top_p=1.0,
                                top_k=0, seed=None, stop=(), stop_token_ids=(), ignore_eos=False, request_id="t")
        list(stub.Generate(request, timeout=10))
        assert seen[-1] == metadata.tokenizer.encode('f({"type": "object"}) c1=7 :;c1:ok;', add_special_tokens=False)
        request.messages.tools[0] = "{not json"
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=10))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "tools[0] is not JSON text" in err.value.details()
        server.router.metadata = dataclasses.replace(metadata, chat_template=None)
        code, details = call(("user", "Hi"))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "has no chat template" in details
        assert len(seen) == 3
    finally:
        channel.close()
        server.server.stop(0).wait()
        server.router.channels.close()


def test_a_call_with_n_sequences_takes_n_places_and_n_past_the_limit_is_invalid():
    def request(n):
        msg = serving_pb2.GenerateRequest(sampling=serving_pb2.SamplingParams(max_tokens=4, n=n))
        msg.token_ids.ids.extend([1, 2, 3])
        return msg

    with router_holding_calls(4) as server, grpc.insecure_channel(server.address) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        held = stub.Generate(request(3), timeout=60)
        deadline = time.monotonic() + 30
        while server.admission.admitted < 3:
            assert time.monotonic() < deadline, f"{server.admission.admitted} places taken, not 3"
            time.sleep(0.02)
        for n, code, message in ((2, grpc.StatusCode.RESOURCE_EXHAUSTED, "(2 asked by this call's n)"),
                                 (5, grpc.StatusCode.INVALID_ARGUMENT, "n=5 sequences exceed this router's limit")):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request(n), timeout=10))
            assert err.value.code() is code and message in err.value.details()
        held.cancel()


def test_prompt_logprobs_that_cannot_fit_in_the_first_message_are_refused_before_any_work():
    """All prompt logprobs ride on the stream's first message; first_message_bytes bounds its size
    (checked against protobuf's own encoding of the worst case), and the router refuses a request
    over the public message cap as INVALID_ARGUMENT, not after its prefill."""
    import dataclasses

    from splitserve.models.metadata import load_metadata
    from splitserve.runtime.logprobs import TokenLogprobs
    from splitserve.runtime.router import PROMPT_LOGPROBS_MAX_BYTES, Router, first_message_bytes
    from splitserve.runtime.router_errors import RouterError
    from splitserve.runtime.sampling_params import SamplingParams

    for n, prompt_len in ((0, 300), (1, 50), (20, 40)):
        worst = TokenLogprobs(-1e30, tuple((2**31 - 1, -1e30) for _ in range(n)), rank=2**32 - 1)
        msg = serving_pb2.GenerateResponse(prompt_token_ids=[2**31 - 1] * prompt_len, prompt_logprobs=[
            worst.to_proto(serving_pb2.TokenLogprobs)] * (prompt_len - 1))
        params = SamplingParams(prompt_logprobs=n)
        assert msg.ByteSize() <= first_message_bytes(prompt_len, params) < 2 * msg.ByteSize()
    metadata = load_metadata("demo")
    metadata = dataclasses.replace(metadata, config=dataclasses.replace(metadata.config, max_model_len=10**6))
    router = Router(metadata, prefill=["127.0.0.1:1"], decode=["127.0.0.1:1"], colocated=[])
    too_long = [5] * (PROMPT_LOGPROBS_MAX_BYTES // (5 + 20 + 9 * 20) + 10)
    router.validate(too_long, SamplingParams(prompt_logprobs=0))  # 25 bytes a token: fits
    with pytest.raises(RouterError) as err:
        router.validate(too_long, SamplingParams(prompt_logprobs=20))
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs=20 for a prompt of" in str(err.value)
