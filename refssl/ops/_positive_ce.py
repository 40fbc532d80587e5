"""Cross-entropy of one positive column per row, without the cancellation of lse - positive logit.

Contrastive losses are row cross-entropies -log(w_pos / sum_j w_j).  Written as
log-sum-exp minus the positive logit, both terms are of size 1/tau and their
difference keeps an absolute error of about eps/tau however small the loss is
(3e-6 in float32 at tau = 0.01 for a true loss of 1e-14).  Where the positive
outweighs the negatives the same value is log1p(neg / w_pos), neg the sum of the
negative weights, whose error is relative to the loss.  Elsewhere the loss is
at least log 2 and the log-sum-exp form loses nothing.
"""

from __future__ import annotations

import numpy as np


def positive_ce(w, cols, fallback):
    """Per-row -log(w[i, cols[i]] / sum_j w[i, j]) for non-negative weights ``w`` (N, M).

    ``w``: softmax probabilities or max-shifted exponentials of the row's logits, an array owned by
    the caller (its positive entries are zeroed for one summation and restored exactly).
    ``fallback`` (N,): the same quantity as log-sum-exp minus the positive logit, used in the rows
    where the negatives weigh more than the positive.  Costs one pass over ``w``.
    """
    rows = np.arange(w.shape[0])
    pos = w[rows, cols]
    w[rows, cols] = 0
    neg = w.sum(axis=1)
    w[rows, cols] = pos
    return positive_ce_from_sums(pos, neg, fallback)


def positive_ce_from_sums(pos, neg, fallback):
    """:func:`positive_ce` from the positive weight and the (separately summed) negative weight of each row."""
    near = pos >= neg  # the positive dominates: loss <= log 2
    ratio = np.divide(neg, pos, out=np.zeros_like(neg), where=near)
    return np.where(near, np.log1p(ratio), fallback)
