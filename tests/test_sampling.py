"""On-device sampling: greedy, temperature, top-k, top-p, seeds; parameter validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitserve.runtime.sampling import SamplingArrays
from splitserve.runtime.sampling import sample as sampled_step
from splitserve.runtime.sampling_params import SamplingParams


def sample(logits, s):
    return sampled_step(logits, s).tokens


def arrays(n, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, step=0):
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             seed=int(seeds[i]) if seeds is not None else i) for i in range(n)]
    return SamplingArrays.build(params, [step] * n, n)


@pytest.fixture(scope="module")
def logits():
    return jnp.asarray(np.random.default_rng(0).normal(size=(1, 50)) * 2.0, jnp.float32)


def draw_many(logits, n, **kw):
    tiled = jnp.tile(logits, (n, 1))
    return np.asarray(jax.jit(sample)(tiled, arrays(n, seeds=np.arange(n), **kw)))


def test_greedy_is_argmax():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 100)), jnp.float32)
    out = sample(x, arrays(4, temperature=0.0))
    assert np.array_equal(np.asarray(out), np.argmax(np.asarray(x), axis=-1))


def test_temperature_sampling_follows_softmax(logits):
    draws = draw_many(logits, 20000, temperature=0.7)
    probs = np.asarray(jax.nn.softmax(logits[0] / 0.7))
    freq = np.bincount(draws, minlength=50) / len(draws)
    top = np.argsort(-probs)[:5]
    # Binomial standard error at 20k draws is <= 0.0036: allow ~4 sigma.
    assert np.abs(freq[top] - probs[top]).max() < 0.015


def test_top_k_keeps_only_the_k_best(logits):
    draws = draw_many(logits, 4000, temperature=5.0, top_k=3)
    assert set(draws) == set(np.argsort(-np.asarray(logits[0]))[:3].tolist())


def test_top_p_keeps_the_smallest_nucleus(logits):
    probs = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    nucleus = set(order[: int(np.searchsorted(cumulative, 0.6)) + 1].tolist())
    draws = draw_many(logits, 4000, top_p=0.6)
    assert set(draws) == nucleus


def test_tiny_top_p_is_greedy(logits):
    assert set(draw_many(logits, 500, top_p=1e-6)) == {int(np.argmax(np.asarray(logits[0])))}


@pytest.mark.parametrize("temperature, min_p, top_k, top_p", [
    (1.0, 0.1, 0, 1.0), (0.5, 0.3, 0, 1.0), (2.0, 0.05, 0, 0.8), (1.0, 0.02, 3, 1.0), (3.0, 0.2, 0, 0.5),
])
def test_min_p_keeps_the_tokens_transformers_min_p_keeps_in_vllms_order(logits, temperature, min_p, top_k, top_p):
    """The tokens that can be drawn are those left by transformers' own warpers applied in vLLM's
    order: temperature, min_p, then top-k and top-p over what min_p left."""
    import torch
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    warpers = [TemperatureLogitsWarper(temperature), MinPLogitsWarper(min_p)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    scores = torch.tensor(np.asarray(logits))
    for warp in warpers:
        scores = warp(None, scores)
    kept = set(np.flatnonzero(np.isfinite(scores[0].numpy())).tolist())
    assert 1 < len(kept) < logits.shape[1]  # the case filters something and leaves a choice
    assert set(draw_many(logits, 4000, temperature=temperature, min_p=min_p, top_k=top_k, top_p=top_p)) == kept


def test_min_p_one_is_the_top_token_and_greedy_ignores_min_p(logits):
    top = int(np.argmax(np.asarray(logits[0])))
    assert set(draw_many(logits, 300, min_p=1.0)) == {top}
    assert set(draw_many(logits, 50, temperature=0.0, min_p=0.5)) == {top}


def test_allowed_token_ids_and_logit_bias_shape_what_can_be_drawn(logits):
    """The bias rows (bias_vector) are added before anything else: allowed_token_ids leaves only its
    ids, logit_bias -100 bans one of them, and greedy rows follow the biased argmax."""
    from splitserve.runtime.sampling import bias_vector

    allowed = [3, 17, 28, 41]
    params = SamplingParams(temperature=5.0, allowed_token_ids=allowed, logit_bias={"17": -100})
    n = 2000
    s = SamplingArrays.build([dataclasses.replace(params, seed=i) for i in range(n)], [0] * n, n,
                             bias_rows=[0] * n)
    bias = jnp.asarray(bias_vector(params, 50))[None]
    drawn = np.asarray(jax.jit(lambda x, s, b: sampled_step(x, s, bias=b).tokens)(jnp.tile(logits, (n, 1)), s, bias))
    assert set(drawn.tolist()) == {3, 28, 41}
    worst = int(np.argmin(np.asarray(logits[0])))
    greedy = [SamplingParams(logit_bias={worst: 100}), SamplingParams(), SamplingParams(logit_bias={worst: 100})]
    s = SamplingArrays.build(greedy, [0] * 3, 4, bias_rows=[1, 0, 0])  # an unbiased row's index is ignored
    bias = jnp.asarray(np.stack([bias_vector(greedy[2], 50), bias_vector(greedy[0], 50)]))
    tokens = np.asarray(sampled_step(jnp.tile(logits, (4, 1)), s, bias=bias).tokens)
    assert tokens[:3].tolist() == [worst, int(np.argmax(np.asarray(logits[0]))), worst]


def test_logit_bias_takes_json_keys_and_keeps_one_bias_per_id():
    assert SamplingParams(logit_bias={"7": 1, 3: -2.5}).logit_bias == ((3, -2.5), (7, 1.0))
    assert SamplingParams(logit_bias=[(7, 1), (7, 2)]).logit_bias == ((7, 2.0),)
    assert SamplingParams(allowed_token_ids=[4, 2]).bias_ids() == [4, 2] and not SamplingParams().biased
    numpy_ids = SamplingParams(logit_bias={np.int64(3): np.float32(1.5)}, allowed_token_ids=np.array([4, 3]))
    assert numpy_ids.logit_bias == ((3, 1.5),) and numpy_ids.allowed_token_ids == (4, 3)
    assert SamplingParams(logit_bias=None).logit_bias == ()  # OpenAI's null


def test_min_tokens_may_not_hold_back_every_allowed_id():
    from splitserve.runtime.request import check_bias_ids

    eos = (2,)
    check_bias_ids(SamplingParams(allowed_token_ids=[2, 9], min_tokens=3, stop_token_ids=[9], ignore_eos=True), 50, eos)
    check_bias_ids(SamplingParams(allowed_token_ids=[2], min_tokens=0), 50, eos)
    for params in (SamplingParams(allowed_token_ids=[2], min_tokens=1),
                   SamplingParams(allowed_token_ids=[2, 9], min_tokens=3, stop_token_ids=[9])):
        with pytest.raises(ValueError, match="with min_tokens, allowed_token_ids must name a token other than EOS"):
            check_bias_ids(params, 50, eos)


def test_a_row_that_filters_nothing_draws_the_same_whether_or_not_its_batch_filters(logits):
    """Only batches where some row uses top-k, top-p or min_p sort the vocabulary; a plain sampled
    row must draw the same token from the same seed in either kind of batch."""
    n = 200
    plain = [SamplingParams(temperature=1.0, seed=i) for i in range(n)]
    alone = SamplingArrays.build(plain, [3] * n, n + 1)
    beside = SamplingArrays.build(plain + [SamplingParams(temperature=1.0, top_p=0.3, seed=9)], [3] * (n + 1), n + 1)
    x = jnp.tile(logits, (n + 1, 1))
    a, b = (np.asarray(jax.jit(sample)(x, s)) for s in (alone, beside))
    assert np.array_equal(a[:n], b[:n]) and len(set(a[:n].tolist())) > 5


def test_same_seed_same_tokens_whatever_the_batch(logits):
    x = jnp.tile(logits, (3, 1))
    a = SamplingArrays.build([SamplingParams(temperature=1.0, seed=s) for s in (7, 8, 7)], [5, 5, 5], 4)
    out = np.asarray(sample(jnp.concatenate([x, logits]), a))
    assert out[0] == out[2]
    alone = np.asarray(sample(logits, SamplingArrays.build([SamplingParams(temperature=1.0, seed=7)], [5], 1)))
    assert out[0] == alone[0]
    # The step index changes the draw: over 32 steps a fixed seed must not repeat one token.
    steps = SamplingArrays.build([SamplingParams(temperature=1.0, seed=7)] * 32, list(range(32)), 32)
    assert len(set(np.asarray(sample(jnp.tile(logits, (32, 1)), steps)).tolist())) > 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k must be >= 0 \\(0 or -1 disables it\\), got -2"),
    (dict(seed=-1), "seed"),
    (dict(stop=("",)), "stop"),
    (dict(stop=tuple("abcdefghijklmnopq")), "stop strings"),
    (dict(stop_token_ids=range(1025)), "at most 1024 stop_token_ids"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens must be in \\[0, max_tokens=4\\], got 5"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=1, stop_token_ids=range(17)), "with min_tokens, at most 16 stop_token_ids"),
    (dict(logprobs=21), "logprobs must be in \\[0, 20\\] \\(or unset\\), got 21"),
    (dict(logprobs=-1), "logprobs must be in"),
    (dict(logit_bias={5: 101}), "logit_bias values must be in \\[-100, 100\\], got 101 for 5"),
    (dict(logit_bias={5: float("nan")}), "logit_bias values must be in"),
    (dict(logit_bias={5: "1"}), "logit_bias values must be numbers, got '1' for 5"),
    (dict(logit_bias=[1, 2]), "logit_bias must map token ids to biases"),
    (dict(logit_bias={"5_0": 1}), "logit_bias token ids must be integers, got '5_0'"),
    (dict(allowed_token_ids="42"), "allowed_token_ids must be a list of token ids, got '42'"),
    (dict(allowed_token_ids=["42"]), "allowed_token_ids token ids must be integers, got '42'"),
    (dict(logit_bias={5: True}), "logit_bias values must be numbers"),
    (dict(logit_bias={"x": 1}), "logit_bias token ids must be integers, got 'x'"),
    (dict(logit_bias={-1: 1}), "logit_bias token ids must be in \\[0, "),
    (dict(allowed_token_ids=[]), "allowed_token_ids must name at least one token id"),
    (dict(allowed_token_ids=[1.5]), "allowed_token_ids token ids must be integers"),
    (dict(prompt_logprobs=21), "prompt_logprobs must be in \\[0, 20\\] \\(or unset\\), got 21"),
    (dict(min_p=1.5), "min_p must be in \\[0, 1\\], got 1.5"),
    (dict(min_p=-0.1), "min_p must be in"),
    (dict(min_p=float("nan")), "min_p must be in"),
    (dict(presence_penalty=2.5), "presence_penalty must be in \\[-2, 2\\], got 2.5"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be in"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be in \\[0.01, 100\\] \\(1 is off\\), got 0.0"),
    (dict(repetition_penalty=1e-45), "repetition_penalty must be in"),  # 0 in float32: x / 0 is inf
    (dict(repetition_penalty=1e39), "repetition_penalty must be in"),  # inf in float32: 0 * inf is NaN
    (dict(temperature=10**400), "temperature must be a finite number"),  # no OverflowError
    (dict(temperature=1e300), "at most 3.40282347e\\+38: it travels as a 32-bit float\\), got 1e\\+300"),  # not "got inf"
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens must be -1 \\(the model's context\\) or in \\[1, "),
    (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens must be"),
])
def test_invalid_params_are_rejected_with_the_field_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_truncate_prompt_tokens_keeps_the_last_k_tokens_as_vllm():
    prompt = list(range(10, 20))
    assert SamplingParams().truncated(prompt, 8) == prompt
    assert SamplingParams(truncate_prompt_tokens=3).truncated(prompt, 8) == [17, 18, 19]
    assert SamplingParams(truncate_prompt_tokens=30).truncated(prompt, 8) == prompt
    assert SamplingParams(truncate_prompt_tokens=-1).truncated(prompt, 8) == prompt[-8:]  # the model's context


def test_top_k_minus_one_means_off_as_in_vllm():
    assert SamplingParams(top_k=-1) == SamplingParams(top_k=0)  # it was an error


def test_unset_seed_is_fixed_once():
    p = SamplingParams(temperature=1.0).with_seed()
    assert p.seed is not None and p.with_seed() is p


def test_min_tokens_holds_back_eos_and_stop_ids_until_reached():
    """Rows before min_tokens never produce EOS or a stop id, greedy or sampled, even when it is
    by far the likeliest token; from min_tokens on, the logits are untouched."""
    vocab, eos, stop_id = 30, (4, 7), 11
    logits = np.random.default_rng(5).normal(size=(vocab,)).astype(np.float32)
    logits[[4, 7, 11]] = [9.0, 8.0, 10.0]  # the three likeliest, far ahead of the rest
    params = [SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=(stop_id,), temperature=t, seed=i)
              for i, t in enumerate([0.0, 0.0, 0.0, 1.0])]
    ignoring = SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=(stop_id,), ignore_eos=True)
    steps = [0, 2, 3, 1]
    batch = 6  # two padded rows
    s = SamplingArrays.build(params + [ignoring], steps + [0], batch, eos)
    out = np.asarray(jax.jit(sample)(jnp.tile(jnp.asarray(logits), (batch, 1)), s))
    masked = logits.copy()
    masked[[4, 7, 11]] = -np.inf
    assert out[0] == out[1] == int(np.argmax(masked))  # steps 0 and 2: held back
    assert out[2] == stop_id  # step 3 = min_tokens: free again
    assert out[4] == 4  # ignore_eos: the stop id is held back, EOS is not (it would not end the request)
    draws = np.asarray(jax.jit(sample)(jnp.tile(jnp.asarray(logits), (4000, 1)), SamplingArrays.build(
        [dataclasses.replace(params[3], seed=i) for i in range(4000)], [1] * 4000, 4000, eos)))
    assert not set(draws.tolist()) & {4, 7, 11} and len(set(draws.tolist())) > 5


def test_held_back_ids_outside_the_vocabulary_are_ignored():
    logits = jnp.asarray(np.random.default_rng(6).normal(size=(2, 20)), jnp.float32)
    s = SamplingArrays.build([SamplingParams(min_tokens=2, stop_token_ids=(19, 20, 2**31 - 1))] * 2, [0, 5], 2)
    out = np.asarray(sample(logits, s))
    masked = np.asarray(logits).copy()
    masked[0, 19] = -np.inf
    assert out.tolist() == np.argmax(masked, axis=-1).tolist()


def test_logprobs_are_the_log_softmax_of_the_raw_logits_for_rows_that_ask():
    """The sampled token's logprob and the N most likely, most likely first, from the logits as the
    model gave them (before temperature, top-k and min_tokens); rows that do not ask get None."""
    logits = np.random.default_rng(8).normal(size=(5, 64)).astype(np.float32) * 3
    params = [SamplingParams(logprobs=3), SamplingParams(),
              SamplingParams(logprobs=0, temperature=0.7, top_k=2, seed=1),
              SamplingParams(logprobs=20, min_tokens=2, stop_token_ids=(int(np.argmax(logits[3])),))]
    sampled = jax.jit(sampled_step)(jnp.asarray(logits), SamplingArrays.build(params, [0] * 4, 5))
    tokens, logprobs = sampled.to_host(params)
    x = logits.astype(np.float64)
    want = x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    assert logprobs[1] is None and len(logprobs) == 4
    for row, p in enumerate(params):
        if p.logprobs is None:
            continue
        got = logprobs[row]
        assert got.logprob == pytest.approx(want[row, tokens[row]], abs=1e-5)
        order = np.argsort(-want[row])[: p.logprobs]
        assert [t for t, _ in got.top] == order.tolist()
        assert np.allclose([lp for _, lp in got.top], want[row, order], atol=1e-5)
    assert tokens[3] != int(np.argmax(logits[3]))  # held back by min_tokens, yet its logprob is the raw one
    assert logprobs[3].top[0][0] == int(np.argmax(logits[3]))


def test_no_logprobs_are_read_back_when_no_row_asks():
    sampled = sampled_step(jnp.ones((2, 30)), SamplingArrays.build([SamplingParams()] * 2, [0, 0], 2))
    assert sampled.to_host([SamplingParams()] * 2)[1] == [None, None]
    assert not np.asarray(sampled.top_logprobs).any()  # the branch that computes them did not run


def test_penalty_rows_go_to_penalised_requests_and_come_back_when_they_leave():
    from splitserve.runtime.penalty_rows import PenaltyRows

    rows = PenaltyRows(capacity=2)
    pen, plain, rep = SamplingParams(presence_penalty=0.5), SamplingParams(), SamplingParams(repetition_penalty=1.2)
    assert rows.rows_for(["a", "b"], [plain, plain], [1, 1]) == (None, [])
    # (rows, positions in the step of the requests whose rows are fresh)
    assert rows.rows_for(["a", "b"], [pen, plain], [1, 2]) == ([0, 2], [0])  # 2 = capacity: no row
    assert rows.rows_for(["a", "c"], [pen, rep], [2, 1]) == ([0, 1], [1])  # "a" keeps its row
    assert rows.rows_for(["c", "d"], [rep, pen], [2, 1]) == ([1, 0], [1])  # "a" left: its row is "d"'s, fresh
    # "d" again at step 1 without a step in between: a new request under a reused id, fresh again
    assert rows.rows_for(["c", "d"], [rep, pen], [3, 1]) == ([1, 0], [1])
    with pytest.raises(ValueError, match="more than 2 requests with penalties"):
        rows.rows_for(["c", "d", "e"], [pen, pen, pen], [4, 2, 1])
    with pytest.raises(ValueError, match="need the request ids"):
        rows.rows_for(None, [pen], [1])


def test_penalties_subtract_from_the_logits_of_generated_tokens():
    vocab = 40
    logits = np.random.default_rng(9).normal(size=(3, vocab)).astype(np.float32)
    counts = np.zeros((4, vocab), np.int32)
    counts[2, [3, 5]] = [2, 1]  # row 0's request: token 3 twice, token 5 once
    counts[0, 7] = 4  # a row nobody in this step uses
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=0.4), SamplingParams(),
              SamplingParams(frequency_penalty=-2.0)]
    s = SamplingArrays.build(params, [3, 3, 3], 3, penalty_rows=[2, 4, 0])
    got = sampled_step(jnp.asarray(logits), s, jnp.asarray(counts))
    want = logits.copy()
    want[0, [3, 5]] -= [0.7 + 0.4 * 2, 0.7 + 0.4 * 1]
    want[2, 7] += 2.0 * 4
    assert np.asarray(got.tokens).tolist() == np.argmax(want, axis=-1).tolist()
    # No penalty in the step: the logits are untouched whatever the counts say.
    untouched = sampled_step(jnp.asarray(logits), SamplingArrays.build([SamplingParams()] * 3, [3] * 3, 3,
                                                                      penalty_rows=[2, 4, 0]), jnp.asarray(counts))
    assert np.asarray(untouched.tokens).tolist() == np.argmax(logits, axis=-1).tolist()


def numpy_penalised(logits, generated, in_prompt, presence, frequency, repetition):
    """vLLM's order: transformers' repetition penalty over prompt and generated ids, then OpenAI's."""
    seen = (generated > 0) | in_prompt
    out = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition), logits)
    return out - frequency * generated - presence * (generated > 0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_ids():
    """Decode: the counts rows hold generated counts plus IN_PROMPT flags; each row's adjusted
    logits (read through greedy argmax on 64 rows and directly) follow the formula."""
    from splitserve.runtime.sampling import IN_PROMPT, _penalised

    rng = np.random.default_rng(10)
    batch, vocab = 64, 50
    logits = rng.normal(scale=3.0, size=(batch, vocab)).astype(np.float32)
    generated = rng.integers(0, 3, size=(batch, vocab)) * (rng.random((batch, vocab)) < 0.2)
    in_prompt = rng.random((batch, vocab)) < 0.3
    counts = (generated + IN_PROMPT * in_prompt).astype(np.int32)
    rep = rng.choice([1.0, 0.5, 1.3, 3.0], size=batch)
    pres, freq = rng.choice([0.0, 0.8], size=batch), rng.choice([0.0, -0.5, 1.1], size=batch)
    params = [SamplingParams(repetition_penalty=r, presence_penalty=p, frequency_penalty=f)
              for r, p, f in zip(rep, pres, freq)]
    rows = rng.permutation(batch)  # request i uses counts row rows[i]
    s = SamplingArrays.build(params, [2] * batch, batch, penalty_rows=rows.tolist())
    want = numpy_penalised(logits, generated[rows], in_prompt[rows], pres[:, None], freq[:, None], rep[:, None])
    direct = _penalised(jnp.asarray(logits), jnp.asarray(counts)[rows], s)
    np.testing.assert_allclose(np.asarray(direct), want, rtol=1e-6, atol=1e-6)
    got = sampled_step(jnp.asarray(logits), s, jnp.asarray(counts))
    assert np.asarray(got.tokens).tolist() == np.argmax(want, axis=-1).tolist()
    assert (np.argmax(want, axis=-1) != np.argmax(logits, axis=-1)).sum() > 10  # the penalties change choices


def test_prefill_repetition_penalty_covers_the_prompt_and_not_its_padding():
    """Prefill: the flags come from the padded prompts, the first `length` ids of each row only."""
    vocab = 30
    logits = np.full((3, vocab), -1.0, np.float32)
    logits[:, 4] = 5.0  # in row 0's prompt: 5 / 4 = 1.25 loses to id 6's 2.0
    logits[:, 6] = 2.0
    logits[:, 9] = 1.9  # id 9 is row 1's padding: it must not be penalised
    tokens = np.array([[4, 6, 0, 0], [3, 4, 9, 9], [4, 1, 2, 3]], np.int32)
    lengths = np.array([1, 2, 4], np.int32)
    params = [SamplingParams(repetition_penalty=4.0), SamplingParams(repetition_penalty=4.0), SamplingParams()]
    got = sampled_step(jnp.asarray(logits), SamplingArrays.build(params, [0] * 3, 3),
                       prompt=(jnp.asarray(tokens), jnp.asarray(lengths)))
    # row 0: 4 is in its prompt (5 -> 1.25), 6 only in its padding (stays 2.0); row 1: 4 penalised, 6
    # best; row 2: no penalty
    assert np.asarray(got.tokens).tolist() == [6, 6, 4]
    logits[1, 6] = -0.5  # row 1's best is now 9, in its padding only (penalised, 0.475 would lose to 4's 1.25)
    got = sampled_step(jnp.asarray(logits), SamplingArrays.build(params, [0] * 3, 3),
                       prompt=(jnp.asarray(tokens), jnp.asarray(lengths)))
    assert np.asarray(got.tokens).tolist() == [6, 9, 4]
