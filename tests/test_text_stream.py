"""TextStream: the streamed text deltas add up to the text the tokenizer (HF `tokenizers`) decodes,
cut before the earliest stop string, even when a stop string spans tokens; and no delta ever
shows a piece of a stop string that the next token completes."""

import numpy as np
import pytest

from splitserve.models.demo import train_tokenizer
from splitserve.models.tokenizer import Tokenizer
from splitserve.runtime.text_stream import TextStream

CORPUS_PATH = __import__("pathlib").Path(__file__).parent.parent / "models" / "demo_corpus.txt"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(train_tokenizer(CORPUS_PATH.read_text(), vocab_size=512))


def stream(tokenizer, prompt, tokens, stop, eos_at_end=False, include_stop=False, which=None):
    """(deltas, index of the token a stop string ended at or None), feeding tokens as a server does.
    `which`: a list that gets the stop string the stream reports (its stop_string)."""
    text = TextStream(tokenizer, prompt, tuple(stop), include_stop)
    deltas, stopped = [], False
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        delta, stopped = text.add(token, stop_token=eos_at_end and last, last=last)
        deltas.append(delta)
        if stopped:
            break
    if which is not None:
        which.append(text.stop_string)
    return deltas, i if stopped else None


@pytest.mark.parametrize("include_stop", [False, True])
def test_deltas_add_up_to_the_decoded_text_cut_at_the_earliest_stop_string(tokenizer, include_stop):
    """include_stop (include_stop_str_in_output): the text runs to the end of that stop string."""
    rng = np.random.default_rng(0)
    corpus_ids = tokenizer.encode(CORPUS_PATH.read_text(), add_special_tokens=False)
    spanning = 0
    for case in range(300):
        start = int(rng.integers(0, len(corpus_ids) - 60))
        prompt, tokens = corpus_ids[start:start + 4], corpus_ids[start + 4:start + 4 + int(rng.integers(1, 40))]
        full = tokenizer.decode(tokens)
        stops = []
        for _ in range(int(rng.integers(0, 3))):  # substrings of the text, and strings not in it
            i, n = int(rng.integers(0, max(1, len(full) - 1))), int(rng.integers(1, 6))
            stops.append(full[i:i + n] if rng.random() < 0.8 and full[i:i + n] else "\x00never")
        which = []
        deltas, stopped_at = stream(tokenizer, prompt, tokens, stops, include_stop=include_stop, which=which)
        # As a server checks after each token: the first token that completes a stop string stops
        # the request, and the text ends before the earliest stop string complete by then.
        found = {s: full.find(s) for s in stops if s in full}
        ends = [len(tokenizer.decode(tokens[:i + 1])) for i in range(len(tokens))]
        stop_token = next((i for i, end in enumerate(ends) if any(at + len(s) <= end for s, at in found.items())), None)
        spans = sorted((at, at + len(s)) for s, at in found.items() if at + len(s) <= ends[stop_token]) if found else []
        cut = spans[0][0] if spans else len(full)
        want = full[:spans[0][1]] if spans and include_stop else full[:cut]
        assert "".join(deltas) == want, (case, stops)
        assert stopped_at == stop_token
        assert which == [full[spans[0][0]:spans[0][1]] if spans else None]  # the stop string that ended it
        if found:
            spanning += stop_token > 0 and ends[stop_token - 1] > cut  # the stop string began a token earlier
        sent = ""
        for delta in deltas:  # no delta ever runs past the cut
            sent += delta
            assert want.startswith(sent)
    assert spanning > 10  # the case of the bug: stop strings that began in an earlier token


def test_text_held_back_for_a_stop_string_is_sent_when_the_request_ends(tokenizer):
    tokens = tokenizer.encode("the cat sat on the mat", add_special_tokens=False)
    # " mat" ends in "t", the start of the stop string "tx": held back until the last token
    deltas, stopped_at = stream(tokenizer, [], tokens, ["tx"])
    assert stopped_at is None and "".join(deltas) == "the cat sat on the mat"
    assert not "".join(deltas[:-1]).endswith("t")
    eos = 2
    deltas, _ = stream(tokenizer, [], tokens + [eos], ["tx"], eos_at_end=True)
    assert "".join(deltas) == "the cat sat on the mat" and deltas[-1] == "t"


def test_include_stop_keeps_the_stop_tokens_text_as_vllm_does(tokenizer):
    tokens = tokenizer.encode("the cat sat on the mat", add_special_tokens=False)
    dropped, _ = stream(tokenizer, [], tokens, [], eos_at_end=True)
    kept, _ = stream(tokenizer, [], tokens, [], eos_at_end=True, include_stop=True)
    assert "".join(kept) == "the cat sat on the mat"
    assert "".join(dropped) == tokenizer.decode(tokens[:-1]) != "".join(kept)


def test_with_include_stop_a_stop_tokens_text_can_complete_a_stop_string_as_in_vllm(tokenizer):
    """vLLM detokenizes a stop token's text only with include_stop_str_in_output, and then looks for
    stop strings in it: one completed there cuts the text after it and is the stop reason."""
    tokens = tokenizer.encode("the cat sat on the mat by the door", add_special_tokens=False)
    full, before = tokenizer.decode(tokens), len(tokenizer.decode(tokens[:-1]))
    stop = full[before - 1: before + 1]  # from the last character before the stop token's into its first
    assert len(stop) == 2 and full.find(stop) == before - 1
    kept, which = [], []
    deltas, at = stream(tokenizer, [], tokens, [stop], eos_at_end=True, include_stop=True, which=kept)
    assert "".join(deltas) == full[: before + 1] and kept == [stop] and at == len(tokens) - 1
    deltas, at = stream(tokenizer, [], tokens, [stop], eos_at_end=True, which=which)
    assert "".join(deltas) == full[:before] and which == [None] and at is None  # its text is dropped
