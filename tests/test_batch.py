"""Offline batch inference: file formats, continuous batching, kill -9 and resume, router mode."""

import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stack import launched
from splitserve.runtime.batch_io import BadLine, parse_line, read_requests
from splitserve.runtime.batch_output import recover_output
from splitserve.runtime.batch_runner import BatchAborted, InProcessBackend, RemoteBackend, run_batch
from splitserve.runtime.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]
CHAT = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"})


@functools.lru_cache(maxsize=None)
def transformers_chat_ids(messages_json: str) -> tuple[int, ...]:
    """The demo model's chat prompt as transformers' apply_chat_template tokenizes it."""
    import transformers

    from splitserve.models.demo import ensure_demo_model

    tok = transformers.AutoTokenizer.from_pretrained(ensure_demo_model())
    out = tok.apply_chat_template(json.loads(messages_json), add_generation_prompt=True, tokenize=True)
    return tuple(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("batch-cache"))
    os.environ["SPLITSERVE_CACHE"] = path
    return path


@pytest.fixture(scope="module")
def model(cache):
    from splitserve.models.sharding import MeshConfig
    from splitserve.runtime.in_process import load_for_serving

    return load_for_serving("demo", MeshConfig(1))


@pytest.fixture(scope="module")
def reference(model):
    """reference(prompt text or ids, params) -> Completion from a plain ColocatedEngine.generate."""
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig

    engine = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=512, max_batch=16))

    def generate(prompts, params):
        ids = [model.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return engine.generate(ids, params)

    return generate


def batch_engine(model, max_batch=4):
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig

    return ColocatedEngine(model, EngineConfig(page_size=8, num_pages=256, max_batch=max_batch,
                                               max_prefill_batch=min(4, max_batch)))


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_output(path: Path) -> dict:
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), "torn last line"
    records = [json.loads(line) for line in raw.decode().splitlines()]  # every line parses
    by_id = {}
    for r in records:
        assert r["id"] not in by_id, f"id {r['id']!r} written twice"
        by_id[r["id"]] = r
    return by_id


# -- parsing ------------------------------------------------------------------------------
def test_openai_lines_map_onto_requests():
    completion = parse_line(json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/completions", "body": {
        "model": "x", "prompt": "Hello", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
        "stop": ".", "min_tokens": 2}}), 1)
    assert completion.id == "c1" and completion.prompt == "Hello"
    assert completion.params == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=(".",),
                                               min_tokens=2)
    tokens = parse_line(json.dumps({"custom_id": 5, "url": "/v1/completions", "body": {"prompt": [1, 2, 3]}}), 2)
    assert tokens.prompt_token_ids == (1, 2, 3) and tokens.params.max_tokens == 16
    chat = parse_line(json.dumps({"custom_id": "c2", "method": "POST", "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
        "max_completion_tokens": 4}}), 3)
    assert chat.messages == CHAT and chat.prompt is None and chat.params.max_tokens == 4
    native = parse_line(json.dumps({"id": "n", "messages": list(CHAT), "max_tokens": 3}), 4)
    assert native.messages == CHAT and native.params.max_tokens == 3


def test_logprobs_are_read_as_each_api_names_them():
    def logprobs(line):
        return parse_line(json.dumps(line), 1).params.logprobs

    chat = {"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": list(CHAT)}}
    assert logprobs({"id": "n", "prompt": "x", "logprobs": 3}) == 3 and logprobs({"id": "n", "prompt": "x"}) is None
    assert logprobs({"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "x", "logprobs": 0}}) == 0
    assert logprobs({**chat, "body": {**chat["body"], "logprobs": True, "top_logprobs": 4}}) == 4
    assert logprobs({**chat, "body": {**chat["body"], "logprobs": True}}) == 0
    assert logprobs({**chat, "body": {**chat["body"], "logprobs": False}}) is None


def test_chat_messages_are_read_as_vllm_reads_them():
    line = parse_line(json.dumps({"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": [
        {"role": "user", "name": "alice", "content": ["Describe this.", {"type": "text", "text": "Be brief."},
                                                     {"type": "input_text", "text": "Thanks."}]},
        {"role": "assistant", "content": None}, {"role": "assistant"},
        {"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]}}), 1)
    assert line.messages == ({"role": "user", "name": "alice", "content": "Describe this.\nBe brief.\nThanks."},
                             {"role": "assistant", "content": ""}, {"role": "assistant", "content": ""},
                             {"role": "user", "content": "no"})
    for message, error in [({"role": "assistant", "content": "", "tool_result": []}, "unknown field"),
                           ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
                            r"messages\[0\].tool_calls: only an assistant message calls tools"),
                           ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, "only text parts"),
                           ({"role": "user", "content": [{"type": ["text"], "text": "a"}]}, "only text parts"),
                           ({"role": "user", "content": [{"type": {"a": 1}, "text": "a"}]}, "only text parts"),
                           ({"role": "user", "content": "x", "name": 3}, "name must be a string")]:
        with pytest.raises(ValueError, match=error):
            parse_line(json.dumps({"id": "n", "messages": [message]}), 1)


def test_openai_nulls_are_absent_and_max_completion_tokens_wins():
    """Request models serialised with their unset fields write null; the 200 was lost to max_tokens=16,
    and n/stream null were errors."""
    line = parse_line(json.dumps({"custom_id": "c", "url": "/v1/completions", "body": {
        "prompt": "Hi", "max_tokens": None, "max_completion_tokens": 200, "n": None, "stream": None,
        "temperature": None}}), 1)
    assert line.params == SamplingParams(max_tokens=200)
    both = parse_line(json.dumps({"custom_id": "c", "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "max_completion_tokens": 9}}), 1)
    assert both.params.max_tokens == 9


def test_a_line_that_is_not_utf8_is_an_error_of_its_own(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "caf\xff"}\n'
                     b'{"id": "c", "prompt": "y"}\n')
    items = read_requests(path)  # the whole file failed to decode, and no line ran
    assert [type(i).__name__ for i in items] == ["BatchRequest", "BadLine", "BatchRequest"]
    assert items[1].line == 2 and "not UTF-8: byte 0xff at column 27" in items[1].error
    assert items[0].id == "a"  # the BOM is not part of the first line


def test_a_tokenizer_flag_is_for_address_mode(tmp_path):
    from splitserve.runtime.cli_batch import main

    src = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    with pytest.raises(SystemExit, match="--tokenizer applies only with --address"):  # in-process: the model's own
        main(["--model", "demo", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--tokenizer", "demo"])
    for tokenizer, error in (("demo", "native lines name them by id"), (str(tmp_path), "no tokenizer.json there"),
                             (str(tmp_path / "nope"), "is not a directory")):
        with pytest.raises(SystemExit, match=error):  # before any call to the (absent) router
            main(["--address", "127.0.0.1:1", "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                  "--tokenizer", tokenizer, *(["--output-format", "openai"] if tokenizer != "demo" else [])])


def test_the_input_file_as_output_is_refused(tmp_path):
    class NeverRuns:
        def run(self, requests, recorder):
            raise AssertionError("nothing may run")

    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="is the input file"):  # the line was replaced by its result
        run_batch(path, path, NeverRuns())
    assert path.read_text() == '{"id": "a", "prompt": "x"}\n'


@pytest.mark.parametrize("line, error", [
    ('{"id": "a", "prompt": "x", "max_token": 3}', "unknown field max_token"),
    ('{"id": "a", "prompt": "x", "ignore_eos": 1}', "ignore_eos must be a boolean"),
    ('{"id": true, "prompt": "x"}', "id must be a non-empty string or an integer"),
    ('{"id": "a", "prompt_token_ids": [1, "2"]}', "prompt_token_ids must be a list of integers"),
    ('{"id": "a", "prompt": "x", "prompt_token_ids": [1]}', "only one of prompt, prompt_token_ids and messages"),
    ('{"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}', "url must be one of"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "n": "two"}}', "n must be an integer"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "top_logprobs": 2}}',
     "body.top_logprobs is a /v1/chat/completions field"),
    ('{"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": [], "logprobs": 2}}',
     "body.logprobs must be a boolean in /v1/chat/completions, got 2"),
    ('{"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": [], "top_logprobs": 2}}',
     "body.top_logprobs needs body.logprobs true"),
    ('{"id": "a", "prompt": "x", "logprobs": 21}', "logprobs must be in \\[0, 20\\]"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "n": 17}}', "n must be in \\[1, 16\\]"),
    ('{"id": "a", "prompt": "x", "logprobs": true}', "logprobs must be an integer"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"max_tokens": 3}}', "missing body.prompt"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": ["x", "y"]}}',
     "body.prompt holds 2 prompts: a batch line takes one"),
    ('[1, 2]', "expected a JSON object"),
    # Lone surrogates are valid JSON escapes but not text: no tokenizer or protobuf takes them.
    ('{"id": "a", "prompt": "hi \\ud83d"}', "the prompt is not valid Unicode text"),
    ('{"id": "a\\ud83d", "prompt": "x"}', "id is not valid Unicode text"),
    ('{"id": "a", "prompt": "x", "stop": "\\udc00"}', "a stop string is not valid Unicode text"),
    ('{"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", '
     '"content": "\\ud83d"}]}}', "the prompt is not valid Unicode text"),
    # Past 32 bits: the protos and the device arrays cannot carry them.
    ('{"id": "a", "prompt_token_ids": [1, 2147483648]}', "token ids must be in \\[0, 2147483647\\]"),
    ('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": [-1, 2]}}', "token ids must be in"),
    ('{"id": "a", "prompt": "x", "top_k": 2147483648}', "at most 2147483647"),
    ('{"id": "a", "prompt": "x", "max_tokens": 4294967296}', "at most 2147483647"),
    ('{"id": "a", "prompt": "x", "stop_token_ids": [2147483648]}', "stop_token_ids must be in"),
])
def test_bad_lines_name_the_problem(line, error):
    with pytest.raises(ValueError, match=error):
        parse_line(line, 1)


def test_synthetic_ids_never_collide_with_real_ones(tmp_path):
    items = read_requests(write_lines(tmp_path / "in.jsonl", [
        {"id": "line-2", "prompt": "a"}, "not json", "", {"id": "line-2", "prompt": "b"}]))
    assert [i.id for i in items] == ["line-2", "line-2'", "line-4"]  # the blank line 3 is not a request
    assert isinstance(items[2], BadLine) and "duplicate id" in items[2].error


def test_recover_output_cuts_only_a_torn_tail(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "error": "x"}\n{"id": 2, "text": "ok"}\n{"id": "c", "te')
    assert recover_output(out) == {"a", 2}
    assert out.read_bytes() == b'{"id": "a", "error": "x"}\n{"id": 2, "text": "ok"}\n'
    out.write_bytes(b'{"id": "a", "error": "x"}\n{"id": "b", "te\n')  # newline written, JSON torn
    assert recover_output(out) == {"a"} and out.read_bytes() == b'{"id": "a", "error": "x"}\n'
    out.write_bytes(b'{"id": "a", "error": "x"}\n{"id": "b", "text": "caf\xc3')  # a character cut in two
    assert recover_output(out) == {"a"} and out.read_bytes() == b'{"id": "a", "error": "x"}\n'
    out.write_bytes(b'garbage\n{"id": "a", "error": "x"}\n')
    with pytest.raises(ValueError, match="line 1 is not a result line"):
        recover_output(out)
    out.write_bytes(b'{"id": "a", "error": "x"}\n{"id": 2, "text": "ok"}')  # whole, only the newline missing
    assert recover_output(out) == {"a", 2} and out.read_bytes().endswith(b'"ok"}\n')


def test_a_resume_in_the_other_output_format_is_refused(tmp_path):
    """Both shapes in one file: a reader of either format would misread the other's lines."""
    out = tmp_path / "out.jsonl"
    native = b'{"id": "a", "error": "x"}\n'
    openai = b'{"id": "batch_req_1", "custom_id": "b", "response": {"status_code": 400}, "error": "y"}\n'
    out.write_bytes(native)
    with pytest.raises(ValueError, match="holds native lines .* re-run with --output-format native"):
        recover_output(out, openai=True)
    out.write_bytes(openai)
    assert recover_output(out, openai=True) == {"b"}
    with pytest.raises(ValueError, match="holds openai lines"):
        recover_output(out)
    assert out.read_bytes() == openai  # unchanged


@pytest.mark.parametrize("content", [
    b"my important notes\n",  # one line: once cut as a "torn" last line, emptying the file
    b"my important notes",
    b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}',  # an input file given as --output
    b'{"id": 1, "prompt": "x"}\n',  # a whole line that begins as ours: it was cut, emptying the file
    b'{"id": 1, "prompt": "x"}',
])
def test_recover_output_refuses_a_file_that_is_not_ours_and_leaves_it_alone(tmp_path, content):
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    with pytest.raises(ValueError, match="is this another file"):
        recover_output(out)
    assert out.read_bytes() == content


# -- in-process ---------------------------------------------------------------------------
def mixed_lines():
    """(line, expected): expected is ("ok", prompt text or ids, params) or ("error", id, message part)."""
    cases = []
    for i in range(8):
        p = SamplingParams(max_tokens=6 + i, ignore_eos=True)
        cases.append(({"id": f"t{i}", "prompt": f"The weather on day {i} is", "max_tokens": p.max_tokens,
                       "ignore_eos": True}, ("ok", f"The weather on day {i} is", p)))
    for i in range(6):
        ids = [1] + [(37 * i + 11 * k) % 2000 + 3 for k in range(5 + 7 * i)]
        cases.append(({"id": 100 + i, "prompt_token_ids": ids, "max_tokens": 12, "temperature": 0},
                      ("ok", ids, SamplingParams(max_tokens=12))))
    sampled = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    cases.append(({"id": "s", "prompt": "Once upon", "max_tokens": 10, "temperature": 0.8, "top_p": 0.9,
                   "top_k": 50, "seed": 7}, ("ok", "Once upon", sampled)))
    cases.append(({"custom_id": "oa1", "method": "POST", "url": "/v1/completions",
                   "body": {"model": "demo", "prompt": "A story about", "max_tokens": 9}},
                  ("ok", "A story about", SamplingParams(max_tokens=9))))
    # Chats: the demo model's chat template, checked against transformers' rendering of it.
    cases.append(({"custom_id": "oa2", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"messages": list(CHAT)}},
                  ("ok", transformers_chat_ids(json.dumps(CHAT)), SamplingParams(max_tokens=16))))
    turns = [{"role": "user", "content": "The weather?"}, {"role": "assistant", "content": "Sunny."},
             {"role": "user", "content": "And tomorrow, «demain»?"}]
    cases.append(({"id": "chat", "messages": turns, "max_tokens": 8, "ignore_eos": True},
                  ("ok", transformers_chat_ids(json.dumps(turns)), SamplingParams(max_tokens=8, ignore_eos=True))))
    cases.append(({"custom_id": "oa3", "url": "/v1/completions", "body": {"prompt": [1, 5, 9], "max_tokens": 5,
                                                                          "ignore_eos": True}},
                  ("ok", [1, 5, 9], SamplingParams(max_tokens=5, ignore_eos=True))))
    cases.append(({"id": "stop", "prompt": "The weather today is", "max_tokens": 20, "stop": ["ady"]},
                  ("ok", "The weather today is", SamplingParams(max_tokens=20, stop=("ady",)))))
    cases.append(({"id": "incl", "prompt": "The weather today is", "max_tokens": 20, "stop": ["ady"],
                   "include_stop_str_in_output": True},
                  ("ok", "The weather today is", SamplingParams(max_tokens=20, stop=("ady",),
                                                                include_stop_str_in_output=True))))
    cases.append(({"id": "pen", "prompt": "Once upon", "max_tokens": 12, "presence_penalty": 1.0,
                   "frequency_penalty": 0.5, "repetition_penalty": 1.4, "ignore_eos": True},
                  ("ok", "Once upon", SamplingParams(max_tokens=12, presence_penalty=1.0, frequency_penalty=0.5,
                                                     repetition_penalty=1.4, ignore_eos=True))))
    cases.append(({"id": "minp", "prompt": "Once upon", "max_tokens": 8, "temperature": 1.5, "seed": 4, "min_p": 0.2},
                  ("ok", "Once upon", SamplingParams(max_tokens=8, temperature=1.5, seed=4, min_p=0.2))))
    cases.append(({"id": "plp", "prompt": "Once upon a time", "max_tokens": 3, "prompt_logprobs": 2},
                  ("ok", "Once upon a time", SamplingParams(max_tokens=3, prompt_logprobs=2))))
    cases.append(({"id": "bias", "prompt": "Once upon", "max_tokens": 6, "logit_bias": {"42": 100},
                   "allowed_token_ids": [42, 43]},
                  ("ok", "Once upon", SamplingParams(max_tokens=6, logit_bias={42: 100}, allowed_token_ids=(42, 43)))))
    cases.append(({"id": "trunc", "prompt": "The weather today is", "max_tokens": 6, "truncate_prompt_tokens": 2},
                  ("ok", "The weather today is", SamplingParams(max_tokens=6, truncate_prompt_tokens=2))))
    cases.append(({"id": "lp", "prompt": "Once upon", "max_tokens": 6, "logprobs": 3},
                  ("ok", "Once upon", SamplingParams(max_tokens=6, logprobs=3))))
    cases.append(({"custom_id": "oa4", "url": "/v1/chat/completions",
                   "body": {"messages": list(CHAT), "max_tokens": 4, "logprobs": True, "top_logprobs": 2}},
                  ("ok", transformers_chat_ids(json.dumps(CHAT)), SamplingParams(max_tokens=4, logprobs=2))))
    cases.append(({"id": "min", "prompt": "The weather today is", "max_tokens": 20, "stop": ["ady"], "min_tokens": 9},
                  ("ok", "The weather today is", SamplingParams(max_tokens=20, stop=("ady",), min_tokens=9))))
    choice = {"choice": ["sunny", "rainy and cold"]}
    cases.append(({"id": "so", "prompt": "The weather today is", "max_tokens": 12, "temperature": 1.0, "seed": 5,
                   "structured_outputs": choice},
                  ("ok", "The weather today is", SamplingParams(max_tokens=12, temperature=1.0, seed=5,
                                                                structured_outputs=choice))))
    schema = {"type": "object", "properties": {"day": {"type": "integer"}}, "required": ["day"],
              "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    cases.append(({"custom_id": "oa5", "url": "/v1/chat/completions",
                   "body": {"messages": list(CHAT), "max_tokens": 16,
                            "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": schema}}}},
                  ("ok", transformers_chat_ids(json.dumps(CHAT)),
                   SamplingParams(max_tokens=16, structured_outputs={"json": schema}))))
    cases += [
        ({"id": "sox", "prompt": "x", "guided_regex": "[a"}, ("error", "sox", "unclosed character class")),
        # accepted, then llguidance gives up while decoding: an error line, not a "stop" that breaks the spec
        ({"id": "sol", "prompt": "x", "guided_regex": "(a{1000}){1000}"},
         ("error", "sol", "the output left its grammar at token 2")),
        ('{"id": "broken", "prompt": ', ("error", "line-{n}", "invalid JSON")),
        ({"id": "tp", "prompt": "x", "top_p": 2}, ("error", "tp", "top_p must be in (0, 1]")),
        ({"id": "mp", "prompt": "x", "min_p": 2}, ("error", "mp", "min_p must be in [0, 1]")),
        ({"id": "mps", "prompt": "x", "min_p": "0.1"}, ("error", "mps", "min_p must be a number")),
        ({"id": "lb", "prompt": "x", "logit_bias": [1, 2]}, ("error", "lb", "logit_bias must be an object")),
        ({"id": "lbv", "prompt": "x", "logit_bias": {"1": "high"}}, ("error", "lbv", "logit_bias values must be")),
        ({"id": "ati", "prompt": "x", "allowed_token_ids": [1, "2"]},
         ("error", "ati", "allowed_token_ids must be a list of integers")),
        ({"id": "atv", "prompt": "x", "allowed_token_ids": [99999]}, ("error", "atv", "outside the vocabulary")),
        ({"id": "mt", "prompt": "x", "max_tokens": "ten"}, ("error", "mt", "max_tokens must be an integer")),
        ({"id": "temp", "prompt": "x", "temperature": [1]}, ("error", "temp", "temperature must be a number")),
        ({"id": "empty", "prompt": ""}, ("error", "empty", "prompt is empty")),
        ({"id": "noids", "prompt_token_ids": []}, ("error", "noids", "prompt_token_ids is empty")),
        ({"id": "t0", "prompt": "again"}, ("error", "line-{n}", 'duplicate id "t0"')),
        ({"id": "nop", "max_tokens": 3}, ("error", "nop", "missing prompt")),
        ({"id": "nocontent", "messages": [{"role": "user", "content": 5}]}, ("error", "nocontent", "content must be")),
        ({"id": "two", "prompt": "x", "messages": list(CHAT)}, ("error", "two", "give only one of prompt")),
        ({"prompt": "no id"}, ("error", "line-{n}", "missing 'id'")),
        ({"id": "vocab", "prompt_token_ids": [1, 5000]}, ("error", "vocab", "outside the vocabulary")),
        ({"id": "ctx", "prompt": "x", "max_tokens": 4000}, ("error", "ctx", "exceeds the model's context")),
        ({"id": "seed", "prompt": "x", "seed": -1}, ("error", "seed", "seed must be in")),
        ({"id": "mint", "prompt": "x", "min_tokens": 2.5}, ("error", "mint", "min_tokens must be an integer")),
        ({"id": "pp", "prompt": "x", "presence_penalty": "high"}, ("error", "pp", "presence_penalty must be a number")),
        ({"id": "tpt", "prompt": "x", "truncate_prompt_tokens": 0}, ("error", "tpt", "truncate_prompt_tokens must be")),
        ({"id": "rp", "prompt": "x", "repetition_penalty": -1}, ("error", "rp", "repetition_penalty must be in [0.01")),
        ({"id": "hot", "prompt": "x", "temperature": 10**400}, ("error", "hot", "temperature must be a finite number")),
        ({"id": "minmax", "prompt": "x", "max_tokens": 3, "min_tokens": 4},
         ("error", "minmax", "min_tokens must be in")),
    ]
    return cases


def check_against_reference(out: dict, cases, reference) -> None:
    ok = [(line, exp) for line, exp in cases if exp[0] == "ok"]
    expected = [reference([exp[1]], exp[2])[0] for _, exp in ok]
    for (line, _), want in zip(ok, expected):
        got = out[line.get("id", line.get("custom_id"))]
        assert got["token_ids"] == want.token_ids and got["text"] == want.text, line
        assert got["finish_reason"] == want.finish_reason and got["prompt_tokens"] == len(want.prompt_token_ids)
        assert ("logprobs" in got) == (want.logprobs is not None), line
        assert got.get("stop_reason") == want.stop_reason and ("stop_reason" in got) == (want.stop_reason is not None)
        assert ("prompt_logprobs" in got) == (want.prompt_logprobs is not None), line
        for key, wanted in (("logprobs", want.logprobs), ("prompt_logprobs", want.prompt_logprobs)):
            assert len(got.get(key, [])) == len(wanted or [])
            for got_lp, want_lp in zip(got.get(key, []), wanted or []):
                assert got_lp["logprob"] == pytest.approx(want_lp.logprob, abs=1e-4)
                assert [t for t, _ in got_lp["top"]] == [t for t, _ in want_lp.top]
                assert got_lp.get("rank") == want_lp.rank and (want_lp.rank is None) == (key == "logprobs")


def test_in_process_mixed_file(tmp_path, model, reference):
    cases = mixed_lines()
    src = write_lines(tmp_path / "in.jsonl", [line for line, _ in cases])
    stats = run_batch(src, tmp_path / "out.jsonl", InProcessBackend(batch_engine(model)), progress=False)
    out = read_output(tmp_path / "out.jsonl")
    errors = [(n, exp) for n, (_, exp) in enumerate(cases, start=1) if exp[0] == "error"]
    assert len(out) == len(cases) and stats.done + stats.errors == len(cases) and stats.errors == len(errors)
    for n, (_, request_id, message) in errors:
        record = out[request_id.format(n=n)]
        assert message in record["error"] and record["error"].startswith(f"line {n}: "), record
    check_against_reference(out, cases, reference)
    assert out["stop"]["finish_reason"] == "stop" and "ady" not in out["stop"]["text"]
    assert out["stop"]["stop_reason"] == "ady" and "stop_reason" not in out["s"]
    assert stats.output_tokens == sum(len(r.get("token_ids", [])) for r in out.values())


def test_a_chat_for_a_model_without_a_chat_template_is_an_error_line(tmp_path, model, reference):
    """As vLLM refuses a chat when the model has no template, rather than guessing a format."""
    no_template = dataclasses.replace(model, chat_template=None)
    src = write_lines(tmp_path / "in.jsonl", [{"id": "c", "messages": list(CHAT)}, {"id": "p", "prompt": "Hi"}])
    stats = run_batch(src, tmp_path / "out.jsonl", InProcessBackend(batch_engine(no_template)), progress=False)
    out = read_output(tmp_path / "out.jsonl")
    assert stats.errors == 1 and "the model has no chat template" in out["c"]["error"]
    assert out["p"]["token_ids"] == reference(["Hi"], SamplingParams())[0].token_ids


def test_torn_tail_is_cut_and_redone(tmp_path, model, reference):
    cases = mixed_lines()[:6]
    src = write_lines(tmp_path / "in.jsonl", [line for line, _ in cases])
    out = tmp_path / "out.jsonl"
    run_batch(src, out, InProcessBackend(batch_engine(model)), progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    torn_id = json.loads(lines[3])["id"]
    out.write_bytes(b"".join(lines[:3]) + lines[3][:25])  # a crash mid-line: no newline
    stats = run_batch(src, out, InProcessBackend(batch_engine(model)), progress=False)
    assert stats.skipped == 3 and stats.done == 3
    records = read_output(out)
    assert set(records) == {line["id"] for line, _ in cases} and torn_id in records
    check_against_reference(records, cases, reference)


# -- kill -9 and resume -------------------------------------------------------------------
def test_sigkill_mid_file_then_resume(tmp_path, cache, reference):
    prompts = [f"Request number {i} says" for i in range(60)]
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    src = write_lines(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": p, "max_tokens": 48, "ignore_eos": True}
                                              for i, p in enumerate(prompts)])
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, str(REPO / "scripts" / "batch_infer.py"), "--model", "demo", "--input", str(src),
           "--output", str(out), "--max-batch", "2", "--platform", "cpu", "--no-progress"]
    env = dict(os.environ, SPLITSERVE_CACHE=cache, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_bytes().count(b"\n") >= 6):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no results written within 60 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out.read_bytes().count(b"\n")
    assert first < len(prompts), "the run finished before it was killed; make it longer"

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    skipped = int(rerun.stdout.split(" skipped")[0].rsplit(", ", 1)[1].split()[0])
    assert first <= skipped < len(prompts)  # lines cut as torn, if any, were redone
    records = read_output(out)
    assert set(records) == {f"r{i}" for i in range(len(prompts))}
    expected = reference(prompts, params)
    for i, want in enumerate(expected):
        assert records[f"r{i}"]["token_ids"] == want.token_ids and records[f"r{i}"]["text"] == want.text


def test_script_runs_as_a_module_with_the_same_flags():
    help_text = subprocess.run([sys.executable, "-m", "splitserve.scripts.batch_infer", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--concurrency" in help_text and "rendered by the model's chat template" in help_text


# -- router -------------------------------------------------------------------------------
def test_address_mode_matches_in_process(tmp_path, cache, model, reference):
    from splitserve.runtime.cli_batch import main

    cases = [(line, exp) for line, exp in mixed_lines()
             if exp[0] == "ok" and exp[2].temperature == 0 or exp[1] in ("tp", "vocab")]
    src = write_lines(tmp_path / "in.jsonl", [line for line, _ in cases])
    out = tmp_path / "out.jsonl"
    with launched("demo", "--num-pages", "256", "--page-size", "8") as stack:
        with pytest.raises(SystemExit, match="--mesh applies only with --model"):
            main(["--address", stack.address, "--input", str(src), "--output", str(out), "--mesh", "tp=2"])
        assert main(["--address", stack.address, "--input", str(src), "--output", str(out),
                     "--concurrency", "4", "--no-progress"]) == 0
        openai_out = tmp_path / "openai.jsonl"
        assert main(["--address", stack.address, "--input", str(src), "--output", str(openai_out),
                     "--output-format", "openai", "--no-progress"]) == 0
        n_out = tmp_path / "n.jsonl"
        assert main(["--address", stack.address, "--input", str(write_lines(tmp_path / "n_in.jsonl", N_LINES)),
                     "--output", str(n_out), "--output-format", "openai", "--no-progress"]) == 0
        from splitserve.runtime.client import Client

        with Client(stack.address) as client:
            served = client.model_info().name
    records = read_output(out)
    assert len(records) == len(cases)
    assert "top_p" in records["tp"]["error"] and "INVALID_ARGUMENT" in records["vocab"]["error"]
    check_against_reference(records, cases, reference)
    openai = {r["custom_id"]: r for r in map(json.loads, openai_out.read_text().splitlines())}
    assert set(openai) == set(records)
    check_n_choices({r["custom_id"]: r for r in map(json.loads, n_out.read_text().splitlines())}, reference)
    for request_id, record in records.items():
        if "error" in record:
            assert openai[request_id]["error"] == record["error"]
        else:
            body = openai[request_id]["response"]["body"]
            assert body["model"] == served == "splitserve-demo-v2"
            if "logprobs" in record:  # OpenAI's shapes; without --tokenizer the tokens are named by id
                shown = body["choices"][0]["logprobs"]
                entries = shown.get("content") or [{"token": t, "logprob": v}
                                                   for t, v in zip(shown["tokens"], shown["token_logprobs"])]
                assert [e["token"] for e in entries] == [f"token_id:{t}" for t in record["token_ids"]]
                assert [e["logprob"] for e in entries] == pytest.approx(  # two runs, batched apart
                    [lp["logprob"] for lp in record["logprobs"]], abs=1e-5)


class BusyRouter:
    """A client whose router answers RESOURCE_EXHAUSTED to the first `busy` calls."""

    def __init__(self, busy: int):
        import threading

        self.busy, self.calls, self._lock = busy, 0, threading.Lock()

    def generate_n(self, prompt, n, **kw):
        import grpc

        from splitserve.runtime.client import SplitserveError
        from splitserve.runtime.request import Completion

        with self._lock:
            self.calls += 1
            if self.calls <= self.busy:
                raise SplitserveError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the router is at its limit")
        return [Completion(text="ok", token_ids=[5], prompt_token_ids=[1], finish_reason="length", ttft_s=0.0,
                           latency_s=0.0)] * n


def test_a_busy_router_is_asked_again_not_the_end_of_the_batch(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": "x"} for i in range(6)])
    out = tmp_path / "out.jsonl"
    client = BusyRouter(busy=3)  # the batch stopped at the first, with 5 lines left for a re-run
    stats = run_batch(src, out, RemoteBackend(client, concurrency=2, busy_backoff_s=(0.01,)), progress=False)
    assert stats.errors == 0 and sorted(read_output(out)) == list(range(6)) and client.calls == 9
    with pytest.raises(BatchAborted, match="RESOURCE_EXHAUSTED"):  # past its patience, it stops as before
        run_batch(src, tmp_path / "out2.jsonl", RemoteBackend(BusyRouter(busy=10**6), busy_backoff_s=(0.01,),
                                                             busy_patience_s=0.05), progress=False)


def test_in_process_admits_in_prompt_length_order(tmp_path, model):
    """Prompts of similar length share prefill batches and decode page tables: the engine sees
    them shortest first, whatever the file's order; the results are the same either way."""
    lengths = [90, 5, 60, 20, 120, 40, 75, 10]
    src = write_lines(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt_token_ids": [1] + [7] * (n - 1), "max_tokens": 2}
                                               for i, n in enumerate(lengths)])
    engine = batch_engine(model)
    admitted = []
    add_request = engine.add_request
    engine.add_request = lambda prompt_ids, params: (admitted.append(len(prompt_ids)), add_request(prompt_ids, params))[1]
    run_batch(src, tmp_path / "out.jsonl", InProcessBackend(engine), progress=False)
    assert admitted == sorted(lengths)
    assert len(read_output(tmp_path / "out.jsonl")) == len(lengths)


N_LINES = [{"custom_id": "three", "url": "/v1/completions",
            "body": {"prompt": "Once upon", "max_tokens": 8, "n": 3, "temperature": 1.0, "seed": 5}},
           {"custom_id": "chat2", "url": "/v1/chat/completions",
            "body": {"messages": list(CHAT), "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 9}},
           {"id": "native3", "prompt": "Once upon", "max_tokens": 8, "n": 3, "temperature": 1.0, "seed": 5}]


def check_n_choices(lines: dict, reference) -> None:
    """Each line's n choices are the engine's runs with seed + index, as vLLM's n."""
    want = reference(["Once upon"] * 3, [SamplingParams(max_tokens=8, temperature=1.0, seed=5 + i) for i in range(3)])
    body = lines["three"]["response"]["body"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [w.text for w in want] and len({w.text for w in want}) > 1
    assert body["usage"]["completion_tokens"] == sum(len(w.token_ids) for w in want)
    assert body["usage"]["prompt_tokens"] == len(want[0].prompt_token_ids)
    assert [c["text"] for c in lines["native3"]["response"]["body"]["choices"]] == [w.text for w in want]
    chat_ids = transformers_chat_ids(json.dumps(CHAT))
    want = reference([chat_ids] * 2, [SamplingParams(max_tokens=6, temperature=1.0, seed=9 + i) for i in range(2)])
    assert [c["message"]["content"] for c in lines["chat2"]["response"]["body"]["choices"]] == [w.text for w in want]


def test_n_completions_per_line_are_openai_choices(tmp_path, model, reference):
    from splitserve.runtime.batch_output import OpenAIOutput

    src = write_lines(tmp_path / "in.jsonl", N_LINES)
    out = tmp_path / "out.jsonl"
    stats = run_batch(src, out, InProcessBackend(batch_engine(model)), progress=False, output=OpenAIOutput("demo"))
    assert stats.done == 3 and stats.errors == 0
    check_n_choices({r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}, reference)
    native = tmp_path / "native.jsonl"
    stats = run_batch(src, native, InProcessBackend(batch_engine(model)), progress=False)
    assert stats.errors == 3 and all("n > 1 is written with --output-format openai" in r["error"]
                                     for r in read_output(native).values())


# -- OpenAI Batch API output ----------------------------------------------------------------
def test_openai_output_lines_carry_the_same_results_and_resume_on_custom_id(tmp_path, model):
    from splitserve.runtime.batch_output import OpenAIOutput

    cases = mixed_lines()
    src = write_lines(tmp_path / "in.jsonl", [line for line, _ in cases])
    native, openai = tmp_path / "native.jsonl", tmp_path / "openai.jsonl"
    run_batch(src, native, InProcessBackend(batch_engine(model)), progress=False)
    run_batch(src, openai, InProcessBackend(batch_engine(model)), progress=False,
              output=OpenAIOutput("demo", model.tokenizer))
    want = read_output(native)
    lines = [json.loads(line) for line in openai.read_text().splitlines()]
    got = {line["custom_id"]: line for line in lines}
    assert len(got) == len(lines) == len(want)
    chat_ids = {line.get("id", line.get("custom_id")) for line, _ in cases
                if isinstance(line, dict) and ("messages" in line or line.get("url") == "/v1/chat/completions")}
    assert {"chat", "oa2"} <= chat_ids
    for request_id, expected in want.items():
        line = got[request_id]
        assert line["id"].startswith("batch_req_") and set(line) == {"id", "custom_id", "response", "error"}
        if "error" in expected:
            assert line["response"]["status_code"] == 400 and line["error"] == expected["error"]
            continue
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        (choice,) = body["choices"]
        if "logprobs" in expected:  # OpenAI's shapes, tokens named by the model's tokenizer
            got_logprobs = choice["logprobs"]["content"] if request_id in chat_ids else choice["logprobs"]
            values = ([e["logprob"] for e in got_logprobs] if request_id in chat_ids
                      else got_logprobs["token_logprobs"])
            assert values == pytest.approx([lp["logprob"] for lp in expected["logprobs"]], abs=1e-5)
        if "prompt_logprobs" in expected:  # vLLM's shape: the prompt token first, with its rank
            shown = choice["prompt_logprobs"]
            assert shown[0] is None and len(shown) == expected["prompt_tokens"]
            ranks = [next(iter(position.values()))["rank"] for position in shown[1:]]
            assert ranks == [e["rank"] for e in expected["prompt_logprobs"]]
        assert body["model"] == "demo" and choice["finish_reason"] == expected["finish_reason"]
        assert choice["stop_reason"] == expected.get("stop_reason")  # vLLM's: null unless a stop string or id
        if request_id in chat_ids:
            assert body["object"] == "chat.completion" and choice["message"] == {
                "role": "assistant", "content": expected["text"]}
        else:
            assert body["object"] == "text_completion" and choice["text"] == expected["text"]
        assert body["usage"] == {"prompt_tokens": expected["prompt_tokens"],
                                 "completion_tokens": len(expected["token_ids"]),
                                 "total_tokens": expected["prompt_tokens"] + len(expected["token_ids"])}
    # Resume: a torn tail is cut and only the missing requests run again, matched on custom_id.
    raw = openai.read_bytes().splitlines(keepends=True)
    openai.write_bytes(b"".join(raw[:5]) + raw[5][:30])
    stats = run_batch(src, openai, InProcessBackend(batch_engine(model)), progress=False, output=OpenAIOutput("demo"))
    assert stats.skipped == 5 and stats.done + stats.errors == len(cases) - 5
    resumed = [json.loads(line)["custom_id"] for line in openai.read_text().splitlines()]
    assert sorted(map(str, resumed)) == sorted(map(str, want))


def test_tool_lines_get_tool_calls_as_openai_server_answers_them(tmp_path, model):
    """A named function's arguments equal the same schema's structured output; an "auto" line's
    answer (forced to a <tool_call> by a regex) is read by the hermes parser and equals the text of
    the same line without tools. Without a parser, "auto" lines get an error line; so do tools in
    native lines."""
    import jsonschema

    from splitserve.runtime.batch_output import OpenAIOutput
    from test_tool_calls import TOOLS

    parameters = {**TOOLS[0]["function"]["parameters"], "additionalProperties": False,
                  "x-guidance": {"whitespace_flexible": False}}
    parameters["properties"] = {**parameters["properties"], "city": {"type": "string", "maxLength": 10}}
    tools = [{"type": "function", "function": {**TOOLS[0]["function"], "parameters": parameters}}, TOOLS[1]]
    regex = r'<tool_call>\n\{"name": "now", "arguments": \{\}\}\n</tool_call>'
    chat = [{"role": "user", "content": "Weather in Paris?"}]

    def line(custom_id, **body):
        return {"custom_id": custom_id, "url": "/v1/chat/completions",
                "body": {"messages": chat, "max_tokens": 40, "temperature": 0.9, "seed": 4, **body}}

    lines = [line("named", tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}}),
             line("schema", response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": parameters}}),
             line("auto", tools=tools, guided_regex=regex, max_tokens=120), line("text", guided_regex=regex, max_tokens=120)]
    src = write_lines(tmp_path / "in.jsonl", lines)
    out, unparsed, native = tmp_path / "out.jsonl", tmp_path / "unparsed.jsonl", tmp_path / "native.jsonl"
    run_batch(src, out, InProcessBackend(batch_engine(model)), progress=False,
              output=OpenAIOutput("demo", model.tokenizer, "hermes"))
    got = {r["custom_id"]: r["response"]["body"]["choices"][0] for r in map(json.loads, out.read_text().splitlines())}
    call, = got["named"]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and got["named"]["message"]["content"] is None
    assert call["function"]["arguments"] == got["schema"]["message"]["content"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)
    call, = got["auto"]["message"]["tool_calls"]
    assert re.fullmatch(regex, got["text"]["message"]["content"]) and got["text"]["finish_reason"] == "stop"
    assert "tool_calls" not in got["text"]["message"]
    assert (call["function"]["name"], call["function"]["arguments"]) == ("now", "{}")
    assert got["auto"]["finish_reason"] == "tool_calls" and got["auto"]["message"]["content"] is None
    run_batch(src, unparsed, InProcessBackend(batch_engine(model)), progress=False,
              output=OpenAIOutput("demo", model.tokenizer))
    errors = {r["custom_id"]: r["error"] for r in map(json.loads, unparsed.read_text().splitlines())}
    assert "--tool-call-parser" in errors["auto"] and errors["named"] is errors["text"] is None
    run_batch(src, native, InProcessBackend(batch_engine(model)), progress=False)
    assert read_output(native)["named"]["error"] == "line 1: tools are written with --output-format openai (the calls " \
        "go in its tool_calls)"


def test_skip_special_tokens_false_keeps_their_text_as_transformers_decodes_it(tmp_path, model):
    import transformers

    from splitserve.models.demo import ensure_demo_model
    from splitserve.runtime.batch_io import parse_line
    from splitserve.runtime.batch_output import OpenAIOutput

    tokenizer = transformers.AutoTokenizer.from_pretrained(ensure_demo_model())
    bos = tokenizer.convert_tokens_to_ids("<s>")
    line = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0, "seed": 11, "ignore_eos": True,
            "allowed_token_ids": [bos, *range(300, 340)], "logit_bias": {str(bos): 3.0}}
    src = write_lines(tmp_path / "in.jsonl", [{"id": "kept", "skip_special_tokens": False, **line},
                                              {"id": "skipped", **line}])
    run_batch(src, tmp_path / "out.jsonl", InProcessBackend(batch_engine(model)), progress=False)
    out = read_output(tmp_path / "out.jsonl")
    ids = out["kept"]["token_ids"]
    assert ids == out["skipped"]["token_ids"] and 0 < ids.count(bos) < 20
    assert out["kept"]["text"] == tokenizer.decode(ids, skip_special_tokens=False) and "<s>" in out["kept"]["text"]
    assert out["skipped"]["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    # A tool line read by a parser that wants the markers' text asks for it, as openai-server's does.
    tools = {"custom_id": "t", "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}}
    request = parse_line(json.dumps(tools), 1)
    assert OpenAIOutput("demo", None, "hermes").prepared(request).params.skip_special_tokens is False
    assert OpenAIOutput("demo", None, "llama3_json").prepared(request).params.skip_special_tokens is True


def test_echo_lines_show_the_prompt_before_the_answer_as_openai_server_does(tmp_path, model):
    """OpenAI completions lines with echo: the text begins with the prompt (token ids as the tokenizer
    decodes them), logprobs begin with the prompt's (the first null); max_tokens 0 shows the prompt
    alone. The values equal a native line's logprobs and prompt_logprobs for the same request. A
    native line cannot hold an echo: an error line."""
    from splitserve.runtime.batch_output import OpenAIOutput

    ids = model.tokenizer.encode("The sea was")
    bodies = {"text": {"prompt": "Once upon a time", "echo": True, "max_tokens": 3, "logprobs": 1, "ignore_eos": True},
              "ids": {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 2}}
    lines = [{"custom_id": k, "url": "/v1/completions", "body": b} for k, b in bodies.items()]
    natives = [{"id": k, "prompt_token_ids": model.tokenizer.encode(b["prompt"]) if k == "text" else ids,
                "max_tokens": max(b["max_tokens"], 1), "logprobs": b["logprobs"], "prompt_logprobs": b["logprobs"],
                "ignore_eos": True} for k, b in bodies.items()]
    src, native_src = write_lines(tmp_path / "in.jsonl", lines), write_lines(tmp_path / "n.jsonl", natives)
    out, native_out, refused = tmp_path / "out.jsonl", tmp_path / "native.jsonl", tmp_path / "refused.jsonl"
    run_batch(src, out, InProcessBackend(batch_engine(model)), progress=False,
              output=OpenAIOutput("demo", model.tokenizer))
    run_batch(native_src, native_out, InProcessBackend(batch_engine(model)), progress=False)
    run_batch(src, refused, InProcessBackend(batch_engine(model)), progress=False)
    got = {r["custom_id"]: r["response"]["body"]["choices"][0] for r in map(json.loads, out.read_text().splitlines())}
    want = read_output(native_out)
    assert got["text"]["text"] == "Once upon a time" + want["text"]["text"]
    assert got["ids"]["text"] == model.tokenizer.decode(ids, skip_special_tokens=False)  # max_tokens 0: the prompt
    for key, only_prompt in (("text", False), ("ids", True)):
        logprobs = got[key]["logprobs"]
        expected = [lp["logprob"] for lp in want[key]["prompt_logprobs"]]
        if not only_prompt:
            expected += [lp["logprob"] for lp in want[key]["logprobs"]]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    refusals = read_output(refused)
    assert len(refusals) == 2 and all("echo is written with --output-format openai" in r["error"]
                                      for r in refusals.values())
    assert "needs the model's tokenizer" in OpenAIOutput("demo").refuses(parse_line(json.dumps(lines[1]), 1))
    assert OpenAIOutput("demo").refuses(parse_line(json.dumps(lines[0]), 1)) is None  # a text echoes as sent


def test_the_mixed_file_again_through_a_prefix_cache(tmp_path, model, reference):
    """Every kind of line (logprobs, prompt logprobs, penalties, stop strings, n) gives the same results
    when its prompt's start comes from the prefix cache: the second pass finds the first's blocks."""
    from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig

    engine = ColocatedEngine(model, EngineConfig(page_size=8, num_pages=256, max_batch=4, max_prefill_batch=4,
                                                 prefix_cache_pages=256))
    cases = mixed_lines()
    src = write_lines(tmp_path / "in.jsonl", [line for line, _ in cases])
    run_batch(src, tmp_path / "first.jsonl", InProcessBackend(engine), progress=False)
    hits = engine.runner.prefix_cache.hit_tokens
    run_batch(src, tmp_path / "second.jsonl", InProcessBackend(engine), progress=False)
    assert engine.runner.prefix_cache.hit_tokens - hits >= 8 * 5  # whole blocks of at least five prompts
    second = read_output(tmp_path / "second.jsonl")
    check_against_reference(second, cases, reference)
    # Each line says what it took from the cache.
    for name, found in (("first", hits), ("second", engine.runner.prefix_cache.hit_tokens - hits)):
        lines = read_output(tmp_path / f"{name}.jsonl").values()
        assert sum(r.get("cached_prompt_tokens", 0) for r in lines) == found


def test_prefix_caching_flags_are_for_in_process_runs(tmp_path):
    from splitserve.runtime.cli_batch import main

    src = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    for flags in (["--enable-prefix-caching"], ["--prefix-cache-gib", "0.1"]):
        with pytest.raises(SystemExit, match=f"{flags[0]} applies only with --model"):
            main(["--address", "127.0.0.1:1", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), *flags])
