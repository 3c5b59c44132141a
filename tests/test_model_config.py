"""Reading config.json: which checkpoints are served, and with which weights."""

import pytest

from splitserve.models.config import config_from_hf

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)


@pytest.mark.parametrize("architecture, model_type", [
    ("LlamaForSequenceClassification", "llama"),  # same model_type, but a classifier head, no lm_head
    ("Qwen2ForRewardModel", "qwen2"),
])
def test_a_named_architecture_that_is_not_a_causal_lm_is_refused(architecture, model_type):
    with pytest.raises(ValueError, match=f"unsupported model: architectures=\\['{architecture}'\\]"):
        config_from_hf(dict(BASE, architectures=[architecture], model_type=model_type))


def test_model_type_alone_still_names_the_family():
    assert config_from_hf(dict(BASE, model_type="qwen3")).family == "qwen3"
    assert config_from_hf(dict(BASE, architectures=["MistralForCausalLM"], model_type="mistral")).family == "mistral"


@pytest.mark.parametrize("model_type, qkv_bias, o_bias", [
    ("llama", True, True), ("qwen3", True, True), ("qwen2", True, False), ("mistral", False, False),
])
def test_attention_bias_maps_to_the_biases_transformers_builds(model_type, qkv_bias, o_bias):
    config = config_from_hf(dict(BASE, model_type=model_type, attention_bias=True))
    assert (config.qkv_bias, config.o_bias) == (qkv_bias, o_bias)


@pytest.mark.parametrize("key", ["tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"])
def test_a_true_false_field_that_is_not_a_boolean_is_refused_not_read_as_true(key):
    assert config_from_hf(dict(BASE, model_type="llama", **{key: None})) == config_from_hf(dict(BASE, model_type="llama"))
    with pytest.raises(ValueError, match=f"config.json: {key} must be true or false, got 'false'"):
        config_from_hf(dict(BASE, model_type="llama", **{key: "false"}))
