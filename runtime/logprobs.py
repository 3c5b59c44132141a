"""Log-probabilities of generated tokens, as a request with `logprobs=N` gets them (no JAX).

As vLLM's default: the log-softmax of the model's own logits at that step, before logit_bias,
allowed_token_ids, min_tokens, penalties, temperature, min_p or top-k/top-p touch them (so a
disallowed id can be among the most likely); the sampled token's, plus the N most likely tokens' (most
likely first; the sampled token is among them only if it is one of the N).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    logprob: float  # of the token that was generated (prompt_logprobs: of the prompt's token)
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the N most likely, most likely first
    # prompt_logprobs entries only: the token's 1-based rank in the vocabulary, as vLLM counts it (the
    # tokens at least as likely, itself included); None for generated tokens.
    rank: int | None = None

    def to_json_dict(self) -> dict:
        d = {"logprob": self.logprob, "top": [[token, logprob] for token, logprob in self.top]}
        if self.rank is not None:
            d["rank"] = self.rank
        return d

    def to_proto(self, message_type):
        """As a TokenLogprobs message of either proto (serving_pb2 or internal_pb2: the same fields)."""
        return message_type(logprob=self.logprob, top_token_ids=[t for t, _ in self.top],
                            top_logprobs=[lp for _, lp in self.top], rank=self.rank or 0)

    @classmethod
    def from_proto(cls, msg) -> "TokenLogprobs":
        return cls(msg.logprob, tuple(zip(msg.top_token_ids, msg.top_logprobs)), msg.rank or None)
