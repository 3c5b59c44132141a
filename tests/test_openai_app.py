"""The OpenAI-compatible server's app on a real HTTP port, in front of a scripted stand-in for the
router's SDK client: the paths a real stack does not take on demand (a worker failing mid-stream,
a call that ends with no answer) and malformed HTTP requests. tests/test_openai_server.py runs it
against a launched stack."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import pytest

from splitserve.runtime.client_types import Chunk, ModelInfo, SplitserveError
from splitserve.runtime.grpc_common import PUBLIC_MAX_MESSAGE_BYTES
from splitserve.runtime.logprobs import TokenLogprobs
from splitserve.runtime.openai_server import OpenAIServer, field_named

MODEL = ModelInfo("m", "llama", 100, 64, "float32", 8, [2], [], "disaggregated", True)


class ScriptedRouter:
    """Answers every stream with the same script: Chunks, and an exception where the call fails."""

    def __init__(self, script):
        self.script, self.asked = script, []

    async def stream(self, prompt=None, *, token_ids=None, messages=None, **sampling):
        self.asked.append(sampling)
        for item in self.script:
            if isinstance(item, Exception):
                raise item
            yield item

    async def health(self, timeout=None):
        return "SERVING"


def chunk(text, token, finish=None, prompt=(), stop_reason=None):
    return Chunk([token], text, finish, list(prompt), stop_reason=stop_reason)


async def serve(router, api_key=None, tokenizer=None):
    server = OpenAIServer(router, MODEL, api_key=api_key, tokenizer=tokenizer)
    runner = server.runner()
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def post(base, path, body=None, *, data=None, headers=None):
    """(status, parsed JSON or the list of SSE data fields)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(base + path, json=body, data=data, headers=headers) as reply:
            text = await reply.text()
            if reply.content_type == "text/event-stream":
                return reply.status, [line[6:] for line in text.split("\n") if line.startswith("data: ")]
            return reply.status, json.loads(text)


def run(script, requests, api_key=None, router=None, tokenizer=None):
    """Each request of `requests` (coroutines of a base URL) against a server on `script`."""
    async def main():
        runner, base = await serve(router or ScriptedRouter(script), api_key, tokenizer)
        try:
            return [await r(base) for r in requests]
        finally:
            await runner.cleanup()
    return asyncio.run(main())


ANSWER = [chunk("Hel", 5, prompt=(1, 7)), chunk("lo", 6), chunk("", 2, finish="stop", stop_reason=None)]


def test_a_stream_ends_with_usage_and_done():
    (status, events), = run(ANSWER, [lambda b: post(b, "/v1/completions", {
        "prompt": "x", "stream": True, "stream_options": {}})])  # {}: usage, as vLLM defaults it
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["choices"][0]["stop_reason"] is None
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_a_failure_after_the_first_token_is_an_error_event_then_done():
    script = [ANSWER[0], SplitserveError(grpc.StatusCode.UNAVAILABLE, "decode worker 127.0.0.1:9 went away")]
    (status, events), (plain_status, plain) = run(script, [
        lambda b: post(b, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        lambda b: post(b, "/v1/completions", {"prompt": "x"})])
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert json.loads(events[-2]) == {"error": {"message": "decode worker 127.0.0.1:9 went away",
                                                "type": "InternalServerError", "param": None, "code": 503}}
    assert plain_status == 503 and plain["error"]["code"] == 503 and "went away" in plain["error"]["message"]


def test_a_call_that_ends_without_an_answer_is_a_server_error():
    for script in ([], ANSWER[:1]):  # nothing at all; tokens but no finish
        results = run(script, [lambda b: post(b, "/v1/completions", {"prompt": "x"}),
                               lambda b: post(b, "/v1/completions", {"prompt": "x", "stream": True})])
        assert results[0][0] == 500 and "without an answer" in results[0][1]["error"]["message"]
        status, streamed = results[1]
        if not script:
            assert status == 500 and "without an answer" in streamed["error"]["message"]
        else:  # the status went out with the first token: the stream says it, then ends
            assert status == 200 and streamed[-1] == "[DONE]"
            assert json.loads(streamed[-2])["error"]["code"] == 500 and json.loads(streamed[0])["choices"]


def test_malformed_http_bodies_get_openai_errors():
    deep = b"[" * 100_000 + b"]" * 100_000
    results = run(ANSWER, [
        lambda b: post(b, "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"}),
        lambda b: post(b, "/v1/completions", data=b'{"prompt": "x"}',
                       headers={"Content-Type": "application/json; charset=no-such-charset"}),
        lambda b: post(b, "/v1/completions", data=deep, headers={"Content-Type": "application/json"}),
        lambda b: post(b, "/v1/completions", data=b" " * (PUBLIC_MAX_MESSAGE_BYTES + 1),
                       headers={"Content-Type": "application/json"}),
        lambda b: post(b, "/v1/completions", {"prompt": "x", "tools": [{"type": "function",
                                                                        "function": {"name": "f"}}]}),
        lambda b: post(b, "/v1/completions", {"prompt": "x", "echo": False, "store": True, "user": "u",
                                              "messages": None}),
    ])
    assert [status for status, _ in results] == [400, 400, 400, 413, 400, 200]
    assert all(body["error"]["code"] == status for status, body in results[:5])
    assert "not valid JSON" in results[0][1]["error"]["message"]
    assert "tools" in results[4][1]["error"]["message"]


def test_unknown_paths_and_methods_get_openai_errors():
    async def ask(base, method, path):
        async with aiohttp.ClientSession() as session:
            async with session.request(method, base + path) as reply:
                return reply.status, reply.headers.get("Allow"), await reply.json()

    results = run(ANSWER, [lambda b: ask(b, "GET", "/v1/embeddings"), lambda b: ask(b, "GET", "/v1/completions"),
                           lambda b: ask(b, "DELETE", "/v1/models")])
    (missing, _, body), (wrong, allow, wrong_body), (deleted, _, _) = results
    assert missing == 404 and body["error"]["type"] == "NotFoundError" and body["error"]["code"] == 404
    assert "no such path: /v1/embeddings" in body["error"]["message"] and "POST /v1/chat/completions" in body["error"]["message"]
    assert wrong == deleted == 405 and allow == "POST" and wrong_body["error"] == {
        "message": "GET is not allowed on /v1/completions (allowed: POST)", "type": "MethodNotAllowedError",
        "param": None, "code": 405}


@pytest.mark.parametrize("message, param", [
    ("temperature must be a number, got \"x\"", "temperature"),
    ("messages[1].tool_calls[0].function.arguments is not valid JSON: \"{\"", "messages[1].tool_calls[0].function.arguments"),
    ("missing messages", "messages"), ("unknown field foo", "foo"), ("unknown fields a, b", "a"),
    ("unknown structured_outputs field foo", None), ("the body is not valid JSON: ...", None),
    ("tools[0] must be an object with type \"function\"", "tools[0]"),
])
def test_a_reading_error_names_the_field_it_begins_with_as_openai_param(message, param):
    assert field_named(message) == param


def test_the_api_key_is_checked_on_every_v1_path():
    key = {"Authorization": "Bearer k"}
    results = run(ANSWER, [
        lambda b: post(b, "/v1/completions", {"prompt": "x"}),  # no header
        lambda b: post(b, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer \xff"}),
        lambda b: post(b, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer kk"}),
        lambda b: post(b, "/v1/completions", {"prompt": "x"}, headers=key),
    ], api_key="k")
    assert [status for status, _ in results] == [401, 401, 401, 200]
    assert results[3][1]["choices"][0]["text"] == "Hello"


def test_raw_header_bytes_and_a_bad_encoding_get_answers_not_tracebacks():
    async def raw(base, header: bytes, body: bytes) -> bytes:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header +
                     b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        reply = await reader.read()
        writer.close()
        return reply

    replies = run(ANSWER, [
        lambda b: raw(b, b"Authorization: Bearer \xff\r\n", b'{"prompt": "x"}'),  # not UTF-8
        lambda b: raw(b, b"Authorization: Bearer k\r\nContent-Encoding: gzip\r\n", b"not gzip at all"),
    ], api_key="k")
    assert replies[0].startswith(b"HTTP/1.1 401") and b'"code": 401' in replies[0]
    assert replies[1].startswith(b"HTTP/1.1 400") and b"could not be read" in replies[1]


SECOND = [Chunk([9], "Yo", None, [], index=1), Chunk([2], "", "stop", [], index=1)]


@pytest.mark.parametrize("body, sent, script", [
    ({"prompt": "x", "max_completion_tokens": 3, "max_tokens": 9, "top_k": 2}, dict(max_tokens=3, top_k=2), ANSWER),
    ({"prompt": "x", "n": 2, "seed": 4, "temperature": 0.5}, dict(n=2, seed=4, temperature=0.5), ANSWER + SECOND),
])
def test_the_sampling_fields_reach_the_router(body, sent, script):
    router = ScriptedRouter(script)
    (status, reply), = run(None, [lambda b: post(b, "/v1/completions", body)], router=router)
    assert status == 200 and {k: router.asked[0][k] for k in sent} == sent
    assert [c["text"] for c in reply["choices"]] == ["Hello", "Yo"][:sent.get("n", 1)]


def test_n_sequences_must_all_end():
    (status, reply), = run(ANSWER, [lambda b: post(b, "/v1/completions", {"prompt": "x", "n": 2})])
    assert status == 500 and "without an answer" in reply["error"]["message"]


def test_without_a_tokenizer_logprobs_name_tokens_by_id():
    script = [Chunk([5, 6], "ab", None, [1], logprobs=[TokenLogprobs(-0.5, ((5, -0.5), (8, -1.0))),
                                                       TokenLogprobs(-2.0, ((7, -0.1),))]),
              Chunk([2], "", "stop", [], logprobs=[TokenLogprobs(-0.25, ((2, -0.25),))])]
    (status, reply), (_, events) = run(script, [
        lambda b: post(b, "/v1/completions", {"prompt": "x", "logprobs": 1}),
        lambda b: post(b, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                                   "top_logprobs": 1, "stream": True})])
    assert status == 200 and reply["choices"][0]["logprobs"] == {
        "text_offset": [0, 10, 20], "token_logprobs": [-0.5, -2.0, -0.25],
        "tokens": ["token_id:5", "token_id:6", "token_id:2"],
        "top_logprobs": [{"token_id:5": -0.5, "token_id:8": -1.0}, {"token_id:7": -0.1, "token_id:6": -2.0},
                         {"token_id:2": -0.25}]}
    parts = [json.loads(e)["choices"][0]["logprobs"] for e in events[:-1]]
    assert [entry["token"] for part in parts for entry in part["content"]] == ["token_id:5", "token_id:6", "token_id:2"]
    assert parts[1]["content"][0]["top_logprobs"] == [{"token": "token_id:2", "logprob": -0.25,
                                                       "bytes": list(b"token_id:2")}]


def test_logprobs_tokens_join_into_the_text_across_utf8_characters():
    """Byte-level BPE splits "é" and "你" across tokens: a token inside a character has the text "",
    the one that completes it the whole character, so the texts join into what transformers decodes,
    and "bytes" are each token's own (they join into the text's UTF-8)."""
    import transformers

    from splitserve.models.demo import ensure_demo_model
    from splitserve.models.tokenizer import Tokenizer

    text = "héllo 你好"
    hf = transformers.AutoTokenizer.from_pretrained(ensure_demo_model())
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) - 2, "the demo tokenizer should split these characters into bytes"
    lone = [i for i in range(3, 300) if hf.decode([i]) == "\ufffd"][:2]  # two ids that both read "\ufffd" alone
    logprobs = [TokenLogprobs(-0.5, ((t, -0.5), *((lone[0], -1.0), (lone[1], -2.0)))) for t in ids]
    script = [Chunk(ids[:3], "h", None, [1], logprobs=logprobs[:3]),
              Chunk(ids[3:], text[1:], "length", [], logprobs=logprobs[3:])]
    (_, plain), (_, events) = run(script, [
        lambda b: post(b, "/v1/completions", {"prompt": "x", "logprobs": 2}),
        lambda b: post(b, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                                   "top_logprobs": 2, "stream": True})],
        tokenizer=Tokenizer.maybe_load(ensure_demo_model()))
    got = plain["choices"][0]["logprobs"]
    assert "".join(got["tokens"]) == hf.decode(ids) == text
    assert got["text_offset"] == [len("".join(got["tokens"][:i])) for i in range(len(ids))]
    assert all(top[token] == -0.5 for top, token in zip(got["top_logprobs"], got["tokens"]))
    after_h = got["top_logprobs"][1]  # at a character boundary both lone bytes read "\ufffd": the likelier stays
    assert after_h["\ufffd"] == -1.0
    content = [e for event in events[:-1] for e in json.loads(event)["choices"][0]["logprobs"]["content"]]
    assert "".join(e["token"] for e in content) == text
    assert b"".join(bytes(e["bytes"]) for e in content) == text.encode()


def test_token_bytes_of_a_sentencepiece_style_tokenizer():
    """Metaspace pieces ("\u2581" for a space) and byte-fallback pieces (<0xC3>) map to the bytes they
    stand for, as the tokenizer's own decoder reads them."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from splitserve.models.tokenizer import Tokenizer

    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_vocab = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(["hello world the sea", "hello there"],  # the byte pieces in the vocabulary
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *bytes_vocab]))
    ids = tok.encode("hello world é").ids
    assert "<0xC3>" in [tok.id_to_token(i) for i in ids]
    assert b"".join(Tokenizer(tok).token_bytes(i) for i in ids) == " hello world é".encode()


class PerPromptRouter:
    """Each prompt's stream follows its own script: Chunks, exceptions, and "hold" (the call waits until
    cancelled). Records which prompts' calls ended, and how."""

    def __init__(self, scripts: dict):
        self.scripts, self.ended = scripts, {}

    async def stream(self, prompt=None, *, token_ids=None, messages=None, **sampling):
        how = "finished"
        try:
            for item in self.scripts[prompt]:
                if item == "hold":
                    await asyncio.sleep(60)
                elif isinstance(item, Exception):
                    how = "failed"
                    raise item
                else:
                    yield item
        except (GeneratorExit, asyncio.CancelledError):
            how = "cancelled"
            raise
        finally:
            self.ended[prompt] = how


def test_one_prompt_failing_fails_the_body_and_cancels_the_other_prompts_calls():
    """Several prompts run as concurrent calls: the first error answers the whole body (an HTTP status
    before any chunk went out, else an error event), and the calls still running are cancelled."""
    busy = SplitserveError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the router admits at most 2 requests")
    for stream in (False, True):
        router = PerPromptRouter({"a": [chunk("Hel", 5, prompt=(1, 7)), "hold"], "b": ["hold"],
                                  "c": [chunk("x", 8, prompt=(1,)), busy]})
        (status, reply), = run(None, [lambda b: post(b, "/v1/completions", {"prompt": ["a", "b", "c"],
                                                                            "stream": stream})], router=router)
        assert router.ended == {"a": "cancelled", "b": "cancelled", "c": "failed"}
        if not stream:
            assert status == 429 and "admits at most 2" in reply["error"]["message"]
        else:  # the status went out with the first chunk: the stream says it, then ends
            assert status == 200 and reply[-1] == "[DONE]"
            assert json.loads(reply[-2])["error"]["code"] == 429
            assert {json.loads(e)["choices"][0]["index"] for e in reply[:-2]} == {0, 2}


def test_echo_of_token_ids_needs_a_tokenizer_and_a_text_prompt_is_echoed_as_sent():
    router = PerPromptRouter({None: ANSWER, "x y": ANSWER})
    (status, reply), (ok, body) = run(None, [
        lambda b: post(b, "/v1/completions", {"prompt": [1, 7], "echo": True}),
        lambda b: post(b, "/v1/completions", {"prompt": "x y", "echo": True})], router=router)
    assert status == 400 and "needs the model's tokenizer" in reply["error"]["message"]
    assert ok == 200 and body["choices"][0]["text"] == "x yHello"


def test_echo_of_a_one_token_prompt_streamed_and_not():
    """A one-token prompt has no prompt logprobs (its message carries none): echo shows its text with a
    null logprob and top dict; with max_tokens 0 the token made is left out of text and logprobs but
    counted in the usage, streamed or not."""
    from splitserve.models.demo import ensure_demo_model
    from splitserve.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.maybe_load(ensure_demo_model())
    bos = tokenizer.decode([1], skip_special_tokens=False)
    script = [Chunk([5], "x", "length", [1], logprobs=[TokenLogprobs(-0.5, ((5, -0.5),))])]
    body = {"prompt": [1], "echo": True, "max_tokens": 0, "logprobs": 1}
    (status, plain), (_, events), (_, generated) = run(script, [
        lambda b: post(b, "/v1/completions", body),
        lambda b: post(b, "/v1/completions", dict(body, stream=True, stream_options={"include_usage": True})),
        lambda b: post(b, "/v1/completions", dict(body, max_tokens=1))], tokenizer=tokenizer)
    alone = {"text_offset": [0], "token_logprobs": [None], "tokens": [bos], "top_logprobs": [None]}
    choice = plain["choices"][0]
    assert status == 200 and choice["text"] == bos and choice["logprobs"] == alone
    assert choice["prompt_logprobs"] == [None] and plain["usage"]["completion_tokens"] == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["text"] == bos and chunks[0]["choices"][0]["logprobs"] == alone
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    x = tokenizer.token_bytes(5).decode()
    assert generated["choices"][0]["text"] == bos + "x" and generated["choices"][0]["logprobs"] == {
        "text_offset": [0, len(bos)], "token_logprobs": [None, -0.5], "tokens": [bos, x],
        "top_logprobs": [None, {x: -0.5}]}


def test_prompt_logprobs_json_puts_the_prompt_token_first_and_keeps_its_top_rank():
    from splitserve.runtime.openai_logprobs import TokenText, prompt_logprobs_json

    entries = [TokenLogprobs(-1.0, ((7, -0.5), (5, -1.0)), rank=2), TokenLogprobs(-9.0, ((7, -0.1),), rank=40)]
    got = prompt_logprobs_json((3, 5, 6), entries, TokenText())
    assert got[0] is None and list(got[1]) == ["5", "7"] and list(got[2]) == ["6", "7"]
    assert got[1]["5"] == {"logprob": -1.0, "rank": 2, "decoded_token": "token_id:5"}
    assert got[2]["6"]["rank"] == 40 and got[2]["7"] == {"logprob": -0.1, "rank": 1, "decoded_token": "token_id:7"}


def test_merged_runs_at_most_a_window_of_sequences_and_a_call_cancelled_under_it_is_an_error():
    """openai_stream.merged: a body's calls start as they are first read, at most WINDOW // n at a
    time; a stream whose call is cancelled underneath (its channel closed) ends the merge with
    CANCELLED instead of leaving it waiting."""
    from splitserve.runtime import openai_stream

    running, peak = 0, 0

    async def call(i):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            for token in range(3):
                await asyncio.sleep(0.001)
                yield Chunk([token], "t", "length" if token == 2 else None, [1] if token == 0 else [])
        finally:
            running -= 1

    async def cancelled_under_it():
        yield Chunk([1], "a", None, [1])
        raise asyncio.CancelledError  # what a grpc.aio call raises when its channel closes

    async def main():
        got = [place async for place, _ in openai_stream.merged([call(i) for i in range(200)], n=2)]
        errors = []
        for streams in ([call(0), cancelled_under_it()], [cancelled_under_it()]):  # several, and the direct path
            with pytest.raises(SplitserveError) as e:
                async for _ in openai_stream.merged(streams):
                    pass
            errors.append(e.value)
        return got, errors

    got, errors = asyncio.run(asyncio.wait_for(main(), 10))
    assert sorted(got) == sorted(list(range(200)) * 3) and peak == openai_stream.WINDOW // 2
    assert [e.code for e in errors] == [grpc.StatusCode.CANCELLED] * 2


def test_metrics_count_requests_by_handler_and_status():
    """/metrics (open, as /health): every request by its route and status, 401s and 404s included;
    durations per route; nothing left in flight. Read back with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    async def get(base, path, headers=None):
        async with aiohttp.ClientSession() as session:
            async with session.get(base + path, headers=headers) as reply:
                return reply.status, await reply.text()

    auth = {"Authorization": "Bearer k"}
    results = run(ANSWER, [lambda b: post(b, "/v1/completions", {"prompt": "x"}, headers=auth),
                           lambda b: post(b, "/v1/completions", {"prompt": "x", "stream": True}, headers=auth),
                           lambda b: post(b, "/v1/completions", {"prompt": "x", "max_tokens": -1}, headers=auth),
                           lambda b: post(b, "/v1/chat/completions", {"messages": []}),  # no key: 401
                           lambda b: get(b, "/v2/nothing"),
                           lambda b: get(b, "/v1/completions", auth),  # a wrong method: 405
                           lambda b: get(b, "/metrics")], api_key="k")
    status, text = results[-1]
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    count = lambda handler, code: samples.get(  # noqa: E731
        ("splitserve_http_requests_total", (("handler", handler), ("status", code))), 0)
    assert count("/v1/completions", "200") == 2 and count("/v1/completions", "400") == 1
    assert count("/v1/chat/completions", "401") == 1 and count("other", "404") == 1
    assert count("other", "405") == 1
    assert samples[("splitserve_http_request_duration_seconds_count", (("handler", "/v1/completions"),))] == 3
    assert samples[("splitserve_http_requests_in_flight", ())] == 1  # the /metrics request itself
