"""Nearest-neighbour targets: NNCLR and Mean Shift (MSF).

The neighbour choice is a piecewise-constant function of the stop-gradient
inputs (z, support, target, bank), so those get ``None`` and the gradient
flows only into the predictions / queries.  Queue updates are in
:mod:`refssl.state`.  Derivation: derivations/teacher_student.md.
"""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..registry import Range, register
from ..state import check_ptr, fifo_rows
from ._ts_common import ce_identity_grad, check_rows_like, check_views, clustered, grad_scalar, identity_ce
from .normalize import l2_normalize_backward, l2_normalize_forward


# -- NNCLR ----------------------------------------------------------------------------------


def nnclr_neighbours(z, support):
    """Normalised nearest neighbours: row argmax of ẑ ŝᵀ, returned as (ŝ[idx], idx)."""
    zn = l2_normalize_forward(z)[0]
    sn = l2_normalize_forward(support)[0]
    idx = np.argmax(zn @ sn.T, axis=1)
    return sn[idx], idx


def _lookup_both(z1, z2, support):
    """Both views' lookups with one normalisation of the support and one matrix product."""
    sn = l2_normalize_forward(support)[0]
    zn = l2_normalize_forward(np.concatenate([z1, z2], axis=0))[0]
    idx = np.argmax(zn @ sn.T, axis=1)
    n = z1.shape[0]
    return sn[idx[:n]], sn[idx[n:]]


def nnclr_forward(p1, p2, z1, z2, support, *, temperature=0.1):
    """NNCLR loss: the nearest neighbour of each view's projection is the positive of the other view.

        nn_a = normalise(S[argmax_j ẑ_a . Ŝ_j])            (support lookup, no gradient)
        L = 1/2 CE(nn_1 p̂2ᵀ / τ, id) + 1/2 CE(nn_2 p̂1ᵀ / τ, id)

    Rows of each logit matrix are neighbours, columns predictions: the
    negatives are the other cross-view predictions only.  Shapes: p1, p2
    (predictions), z1, z2 (projections) (N, D), support (Q, D); returns a scalar.
    z1, z2 and support are stop-gradient (slots None).  Support rows are
    normalised before the lookup, so a support of raw z (lightly) and of
    normalised z (solo-learn) give the same loss.  Update the support *after*
    the loss with :func:`refssl.state.nnclr_support_update` (enqueue z1).

    Reference: Dwibedi et al. 2021, arXiv 2104.14548 (no official code; paper
    pseudocode); ports vturrisi/solo-learn solo/losses/nnclr.py,
    solo/methods/nnclr.py.  Backward: derivations/teacher_student.md#nnclr.
    """
    dtype = check_views([p1, p2, z1, z2], ["p1", "p2", "z1", "z2"])
    check_rows_like(support, "support", z1, "z1", shape_doc="(Q, D)")
    tau = V.positive(temperature, "temperature")
    p1n, c1 = l2_normalize_forward(p1)
    p2n, c2 = l2_normalize_forward(p2)
    nn1, nn2 = _lookup_both(z1, z2, support)
    ce1, prob1 = identity_ce((nn1 @ p2n.T) / dtype.type(tau))
    ce2, prob2 = identity_ce((nn2 @ p1n.T) / dtype.type(tau))
    loss = 0.5 * (ce1 + ce2)
    return V.finite_output(dtype.type(loss), "nnclr", temperature=tau), (c1, c2, nn1, nn2, prob1, prob2, tau, dtype)


def nnclr_backward(cache, grad_out):
    """dL/dp̂2 = (1/2τ) [(softmax_1 - I)/N]ᵀ nn_1 (and p̂1 from direction 2); z, support get None."""
    c1, c2, nn1, nn2, prob1, prob2, tau, dtype = cache
    g = grad_scalar(grad_out, dtype) * dtype.type(0.5 / tau)
    dp2n = (g * ce_identity_grad(prob1)).T @ nn1
    dp1n = (g * ce_identity_grad(prob2)).T @ nn2
    return l2_normalize_backward(c1, dp1n)[0], l2_normalize_backward(c2, dp2n)[0], None, None, None


def _top_gap(sim, k):
    """Per row, the gap between the k-th and (k+1)-th largest similarity (inf if no (k+1)-th)."""
    if sim.shape[1] <= k:
        return np.inf
    s = -np.sort(-sim, axis=1)
    return float(np.min(s[:, k - 1] - s[:, k]))


def _unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _example_nnclr(rng, dtype=np.float64):
    n, d, q = int(rng.integers(1, 7)), int(rng.integers(2, 9)), int(rng.integers(2, 10))
    p1, p2 = np.split(clustered(rng, 2 * n, d), 2)  # columns of the logits: keep the softmax unsaturated
    # Redraw until every lookup has a clear winner (margin 1e-3 >> float32 rounding),
    # so that float32 and float64 pick the same neighbours.
    while True:
        z1, z2, s = (rng.standard_normal((n, d)), rng.standard_normal((n, d)),
                     _unit_rows(rng.standard_normal((q, d))))
        if min(_top_gap(_unit_rows(z) @ s.T, 1) for z in (z1, z2)) > 1e-3:
            break
    return tuple(a.astype(dtype) for a in (p1, p2, z1, z2, s)), {"temperature": 0.1}


register(
    "nnclr",
    forward=nnclr_forward,
    backward=nnclr_backward,
    example=_example_nnclr,
    differentiable=(0, 1),
    reference="Dwibedi et al. 2021, arXiv 2104.14548 (paper pseudocode); vturrisi/solo-learn "
              "solo/losses/nnclr.py, solo/methods/nnclr.py",
    derivation="derivations/teacher_student.md#nnclr",
    hyper_ranges={"temperature": Range(0.05, 1.0)},
)


# -- Mean Shift ------------------------------------------------------------------------------


def mean_shift_neighbours(target, bank, *, k=5, ptr=0):
    """The bank after enqueuing t̂ at ``ptr`` and the (N, k) indices of each target's k nearest rows."""
    tn = l2_normalize_forward(target)[0]
    searched = bank.copy()
    searched[fifo_rows(bank.shape[0], ptr, tn.shape[0])] = tn
    sim = tn @ searched.T  # ranking by 2 - 2 t̂.m is ranking by t̂.m
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    return searched, idx


def mean_shift_forward(query, target, bank, *, k=5, ptr=0):
    """Mean Shift (MSF) loss: regress the query onto the k nearest neighbours of the target.

        bank' = bank with t̂ written at rows ptr, ..., ptr+N-1 (mod M)   (enqueue first)
        NN_k(i) = the k rows m of bank' with the largest t̂_i . m      (chosen by the target)
        L = (1/N) sum_i (1/k) sum_{m in NN_k(i)} (2 - 2 q̂_i . m)

    Shapes: query (online predictions), target (momentum-encoder outputs) (N, D),
    bank (M, D) with M >= N; returns a scalar.  k (1 <= k <= M) and ptr (the
    next row to write, 0 <= ptr < M; see :mod:`refssl.state`) are integers.  As
    in the official code the current targets are enqueued *before* the search,
    so t̂_i is its own nearest neighbour at distance 0: k = 5 means itself plus 4
    bank entries and k = 1 is BYOL-style regression 2 - 2 cos(q, t).  Bank rows
    are used as stored (the official bank holds unit vectors: normalised random
    rows at initialisation, then normalised targets).  target and bank are
    stop-gradient (slots None).  Not symmetrised.  Carry the bank to the next
    step with :func:`refssl.state.mean_shift_bank_update` (same enqueue).

    Reference: Koohpayegani et al. 2021, arXiv 2105.07269; UMBCvision/MSF
    train_msf.py (MeanShift.forward).  Backward: derivations/teacher_student.md#mean_shift.
    """
    dtype = check_views([query, target], ["query", "target"])
    check_rows_like(bank, "bank", query, "query", shape_doc="(M, D)")
    m_rows, n = bank.shape[0], query.shape[0]
    if m_rows < n:
        raise ValueError(f"bank must have at least N = {n} rows (the targets are enqueued into it), "
                         f"got shape {bank.shape}")
    k = V.positive_int(k, "k")
    if k > m_rows:
        raise ValueError(f"k must be <= {m_rows} (the number of bank rows), got {k}")
    ptr = check_ptr(ptr, m_rows, "bank")
    qn, cq = l2_normalize_forward(query)
    searched, idx = mean_shift_neighbours(target, bank, k=k, ptr=ptr)
    mean_nn = searched[idx].mean(axis=1)  # (N, D): average of the k neighbours
    loss = 2.0 - 2.0 * np.sum(qn * mean_nn) / n
    return dtype.type(loss), (cq, mean_nn, n, dtype)


def mean_shift_backward(cache, grad_out):
    """dL/dq̂_i = -(2/N) mean of the k neighbours of target i; target and bank get None."""
    cq, mean_nn, n, dtype = cache
    g = grad_scalar(grad_out, dtype) * dtype.type(-2.0 / n)
    return l2_normalize_backward(cq, g * mean_nn)[0], None, None


def _example_msf(rng, dtype=np.float64):
    n, d = int(rng.integers(1, 6)), int(rng.integers(2, 9))
    m_rows = n + int(rng.integers(1, 8))
    k = int(rng.integers(1, min(5, m_rows) + 1))
    ptr = int(rng.integers(0, m_rows))
    query = rng.standard_normal((n, d))
    # Redraw until the k-th and (k+1)-th neighbours are clearly apart (margin 1e-3).
    while True:
        target, bank = rng.standard_normal((n, d)), _unit_rows(rng.standard_normal((m_rows, d)))
        searched = bank.copy()
        searched[fifo_rows(m_rows, ptr, n)] = _unit_rows(target)
        if _top_gap(_unit_rows(target) @ searched.T, k) > 1e-3:
            break
    return tuple(a.astype(dtype) for a in (query, target, bank)), {"k": k, "ptr": ptr}


register(
    "mean_shift",
    forward=mean_shift_forward,
    backward=mean_shift_backward,
    example=_example_msf,
    differentiable=(0,),
    reference="Koohpayegani et al. 2021, arXiv 2105.07269; UMBCvision/MSF train_msf.py",
    derivation="derivations/teacher_student.md#mean_shift",
)
