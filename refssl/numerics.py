"""Numerically stable building blocks shared by the ops.

Every exponential in refssl goes through these: the row maximum is subtracted
before ``exp`` so nothing overflows, and masked entries are ``-inf`` (not a
large negative constant) so they contribute exactly zero.
"""

from __future__ import annotations

import numpy as np

__all__ = ["logsumexp", "softmax", "log_softmax", "row_normalize_backward"]


def logsumexp(x: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """log(sum(exp(x))) along ``axis`` with the max shift; rows of all -inf give -inf."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0).astype(x.dtype, copy=False)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """x - logsumexp(x) along ``axis``."""
    return x - logsumexp(x, axis=axis, keepdims=True)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x - max) / sum along ``axis``; -inf entries get probability 0."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0).astype(x.dtype, copy=False)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def row_normalize_backward(xhat: np.ndarray, norm: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Backward of x -> x / ||x|| along the last axis: (g - xhat <xhat, g>) / ||x||."""
    return (g - xhat * np.sum(xhat * g, axis=-1, keepdims=True)) / norm
