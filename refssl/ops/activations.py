"""Pointwise activations: ReLU, GELU (exact erf form), logistic sigmoid."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from .. import validation as V
from .._blocks import map_batch_split, map_row_blocks
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


_RELU_CHUNK = 1 << 18  # bytes per pass of the backward: its boolean temporary stays in cache


def relu_forward(x):
    """Rectified linear unit, elementwise.

        out = max(x, 0)

    Shapes: x (N, ...) -> out, same shape and memory layout (a channels-last view in, a channels-last
    array out).  The derivative at exactly 0 is taken as 0 (PyTorch's choice).  The cache is the output
    itself (the backward needs only its sign), so the caller must not modify the returned array in place
    before the backward.  The batch is split over the threads.

    Reference: Nair & Hinton 2010 (ICML), "Rectified linear units improve restricted Boltzmann machines";
    PyTorch torch/nn/modules/activation.py (ReLU).  Backward: derivations/layers_backward.md#relu.
    """
    V.float_array(x, "x", min_ndim=1, shape_doc="(N, ...)")
    out = np.empty_like(x)  # same axis order as x
    map_batch_split(lambda s, e: np.maximum(x[s:e], 0, out=out[s:e]), len(x), x.size)
    return out, out


def relu_backward(cache, grad_out):
    """dx = g * [out > 0]  (out > 0 exactly where x > 0)."""
    out = cache
    g = upstream(grad_out, out.shape, out.dtype)
    dx = np.empty_like(out)
    per = max(1, _RELU_CHUNK // max(1, out[0].nbytes))  # samples per pass

    def part(s, e):
        for a in range(s, e, per):
            b = min(a + per, e)
            np.multiply(g[a:b], out[a:b] > 0, out=dx[a:b])

    map_batch_split(part, len(out), out.size)
    return (dx,)


register(
    "relu",
    forward=relu_forward,
    backward=relu_backward,
    example=_example,
    differentiable=(0,),
    reference="Nair & Hinton 2010 (ICML); PyTorch torch/nn/modules/activation.py (ReLU)",
    derivation="derivations/layers_backward.md#relu",
)


# erf(x) ~ tanh(x P(x^2)) on |x| <= 3.9 (clamped beyond, where erf rounds to +-1 in float32): P of degree 6,
# fitted by refssl to atanh(erf(x)) / x with weighted least squares (weights (1 - erf^2) x, the sensitivity
# of erf to an error in the tanh argument).  P(0) = 2/sqrt(pi), erf's slope at 0.  Max |error| 1.6e-7
# over the real line in float32 arithmetic (tests/test_fast_erf.py checks it), a few float32 ulps.
# P > 1.12 on [0, 15.21] and x P(x^2) > 9.2 at the clamp |x| = 3.9, where tanh is 1 in float32: clamping
# x^2 (one cheap minimum) rather than x gives the same values and keeps the sign of x in the last factor.
_ERF_TANH_POLY = (1.128380163986608, 0.10276229783720513, -0.00017842173409585163, -0.000630092912303675,
                  9.113736234489552e-05, -6.191285161028017e-06, 1.695952269850084e-07)
_ERF_CLAMP = 3.9
# GELU needs erf(x / sqrt 2) = tanh(x Q(x^2)) with Q(s) = P(s / 2) / sqrt 2: the scaling of x is folded into
# the coefficients (q_k = p_k / (sqrt 2 2^k)), and the clamp becomes x^2 <= 2 * 3.9^2.
_PHI_TANH_POLY = tuple(c / (math.sqrt(2.0) * 2.0 ** k) for k, c in enumerate(_ERF_TANH_POLY))
_CHUNK = 1 << 16  # elements per pass: the Horner temporaries stay in cache


def erf_float32(x: np.ndarray) -> np.ndarray:
    """erf of a float32 array, about 8x faster than ``scipy.special.erf`` (which evaluates float32 through a
    scalar loop), with max absolute error 1.6e-7.  float64 callers use scipy's erf."""
    out = np.empty_like(x)
    xf, of = x.reshape(-1), out.reshape(-1)
    t = np.empty(min(_CHUNK, xf.size), np.float32)
    for s in range(0, xf.size, _CHUNK):
        n = min(_CHUNK, xf.size - s)
        _tanh_poly_chunk(xf[s:s + n], of[s:s + n], t[:n], _ERF_TANH_POLY, _ERF_CLAMP ** 2)
    return out


def _tanh_poly_chunk(x, out, t, coeffs, t_max):
    """out = tanh(x Q(min(x^2, t_max))) for a float32 chunk, Q the polynomial with ``coeffs`` (constant
    first); ``t`` is scratch of x's size, ``x`` is only read.  Horner's scheme, two passes per degree."""
    c = [np.float32(v) for v in coeffs]
    with np.errstate(over="ignore"):  # x^2 and x Q of huge finite x overflow to inf: tanh(+-inf) = +-1
        np.square(x, out=t)
        np.minimum(t, np.float32(t_max), out=t)
        np.multiply(t, c[-1], out=out)
        for k in range(len(c) - 2, 0, -1):
            out += c[k]
            out *= t
        out += c[0]
        out *= x
    np.tanh(out, out=out)


def _erf(x):
    return erf_float32(x) if x.dtype == np.float32 else erf(x)


_GELU_BLOCK = 4 * _CHUNK  # elements per thread-pool task: a few cache-sized chunks, so the task overhead is small


def _gelu_map(fn, size):
    """Run ``fn(s, e)`` over [0, size) in cache-sized chunks, blocks of chunks spread over refssl's thread
    pool (numpy releases the GIL in the elementwise loops, so both cores work)."""
    def block(a, b):
        for s in range(a, b, _CHUNK):
            fn(s, min(s + _CHUNK, b))
    map_row_blocks(block, size, block=_GELU_BLOCK)


def gelu_forward(x):
    """Gaussian error linear unit, exact (erf) form, elementwise.

        out = x * Phi(x) = x/2 * (1 + erf(x / sqrt(2)))

    Shapes: x (N, ...) -> out, same shape.  This is PyTorch's default ``approximate='none'``; the tanh
    approximation (``approximate='tanh'``) differs by up to about 5e-4 and is not used.  float64 uses
    scipy's erf; float32 the fitted erf of :func:`erf_float32` (max error 1.6e-7, a few float32 ulps),
    with the 1/sqrt(2) folded into its coefficients.

    Reference: Hendrycks & Gimpel 2016, arXiv 1606.08415; PyTorch torch/nn/modules/activation.py (GELU).
    Backward: derivations/layers_backward.md#gelu.
    """
    V.float_array(x, "x", min_ndim=1, shape_doc="(N, ...)")
    dt = x.dtype.type
    half, inv_sqrt2 = dt(0.5), dt(_INV_SQRT2)
    xf = np.ascontiguousarray(x).reshape(-1)
    cdf, out = np.empty_like(xf), np.empty_like(xf)
    f32 = x.dtype == np.float32
    t_max = 2.0 * _ERF_CLAMP ** 2

    # Chunk by chunk, so the temporaries stay in cache: cdf = 1/2 + 1/2 erf(x / sqrt 2), out = x cdf.
    def chunk(s, e):
        xs, cs, os_ = xf[s:e], cdf[s:e], out[s:e]
        if f32:
            _tanh_poly_chunk(xs, cs, os_, _PHI_TANH_POLY, t_max)  # out's slot as scratch until the last step
        else:
            erf(np.multiply(xs, inv_sqrt2, out=os_), out=cs)
        cs *= half
        cs += half
        np.multiply(xs, cs, out=os_)

    _gelu_map(chunk, xf.size)
    return out.reshape(x.shape), (x, cdf.reshape(x.shape))


def gelu_backward(cache, grad_out):
    """dx = g * (Phi(x) + x phi(x)), phi the standard normal density."""
    x, cdf = cache
    g = upstream(grad_out, x.shape, x.dtype)
    dt = x.dtype.type
    xf, cf = np.ascontiguousarray(x).reshape(-1), cdf.reshape(-1)
    gf = np.ascontiguousarray(g).reshape(-1)
    dx = np.empty_like(xf)
    neg_half, c = dt(-0.5), dt(_INV_SQRT_2PI)

    # One pass per chunk, in dx's slot: x phi(x) + Phi(x), times g.
    def chunk(s, e):
        xs, t = xf[s:e], dx[s:e]
        np.square(xs, out=t)
        t *= neg_half
        np.exp(t, out=t)
        t *= c
        t *= xs
        t += cf[s:e]
        t *= gf[s:e]

    _gelu_map(chunk, xf.size)
    return (dx.reshape(x.shape),)


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
