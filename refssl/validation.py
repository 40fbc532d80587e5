"""Input checks shared by every op.

Each check raises ``TypeError`` (wrong kind of object or dtype) or
``ValueError`` (wrong shape, empty batch, NaN/inf, out-of-range
hyperparameter) with a message that names the argument and says what was
expected.  Ops call these at the top of ``forward`` (and :func:`grad_out` at
the top of ``backward``) so that bad input never turns into a silent
broadcast or a NaN loss.

Policies shared by every check:

* **Arrays** must be exactly ``np.ndarray`` (or ``np.memmap``, a file-backed
  ndarray with identical semantics).  Other subclasses change what the
  arithmetic means -- ``np.ma.MaskedArray`` hides masked NaNs from the
  finiteness check and ignores them in reductions, ``np.matrix`` turns ``*``
  into a matrix product and keeps every result 2-d -- so they are rejected
  with a ``TypeError``; convert explicitly (``np.asarray(x)``,
  ``x.filled(...)``).
* **Hyperparameters** (:func:`positive`, :func:`in_range`) may be Python
  ints/floats, numpy scalars or 0-d int/float arrays; every form gets the
  same finiteness and range checks.  Booleans, strings, ``None`` and arrays
  with more than one element are rejected.  Boolean flags go through
  :func:`flag` (a Python ``bool`` or ``np.bool_`` only: ``"False"`` is not
  false).
* **grad_out** (:func:`grad_out`): see that function for the exact policy.
"""

from __future__ import annotations

import contextlib
import contextvars
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
    "flag",
    "grad_out",
    "finite_output",
    "plain_array",
    "inputs_scanned_by_caller",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# True inside :func:`inputs_scanned_by_caller`: the NaN/inf scans of float inputs and upstream gradients are
# skipped (every other check still runs).  A context variable, so each thread and task has its own.
_SCAN_SKIPPED = contextvars.ContextVar("refssl_finite_scan_skipped", default=False)


@contextlib.contextmanager
def inputs_scanned_by_caller():
    """Within this block, ops do not scan their float inputs and upstream gradients for NaN/inf.

    For composite modules only (a transformer stack: its blocks call about twenty ops each, and every
    intermediate array would otherwise be scanned once more by the op that consumes it, about 5 % of a
    ViT step).  The module takes over the guarantee: it scans what enters (its input, its parameters,
    the upstream gradient) and what leaves (its output, its input gradient), so a NaN or inf still never
    passes silently: it is reported at the module's boundary instead of at the op.  Shapes, dtypes and
    hyperparameters are checked as always.
    """
    token = _SCAN_SKIPPED.set(True)
    try:
        yield
    finally:
        _SCAN_SKIPPED.reset(token)


_DOT_SCAN_MIN = 1 << 14


def _all_finite(x: np.ndarray) -> bool:
    """``np.isfinite(x).all()`` for a float array, at the cost of one BLAS reduction when x is finite.

    x . x (a contiguous dot product: one read of x, no boolean temporary) is finite exactly when every
    entry is, unless the sum of squares of huge finite entries overflows: on a non-finite result the
    exact elementwise test decides, so the answer is always the exact one.
    """
    # Below about 16k entries the boolean test is cheaper than the dot product with its errstate.
    if x.size >= _DOT_SCAN_MIN and x.dtype in FLOAT_DTYPES:
        # a transposed or channels-last view of contiguous memory: the same entries in memory order
        ordered = x if x.flags.c_contiguous else x.transpose(np.argsort(x.strides, kind="stable")[::-1])
        if ordered.flags.c_contiguous:
            flat = ordered.reshape(-1)
            with np.errstate(over="ignore", invalid="ignore"):
                if np.isfinite(np.dot(flat, flat)):
                    return True
    return bool(np.isfinite(x).all())


# np.memmap is an ndarray backed by a file: same arithmetic, same reductions.
_PLAIN_ARRAY_TYPES = (np.ndarray, np.memmap)


def plain_array(x, name: str, what: str = "a numpy array") -> np.ndarray:
    """``x`` itself if it is an ``np.ndarray`` (or ``np.memmap``), else a TypeError naming ``name``.

    Subclasses that change semantics (``np.ma.MaskedArray``, ``np.matrix``, ...) are rejected.
    """
    if type(x) in _PLAIN_ARRAY_TYPES:
        return x
    if isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a plain numpy.ndarray, got the subclass {type(x).__name__} "
                        "(masked arrays and matrices change what the arithmetic means); "
                        "convert it explicitly, e.g. np.asarray(x) or x.filled(value)")
    raise TypeError(f"{name} must be {what}, got {type(x).__name__}")


def float_array(x, name: str, *, ndim: int | None = None, min_ndim: int = 0, min_rows: int = 1,
                min_cols: int = 1, shape_doc: str | None = None) -> np.ndarray:
    """Check that ``x`` is a finite float32/float64 ndarray of the given rank.

    ``ndim`` fixes the rank, ``min_ndim`` bounds it from below (1 for ``(N, ...)``
    inputs: a 0-d array has no batch axis); ``min_rows`` bounds the first axis
    (the batch), ``min_cols`` the last one (the feature width); ``shape_doc``
    (e.g. ``"(N, D)"``) is used in messages.
    """
    plain_array(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    doc = shape_doc or (f"a {ndim}-d array" if ndim is not None else "an array")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have shape {doc}, got shape {_shape_str(x.shape)}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have shape {doc} (at least {min_ndim} axes), "
                         f"got a {x.ndim}-d array of shape {_shape_str(x.shape)}")
    if x.ndim >= 1 and x.shape[0] < min_rows:
        what = "empty batch" if x.shape[0] == 0 else f"needs at least {min_rows} rows"
        raise ValueError(f"{name} must have shape {doc} with at least {min_rows} rows ({what}), "
                         f"got shape {_shape_str(x.shape)}")
    if x.ndim >= 2 and x.shape[-1] < min_cols:
        raise ValueError(f"{name} must have shape {doc} with at least {min_cols} columns, "
                         f"got shape {_shape_str(x.shape)}")
    if not _SCAN_SKIPPED.get() and not _all_finite(x):
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
    """A finite real number from a Python int/float, a numpy scalar or a 0-d int/float array."""
    if isinstance(value, np.ndarray):
        plain_array(value, name)
        if value.ndim != 0 or value.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a real number (a Python/numpy scalar or a 0-d int/float "
                            f"array), got an array of dtype {value.dtype} and shape {_shape_str(value.shape)}")
        value = value[()]  # the numpy scalar: checked below like any other
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # a Python int beyond the float range
        raise ValueError(f"{name} must be finite, got an integer too large for a float") from None
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
    plain_array(labels, name, "a numpy integer array")
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
    plain_array(x, name, "a 0-d numpy float array (e.g. np.asarray(2.659))")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {x.dtype}")
    if x.ndim != 0:
        raise ValueError(f"{name} must be a 0-d array (shape ()), got shape {_shape_str(x.shape)}")
    if not np.isfinite(x):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def positive_int(value, name: str, *, minimum: int = 1) -> int:
    """An integer >= minimum (counts such as k or a number of negatives).

    Python ints, numpy integer scalars and 0-d integer arrays are accepted; bools are not.
    """
    if isinstance(value, np.ndarray) and type(value) in _PLAIN_ARRAY_TYPES and value.ndim == 0 \
            and value.dtype.kind in "iu":
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def flag(value, name: str) -> bool:
    """A boolean switch: a Python ``bool`` or ``np.bool_`` only.

    Strings (``"False"`` is truthy), ``None``, 0/1 and arrays are rejected, so
    that a flag is never silently read with Python's truthiness.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return bool(value)


def grad_out(value, shape, dtype, *, name: str = "grad_out", copy: bool = False) -> np.ndarray:
    """The upstream gradient of an op's output, checked like any input; returns an ndarray.

    Policy (every registered op's ``backward`` goes through this check):

    * **shape**: exactly the output's ``shape`` -- no broadcasting of a scalar
      or a row, no extra leading axis (``(1,)`` is not ``()``).
    * **scalar outputs** (``shape == ()``, the losses): a Python ``float``, a
      Python ``int`` (an exact number, e.g. ``backward(cache, 1)``), a numpy
      floating scalar or a 0-d float array.
    * **arrays and numpy scalars** must have a real floating dtype (float16,
      float32, float64, longdouble); integer, bool, complex and object dtypes
      are a ``TypeError``, as are ``None``, strings and bools.
      ``np.ndarray`` subclasses (masked arrays, matrices) are rejected as in
      :func:`plain_array`.
    * **dtype**: the value is cast to the op's ``dtype`` (a float64 upstream
      gradient of a float32 op is rounded to float32, as the op computes in
      float32); the result must be finite *after* the cast (1e300 does not fit
      float32).  NaN/inf is a ``ValueError``.

    The returned array may be ``value`` itself (when it already has ``dtype``):
    callers must not modify it unless they pass ``copy=True``.
    """
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    if (type(value) is np.ndarray and value.dtype == dtype and value.shape == shape and not copy
            and (_SCAN_SKIPPED.get() or _all_finite(value))):
        return value  # the common case, without building the messages below
    want = f"shape {_shape_str(shape)} (the op's output)"
    if shape == ():
        want += ": a Python float or a 0-d float array"
    if value is None or isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a float array of {want}, got {type(value).__name__} {value!r}")
    if isinstance(value, np.ndarray):
        plain_array(value, name)
        kind = value.dtype.kind
    elif isinstance(value, np.generic):
        kind = value.dtype.kind
    elif isinstance(value, (int, float)):
        kind = "f"
        if shape != ():
            raise ValueError(f"{name} must have {want}, got a Python {type(value).__name__} "
                             "(a scalar is not broadcast)")
    else:
        raise TypeError(f"{name} must be a float array of {want}, got {type(value).__name__}")
    if kind != "f":
        raise TypeError(f"{name} must have a real floating dtype, got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")
    got = np.shape(value)
    if got != shape:
        raise ValueError(f"{name} must have {want}, got shape {_shape_str(got)}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            g = np.array(value, dtype=dtype, copy=True) if copy else np.asarray(value, dtype=dtype)
    except OverflowError:  # a Python int beyond the float range
        raise ValueError(f"{name} must be finite in {dtype}, got an integer too large for a float") from None
    if not _SCAN_SKIPPED.get() and not _all_finite(g):
        raise ValueError(f"{name} contains NaN or inf (in the op's dtype {dtype})")
    return g


def all_finite(x: np.ndarray) -> bool:
    """Whether every entry of the float array ``x`` is finite (one BLAS dot product when it is)."""
    return _all_finite(x)


def finite_output(value, op: str, **hyper):
    """``value`` if it is finite, else a ValueError naming the op's hyperparameters.

    The inputs are validated as finite, so a non-finite output can only come from a hyperparameter so
    extreme (a temperature of 1e-300, an exponent of 1e300) that an intermediate overflows the dtype.
    Ops call this on their output instead of returning inf or NaN.
    """
    if not np.isfinite(value).all():
        dtype = np.asarray(value).dtype
        what = ", ".join(f"{k}={v!r}" if not isinstance(v, float) else f"{k}={v:g}" for k, v in hyper.items())
        raise ValueError(f"{op}: the output overflows {dtype} with {what}; this hyperparameter setting is "
                         f"too extreme for these inputs in {dtype}")
    return value
