"""How far a port may be from refssl on one case: the error measure and the tolerance rule.

Error measure (one number per array: the value, and the gradient of each differentiable input)::

    err(port, expected) = max |port - expected| / max |expected|

the largest entry error relative to the largest entry of the reference (normwise in the max norm).
It is scale-free, does not blow up on entries that happen to be near zero, and a wrong sign, a
missing term or a wrong factor anywhere shows up as an O(1) error.

Tolerance of a case.  Two measurements on the float32 version of the case, both in the same measure:

* ``refssl_float32_error``: refssl itself run in float32 against the exact (float64) answer on the
  same float32 inputs.  This is what a careful float32 implementation actually loses on this case.
* ``rounding_sensitivity``: the float64 answer on inputs (and upstream gradient) perturbed entry by
  entry by a random relative amount up to the float32 unit roundoff, against the unperturbed answer.
  Any float32 port rounds its inputs and intermediates at this level, so this is what even a perfect
  float32 algorithm can lose; it also guards against refssl being luckily accurate on a case.

With ``d = max(refssl_float32_error, rounding_sensitivity, FLOOR32)`` (``FLOOR32 = 4 EPS32``: the
rounding of a handful of operations that no implementation avoids, whatever refssl happened to
achieve) and the condition estimate ``kappa = d / EPS32`` (>= 4; single digits for a benign case,
tens to hundreds for sharp softmaxes, cancellations and large offsets):

* float32 tolerance = ``SAFETY32 * d``: a different but equally stable float32 algorithm (another
  summation order, fused kernels, a library log-sum-exp) differs from refssl by a small multiple of
  refssl's own error; 10 covers that with room while staying far below any real bug (a missing term
  or factor is an O(1) error).
* float64 tolerance = ``RTOL64 * kappa``: 1e-10 leaves six orders of magnitude above float64
  rounding for algorithmic differences (e.g. a variance as E[x^2] - E[x]^2), scaled by the
  condition of the case, yet catches any definitional difference (another eps, a clamp, a
  missing term) that float32 rounding would hide.

Cases whose ``kappa`` exceeds ``KAPPA_MAX`` are not accepted into a suite (a test enforces it): a
case that float32 cannot resolve to about 1e-2 would not check anything.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EPS32", "FLOOR32", "SAFETY32", "RTOL64", "KAPPA_MAX", "rel_error", "tolerances"]

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7, the float32 unit roundoff (ulp of 1)
FLOOR32 = 4 * EPS32
SAFETY32 = 10.0
RTOL64 = 1e-10
KAPPA_MAX = 1e4


def rel_error(actual, expected) -> float:
    """``max|actual - expected| / max|expected|`` (the absolute error when ``expected`` is all zero).

    ``inf`` for a shape mismatch or a non-finite entry in ``actual``.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape or not np.all(np.isfinite(a)):
        return float("inf")
    if e.size == 0:
        return 0.0
    diff = float(np.max(np.abs(a - e)))
    scale = float(np.max(np.abs(e)))
    return diff / scale if scale > 0 else diff


def tolerances(refssl_float32_error: float, rounding_sensitivity: float) -> dict:
    """The tolerance of both dtypes from the two float32 measurements (see the module docstring)."""
    d = max(float(refssl_float32_error), float(rounding_sensitivity), FLOOR32)
    kappa = d / EPS32
    return {"float32": SAFETY32 * d, "float64": RTOL64 * kappa, "kappa": kappa}
