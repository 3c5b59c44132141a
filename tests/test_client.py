"""The client SDK and `generate --address` against a real launched stack."""

import asyncio
import json
import os
import subprocess
import sys
import time

import grpc
import pytest

from stack import launched
from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.client import AsyncClient, Client, SplitserveError
from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
from splitserve.runtime.sampling_params import SamplingParams

PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("client-cache"))
    with launched("demo", "--num-pages", "128", "--page-size", "8") as s:
        yield s


@pytest.fixture(scope="module")
def engine():
    """The colocated engine on the stack's model: what the router's answers are compared with."""
    return ColocatedEngine(load_model("demo", make_mesh(MeshConfig(1))), EngineConfig(page_size=8, num_pages=300))


@pytest.fixture(scope="module")
def expected(stack, engine):
    prompt = engine.model.tokenizer.encode(PROMPT)
    return engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]


def test_generate_returns_a_typed_completion(stack, expected):
    with Client(stack.address) as client:
        out = client.generate(PROMPT, max_tokens=12, ignore_eos=True)
    assert out.token_ids == expected.token_ids and out.text == expected.text
    assert out.prompt_token_ids == expected.prompt_token_ids and out.finish_reason == "length"
    assert 0 < out.ttft_s <= out.latency_s


def test_min_tokens_reaches_the_router_and_the_workers(stack, expected):
    first = expected.token_ids[0]
    with Client(stack.address) as client:
        stopped = client.generate(PROMPT, max_tokens=12, ignore_eos=True, stop_token_ids=[first])
        held = client.generate(PROMPT, max_tokens=12, ignore_eos=True, stop_token_ids=[first], min_tokens=12)
        with pytest.raises(SplitserveError) as err:
            client.generate(PROMPT, max_tokens=4, min_tokens=5)
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.stop_reason == first
    assert len(held.token_ids) == 12 and first not in held.token_ids and held.finish_reason == "length"
    assert held.stop_reason is None and "stop_reason" not in held.to_json_dict()
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "min_tokens" in str(err.value)


def test_stop_reason_names_the_stop_string_that_ended_the_text(stack, expected, engine):
    """vLLM's stop_reason through the router: the stop string (on the last chunk), the stop token id,
    or None; the same as the colocated engine's."""
    stop = expected.text[4:7]
    assert len(stop) == 3 and len(expected.text) > 10
    with Client(stack.address) as client:
        out = client.generate(PROMPT, max_tokens=12, ignore_eos=True, stop=[stop, "\x00never"])
        chunks = list(client.stream(PROMPT, max_tokens=12, ignore_eos=True, stop=[stop]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == expected.text[:expected.text.find(stop)]
    assert [c.stop_reason for c in chunks] == [None] * (len(chunks) - 1) + [stop]
    assert out.to_json_dict()["stop_reason"] == stop
    want = engine.generate([expected.prompt_token_ids], SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    assert want[0].stop_reason == stop and want[0].token_ids == out.token_ids


def test_penalties_reach_the_router_and_the_workers(stack, expected, engine):
    """The SDK's penalty keywords, through the router to both workers, give the colocated engine's tokens."""
    penalties = dict(repetition_penalty=1.8, presence_penalty=0.5, frequency_penalty=0.3)
    with Client(stack.address) as client:
        out = client.generate(PROMPT, max_tokens=12, ignore_eos=True, **penalties)
        with pytest.raises(SplitserveError) as err:
            client.generate(PROMPT, repetition_penalty=0.0)
    want = engine.generate([expected.prompt_token_ids], SamplingParams(max_tokens=12, ignore_eos=True, **penalties))
    assert out.token_ids == want[0].token_ids != expected.token_ids
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "repetition_penalty must be" in str(err.value)


def test_logit_bias_and_allowed_token_ids_reach_both_workers(stack, expected, engine):
    """OpenAI-style string keys; the router and both workers give the colocated engine's tokens."""
    bias = {str(expected.token_ids[0]): -100, "42": 2.5}
    allowed = [3, 42, 99, expected.token_ids[1]]
    with Client(stack.address) as client:
        biased = client.generate(PROMPT, max_tokens=8, ignore_eos=True, logit_bias=bias, prompt_logprobs=2)
        only = client.generate(PROMPT, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed)
        for bad in ([], "42"):  # an empty list would mean "any id" on the wire; a string is not its digits
            with pytest.raises(ValueError, match="allowed_token_ids must be a non-empty list of token ids"):
                client.generate(PROMPT, allowed_token_ids=bad)
        with pytest.raises(ValueError, match="logit_bias token ids must be integers, got 'x'"):
            client.generate(PROMPT, logit_bias={"x": 1})
    want = engine.generate([expected.prompt_token_ids] * 2,
                           [SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=bias, prompt_logprobs=2),
                            SamplingParams(max_tokens=8, ignore_eos=True, allowed_token_ids=allowed)])
    assert [biased.token_ids, only.token_ids] == [w.token_ids for w in want]
    assert biased.token_ids[0] != expected.token_ids[0] and set(only.token_ids) <= set(allowed)
    # prompt_logprobs ride on the first chunk into the Completion
    assert len(biased.prompt_logprobs) == len(expected.prompt_token_ids) - 1 and only.prompt_logprobs is None
    assert [[t for t, _ in e.top] for e in biased.prompt_logprobs] == [[t for t, _ in e.top]
                                                                       for e in want[0].prompt_logprobs]


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(stack, expected, engine):
    """As vLLM's: the router reads only the last k tokens, and reports those as the prompt; a prompt
    longer than the model's context is served once truncated."""
    too_long = (expected.prompt_token_ids * 400)[:2040]  # + 12 tokens: over the demo model's 2048
    with Client(stack.address) as client:
        short = client.generate(PROMPT, max_tokens=12, ignore_eos=True, truncate_prompt_tokens=3)
        with pytest.raises(SplitserveError) as err:
            client.generate(token_ids=too_long, max_tokens=12)
        served = client.generate(token_ids=too_long, max_tokens=12, ignore_eos=True, truncate_prompt_tokens=100)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "exceeds the model's context" in str(err.value)
    assert short.prompt_token_ids == expected.prompt_token_ids[-3:] and served.prompt_token_ids == too_long[-100:]
    want = engine.generate([expected.prompt_token_ids[-3:], too_long[-100:]],
                           SamplingParams(max_tokens=12, ignore_eos=True))
    assert [short.token_ids, served.token_ids] == [w.token_ids for w in want]
    assert short.token_ids != expected.token_ids  # the model did read fewer tokens
    in_engine = engine.generate([too_long], SamplingParams(max_tokens=12, ignore_eos=True, truncate_prompt_tokens=100))
    assert in_engine[0].prompt_token_ids == too_long[-100:] and in_engine[0].token_ids == served.token_ids


def test_n_sequences_sample_with_seed_plus_index_as_vllm(stack, expected, engine):
    """n > 1 through the router (each sequence its own disaggregated request): sequence i equals the
    colocated engine's run with seed + i; the chunks interleave, each with its index."""
    sampled = dict(max_tokens=10, ignore_eos=True, temperature=1.0, seed=11, min_p=0.05)  # min_p: the SDK keyword
    with Client(stack.address) as client:
        outs = client.generate_n(PROMPT, n=3, **sampled)
        chunks = list(client.stream(PROMPT, n=3, **sampled))
        greedy = client.generate_n(PROMPT, n=2, max_tokens=10, ignore_eos=True)
        with pytest.raises(ValueError, match="use generate_n for n=2"):
            client.generate(PROMPT, n=2)
        with pytest.raises(SplitserveError) as err:
            client.generate_n(PROMPT, n=17)
    prompt = expected.prompt_token_ids
    want = engine.generate([prompt] * 3, [SamplingParams(**{**sampled, "seed": 11 + i}) for i in range(3)])
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]
    assert len({tuple(o.token_ids) for o in outs}) == 3  # three seeds, three samples
    assert all(o.prompt_token_ids == prompt and o.finish_reason == "length" and 0 < o.ttft_s for o in outs)
    assert chunks[0].prompt_token_ids == prompt and not any(c.prompt_token_ids for c in chunks[1:])
    assert [[t for c in chunks if c.index == i for t in c.token_ids] for i in range(3)] == [o.token_ids for o in outs]
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1, 2]
    assert greedy[0].token_ids == greedy[1].token_ids == expected.token_ids[:10]
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "n must be in [1, 16], got 17" in str(err.value)


def test_leaving_an_n_sequence_stream_frees_every_sequences_pages(stack):
    with Client(stack.address) as client:
        # 200 tokens: all four sequences' pages fit the stack's 128 at once (1000 each would make
        # them wait for one another's pages)
        stream = client.stream(PROMPT, n=4, max_tokens=200, ignore_eos=True, temperature=1.0)
        seen = set()
        for chunk in stream:
            seen.add(chunk.index)
            if len(seen) == 4:
                break
        assert any(s.free_pages < s.total_pages for s in stack.decode_stats())
        stream.close()  # cancels the call: all four sequences stop
        deadline = time.monotonic() + 5.0
        while any(s.free_pages != s.total_pages for s in stack.decode_stats()):
            assert time.monotonic() < deadline, "an n > 1 request's pages were not freed within 5 s of the cancel"
            time.sleep(0.02)


def test_logprobs_come_with_each_token_when_asked(stack, expected):
    with Client(stack.address) as client:
        out = client.generate(PROMPT, max_tokens=12, ignore_eos=True, logprobs=3)
        chunks = list(client.stream(PROMPT, max_tokens=12, ignore_eos=True, logprobs=0))
        plain = client.generate(PROMPT, max_tokens=2)
        with pytest.raises(SplitserveError) as err:
            client.generate(PROMPT, logprobs=21)
    assert out.token_ids == expected.token_ids and len(out.logprobs) == 12
    for token, lp in zip(out.token_ids, out.logprobs):
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert token == lp.top[0][0] and lp.logprob == pytest.approx(lp.top[0][1])  # greedy: the likeliest
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert [lp.logprob for c in chunks for lp in c.logprobs] == pytest.approx([lp.logprob for lp in out.logprobs])
    assert all(lp.top == () for c in chunks for lp in c.logprobs)
    assert plain.logprobs is None
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "logprobs must be in [0, 20]" in str(err.value)


def test_stream_chunks_add_up_to_generate(stack, expected):
    with Client(stack.address) as client:
        chunks = list(client.stream(PROMPT, max_tokens=12, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert "".join(c.text for c in chunks) == expected.text
    assert chunks[0].prompt_token_ids == expected.prompt_token_ids and chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_closing_a_stream_cancels_it_on_the_server(stack):
    with Client(stack.address) as client:
        stream = client.stream(token_ids=list(range(3, 30)), max_tokens=500, ignore_eos=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
    deadline = time.monotonic() + 2.0
    while any(s.free_pages != s.total_pages for s in stack.decode_stats()):
        assert time.monotonic() < deadline, "pages not freed within 2 s of closing the stream"
        time.sleep(0.02)


def test_errors_carry_the_status_and_the_servers_message(stack):
    with Client(stack.address) as client:
        with pytest.raises(SplitserveError) as err:
            client.generate(PROMPT, max_tokens=8, top_p=1.5)
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.message
        with pytest.raises(SplitserveError) as err:
            client.generate(PROMPT, max_tokens=200, timeout=0.001)
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(SplitserveError) as err:  # 129 pages of 8: more than the pool (127) ever holds
            client.generate(token_ids=list(range(3, 30)), max_tokens=1000)
        assert err.value.code is grpc.StatusCode.OUT_OF_RANGE and "holds 127 at most" in err.value.message
        with pytest.raises(ValueError, match="exactly one"):
            client.generate(PROMPT, token_ids=[1, 2])


def test_unreachable_router_raises_unavailable_after_retries():
    start = time.monotonic()
    with Client("127.0.0.1:1", max_retries=2) as client:
        with pytest.raises(SplitserveError) as err:
            client.generate("hi", max_tokens=2, timeout=5)
    assert err.value.code is grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start >= 0.2 + 0.5  # it did back off and retry


def test_model_info_and_health(stack):
    with Client(stack.address) as client:
        info = client.model_info()
        assert client.health() == "SERVING"
        with pytest.raises(SplitserveError) as err:  # 0 s is a deadline, as generate's (it was no deadline)
            client.model_info(timeout=0)
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    # The page size and dtype are the workers' own (Stats), not flags given to the router.
    assert (info.family, info.vocab_size, info.max_model_len, info.page_size) == ("llama", 2048, 2048, 8)
    assert info.dtype == "float32"
    assert info.eos_token_ids == [2] and info.mode == "disaggregated"
    assert sorted(w.role for w in info.workers) == ["decode", "prefill"]


def test_a_chat_is_rendered_by_the_models_template_as_transformers_renders_it(stack):
    """generate(messages=...) gives what the token ids of transformers' apply_chat_template give."""
    transformers = pytest.importorskip("transformers")
    from splitserve.models.demo import ensure_demo_model

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The weather today?"}]
    ids = transformers.AutoTokenizer.from_pretrained(ensure_demo_model()).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with Client(stack.address) as client:
        assert client.model_info().chat_template
        chat = client.generate(messages=messages, max_tokens=8, ignore_eos=True)
        want = client.generate(token_ids=ids, max_tokens=8, ignore_eos=True)
        streamed = list(client.stream(messages=messages, max_tokens=8, ignore_eos=True))
        with pytest.raises(ValueError, match="exactly one of prompt"):
            client.generate("hi", messages=messages)
        with pytest.raises(ValueError, match=r"messages\[0\].content must be a string"):
            client.generate(messages=[{"role": "user", "content": 3}])
        with pytest.raises(ValueError, match=r"messages\[0\]: tool_result not supported"):
            client.generate(messages=[{"role": "assistant", "tool_result": []}])
        with pytest.raises(ValueError, match="tools go with messages"):
            client.generate("hi", tools=[{"type": "function", "function": {"name": "f"}}])
    assert chat.prompt_token_ids == ids and chat.token_ids == want.token_ids and chat.text == want.text
    assert [t for c in streamed for t in c.token_ids] == want.token_ids


def test_async_client(stack, expected):
    async def main():
        async with AsyncClient(stack.address) as client:
            out = await client.generate(PROMPT, max_tokens=12, ignore_eos=True)
            chunks = [c async for c in client.stream(PROMPT, max_tokens=12, ignore_eos=True)]
            both = await asyncio.gather(*(client.generate(PROMPT, max_tokens=12, ignore_eos=True) for _ in range(4)))
            with pytest.raises(SplitserveError) as err:
                await client.generate(PROMPT, max_tokens=0)
            pair = await client.generate_n(PROMPT, n=2, max_tokens=12, ignore_eos=True, temperature=1.0, seed=3)
            return out, chunks, both, err.value.code, await client.health(), await client.model_info(), pair

    out, chunks, both, code, health, info, pair = asyncio.run(main())
    with Client(stack.address) as client:
        sync_pair = client.generate_n(PROMPT, n=2, max_tokens=12, ignore_eos=True, temperature=1.0, seed=3)
    assert [o.token_ids for o in pair] == [o.token_ids for o in sync_pair] and pair[0].token_ids != pair[1].token_ids
    assert pair[1].prompt_token_ids == out.prompt_token_ids
    assert out.token_ids == expected.token_ids and out.text == expected.text
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert all(o.token_ids == expected.token_ids for o in both)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and health == "SERVING" and info.vocab_size == 2048


def test_cli_generate_against_the_router(stack, expected):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "splitserve.runtime.cli", "generate", PROMPT, "--address",
                             stack.address, "--max-tokens", "12", "--ignore-eos", "--json"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text
    streamed = subprocess.run([sys.executable, "-m", "splitserve.runtime.cli", "generate", PROMPT, "--address",
                               stack.address, "--max-tokens", "12", "--ignore-eos"],
                              capture_output=True, text=True, env=env, timeout=120)
    assert streamed.stdout.strip() == expected.text.strip()
    chat = subprocess.run([sys.executable, "-m", "splitserve.runtime.cli", "generate", PROMPT, "--chat", "--address",
                           stack.address, "--max-tokens", "4", "--json"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert chat.returncode == 0, chat.stderr
    with Client(stack.address) as client:
        want = client.generate(messages=[{"role": "user", "content": PROMPT}], max_tokens=4)
    assert json.loads(chat.stdout.strip().splitlines()[-1])["prompt_token_ids"] == want.prompt_token_ids


def _request(**overrides):
    from splitserve.runtime.client_types import build_request

    kw = dict(max_tokens=4, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=(), stop_token_ids=(),
              ignore_eos=False, request_id="r")
    kw.update(overrides)
    return build_request(kw.pop("prompt", "hi"), kw.pop("token_ids", None), **kw)


def test_a_single_stop_string_is_one_stop_not_its_letters():
    assert list(_request(stop="END").sampling.stop) == ["END"]
    assert list(_request(stop=None).sampling.stop) == []
    assert list(_request(stop=["a b", "c"]).sampling.stop) == ["a b", "c"]


@pytest.mark.parametrize("overrides, message", [
    (dict(seed=-1), "seed must be in [0, 18446744073709551615], got -1"),
    (dict(max_tokens=-1), "max_tokens must be in [0, 4294967295], got -1"),
    (dict(top_k=2**31), "top_k must be in [-2147483648, 2147483647]"),
    (dict(prompt=None, token_ids=[1, 2**31]), "token_ids must be 32-bit integers, got 2147483648"),
    (dict(stop_token_ids=[-2**31 - 1]), "stop_token_ids must be 32-bit integers, got -2147483649"),
    (dict(min_tokens=-1), "min_tokens must be in [0, 4294967295], got -1"),
    (dict(logprobs=-1), "logprobs must be in [0, 4294967295], got -1"),
    (dict(skip_special_tokens=None), "skip_special_tokens must be True or False, got None"),  # not read as false
    (dict(skip_special_tokens="false"), "skip_special_tokens must be True or False, got 'false'"),
])
def test_values_the_protos_cannot_carry_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError) as err:  # not protobuf's "Value out of range", which names no field
        _request(**overrides)
    assert message in str(err.value)
    # What the protos carry is the router's to judge (INVALID_ARGUMENT there, test_async_client).
    assert _request(max_tokens=0, top_k=-1, stop_token_ids=[-5]).sampling.max_tokens == 0


def test_a_timeout_already_past_is_deadline_exceeded_before_any_call():
    """gRPC given a timeout of 0 sometimes still finished a fast loopback call (a CI run saw
    model_info(timeout=0) answer): the SDK refuses it itself, whether a server is there or not."""
    with Client("127.0.0.1:1", max_retries=3) as client:
        for call in (lambda: client.model_info(timeout=0), lambda: client.generate("hi", timeout=0),
                     lambda: client.model_info(timeout=-1)):
            started = time.monotonic()
            with pytest.raises(SplitserveError) as err:
                call()
            assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 1


def test_a_negative_max_retries_is_refused():
    with pytest.raises(ValueError, match="max_retries must be >= 0, got -1"):  # it used to return an empty completion
        Client("127.0.0.1:1", max_retries=-1)


def test_errors_survive_pickling_as_process_pools_need():
    import copy
    import pickle

    error = SplitserveError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the router is at its limit")
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert (clone.code, clone.message, str(clone)) == (error.code, error.message, str(error))


def test_the_sdk_and_the_batch_reader_import_without_jax():
    """A client process needs no accelerator runtime: importing JAX cost ~1 s per CLI call."""
    code = ("import sys, splitserve.runtime.client, splitserve.runtime.batch_io; "
            "print(sorted(m for m in ('jax', 'jaxlib', 'flax', 'jinja2') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
