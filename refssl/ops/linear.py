"""Fully connected layer and flatten."""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas

from .. import validation as V
from ..registry import register
from ._layer_checks import param, upstream


_GEMM = {np.float32: blas.sgemm, np.float64: blas.dgemm}


def _affine(x, w, b):
    """x @ w + b on the last axis of a checked x (..., D_in), as one 2-D GEMM over all leading axes.

    With a bias, the output is first filled with b and the GEMM accumulates into it (BLAS ``gemm`` with
    beta = 1, called on the transposed, column-major view of the row-major output): this saves the separate
    read-modify-write pass of ``out += b`` over the whole output.
    """
    x2 = x.reshape(-1, w.shape[0])
    if b is None:
        out = x2 @ w
    else:
        gemm = _GEMM[x.dtype.type]
        out = np.empty((x2.shape[0], w.shape[1]), x.dtype)
        out[...] = b
        # out^T = w^T x2^T + out^T; f2py writes into out^T in place (it is Fortran-ordered, of gemm's
        # dtype); the returned array is used in any case.
        out = gemm(1.0, w.T, x2.T, beta=1.0, c=out.T, overwrite_c=1).T
    return out.reshape(x.shape[:-1] + (w.shape[1],))


def _affine_backward(x, w, has_b, g, need_dx=True):
    """(dx, dw, db) of :func:`_affine` for an upstream g (..., D_out); leading axes flattened for the GEMMs
    (db as a GEMV with a ones vector: several times faster than numpy's column sum).  ``need_dx=False``
    skips the input gradient (None): a third of the backward's work, for inputs that get no gradient."""
    x2 = x.reshape(-1, w.shape[0])
    g2 = g.reshape(-1, w.shape[1])
    db = np.ones(g2.shape[0], g2.dtype) @ g2 if has_b else None
    dx = (g2 @ w.T).reshape(x.shape) if need_dx else None
    return dx, x2.T @ g2, db


def linear_forward(x, w, b):
    """Affine map of the last axis.

        out = x @ w + b

    Shapes: x (N, D_in) or, more generally, (..., D_in) with at least 2 axes (tokens (B, L, D_in)),
    w (D_in, D_out), b (D_out,) or ``None`` (no bias) -> out (..., D_out).  Every leading position is
    mapped independently by the same weights.  ``w`` is stored input-major (CS231n layout); PyTorch's
    ``nn.Linear.weight`` is its transpose.

    Reference: the affine layer of any MLP, e.g. Goodfellow, Bengio & Courville (2016), ch. 6;
    PyTorch torch/nn/modules/linear.py (``F.linear(x, W, b) = x W^T + b``).
    Backward: derivations/layers_backward.md#linear.
    """
    V.float_array(x, "x", shape_doc="(N, D_in) or (..., D_in)")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, D_in) or (..., D_in) with at least 2 axes, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"x must not be empty, got shape {x.shape}")
    V.float_array(w, "w", ndim=2, shape_doc="(D_in, D_out)")
    V.same_dtype([x, w], ["x", "w"])
    if w.shape[0] != x.shape[-1]:
        raise ValueError(f"w must have shape (D_in, D_out) with D_in = x.shape[-1] = {x.shape[-1]}, "
                         f"got shape {w.shape}")
    if b is not None:
        param(b, "b", (w.shape[1],), "(D_out,)", x)
    return _affine(x, w, b), (x, w, b is not None)


def linear_backward(cache, grad_out, *, need_dx=True):
    """dx = g w^T, dw = x2^T g2, db = sum of g2 over rows (None without bias); x2, g2 = leading axes flattened.

    ``need_dx=False`` returns None for dx without computing it (a module whose input is data, e.g. the
    patch embedding of images)."""
    x, w, has_b = cache
    g = upstream(grad_out, x.shape[:-1] + (w.shape[1],), x.dtype)
    return _affine_backward(x, w, has_b, g, need_dx=V.flag(need_dx, "need_dx"))


def _linear_example(rng, dtype=np.float64):
    lead = (rng.integers(1, 7),) if rng.random() < 0.5 else (rng.integers(1, 4), rng.integers(1, 4))
    d, m = rng.integers(1, 7), rng.integers(1, 7)
    x = rng.standard_normal(lead + (d,)).astype(dtype)
    w = (rng.standard_normal((d, m)) / np.sqrt(d)).astype(dtype)
    b = rng.standard_normal(m).astype(dtype)
    return (x, w, b), {}


register(
    "linear",
    forward=linear_forward,
    backward=linear_backward,
    example=_linear_example,
    differentiable=(0, 1, 2),
    reference="Goodfellow, Bengio & Courville 2016 (Deep Learning) ch. 6; PyTorch torch/nn/modules/linear.py",
    derivation="derivations/layers_backward.md#linear",
)


def flatten_forward(x):
    """Flatten every axis but the batch axis.

        out[n] = x[n].reshape(-1)

    Shapes: x (N, d_1, ..., d_k) -> out (N, d_1 * ... * d_k), C order (PyTorch ``nn.Flatten``).

    Reference: PyTorch torch/nn/modules/flatten.py.  Backward: derivations/layers_backward.md#flatten.
    """
    V.float_array(x, "x", shape_doc="(N, ...)")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, ...) with at least 2 axes, got shape {x.shape}")
    return x.reshape(x.shape[0], -1), (x.shape, x.dtype)


def flatten_backward(cache, grad_out):
    """The upstream gradient reshaped back to the input shape."""
    shape, dtype = cache
    g = upstream(grad_out, (shape[0], int(np.prod(shape[1:]))), dtype)
    return (g.reshape(shape),)


def _flatten_example(rng, dtype=np.float64):
    shape = (rng.integers(1, 4),) + tuple(rng.integers(1, 4, size=rng.integers(1, 4)))
    return (rng.standard_normal(shape).astype(dtype),), {}


register(
    "flatten",
    forward=flatten_forward,
    backward=flatten_backward,
    example=_flatten_example,
    differentiable=(0,),
    reference="PyTorch torch/nn/modules/flatten.py",
    derivation="derivations/layers_backward.md#flatten",
)
