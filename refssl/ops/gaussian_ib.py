"""The Gaussian Information Bottleneck objective of the Barlow Twins appendix."""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from .. import validation as V
from ..registry import Range, register
from .standardize import DEFAULT_EPS as BN_EPS
from .standardize import standardize, standardize_backward


def _logdet_chol(a, name):
    """log|A| of a symmetric positive-definite A via Cholesky, and the factor for solves."""
    try:
        cf = cho_factor(a, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise ValueError(f"{name} is not positive definite in floating point; increase eps") from None
    return 2.0 * float(np.sum(np.log(np.diag(cf[0])))), cf


def gaussian_ib_forward(z1, z2, *, beta=2.0, eps=1e-4, standardize_views=True):
    """Gaussian Information Bottleneck objective from two views of each sample.

        IB = log|S_{Z|X}| + ((1 - beta) / beta) * log|S_Z|

    with the batch estimators (s_k = standardised view k, see below)
        S_{Z|X} = (1 / 2N) sum_n (s1_n - s2_n)(s1_n - s2_n)^T + eps I
            (two views of one sample give the unbiased within-sample covariance
             (a - b)(a - b)^T / 2; averaged over samples = pooled, homoscedastic
             estimate of the conditional covariance)
        S_Z     = (1 / 2N) sum over the 2N rows of [s1; s2] of (s - m)(s - m)^T + eps I
            (biased covariance of both views pooled, m = their mean).

    Shapes: z1, z2 (N, D) -> scalar.  ``standardize_views=True`` (default)
    first standardises each view per dimension (affine-free BatchNorm, biased
    variance, eps 1e-5, as in Barlow Twins), which makes S_Z a correlation
    matrix and removes the trivial scale collapse of the raw objective;
    ``False`` uses z1, z2 as given.  ``eps`` > 0 is a ridge that keeps both
    log-determinants finite: identical views give log|S_{Z|X}| = D log eps, and
    collapsed (constant) columns are finite too.  beta > 1 is the non-collapse
    regime ((1 - beta)/beta = -lambda with lambda = (beta - 1)/beta in (0, 1));
    for beta <= 1 a constant representation is a minimiser.  The appendix gives
    no value of beta; the default 2.0 weighs both entropies equally.
    Log-determinants use a Cholesky factorisation and are accumulated in
    float64 (a near-singular covariance loses digits in float32); the output
    and gradients have the input dtype.

    Reference: Zbontar et al. 2021, arXiv 2103.03230, Appendix A (IB
    derivation); Tishby et al. 1999 (physics/0004057).  Backward:
    derivations/ib_connection.md#gaussian_ib.
    """
    V.float_array(z1, "z1", ndim=2, shape_doc="(N, D)")
    V.float_array(z2, "z2", ndim=2, shape_doc="(N, D)")
    V.same_shape((z1, z2), ("z1", "z2"))
    V.same_dtype((z1, z2), ("z1", "z2"))
    beta = V.positive(beta, "beta")
    eps = V.positive(eps, "eps")
    standardize_views = V.flag(standardize_views, "standardize_views")
    n, d = z1.shape
    a, b = z1.astype(np.float64), z2.astype(np.float64)
    if standardize_views:
        s1, sig1 = standardize(a, BN_EPS)
        s2, sig2 = standardize(b, BN_EPS)
        norm = ((s1, sig1), (s2, sig2))
    else:
        s1, s2, norm = a, b, None
    delta = s1 - s2
    cond = delta.T @ delta / (2 * n)
    cond[np.diag_indices(d)] += eps
    both = np.concatenate([s1, s2], axis=0)
    both -= both.mean(axis=0, keepdims=True)
    marg = both.T @ both / (2 * n)
    marg[np.diag_indices(d)] += eps
    ld_c, cf_c = _logdet_chol(cond, "the conditional covariance S_{Z|X}")
    ld_m, cf_m = _logdet_chol(marg, "the marginal covariance S_Z")
    coef = (1.0 - beta) / beta
    loss = ld_c + coef * ld_m
    return V.finite_output(z1.dtype.type(loss), "gaussian_ib", beta=beta, eps=eps), (delta, both, cf_c, cf_m, coef, norm, z1.dtype)


def gaussian_ib_backward(cache, grad_out):
    """d log|S| / dS = S^{-1}; with S = X^T X / (2N) + eps I, d/dX = X S^{-1} / N (Cholesky solves)."""
    delta, both, cf_c, cf_m, coef, norm, dtype = cache
    n = delta.shape[0]
    go = float(V.grad_out(grad_out, (), dtype))
    g_delta = cho_solve(cf_c, delta.T, check_finite=False).T * (go / n)
    g_both = cho_solve(cf_m, both.T, check_finite=False).T * (coef * go / n)
    g1 = g_delta + g_both[:n]  # centring of [s1; s2] needs no term: columns of X S^{-1} have zero mean
    g2 = g_both[n:] - g_delta
    if norm is not None:
        (s1, sig1), (s2, sig2) = norm
        g1 = standardize_backward(s1, sig1, g1)
        g2 = standardize_backward(s2, sig2, g2)
    return g1.astype(dtype, copy=False), g2.astype(dtype, copy=False)


def _example(rng, dtype=np.float64):
    # N > D keeps both covariances well conditioned, so central differences stay accurate
    d = int(rng.integers(1, 5))
    n = d + int(rng.integers(3, 8))
    base = rng.standard_normal((n, d))
    z1 = base + 0.6 * rng.standard_normal((n, d))
    z2 = 1.5 * base + 0.6 * rng.standard_normal((n, d)) - 0.5
    kw = {} if rng.uniform() < 0.7 else {"standardize_views": False}
    return (z1.astype(dtype), z2.astype(dtype)), kw


register(
    "gaussian_ib",
    forward=gaussian_ib_forward,
    backward=gaussian_ib_backward,
    example=_example,
    differentiable=(0, 1),
    reference="Zbontar et al. 2021, arXiv 2103.03230, Appendix A; Tishby, Pereira & Bialek 1999, "
              "arXiv physics/0004057",
    derivation="derivations/ib_connection.md#gaussian_ib",
    hyper_ranges={"beta": Range(0.25, 4.0), "eps": Range(1e-4, 1e-1)},
)
