"""runtime/prompt_logprobs.py on its own: positions made 8 at a time, padded when the prompt's
padded length is not a multiple of 8 (the model's context need not be), equal the log-softmax
of the whole prompt's logits made at once; a one-token prompt has no entries."""

import jax
import numpy as np
from flax import nnx

from splitserve.models.loader import load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.client_types import Chunk, CompletionBuilder
from splitserve.runtime.model_runner import ModelRunner, RunnerConfig
from splitserve.runtime.prompt_logprobs import prompt_logprobs
from splitserve.runtime.sampling_params import SamplingParams


def prompt_logprobs_of_one_token():
    import jax.numpy as jnp

    from splitserve.runtime.prompt_logprobs import PromptLogprobs

    empty = PromptLogprobs(jnp.zeros((1, 16)), jnp.zeros((1, 16, 2), jnp.int32), jnp.zeros((1, 16, 2)),
                           jnp.ones((1, 16), jnp.int32))
    return empty.to_host([SamplingParams(prompt_logprobs=2)], [1])[0]


def test_positions_made_in_pieces_equal_the_whole_prompts_log_softmax():
    model = load_model("demo", make_mesh(MeshConfig(1)))
    runner = ModelRunner(model, RunnerConfig(page_size=16, num_pages=8, max_batch=2, max_prefill_batch=2))
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, 2000, size=(2, 13)).astype(np.int32)  # 13: not a multiple of 8
    lengths = np.array([13, 9], np.int32)
    x = runner.embed(model.params, tokens)
    for layer_params in runner.layer_params:
        x, _, _ = runner._layer(layer_params, x, lengths)
    got = jax.jit(lambda p, x, t: prompt_logprobs(model.graphdef, p, x, t))(model.params, x, tokens)
    params = [SamplingParams(prompt_logprobs=5), SamplingParams(prompt_logprobs=1)]
    entries = got.to_host(params, lengths.tolist())
    whole = nnx.merge(model.graphdef, model.params)
    for row in range(2):
        want = np.asarray(jax.nn.log_softmax(whole.logits(whole.final_norm(x[row])), axis=-1))  # [13, vocab]
        assert len(entries[row]) == lengths[row] - 1
        for t, entry in enumerate(entries[row]):
            assert abs(entry.logprob - want[t, tokens[row, t + 1]]) < 1e-5
            top = np.argsort(-want[t])[: params[row].prompt_logprobs]
            assert [i for i, _ in entry.top] == top.tolist()
            assert entry.rank == np.sum(want[t] >= want[t, tokens[row, t + 1]])  # vLLM's count, ties included


def test_a_one_token_prompt_gets_an_empty_list_from_the_sdk_as_in_process():
    """In process, to_host gives a one-token prompt []; through the router its message has no
    entries, which the SDK's builder turns into [] too when the request asked."""
    assert prompt_logprobs_of_one_token() == []
    builder = CompletionBuilder(0.0, prompt_logprobs_asked=True)
    builder.add(Chunk([7], "x", "length", [5]), 1.0)  # the message had no entries: a one-token prompt
    assert builder.build(2.0).prompt_logprobs == []
    plain = CompletionBuilder(0.0)
    plain.add(Chunk([7], "x", "length", [5]), 1.0)
    assert plain.build(2.0).prompt_logprobs is None and "prompt_logprobs" not in plain.build(2.0).to_json_dict()
