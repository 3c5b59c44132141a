"""runtime/sampling_cutoff.py: the per-row cutoff keeps exactly the tokens transformers' own
warpers keep, applied in vLLM's order (min_p, top-k, top-p), on random rows of many sizes, with
-inf logits (banned ids), and every mix of filters in one batch."""

import jax
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from splitserve.runtime.sampling_cutoff import cutoff


def transformers_kept(row: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    scores = torch.tensor(row[None])
    warpers = ([MinPLogitsWarper(min_p)] if min_p > 0 else []) + ([TopKLogitsWarper(top_k)] if top_k else []) + \
        ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    for warp in warpers:
        scores = warp(None, scores)
    return np.isfinite(scores[0].numpy())


@pytest.mark.parametrize("vocab, scale", [(7, 1.0), (50, 3.0), (1000, 0.3), (32000, 2.0), (2048, 40.0),
                                          (300, 3e6)])  # temperature 1e-6: logits ~1e7, a float32 step ~1
def test_kept_tokens_equal_transformers_warpers(vocab, scale):
    rng = np.random.default_rng(vocab)
    batch = 24
    x = (rng.normal(size=(batch, vocab)) * scale).astype(np.float32)
    banned = rng.random(size=x.shape) < 0.05  # by a logit bias or allowed_token_ids
    banned[:, 0] = False  # every row keeps a finite token
    x[banned] = -np.inf
    top_k = rng.choice([0, 1, 2, 5, 40, vocab, vocab + 3], size=batch).astype(np.int32)
    top_p = rng.choice([1.0, 0.9, 0.5, 0.05, 0.999], size=batch).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.01, 0.2, 0.9], size=batch).astype(np.float32)
    cut = np.asarray(jax.jit(cutoff)(x, top_k, top_p, min_p))
    ours = (x >= cut[:, None]) & np.isfinite(x)  # a -inf token has no probability, kept or not
    for row in range(batch):
        want = transformers_kept(x[row], int(top_k[row]), float(top_p[row]), float(min_p[row]))
        assert np.array_equal(ours[row], want), (row, top_k[row], top_p[row], min_p[row])
    assert ours.sum(axis=1).min() >= 1  # the top token always stays


def test_min_p_at_huge_logits_keeps_only_tokens_at_least_min_p_as_likely():
    """At logits ~1e7 (temperature 1e-6) max + log(min_p) rounds by ~1: it kept a token e^-1 as
    likely as the top one under min_p 0.5."""
    x = np.array([[9198111.0, 9198110.0, 9198000.0], [3e7, 3e7 - 4, 3e7 - 2]], np.float32)
    cut = np.asarray(cutoff(x, np.zeros(2, np.int32), np.ones(2, np.float32), np.array([0.5, 0.1], np.float32)))
    assert cut.tolist() == [9198111.0, 3e7 - 2]


def test_rows_that_filter_nothing_get_minus_infinity_and_ties_stay_together():
    x = np.array([[3.0, 1.0, 1.0, 1.0, -2.0], [0.5, 0.5, 0.5, 0.5, 0.5]], np.float32)
    none = np.asarray(cutoff(x, np.zeros(2, np.int32), np.ones(2, np.float32), np.zeros(2, np.float32)))
    assert np.all(none == -np.inf)
    two = np.asarray(cutoff(x, np.array([2, 2], np.int32), np.ones(2, np.float32), np.zeros(2, np.float32)))
    assert two.tolist() == [1.0, 0.5]  # the 2nd largest; every token tied with it is kept

