"""Per-dimension standardisation along the batch (affine-free BatchNorm in training mode).

The building block of Barlow Twins and its HSIC variant: every column of a view
is centred and divided by its batch standard deviation.  The helpers
``standardize`` / ``standardize_backward`` are shared with
:mod:`refssl.ops.redundancy` and :mod:`refssl.ops.gaussian_ib`.
"""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..registry import Range, register

DEFAULT_EPS = 1e-5  # torch.nn.BatchNorm1d default, used by the official Barlow Twins code


def standardize(x, eps, *, ddof=0, on_zero=None):
    """(x - mean) / sqrt(var + eps) per column; returns (xhat, sigma) with sigma of shape (1, D).

    ``ddof=0`` is the biased variance of BatchNorm; ``ddof=1`` with ``eps=0``
    is torch's ``(x - x.mean(0)) / x.std(0)``.  With ``eps=0`` a constant
    column has sigma = 0: ``on_zero(columns)`` is called before any division
    (it should raise).
    """
    n = x.shape[0]
    xc = x - np.mean(x, axis=0, keepdims=True)
    var = np.einsum("nd,nd->d", xc, xc)[None, :] / x.dtype.type(n - ddof)
    sigma = np.sqrt(var + x.dtype.type(eps))
    if eps == 0 and on_zero is not None and np.any(sigma == 0):
        on_zero(np.flatnonzero(sigma.ravel() == 0))
    xc /= sigma  # xc is a fresh array: dividing in place saves an (N, D) temporary
    return xc, sigma


def standardize_backward(xhat, sigma, g, *, ddof=0, work=None, centered=False):
    """Backward of :func:`standardize`: (g - mean(g) - xhat * sum(g*xhat)/(N - ddof)) / sigma.

    Exact for any eps (derivations/ib_connection.md#batch_standardize).  ``g``
    is consumed (overwritten) and returned; ``work`` is an optional scratch
    array of g's shape and dtype.  Fresh (N, D) buffers cost page faults that
    are a visible share of the run time at N = 256, D = 2048.  ``centered=True``
    skips the mean subtraction when the caller knows that the columns of g
    already have zero mean.
    """
    n = xhat.shape[0]
    proj = np.einsum("nd,nd->d", g, xhat) / g.dtype.type(n - ddof)
    proj /= sigma.ravel()
    if not centered:
        g -= np.mean(g, axis=0, keepdims=True)
    g /= sigma
    g -= np.multiply(xhat, proj, out=work)
    return g


def batch_standardize_forward(x, *, eps=DEFAULT_EPS):
    """Per-dimension standardisation along the batch (affine-free BatchNorm, training mode).

        mu_d = (1/N) sum_n x_nd,   var_d = (1/N) sum_n (x_nd - mu_d)^2   (biased)
        y_nd = (x_nd - mu_d) / sqrt(var_d + eps)

    Shapes: x (N, D) -> y (N, D).  eps = 1e-5 as in ``torch.nn.BatchNorm1d``.
    A constant (collapsed) column has var = 0 and maps to a column of zeros: a
    finite value (never NaN) because eps > 0, which is why eps must be > 0.

    Reference: Ioffe & Szegedy 2015 (arXiv 1502.03167); used without affine
    parameters by Zbontar et al. 2021 (arXiv 2103.03230),
    facebookresearch/barlowtwins main.py.  Backward:
    derivations/ib_connection.md#batch_standardize.
    """
    V.float_array(x, "x", ndim=2, shape_doc="(N, D)")
    eps = V.positive(eps, "eps")
    y, sigma = standardize(x, eps)
    return y, (y, sigma)


def batch_standardize_backward(cache, grad_out):
    """dL/dx = (g - mean_n g - y * mean_n(g * y)) / sqrt(var + eps), column-wise."""
    y, sigma = cache
    g = V.grad_out(grad_out, y.shape, y.dtype, copy=True)  # a copy: standardize_backward works in place
    return (standardize_backward(y, sigma, g),)


def _example(rng, dtype=np.float64):
    n, d = int(rng.integers(3, 9)), int(rng.integers(1, 7))  # N = 2 standardises to +-1: gradient ~ eps
    scale = rng.uniform(0.5, 2.0, size=d)
    x = rng.standard_normal((n, d)) * scale + rng.standard_normal(d)
    return (x.astype(dtype),), {}


register(
    "batch_standardize",
    forward=batch_standardize_forward,
    backward=batch_standardize_backward,
    example=_example,
    differentiable=(0,),
    reference="Ioffe & Szegedy 2015, arXiv 1502.03167 (BatchNorm1d, affine=False, training mode); "
              "as used in facebookresearch/barlowtwins main.py",
    derivation="derivations/ib_connection.md#batch_standardize",
    hyper_ranges={"eps": Range(1e-6, 1e-1)},
)
