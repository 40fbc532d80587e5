"""Supervised contrastive losses of Khosla et al.: L_out (``supcon``) and L_in (``supcon_in``)."""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..numerics import logsumexp
from ..registry import Range, register
from .normalize import l2_normalize_backward, l2_normalize_forward

__all__ = ["supcon_forward", "supcon_backward", "supcon_in_forward", "supcon_in_backward"]


def _stack(z, labels):
    """(B, V, D) + (B,) -> view-major rows (V*B, D) + (V*B,); (M, D) + (M,) passes through."""
    V.float_array(z, "z", shape_doc="(B, V, D) or (M, D)")
    if z.ndim not in (2, 3):
        raise ValueError(f"z must have shape (B, V, D) or (M, D), got shape {z.shape}")
    if z.shape[-1] < 1 or (z.ndim == 3 and z.shape[1] < 1):
        raise ValueError(f"z must have shape (B, V, D) or (M, D) with V, D >= 1, got shape {z.shape}")
    V.labels_array(labels, "labels", z.shape[0])
    if z.ndim == 3:
        b, v, d = z.shape
        return z.transpose(1, 0, 2).reshape(v * b, d), np.tile(labels, v)
    return z, labels


def _unstack(dz, shape):
    if len(shape) == 3:
        b, v, d = shape
        return np.ascontiguousarray(dz.reshape(v, b, d).transpose(1, 0, 2))
    return dz


def _common(z, labels, temperature, base_temperature):
    rows, y = _stack(z, labels)
    tau = V.positive(temperature, "temperature")
    factor = 1.0 if base_temperature is None else tau / V.positive(base_temperature, "base_temperature")
    u, ncache = l2_normalize_forward(rows)
    m = u.shape[0]
    logits = (u @ u.T) / u.dtype.type(tau)
    np.fill_diagonal(logits, -np.inf)  # the anchor itself is neither positive nor in the denominator
    positive = y[:, None] == y[None, :]
    np.fill_diagonal(positive, False)
    n_pos = positive.sum(axis=1)
    lse = logsumexp(logits, axis=1, keepdims=True)
    if m == 1:  # a single row has an empty denominator; it has no positive either and contributes 0
        lse = np.zeros_like(lse)
    return u, ncache, logits, positive, n_pos, lse, tau, factor


def supcon_forward(z, labels, *, temperature=0.1, base_temperature=None):
    """Supervised contrastive loss L_out (positives averaged outside the log).

    Rows z_1..z_M (views stacked view-major from (B, V, D)) are L2-normalised
    here; s_ij = z_i . z_j / tau, P(i) = {j != i : y_j = y_i}, A(i) = {j != i}::

        L_i = -(tau / tau_b) / |P(i)| sum_{p in P(i)} [ s_ip - log sum_{a in A(i)} exp(s_ia) ]
        L   = 1/M sum_i L_i

    An anchor with no positive contributes 0 but still counts in the mean
    (official behaviour since SupContrast PR #142).  ``base_temperature=None``
    means tau_b = tau (factor 1); the official default tau_b = 0.07 gives the
    factor tau/0.07.  With labels = arange(B) and V = 2 this is ``info_nce``.
    The official code expects z already normalised and does not normalise; on
    normalised input the two agree exactly.  contrast_mode "all" (every row is
    an anchor).

    Shapes: z (B, V, D) with labels (B,), or z (M, D) with labels (M,) ->
    scalar.  ``labels`` (integers) gets no gradient.

    Reference: Khosla et al. 2020, arXiv 2004.11362; HobbitLong/SupContrast
    losses.py (SupConLoss).  Backward: derivations/contrastive_backward.md#supcon.
    """
    u, ncache, logits, positive, n_pos, lse, tau, factor = _common(z, labels, temperature, base_temperature)
    has = n_pos > 0
    pos_logit_sum = np.where(positive, logits, 0).sum(axis=1)
    per_anchor = np.where(has, lse[:, 0] - pos_logit_sum / np.maximum(n_pos, 1), 0.0)
    loss = factor * np.mean(per_anchor)
    target = positive / np.maximum(n_pos, 1)[:, None]
    return V.finite_output(u.dtype.type(loss), "supcon", temperature=tau, base_temperature=base_temperature), (u, ncache, logits, lse, target, has, tau, factor, z.shape)


def _backward(cache, grad_out):
    u, ncache, logits, lse, target, has, tau, factor, shape = cache
    m, dt = u.shape[0], u.dtype
    go = float(V.grad_out(grad_out, (), dt))
    g = np.exp(logits - lse) - target  # softmax over A(i) minus the target distribution of row i
    g *= has[:, None]
    g *= dt.type(factor * go / (m * tau))
    du = (g + g.T) @ u
    return _unstack(l2_normalize_backward(ncache, du)[0], shape), None


def supcon_backward(cache, grad_out):
    """Row i of dL/ds: (tau/tau_b)(softmax_i - 1[P(i)]/|P(i)|)/M, zero for anchors without positives."""
    return _backward(cache, grad_out)


def supcon_in_forward(z, labels, *, temperature=0.1, base_temperature=None):
    """Supervised contrastive loss L_in (positives averaged inside the log).

    Same rows, s_ij, P(i), A(i) and anchor convention as ``supcon``::

        L_i = -(tau / tau_b) log[ 1/|P(i)| sum_{p in P(i)} exp(s_ip) / sum_{a in A(i)} exp(s_ia) ]

    By Jensen L_in <= L_out, with equality when every |P(i)| = 1.  Anchors
    without positives contribute 0 and count in the mean.

    Shapes and gradients as ``supcon``.  Reference: Khosla et al. 2020,
    arXiv 2004.11362 (eq. 2, the "inside" variant; google-research supcon
    losses.py summation_location="inside").  Backward:
    derivations/contrastive_backward.md#supcon_in.
    """
    u, ncache, logits, positive, n_pos, lse, tau, factor = _common(z, labels, temperature, base_temperature)
    has = n_pos > 0
    pos_logits = np.where(positive, logits, -np.inf)
    lse_pos = np.where(has[:, None], logsumexp(np.where(has[:, None], pos_logits, 0), axis=1, keepdims=True), 0)
    per_anchor = np.where(has, lse[:, 0] - lse_pos[:, 0] + np.log(np.maximum(n_pos, 1)), 0.0)
    loss = factor * np.mean(per_anchor)
    # gradient target: softmax restricted to the positives of the row
    target = np.where(positive, np.exp(pos_logits - lse_pos), 0.0)
    return V.finite_output(u.dtype.type(loss), "supcon_in", temperature=tau, base_temperature=base_temperature), (u, ncache, logits, lse, target, has, tau, factor, z.shape)


def supcon_in_backward(cache, grad_out):
    """Row i of dL/ds: (tau/tau_b)(softmax_i - softmax restricted to P(i))/M."""
    return _backward(cache, grad_out)


def _example(rng, dtype=np.float64):
    b, v, d = rng.integers(1, 6), rng.integers(1, 4), rng.integers(2, 8)
    labels = rng.integers(0, max(1, b // 2 + 1), size=b)
    base = rng.standard_normal((b, 1, d))
    z = base + 0.7 * rng.standard_normal((b, v, d))
    return (z.astype(dtype), labels), {"temperature": 0.1}


_REF = "Khosla et al. 2020, arXiv 2004.11362; HobbitLong/SupContrast losses.py (SupConLoss)"
for _name, _fwd, _bwd in (("supcon", supcon_forward, supcon_backward),
                          ("supcon_in", supcon_in_forward, supcon_in_backward)):
    register(
        _name,
        forward=_fwd,
        backward=_bwd,
        example=_example,
        differentiable=(0,),
        reference=_REF,
        derivation=f"derivations/contrastive_backward.md#{_name}",
        hyper_ranges={"temperature": Range(0.05, 5.0), "base_temperature": Range(0.05, 1.0)},
    )
