"""Alignment and uniformity on the hypersphere (Wang & Isola 2020)."""

from __future__ import annotations

import math

import numpy as np

from .. import validation as V
from ..numerics import logsumexp
from ..registry import Range, register

__all__ = ["alignment_forward", "alignment_backward", "uniformity_forward", "uniformity_backward"]


def alignment_forward(x, y, *, alpha=2):
    """Alignment loss: mean distance between positive pairs.

        L_align = 1/N sum_i ||x_i - y_i||_2^alpha

    Shapes: x, y (N, D) -> scalar.  As in the official code the inputs are
    used as given: pass L2-normalised embeddings (``l2_normalize``) to measure
    alignment on the sphere.  Both inputs get gradients.  For alpha <= 1 the
    gradient at x_i = y_i is taken as 0 (a subgradient).

    Reference: Wang & Isola 2020, arXiv 2005.10242; SsnL/align_uniform
    (align_loss).  Backward: derivations/contrastive_backward.md#alignment.
    """
    V.float_array(x, "x", ndim=2, shape_doc="(N, D)")
    V.float_array(y, "y", ndim=2, shape_doc="(N, D)")
    V.same_shape([x, y], ["x", "y"])
    V.same_dtype([x, y], ["x", "y"])
    a = V.positive(alpha, "alpha")
    diff = x - y
    dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    dmax = float(dist.max())
    if dmax > 1 and a * math.log(dmax) > math.log(float(np.finfo(x.dtype).max) / x.shape[0]):
        raise ValueError(f"alpha = {a:g} is too large for these inputs: the largest distance {dmax:.4g} "
                         f"raised to alpha overflows {x.dtype}")
    loss = np.mean(dist ** a)
    return V.finite_output(x.dtype.type(loss), "alignment", alpha=a), (diff, dist, a)


def alignment_backward(cache, grad_out):
    """dL/dx_i = (g alpha / N) ||d_i||^(alpha-2) d_i = -dL/dy_i, with d_i = x_i - y_i."""
    diff, dist, a = cache
    n, dt = diff.shape[0], diff.dtype
    go = float(V.grad_out(grad_out, (), dt))
    safe = np.where(dist > 0, dist, 1)
    coef = np.where(dist > 0, safe ** (a - 2), 0.0) * (go * a / n)
    dx = (coef[:, None] * diff).astype(dt, copy=False)
    return dx, -dx


def uniformity_forward(x, *, t=2):
    """Uniformity loss: log of the mean Gaussian potential over unique pairs.

        L_unif = log[ 2/(N(N-1)) sum_{i<j} exp(-t ||x_i - x_j||^2) ]

    Unique pairs only (no self-pairs, no ordered duplicates), as the official
    ``torch.pdist`` version.  Evaluated as a log-sum-exp over pairs, so large t
    cannot underflow to log(0).  Shapes: x (N, D) with N >= 2 -> scalar; pass
    L2-normalised embeddings to measure uniformity on the sphere.

    Reference: Wang & Isola 2020, arXiv 2005.10242; SsnL/align_uniform
    (uniform_loss).  Backward: derivations/contrastive_backward.md#uniformity.
    """
    V.float_array(x, "x", ndim=2, shape_doc="(N, D)", min_rows=2)
    tt = V.positive(t, "t")
    n = x.shape[0]
    iu = np.triu_indices(n, k=1)
    diff = x[iu[0]] - x[iu[1]]  # direct differences: no cancellation for close points
    sq = np.einsum("ij,ij->i", diff, diff)
    a = -tt * sq
    lse = logsumexp(a)
    loss = lse - math.log(n * (n - 1) / 2)
    return V.finite_output(x.dtype.type(loss), "uniformity", t=tt), (x, iu, diff, a, lse, tt)


def uniformity_backward(cache, grad_out):
    """With pair weights w = softmax over pairs of -t D: dL/dx_i = -2t sum_j w_ij (x_i - x_j)."""
    x, iu, diff, a, lse, tt = cache
    w = np.exp(a - lse) * (-2.0 * tt * float(V.grad_out(grad_out, (), x.dtype)))
    contrib = w[:, None] * diff  # gradient on x_i of pair (i, j); x_j receives the negative
    dx = np.zeros_like(x)
    np.add.at(dx, iu[0], contrib)
    np.subtract.at(dx, iu[1], contrib)
    return (dx,)


def _pair_example(rng, dtype=np.float64):
    n, d = rng.integers(1, 7), rng.integers(2, 8)
    x = rng.standard_normal((n, d))
    y = x + 0.5 * rng.standard_normal((n, d))
    return (x.astype(dtype), y.astype(dtype)), {"alpha": 2}


def _unif_example(rng, dtype=np.float64):
    n, d = rng.integers(2, 8), rng.integers(2, 6)
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x.astype(dtype),), {"t": 2}


register(
    "alignment",
    forward=alignment_forward,
    backward=alignment_backward,
    example=_pair_example,
    differentiable=(0, 1),
    reference="Wang & Isola 2020, arXiv 2005.10242; SsnL/align_uniform (align_loss)",
    derivation="derivations/contrastive_backward.md#alignment",
    hyper_ranges={"alpha": Range(0.5, 4.0)},
)
register(
    "uniformity",
    forward=uniformity_forward,
    backward=uniformity_backward,
    example=_unif_example,
    differentiable=(0,),
    reference="Wang & Isola 2020, arXiv 2005.10242; SsnL/align_uniform (uniform_loss)",
    derivation="derivations/contrastive_backward.md#uniformity",
    hyper_ranges={"t": Range(0.1, 10.0)},
)
