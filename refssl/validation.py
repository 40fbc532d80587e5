"""Input checks shared by every op.

Each check raises ``TypeError`` (wrong kind of object or dtype) or
``ValueError`` (wrong shape, empty batch, NaN/inf, out-of-range
hyperparameter) with a message that names the argument and says what was
expected.  Ops call these at the top of ``forward`` so that bad input never
turns into a silent broadcast or a NaN loss.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

__all__ = [
    "float_array",
    "same_shape",
    "same_dtype",
    "positive",
    "in_range",
    "labels_array",
    "scalar_array",
    "positive_int",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def float_array(x, name: str, *, ndim: int | None = None, min_rows: int = 1,
                min_cols: int = 1, shape_doc: str | None = None) -> np.ndarray:
    """Check that ``x`` is a finite float32/float64 ndarray of the given rank.

    ``min_rows`` bounds the first axis (the batch), ``min_cols`` the last one
    (the feature width); ``shape_doc`` (e.g. ``"(N, D)"``) is used in messages.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    doc = shape_doc or (f"a {ndim}-d array" if ndim is not None else "an array")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have shape {doc}, got shape {_shape_str(x.shape)}")
    if x.ndim >= 1 and x.shape[0] < min_rows:
        what = "empty batch" if x.shape[0] == 0 else f"needs at least {min_rows} rows"
        raise ValueError(f"{name} must have shape {doc} with at least {min_rows} rows ({what}), "
                         f"got shape {_shape_str(x.shape)}")
    if x.ndim >= 2 and x.shape[-1] < min_cols:
        raise ValueError(f"{name} must have shape {doc} with at least {min_cols} columns, "
                         f"got shape {_shape_str(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def same_shape(arrays, names) -> None:
    """All arrays have one shape (no broadcasting between, e.g., two views)."""
    first = arrays[0].shape
    for a, n in zip(arrays[1:], names[1:]):
        if a.shape != first:
            raise ValueError(f"{names[0]} and {n} must have the same shape, got "
                             f"{_shape_str(first)} and {_shape_str(a.shape)}")


def same_dtype(arrays, names) -> None:
    """All arrays share one float dtype, so that the output dtype is unambiguous."""
    first = arrays[0].dtype
    for a, n in zip(arrays[1:], names[1:]):
        if a.dtype != first:
            raise TypeError(f"{names[0]} and {n} must have the same dtype, got {first} and {a.dtype}")


def _real(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Real, np.floating, np.integer)):
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fi":
            return float(value)
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def positive(value, name: str) -> float:
    """A finite real number > 0 (temperatures, bandwidths, exponents)."""
    v = _real(value, name)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def in_range(value, name: str, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> float:
    """A finite real number in [low, high] (open ends as flagged)."""
    v = _real(value, name)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lb}{low}, {high}{hb}, got {v}")
    return v


def labels_array(labels, name: str, n: int, *, num_classes: int | None = None) -> np.ndarray:
    """An integer array of shape (n,), values >= 0 (and < num_classes if given)."""
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"{name} must be a numpy integer array, got {type(labels).__name__}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got shape {_shape_str(labels.shape)}")
    if n and labels.min() < 0:
        raise ValueError(f"{name} must be >= 0, got minimum {labels.min()}")
    if num_classes is not None and n and labels.max() >= num_classes:
        raise ValueError(f"{name} must be < {num_classes} (number of classes), got maximum {labels.max()}")
    return labels


def scalar_array(x, name: str) -> np.ndarray:
    """A finite 0-d float32/float64 array (a learnable scalar such as a logit scale).

    numpy float scalars (what arithmetic on a 0-d array returns) are accepted and
    returned as 0-d arrays; Python floats are not, since they carry no dtype.
    """
    if isinstance(x, np.floating):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a 0-d numpy float array (e.g. np.asarray(2.659)), "
                        f"got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    if x.ndim != 0:
        raise ValueError(f"{name} must be a 0-d array (shape ()), got shape {_shape_str(x.shape)}")
    if not np.isfinite(x):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def positive_int(value, name: str, *, minimum: int = 1) -> int:
    """An integer >= minimum (counts such as k or a number of negatives)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
