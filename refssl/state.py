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
* VQ-KD:    z_q, cache = vector_quantize_forward(z, codebook); the losses use z_q (and
            vector_quantize_normalized_input(cache) for the commitment term); then
            codebook, cluster_size, _ = vq_ema_update(codebook, cluster_size, z_hat, indices)
            with the z_hat and indices of this step's cache (the step's codes came from the old codebook).

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
from .ops.masked_modelling import nearest_code, scatter_add_rows
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
    "vq_ema_update",
    "vq_kmeans_init",
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


# -- VQ-KD codebook (BEiT v2) ----------------------------------------------------------------

_NORMALIZE_EPS = 1e-12  # F.normalize's floor on the norm, as in the official l2norm


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _NORMALIZE_EPS)


def _flat_rows(z, name: str, width: int | None = None) -> np.ndarray:
    V.float_array(z, name, shape_doc="(..., D)")
    if z.ndim < 1 or z.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., D) with D >= 1, got shape {z.shape}")
    if width is not None and z.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}) (the codebook width D), got shape {z.shape}")
    return z.reshape(-1, z.shape[-1])


def _rng_or_none(rng):
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}")
    return rng


def _sample_rows(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` rows: distinct ones when there are enough, else drawn with replacement (official sample_vectors)."""
    m = rows.shape[0]
    pick = rng.permutation(m)[:count] if m >= count else rng.integers(0, m, size=count)
    return rows[pick]


def vq_ema_update(codebook, cluster_size, z_normalized, indices, *, decay=0.99, dead_threshold=1e-3,
                  rng=None):
    """EMA update of the VQ-KD codebook: ``(new_codebook, new_cluster_size, n_dead_reset)``.

    With b_k = #{i: indices_i = k} (the bins) and m_k = normalise(mean_{i: indices_i = k} z^_i):

        cluster_size_k <- decay cluster_size_k + (1 - decay) b_k
        c_k            <- normalise(decay c_k + (1 - decay) m_k)      if b_k > 0
        c_k            unchanged                                       if b_k = 0

    normalise(x) = x / max(||x||, 1e-12) (F.normalize).  This is online spherical k-means: with the
    assignments fixed, c_k converges to m_k, the normalised mean of its cluster
    (derivations/masked_modelling.md#vq_ema_update).  The official code renormalises unused rows,
    the identity on unit rows; here they are returned exactly as given.

    **refssl's addition, not in the official code** (which relies on k-means initialisation,
    :func:`vq_kmeans_init`, and otherwise leaves dead codes alone): if ``rng`` is a Generator, every
    code with b_k = 0 whose new cluster_size is below ``dead_threshold`` is re-seeded with a random
    row of z_normalized (distinct rows while there are enough) and its cluster_size set to
    ``dead_threshold``.  A code that received points in this batch is never re-seeded.
    ``rng=None`` (default) reproduces the official update.

    Shapes: codebook (K, D), cluster_size (K,), z_normalized (..., D) (the L2-normalised encoder
    outputs, ``vector_quantize_normalized_input``), indices integers in [0, K) of shape
    z_normalized.shape[:-1] (``vector_quantize_indices``).  Pure: the inputs are not modified; the
    outputs keep the dtypes of codebook and cluster_size (computed in float64).

    Reference: Peng et al. 2022, arXiv 2208.06366; microsoft/unilm beit2/norm_ema_quantizer.py
    (NormEMAVectorQuantizer.forward, norm_ema_inplace).  Official decay 0.99.
    """
    V.float_array(codebook, "codebook", ndim=2, shape_doc="(K, D)")
    k, width = codebook.shape
    V.float_array(cluster_size, "cluster_size", ndim=1, shape_doc="(K,)")
    if cluster_size.shape != (k,):
        raise ValueError(f"cluster_size must have shape (K,) = ({k},) (one count per code), got "
                         f"{cluster_size.shape}")
    z = _flat_rows(z_normalized, "z_normalized", width)
    if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu":
        raise TypeError(f"indices must be a numpy integer array, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.shape != z_normalized.shape[:-1]:
        raise ValueError(f"indices must have shape z_normalized.shape[:-1] = {z_normalized.shape[:-1]}, "
                         f"got {indices.shape}")
    idx = indices.reshape(-1).astype(np.intp)
    if idx.size == 0:
        raise ValueError("z_normalized has no rows (empty batch)")
    if idx.min() < 0 or idx.max() >= k:
        raise ValueError(f"indices must be in [0, K) = [0, {k}), got values in [{idx.min()}, {idx.max()}]")
    lam = V.in_range(decay, "decay", 0.0, 1.0)
    threshold = V.in_range(dead_threshold, "dead_threshold", 0.0, math.inf)
    rng = _rng_or_none(rng)

    z64 = z.astype(np.float64)
    bins = np.bincount(idx, minlength=k).astype(np.float64)
    new_size = lam * cluster_size.astype(np.float64) + (1.0 - lam) * bins
    used = bins > 0
    sums = scatter_add_rows(idx, z64, k)[used]
    means = _unit_rows(sums / bins[used, None])
    new_codebook = codebook.astype(np.float64)
    new_codebook[used] = _unit_rows(lam * new_codebook[used] + (1.0 - lam) * means)

    n_dead = 0
    if rng is not None:
        dead = ~used & (new_size < threshold)
        n_dead = int(np.count_nonzero(dead))
        if n_dead:
            new_codebook[dead] = _unit_rows(_sample_rows(z64, n_dead, rng))
            new_size[dead] = threshold
    return new_codebook.astype(codebook.dtype), new_size.astype(cluster_size.dtype), n_dead


def vq_kmeans_init(z_normalized, k, rng, iters=10):
    """Spherical k-means initialisation of a VQ-KD codebook (the official ``kmeans_init`` option).

    Seeds: k rows of z_normalized (distinct while there are enough, else with replacement).
    Then ``iters`` Lloyd steps with cosine similarity: assign each row to the code of largest
    z^ . c (ties to the lowest index); each code with at least one point becomes the normalised mean
    of its points; a code without points (or whose points sum to zero) keeps its value.

    Shapes: z_normalized (..., D) (unit rows), k >= 1 -> codebook (k, D) in z's dtype.
    Reference: microsoft/unilm beit2/norm_ema_quantizer.py (kmeans with use_cosine_sim=True,
    EmbeddingEMA.init_embed_); 10 iterations there.
    """
    z = _flat_rows(z_normalized, "z_normalized")
    k = V.positive_int(k, "k")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    iters = V.positive_int(iters, "iters", minimum=0)
    z64 = z.astype(np.float64)
    means = _unit_rows(_sample_rows(z64, k, rng))
    for _ in range(iters):
        idx = nearest_code(z64, means)
        bins = np.bincount(idx, minlength=k)
        sums = scatter_add_rows(idx, z64, k)
        norms = np.linalg.norm(sums, axis=1)
        move = (bins > 0) & (norms > _NORMALIZE_EPS)
        means[move] = sums[move] / norms[move, None]
    return means.astype(z.dtype)
