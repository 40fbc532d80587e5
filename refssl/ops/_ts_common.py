"""Private helpers shared by the teacher-student ops (validation and small kernels)."""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..numerics import log_softmax


def check_views(arrays, names, shape_doc="(N, D)"):
    """Each array a finite float (N, D) matrix; all with one shape and one dtype."""
    for a, n in zip(arrays, names):
        V.float_array(a, n, ndim=2, shape_doc=shape_doc)
    V.same_shape(arrays, names)
    V.same_dtype(arrays, names)
    return arrays[0].dtype


def check_rows_like(x, name, ref, ref_name, shape_doc="(K, D)"):
    """A finite float (K, D) matrix with ref's width D and dtype (a queue, a bank, a support set)."""
    V.float_array(x, name, ndim=2, shape_doc=shape_doc)
    if x.shape[1] != ref.shape[1]:
        rows = shape_doc.strip("()").split(",")[0]
        raise ValueError(f"{name} must have shape ({rows}, {ref.shape[1]}) (the width D of {ref_name}), "
                         f"got shape {x.shape}")
    V.same_dtype([ref, x], [ref_name, name])


def identity_ce(logits):
    """Row-mean cross-entropy with labels 0..N-1 (the diagonal); returns (value, softmax)."""
    ls = log_softmax(logits, axis=1)
    return -np.mean(np.diagonal(ls)), np.exp(ls)


def ce_identity_grad(prob):
    """d CE / d logits for identity labels: (softmax - I) / N."""
    d = prob.copy()
    d[np.diag_indices(min(d.shape))] -= 1
    return d / d.shape[0]


def grad_scalar(grad_out, dtype):
    """Upstream gradient of a scalar loss as a 0-d array of dtype (policy: :func:`refssl.validation.grad_out`)."""
    return V.grad_out(grad_out, (), dtype)


def clustered(rng, rows, d, spread=0.5):
    """Rows b + spread * noise around one random direction b.

    Keeps the cosines of a query to all keys within O(spread), so that even at
    the smallest tested temperature (0.05) the softmax is not saturated: a
    saturated row has a gradient of size e^{-Δ/τ}, far below the ~1e-10
    absolute resolution of float64 central differences on logits of size 1/τ.
    """
    b = rng.standard_normal(d)
    b /= np.linalg.norm(b)
    return b + spread * rng.standard_normal((rows, d)) / np.sqrt(d)
