"""A checkpoint's chat template: turns a list of chat messages into the prompt text.

HF checkpoints of instruction-tuned models ship a Jinja template, in `chat_template.jinja`
(what transformers writes since 4.49) or as `chat_template` in tokenizer_config.json (older
checkpoints; a string, or a list of named templates of which "default" is the one used). A
"tool_use" template (`additional_chat_templates/tool_use.jinja`, or named in that list) renders
chats with tools, as transformers picks it.
It is rendered as transformers' `apply_chat_template` renders it, so a prompt means the same
here as there:
  - a sandboxed Jinja environment (templates come from the Hub: untrusted code), with
    trim_blocks and lstrip_blocks;
  - the special tokens (bos_token, eos_token, ...: special_tokens_map.json, overridden by
    tokenizer_config.json, and its extra_special_tokens) as variables, `add_generation_prompt`,
    `tools` (models/chat_messages.py; None without them), `documents` (None: not supported), and
    the helpers templates call:
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

from splitserve.models.chat_messages import ChatTemplateError, check_messages, check_tools
from splitserve.models.config import read_json_object

__all__ = ["ChatTemplate", "ChatTemplateError", "check_messages", "check_tools"]

log = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
ADDITIONAL_TEMPLATES = "additional_chat_templates"  # named templates beside it ("tool_use.jinja", ...)
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # older checkpoints keep bos_token etc. here


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja text
    # A list of named templates may hold a "tool_use" one: transformers renders chats with tools by it.
    tool_use_source: str | None = None
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)  # bos_token -> "<s>", ...

    @classmethod
    def maybe_load(cls, model_dir: str | Path) -> "ChatTemplate | None":
        """The template of a checkpoint directory; None if it has none, or none that can be used."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / TOKENIZER_CONFIG)
        template_file = model_dir / TEMPLATE_FILE
        tool_use = None
        try:
            if template_file.exists():
                source = template_file.read_text(encoding="utf-8")
                extra = model_dir / ADDITIONAL_TEMPLATES / "tool_use.jinja"  # where transformers 5 saves it
                tool_use = extra.read_text(encoding="utf-8") if extra.exists() else None
            else:
                source, tool_use = _pick_templates(config.get("chat_template"))
            for text in (source, tool_use):
                if text is not None:
                    _compiled(text)
        except Exception as e:  # noqa: BLE001 - a broken template must not stop text prompts
            log.warning("the chat template of %s cannot be used (%s); chat requests will be refused", model_dir, e)
            return None
        if source is None:
            return None
        return cls(source, tool_use, _special_tokens(config, _read_json(model_dir / SPECIAL_TOKENS_MAP)))

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ([{"role": ..., "content": ...}, ...]), ending where the
        assistant's answer begins (add_generation_prompt). `tools`: the functions the model may call
        (models/chat_messages.py), for the template to describe; None or [] for none."""
        import jinja2

        checked = check_messages(messages)
        tools = check_tools(tools) or None if tools is not None else None  # [] is none, as transformers reads it
        source = self.tool_use_source if tools and self.tool_use_source else self.source
        try:
            return _compiled(source).render(messages=checked, tools=tools, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:  # raise_exception() in the template
            raise ChatTemplateError(f"the model's chat template refused the messages: {e}") from None
        except Exception as e:  # noqa: BLE001 - the template's own error on these messages, whatever its type
            raise ChatTemplateError(f"the model's chat template failed on the messages: "
                                    f"{type(e).__name__}: {e}") from None


def _pick_templates(value) -> tuple[str | None, str | None]:
    """(the template, the one for chats with tools if the list names one)."""
    if value is None or isinstance(value, str):
        return value, None
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            tool_use = named.get("tool_use")
            return named["default"], tool_use if isinstance(tool_use, str) else None
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
