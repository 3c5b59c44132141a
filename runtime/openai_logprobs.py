"""Log-probabilities in the OpenAI API's shapes, and vLLM's prompt_logprobs, for runtime/openai_api.py.

Tokens are named by their text: each token's bytes (the model's tokenizer) read through one UTF-8
decoder per choice, so the texts of a choice's tokens join into its text. Plain Python, no JAX.
"""

from __future__ import annotations

import codecs

from splitserve.runtime.logprobs import TokenLogprobs


class AnswerMismatch(ValueError):
    """The router's answer does not add up (prompt logprobs short of the prompt): a server error."""


class TokenText:
    """The bytes of a token, for logprobs: by the model's tokenizer, or "token_id:N" without one, as
    vLLM's --return-tokens-as-token-ids names them."""

    def __init__(self, tokenizer=None):
        self._tokenizer = tokenizer

    def bytes(self, token_id: int) -> bytes:
        if self._tokenizer is None:
            return f"token_id:{token_id}".encode()
        return self._tokenizer.token_bytes(token_id)

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def alone(self, token_id: int) -> str:
        """The token's text read alone (vLLM's decoded_token)."""
        return self.bytes(token_id).decode("utf-8", "replace")

    def prompt(self, token_ids: tuple[int, ...]) -> str:
        """A prompt given as token ids, as text (for echo): special tokens kept, since they were sent."""
        if self._tokenizer is None:
            raise ValueError("echo of a prompt given as token ids needs the model's tokenizer "
                             "(openai-server --tokenizer MODEL) to turn them into text")
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=False)


def _finite(logprob: float) -> float:
    """-inf and NaN are not JSON: vLLM's floor, -9999.0."""
    return logprob if logprob >= -9999.0 else -9999.0


class ChoiceLogprobs:
    """One choice's "logprobs" in OpenAI's shapes, built part by part as its tokens come.

    Completions: {"text_offset", "token_logprobs", "tokens", "top_logprobs": [{token: logprob}]},
    each top dict holding the sampled token too, as vLLM's. Chat: {"content": [{"token", "logprob",
    "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.

    A token's text is its bytes decoded after the choice's earlier tokens: a token that ends inside
    a UTF-8 character has the text "" and the token that completes the character carries all of it
    (as vLLM corrects them), so the texts join into the choice's text and offsets add up. "bytes"
    are the token's own. A top token's text is read at the same point as the sampled one's.
    """

    def __init__(self, chat: bool, text: TokenText):
        self.chat, self.text = chat, text
        self.offset = 0  # completions: the next token's character offset in the choice's text
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def part(self, token_ids: list[int], logprobs: list[TokenLogprobs]) -> dict:
        entries = []
        for token, lp in zip(token_ids, logprobs):
            top = [(self._read(t), _finite(v), self.text.bytes(t)) for t, v in lp.top]
            raw = self.text.bytes(token)
            entries.append(((self._utf8.decode(raw), _finite(lp.logprob), raw), top))
        if self.chat:
            return {"content": [dict(_chat_entry(*sampled), top_logprobs=[_chat_entry(*t) for t in top])
                                for sampled, top in entries]}
        out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for (text, logprob, _), top in entries:
            ranked: dict[str, float] = {}
            for alt_text, alt_logprob, _ in top:  # most likely first: a text two tokens share keeps the likelier
                ranked.setdefault(alt_text, alt_logprob)
            ranked.setdefault(text, logprob)
            for key, value in (("text_offset", self.offset), ("token_logprobs", logprob), ("tokens", text),
                               ("top_logprobs", ranked)):
                out[key].append(value)
            self.offset += len(text)
        return out

    def prompt_part(self, prompt_ids: tuple[int, ...], entries: list[TokenLogprobs]) -> dict:
        """Completions with echo: the prompt's tokens, before the choice's own, as vLLM lists them. The
        first has no logprob and no top dict (null); entries[i] is about prompt token i + 1."""
        if self.chat:
            raise ValueError("echo is a completions feature: chat has no prompt tokens in its logprobs")
        if len(entries) != max(len(prompt_ids) - 1, 0):
            raise AnswerMismatch(f"{len(entries)} prompt logprobs for a prompt of {len(prompt_ids)} tokens: one is "
                             "wanted per token after the first")
        first = self.part(list(prompt_ids[:1]), [TokenLogprobs(0.0)])  # its text and offset
        first["token_logprobs"], first["top_logprobs"] = [None], [None]
        return joined([first, self.part(list(prompt_ids[1:]), entries)])

    def _read(self, token: int) -> str:
        """A top token's text where the next token stands, leaving the choice's decoder as it is."""
        reader = codecs.getincrementaldecoder("utf-8")("replace")
        reader.setstate(self._utf8.getstate())
        return reader.decode(self.text.bytes(token))


def _chat_entry(text: str, logprob: float, raw: bytes) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


def joined(parts: list[dict]) -> dict:
    """Consecutive parts of one choice's completions logprobs, as one."""
    return {key: [value for part in parts for value in part[key]] for key in parts[0]}


def prompt_logprobs_json(prompt_ids: tuple[int, ...], entries: list[TokenLogprobs], text: TokenText) -> list:
    """vLLM's "prompt_logprobs": [null, {"id": {"logprob", "rank", "decoded_token"}}, ...]. Position i
    (from 1) holds prompt token i first, with its rank in the vocabulary, then the N most likely
    tokens there with ranks 1..N; the first token has none (null)."""
    out: list = [None]
    for token, entry in zip(prompt_ids[1:], entries):
        position = {str(token): _ranked(entry.logprob, entry.rank, text.alone(token))}
        for rank, (alt, logprob) in enumerate(entry.top, 1):
            position[str(alt)] = _ranked(logprob, rank, text.alone(alt))
        out.append(position)
    return out


def _ranked(logprob: float, rank: int | None, decoded: str) -> dict:
    return {"logprob": _finite(logprob), "rank": rank, "decoded_token": decoded}
