"""Token masks of the requests with structured outputs (runtime/structured_outputs.py). No JAX.

A runner keeps one llguidance matcher per such request while it decodes, keyed by request id as
the penalty rows are (runtime/penalty_rows.py): each decode step's input token is the request's
newest one, which its matcher has not seen yet, so the step first feeds it that token, then asks
for the mask of the token to sample. A request's matcher is new at its first decode step (the
prefill's token is its first input), so decode workers need nothing but the request's spec. A
prefill samples the first token with a fresh matcher's mask.

Masks are bitmasks, i32[ceil(vocab / 32)] per row, bit (id % 32) of word (id // 32) set where
the id may be sampled: 32x smaller than a row of logits, which is what crosses to the device.
Once a grammar is complete (or a matcher fails) the mask allows only EOS, so the request ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from splitserve.models.tokenizer import Tokenizer
from splitserve.runtime.sampling_params import SamplingParams
from splitserve.runtime.structured_outputs import StructuredOutputs

log = logging.getLogger(__name__)

SPECS_KEPT = 64  # compiled grammar specs kept for reuse (many requests share a schema)


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def allowed_ids(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a bitmask allows (for tests and logs)."""
    ids = np.arange(vocab_size)
    return ids[(mask[ids // 32] >> (ids % 32)) & 1 == 1]


def nothing_allowed(mask: np.ndarray, allowed_token_ids: Sequence[int] | None) -> bool:
    """Whether a row's mask and its allowed_token_ids (if any) leave no token to sample: the
    sampler would see only -inf logits."""
    if not allowed_token_ids:
        return False
    ids = np.asarray(allowed_token_ids, np.int64)
    return not np.any((mask.view(np.uint32)[ids // 32] >> (ids % 32).astype(np.uint32)) & 1)


class GrammarMasks:
    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, eos_token_ids: Sequence[int]):
        self.vocab_size = vocab_size
        self.words = mask_words(vocab_size)
        self._tokenizer = tokenizer
        self._eos = tuple(eos_token_ids)
        self._ll_tokenizer = None  # built on first use (tens of ms for a 128k vocabulary)
        self._executor = None  # llguidance's thread pool for the masks of a step, made on first use
        self._lock = threading.Lock()  # gRPC threads check requests while the engine thread steps
        self._specs: dict[StructuredOutputs, str] = {}
        self._matchers: dict[str, object] = {}  # request id -> its llguidance LLMatcher
        self.failed: dict[str, str] = {}  # request id -> why its matcher failed, until take_failed()
        self.eos_only = np.zeros(self.words, np.int32)
        for token in self._eos:
            self.eos_only[token // 32] |= np.int32(np.uint32(1 << (token % 32)).view(np.int32))

    def check(self, params: SamplingParams) -> None:
        """Raises ValueError unless the request's structured outputs (if any) can be served here:
        the model has a tokenizer, and the spec compiles against it. Workers call it on arrival,
        so that a bad spec is refused there and never reaches a step."""
        spec = params.structured_outputs
        if spec is not None:
            try:
                matcher = self._matcher(spec)
            except (RuntimeError, TypeError) as e:  # llguidance's own errors, as a bad request
                raise ValueError(f"structured_outputs.{spec.kind}: {e}") from None
            if params.allowed_token_ids and nothing_allowed(self._mask(matcher), params.allowed_token_ids):
                raise ValueError(f"structured_outputs.{spec.kind} and allowed_token_ids leave no token to sample: "
                                 f"none of the allowed ids can begin the output")

    def first_masks(self, params: Sequence[SamplingParams]) -> list[np.ndarray | None]:
        """A prefill's rows: the mask of the first token (a fresh matcher's), None where unconstrained."""
        return [None if p.structured_outputs is None else self._mask(self._matcher(p.structured_outputs))
                for p in params]

    def step_masks(self, request_ids: Sequence[str] | None, params: Sequence[SamplingParams], steps: Sequence[int],
                   tokens: Sequence[int]) -> list[np.ndarray | None]:
        """A decode step's rows: each constrained row's matcher takes the row's input token, then
        gives the mask of the token to sample. Matchers of requests not in the step are dropped
        (finished or released)."""
        present = set(request_ids or ())
        for request_id in [r for r in self._matchers if r not in present]:
            del self._matchers[request_id]
        if all(p.structured_outputs is None for p in params):
            return [None] * len(params)
        if request_ids is None:
            raise ValueError("structured outputs need the request ids of the decode step")
        matchers = []
        for request_id, p, step, token in zip(request_ids, params, steps, tokens):
            if p.structured_outputs is None:
                matchers.append(None)
                continue
            matcher = self._matchers.get(request_id)
            if matcher is None or step <= 1:  # new, or a new request under a reused id
                matcher = self._matchers[request_id] = self._matcher(p.structured_outputs)
            if not matcher.consume_token(int(token)):
                why = matcher.get_error()
                log.error("request %s: token %d is outside its grammar (%s); it ends", request_id, token, why)
                self.failed[request_id] = (f"structured_outputs.{p.structured_outputs.kind}: the output left its "
                                           f"grammar at token {step}: {why.split(chr(10))[0]}")
            matchers.append(matcher)
        masks = self._masks(matchers)
        for request_id, p, step, mask in zip(request_ids, params, steps, masks):
            if mask is not None and request_id not in self.failed and nothing_allowed(mask, p.allowed_token_ids):
                done = np.array_equal(mask, self.eos_only)
                complete = " (the output is complete, and EOS is not allowed)" if done else ""
                self.failed[request_id] = (f"structured_outputs.{p.structured_outputs.kind} and allowed_token_ids leave "
                                           f"no token to sample after {step} output tokens{complete}")
        return masks

    def take_failed(self) -> dict[str, str]:
        """Requests whose matcher failed in the latest step_masks (llguidance gave up: a lexer grown
        too complex, say), and why; the engine ends them with that error. Their row's mask was EOS only."""
        failed, self.failed = self.failed, {}
        return failed

    def _matcher(self, spec: StructuredOutputs):
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer_for_llguidance(), self._spec(spec))
        if matcher.is_error():  # the router compiled the spec, so this is a bug or a version mismatch
            raise ValueError(f"structured_outputs.{spec.kind}: {matcher.get_error()}")
        return matcher

    def _mask(self, matcher) -> np.ndarray:
        return self._masks([matcher])[0]

    def _masks(self, matchers: list) -> list[np.ndarray | None]:
        """Each matcher's next mask (None for None), computed on llguidance's own threads, outside the GIL."""
        from llguidance import LLExecutor
        from llguidance.numpy import fill_next_token_bitmask_par

        masks = np.zeros((len(matchers), self.words), np.int32)
        live = [(m, row) for row, m in enumerate(matchers) if m is not None and not (m.is_stopped() or m.is_error())]
        if live:
            if self._executor is None:
                self._executor = LLExecutor()
            fill_next_token_bitmask_par(self._executor, live, masks)
        return [None if m is None else masks[row] if not (m.is_stopped() or m.is_error()) else self.eos_only
                for row, m in enumerate(matchers)]

    def _spec(self, spec: StructuredOutputs) -> str:
        with self._lock:
            compiled = self._specs.get(spec)
            if compiled is None:
                if len(self._specs) >= SPECS_KEPT:
                    self._specs.pop(next(iter(self._specs)))  # the oldest
                compiled = self._specs[spec] = spec.grammar_spec()
            return compiled

    def _tokenizer_for_llguidance(self):
        with self._lock:
            if self._ll_tokenizer is None:
                if self._tokenizer is None:
                    raise ValueError("structured outputs need the model's tokenizer (tokenizer.json)")
                from llguidance import LLTokenizer

                self._ll_tokenizer = LLTokenizer(self._tokenizer.to_json(), n_vocab=self.vocab_size,
                                                 eos_token=list(self._eos))
            return self._ll_tokenizer
