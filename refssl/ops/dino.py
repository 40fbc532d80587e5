"""DINO: cross-entropy from a centred, sharpened teacher to the student, over view pairs.

The teacher outputs and the center are constants (slots ``None``).  The center
update and the temperature / momentum schedules are in :mod:`refssl.state`.
Derivation: derivations/teacher_student.md#dino.
"""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..numerics import log_softmax, softmax
from ..registry import Range, register
from ._ts_common import grad_scalar


def _n_pairs(v_s: int, v_t: int) -> int:
    """Pairs (teacher view t, student view v) with t != v: all pairs minus the shared indices."""
    return v_s * v_t - min(v_s, v_t)


def dino_forward(student, teacher, center, *, student_temp=0.1, teacher_temp=0.04):
    """DINO loss, averaged over (teacher view, student view) pairs as the official code.

        P_t = softmax((teacher[t] - center) / teacher_temp)          (stop-gradient)
        L   = 1/n_pairs  sum_{t, v: v != t}  (1/N) sum_b  - P_t[b] . log_softmax(student[v, b] / student_temp)

    Shapes: student (V_s, N, K) (all crops, the global crops first), teacher
    (V_t, N, K) (the global crops; V_t = 2 in DINO), center (K,) or (1, K);
    returns a scalar.  View index t of the teacher and v of the student refer
    to the same crop when t == v; those pairs are skipped, so
    n_pairs = V_s V_t - min(V_s, V_t) (= 2 V_s - 2 for two teacher crops) and the
    sum over pairs is divided by n_pairs.  teacher and center are stop-gradient
    (slots None).  Use the center from *before* this step's
    :func:`refssl.state.dino_center_update` and the scheduled teacher temperature
    (:func:`refssl.state.dino_teacher_temperature`).

    Reference: Caron et al. 2021, arXiv 2104.14294; facebookresearch/dino
    main_dino.py (DINOLoss.forward).  lightly and solo-learn compute the same
    formula.  Backward: derivations/teacher_student.md#dino.
    """
    V.float_array(student, "student", ndim=3, shape_doc="(V_s, N, K)")
    V.float_array(teacher, "teacher", ndim=3, shape_doc="(V_t, N, K)")
    V.float_array(center, "center", shape_doc="(K,) or (1, K)")
    v_s, n, k = student.shape
    v_t = teacher.shape[0]
    if n < 1:
        raise ValueError(f"student must have shape (V_s, N, K) with N >= 1 (empty batch), got shape {student.shape}")
    if teacher.shape[1:] != (n, k):
        raise ValueError(f"teacher must have shape (V_t, {n}, {k}) to match student of shape "
                         f"{student.shape} (same batch N and output width K), got {teacher.shape}")
    if center.shape not in ((k,), (1, k)):
        raise ValueError(f"center must have shape ({k},) or (1, {k}) (the output width K of student), "
                         f"got {center.shape}")
    V.same_dtype([student, teacher, center], ["student", "teacher", "center"])
    ts = V.positive(student_temp, "student_temp")
    tt = V.positive(teacher_temp, "teacher_temp")
    pairs = _n_pairs(v_s, v_t)
    if pairs == 0:
        raise ValueError(f"student (V_s={v_s}) and teacher (V_t={v_t}) have no pair of different "
                         "views: need V_s >= 2 or V_t >= 2")
    dtype = student.dtype
    targets = softmax((teacher - center.reshape(k)) / dtype.type(tt), axis=-1)  # (V_t, N, K)
    logp = log_softmax(student / dtype.type(ts), axis=-1)  # (V_s, N, K)
    # Target seen by student view v: sum over all teacher views, minus the same crop.
    shared = min(v_s, v_t)
    tsum = np.broadcast_to(targets.sum(axis=0), (v_s, n, k)).copy()
    tsum[:shared] -= targets[:shared]
    loss = -np.sum(tsum * logp) / (n * pairs)
    counts = np.full(v_s, v_t, dtype=dtype)  # teacher views paired with student view v
    counts[:shared] -= 1
    return V.finite_output(dtype.type(loss), "dino", student_temp=ts, teacher_temp=tt), (np.exp(logp), tsum, counts, n * pairs, ts, dtype)


def dino_backward(cache, grad_out):
    """dL/dstudent[v] = (c_v softmax(student[v]/τ_s) - sum_{t != v} P_t) / (τ_s N n_pairs)."""
    prob, tsum, counts, denom, ts, dtype = cache
    g = grad_scalar(grad_out, dtype) * dtype.type(1.0 / (ts * denom))
    return g * (counts[:, None, None] * prob - tsum), None, None


def _example(rng, dtype=np.float64):
    v_s, v_t = int(rng.integers(2, 5)), int(rng.integers(1, 3))
    n, k = int(rng.integers(1, 5)), int(rng.integers(2, 7))
    student = 0.3 * rng.standard_normal((v_s, n, k))
    teacher = 0.1 * rng.standard_normal((v_t, n, k))
    center = 0.05 * rng.standard_normal((1, k) if rng.integers(2) else (k,))
    return (student.astype(dtype), teacher.astype(dtype), center.astype(dtype)), {
        "student_temp": 0.1, "teacher_temp": 0.04}


register(
    "dino",
    forward=dino_forward,
    backward=dino_backward,
    example=_example,
    differentiable=(0,),
    reference="Caron et al. 2021, arXiv 2104.14294; facebookresearch/dino main_dino.py (DINOLoss)",
    derivation="derivations/teacher_student.md#dino",
    hyper_ranges={"student_temp": Range(0.05, 1.0), "teacher_temp": Range(0.02, 0.2)},
)
