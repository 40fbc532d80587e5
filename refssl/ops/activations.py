"""Pointwise activations: ReLU, GELU (exact erf form), logistic sigmoid."""

from __future__ import annotations

import numpy as np
from scipy.special import erf

from .. import validation as V
from ..registry import register
from ._layer_checks import upstream

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _away_from_zero(rng, shape, dtype, margin=0.1):
    """Values with |x| >= margin: keeps finite differences away from the kinks at 0."""
    mag = margin + rng.exponential(1.0, size=shape)
    return (mag * rng.choice([-1.0, 1.0], size=shape)).astype(dtype)


def _example(rng, dtype=np.float64):
    shape = (rng.integers(1, 6), rng.integers(1, 7))
    return (_away_from_zero(rng, shape, dtype),), {}


def relu_forward(x):
    """Rectified linear unit, elementwise.

        out = max(x, 0)

    Shapes: x (N, ...) -> out, same shape.  The derivative at exactly 0 is taken as 0 (PyTorch's choice).

    Reference: Nair & Hinton 2010 (ICML), "Rectified linear units improve restricted Boltzmann machines";
    PyTorch torch/nn/modules/activation.py (ReLU).  Backward: derivations/layers_backward.md#relu.
    """
    V.float_array(x, "x", min_ndim=1, shape_doc="(N, ...)")
    mask = x > 0
    return x * mask, (mask, x.dtype)


def relu_backward(cache, grad_out):
    """dx = g * [x > 0]."""
    mask, dtype = cache
    return (upstream(grad_out, mask.shape, dtype) * mask,)


register(
    "relu",
    forward=relu_forward,
    backward=relu_backward,
    example=_example,
    differentiable=(0,),
    reference="Nair & Hinton 2010 (ICML); PyTorch torch/nn/modules/activation.py (ReLU)",
    derivation="derivations/layers_backward.md#relu",
)


def gelu_forward(x):
    """Gaussian error linear unit, exact (erf) form, elementwise.

        out = x * Phi(x) = x/2 * (1 + erf(x / sqrt(2)))

    Shapes: x (N, ...) -> out, same shape.  This is PyTorch's default ``approximate='none'``; the tanh
    approximation (``approximate='tanh'``) differs by up to about 5e-4 and is not used.

    Reference: Hendrycks & Gimpel 2016, arXiv 1606.08415; PyTorch torch/nn/modules/activation.py (GELU).
    Backward: derivations/layers_backward.md#gelu.
    """
    V.float_array(x, "x", min_ndim=1, shape_doc="(N, ...)")
    cdf = 0.5 * (1.0 + erf(x * x.dtype.type(_INV_SQRT2)))
    return x * cdf, (x, cdf)


def gelu_backward(cache, grad_out):
    """dx = g * (Phi(x) + x phi(x)), phi the standard normal density."""
    x, cdf = cache
    g = upstream(grad_out, x.shape, x.dtype)
    pdf = x.dtype.type(_INV_SQRT_2PI) * np.exp(-0.5 * x * x)
    return (g * (cdf + x * pdf),)


def _gelu_example(rng, dtype=np.float64):
    shape = (rng.integers(1, 6), rng.integers(1, 7))
    return (rng.standard_normal(shape).astype(dtype) * 2,), {}


register(
    "gelu",
    forward=gelu_forward,
    backward=gelu_backward,
    example=_gelu_example,
    differentiable=(0,),
    reference="Hendrycks & Gimpel 2016, arXiv 1606.08415; PyTorch torch/nn/modules/activation.py (GELU)",
    derivation="derivations/layers_backward.md#gelu",
)


def sigmoid_forward(x):
    """Logistic sigmoid, elementwise (the output layer of the autoencoder decoder).

        out = 1 / (1 + exp(-x))

    Computed as exp(min(x, 0)) / (1 + exp(-|x|)), which never exponentiates a large positive number.
    Shapes: x (N, ...) -> out, same shape.

    Reference: PyTorch torch/nn/modules/activation.py (Sigmoid).  Backward: derivations/layers_backward.md#sigmoid.
    """
    V.float_array(x, "x", min_ndim=1, shape_doc="(N, ...)")
    e = np.exp(-np.abs(x))
    out = np.where(x >= 0, 1.0, e) / (1.0 + e)
    return out.astype(x.dtype, copy=False), out.astype(x.dtype, copy=False)


def sigmoid_backward(cache, grad_out):
    """dx = g * s (1 - s)."""
    s = cache
    return (upstream(grad_out, s.shape, s.dtype) * s * (1.0 - s),)


register(
    "sigmoid",
    forward=sigmoid_forward,
    backward=sigmoid_backward,
    example=_gelu_example,
    differentiable=(0,),
    reference="PyTorch torch/nn/modules/activation.py (Sigmoid)",
    derivation="derivations/layers_backward.md#sigmoid",
)
