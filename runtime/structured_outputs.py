"""Structured outputs: a request's output held to a JSON schema, a regex, a choice or a grammar.

As vLLM's StructuredOutputsParams (and its older guided_json / guided_regex / guided_choice /
guided_grammar): exactly one of
- `json`: a JSON schema (the output is a JSON value it accepts);
- `json_object`: any JSON object (OpenAI's response_format {"type": "json_object"});
- `regex`: the output matches it whole;
- `choice`: the output is one of these strings;
- `grammar`: a Lark grammar in llguidance's dialect (a context-free grammar with regex terminals).

Each becomes an llguidance grammar (grammar_spec). llguidance, the engine vLLM and SGLang use as
one of their structured-output backends, turns it into a token mask at each step
(runtime/grammar_masks.py); the sampler gives every token outside the mask a logit of -inf. Once
the grammar is complete only EOS is allowed, so the request ends with "stop". Plain Python, no JAX.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

# A spec is compiled on the router and on each worker that samples for the request; bound its size.
MAX_SPEC_CHARS = 256 << 10
MAX_CHOICES = 1024
KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclasses.dataclass(frozen=True)
class StructuredOutputs:
    json: str | None = None  # a JSON schema, as JSON text (a dict is taken and serialised)
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self):
        if isinstance(self.json, (Mapping, bool)):  # a schema may be `true` too
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None:
            # A string's characters or an object's keys are no list of choices.
            if not isinstance(self.choice, (list, tuple)) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a list of strings, got {self.choice!r:.80}")
            object.__setattr__(self, "choice", tuple(self.choice))
            if not 1 <= len(self.choice) <= MAX_CHOICES or not all(self.choice):
                raise ValueError(f"structured_outputs.choice must hold 1 to {MAX_CHOICES} non-empty strings")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r:.80}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a boolean, got {self.json_object!r}")
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        if self.json is not None:
            try:
                json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.size > MAX_SPEC_CHARS:
            raise ValueError(f"structured outputs' spec has {self.size} characters, over the {MAX_SPEC_CHARS} allowed")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def size(self) -> int:
        return sum(len(v) for v in (self.json, self.regex, self.grammar) if v) + sum(map(len, self.choice or ()))

    def grammar_spec(self) -> str:
        """The llguidance grammar (its JSON form) that holds the output to this."""
        from llguidance import LLMatcher

        if self.json is not None:
            return LLMatcher.grammar_from_json_schema(self.json)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}))
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:  # Lark string literals take JSON's escapes
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(self.grammar)

    def check(self) -> None:
        """Raises ValueError with llguidance's message unless the spec compiles (a bad regex, an
        unsupported schema keyword, a Lark syntax error)."""
        from llguidance import LLMatcher

        try:
            spec = self.grammar_spec()
        except (ValueError, RuntimeError, TypeError) as e:
            raise ValueError(f"structured_outputs.{self.kind} does not compile: {e}") from None
        failed, messages = LLMatcher.validate_grammar_with_warnings(spec)
        if failed:
            raise ValueError(f"structured_outputs.{self.kind} does not compile: {'; '.join(messages).strip()}")

    def as_fields(self) -> dict:
        """The one field set, as vLLM's structured_outputs object has it."""
        return {self.kind: list(self.choice) if self.kind == "choice" else getattr(self, self.kind)}


def structured_outputs(value) -> StructuredOutputs | None:
    """A StructuredOutputs from itself, a dict of its fields (vLLM's structured_outputs object), or None."""
    if value is None or isinstance(value, StructuredOutputs):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"structured_outputs must be an object with one of {', '.join(KINDS)}, got {value!r:.80}")
    unknown = sorted(set(value) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown structured_outputs field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                         f"(known: {', '.join(KINDS)})")
    fields = {k: v for k, v in value.items() if v is not None}
    if "json" in fields and not isinstance(fields["json"], str):  # a schema object: serialised as given
        if not isinstance(fields["json"], (Mapping, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (object or text), "
                             f"got {fields['json']!r:.80}")
    return StructuredOutputs(**fields)
