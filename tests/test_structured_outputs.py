"""Structured outputs: the spec type, the request fields that set it, the token masks, and the
colocated engine's output checked by parsers we did not write (re, json, jsonschema)."""

import json
import re

import jsonschema
import numpy as np
import pytest

from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
from splitserve.runtime.grammar_masks import GrammarMasks, allowed_ids
from splitserve.runtime.request_fields import sampling_params
from splitserve.runtime.sampling_params import SamplingParams
from splitserve.runtime.structured_outputs import StructuredOutputs

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}  # compact JSON: a random model never ends loose whitespace
REGEX = r"[0-9]{3}-[a-z]{2,5}( [A-Z][a-z]{1,8})?"  # bounded: a random model may never stop a run of letters
CHOICES = ("yes", "no", "maybe so", "never ever")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import os

    os.environ["SPLITSERVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return load_model("demo", make_mesh(MeshConfig(1)))


@pytest.fixture(scope="module")
def engine(demo):
    return ColocatedEngine(demo, EngineConfig(page_size=8, num_pages=512, max_batch=8))


# -- the spec ---------------------------------------------------------------------------------
def test_a_spec_names_exactly_one_kind_and_bad_ones_say_why():
    assert StructuredOutputs(json=SCHEMA).kind == "json" and json.loads(StructuredOutputs(json=SCHEMA).json) == SCHEMA
    assert StructuredOutputs(choice=["a", "b"]).choice == ("a", "b")
    for kwargs, message in [({}, "exactly one"), ({"regex": "a", "choice": ["b"]}, "regex, choice"),
                            ({"json": "{"}, "not valid JSON"), ({"choice": "ab"}, "list of strings"),
                            ({"choice": {"yes": 1, "no": 2}}, "list of strings"), ({"choice": 3}, "list of strings"),
                            ({"choice": []}, "1 to"), ({"regex": ""}, "non-empty"), ({"json_object": 1}, "boolean"),
                            ({"regex": "x" * (300 << 10)}, "over the")]:
        with pytest.raises(ValueError, match=message):
            StructuredOutputs(**kwargs)
    for kwargs, message in [({"regex": "[0-9"}, "unclosed character class"), ({"json": {"type": "fish"}}, "fish"),
                            ({"grammar": "start: (("}, "grammar")]:
        with pytest.raises(ValueError, match=message):
            StructuredOutputs(**kwargs).check()  # llguidance's own message
    with pytest.raises(ValueError, match="ignore_eos or min_tokens"):
        SamplingParams(structured_outputs={"regex": "a+"}, ignore_eos=True)


def test_every_name_vllm_and_openai_take_sets_the_same_spec():
    def spec(**fields):
        return sampling_params(fields).structured_outputs

    schema = StructuredOutputs(json=SCHEMA)
    assert spec(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}) == schema
    assert spec(guided_json=SCHEMA) == schema == spec(structured_outputs={"json": SCHEMA})
    assert spec(response_format={"type": "json_object"}) == StructuredOutputs(json_object=True)
    assert spec(response_format={"type": "text"}) is None and spec() is None
    assert spec(guided_regex=REGEX) == StructuredOutputs(regex=REGEX) == spec(structured_outputs={"regex": REGEX})
    assert spec(guided_choice=list(CHOICES)) == StructuredOutputs(choice=CHOICES)
    assert spec(guided_grammar='start: "a"') == StructuredOutputs(grammar='start: "a"')
    for fields, message in [({"guided_regex": "a", "response_format": {"type": "json_object"}}, "give one"),
                            ({"response_format": {"type": "xml"}}, "text, json_object or json_schema"),
                            ({"response_format": {"type": "json_schema"}}, "json_schema"),
                            ({"structured_outputs": {"regexp": "a"}}, "unknown structured_outputs field regexp")]:
        with pytest.raises(ValueError, match=message):
            sampling_params(fields)


# -- the masks --------------------------------------------------------------------------------
def test_a_choice_allows_exactly_the_tokens_that_start_a_choice(demo):
    """Against the tokenizer's own bytes: at the start, a token may be sampled iff its bytes begin
    one of the choices; after "maybe", only tokens that continue one."""
    masks = GrammarMasks(demo.tokenizer, demo.config.vocab_size, demo.config.eos_token_ids)
    params = SamplingParams(structured_outputs={"choice": list(CHOICES)})
    vocab = demo.config.vocab_size
    token_bytes = [demo.tokenizer.token_bytes(t) for t in range(vocab)]
    special = set(demo.config.eos_token_ids) | {demo.config.bos_token_id}

    def expected(done: bytes) -> set[int]:
        return {t for t, b in enumerate(token_bytes) if b and t not in special
                and any(c.encode().startswith(done + b) for c in CHOICES)}

    first = masks.first_masks([params])[0]
    assert set(allowed_ids(first, vocab).tolist()) == expected(b"") != set()
    maybe = demo.tokenizer.encode("maybe", add_special_tokens=False)
    steps = masks.step_masks(["r"], [params], [1], [maybe[0]])  # the prefill's token, then the rest
    for i, token in enumerate(maybe[1:], start=2):
        steps = masks.step_masks(["r"], [params], [i], [token])
    # Where the rest is forced (" so"), llguidance may keep to fewer ways of spelling it; never more.
    assert 313 in set(allowed_ids(steps[0], vocab).tolist()) <= expected(b"maybe")
    so = demo.tokenizer.encode("maybe so", add_special_tokens=False)[len(maybe):]
    for i, token in enumerate(so, start=len(maybe) + 1):
        steps = masks.step_masks(["r"], [params], [i], [token])
    assert set(allowed_ids(steps[0], vocab).tolist()) == set(demo.config.eos_token_ids)  # complete: only EOS
    assert masks.step_masks(["other"], [SamplingParams()], [1], [5]) == [None]  # "r" is gone, nothing else is masked


# llguidance accepts this regex, then gives up after two "a"s: its lexer grows too complex.
FAILS_LATER = {"regex": "(a{1000}){1000}"}


def test_a_matcher_that_fails_midway_is_reported_once_and_masks_eos(demo):
    masks = GrammarMasks(demo.tokenizer, demo.config.vocab_size, demo.config.eos_token_ids)
    params = SamplingParams(structured_outputs=FAILS_LATER)
    masks.check(params)  # nothing to refuse up front
    a = demo.tokenizer.encode("a", add_special_tokens=False)
    assert allowed_ids(masks.first_masks([params])[0], demo.config.vocab_size).tolist() == a
    masks.step_masks(["r"], [params], [1], a)
    assert masks.take_failed() == {}
    step = masks.step_masks(["r", "free"], [params, SamplingParams()], [2, 2], a + [5])
    assert masks.take_failed() == {"r": "structured_outputs.regex: the output left its grammar at token 2: "
                                        "lexer error: too many expressions constructed"}
    assert set(allowed_ids(step[0], demo.config.vocab_size).tolist()) == set(demo.config.eos_token_ids)
    assert step[1] is None and masks.take_failed() == {}  # taken once


def test_the_engine_ends_a_request_whose_grammar_fails_with_its_error(demo, engine):
    """Not a "stop" whose text breaks the spec: the request ends with the error, its pages are
    free, and the requests beside it finish as before."""
    from splitserve.runtime.in_process import generate_stream

    prompt = demo.tokenizer.encode("The kitchen was warm")
    free_pages = engine.scheduler.allocator.free_count
    with pytest.raises(ValueError, match="the output left its grammar at token 2: lexer error"):
        list(generate_stream(engine, prompt, SamplingParams(max_tokens=8, structured_outputs=FAILS_LATER)))
    assert engine.scheduler.allocator.free_count == free_pages and not engine.has_unfinished()
    fails, free = engine.generate([prompt, prompt], [SamplingParams(max_tokens=8, structured_outputs=FAILS_LATER),
                                                     SamplingParams(max_tokens=8, ignore_eos=True)])
    assert fails.finish_reason == "abort" and fails.text == "aa"
    assert free.finish_reason == "length" and len(free.token_ids) == 8


def test_allowed_token_ids_that_leave_the_grammar_nothing_are_an_error_not_unk(demo, engine):
    """The sampler would see only -inf logits and take id 0 (<unk>) again and again: refused up front
    when no allowed id can begin the output; an error once the output is complete and EOS is not allowed."""
    from splitserve.runtime.in_process import generate_stream

    abc = [demo.tokenizer.encode(c, add_special_tokens=False)[0] for c in "abc"]
    prompt = demo.tokenizer.encode("The kitchen was warm")
    regex = {"regex": "[a-c]{3}"}
    with pytest.raises(ValueError, match="leave no token to sample: none of the allowed ids can begin the output"):
        engine.add_request(prompt, SamplingParams(max_tokens=8, allowed_token_ids=(5, 6, 7), structured_outputs=regex))
    with_eos = SamplingParams(max_tokens=8, allowed_token_ids=(*abc, *demo.config.eos_token_ids), structured_outputs=regex)
    (out,) = engine.generate([prompt], with_eos)
    assert out.finish_reason == "stop" and re.fullmatch("[a-c]{3}", out.text)
    with pytest.raises(ValueError, match="leave no token to sample after 3 output tokens "
                                         r"\(the output is complete, and EOS is not allowed\)"):
        list(generate_stream(engine, prompt, SamplingParams(max_tokens=8, allowed_token_ids=tuple(abc),
                                                            structured_outputs=regex)))
    assert not engine.has_unfinished()


# -- the engine -------------------------------------------------------------------------------
def _check(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES
    else:  # the Lark grammar below, as a regex
        assert re.fullmatch(r"\((0|[1-9][0-9]{0,3})(,(0|[1-9][0-9]{0,3}))*\)", text), text


SPECS = {"json": {"json": SCHEMA}, "regex": {"regex": REGEX}, "choice": {"choice": list(CHOICES)},
         "grammar": {"grammar": 'start: "(" NUM ("," NUM)* ")"\nNUM: /0|[1-9][0-9]{0,3}/'}}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_engine_samples_only_what_the_spec_accepts(demo, engine, temperature):
    prompts = [demo.tokenizer.encode(t) for t in ("The kitchen was warm", "A letter came", "Numbers:")]
    kinds = [kind for kind in SPECS for _ in prompts]
    params = [SamplingParams(max_tokens=64, temperature=temperature, seed=seed, structured_outputs=SPECS[kind])
              for seed, kind in enumerate(kinds)]
    outs = engine.generate([p for _ in SPECS for p in prompts], params)
    for kind, out in zip(kinds, outs):
        assert out.finish_reason == "stop", (kind, out.text)  # the grammar completed, then EOS
        assert out.token_ids[-1] in demo.config.eos_token_ids
        _check(kind, out.text)


def test_constrained_rows_leave_the_others_alone(demo, engine):
    """A free request decodes the same tokens beside constrained ones as alone, and a logit bias
    towards a token outside the grammar does not get it sampled."""
    ids = demo.tokenizer.encode("The kitchen was warm and the bread")
    free = SamplingParams(max_tokens=24, temperature=0.8, seed=7)
    alone = engine.generate([ids], free)[0]
    digit_free = [t for t in range(demo.config.vocab_size)
                  if demo.tokenizer.token_bytes(t) and not any(48 <= b <= 57 for b in demo.tokenizer.token_bytes(t))]
    pushed = SamplingParams(max_tokens=24, structured_outputs={"regex": "[0-9]{6}"},
                            logit_bias={t: 100.0 for t in digit_free[:300]})
    outs = engine.generate([ids, ids, ids], [free, SamplingParams(max_tokens=24, structured_outputs=SPECS["choice"]),
                                             pushed])
    assert outs[0].token_ids == alone.token_ids
    _check("choice", outs[1].text)
    assert re.fullmatch("[0-9]{6}", outs[2].text) and outs[2].finish_reason == "stop"
    no_tokenizer = GrammarMasks(None, demo.config.vocab_size, demo.config.eos_token_ids)
    with pytest.raises(ValueError, match="tokenizer"):
        no_tokenizer.check(SamplingParams(structured_outputs={"regex": "a"}))
    with pytest.raises(ValueError, match="unclosed"):
        engine.add_request(ids, SamplingParams(structured_outputs={"regex": "[a"}))  # refused before any step
    assert np.all(np.isfinite([len(o.token_ids) for o in outs]))


def test_a_prefix_cache_hit_samples_its_first_token_under_the_mask(demo, engine):
    """The first token of a prompt whose start came from the prefix cache is sampled by another
    program (runtime/prefix_cache.py): it takes the mask too, and the tokens equal a cacheless engine's."""
    start = demo.tokenizer.encode("The kitchen was warm and the bread was fresh, and outside the snow fell " * 2)
    prompts = [start + demo.tokenizer.encode(f" Day {i}:", add_special_tokens=False) for i in range(3)]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=i, structured_outputs=SPECS[kind])
              for i, kind in enumerate(("choice", "regex", "grammar"))]
    cached = ColocatedEngine(demo, EngineConfig(page_size=8, num_pages=256, max_batch=4, prefix_cache_pages=64))
    first = cached.generate(prompts[:1], params[:1])
    rest = cached.generate(prompts[1:], params[1:])
    assert [c.cached_prompt_tokens > 0 for c in first + rest] == [False, True, True]
    assert [c.token_ids for c in first + rest] == [c.token_ids for c in engine.generate(prompts, params)]
    for kind, out in zip(("choice", "regex", "grammar"), first + rest):
        _check(kind, out.text)
