"""End to end through real processes on loopback: router + prefill + decode workers."""

import concurrent.futures
import json
import re
import threading
import time

import grpc
import numpy as np
import pytest

from hf_checkpoints import hf_greedy
from stack import launched
from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.protos import serving_pb2
from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
from splitserve.runtime.sampling_params import SamplingParams

PROMPT_LENGTHS = (5, 23, 70)


def prompts_for(vocab, lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("name, prefill_tp, decode_tp, chunk_tokens", [
    ("llama3_gqa3_hd40_ropescale", 2, 4, 16),  # decode tp 4 > 3 KV heads; prompts of 23 and 70 in chunks
    ("qwen2_bias_mqa_tied", 4, 2, 0),          # 1 KV head: replicated on both meshes
])  # Every family meets transformers in-process (test_model_parity); the demo stacks below are tp 1 -> 1.
def test_disaggregated_greedy_equals_transformers(hf_checkpoint, name, prefill_tp, decode_tp, chunk_tokens):
    """(The colocated engine meets transformers on these checkpoints in test_model_parity.)"""
    directory, torch_model = hf_checkpoint(name)
    prompts = prompts_for(torch_model.config.vocab_size)
    expected = [hf_greedy(torch_model, p, 16) for p in prompts]
    with launched(str(directory), "--prefill-mesh", f"tp={prefill_tp}", "--decode-mesh", f"tp={decode_tp}",
                  "--num-pages", "64", "--prefill-chunk-tokens", str(chunk_tokens)) as stack:
        for prompt, want in zip(prompts, expected):
            tokens, _, reason = stack.generate(prompt, max_tokens=16, ignore_eos=True)
            assert tokens == want and reason == "length"
        assert {(w.role, w.mesh) for w in stack.workers()} == {("prefill", f"tp={prefill_tp}"),
                                                                ("decode", f"tp={decode_tp}")}


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory):
    """2 prefill + 2 decode workers on the demo model."""
    import os

    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("stack-cache"))
    with launched("demo", "--prefill-workers", "2", "--decode-workers", "2", "--num-pages", "256",
                  "--max-batch", "32", "--page-size", "8", "--metrics-port", "0") as stack:
        yield stack


@pytest.fixture(scope="module")
def demo_engine(demo_stack):
    return ColocatedEngine(load_model("demo", make_mesh(MeshConfig(1))),
                           EngineConfig(page_size=8, num_pages=512, max_batch=64))


def test_64_concurrent_streams_complete_and_pages_return(demo_stack, demo_engine):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 120, size=64)
    max_tokens = rng.integers(1, 24, size=64)
    prompts = [rng.integers(3, 2048, size=int(n)).tolist() for n in lengths]
    expected = [o.token_ids for o in demo_engine.generate(
        prompts, [SamplingParams(max_tokens=int(m), ignore_eos=True) for m in max_tokens])]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: demo_stack.generate(prompts[i], max_tokens=int(max_tokens[i]),
                                                              ignore_eos=True), range(64)))
    assert [tokens for tokens, _, _ in results] == expected
    assert all(reason == "length" for _, _, reason in results)
    stats = demo_stack.decode_stats()
    assert len(stats) == 2
    assert all(s.free_pages == s.total_pages and s.running == 0 and s.waiting == 0 for s in stats)


def test_the_kv_went_over_the_data_sockets(demo_stack):
    """The default transport: every KV the prefill workers sent above went over a decode worker's
    data socket (the streams' tokens equal the colocated engine's, so it arrived intact)."""
    counts = demo_stack.kv_transfers()
    assert counts.get(("prefill", "sent", "socket"), 0) >= 60  # 64 requests, a few with max_tokens=1 (no KV)
    assert counts.get(("prefill", "sent", "grpc"), 0) == 0
    assert counts[("decode", "received", "socket")] == counts[("prefill", "sent", "socket")]


def test_kv_transport_grpc_gives_the_same_tokens(demo_stack):
    """--kv-transport grpc: no data socket, Reserve names none, the KV goes through TransferKV."""
    prompts = prompts_for(2048, (9, 40), seed=13)
    want = [demo_stack.generate(p, max_tokens=12, ignore_eos=True)[0] for p in prompts]
    # The demo stack's page pool and batch, so that its compiled programs come from the cache.
    with launched("demo", "--kv-transport", "grpc", "--num-pages", "256", "--page-size", "8", "--max-batch", "32",
                  "--metrics-port", "0") as stack:
        assert [stack.generate(p, max_tokens=12, ignore_eos=True)[0] for p in prompts] == want
        counts = stack.kv_transfers()
        assert counts[("prefill", "sent", "grpc")] == counts[("decode", "received", "grpc")] == 2
        assert counts.get(("prefill", "sent", "socket"), 0) == counts.get(("decode", "received", "socket"), 0) == 0
        from splitserve.protos import internal_pb2

        reply = _decode_stub(stack).Reserve(internal_pb2.ReserveRequest(request_id="r", num_tokens=8, lease_s=5))
        assert not reply.kv_data_address and not reply.kv_ticket


def test_seeded_sampling_equals_colocated(demo_stack, demo_engine):
    prompt = prompts_for(2048, (30,), seed=3)[0]
    params = dict(max_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=77, ignore_eos=True)
    tokens, _, _ = demo_stack.generate(prompt, **params)
    assert tokens == demo_engine.generate([prompt], SamplingParams(**params))[0].token_ids
    assert demo_stack.generate(prompt, **params)[0] == tokens
    assert demo_stack.generate(prompt, **dict(params, seed=78))[0] != tokens
    # min_p travels to both workers (the prefill samples the first token, the decode worker the rest).
    plain = dict(params, top_k=0, top_p=1.0)
    cut = dict(plain, min_p=0.3)
    cut_tokens = demo_stack.generate(prompt, **cut)[0]
    assert cut_tokens == demo_engine.generate([prompt], SamplingParams(**cut))[0].token_ids
    assert cut_tokens != demo_stack.generate(prompt, **plain)[0]


def test_text_prompt_and_stop_string(demo_stack, demo_engine):
    tokens, text, reason = demo_stack.generate(text="The weather today is", max_tokens=24, ignore_eos=True)
    assert reason == "length" and text == demo_engine.model.tokenizer.decode(tokens)
    stop = text[6:10]
    _, cut_text, cut_reason = demo_stack.generate(text="The weather today is", max_tokens=24, ignore_eos=True,
                                                  stop=[stop])
    assert cut_reason == "stop" and cut_text == text[: text.index(stop)]
    _, kept_text, _ = demo_stack.generate(text="The weather today is", max_tokens=24, ignore_eos=True,
                                          stop=[stop], include_stop_str_in_output=True)
    assert kept_text == text[: text.index(stop) + len(stop)]


def test_min_tokens_holds_back_stop_ids_and_strings_on_both_workers(demo_stack, demo_engine):
    """A stop id that greedy decoding gives as the first token (sampled by the prefill worker) and a
    stop string found early: with min_tokens neither ends the request before it, and the
    disaggregated stack gives the colocated engine's tokens and text."""
    prompt = "The weather today is"
    free, free_text, _ = demo_stack.generate(text=prompt, max_tokens=24, ignore_eos=True)
    stop = free_text[2:5]
    short, short_text, _ = demo_stack.generate(text=prompt, max_tokens=24, ignore_eos=True, stop=[stop])
    assert len(short) < 6 and short_text == free_text[:2]  # without min_tokens the stop string ends it early
    prompt_ids = demo_engine.model.tokenizer.encode(prompt)
    for case in (dict(stop_token_ids=[free[0]], min_tokens=3), dict(stop=[stop], min_tokens=6),
                 dict(stop_token_ids=[free[0]], stop=[stop], min_tokens=24)):
        params = dict(max_tokens=24, ignore_eos=True, **case)
        tokens, text, reason = demo_stack.generate(text=prompt, **params)
        local = demo_engine.generate([prompt_ids], SamplingParams(**{k: tuple(v) if isinstance(v, list) else v
                                                                     for k, v in params.items()}))[0]
        assert (tokens, text, reason) == (local.token_ids, local.text, local.finish_reason), case
        assert len(tokens) >= case["min_tokens"], case
        if "stop_token_ids" in case:
            assert free[0] not in tokens[: case["min_tokens"]], case
        if "stop" in case:
            assert len(text) > len(short_text), case


def test_logprobs_through_the_stack_equal_the_colocated_engine(demo_stack, demo_engine):
    """The prefill worker's first-token logprobs and the decode worker's, through the router, equal
    the in-process engine's; Decode/Stream carries them as StreamBatched does."""
    from splitserve.protos import internal_pb2

    params = dict(max_tokens=8, ignore_eos=True, logprobs=4)
    for prompt in prompts_for(2048, (9, 33), seed=6):
        request = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=prompt),
                                              sampling=serving_pb2.SamplingParams(**params))
        tokens, logprobs = [], []
        for msg in demo_stack.serving.Generate(request, timeout=120):
            assert len(msg.logprobs) == len(msg.token_ids)
            tokens += msg.token_ids
            logprobs += msg.logprobs
        local = demo_engine.generate([prompt], SamplingParams(**params))[0]
        assert tokens == local.token_ids and len(logprobs) == len(local.logprobs) == 8
        for got, want in zip(logprobs, local.logprobs):
            assert abs(got.logprob - want.logprob) < 1e-4 and list(got.top_token_ids) == [t for t, _ in want.top]
            assert np.allclose(got.top_logprobs, [lp for _, lp in want.top], atol=1e-4)
    plain = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=[1, 2, 3]),
                                        sampling=serving_pb2.SamplingParams(max_tokens=3))
    assert not any(msg.logprobs for msg in demo_stack.serving.Generate(plain, timeout=120))

    decode = _decode_stub(demo_stack)
    sampling = internal_pb2.ResolvedSampling(max_tokens=4, top_p=1.0, seed=1, ignore_eos=True, logprobs=2)
    _reserve_and_prefill(demo_stack, decode, "own-stream-logprobs", [5, 6, 7], sampling)
    out = list(decode.Stream(internal_pb2.DecodeRequest(request_id="own-stream-logprobs", sampling=sampling),
                             timeout=60))
    assert [len(m.logprobs) for m in out] == [1, 1, 1]
    assert all(len(m.logprobs[0].top_token_ids) == 2 and m.logprobs[0].logprob <= 0 for m in out)


def test_penalties_on_the_decode_worker_equal_the_colocated_engine(demo_stack, demo_engine):
    """Concurrent requests, some penalised and some not, on the decode workers' penalty rows; the
    repetition-penalised ones need their prompt's ids on the decode worker (the router sends them)."""
    prompts = prompts_for(2048, (5, 17, 40, 9, 30, 12), seed=7)
    penalties = [(0.0, 1.5, 1.0), (0.0, 0.0, 1.0), (2.0, 0.5, 1.0), (1.0, 0.0, 1.0), (0.0, 0.0, 1.8),
                 (0.5, 0.0, 0.7)]  # (presence, frequency, repetition)
    params = [dict(max_tokens=16, ignore_eos=True, presence_penalty=p, frequency_penalty=f, repetition_penalty=r)
              for p, f, r in penalties]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda a: demo_stack.generate(a[0], **a[1])[0], zip(prompts, params)))
    want = demo_engine.generate(prompts, [SamplingParams(**p) for p in params])
    assert got == [w.token_ids for w in want]
    plain = demo_engine.generate([prompts[0], prompts[4]], SamplingParams(max_tokens=16, ignore_eos=True))
    assert got[0] != plain[0].token_ids and got[4] != plain[1].token_ids  # the penalties changed the output


def test_logit_bias_and_allowed_ids_on_both_workers_equal_the_colocated_engine(demo_stack, demo_engine):
    """The prefill samples the first token with the bias, the decode worker the rest from its bias
    rows; concurrent with unbiased and penalised requests (rows are shared with the penalties)."""
    prompts = prompts_for(2048, (12, 33, 7, 20, 26), seed=9)
    plain = demo_engine.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    first = [p.token_ids[0] for p in plain]
    extra = [dict(logit_bias={first[0]: -100.0, 77: 3.0}), dict(allowed_token_ids=[5, 77, 300, first[1]]),
             dict(), dict(presence_penalty=1.5, logit_bias={first[3]: -100.0}),
             dict(temperature=1.0, seed=5, allowed_token_ids=list(range(100, 140)))]
    params = [dict(max_tokens=10, ignore_eos=True, **e) for e in extra]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        got = list(pool.map(lambda a: demo_stack.generate(a[0], **a[1])[0], zip(prompts, params)))
    want = demo_engine.generate(prompts, [SamplingParams(**p) for p in params])
    assert got == [w.token_ids for w in want]
    assert got[0][0] != first[0] and got[3][0] != first[3] and got[2] == plain[2].token_ids
    assert set(got[1]) <= {5, 77, 300, first[1]} and set(got[4]) <= set(range(100, 140))


def test_prompt_logprobs_come_from_the_prefill_worker_on_the_first_message(demo_stack, demo_engine):
    prompt = prompts_for(2048, (20,), seed=4)[0]
    request = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=prompt), sampling=serving_pb2.SamplingParams(
        max_tokens=4, ignore_eos=True, prompt_logprobs=3))
    messages = list(demo_stack.serving.Generate(request, timeout=60, metadata=demo_stack.metadata))
    want = demo_engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=3))[0]
    got = messages[0].prompt_logprobs
    assert len(got) == len(want.prompt_logprobs) == 19 and not any(m.prompt_logprobs for m in messages[1:])
    for entry, expected in zip(got, want.prompt_logprobs):
        assert list(entry.top_token_ids) == [t for t, _ in expected.top] and entry.rank == expected.rank >= 1
        assert np.allclose([entry.logprob, *entry.top_logprobs], [expected.logprob, *(lp for _, lp in expected.top)],
                           atol=1e-5)


@pytest.mark.parametrize("prompt_ids, message", [
    ([], "a repetition penalty needs the prompt's ids"),
    ([5, 6], "a prompt of 2 ids, KV of 3 tokens"),
    ([5, 6, 99999], "outside the vocabulary"),
])
def test_decode_request_with_a_repetition_penalty_needs_its_prompt(demo_stack, demo_engine, prompt_ids, message):
    from splitserve.protos import internal_pb2, internal_pb2_grpc

    decode = _decode_stub(demo_stack)
    sampling = internal_pb2.ResolvedSampling(max_tokens=4, top_p=1.0, seed=1, ignore_eos=True, repetition_penalty=1.5)
    request_id = f"rep-{len(prompt_ids)}"
    _reserve_and_prefill(demo_stack, decode, request_id, [5, 6, 7], sampling)
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Stream(internal_pb2.DecodeRequest(request_id=request_id, sampling=sampling, prompt_ids=prompt_ids),
                           timeout=60))
    # A length that does not match the KV is refused when the second of the two arrives: the stream's
    # start (INVALID_ARGUMENT), or the KV, which then ends the waiting stream (UNAVAILABLE).
    codes = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE) if len(prompt_ids) == 2 else \
        (grpc.StatusCode.INVALID_ARGUMENT,)
    assert err.value.code() in codes and message in err.value.details()
    decode.Release(internal_pb2.ReleaseRequest(request_id=request_id))
    good = internal_pb2.DecodeRequest(request_id="rep-ok", sampling=sampling, prompt_ids=[5, 6, 7])
    if len(prompt_ids) == 3:  # the workers check a bias's ids themselves too: the step builds its row from them
        biased = internal_pb2.ResolvedSampling(max_tokens=4, top_p=1.0, seed=1, logit_bias={4096: 1.0})
        prefill_address = next(w.address for w in demo_stack.workers() if w.role == "prefill")
        prefill = internal_pb2_grpc.PrefillStub(demo_stack.worker_channel(prefill_address))
        for call in (lambda: prefill.Run(internal_pb2.PrefillRequest(request_id="b", prompt_ids=[5], sampling=biased),
                                         timeout=60),
                     lambda: list(decode.Stream(internal_pb2.DecodeRequest(request_id="rep-3", sampling=biased),
                                                timeout=60))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "outside the vocabulary" in err.value.details()
    first = _reserve_and_prefill(demo_stack, decode, "rep-ok", [5, 6, 7], sampling)
    want = demo_engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, seed=1, ignore_eos=True,
                                                            repetition_penalty=1.5))
    assert [first] + [t for m in decode.Stream(good, timeout=60) for t in m.token_ids] == want[0].token_ids


def test_cancel_mid_decode_frees_pages_promptly(demo_stack):
    request = serving_pb2.GenerateRequest(
        token_ids=serving_pb2.TokenIds(ids=list(range(3, 40))),
        sampling=serving_pb2.SamplingParams(max_tokens=1000, ignore_eos=True))
    stream = demo_stack.serving.Generate(request)
    received = 0
    for msg in stream:
        received += len(msg.token_ids)
        if received >= 5:
            break
    assert any(s.free_pages < s.total_pages for s in demo_stack.decode_stats())
    stream.cancel()
    deadline = time.monotonic() + 2.0
    while any(s.free_pages != s.total_pages for s in demo_stack.decode_stats()):
        assert time.monotonic() < deadline, "pages not freed within 2 s of the cancel"
        time.sleep(0.02)


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, "max_tokens"),
    ("temperature", -1.0, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_k", -2, "top_k"),
    ("min_tokens", 17, "min_tokens must be in [0, max_tokens=16]"),
    ("logprobs", 21, "logprobs must be in [0, 20]"),
    ("frequency_penalty", -2.5, "frequency_penalty must be in [-2, 2]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be in [0.01, 100]"),
    ("min_p", 1.5, "min_p must be in [0, 1]"),
    ("logit_bias", {5: 200.0}, "logit_bias values must be in [-100, 100]"),
    ("logit_bias", {5000: 1.0}, "name token ids [5000] outside the vocabulary [0, 2048)"),
    ("allowed_token_ids", [7, 2048], "name token ids [2048] outside the vocabulary"),
    ("prompt_logprobs", 21, "prompt_logprobs must be in [0, 20]"),
])
def test_bad_sampling_is_invalid_argument(demo_stack, field, value, message):
    with pytest.raises(grpc.RpcError) as err:
        demo_stack.generate([1, 2, 3], **{field: value})
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_bad_prompts_are_invalid_argument(demo_stack):
    for prompt, message in (([], "empty"), ([1, 99999], "outside the vocabulary"),
                            ([1] * 2040, "exceeds the model's context")):
        with pytest.raises(grpc.RpcError) as err:
            demo_stack.generate(prompt, max_tokens=16)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert demo_stack.generate([1, 2, 3], max_tokens=2)[2] == "length"  # still serving


def test_an_overlong_request_id_is_invalid_argument(demo_stack):
    """The id travels with every token between the workers and the router: a client may not
    make it megabytes long. 256 bytes pass and are echoed back."""
    ok = serving_pb2.GenerateRequest(request_id="é" * 128, sampling=serving_pb2.SamplingParams(max_tokens=2))
    ok.token_ids.ids.extend([1, 2, 3])
    assert all(m.request_id == "é" * 128 for m in demo_stack.serving.Generate(ok, timeout=60))
    bad = serving_pb2.GenerateRequest(request_id="x" * 257, sampling=serving_pb2.SamplingParams(max_tokens=2))
    bad.token_ids.ids.extend([1, 2, 3])
    with pytest.raises(grpc.RpcError) as err:
        list(demo_stack.serving.Generate(bad, timeout=60))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "request_id is 257 bytes" in err.value.details()


STRUCTURED = {"regex": r"[0-9]{2,4}(-[a-z]{1,6}){1,3}", "json": json.dumps(
    {"type": "object", "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string",
     "maxLength": 6}, "maxItems": 2}}, "required": ["id", "tags"], "additionalProperties": False,
     "x-guidance": {"whitespace_flexible": False}})}


def _structured(stack) -> list[tuple[list[int], str]]:
    """Sampled (temperature 1, fixed seeds) under a regex and a JSON schema, through the SDK."""
    from splitserve.runtime.client import Client

    with Client(stack.address) as client:
        return [(c.token_ids, c.text) for kind, spec in STRUCTURED.items() for seed in (1, 2)
                for c in [client.generate("The kitchen", max_tokens=60, temperature=1.0, seed=seed,
                                          structured_outputs={kind: spec})]]


def _assert_a_grammar_failing_midway_is_an_error(stack):
    """llguidance accepts the spec, then its lexer gives up after two tokens on the decode worker:
    the call fails with why, not a "stop" whose text breaks the spec, and the worker serves on."""
    with pytest.raises(grpc.RpcError) as err:
        stack.generate([5, 6], max_tokens=8, structured_outputs={"regex": "(a{1000}){1000}"})
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "structured_outputs.regex: the output left its grammar at token 2" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # complete, and EOS not allowed: nothing left to sample
        stack.generate([5, 6], max_tokens=8, allowed_token_ids=[67, 68, 69], structured_outputs={"regex": "[a-c]{3}"})
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "leave no token to sample after 3 output tokens" in err.value.details()
    assert len(stack.generate([5, 6], max_tokens=3, ignore_eos=True)[0]) == 3


def test_colocated_mode_equals_disaggregated(demo_stack):
    """Token for token, free and with structured outputs (whose first token's mask is the prefill
    worker's, the rest the decode worker's); the structured ones parse. The colocated side prefills
    in chunks."""
    prompt = prompts_for(2048, (17,), seed=9)[0]
    want = demo_stack.generate(prompt, max_tokens=12, ignore_eos=True)[0]
    want_structured = _structured(demo_stack)
    for (_, text), kind in zip(want_structured, [k for k in STRUCTURED for _ in (1, 2)]):
        assert re.fullmatch(STRUCTURED["regex"], text) if kind == "regex" else isinstance(json.loads(text)["id"], int)
    with pytest.raises(grpc.RpcError) as err:
        demo_stack.generate([5, 6], max_tokens=4, structured_outputs={"regex": "[0-9"})
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "unclosed character class" in err.value.details()
    _assert_a_grammar_failing_midway_is_an_error(demo_stack)
    # Chunked prefill on this side (17-token prompts in chunks of 1 and 16, with decode steps between).
    with launched("demo", "--mode", "colocated", "--kv-cache-gib", "0.05", "--prefill-chunk-tokens", "16") as stack:
        assert stack.generate(prompt, max_tokens=12, ignore_eos=True)[0] == want
        assert _structured(stack) == want_structured
        _assert_a_grammar_failing_midway_is_an_error(stack)
        assert [w.role for w in stack.workers()] == ["colocated"]
        # Pool sized from the budget: a demo page (K+V, 4 layers, 4 KV heads, 16 tokens,
        # head_dim 32, f32) is 64 KiB, so 0.05 GiB holds 819 pages, one of them the sink.
        assert [s.total_pages for s in stack.decode_stats()] == [818]


def _decode_stub(stack):
    from splitserve.protos import internal_pb2_grpc

    address = next(w.address for w in stack.workers() if w.role == "decode")
    return internal_pb2_grpc.DecodeStub(stack.worker_channel(address))  # with the internal token


def test_internal_calls_beyond_the_context_are_refused_and_workers_live_on(demo_stack):
    """The router never sends these, but a worker must not trust it: a prompt or reservation
    longer than the model's context gets INVALID_ARGUMENT, and both workers keep serving
    (unchecked, each failed its engine's next device step and took the worker down)."""
    from splitserve.protos import internal_pb2, internal_pb2_grpc

    context_len = demo_stack.serving.ModelInfo(serving_pb2.ModelInfoRequest()).max_model_len
    decode = _decode_stub(demo_stack)
    with pytest.raises(grpc.RpcError) as err:
        decode.Reserve(internal_pb2.ReserveRequest(request_id="too-long", num_tokens=context_len + 8, lease_s=30))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "context" in err.value.details()
    prefill_address = next(w.address for w in demo_stack.workers() if w.role == "prefill")
    prefill = internal_pb2_grpc.PrefillStub(demo_stack.worker_channel(prefill_address))
    sampling = internal_pb2.ResolvedSampling(max_tokens=1, top_p=1.0, seed=1)
    with pytest.raises(grpc.RpcError) as err:
        prefill.Run(internal_pb2.PrefillRequest(request_id="too-long", prompt_ids=[5] * (context_len + 1),
                                                sampling=sampling), timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "context" in err.value.details()
    tokens, _, reason = demo_stack.generate([5, 6, 7], max_tokens=3, ignore_eos=True)
    assert len(tokens) == 3 and reason == "length"
    assert prefill.Stats(internal_pb2.StatsRequest(), timeout=10).prefilled >= 0  # still answering
    assert decode.Stats(internal_pb2.StatsRequest(), timeout=10).running == 0


@pytest.mark.parametrize("damage", ["intact", "flip_a_byte", "drop_a_chunk", "no_trailer"])
def test_broken_kv_transfer_is_never_decoded(demo_stack, damage):
    from splitserve.protos import internal_pb2
    from splitserve.runtime.kv_wire import kv_chunks

    decode = _decode_stub(demo_stack)
    free_before = decode.Stats(internal_pb2.StatsRequest()).free_pages
    rid = f"broken-{damage}"
    decode.Reserve(internal_pb2.ReserveRequest(request_id=rid, num_tokens=40, lease_s=30))
    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((20, 4, 32)).astype(np.float32) for _ in range(4)]
    # Parsed back into protobuf messages and sent through the generated stub: the worker's raw-frame
    # handler must accept what any protobuf client sends.
    chunks = [internal_pb2.KVChunk.FromString(f) for f in kv_chunks(rid, 7, layers, [x + 1 for x in layers],
                                                                       chunk_bytes=4096)]
    if damage == "flip_a_byte":
        data = bytearray(chunks[3].payload.data)
        data[5] ^= 0xFF
        chunks[3].payload.data = bytes(data)
    elif damage == "drop_a_chunk":
        del chunks[4]
    elif damage == "no_trailer":
        chunks = chunks[:-1]
    sampling = internal_pb2.ResolvedSampling(max_tokens=4, top_p=1.0, seed=1, ignore_eos=True)
    if damage == "intact":  # the control: the same transfer, undamaged, is decoded
        decode.TransferKV(iter(chunks), timeout=30)
        out = list(decode.Stream(internal_pb2.DecodeRequest(request_id=rid, sampling=sampling)))
        assert len(out) == 3 and out[-1].finish_reason == "length"
        assert decode.Stats(internal_pb2.StatsRequest()).free_pages == free_before
        return
    with pytest.raises(grpc.RpcError) as err:
        decode.TransferKV(iter(chunks), timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # The reservation is gone with its pages; nothing can be decoded from that KV.
    assert decode.Stats(internal_pb2.StatsRequest()).free_pages == free_before
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Stream(internal_pb2.DecodeRequest(request_id=rid, sampling=sampling)))
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_public_services(demo_stack):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(demo_stack.channel)
    services = set(db.get_services())
    assert {"splitserve.v1.Serving", "grpc.health.v1.Health"} <= services
    generate = db.FindFileContainingSymbol("splitserve.v1.Serving")
    assert generate.package == "splitserve.v1"


def test_health_is_serving(demo_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(demo_stack.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_requests_ending_at_the_first_token_leave_no_pages_behind(demo_stack):
    prompt = prompts_for(2048, (12,), seed=11)[0]
    tokens, _, reason = demo_stack.generate(prompt, max_tokens=1)
    assert len(tokens) == 1 and reason == "length"
    first = tokens[0]
    tokens, text, reason = demo_stack.generate(prompt, max_tokens=50, stop_token_ids=[first])
    assert tokens == [first] and reason == "stop" and text == ""  # a stop token adds no text
    assert all(s.free_pages == s.total_pages for s in demo_stack.decode_stats())


def _reserve_and_prefill(stack, decode, request_id: str, prompt: list[int], sampling) -> int:
    """Does what the router does before decoding: reserve pages, prefill (the KV goes to the decode
    worker); returns the first token."""
    from splitserve.protos import internal_pb2, internal_pb2_grpc

    decode_address = next(w.address for w in stack.workers() if w.role == "decode")
    prefill_address = next(w.address for w in stack.workers() if w.role == "prefill")
    reply = decode.Reserve(internal_pb2.ReserveRequest(
        request_id=request_id, num_tokens=len(prompt) + sampling.max_tokens, lease_s=30))
    prefill = internal_pb2_grpc.PrefillStub(stack.worker_channel(prefill_address))
    return prefill.Run(internal_pb2.PrefillRequest(
        request_id=request_id, prompt_ids=prompt, sampling=sampling, decode_address=decode_address,
        kv_data_address=reply.kv_data_address, kv_ticket=reply.kv_ticket), timeout=60).first_token


def test_stream_batched_carries_every_request_of_a_step_in_one_message(demo_stack, demo_engine):
    """Decode/StreamBatched, as the router uses it: six requests started on one call get the colocated
    engine's tokens, several requests share a message, and each request's last entry ends it."""
    from splitserve.protos import internal_pb2

    decode = _decode_stub(demo_stack)
    free_before = decode.Stats(internal_pb2.StatsRequest()).free_pages
    prompts = prompts_for(2048, lengths=(5, 9, 17, 23, 40, 70), seed=7)
    want = [o.token_ids for o in demo_engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))]
    sampling = internal_pb2.ResolvedSampling(max_tokens=12, top_p=1.0, seed=1, ignore_eos=True)
    ids = [f"batched-{i}" for i in range(len(prompts))]
    got = {rid: [_reserve_and_prefill(demo_stack, decode, rid, p, sampling)] for rid, p in zip(ids, prompts)}
    finish = {}
    messages = list(decode.StreamBatched(iter([internal_pb2.DecodeRequest(request_id=rid, sampling=sampling)
                                               for rid in ids]), timeout=60))
    for message in messages:
        for entry in message.requests:
            assert entry.request_id not in finish, "tokens after a request's last entry"
            assert not entry.error_code, entry.error
            got[entry.request_id] += list(entry.token_ids)
            if entry.finish_reason:
                finish[entry.request_id] = entry.finish_reason
    assert [got[rid] for rid in ids] == want
    assert finish == {rid: "length" for rid in ids}  # every request ended, so the half-closed call ended
    assert max(len(m.requests) for m in messages) > 1
    assert len(messages) < sum(len(t) - 1 for t in want)  # fewer messages than decoded tokens
    assert decode.Stats(internal_pb2.StatsRequest()).free_pages == free_before


def test_stream_batched_reports_bad_requests_per_request_and_releases_on_cancel(demo_stack):
    """On one call: an unreserved id ends with NOT_FOUND and bad sampling with INVALID_ARGUMENT, as
    entries (the call goes on); cancelling the call frees the pages of the requests still on it,
    one decoding and one whose KV never came (only the cancel can free that one: its lease is 120 s)."""
    import queue as queue_module

    from splitserve.protos import internal_pb2

    decode = _decode_stub(demo_stack)
    free_before = decode.Stats(internal_pb2.StatsRequest()).free_pages
    sampling = internal_pb2.ResolvedSampling(max_tokens=400, top_p=1.0, seed=1, ignore_eos=True)
    _reserve_and_prefill(demo_stack, decode, "batched-long", prompts_for(2048, lengths=(30,))[0], sampling)
    decode.Reserve(internal_pb2.ReserveRequest(request_id="batched-no-kv", num_tokens=100, lease_s=120))
    outgoing = queue_module.SimpleQueue()
    call = decode.StreamBatched(iter(outgoing.get, None), timeout=60)
    try:
        outgoing.put(internal_pb2.DecodeRequest(request_id="never-reserved", sampling=sampling))
        outgoing.put(internal_pb2.DecodeRequest(request_id="batched-long",
                                                sampling=internal_pb2.ResolvedSampling(max_tokens=400, top_p=1.5)))
        errors = {}
        for message in call:
            errors.update({e.request_id: e.error_code for e in message.requests if e.error_code})
            if len(errors) == 2:
                break
        assert errors == {"never-reserved": "NOT_FOUND", "batched-long": "INVALID_ARGUMENT"}
        # The bad start left the reservation alone: started properly, it decodes on the same call.
        outgoing.put(internal_pb2.DecodeRequest(request_id="batched-long", sampling=sampling))
        outgoing.put(internal_pb2.DecodeRequest(request_id="batched-no-kv", sampling=sampling))
        tokens = 0
        for message in call:
            tokens += sum(len(e.token_ids) for e in message.requests if e.request_id == "batched-long")
            if tokens >= 3:
                break
        assert decode.Stats(internal_pb2.StatsRequest()).free_pages < free_before
        call.cancel()
    finally:
        outgoing.put(None)
    deadline = time.monotonic() + 10
    while decode.Stats(internal_pb2.StatsRequest()).free_pages != free_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert decode.Stats(internal_pb2.StatsRequest()).free_pages == free_before


def test_a_router_reader_behind_gets_the_waiting_tokens_in_one_event(demo_stack, demo_engine):
    """Router.generate in this process, against the stack's workers: while its reader is slow to take
    the next event, the tokens of the decode steps meanwhile wait and come as one event. The tokens,
    the text and a stop string's cut are those of the colocated engine, one token at a time."""
    from splitserve.models.metadata import load_metadata
    from splitserve.runtime.grpc_common import ChannelPool
    from splitserve.runtime.router import Router

    workers = demo_stack.workers()
    channels = ChannelPool(token=demo_stack.internal_token())
    router = Router(load_metadata("demo"), prefill=[w.address for w in workers if w.role == "prefill"],
                    decode=[w.address for w in workers if w.role == "decode"], colocated=[], channels=channels)
    prompt = prompts_for(2048, (21,), seed=11)[0]
    want = demo_engine.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0].token_ids
    want_text = demo_engine.model.tokenizer.decode(want)

    def read_slowly(params: SamplingParams):
        events = router.generate(prompt, params)
        head = [next(events), next(events)]
        time.sleep(1.0)  # the remaining decode steps (~5 ms each) run meanwhile
        return head, list(events)

    try:
        head, rest = read_slowly(SamplingParams(max_tokens=40, ignore_eos=True))
        events = head + rest
        assert [t for e in events for t in e.token_ids] == want
        assert "".join(e.text for e in events) == want_text
        assert [e.finish_reason for e in events] == [""] * (len(events) - 1) + ["length"]
        assert len(rest) < len(want) - 2 and max(len(e.token_ids) for e in rest) > 1  # merged
        stop = want_text[len(want_text) // 2:][:3]  # a stop string inside the merged tokens
        head, rest = read_slowly(SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))
        assert "".join(e.text for e in head + rest) == want_text[: want_text.index(stop)]
        assert rest[-1].finish_reason == "stop"
    finally:
        router.close()
        channels.close()



@pytest.fixture
def router_behind_relay(demo_stack, monkeypatch):
    """A router in this process, in front of the stack's workers, reached through a TcpRelay that can
    go silent; the public keepalive (router and SDK) pings every 0.25 s."""
    from splitserve.runtime import grpc_common, router_server
    from splitserve.runtime.security import InternalSecurity
    from tcp_relay import TcpRelay

    monkeypatch.setattr(grpc_common, "PUBLIC_KEEPALIVE", grpc_common.Keepalive(time_ms=250, timeout_ms=2500))
    workers = demo_stack.workers()
    server = router_server.RouterServer(
        "demo", host="127.0.0.1", port=0, prefill=[w.address for w in workers if w.role == "prefill"],
        decode=[w.address for w in workers if w.role == "decode"], colocated=[],
        security=InternalSecurity(token=demo_stack.internal_token()))
    server.start(worker_timeout_s=30)
    relay = TcpRelay(server.address)
    yield relay
    relay.close()
    server.stop(0)


LONG_DECODE = dict(max_tokens=2000, ignore_eos=True)  # several seconds of decode on the demo model


def _pages_held(stack) -> bool:
    return any(s.free_pages < s.total_pages for s in stack.decode_stats())


def test_the_router_ends_the_request_of_a_client_gone_silent(demo_stack, router_behind_relay):
    """A client whose connection goes silent (no FIN: a laptop closed, a network cut): the router's
    keepalive pings go unanswered, the call ends, and the decode pages of its request are freed long
    before the request would have finished (without the pings: ~20 s here, at its end)."""
    from splitserve.protos import serving_pb2_grpc

    channel = grpc.insecure_channel(router_behind_relay.address)
    try:
        request = serving_pb2.GenerateRequest(token_ids=serving_pb2.TokenIds(ids=list(range(3, 40))),
                                              sampling=serving_pb2.SamplingParams(**LONG_DECODE))
        stream = serving_pb2_grpc.ServingStub(channel).Generate(request, timeout=120)
        next(stream)
        next(stream)  # decoding
        assert _pages_held(demo_stack)
        router_behind_relay.go_silent()
        started = time.monotonic()
        while _pages_held(demo_stack):
            assert time.monotonic() - started < 8.0, "the request's pages were not freed"
            time.sleep(0.05)
    finally:
        channel.close()


def test_the_sdk_stream_ends_unavailable_when_the_router_goes_silent(demo_stack, router_behind_relay):
    """The SDK's pings find a router that went silent: the stream, which has no deadline, raises
    UNAVAILABLE instead of waiting forever."""
    from splitserve.runtime.client import Client, SplitserveError

    outcome = []

    def read():
        try:
            for _ in chunks:
                pass
            outcome.append("ended")
        except SplitserveError as e:
            outcome.append(e.code)

    with Client(router_behind_relay.address, timeout=None) as client:
        chunks = client.stream(token_ids=list(range(3, 40)), **LONG_DECODE)
        next(chunks)
        router_behind_relay.go_silent()
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(20)
        assert outcome == [grpc.StatusCode.UNAVAILABLE]
