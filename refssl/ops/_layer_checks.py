"""Input checks shared by the layer ops (private; the public checks are in :mod:`refssl.validation`)."""

from __future__ import annotations

import numpy as np

from .. import validation as V


def param(a, name: str, shape: tuple, shape_doc: str, like: np.ndarray) -> np.ndarray:
    """A finite float parameter array of exactly ``shape`` with the dtype of ``like``."""
    V.float_array(a, name, ndim=len(shape), shape_doc=shape_doc)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_doc} = {tuple(shape)}, got shape {a.shape}")
    if a.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of the input ({like.dtype}), got {a.dtype}")
    return a


def nonneg_int(value, name: str) -> int:
    """An integer >= 0 (padding)."""
    return V.positive_int(value, name, minimum=0)


def upstream(grad_out, shape, dtype, *, copy: bool = False) -> np.ndarray:
    """The upstream gradient as an array of the output's shape and dtype (``shape=()`` for a scalar loss).

    Delegates to :func:`refssl.validation.grad_out`, which states the policy: exact shape (no
    broadcasting), a real float dtype cast to ``dtype``, finite; None, strings and bools rejected.
    The result may alias ``grad_out``: do not modify it unless ``copy=True``.
    """
    return V.grad_out(grad_out, shape, dtype, copy=copy)
