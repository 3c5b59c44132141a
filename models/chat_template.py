"""A checkpoint's chat template: turns a list of chat messages into the prompt text.

HF checkpoints of instruction-tuned models ship a Jinja template, in `chat_template.jinja`
(what transformers writes since 4.49) or as `chat_template` in tokenizer_config.json (older
checkpoints; a string, or a list of named templates of which "default" is the one used).
It is rendered as transformers' `apply_chat_template` renders it, so a prompt means the same
here as there:
  - a sandboxed Jinja environment (templates come from the Hub: untrusted code), with
    trim_blocks and lstrip_blocks;
  - the special tokens (bos_token, eos_token, ...: special_tokens_map.json, overridden by
    tokenizer_config.json, and its extra_special_tokens) as variables, `add_generation_prompt`,
    `tools` and `documents` (None: neither is supported), and the helpers templates call:
    raise_exception(message), strftime_now(format), a tojson filter that keeps non-ASCII text;
  - `{% generation %}...{% endgeneration %}` blocks (which mark the assistant's tokens for
    training) render their content.
The text already holds the template's special tokens (a BOS, say), so it is tokenized without
adding them again (`Tokenizer.encode(text, add_special_tokens=False)`).

A template that cannot be used (it does not compile; a list of named templates without a
"default") is logged and treated as none: text prompts still work, chats are refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from splitserve.models.config import read_json_object

log = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # older checkpoints keep bos_token etc. here
MESSAGE_KEYS = ("role", "content", "name")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered: malformed, or refused by the template itself."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja text
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)  # bos_token -> "<s>", ...

    @classmethod
    def maybe_load(cls, model_dir: str | Path) -> "ChatTemplate | None":
        """The template of a checkpoint directory; None if it has none, or none that can be used."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / TOKENIZER_CONFIG)
        template_file = model_dir / TEMPLATE_FILE
        try:
            if template_file.exists():
                source = template_file.read_text(encoding="utf-8")
            else:
                source = _pick_template(config.get("chat_template"))
            if source is not None:
                _compiled(source)
        except Exception as e:  # noqa: BLE001 - a broken template must not stop text prompts
            log.warning("the chat template of %s cannot be used (%s); chat requests will be refused", model_dir, e)
            return None
        if source is None:
            return None
        return cls(source, _special_tokens(config, _read_json(model_dir / SPECIAL_TOKENS_MAP)))

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ([{"role": ..., "content": ...}, ...]), ending where the
        assistant's answer begins (add_generation_prompt)."""
        import jinja2

        checked = check_messages(messages)
        try:
            return _compiled(self.source).render(messages=checked, tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:  # raise_exception() in the template
            raise ChatTemplateError(f"the model's chat template refused the messages: {e}") from None
        except Exception as e:  # noqa: BLE001 - the template's own error on these messages, whatever its type
            raise ChatTemplateError(f"the model's chat template failed on the messages: "
                                    f"{type(e).__name__}: {e}") from None


def check_messages(messages) -> list[dict[str, str]]:
    """Plain {"role", "content"[, "name"]} dicts of strings (what templates read), or ChatTemplateError.
    A missing or null content is "" (an assistant turn that only called tools, as vLLM reads it);
    other keys (tool_calls, ...) are refused rather than dropped: no tool use is supported."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or not message["role"]:
            raise ChatTemplateError(f"messages[{i}] must be an object with a non-empty string role")
        if unknown := sorted(set(message) - set(MESSAGE_KEYS)):
            raise ChatTemplateError(f"messages[{i}]: {', '.join(unknown)} not supported (a message has "
                                    f"{', '.join(MESSAGE_KEYS)})")
        content = "" if message.get("content") is None else message["content"]
        if not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content must be a string")
        out = {"role": message["role"], "content": content}
        if message.get("name"):
            if not isinstance(message["name"], str):
                raise ChatTemplateError(f"messages[{i}].name must be a string")
            out["name"] = message["name"]
        checked.append(out)
    return checked


def _pick_template(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError("chat_template must be a string, or a list of named templates with a 'default' one")


def _special_tokens(config: dict, tokens_map: dict) -> dict[str, str]:
    """bos_token etc. as transformers hands them to templates: special_tokens_map.json's, then
    tokenizer_config.json's where it gives one, then its extra_special_tokens."""
    tokens = {}
    extra = config.get("extra_special_tokens")
    for source in (tokens_map, config, extra if isinstance(extra, dict) else {}):
        for key, value in source.items():
            if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
                value = value.get("content")
            if (key.endswith("_token") or source is extra) and isinstance(value, str):
                tokens[key] = value
    return tokens


def _read_json(path: Path) -> dict:
    return read_json_object(path) if path.exists() else {}


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    return _environment().from_string(source)


_ENVIRONMENT = None


def _environment():
    """Built once: the sandbox, the loop controls and the helpers templates expect."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class GenerationBlocks(jinja2.ext.Extension):
            """`{% generation %}body{% endgeneration %}` renders as `body`."""
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.Scope(body).set_lineno(lineno)

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _ENVIRONMENT = env
    return _ENVIRONMENT
