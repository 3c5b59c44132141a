"""`splitserve openai-server` (a real process) in front of a launched stack, driven by OpenAI's own
client library: what it sends and how it parses our answers is not ours. Every answer is compared
with the SDK's answer to the same request, token for token through the text."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from stack import launched
from splitserve.runtime import openai_api
from splitserve.runtime.client import Client

PROMPT = "Once upon a time"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("openai-cache"))
    with launched("demo", "--num-pages", "128", "--page-size", "8", "--max-batch", "8") as s:
        yield s


def start_server(address: str, *flags: str, env: dict | None = None):
    """(process, base URL) of `splitserve openai-server` once it prints where it listens."""
    cmd = [sys.executable, "-m", "splitserve.runtime.cli", "openai-server", "--address", address, "--port", "0",
           *flags]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, **(env or {})))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    deadline = time.monotonic() + 60
    while not any("openai-server on" in line for line in lines):
        assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    url = re.search(r"on (http://\S+/v1)", next(line for line in lines if "openai-server on" in line)).group(1)
    return process, url


def stop_server(process) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


@pytest.fixture(scope="module")
def server(stack):
    process, url = start_server(stack.address, "--served-model-name", "demo", "--tokenizer", "demo",
                                "--tool-call-parser", "hermes")
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(stack):
    with Client(stack.address) as client:
        yield client


def test_completions_equal_the_sdk(oai, sdk):
    want = sdk.generate(PROMPT, max_tokens=12, ignore_eos=True)
    got = oai.completions.create(model="demo", prompt=PROMPT, max_tokens=12, extra_body={"ignore_eos": True})
    assert got.object == "text_completion" and got.model == "demo" and len(got.choices) == 1
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids) and got.usage.completion_tokens == 12
    assert got.usage.total_tokens == got.usage.prompt_tokens + 12
    ids = oai.completions.create(model="demo", prompt=want.prompt_token_ids, max_tokens=12,
                                 extra_body={"ignore_eos": True})
    assert ids.choices[0].text == want.text  # a prompt given as token ids


def test_chat_completions_equal_the_sdk_and_stop_as_vllm(oai, sdk):
    want = sdk.generate(messages=CHAT, max_tokens=16, temperature=0.7, seed=5)
    got = oai.chat.completions.create(model="demo", messages=CHAT, max_tokens=16, temperature=0.7, seed=5)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    # A stop string taken from the answer itself: finish "stop", vLLM's stop_reason, text cut before it.
    words = sdk.generate(PROMPT, max_tokens=12, ignore_eos=True).text.split()
    assert len(words) >= 3, "the demo model's answer is too short to take a stop string from"
    stopped = oai.completions.create(model="demo", prompt=PROMPT, max_tokens=12, stop=[words[2]])
    expect = sdk.generate(PROMPT, max_tokens=12, stop=[words[2]])
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop" and choice.text == expect.text and words[2] not in choice.text
    assert choice.model_extra["stop_reason"] == words[2] == expect.stop_reason



def test_structured_outputs_as_openai_and_vllm_clients_ask_for_them(oai, sdk):
    """OpenAI's response_format (json_schema, json_object) and vLLM's structured_outputs /
    guided_choice, streamed or not: each answer parses, and equals the SDK's for the same spec."""
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "rank"], "additionalProperties": False,
              "x-guidance": {"whitespace_flexible": False}}
    got = oai.chat.completions.create(model="demo", messages=CHAT, max_tokens=48, temperature=0.9, seed=4,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "place", "schema": schema}})
    content = got.choices[0].message.content
    jsonschema.validate(json.loads(content), schema)
    assert got.choices[0].finish_reason == "stop"
    assert content == sdk.generate(messages=CHAT, max_tokens=48, temperature=0.9, seed=4,
                                   structured_outputs={"json": schema}).text
    any_object = oai.chat.completions.create(model="demo", messages=CHAT, max_tokens=48, temperature=0.9, seed=2,
                                             response_format={"type": "json_object"}).choices[0]
    text = any_object.message.content  # any object: a random model may not close it within max_tokens
    assert isinstance(json.loads(text), dict) if any_object.finish_reason == "stop" else text.startswith("{")
    choices = ["red", "green", "blue"]
    for body in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        streamed = oai.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3,
                                          stream=True, extra_body=body)
        assert "".join(chunk.choices[0].text for chunk in streamed) in choices
    with pytest.raises(openai.BadRequestError, match="unclosed character class"):
        oai.completions.create(model="demo", prompt=PROMPT, max_tokens=8, extra_body={"guided_regex": "[a-"})

def test_tool_calls_from_the_model_as_the_sdk_generates_them(oai, sdk):
    """A named function: the answer is forced to its arguments' schema and comes back as the call.
    "auto" with the hermes parser: the answer (forced here to a <tool_call> by a regex, as a random
    model would not write one) comes back as calls. Both equal the SDK's text for the same chat."""
    import jsonschema

    from test_tool_calls import TOOLS

    parameters = {**TOOLS[0]["function"]["parameters"], "additionalProperties": False,
                  "x-guidance": {"whitespace_flexible": False}}  # and a short city: a random model rambles
    parameters["properties"] = {**parameters["properties"], "city": {"type": "string", "maxLength": 10}}
    tools = [{"type": "function", "function": {**TOOLS[0]["function"], "parameters": parameters}}, TOOLS[1]]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    got = oai.chat.completions.create(model="demo", messages=CHAT, tools=tools, tool_choice=choice, max_tokens=40,
                                      temperature=0.9, seed=4)
    call, = got.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), parameters)
    assert call.function.name == "get_weather" and got.choices[0].finish_reason == "stop"
    assert call.function.arguments == sdk.generate(messages=CHAT, tools=tools, max_tokens=40, temperature=0.9,
                                                   seed=4, structured_outputs={"json": parameters}).text
    regex = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome|Oslo)"\}\}\n</tool_call>'
    auto = oai.chat.completions.create(model="demo", messages=CHAT, tools=tools, max_tokens=120, temperature=1.0,
                                       seed=7, extra_body={"guided_regex": regex})
    want = sdk.generate(messages=CHAT, tools=tools, max_tokens=120, temperature=1.0, seed=7,
                        structured_outputs={"regex": regex})
    assert re.fullmatch(regex, want.text) and auto.choices[0].finish_reason == "tool_calls"
    call, = auto.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and auto.choices[0].message.content is None
    assert json.loads(call.function.arguments) == json.loads(want.text[len("<tool_call>\n"):-len("\n</tool_call>")])[
        "arguments"]


def test_streamed_completions_and_chat_with_usage(oai, sdk):
    want = sdk.generate(PROMPT, max_tokens=12, ignore_eos=True)
    chunks = list(oai.completions.create(model="demo", prompt=PROMPT, max_tokens=12, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert len({c.id for c in chunks}) == 1 and len(chunks) >= 3  # tokens arrive as they are made
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)
    assert all(c.usage is None for c in chunks[:-1])

    chat = sdk.generate(messages=CHAT, max_tokens=10, ignore_eos=True)
    deltas = list(oai.chat.completions.create(model="demo", messages=CHAT, max_tokens=10, stream=True,
                                              extra_body={"ignore_eos": True}))
    assert deltas[0].object == "chat.completion.chunk" and deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.text
    assert deltas[-1].choices[0].finish_reason == "length" and deltas[-1].usage is None


def test_n_choices_stream_interleaved_and_equal_generate_n(oai, sdk):
    params = dict(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    want = [c.text for c in sdk.generate_n(messages=CHAT, n=3, **params)]
    assert len(set(want)) > 1, "three seeded samples should differ"
    whole = oai.chat.completions.create(model="demo", messages=CHAT, n=3, max_tokens=8, temperature=1.0, seed=11,
                                        extra_body={"ignore_eos": True})
    assert [c.index for c in whole.choices] == [0, 1, 2] and [c.message.content for c in whole.choices] == want
    assert whole.usage.completion_tokens == 24
    texts, roles = ["", "", ""], [0, 0, 0]
    chunks = list(oai.chat.completions.create(model="demo", messages=CHAT, n=3, max_tokens=8, temperature=1.0,
                                              seed=11, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            roles[choice.index] += choice.delta.role == "assistant"
    assert texts == want and roles == [1, 1, 1]
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_special_tokens_text_is_kept_when_asked_as_transformers_decodes_it(oai, sdk):
    """vLLM's skip_special_tokens: the demo tokenizer's <s> (special) sampled among ordinary tokens
    is left out of the text by default and kept with false, as transformers decodes the same ids."""
    import transformers

    from splitserve.models.demo import ensure_demo_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(ensure_demo_model())
    bos = tokenizer.convert_tokens_to_ids("<s>")
    allowed = [bos, *range(300, 340)]
    bias = {bos: 3.0}  # the random model's <s> logit is below the others': about half the tokens
    kw = dict(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True, allowed_token_ids=allowed, logit_bias=bias)
    skipped, kept = sdk.generate(PROMPT, **kw), sdk.generate(PROMPT, skip_special_tokens=False, **kw)
    assert kept.token_ids == skipped.token_ids and 0 < kept.token_ids.count(bos) < 20, kept.token_ids
    assert skipped.text == tokenizer.decode(skipped.token_ids, skip_special_tokens=True) and "<s>" not in skipped.text
    assert kept.text == tokenizer.decode(kept.token_ids, skip_special_tokens=False) and "<s>" in kept.text
    for sequence in sdk.generate_n(PROMPT, n=2, skip_special_tokens=False, **kw):  # the router's n sequences too
        assert sequence.text == tokenizer.decode(sequence.token_ids, skip_special_tokens=False)
    got = oai.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=11,
                                 logit_bias={str(bos): 3.0}, extra_body={
                                     "ignore_eos": True, "allowed_token_ids": allowed, "skip_special_tokens": False})
    assert got.choices[0].text == kept.text


def test_logprobs_equal_the_sdks_with_tokens_named_as_transformers_decodes_them(oai, sdk):
    import transformers

    from splitserve.models.demo import ensure_demo_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(ensure_demo_model())

    def text(token):
        return tokenizer.decode([token], clean_up_tokenization_spaces=False)

    want = sdk.generate(PROMPT, max_tokens=6, ignore_eos=True, logprobs=2)
    tokens = [text(t) for t in want.token_ids]
    # Whole characters each (tokens inside a UTF-8 character: test_openai_app), so each reads alone
    assert "\ufffd" not in "".join(tokens) + "".join(text(t) for lp in want.logprobs for t, _ in lp.top)
    tops = [{text(t): v for t, v in lp.top} for lp in want.logprobs]
    for top, token, lp in zip(tops, tokens, want.logprobs):
        top.setdefault(token, lp.logprob)  # the sampled token too, as vLLM's
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    got = oai.completions.create(model="demo", prompt=PROMPT, max_tokens=6, logprobs=2,
                                 extra_body={"ignore_eos": True}).choices[0].logprobs
    assert got.tokens == tokens and got.token_logprobs == [lp.logprob for lp in want.logprobs]
    assert got.top_logprobs == tops and got.text_offset == offsets
    streamed = list(oai.completions.create(model="demo", prompt=PROMPT, max_tokens=6, logprobs=2, stream=True,
                                           extra_body={"ignore_eos": True}))
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == tokens and sum((p.text_offset for p in parts), []) == offsets
    assert sum((p.top_logprobs for p in parts), []) == tops

    chat_want = sdk.generate(messages=CHAT, max_tokens=5, ignore_eos=True, logprobs=2)
    content = oai.chat.completions.create(model="demo", messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True}).choices[0].logprobs.content
    assert [(c.token, c.logprob, c.bytes) for c in content] == [
        (text(t), lp.logprob, list(text(t).encode())) for t, lp in zip(chat_want.token_ids, chat_want.logprobs)]
    assert [[(x.token, x.logprob) for x in c.top_logprobs] for c in content] == [
        [(text(t), v) for t, v in lp.top] for lp in chat_want.logprobs]


def test_several_prompts_in_one_body_are_numbered_as_vllm_numbers_them(oai, sdk):
    """Choice i * n + j is prompt i's sequence j; the usage counts each prompt once; streamed, the
    choices' chunks interleave and add up to the same texts."""
    prompts = [PROMPT, "In the morning", "The sea was"]
    params = dict(max_tokens=6, temperature=1.0, seed=3)
    want = [sdk.generate_n(p, n=2, ignore_eos=True, **params) for p in prompts]
    texts = [c.text for group in want for c in group]
    assert len(set(texts)) > 3, "seeded samples of three prompts should differ"
    got = oai.completions.create(model="demo", prompt=prompts, n=2, extra_body={"ignore_eos": True}, **params)
    assert [c.index for c in got.choices] == list(range(6)) and [c.text for c in got.choices] == texts
    assert got.usage.prompt_tokens == sum(len(g[0].prompt_token_ids) for g in want)
    assert got.usage.completion_tokens == 36
    streamed = ["" for _ in range(6)]
    chunks = list(oai.completions.create(model="demo", prompt=prompts, n=2, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                                         **params))
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts and chunks[-1].usage == got.usage
    assert sum(c.choices[0].finish_reason == "length" for c in chunks if c.choices) == 6


def transformers_log_softmax(ids: list[int]):
    """Each position's log-softmax over the vocabulary, by transformers' own model of the demo checkpoint."""
    import torch
    import transformers

    from splitserve.models.demo import ensure_demo_model

    model = transformers.AutoModelForCausalLM.from_pretrained(ensure_demo_model(), dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1).numpy()


def test_scoring_as_lm_evaluation_harness_sends_it(oai, sdk):
    """lm-evaluation-harness's local-completions loglikelihood: token-id prompts in one body, echo,
    max_tokens 1, logprobs 1; it sums token_logprobs[ctxlen:-1] and calls the continuation greedy when
    each of those is the largest in its top dict. Both equal transformers' log-softmax of the prompt."""
    context = sdk.generate("Once upon a time there", max_tokens=1).prompt_token_ids
    bodies = [context + [296, 261, 436], context + [710]]  # two continuations of one context
    got = oai.completions.create(model="demo", prompt=bodies, echo=True, max_tokens=1, logprobs=1, temperature=0,
                                 seed=1234)
    assert [c.index for c in got.choices] == [0, 1]
    for ids, choice in zip(bodies, sorted(got.choices, key=lambda c: c.index)):
        want = transformers_log_softmax(ids)
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(ids) + 1  # the prompt's tokens, then the one generated
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        score = sum(logprobs.token_logprobs[len(context):-1])
        expected = sum(want[t - 1, ids[t]] for t in range(len(context), len(ids)))
        assert abs(score - expected) < 1e-3, (score, expected)
        greedy = all(lp == max(top.values()) for lp, top in zip(logprobs.token_logprobs[len(context):-1],
                                                                 logprobs.top_logprobs[len(context):-1]))
        assert greedy == all(want[t - 1].argmax() == ids[t] for t in range(len(context), len(ids)))
        generated = sdk.generate(token_ids=ids, max_tokens=1)
        assert choice.text == sdk_text(ids) + generated.text  # echo: the prompt's text, then the answer's


def sdk_text(ids: list[int]) -> str:
    """A token-id prompt as text, special tokens kept (they were sent), by transformers' tokenizer."""
    import transformers

    from splitserve.models.demo import ensure_demo_model

    return transformers.AutoTokenizer.from_pretrained(ensure_demo_model()).decode(ids, skip_special_tokens=False)


def test_echo_without_generation_and_streamed_echo(oai, sdk):
    """max_tokens 0 with echo: the prompt alone, its tokens' logprobs alone (the token made is counted
    in the usage, as vLLM counts it). Streamed echo: each choice's first chunk begins with its prompt."""
    only = oai.completions.create(model="demo", prompt=[PROMPT, "The sea"], echo=True, max_tokens=0, logprobs=0)
    for prompt, choice in zip([PROMPT, "The sea"], only.choices):
        ids = sdk.generate(prompt, max_tokens=1).prompt_token_ids
        assert choice.text == prompt and len(choice.logprobs.tokens) == len(ids)
        want = transformers_log_softmax(ids)
        assert np.allclose(choice.logprobs.token_logprobs[1:], [want[t - 1, ids[t]] for t in range(1, len(ids))],
                           atol=1e-4)
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])  # logprobs 0: the token's own
    assert only.usage.completion_tokens == 2
    want = sdk.generate(PROMPT, max_tokens=5, ignore_eos=True)
    whole = oai.completions.create(model="demo", prompt=PROMPT, echo=True, max_tokens=5, logprobs=2,
                                   extra_body={"ignore_eos": True}).choices[0]
    assert whole.text == PROMPT + want.text
    chunks = list(oai.completions.create(model="demo", prompt=PROMPT, echo=True, max_tokens=5, logprobs=2,
                                         stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text.startswith(PROMPT) and "".join(c.choices[0].text for c in chunks) == whole.text
    assert sum((c.choices[0].logprobs.tokens for c in chunks), []) == whole.logprobs.tokens
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == whole.logprobs.text_offset
    streamed = sum((c.choices[0].logprobs.token_logprobs for c in chunks), [])
    assert streamed[0] is None and np.allclose(streamed[1:], whole.logprobs.token_logprobs[1:], atol=1e-4)
    # Several prompts, n sequences each: every choice's first chunk carries its own prompt (the router
    # sends a call's prompt ids once)
    body = dict(model="demo", prompt=[PROMPT, "The sea"], n=2, echo=True, max_tokens=3, logprobs=1, seed=2,
                temperature=1.0, extra_body={"ignore_eos": True})
    whole = oai.completions.create(**body)
    texts, logprobs = ["" for _ in range(4)], [[] for _ in range(4)]
    for chunk in oai.completions.create(stream=True, **body):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            logprobs[choice.index] += list(zip(choice.logprobs.tokens, choice.logprobs.token_logprobs))
    assert texts == [c.text for c in whole.choices]
    assert [c.text[:len(PROMPT)] for c in whole.choices[:2]] == [PROMPT] * 2
    for streamed, choice in zip(logprobs, whole.choices):  # decode steps batched differently: float noise
        assert [t for t, _ in streamed] == choice.logprobs.tokens and streamed[0][1] is None and len(streamed) > 3
        assert np.allclose([v for _, v in streamed[1:]], choice.logprobs.token_logprobs[1:], atol=1e-4)


def test_prompt_logprobs_in_answers_as_vllm_shapes_them(oai, sdk):
    """vLLM's extra field: [null, {"id": {"logprob", "rank", "decoded_token"}}, ...], the prompt token
    first with its rank in the vocabulary, then the N most likely; in each completions choice, once
    beside a chat's choices. The values are transformers'."""
    got = oai.completions.create(model="demo", prompt=PROMPT, max_tokens=2, n=2, temperature=1.0, seed=1,
                                 extra_body={"prompt_logprobs": 2})
    ids = sdk.generate(PROMPT, max_tokens=1).prompt_token_ids
    want = transformers_log_softmax(ids)
    entries = got.choices[0].model_extra["prompt_logprobs"]
    assert entries == got.choices[1].model_extra["prompt_logprobs"] and entries[0] is None
    assert len(entries) == len(ids)
    for t, position in enumerate(entries[1:], 1):
        keys = list(position)
        assert keys[0] == str(ids[t]) and len(keys) in (2, 3)
        token = position[keys[0]]
        assert abs(token["logprob"] - want[t - 1, ids[t]]) < 1e-4
        near = want[t - 1, ids[t]]  # ties within float32's error may count either way
        assert 1 + np.sum(want[t - 1] > near + 1e-4) <= token["rank"] <= np.sum(want[t - 1] >= near - 1e-4)
        top = [int(k) for k in keys if position[k]["rank"] <= 2 and (k != keys[0] or len(keys) == 2)]
        assert sorted(top, key=lambda k: position[str(k)]["rank"]) == np.argsort(-want[t - 1])[:2].tolist()
        assert all(isinstance(v["decoded_token"], str) for v in position.values())
    chat = oai.chat.completions.create(model="demo", messages=CHAT, max_tokens=2, extra_body={"prompt_logprobs": 1})
    assert chat.model_extra["prompt_logprobs"][0] is None and "prompt_logprobs" not in chat.choices[0].model_extra
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens


def test_bad_requests_get_openai_errors_with_the_reason(oai, server):
    cases = [
        (dict(max_tokens=-1), openai.BadRequestError, "max_tokens"),
        (dict(max_tokens=4, extra_body={"no_such_field": 1}), openai.BadRequestError, "no_such_field"),
        (dict(max_tokens=4, extra_body={"prompt_logprobs": 21}), openai.BadRequestError, "prompt_logprobs"),
        (dict(max_tokens=4, stream_options={"include_usage": True}), openai.BadRequestError, "stream_options"),
        (dict(max_tokens=100_000), openai.BadRequestError, "context"),  # the router's own check
    ]
    params = {"max_tokens": "max_tokens", "no_such_field": "no_such_field", "prompt_logprobs": "prompt_logprobs",
              "stream_options": "stream_options", "context": None}  # OpenAI's `param`: the body field it is about
    for kwargs, error, word in cases:
        for stream in (False, True):  # a streamed request refused before its first token: still an HTTP error
            if stream and "stream_options" in kwargs:
                continue
            with pytest.raises(error) as e:
                oai.completions.create(model="demo", prompt=PROMPT, stream=stream, **kwargs)
            assert word in e.value.message and e.value.body["code"] == e.value.status_code
            assert e.value.param == params[word], e.value.message
    with pytest.raises(openai.NotFoundError, match="`gpt-4` does not exist"):
        oai.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="takes messages, not prompt"):
        oai.chat.completions.create(model="demo", messages=CHAT, extra_body={"prompt": "x"})
    request = urllib.request.Request(server + "/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    assert oai.completions.create(model="demo", prompt=PROMPT, max_tokens=2).choices[0].text is not None  # still up


def test_models_and_health(oai, server, sdk):
    models = oai.models.list().data
    info = sdk.model_info()
    assert [m.id for m in models] == ["demo"] and models[0].owned_by == "splitserve"
    assert models[0].model_extra["root"] == info.name and models[0].model_extra["max_model_len"] == info.max_model_len
    with urllib.request.urlopen(server.removesuffix("/v1") + "/health", timeout=10) as reply:
        assert reply.status == 200 and reply.read() == b"SERVING"


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_goes_away_frees_its_request_on_the_workers(stack, server, streamed):
    """Streamed: it closes the stream after a few chunks. Not streamed: it gives up waiting. Either
    way the 1000-token request (seconds of decoding) must stop at once, not run to its end."""
    with openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=None if streamed else 1.5) as client:
        if streamed:
            stream = client.completions.create(model="demo", prompt=PROMPT, max_tokens=1000, stream=True,
                                               extra_body={"ignore_eos": True})
            for i, _ in enumerate(stream):
                if i == 3:
                    break
            busy = stack.decode_stats()
            stream.close()
        else:
            errors = []

            def call():
                try:
                    client.completions.create(model="demo", prompt=PROMPT, max_tokens=1000,
                                              extra_body={"ignore_eos": True})
                except openai.APITimeoutError as e:
                    errors.append(e)

            caller = threading.Thread(target=call)
            caller.start()
            deadline = time.monotonic() + 30
            busy = stack.decode_stats()
            while not sum(s.running for s in busy) and time.monotonic() < deadline:
                time.sleep(0.02)
                busy = stack.decode_stats()
            caller.join(30)
            assert len(errors) == 1
    left = time.monotonic()
    assert sum(s.running for s in busy) == 1  # it was decoding before the client left
    while any(s.running or s.free_pages != s.total_pages for s in stack.decode_stats()):
        assert time.monotonic() - left < 3.0, "the request kept running after its client went away"
        time.sleep(0.05)
    if not streamed:  # its handler was cancelled: counted as 499 (the status line never went out)
        with urllib.request.urlopen(server.removesuffix("/v1") + "/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert re.search(r'splitserve_http_requests_total\{handler="/v1/completions",status="499"\} [1-9]', text)


def test_an_api_key_guards_the_v1_paths(stack, sdk):
    process, url = start_server(stack.address, env={"SPLITSERVE_API_KEY": "s3cret"})
    name = sdk.model_info().name  # no --served-model-name: the router's name
    try:
        with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as client:  # no key: test_openai_app
            with pytest.raises(openai.AuthenticationError):
                client.completions.create(model=name, prompt=PROMPT, max_tokens=2)
        with openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0) as client:
            assert client.completions.create(model=name, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as reply:
            assert reply.status == 200  # as vLLM's, /health needs no key
    finally:
        stop_server(process)


def test_launch_serves_the_openai_api_beside_its_router(sdk):
    """`launch --openai-port 0`: the server is a child of launch, listening before "ready", stopped with it.
    SIGTERM while an HTTP stream is in flight: the stream still ends whole, then launch exits 0."""
    want = sdk.generate(PROMPT, max_tokens=150, ignore_eos=True)
    with launched("demo", "--mode", "colocated", "--num-pages", "128", "--page-size", "8", "--openai-port", "0",
                  "--served-model-name", "demo", "--tool-call-parser", "hermes") as stack:
        url = re.search(r"openai-server on (http://\S+/v1)", "".join(stack.lines)).group(1)
        with openai.OpenAI(base_url=url, api_key="none", max_retries=0) as client:
            got = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, extra_body={"ignore_eos": True})
            assert got.choices[0].text == sdk.generate(PROMPT, max_tokens=8, ignore_eos=True).text
            server_pid = next(pid for pid in stack.worker_pids() if "openai-server" in cmdline(pid))
            assert "--tool-call-parser\x00hermes" in cmdline(server_pid)
            chunks = iter(client.completions.create(model="demo", prompt=PROMPT, max_tokens=150, stream=True,
                                                    extra_body={"ignore_eos": True}))
            texts = [next(chunks).choices[0].text]
            stack.process.send_signal(signal.SIGTERM)
            for chunk in chunks:
                texts += [c.text for c in chunk.choices]
                last = chunk
        assert "".join(texts) == want.text and last.choices[0].finish_reason == "length"
        assert stack.process.wait(60) == 0
    assert not os.path.exists(f"/proc/{server_pid}")  # launched() also checks that no child outlived launch


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode()


def test_launch_hands_its_tls_or_insecure_choice_to_the_openai_server_child():
    from splitserve.runtime.openai_process import OpenAIServerProcess
    from splitserve.runtime.tls import TLSConfig

    tls = OpenAIServerProcess("0.0.0.0:5", "0.0.0.0", 8000, tls=TLSConfig("c.pem", "k.pem", "ca.pem")).cmd
    assert tls[tls.index("--address") + 1] == "127.0.0.1:5"  # the name launch's certificate carries
    assert [tls[tls.index(f) + 1] for f in ("--tls-cert", "--tls-key", "--tls-ca")] == ["c.pem", "k.pem", "ca.pem"]
    assert "--allow-insecure" in OpenAIServerProcess("10.0.0.1:5", "0.0.0.0", 8000).cmd  # launch took it so
    for host in ("127.0.0.1", "localhost", "::1"):
        plain = OpenAIServerProcess(f"{host}:5", host, 8000).cmd
        assert "--allow-insecure" not in plain and "--tls-cert" not in plain


def test_plain_http_off_loopback_is_refused_as_for_every_listener():
    """Before any call to the router: a non-loopback --host needs --tls-cert/--tls-key or --allow-insecure."""
    cmd = [sys.executable, "-m", "splitserve.runtime.cli", "openai-server", "--address", "127.0.0.1:1", "--port", "0"]
    refused = subprocess.run([*cmd, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "refusing to listen on 0.0.0.0 without TLS" in refused.stderr
    missing = subprocess.run([*cmd, "--ssl-certfile", "/nonexistent.pem", "--ssl-keyfile", "/nonexistent.pem"],
                             capture_output=True, text=True, timeout=60)  # vLLM's flag names, files checked first
    assert missing.returncode == 1 and "TLS certificate" in missing.stderr


def test_a_router_that_does_not_answer_is_said_at_start():
    out = subprocess.run([sys.executable, "-m", "splitserve.runtime.cli", "openai-server", "--address",
                          "127.0.0.1:1", "--wait-s", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "the router at 127.0.0.1:1 did not answer" in out.stderr


# -- request bodies, without a server -----------------------------------------------------------
def test_bodies_are_read_as_vllm_reads_them():
    body = openai_api.parse_body(openai_api.COMPLETIONS, {"prompt": ["hi"], "max_completion_tokens": 5,
                                                          "max_tokens": 9, "top_k": 3, "seed": None})
    assert body.prompt == "hi" and body.params.max_tokens == 5 and body.params.top_k == 3 and not body.chat
    for url, fields, message in [  # errors name the field sent, not the one it is read as
            (openai_api.COMPLETIONS, {"prompt": "x", "max_completion_tokens": "5"},
             'max_completion_tokens must be an integer, got "5"'),
            (openai_api.COMPLETIONS, {"prompt": "x", "max_completion_tokens": 0, "max_tokens": 5},
             "max_completion_tokens must be >= 1, got 0"),
            (openai_api.CHAT, {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
             "top_logprobs must be in [0, 20] (or unset), got 21")]:
        with pytest.raises(ValueError) as err:
            openai_api.parse_body(url, fields)
        assert str(err.value) == message
    assert openai_api.parse_body(openai_api.COMPLETIONS, {"prompt": [[4, 5]]}).prompt_token_ids == (4, 5)
    chat = openai_api.parse_body(openai_api.CHAT, {"messages": CHAT, "stream": True, "logprobs": True,
                                                   "top_logprobs": 2, "stream_options": {},
                                                   "prompt": None, "tools": [], "tool_choice": "none"})
    assert chat.chat and chat.stream and chat.include_usage and chat.params.logprobs == 2
    assert not openai_api.parse_body(openai_api.CHAT, {"messages": CHAT, "stream": True}).include_usage
    for off in (False, None):  # an explicit null is none, as vLLM reads it
        assert not openai_api.parse_body(openai_api.CHAT, {"messages": CHAT, "stream": True,
                                                           "stream_options": {"include_usage": off}}).include_usage
    assert openai_api.parse_body(openai_api.COMPLETIONS, {"prompt": "x", "messages": None, "best_of": 1,
                                                          "metadata": {"a": "b"}}).prompt == "x"
    several = openai_api.parse_body(openai_api.COMPLETIONS, {"prompt": ["a", "b"]})
    assert several.prompts == ("a", "b") and several.prompt is None and several.prompt_token_ids is None
    assert openai_api.parse_body(openai_api.COMPLETIONS, {"prompt": [[4, 5], [6]]}).prompts == ((4, 5), (6,))
    # echo with max_tokens 0: one token made and not shown; with logprobs, the prompt's come as many
    scoring = openai_api.parse_body(openai_api.COMPLETIONS, {"prompt": [[4, 5]], "echo": True, "max_tokens": 0,
                                                             "logprobs": 1})
    assert scoring.echo and scoring.echo_only and scoring.params.max_tokens == 1
    assert scoring.params.prompt_logprobs == 1 and scoring.params.logprobs == 1
    echo = openai_api.parse_body(openai_api.COMPLETIONS, {"prompt": "x", "echo": True, "logprobs": 2,
                                                          "prompt_logprobs": 0})
    assert echo.echo and not echo.echo_only and echo.params.prompt_logprobs == 0  # asked for: as asked
    plain = openai_api.parse_body(openai_api.COMPLETIONS, {"prompt": "x", "echo": False, "max_tokens": 3})
    assert not plain.echo and plain.params.prompt_logprobs is None
    # prompt_logprobs 0 with stream: taken and not made (vLLM's streams never show them)
    assert openai_api.parse_body(openai_api.CHAT, {"messages": CHAT, "stream": True,
                                                   "prompt_logprobs": 0}).params.prompt_logprobs is None
    for url, body, message in [
        (openai_api.COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, "only for streamed"),
        (openai_api.COMPLETIONS, {"prompt": "x", "stream": "yes"}, "stream must be a boolean"),
        (openai_api.COMPLETIONS, {"messages": CHAT}, "takes prompt, not messages"),
        (openai_api.COMPLETIONS, {"prompt": []}, "prompt must not be an empty list"),
        (openai_api.COMPLETIONS, {"prompt": [[1], []]}, "prompt[1] must be a string or a non-empty list of token"),
        (openai_api.COMPLETIONS, {"prompt": ["a", [4, 5]]}, "a list of strings or a list of token-id lists, not both"),
        (openai_api.COMPLETIONS, {"prompt": "x", "echo": True, "max_tokens": 0, "min_tokens": 2},
         "no token is generated to count"),
        (openai_api.COMPLETIONS, {"prompt": ["a"] * 1025}, "at most 1024 go in one body"),
        (openai_api.COMPLETIONS, {"prompt": [[1, -2]]}, "prompt[0]: token ids must be in"),
        (openai_api.COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens must be >= 1"),
        (openai_api.COMPLETIONS, {"prompt": "x", "stream": True, "prompt_logprobs": 1},
         "prompt_logprobs are not available when stream is true"),
        (openai_api.CHAT, {"messages": CHAT, "echo": True}, "echo true is not supported"),
        (openai_api.COMPLETIONS, {"prompt": "x", "top_logprobs": 2}, "top_logprobs is a /v1/chat"),
        (openai_api.CHAT, {"messages": CHAT, "stream": True, "stream_options": {"x": 1}}, "stream_options.x"),
        (openai_api.CHAT, {}, "missing messages"),
        (openai_api.CHAT, {"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
        (openai_api.COMPLETIONS, {"prompt": "x", "best_of": 2}, "best_of 2 is not supported"),
        (openai_api.COMPLETIONS, {"prompt": "x", "best_of": True}, "best_of true is not supported"),
        (openai_api.COMPLETIONS, {"prompt": "x", "echo": 0}, "echo must be a boolean, got 0"),
        (openai_api.CHAT, {"messages": CHAT, "echo": 0}, "echo 0 is not supported"),
        (openai_api.COMPLETIONS, {"prompt": [True]}, "prompt[0] must be a string, got true"),
        (openai_api.COMPLETIONS, {"prompt": True}, "prompt must be a string, got true"),
        (openai_api.CHAT, {"messages": CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}},
         "continuous_usage_stats is not supported"),
        (openai_api.CHAT, [], "the body must be a JSON object"),
        ("/v1/embeddings", {}, "url must be one of"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            openai_api.parse_body(url, body)
