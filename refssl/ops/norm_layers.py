"""Batch normalisation (train and eval mode) and layer normalisation."""

from __future__ import annotations

import numpy as np

from .. import validation as V
from .._blocks import map_row_blocks
from ..registry import Range, register
from ._layer_checks import param, upstream

DEFAULT_EPS = 1e-5
DEFAULT_MOMENTUM = 0.1
_LN_BLOCK_BYTES = 1 << 20  # layer-norm block: 1 MiB of rows, cache-resident across the fused steps


def _ln_rows(d: int, itemsize: int) -> int:
    """Rows per layer-norm block.  Large blocks: each holds ~10 numpy calls, and with 256-row blocks the
    per-call overhead, not the arithmetic, was most of a ViT layer norm (5.7 -> 2.0 ms forward at
    8320 x 128 float32, 2 threads, with 2048-row blocks)."""
    return max(16, _LN_BLOCK_BYTES // (d * itemsize))


def _bn_layout(x):
    """Reduction axes and broadcast shape of per-channel vectors for (N, C) or (N, C, H, W) input."""
    V.float_array(x, "x", shape_doc="(N, C) or (N, C, H, W)")
    if x.ndim == 2:
        return (0,), (1, x.shape[1])
    if x.ndim == 4:
        return (0, 2, 3), (1, x.shape[1], 1, 1)
    raise ValueError(f"x must have shape (N, C) or (N, C, H, W), got shape {x.shape}")


def batch_norm_forward(x, gamma, beta, *, eps=DEFAULT_EPS):
    """Batch normalisation in training mode (statistics of the current batch).

        mu_c = mean of x over every axis but the channel axis,  var_c = biased variance (divide by M),
        out = gamma_c (x - mu_c) / sqrt(var_c + eps) + beta_c

    Shapes: x (N, C) or (N, C, H, W) (per-channel statistics over N, H, W), gamma (C,), beta (C,) -> out
    like x.  M = N*H*W must be >= 2.  The running statistics are not touched here: read the batch
    statistics with :func:`batch_norm_batch_stats` and update them with the pure
    :func:`batch_norm_update_running` (PyTorch convention: momentum 0.1, unbiased batch variance).

    Reference: Ioffe & Szegedy 2015, arXiv 1502.03167 (Algorithm 1); PyTorch torch/nn/modules/batchnorm.py.
    Backward: derivations/layers_backward.md#batch_norm.
    """
    axes, bshape = _bn_layout(x)
    c = x.shape[1]
    param(gamma, "gamma", (c,), "(C,)", x)
    param(beta, "beta", (c,), "(C,)", x)
    eps = V.positive(eps, "eps")
    m = x.size // c
    if m < 2:
        raise ValueError(f"x must have at least 2 values per channel in training mode (N*H*W >= 2), "
                         f"got shape {x.shape}")
    mu = x.mean(axis=axes, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + x.dtype.type(eps))
    xhat = xc * inv_std
    out = xhat * gamma.reshape(bshape) + beta.reshape(bshape)
    return out, (xhat, inv_std, gamma, axes, bshape, mu, var, m)


def batch_norm_backward(cache, grad_out):
    """dx = (gamma/sigma) (g - mean(g) - xhat mean(g xhat)); dgamma = sum g xhat; dbeta = sum g."""
    xhat, inv_std, gamma, axes, bshape, _, _, _ = cache
    g = upstream(grad_out, xhat.shape, xhat.dtype)
    dbeta = g.sum(axis=axes)
    dgamma = np.sum(g * xhat, axis=axes)
    m = xhat.size // xhat.shape[1]
    # Means of g and g*xhat per channel: the two directions the batch statistics remove.
    dx = (gamma.reshape(bshape) * inv_std) * (
        g - dbeta.reshape(bshape) / m - xhat * (dgamma.reshape(bshape) / m))
    return dx, dgamma, dbeta


def batch_norm_batch_stats(cache):
    """(mean, unbiased variance) per channel of the batch a training-mode forward saw, shapes (C,)."""
    _, _, _, _, _, mu, var, m = cache
    return mu.reshape(-1), var.reshape(-1) * (m / (m - 1))


def batch_norm_update_running(running_mean, running_var, batch_mean, batch_var, *,
                              momentum=DEFAULT_MOMENTUM):
    """New running statistics (pure: returns new arrays, the inputs are untouched).

        running <- (1 - momentum) * running + momentum * batch

    PyTorch's convention (``momentum=0.1``, ``batch_var`` the unbiased variance); TensorFlow's
    ``momentum=0.99`` corresponds to 0.01 here.
    """
    momentum = V.in_range(momentum, "momentum", 0.0, 1.0)
    new_mean = (1.0 - momentum) * running_mean + momentum * batch_mean
    new_var = (1.0 - momentum) * running_var + momentum * batch_var
    return new_mean.astype(running_mean.dtype, copy=False), new_var.astype(running_var.dtype, copy=False)


def _bn_example(rng, dtype=np.float64):
    c = int(rng.integers(1, 5))
    if rng.random() < 0.5:
        shape = (int(rng.integers(2, 7)), c)
    else:
        shape = (int(rng.integers(1, 4)), c, int(rng.integers(1, 4)), int(rng.integers(2, 4)))
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    return (x, gamma, beta), {"eps": 1e-5}


register(
    "batch_norm",
    forward=batch_norm_forward,
    backward=batch_norm_backward,
    example=_bn_example,
    differentiable=(0, 1, 2),
    reference="Ioffe & Szegedy 2015, arXiv 1502.03167; PyTorch torch/nn/modules/batchnorm.py",
    derivation="derivations/layers_backward.md#batch_norm",
    hyper_ranges={"eps": Range(1e-5, 1e-1)},
)


def batch_norm_eval_forward(x, gamma, beta, running_mean, running_var, *, eps=DEFAULT_EPS):
    """Batch normalisation in evaluation mode (fixed running statistics): an affine map per channel.

        out = gamma_c (x - running_mean_c) / sqrt(running_var_c + eps) + beta_c

    Shapes: x (N, C) or (N, C, H, W); gamma, beta, running_mean, running_var (C,) -> out like x.
    ``running_mean`` and ``running_var`` (>= 0) are buffers, not parameters: their gradient slots are None.

    Reference: Ioffe & Szegedy 2015, arXiv 1502.03167 (Algorithm 2); PyTorch torch/nn/modules/batchnorm.py.
    Backward: derivations/layers_backward.md#batch_norm_eval.
    """
    _, bshape = _bn_layout(x)
    c = x.shape[1]
    param(gamma, "gamma", (c,), "(C,)", x)
    param(beta, "beta", (c,), "(C,)", x)
    param(running_mean, "running_mean", (c,), "(C,)", x)
    param(running_var, "running_var", (c,), "(C,)", x)
    if np.any(running_var < 0):
        raise ValueError("running_var must be >= 0")
    eps = V.positive(eps, "eps")
    inv_std = (1.0 / np.sqrt(running_var + x.dtype.type(eps))).reshape(bshape)
    xhat = (x - running_mean.reshape(bshape)) * inv_std
    out = xhat * gamma.reshape(bshape) + beta.reshape(bshape)
    return out, (xhat, inv_std, gamma, bshape)


def batch_norm_eval_backward(cache, grad_out):
    """dx = g gamma / sigma; dgamma = sum g xhat; dbeta = sum g; no gradient for the running statistics."""
    xhat, inv_std, gamma, bshape = cache
    g = upstream(grad_out, xhat.shape, xhat.dtype)
    axes = (0,) if xhat.ndim == 2 else (0, 2, 3)
    return (g * (gamma.reshape(bshape) * inv_std), np.sum(g * xhat, axis=axes), g.sum(axis=axes),
            None, None)


def _bn_eval_example(rng, dtype=np.float64):
    (x, gamma, beta), kw = _bn_example(rng, dtype)
    c = x.shape[1]
    return (x, gamma, beta, rng.standard_normal(c).astype(dtype),
            rng.uniform(0.5, 3.0, c).astype(dtype)), kw


register(
    "batch_norm_eval",
    forward=batch_norm_eval_forward,
    backward=batch_norm_eval_backward,
    example=_bn_eval_example,
    differentiable=(0, 1, 2),
    reference="Ioffe & Szegedy 2015, arXiv 1502.03167; PyTorch torch/nn/modules/batchnorm.py",
    derivation="derivations/layers_backward.md#batch_norm_eval",
    hyper_ranges={"eps": Range(1e-5, 1e-1)},
)


def layer_norm_forward(x, gamma, beta, *, eps=DEFAULT_EPS):
    """Layer normalisation over the last axis.

        mu_n = mean_d x_nd,  var_n = mean_d (x_nd - mu_n)^2,
        out_nd = gamma_d (x_nd - mu_n) / sqrt(var_n + eps) + beta_d

    Shapes: x (..., D) with D >= 1, gamma (D,) or None, beta (D,) or None -> out like x.  ``None`` leaves out
    the scale (gamma = 1) or the shift (beta = 0), as PyTorch's ``F.layer_norm`` with ``weight`` or ``bias``
    None; its gradient slot is then None.  With neither, the output is the normalised x-hat that the backward
    keeps, returned as a read-only view instead of a copy (a transformer block that applies gamma and beta
    through the next linear map reads it, see :mod:`refssl.nn.transformer`).

    Reference: Ba, Kiros & Hinton 2016, arXiv 1607.06450; PyTorch torch/nn/modules/normalization.py.
    Backward: derivations/layers_backward.md#layer_norm.
    """
    V.float_array(x, "x", shape_doc="(..., D)")
    if x.ndim < 1:
        raise ValueError("x must have shape (..., D), got a 0-d array")
    d = x.shape[-1]
    if gamma is not None:
        param(gamma, "gamma", (d,), "(D,)", x)
    if beta is not None:
        param(beta, "beta", (d,), "(D,)", x)
    eps = x.dtype.type(V.positive(eps, "eps"))
    x2 = x.reshape(-1, d)
    xhat = np.empty(x2.shape, x.dtype)
    affine = gamma is not None or beta is not None
    out = np.empty(x2.shape, x.dtype) if affine else None
    inv_std = np.empty(x2.shape[0], x.dtype)
    inv_d = x.dtype.type(1.0 / d)
    mean_vec = np.full(d, inv_d, x.dtype)  # row means as a GEMV: several times faster than a short-row reduction

    # Row blocks: each block's centring, variance and scaling run while it is in cache, and the blocks
    # are spread over refssl's thread pool.  xhat is built in place (x - mu, then scaled).
    def block(s, e):
        xh = xhat[s:e]
        np.subtract(x2[s:e], (x2[s:e] @ mean_vec)[:, None], out=xh)
        var = np.einsum("nd,nd->n", xh, xh)
        var *= inv_d
        var += eps
        np.sqrt(var, out=var)
        r = np.reciprocal(var, out=inv_std[s:e])
        xh *= r[:, None]
        if gamma is not None:
            o = np.multiply(xh, gamma, out=out[s:e])
            if beta is not None:
                o += beta
        elif beta is not None:
            np.add(xh, beta, out=out[s:e])

    map_row_blocks(block, x2.shape[0], block=_ln_rows(d, x.itemsize))
    if out is None:
        out = xhat.view()
        out.flags.writeable = False
    return out.reshape(x.shape), (xhat, inv_std, gamma, beta is not None, x.shape)


def layer_norm_backward(cache, grad_out):
    """dxhat = g gamma; dx = (dxhat - mean_d dxhat - xhat mean_d(dxhat xhat)) / sigma."""
    xhat, inv_std, gamma, has_beta, shape = cache
    g = upstream(grad_out, shape, xhat.dtype).reshape(xhat.shape)
    n, d = xhat.shape
    inv_d = xhat.dtype.type(1.0 / d)
    dx = np.empty_like(xhat)
    rows = _ln_rows(d, xhat.itemsize)
    n_blocks = -(-n // rows)
    dgamma_part = np.empty((n_blocks, d), xhat.dtype) if gamma is not None else None
    dbeta_part = np.empty((n_blocks, d), xhat.dtype) if has_beta else None
    ones_d, ones_rows = np.ones(d, xhat.dtype), np.ones(rows, xhat.dtype)  # sums as GEMVs

    # Row blocks: dx in place in its own slot; the parameter gradients summed per block, then over blocks.
    def block(s, e):
        i = s // rows
        gb, xh = g[s:e], xhat[s:e]
        if gamma is not None:
            np.einsum("nd,nd->d", gb, xh, out=dgamma_part[i])
        if has_beta:
            np.matmul(ones_rows[:e - s], gb, out=dbeta_part[i])
        gh = gb if gamma is None else np.multiply(gb, gamma, out=dx[s:e])
        m1 = gh @ ones_d
        m2 = np.einsum("nd,nd->n", gh, xh)
        m1 *= inv_d
        m2 *= inv_d
        gh = np.subtract(gh, m1[:, None], out=dx[s:e])
        t = np.multiply(xh, m2[:, None])
        gh -= t
        gh *= inv_std[s:e, None]

    map_row_blocks(block, n, block=rows)
    return (dx.reshape(shape), None if gamma is None else dgamma_part.sum(axis=0),
            dbeta_part.sum(axis=0) if has_beta else None)


def _ln_example(rng, dtype=np.float64):
    n, d = int(rng.integers(1, 6)), int(rng.integers(2, 8))
    x = (rng.standard_normal((n, d)) * 2 + 0.5).astype(dtype)
    return (x, rng.uniform(0.5, 1.5, d).astype(dtype), rng.standard_normal(d).astype(dtype)), {"eps": 1e-5}


register(
    "layer_norm",
    forward=layer_norm_forward,
    backward=layer_norm_backward,
    example=_ln_example,
    differentiable=(0, 1, 2),
    reference="Ba, Kiros & Hinton 2016, arXiv 1607.06450; PyTorch torch/nn/modules/normalization.py",
    derivation="derivations/layers_backward.md#layer_norm",
    hyper_ranges={"eps": Range(1e-5, 1e-1)},
)
