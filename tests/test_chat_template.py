"""Chat templates against transformers' apply_chat_template, on tokenizers transformers saved itself.

Each template is written in the style of a family on the Hub (ChatML as Qwen uses it, the
[INST] format of Llama 2 / Mistral with its role check, one with a namespace, tojson,
loop controls and generation blocks). The prompt text and the token ids must be the ones
transformers produces from the same directory.
"""

from __future__ import annotations

import json

import pytest

from splitserve.models.chat_template import ChatTemplate, ChatTemplateError
from splitserve.models.demo import ensure_demo_model
from splitserve.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

INST = (
    "{{ bos_token }}{% for message in messages %}\n"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\n"
    "    {% if message['role'] == 'user' %}\n"
    "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}\n"
    "    {% else %}\n"
    "{{ ' ' + message['content'] | trim + eos_token }}\n"
    "    {% endif %}\n"
    "{% endfor %}\n")

NAMESPACED = (
    "{%- set ns = namespace(system='') -%}\n"
    "{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- endif -%}"
    "{%- endfor -%}\n"
    "{{ bos_token }}{% if ns.system %}<<SYS>>{{ ns.system | tojson }}<</SYS>>\n{% endif %}\n"
    "{% for m in messages if m.role != 'system' %}\n"
    "  {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}"
    "{% else %}<|{{ m.role }}|>{{ m.content }}{% endif %}\n"
    "  {% if loop.index >= 4 %}{% break %}{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief & <polite>, «s'il vous plaît»."},
     {"role": "user", "content": "  What is a page table?  "},
     {"role": "assistant", "content": "A map from positions to pages."},
     {"role": "user", "content": "And a KV cache?\nTwo lines."}],
    [{"role": "user", "content": f"turn {i}"} if i % 2 == 0 else {"role": "assistant", "content": f"reply {i}"}
     for i in range(7)],
]


def _saved_tokenizer(tmp_path, template: str):
    """A fast tokenizer (the demo model's BPE) with `template`, saved by transformers."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ensure_demo_model() / "tokenizer.json"),
                                               bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    tok.save_pretrained(tmp_path)
    return transformers.AutoTokenizer.from_pretrained(tmp_path)


def _their_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("template", [CHATML, INST, NAMESPACED], ids=["chatml", "inst", "namespaced"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_rendered_text_and_token_ids_match_transformers(tmp_path, template, conversation):
    messages = CONVERSATIONS[conversation]
    if template is INST and messages[0]["role"] == "system":
        messages = messages[1:]  # this format has no system turn
    tok = _saved_tokenizer(tmp_path, template)
    ours = ChatTemplate.maybe_load(tmp_path)
    text = ours.render(messages)
    assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.render(messages, add_generation_prompt=False) == tok.apply_chat_template(
        messages, add_generation_prompt=False, tokenize=False)
    # The template wrote the special tokens itself: they are not added a second time.
    ids = Tokenizer.from_file(tmp_path / "tokenizer.json").encode(text, add_special_tokens=False)
    assert ids == _their_ids(tok, messages)


def test_a_template_inside_tokenizer_config_json_as_older_checkpoints_keep_it(tmp_path):
    tok = _saved_tokenizer(tmp_path, INST)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": INST}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS[0]
    assert ChatTemplate.maybe_load(tmp_path).render(messages) == tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    config["chat_template"] = CHATML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.maybe_load(tmp_path).render(messages).startswith("<|im_start|>system\n")


def test_the_templates_own_refusal_and_malformed_messages_are_clear_errors(tmp_path):
    tok = _saved_tokenizer(tmp_path, INST)
    ours = ChatTemplate.maybe_load(tmp_path)
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        tok.apply_chat_template(twice, tokenize=False)
    with pytest.raises(ChatTemplateError, match="refused the messages: Conversation roles must alternate"):
        ours.render(twice)
    for bad, message in [([], "non-empty list"), ("hi", "non-empty list"),
                         ([{"content": "x"}], r"messages\[0\] must be an object with a non-empty string role"),
                         ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string")]:
        with pytest.raises(ChatTemplateError, match=message):
            ours.render(bad)


def test_a_template_cannot_reach_python_internals(tmp_path):
    """Templates from the Hub are untrusted: the sandbox refuses attribute escapes."""
    _saved_tokenizer(tmp_path, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception, match="unsafe|access"):
        ChatTemplate.maybe_load(tmp_path).render(CONVERSATIONS[0])


def test_a_checkpoint_without_a_template_has_none(tmp_path):
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ensure_demo_model() / "tokenizer.json"))
    tok.save_pretrained(tmp_path)
    assert ChatTemplate.maybe_load(tmp_path) is None


def test_no_tools_documents_names_and_the_tokens_of_special_tokens_map_json_as_transformers_passes_them(tmp_path):
    template = ("{{ bos_token }}[{{ pad_token }}]{% if tools is not none %}T{% endif %}{% if documents is none %}N"
                "{% endif %}{% for m in messages %}<{{ m.role }}{% if m.name is defined %}:{{ m.name }}{% endif %}>"
                "{{ m.content }}{% endfor %}")
    _saved_tokenizer(tmp_path, template)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):  # older checkpoints keep them elsewhere
        config.pop(key, None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "pad_token": "</s>"}))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "name": "alice", "content": "hi"}, {"role": "assistant", "content": None}]
    text = ChatTemplate.maybe_load(tmp_path).render(messages)
    assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s>[</s>]N<user:alice>hi<assistant>"


def test_a_template_that_fails_on_the_messages_is_a_chat_template_error_whatever_the_exception(tmp_path):
    _saved_tokenizer(tmp_path, "{{ messages[0]['content'] + 1 }}")  # a TypeError inside the template
    with pytest.raises(ChatTemplateError, match="failed on the messages: TypeError"):
        ChatTemplate.maybe_load(tmp_path).render(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="tool_results not supported"):
        ChatTemplate.maybe_load(tmp_path).render([{"role": "tool", "content": "", "tool_results": []}])


@pytest.mark.parametrize("config_template", [
    [{"name": "tool_use", "template": "{{ messages }}"}],  # named templates without a default one
    "{% for m in messages %}{{ m.content }}",  # does not compile
])
def test_a_template_that_cannot_be_used_leaves_the_model_without_one(tmp_path, config_template, caplog):
    _saved_tokenizer(tmp_path, "unused")
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = config_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.maybe_load(tmp_path) is None
    assert "chat requests will be refused" in caplog.text
