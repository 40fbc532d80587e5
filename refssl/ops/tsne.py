"""SNE and t-SNE objectives on a low-dimensional embedding y, with their classic gradients.

Both are I-Con special cases (a Gaussian or Cauchy q on the embedding against a
fixed p from the data); they are written here directly, as their papers state
them, so that the I-Con composition can be checked against them.
"""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..numerics import log_softmax
from ..registry import register
from .icon_kernels import _centred_distances

__all__ = ["tsne_forward", "tsne_backward", "sne_forward", "sne_backward", "joint_probabilities"]


def _check(y, P, *, joint):
    V.float_array(y, "y", ndim=2, shape_doc="(N, d)")
    V.float_array(P, "P", ndim=2, shape_doc="(N, N)")
    V.same_dtype([y, P], ["y", "P"])
    n = y.shape[0]
    if P.shape != (n, n):
        raise ValueError(f"P must have shape (N, N) = ({n}, {n}) to match y (N, d), got {P.shape}")
    if n < 2:
        raise ValueError(f"y must have shape (N, d) with N >= 2 (a point needs a neighbour), got {y.shape}")
    if (P < 0).any():
        raise ValueError(f"P must be non-negative, got minimum {P.min()}")
    if (np.diagonal(P) != 0).any():
        raise ValueError("P must have a zero diagonal (p_ii is not defined in (t-)SNE)")
    tol = 1e-4
    if joint and abs(float(P.sum(dtype=np.float64)) - 1.0) > tol:
        raise ValueError(f"P must sum to 1 over all entries (joint t-SNE probabilities), got {P.sum()}")
    if not joint and np.any(np.abs(P.sum(axis=1, dtype=np.float64) - 1.0) > tol):
        raise ValueError("P must have rows summing to 1 (conditional probabilities p_{j|i})")


def _pair_gradient(y, m):
    """grad_a of sum_ij m_ij ||y_i - y_j||^2 = 2 sum_j (m + m^T)_aj (y_a - y_j)."""
    s = m + m.T
    return 2.0 * (s.sum(axis=1)[:, None] * y - s @ y)


def tsne_forward(y, P):
    """Joint t-SNE objective KL(P || Q) (van der Maaten & Hinton 2008).

        w_ij = (1 + ||y_i - y_j||^2)^-1 (i != j),  Q_ij = w_ij / sum_{k != l} w_kl
        C = sum_{i != j} P_ij log(P_ij / Q_ij)
        dC/dy_i = 4 sum_j (P_ij - Q_ij) w_ij (y_i - y_j)      (P symmetric)

    Shapes: y (N, d) embedding; P (N, N) joint probabilities (non-negative,
    zero diagonal, summing to 1; usually symmetrised (p_{j|i} + p_{i|j}) / 2N,
    see :func:`joint_probabilities`) -> scalar.  P is a constant (slot None).
    Squared distances are expanded on the centred embedding y - mean(y): C is
    translation-invariant, and a shift of 1e5 then changes it only through the
    rounding of the input itself (tests/test_precision.py).

    Reference: van der Maaten & Hinton, JMLR 9 (2008); Alshammari et al.
    2025, arXiv 2504.16929 (Cor. 1).  Backward: derivations/icon.md#tsne.
    """
    _check(y, P, joint=True)
    n = y.shape[0]
    d, active, yc, _ = _centred_distances(y, y)  # centred first: no cancellation far from the origin
    off = ~np.eye(n, dtype=bool)
    w = np.where(off, 1.0 / (1.0 + d), 0).astype(y.dtype, copy=False)
    z = w.sum()
    logq = np.where(off, -np.log1p(d), 0) - np.log(z)
    pos = P > 0
    loss = np.sum(np.where(pos, P * (np.log(np.where(pos, P, 1)) - logq), 0))
    return y.dtype.type(loss), (yc, P, w, z, active)


def tsne_backward(cache, grad_out):
    """dC/dd_ij = (P_ij - sum(P) Q_ij) w_ij; then the pairwise distance chain rule."""
    y, P, w, z, active = cache
    g = float(V.grad_out(grad_out, (), y.dtype))
    m = (P - P.sum() * (w / z)) * w * active
    return (g * _pair_gradient(y, m)).astype(y.dtype, copy=False), None


def sne_forward(y, P, *, kernel="gaussian"):
    """Conditional SNE: C = sum_i KL(P_i. || Q_i.) (Hinton & Roweis 2002).

        gaussian: q_{j|i} = exp(-||y_i - y_j||^2) / sum_{k != i} exp(-||y_i - y_k||^2)
        cauchy:   q_{j|i} proportional to (1 + ||y_i - y_j||^2)^-1, k != i  (conditional t-SNE)
        dC/dy_i = 2 sum_j (p_{j|i} - q_{j|i} + p_{i|j} - q_{i|j}) (y_i - y_j)   (gaussian)

    Shapes: y (N, d); P (N, N) conditional probabilities p_{j|i} in row i
    (rows sum to 1, zero diagonal) -> scalar.  Note the sum (not mean) over i,
    as in the SNE paper; I-Con's row mean is C / N.  P is a constant (slot None).

    Reference: Hinton & Roweis, NIPS 2002; Alshammari et al. 2025, arXiv
    2504.16929 (Thm 1, Cor. 1).  Backward: derivations/icon.md#sne.
    """
    _check(y, P, joint=False)
    if kernel not in ("gaussian", "cauchy"):
        raise ValueError(f"kernel must be 'gaussian' or 'cauchy', got {kernel!r}")
    n = y.shape[0]
    d, active, yc, _ = _centred_distances(y, y)  # centred first: no cancellation far from the origin
    diag = np.eye(n, dtype=bool)
    logits = -d if kernel == "gaussian" else -np.log1p(d)
    logq = log_softmax(np.where(diag, -np.inf, logits).astype(y.dtype, copy=False), axis=1)
    logq = np.where(diag, 0, logq)
    pos = P > 0
    loss = np.sum(np.where(pos, P * (np.log(np.where(pos, P, 1)) - logq), 0))
    q = np.where(diag, 0, np.exp(logq))
    return y.dtype.type(loss), (yc, P, q, d, active, kernel)


def sne_backward(cache, grad_out):
    """dC/dlogits_ij = q_{j|i} rowsum(P)_i - p_{j|i}; dlogits/dd = -1 (gaussian) or -1/(1+d) (cauchy)."""
    y, P, q, d, active, kernel = cache
    g = float(V.grad_out(grad_out, (), y.dtype))
    dlogits = q * P.sum(axis=1, keepdims=True) - P
    dd = -dlogits if kernel == "gaussian" else -dlogits / (1.0 + d)
    return (g * _pair_gradient(y, dd * active)).astype(y.dtype, copy=False), None


def joint_probabilities(P_conditional):
    """Symmetrised joint probabilities (p_{j|i} + p_{i|j}) / 2N of t-SNE."""
    n = P_conditional.shape[0]
    return (P_conditional + P_conditional.T) / (2.0 * n)


def _conditional_example(rng, n, dtype):
    P = rng.random((n, n)) + 0.1
    P[np.diag_indices(n)] = 0
    return P / P.sum(axis=1, keepdims=True)


def _tsne_example(rng, dtype=np.float64):
    n, dim = int(rng.integers(3, 8)), int(rng.integers(1, 4))  # N = 2: Q = P, zero gradient
    P = joint_probabilities(_conditional_example(rng, n, dtype))
    return (rng.standard_normal((n, dim)).astype(dtype), P.astype(dtype)), {}


def _sne_example(rng, dtype=np.float64):
    n, dim = int(rng.integers(3, 8)), int(rng.integers(1, 4))  # N = 2: Q = P, zero gradient
    kernel = ("gaussian", "cauchy")[int(rng.integers(0, 2))]
    y = rng.standard_normal((n, dim)).astype(dtype)
    return (y, _conditional_example(rng, n, dtype).astype(dtype)), {"kernel": kernel}


register(
    "tsne",
    forward=tsne_forward,
    backward=tsne_backward,
    example=_tsne_example,
    differentiable=(0,),
    reference="van der Maaten & Hinton 2008, JMLR 9; Alshammari et al. 2025, arXiv 2504.16929 (Cor. 1)",
    derivation="derivations/icon.md#tsne",
)

register(
    "sne",
    forward=sne_forward,
    backward=sne_backward,
    example=_sne_example,
    differentiable=(0,),
    reference="Hinton & Roweis 2002 (NIPS); Alshammari et al. 2025, arXiv 2504.16929 (Thm 1)",
    derivation="derivations/icon.md#sne",
)
