"""Non-differentiable state of the teacher-student methods, as pure functions.

BYOL, MoCo, DINO, NNCLR and Mean Shift carry state between training steps:
an EMA (momentum) copy of the network, FIFO queues of past embeddings, DINO's
running center, and schedules for the momentum and the teacher temperature.
None of this receives a gradient, so these are plain functions rather than
registered ops.  Every function returns new values and leaves its inputs
untouched, so the order of updates within a step is explicit in user code:

* MoCo v2:  loss = moco_queue(q, k, queue); then queue, ptr = moco_queue_update(queue, ptr, k)
* DINO:     loss = dino(student, teacher, center); then center = dino_center_update(center, teacher)
            (the loss uses the *old* center), then the teacher EMA.
* NNCLR:    loss = nnclr(p1, p2, z1, z2, support); then support, ptr = nnclr_support_update(support, ptr, z1)
* MSF:      loss = mean_shift(query, target, bank, ptr=ptr) enqueues the target *inside*
            (before its k-NN search); then bank, ptr = mean_shift_bank_update(bank, ptr, target)
            stores the same rows for the next step.

Queue pointer semantics (all queues): ``queue`` has shape (K, D) with one
stored vector per row, and ``ptr`` is the row that is written next, i.e. the
oldest entry once the queue is full.  Enqueuing n rows writes them to rows
ptr, ptr+1, ..., ptr+n-1 (mod K) and returns ptr' = (ptr + n) mod K.  The
official code (MoCo, solo-learn NNCLR, MSF) asserts K % n == 0 so that a batch
never wraps; under that assertion the two agree exactly, and the wrap-around
here is the natural FIFO generalisation.  n > K is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np

from . import validation as V
from .ops.normalize import l2_normalize_forward

__all__ = [
    "fifo_rows",
    "fifo_enqueue",
    "check_ptr",
    "moco_queue_update",
    "nnclr_support_update",
    "mean_shift_bank_update",
    "dino_center_update",
    "dino_teacher_temperature",
    "ema_update",
    "byol_momentum",
    "moco_v3_momentum",
    "dino_momentum",
]


# -- FIFO queues ----------------------------------------------------------------


def check_ptr(ptr, size: int, queue_name: str = "queue") -> int:
    """A queue pointer: an integer row index in [0, size)."""
    if isinstance(ptr, (bool, np.bool_)) or not isinstance(ptr, (Integral, np.integer)):
        raise TypeError(f"ptr must be an integer row index, got {type(ptr).__name__}")
    if not 0 <= ptr < size:
        raise ValueError(f"ptr must be in [0, {size}) (a row of {queue_name}), got {ptr}")
    return int(ptr)


def fifo_rows(size: int, ptr: int, n: int) -> np.ndarray:
    """Rows written when n vectors are enqueued at ``ptr`` into a queue of ``size`` rows."""
    return (ptr + np.arange(n)) % size


def fifo_enqueue(queue, ptr, rows, *, name="queue", rows_name="rows"):
    """Write ``rows`` (n, D) into ``queue`` (K, D) at ``ptr`` (FIFO); return ``(new_queue, new_ptr)``.

    Pure: ``queue`` is copied, not modified.  Semantics in the module docstring.
    """
    V.float_array(queue, name, ndim=2, shape_doc="(K, D)")
    V.float_array(rows, rows_name, ndim=2, shape_doc="(n, D)")
    size, width = queue.shape
    if rows.shape[1] != width:
        raise ValueError(f"{rows_name} must have shape (n, {width}) to match {name} of shape "
                         f"{queue.shape}, got {rows.shape}")
    if rows.shape[0] > size:
        raise ValueError(f"cannot enqueue {rows.shape[0]} rows of {rows_name} into {name} with "
                         f"only {size} rows")
    ptr = check_ptr(ptr, size, name)
    out = queue.copy()
    out[fifo_rows(size, ptr, rows.shape[0])] = rows.astype(queue.dtype, copy=False)
    return out, (ptr + rows.shape[0]) % size


def _normalized(x, name, normalize):
    V.float_array(x, name, ndim=2, shape_doc="(n, D)")
    return l2_normalize_forward(x)[0] if normalize else x


def moco_queue_update(queue, ptr, k, *, normalize=True):
    """MoCo v2: enqueue the current keys after the loss; return ``(new_queue, new_ptr)``.

    The official code stores the L2-normalised keys k̂ (the same vectors that
    served as positives), which is what ``normalize=True`` does; ``moco_queue``
    uses the stored rows as they are.  Reference: He et al. 2019 (arXiv
    1911.05722) / Chen et al. 2020 (arXiv 2003.04297), facebookresearch/moco
    moco/builder.py (_dequeue_and_enqueue).
    """
    return fifo_enqueue(queue, ptr, _normalized(k, "k", normalize), rows_name="k")


def nnclr_support_update(support, ptr, z1, *, normalize=True):
    """NNCLR: enqueue view 1's projections *after* the nearest-neighbour lookup.

    Returns ``(new_support, new_ptr)``.  Only z1 is enqueued (paper pseudocode;
    solo-learn solo/methods/nnclr.py).  solo-learn stores normalised z
    (``normalize=True``); lightly stores raw z, which gives the same neighbours
    because ``nnclr`` normalises the support rows before the lookup.
    """
    return fifo_enqueue(support, ptr, _normalized(z1, "z1", normalize), name="support", rows_name="z1")


def mean_shift_bank_update(bank, ptr, target, *, normalize=True):
    """MSF: enqueue the normalised targets t̂; return ``(new_bank, new_ptr)``.

    ``mean_shift(query, target, bank, ptr=ptr)`` performs exactly this enqueue
    internally before its k-NN search (official order, UMBCvision/MSF
    train_msf.py); call this afterwards to carry the bank to the next step.
    """
    return fifo_enqueue(bank, ptr, _normalized(target, "target", normalize), name="bank",
                        rows_name="target")


# -- DINO center and teacher temperature ------------------------------------------


def dino_center_update(center, teacher, *, momentum=0.9):
    """c <- m c + (1 - m) mean(teacher over views and batch), on *raw* teacher outputs.

    ``center`` (K,) or (1, K), ``teacher`` (V_t, N, K) or (R, K).  Applied after
    the loss of the step (the loss uses the old center).  Reference: Caron et al.
    2021 (arXiv 2104.14294), facebookresearch/dino main_dino.py (DINOLoss.update_center).
    Returns an array of center's shape and dtype.
    """
    V.float_array(center, "center", shape_doc="(K,) or (1, K)")
    V.float_array(teacher, "teacher", shape_doc="(V_t, N, K)")
    if center.ndim not in (1, 2) or (center.ndim == 2 and center.shape[0] != 1):
        raise ValueError(f"center must have shape (K,) or (1, K), got {center.shape}")
    if teacher.ndim not in (2, 3) or teacher.shape[-1] != center.shape[-1]:
        raise ValueError(f"teacher must have shape (V_t, N, {center.shape[-1]}) to match center, "
                         f"got {teacher.shape}")
    m = V.in_range(momentum, "momentum", 0.0, 1.0)
    batch_center = teacher.reshape(-1, teacher.shape[-1]).mean(axis=0, dtype=np.float64)
    new = m * center.astype(np.float64) + (1.0 - m) * batch_center.reshape(center.shape)
    return new.astype(center.dtype)


def _epoch(epoch, name="epoch") -> int:
    if isinstance(epoch, (bool, np.bool_)) or not isinstance(epoch, (Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(epoch).__name__}")
    if epoch < 0:
        raise ValueError(f"{name} must be >= 0, got {epoch}")
    return int(epoch)


def dino_teacher_temperature(epoch, *, warmup_teacher_temp=0.04, teacher_temp=0.04,
                             warmup_teacher_temp_epochs=0):
    """DINO teacher temperature at integer ``epoch``.

    The official schedule is the array
    ``concat(linspace(warmup_teacher_temp, teacher_temp, W), teacher_temp * ones)``
    indexed by epoch, W = warmup_teacher_temp_epochs: linear over epochs
    0..W-1 (reaching ``teacher_temp`` at epoch W-1; with W = 1 epoch 0 keeps the
    warm-up value), constant afterwards.  Official defaults 0.04 / 0.04 / 0
    (the README recommends 0.04 -> 0.07 over 30 epochs for ViT-S/16; lightly
    defaults to 30 warm-up epochs).  Reference: facebookresearch/dino main_dino.py (DINOLoss).
    """
    e = _epoch(epoch)
    w0 = V.positive(warmup_teacher_temp, "warmup_teacher_temp")
    t = V.positive(teacher_temp, "teacher_temp")
    w = _epoch(warmup_teacher_temp_epochs, "warmup_teacher_temp_epochs")
    if e >= w:
        return t
    if w == 1:
        return w0
    return w0 + (t - w0) * e / (w - 1)


# -- EMA and momentum schedules -------------------------------------------------------


def ema_update(target, online, *, momentum):
    """theta_t <- m theta_t + (1 - m) theta_o, for dicts of arrays (or single arrays).

    Returns a new dict (new array); the inputs are not modified.  Keys and
    shapes must match.  BYOL writes it xi <- xi + (1 - tau)(theta - xi), the
    same map with m = tau.  Whether BN running statistics are included is the
    caller's choice (they are plain entries of the dict); every entry must be a
    float array, so integer buffers such as BN's batch counters are rejected
    (copy them instead of averaging).
    """
    m = V.in_range(momentum, "momentum", 0.0, 1.0)

    def one(t, o, key):
        label = "target" if key is None else f"target[{key!r}]"
        V.float_array(t, label)
        V.float_array(o, label.replace("target", "online"))
        if t.shape != o.shape:
            raise ValueError(f"{label} and online must have the same shape, got {t.shape} and {o.shape}")
        return (m * t + (1.0 - m) * o).astype(t.dtype, copy=False)

    if isinstance(target, np.ndarray):
        return one(target, online, None)
    if not isinstance(target, Mapping) or not isinstance(online, Mapping):
        raise TypeError("target and online must both be dicts of arrays (or both arrays), got "
                        f"{type(target).__name__} and {type(online).__name__}")
    if set(target) != set(online):
        raise ValueError(f"target and online must have the same keys; only in target: "
                         f"{sorted(set(target) - set(online))}, only in online: "
                         f"{sorted(set(online) - set(target))}")
    return {key: one(target[key], online[key], key) for key in target}


def _cosine_ramp(frac: float, base: float) -> float:
    """1 - (1 - base) (1 + cos(pi frac)) / 2: base at frac = 0, 1 at frac = 1."""
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * frac)) / 2.0


def _count(x, name) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (Real, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x}")
    return float(x)


def byol_momentum(step, *, total_steps, base=0.996):
    """BYOL target decay tau_k = 1 - (1 - tau_base) (cos(pi min(k, K)/K) + 1)/2.

    Per optimisation step k of K; stays at 1 after K.  tau_base by epoch budget:
    40 -> 0.97, 100/300 -> 0.99, 1000 -> 0.996.  The EMA runs after the online
    optimiser step.  Reference: Grill et al. 2020 (arXiv 2006.07733),
    google-deepmind/deepmind-research byol/utils/schedules.py, byol/byol_experiment.py.
    """
    k = _count(step, "step")
    total = V.positive(total_steps, "total_steps")
    b = V.in_range(base, "base", 0.0, 1.0)
    return _cosine_ramp(min(k, total) / total, b)


def moco_v3_momentum(epoch, *, total_epochs, base=0.99):
    """MoCo v3: m = 1 - (1 + cos(pi e/E)) (1 - m0) / 2 with the *fractional* epoch e.

    Set every iteration (e = epoch + i / iters_per_epoch); the key-encoder EMA
    runs inside the forward pass, before the keys are computed.  Official
    default m0 = 0.99 (0.996 for ResNet-50 at 1000 epochs).  Reference: Chen,
    Xie & He 2021 (arXiv 2104.02057), facebookresearch/moco-v3 main_moco.py
    (adjust_moco_momentum).  No clamping, as in the official code.
    """
    e = _count(epoch, "epoch")
    total = V.positive(total_epochs, "total_epochs")
    b = V.in_range(base, "base", 0.0, 1.0)
    return _cosine_ramp(e / total, b)


def dino_momentum(step, *, total_steps, base=0.996):
    """DINO teacher momentum m_k = 1 + (m0 - 1)(1 + cos(pi k/K))/2, for k = 0..K-1.

    K = epochs * iterations per epoch; the official cosine_scheduler builds the
    array over k in [0, K), so m never quite reaches 1 (m_{K-1} < 1).  Step
    indices outside [0, K) are an error.  Reference: facebookresearch/dino
    utils.py (cosine_scheduler), main_dino.py.
    """
    total = _epoch(total_steps, "total_steps")
    if total < 1:
        raise ValueError(f"total_steps must be >= 1, got {total}")
    k = _epoch(step, "step")
    if k >= total:
        raise ValueError(f"step must be in [0, {total}) (the schedule has total_steps entries), got {k}")
    b = V.in_range(base, "base", 0.0, 1.0)
    return _cosine_ramp(k / total, b)
