"""Our decoder against transformers (torch, CPU, float32) on checkpoints transformers saved."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch

from hf_checkpoints import CONFIGS, hf_greedy
from splitserve.models import serving
from splitserve.models.kv_cache import KVCacheSpec, allocate_cache, insert_prefill
from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.colocated_engine import ColocatedEngine, EngineConfig
from splitserve.runtime.sampling_params import SamplingParams

ALL = sorted(CONFIGS)
PROMPT_LENGTHS = (5, 17, 63, 130, 300)  # none a multiple of the page size (16)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def random_prompt(rng, vocab, n):
    return rng.integers(3, vocab, size=n).tolist()


@pytest.mark.parametrize("name", ALL)
def test_prefill_logits_match_transformers(hf_checkpoint, name):
    directory, torch_model = hf_checkpoint(name)
    model = load_model(str(directory), make_mesh(MeshConfig(1)))
    rng = np.random.default_rng(0)
    lengths = [7, 33, 100, 300]  # 384 positions: the CPU's prefill attention runs 3 blocks of 128 queries
    tokens = np.zeros((4, 384), np.int32)
    prompts = [random_prompt(rng, model.config.vocab_size, n) for n in lengths]
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    logits, ks, _ = jax.jit(lambda p, t, l: serving.prefill(model.graphdef, p, t, l))(
        model.params, tokens, np.array(lengths, np.int32))
    assert len(ks) == model.config.num_layers
    for row, p in enumerate(prompts):
        with torch.no_grad():
            ref = torch_model(torch.tensor([p])).logits[0, -1].numpy()
        assert rel_err(logits[row], ref) < 1e-4, (name, len(p))


@pytest.mark.parametrize("name", ALL)
def test_decode_logits_match_transformers_for_32_steps(hf_checkpoint, name):
    """Prefill a prompt into shuffled pages, then 32 teacher-forced decode steps."""
    directory, torch_model = hf_checkpoint(name)
    model = load_model(str(directory), make_mesh(MeshConfig(1)))
    cfg = model.config
    rng = np.random.default_rng(1)
    prompt_len, steps, page_size = 21, 32, 8
    sequence = random_prompt(rng, cfg.vocab_size, prompt_len + steps)
    with torch.no_grad():
        ref_logits = torch_model(torch.tensor([sequence])).logits[0].numpy()

    spec = KVCacheSpec(cfg.num_layers, model.layout.num_kv_heads, 32, page_size, cfg.head_dim)
    cache = allocate_cache(spec)
    pages = (rng.permutation(31) + 1)[: -(-(prompt_len + steps) // page_size)]  # shuffled, never the sink
    table = np.zeros((2, 8), np.int32)  # row 1 is an inactive padded row
    table[0, : len(pages)] = pages
    logits, ks, vs = serving.prefill(model.graphdef, model.params,
                                     np.array([sequence[:prompt_len]], np.int32), np.array([prompt_len], np.int32))
    assert rel_err(logits[0], ref_logits[prompt_len - 1]) < 1e-4
    cache = insert_prefill(cache, ks, vs, table[:1], np.array([prompt_len], np.int32))
    step = jax.jit(lambda p, c, t, pos, tab, act: serving.decode_step(model.graphdef, p, c, t, pos, tab, act),
                   donate_argnums=1)
    for i in range(steps - 1):
        pos = prompt_len + i
        logits, cache = step(model.params, cache, np.array([sequence[pos], 0], np.int32),
                             np.array([pos, 0], np.int32), table, np.array([True, False]))
        assert rel_err(logits[0], ref_logits[pos]) < 1e-4, (name, i)


@pytest.mark.parametrize("name", ALL)
def test_greedy_tokens_match_transformers_generate(hf_checkpoint, name):
    directory, torch_model = hf_checkpoint(name)
    model = load_model(str(directory), make_mesh(MeshConfig(1)))
    rng = np.random.default_rng(2)
    prompts = [random_prompt(rng, model.config.vocab_size, n) for n in PROMPT_LENGTHS]
    engine = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=160, max_batch=8))
    outs = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(torch_model, prompt, 24), (name, len(prompt))
        assert out.finish_reason == "length"
    assert engine.allocator.free_count == engine.allocator.capacity


@pytest.mark.parametrize("name", ["llama3_gqa3_hd40_ropescale", "qwen2_bias_mqa_tied", "mistral_gqa4_linear_rope"])
def test_same_tokens_on_tp_2_and_4(hf_checkpoint, name):
    """tp=4 replicates/pads heads for 3 and 1 KV heads; every mesh must give transformers' tokens
    (tp=1 does in test_greedy_tokens_match_transformers_generate)."""
    directory, torch_model = hf_checkpoint(name)
    rng = np.random.default_rng(3)
    prompts = [random_prompt(rng, CONFIGS[name]["vocab_size"], n) for n in (9, 70)]
    expected = [hf_greedy(torch_model, p, 12) for p in prompts]
    for tp in (2, 4):
        model = load_model(str(directory), make_mesh(MeshConfig(tp)))
        # The weights really are sharded over the mesh.
        assert len(model.params["layers"][0]["attn"]["q_proj"][...].sharding.device_set) == tp
        engine = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=32, max_batch=4))
        outs = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
        assert [o.token_ids for o in outs] == expected, f"tp={tp}"


def test_min_tokens_matches_transformers_min_new_tokens(hf_checkpoint, tmp_path):
    """min_tokens masks EOS (and stop ids) as transformers' min_new_tokens masks EOS. EOS is set to a
    token greedy decoding reaches early, so without min_tokens both sides stop there."""
    name = "llama3_gqa3_hd40_ropescale"
    directory, torch_model = hf_checkpoint(name)
    prompt = random_prompt(np.random.default_rng(4), CONFIGS[name]["vocab_size"], 11)
    free_run = hf_greedy(torch_model, prompt, 16)
    at = next(i for i, t in enumerate(free_run) if i >= 2 and t not in free_run[:i])
    eos = free_run[at]
    copy = tmp_path / "eos_moved"
    shutil.copytree(directory, copy)
    for file in ("config.json", "generation_config.json"):
        if (copy / file).exists():
            config = json.loads((copy / file).read_text())
            config["eos_token_id"] = eos
            (copy / file).write_text(json.dumps(config))

    def hf_run(min_new_tokens):
        with torch.no_grad():
            out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=min_new_tokens,
                                       do_sample=False, eos_token_id=eos, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    model = load_model(str(copy), make_mesh(MeshConfig(1)))
    assert model.config.eos_token_ids == (eos,)
    engine = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=32, max_batch=4))
    params = [SamplingParams(max_tokens=16), SamplingParams(max_tokens=16, min_tokens=at + 3),
              SamplingParams(max_tokens=16, min_tokens=16),
              # ignore_eos + the same id as a stop token: held back the same way
              SamplingParams(max_tokens=16, min_tokens=at + 3, stop_token_ids=(eos,), ignore_eos=True)]
    outs = engine.generate([prompt] * len(params), params)
    assert outs[0].token_ids == hf_run(0) == free_run[: at + 1] and outs[0].finish_reason == "stop"
    expected = hf_run(at + 3)
    assert len(expected) > at + 3 and eos not in expected[: at + 3]
    assert outs[1].token_ids == expected and outs[3].token_ids == expected
    assert outs[2].token_ids == hf_run(16) and len(outs[2].token_ids) == 16 and outs[2].finish_reason == "length"


@pytest.mark.parametrize("name", ["llama3_gqa3_hd40_ropescale", "qwen2_bias_mqa_tied"])
def test_logprobs_match_transformers_log_softmax(hf_checkpoint, name):
    """Each generated token's logprob and the 5 most likely tokens equal the log-softmax of
    transformers' logits at that position, for the prefill's token and the decode steps'."""
    directory, torch_model = hf_checkpoint(name)
    model = load_model(str(directory), make_mesh(MeshConfig(1)))
    rng = np.random.default_rng(5)
    prompts = [random_prompt(rng, model.config.vocab_size, n) for n in (6, 40)]
    engine = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=32, max_batch=4))
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True, logprobs=5))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(torch_model, prompt, 10) and len(out.logprobs) == 10
        with torch.no_grad():
            logits = torch_model(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1:]
        want = torch.log_softmax(logits.double(), dim=-1).numpy()
        for step, (token, got) in enumerate(zip(out.token_ids, out.logprobs)):
            assert abs(got.logprob - want[step, token]) < 1e-4, (name, step)
            top = np.argsort(-want[step])[:5]
            assert [t for t, _ in got.top] == top.tolist(), (name, step)
            assert np.allclose([lp for _, lp in got.top], want[step, top], atol=1e-4)
    plain = engine.generate(prompts[:1], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert plain.logprobs is None and "logprobs" not in plain.to_json_dict()


def penalised_greedy(torch_model, prompt, n, presence, frequency, repetition=1.0):
    """Greedy decoding on transformers' logits with the penalties applied by hand, in vLLM's order:
    transformers' repetition penalty over prompt and generated ids (positive logits divided by it,
    negative ones multiplied), then each logit minus frequency x (times generated) minus presence x
    (generated at all)."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = torch_model(torch.tensor([prompt + out])).logits[0, -1].double().numpy()
        counts = np.bincount(out, minlength=len(logits)) if out else np.zeros(len(logits))
        seen = np.isin(np.arange(len(logits)), prompt + out)
        logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition), logits)
        out.append(int(np.argmax(logits - frequency * counts - presence * (counts > 0))))
    return out


def test_presence_and_frequency_penalties_match_a_reference_on_transformers_logits(hf_checkpoint):
    """More requests than the batch holds, so penalty rows are handed on to later requests (and
    must start from zero); penalised and plain requests share steps."""
    name = "llama3_gqa3_hd40_ropescale"
    directory, torch_model = hf_checkpoint(name)
    model = load_model(str(directory), make_mesh(MeshConfig(1)))
    rng = np.random.default_rng(6)
    prompts = [random_prompt(rng, model.config.vocab_size, n) for n in (4, 9, 14, 20, 7)]
    penalties = [(0.0, 2.0), (2.0, 0.0), (0.0, 0.0), (1.5, 1.5), (-1.0, 0.5)]  # (presence, frequency)
    engine = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=32, max_batch=2))
    params = [SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=p, frequency_penalty=f)
              for p, f in penalties]
    outs = engine.generate(prompts, params)
    for prompt, (p, f), out in zip(prompts, penalties, outs):
        assert out.token_ids == penalised_greedy(torch_model, prompt, 12, p, f), (p, f)
    plain = hf_greedy(torch_model, prompts[0], 12)
    assert outs[0].token_ids != plain and len(set(outs[0].token_ids)) > len(set(plain))  # the penalty bites


def test_repetition_penalty_matches_transformers_generate(hf_checkpoint):
    """repetition_penalty alone against transformers' own generate(repetition_penalty=...) (its
    RepetitionPenaltyLogitsProcessor); with presence/frequency penalties too, against the same
    applied by hand. Each prompt is one where the penalty changes transformers' greedy tokens.
    Five requests through a batch of two: counts rows are handed on, and a row that held one
    request's prompt flags must not leak them into the next."""
    name = "llama3_gqa3_hd40_ropescale"
    directory, torch_model = hf_checkpoint(name)
    torch_model.generation_config.eos_token_id = None
    model = load_model(str(directory), make_mesh(MeshConfig(1)))
    rng = np.random.default_rng(7)

    def hf_penalised(prompt, rep, pres, freq):
        if pres or freq:
            return penalised_greedy(torch_model, prompt, 12, pres, freq, rep)
        with torch.no_grad():
            out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                                       repetition_penalty=rep)
        return out[0, len(prompt):].tolist()

    # (rep, pres, freq, whether the prefill's token must change too: the prompt alone is penalised there)
    settings = [(1.5, 0.0, 0.0, False), (1.0, 0.0, 0.0, False), (0.6, 0.0, 0.0, True), (1.3, 0.5, 0.5, False),
                (2.0, 0.0, 0.0, True)]
    prompts, expected = [], []
    for rep, pres, freq, first_changes in settings:
        for _ in range(60):  # a prompt on which the penalty bites (the plain one: any)
            prompt = random_prompt(rng, model.config.vocab_size, int(rng.integers(5, 40)))
            want, plain = hf_penalised(prompt, rep, pres, freq), hf_greedy(torch_model, prompt, 12)
            if (want != plain) == (rep != 1.0) and (want[0] != plain[0] or not first_changes):
                break
        else:
            pytest.fail(f"no prompt found on which repetition_penalty={rep} changes greedy decoding")
        prompts.append(prompt)
        expected.append(want)
    engine = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=40, max_batch=2))
    params = [SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=r, presence_penalty=p,
                             frequency_penalty=f) for r, p, f, _ in settings]
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    # One row for all: a presence-only request after a repetition-penalised one starts from zeroed counts.
    one_row = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=40, max_batch=1))
    presence = SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=2.0)
    after = one_row.generate([prompts[4], prompts[4]], [params[4], presence])
    assert after[0].token_ids == expected[4]
    assert after[1].token_ids == penalised_greedy(torch_model, prompts[4], 12, 2.0, 0.0)


def test_logit_bias_and_allowed_token_ids_match_transformers_generate(hf_checkpoint):
    """logit_bias against transformers' generate(sequence_bias={(id,): bias}) and allowed_token_ids
    against its prefix_allowed_tokens_fn, greedy (the bias applies to greedy requests too, as vLLM's),
    the prefill's token included. Four requests through a batch of two hand bias rows on; then, on
    one row, a presence-penalised request after a biased one must not inherit its token counts."""
    name = "llama3_gqa3_hd40_ropescale"
    directory, torch_model = hf_checkpoint(name)
    torch_model.generation_config.eos_token_id = None
    model = load_model(str(directory), make_mesh(MeshConfig(1)))
    vocab = model.config.vocab_size
    rng = np.random.default_rng(11)

    def hf_biased(prompt, bias, allowed):
        kw = {}
        if bias:
            kw["sequence_bias"] = {(t,): b for t, b in bias.items()}
        if allowed is not None:
            kw["prefix_allowed_tokens_fn"] = lambda batch_id, ids: allowed
        with torch.no_grad():
            out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0, **kw)
        return out[0, len(prompt):].tolist()

    prompts = [random_prompt(rng, vocab, n) for n in (9, 30, 17, 5)]
    plain = [hf_greedy(torch_model, p, 12) for p in prompts]
    allowed = sorted(rng.choice(np.arange(3, vocab), size=6, replace=False).tolist())
    settings = [  # (logit_bias, allowed_token_ids): each changes the first token
        ({plain[0][0]: -100.0, plain[0][1]: -100.0, int(rng.integers(3, vocab)): 2.5}, None),
        ({}, allowed),
        ({plain[2][0]: -100.0, allowed[0]: 1.5}, allowed[1:]),
        ({}, None),
    ]
    expected = [hf_biased(p, b, a) for p, (b, a) in zip(prompts, settings)]
    assert all(e[0] != p[0] for e, p in zip(expected[:3], plain))
    assert expected[3] == plain[3]
    assert set(expected[1]) <= set(allowed) and set(expected[2]) <= set(allowed[1:])

    engine = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=40, max_batch=2))
    params = [SamplingParams(max_tokens=12, ignore_eos=True, logit_bias=b, allowed_token_ids=a) for b, a in settings]
    assert [o.token_ids for o in engine.generate(prompts, params)] == expected
    one_row = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=40, max_batch=1))
    presence = SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=2.0)
    after = one_row.generate([prompts[0], prompts[0]], [params[0], presence])
    assert after[0].token_ids == expected[0]
    assert after[1].token_ids == penalised_greedy(torch_model, prompts[0], 12, 2.0, 0.0)


@pytest.mark.parametrize("name", ["llama3_gqa3_hd40_ropescale", "qwen2_bias_mqa_tied"])
def test_prompt_logprobs_match_transformers_log_softmax(hf_checkpoint, name):
    """vLLM's prompt_logprobs: prompt token t + 1's logprob, rank and the 4 most likely tokens at
    position t equal the log-softmax of transformers' logits there; prompts of different lengths
    (one longer than 8 positions, the chunk the logits are made in) in one prefill beside a
    request that does not ask."""
    directory, torch_model = hf_checkpoint(name)
    model = load_model(str(directory), make_mesh(MeshConfig(1)))
    rng = np.random.default_rng(6)
    prompts = [random_prompt(rng, model.config.vocab_size, n) for n in (7, 29, 12)]
    engine = ColocatedEngine(model, EngineConfig(page_size=16, num_pages=32, max_batch=4, max_prefill_batch=4))
    params = [SamplingParams(max_tokens=2, prompt_logprobs=4), SamplingParams(max_tokens=2, prompt_logprobs=0),
              SamplingParams(max_tokens=2)]
    outs = engine.generate(prompts, params)
    for prompt, out, p in zip(prompts[:2], outs, params):
        with torch.no_grad():
            logits = torch_model(torch.tensor([prompt])).logits[0]
        want = torch.log_softmax(logits.double(), dim=-1).numpy()
        assert len(out.prompt_logprobs) == len(prompt) - 1
        for t, got in enumerate(out.prompt_logprobs):
            assert abs(got.logprob - want[t, prompt[t + 1]]) < 1e-4, (name, t)
            top = np.argsort(-want[t])[: p.prompt_logprobs]
            assert [i for i, _ in got.top] == top.tolist(), (name, t)
            assert np.allclose([lp for _, lp in got.top], want[t, top], atol=1e-4)
            token_lp = want[t, prompt[t + 1]]
            ranks = (np.sum(want[t] > token_lp + 1e-4) + 1, np.sum(want[t] >= token_lp - 1e-4))
            assert ranks[0] <= got.rank <= ranks[1], (name, t)  # a tie within float32's error may go either way
    assert outs[2].prompt_logprobs is None and "prompt_logprobs" not in outs[2].to_json_dict()
    assert len(outs[0].to_json_dict()["prompt_logprobs"]) == 6
