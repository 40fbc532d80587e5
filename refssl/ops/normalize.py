"""L2 normalisation of rows (a building block of most losses)."""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..registry import register

DEFAULT_EPS = 1e-12


def l2_normalize_forward(x, *, eps=DEFAULT_EPS):
    """Row-wise L2 normalisation along the last axis.

        y = x / max(||x||_2, eps)

    Shapes: x (..., D) -> y (..., D).  eps convention: PyTorch's
    ``F.normalize`` (clamp the *norm* at eps = 1e-12).  TF/JAX clamp the
    *squared* norm instead, x / sqrt(max(||x||^2, 1e-12)), i.e. a norm floor of
    1e-6; the two agree for every row with ||x|| > 1e-6.

    Reference: Chen et al. 2020 (arXiv 2002.05709), google-research/simclr
    tf2/objective.py (hidden_norm).  Backward: derivations/contrastive_backward.md#l2_normalize.
    """
    V.float_array(x, "x", min_rows=1)
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dimension (..., D), got a 0-d array")
    if x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got shape {x.shape}")
    eps = V.positive(eps, "eps")
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    denom = np.maximum(norm, x.dtype.type(eps))
    y = x / denom
    return y, (y, denom, norm > eps)


def l2_normalize_backward(cache, grad_out):
    """dL/dx = (g - y <y, g>) / ||x|| where the norm exceeds eps, else g / eps."""
    y, denom, active = cache
    g = V.grad_out(grad_out, y.shape, y.dtype)
    radial = np.sum(y * g, axis=-1, keepdims=True) * active
    return ((g - y * radial) / denom,)


def _example(rng, dtype=np.float64):
    n, d = rng.integers(1, 7), rng.integers(1, 9)
    return (rng.standard_normal((n, d)).astype(dtype),), {}


register(
    "l2_normalize",
    forward=l2_normalize_forward,
    backward=l2_normalize_backward,
    example=_example,
    differentiable=(0,),
    reference="Chen et al. 2020, arXiv 2002.05709; google-research/simclr tf2/objective.py; "
              "PyTorch torch.nn.functional.normalize (eps convention)",
    derivation="derivations/contrastive_backward.md#l2_normalize",
)
