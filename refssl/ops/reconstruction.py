"""Mean squared reconstruction error (the autoencoder objective)."""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..registry import register


def mse_forward(x, target):
    """Mean squared error over every entry.

        L = (1 / M) sum_j (x_j - target_j)^2,   M = x.size

    Shapes: x (N, ...) and target of the same shape -> scalar.  ``target`` (the image to reconstruct) gets
    no gradient: its slot is None.  PyTorch ``nn.MSELoss()`` with the default ``reduction='mean'``.

    Reference: the autoencoder objective of Hinton & Salakhutdinov 2006 (Science 313, "Reducing the
    dimensionality of data with neural networks"); PyTorch torch/nn/modules/loss.py (MSELoss).
    Backward: derivations/layers_backward.md#mse.
    """
    V.float_array(x, "x", min_ndim=1, shape_doc="(N, ...)")
    V.float_array(target, "target", min_ndim=1, shape_doc="(N, ...) like x")
    V.same_shape([x, target], ["x", "target"])
    V.same_dtype([x, target], ["x", "target"])
    if x.size == 0:
        raise ValueError(f"x must have shape (N, ...) with at least one entry (the mean of no errors is "
                         f"undefined), got shape {x.shape}")
    d = x - target
    return x.dtype.type(np.sum(d * d) / d.size), d


def mse_backward(cache, grad_out):
    """dL/dx = 2 (x - target) / M; the target gets None."""
    d = cache
    g = V.grad_out(grad_out, (), d.dtype)
    return (d * (g * d.dtype.type(2.0 / d.size)), None)


def _example(rng, dtype=np.float64):
    shape = (int(rng.integers(1, 4)),) + tuple(int(v) for v in rng.integers(1, 4, size=rng.integers(1, 4)))
    return (rng.standard_normal(shape).astype(dtype), rng.random(shape).astype(dtype)), {}


register(
    "mse",
    forward=mse_forward,
    backward=mse_backward,
    example=_example,
    differentiable=(0,),
    reference="Hinton & Salakhutdinov 2006 (Science 313:504); PyTorch torch/nn/modules/loss.py (MSELoss)",
    derivation="derivations/layers_backward.md#mse",
)
