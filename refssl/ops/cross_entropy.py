"""Softmax cross-entropy with integer labels."""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..numerics import logsumexp
from ..registry import register

__all__ = ["cross_entropy_forward", "cross_entropy_backward"]


def cross_entropy_forward(logits, labels):
    """Row-mean softmax cross-entropy.

        L = 1/N sum_i [ log sum_k exp(logits_ik) - logits_{i, labels_i} ]

    Shapes: logits (N, K) float, labels (N,) integers in [0, K) -> scalar.
    ``labels`` gets no gradient (slot ``None``).

    Reference: the classification loss that I-Con (arXiv 2504.16929, Thm 9) and
    the dual-encoder view of contrastive learning share; torch.nn.functional.
    cross_entropy (mean reduction).  Backward:
    derivations/contrastive_backward.md#cross_entropy.
    """
    V.float_array(logits, "logits", ndim=2, shape_doc="(N, K)")
    n, k = logits.shape
    V.labels_array(labels, "labels", n, num_classes=k)
    lse = logsumexp(logits, axis=1, keepdims=True)
    rows = np.arange(n)
    loss = np.mean(lse[:, 0] - logits[rows, labels])
    return logits.dtype.type(loss), (logits, lse, labels)


def cross_entropy_backward(cache, grad_out):
    """dL/dlogits = g (softmax(logits) - onehot(labels)) / N."""
    logits, lse, labels = cache
    n = logits.shape[0]
    go = float(V.grad_out(grad_out, (), logits.dtype))
    d = np.exp(logits - lse)
    d[np.arange(n), labels] -= 1
    d *= logits.dtype.type(go / n)
    return d, None


def _example(rng, dtype=np.float64):
    n, k = rng.integers(1, 8), rng.integers(1, 7)
    return (2 * rng.standard_normal((n, k)).astype(dtype), rng.integers(0, k, size=n)), {}


register(
    "cross_entropy",
    forward=cross_entropy_forward,
    backward=cross_entropy_backward,
    example=_example,
    differentiable=(0,),
    reference="softmax cross-entropy; I-Con (Alshammari et al. 2025, arXiv 2504.16929) Thm 9",
    derivation="derivations/contrastive_backward.md#cross_entropy",
)
