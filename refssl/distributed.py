"""Sharded batches: each rank's loss and gradients when a global batch is split over K devices.

The executable spec for porting info_nce, clip, supcon, moco_v3, barlow_twins, vicreg and the DINO
center update to ``torch.distributed`` (canonical-definitions §24).  NumPy only; no process group:
a "rank" is a function call that receives its local rows and the gathered (all ranks') rows.

Conventions
-----------
- K ranks, global batch N_g = K n, rank r holds the contiguous rows ``r n : (r + 1) n`` (what
  ``all_gather`` + ``cat`` reconstructs).  :func:`shard` / :func:`gather` split and join.
- ``METHOD_rank(*local, *gathered, [replicated], rank=r, **hyper) -> (loss_r, cache)`` and
  ``METHOD_rank_backward(cache, grad_out=1.0) -> tuple`` with one entry per positional array, in the
  same order (``None`` for labels and stop-gradient keys).  The gradient of a *gathered* array is the
  gradient w.r.t. all N_g rows, as rank r's autograd sees it before the gather's backward.
- :func:`reduce_gradients` is that backward (``torch.distributed.nn.functional.all_gather``, or a
  GatherLayer that all-reduces the stacked gradients and keeps its own slice): rank r's gradient of
  its own rows = its local-path gradient + the sum over ranks s of the rows ``r n : (r + 1) n`` of
  rank s's gathered-array gradient.
- :func:`run` does all of it for K ranks from the global arrays.

The specification (tests/test_distributed.py checks it for every method)
--------------------------------------------------------------------------
1. **Loss.**  The mean of the K rank losses equals the single-process loss of the global batch
   (the registered op on the concatenated arrays).  For info_nce, clip, supcon, moco_v3 and the
   invariance term of vicreg each rank averages over its own anchors; for barlow_twins (correlation
   summed over ranks) and the variance/covariance terms of vicreg (gathered features) every rank holds
   the global value.  The official SimCLR reports the cross-replica mean (§24).
2. **Gradient.**  After :func:`reduce_gradients`, rank r's gradient of its own rows is the gradient of
   the **sum** of the rank losses, i.e. exactly ``K`` times rows ``r n : (r + 1) n`` of the
   single-process gradient.  DDP then averages parameter gradients over the K ranks (divides by K),
   so the parameter update equals the single-process one.  A replicated input (clip's
   ``logit_scale``) gets only its rank's own gradient; the DDP mean over ranks equals the
   single-process gradient.

Known port bugs, as variants (each tested against the spec in tests/test_distributed.py)
----------------------------------------------------------------------------------------
- :func:`reduce_gradients_no_grad_gather`: ``torch.distributed.all_gather`` has no backward; only the
  local path keeps its gradient (``splice_local=True``: open_clip's non-grad gather that puts the local
  tensor back in its own slot, so rank r also keeps its own slice of its gathered gradient).
- :func:`info_nce_rank_local_negatives`: no gather, the negatives are the local batch (lightning-bolts
  #179): the loss differs.
- :func:`info_nce_rank_labels_not_offset`, :func:`moco_v3_rank_labels_not_offset`: labels (and the
  self mask) not offset by rank * n (solo-learn #206, lightly #1176): rank 0 is right, rank > 0 wrong.
- :func:`barlow_twins_rank_per_rank_bn`: batch norm with each rank's own statistics, the correlations
  averaged over ranks (solo-learn's barlow_loss_func): the loss differs unless every shard has the
  global column means and variances.
- :func:`reduce_gradients_raw_all_reduce`: a raw ``torch.distributed.all_reduce`` (no backward) of the
  Barlow Twins correlation: each rank keeps only its own copy's gradient, exactly 1/K of the spec
  (the official facebookresearch/barlowtwins behaviour, lightly #1977).
- :func:`dino_center_update_local`: the DINO center from the local batch without the all-reduce: the
  ranks' centers differ from each other and from the spec.

The DINO loss itself is a per-sample mean with a stop-gradient teacher: rank losses on local rows
average to the global loss without any gather, so only its center update is sharded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import registry
from . import validation as V
from .numerics import logsumexp
from .state import dino_center_update

__all__ = [
    "shard", "gather", "reduce_gradients", "reduce_gradients_no_grad_gather",
    "reduce_gradients_raw_all_reduce", "run", "ShardedRun", "METHODS",
    "info_nce_rank", "info_nce_rank_backward", "clip_rank", "clip_rank_backward",
    "supcon_rank", "supcon_rank_backward", "moco_v3_rank", "moco_v3_rank_backward",
    "barlow_twins_rank", "barlow_twins_rank_backward", "vicreg_rank", "vicreg_rank_backward",
    "dino_center_update_sharded",
    "info_nce_rank_local_negatives", "info_nce_rank_labels_not_offset",
    "moco_v3_rank_labels_not_offset", "barlow_twins_rank_per_rank_bn", "dino_center_update_local",
]


# --------------------------------------------------------------------------------------- sharding
def shard(x: np.ndarray, k: int, *, axis: int = 0) -> list[np.ndarray]:
    """Split ``x`` into ``k`` equal contiguous shards along ``axis`` (rank r gets the r-th)."""
    k = V.positive_int(k, "k")
    if x.shape[axis] % k:
        raise ValueError(f"the batch axis ({x.shape[axis]} rows) must be divisible by k={k}")
    return [a.copy() for a in np.split(x, k, axis=axis)]


def gather(shards: Sequence[np.ndarray], *, axis: int = 0) -> np.ndarray:
    """all_gather + cat: the shards in rank order."""
    return np.concatenate(list(shards), axis=axis)


def _world(local: np.ndarray, gathered: np.ndarray, rank, local_name: str, gathered_name: str,
           axis: int = 0) -> tuple[int, int]:
    """(K, n) from the local and gathered shapes; rank checked against K."""
    n, n_g = local.shape[axis], gathered.shape[axis]
    if local.shape[:axis] + local.shape[axis + 1:] != gathered.shape[:axis] + gathered.shape[axis + 1:] \
            or n_g % n:
        raise ValueError(f"{gathered_name} must be the K shards of {local_name}'s shape stacked along "
                         f"axis {axis}, got {gathered_name} {gathered.shape} and {local_name} {local.shape}")
    k = n_g // n
    rank = V.positive_int(rank, "rank", minimum=0)
    if rank >= k:
        raise ValueError(f"rank must be in [0, {k}) for {k} shards, got {rank}")
    return k, rank


def _paired_views(arrays, names, rank) -> tuple[int, int]:
    """Checks shared by the two-view losses: the local views (a, b) and their gathered counterparts
    (a_all, b_all), in that order, are 2-d float arrays, each pair of one shape, the gathered rows the K
    shards of the local ones; returns (K, rank)."""
    for a, nm in zip(arrays, names):
        V.float_array(a, nm, ndim=2, shape_doc="(N, D)")
    V.same_shape(list(arrays[:2]), list(names[:2]))
    V.same_shape(list(arrays[2:]), list(names[2:]))
    return _world(arrays[0], arrays[2], rank, names[0], names[2])


def reduce_gradients(local_grads, gathered_grads, *, axis: int = 0) -> list:
    """The backward of a gradient-carrying all_gather, for all ranks at once.

    ``local_grads[r]`` is rank r's gradient of its local rows through the local path (or ``None``),
    ``gathered_grads[r]`` its gradient of the gathered array (N_g rows, or ``None``).  Returns for each
    rank ``local_grads[r] + sum_s gathered_grads[s][r n:(r + 1) n]``: the all-reduce (sum) of the
    stacked gradients followed by the own slice, which is what torch.distributed.nn.functional.all_gather
    (a reduce-scatter), vicreg's FullGatherLayer and SimCLR's differentiable TF gather compute.
    """
    k = len(local_grads)
    total = None
    for g in gathered_grads:
        if g is not None:
            total = g.copy() if total is None else total + g
    return [_combine(local_grads[r], None if total is None else np.split(total, k, axis=axis)[r])
            for r in range(k)]


def reduce_gradients_no_grad_gather(local_grads, gathered_grads, *, splice_local: bool = False,
                                    axis: int = 0) -> list:
    """Bug variant: ``torch.distributed.all_gather`` has no backward.

    ``splice_local=False``: the gathered copy is a constant, rank r keeps ``local_grads[r]`` only
    (vissl PR #123).  ``splice_local=True``: the local tensor is put back into its own slot of the
    gathered list (open_clip's gather without gather_with_grad), so rank r also keeps its own slice
    of *its own* gathered gradient, ``gathered_grads[r][r n:(r + 1) n]``, but not the other ranks'.
    """
    splice_local = V.flag(splice_local, "splice_local")
    k = len(local_grads)
    out = []
    for r in range(k):
        g = gathered_grads[r]
        own = np.split(g, k, axis=axis)[r] if (splice_local and g is not None) else None
        out.append(_combine(local_grads[r], own))
    return out


def reduce_gradients_raw_all_reduce(local_grads, gathered_grads, *, axis: int = 0) -> list:
    """Bug variant: the cross-rank sum is a raw ``torch.distributed.all_reduce`` (no backward).

    With the reduction written as a gather (barlow_twins_rank), rank r's autograd reaches only its own
    rows of its own copy: ``local_grads[r] + gathered_grads[r][r n:(r + 1) n]``.  For Barlow Twins every
    rank's copy of the loss is the same function of the global batch, so this is exactly 1/K of
    :func:`reduce_gradients` (= the single-process gradient slice; the official barlowtwins code
    and lightly before PR #1980, with learning rates tuned for it).
    """
    return reduce_gradients_no_grad_gather(local_grads, gathered_grads, splice_local=True, axis=axis)


def _combine(a, b):
    if a is None:
        return None if b is None else b.copy()
    return a.copy() if b is None else a + b


# ------------------------------------------------------------------- rows vs gathered columns core
_l2 = registry.get("l2_normalize")


def _ce_rows(logits: np.ndarray, target: np.ndarray, excluded: np.ndarray | None):
    """Row-mean soft cross-entropy sum_j target_ij (lse_i - logits_ij) / R over non-excluded columns.

    ``target`` rows sum to 1 (or 0: such a row contributes nothing, SupCon's anchors without a
    positive); ``excluded`` is a boolean mask (self-similarity).  Returns (loss, dL/dlogits).
    """
    x = logits if excluded is None else np.where(excluded, -np.inf, logits)
    lse = logsumexp(x, axis=1, keepdims=True)
    r = logits.shape[0]
    safe = np.where(target > 0, logits, 0.0)
    loss = np.sum(target * (lse - safe)) / r
    p = np.exp(x - lse)
    grad = (p * target.sum(axis=1, keepdims=True) - target) / r
    return loss, grad


def _normalize(x):
    y, cache = _l2.forward(x)
    return y, cache


def _normalize_backward(cache, g):
    return _l2.backward(cache, g)[0]


def _offset(rank, n, offset_labels):
    return rank * n if offset_labels else 0


# ----------------------------------------------------------------------------------------- info_nce
def _info_nce_rank(z1, z2, z1_all, z2_all, rank, temperature, offset_labels):
    _, rank = _paired_views((z1, z2, z1_all, z2_all), ("z1", "z2", "z1_all", "z2_all"), rank)
    tau = V.positive(temperature, "temperature")
    n, n_g = z1.shape[0], z1_all.shape[0]
    u_loc, c_loc = _normalize(np.concatenate([z1, z2]))          # (2n, D): anchors
    u_all, c_all = _normalize(np.concatenate([z1_all, z2_all]))  # (2N_g, D): columns
    logits = u_loc @ u_all.T / tau
    i = np.arange(n)
    g0 = _offset(rank, n, offset_labels) + i                     # global index of local row i
    rows = np.concatenate([i, n + i])
    self_col = np.concatenate([g0, n_g + g0])
    pos_col = np.concatenate([n_g + g0, g0])
    excluded = np.zeros(logits.shape, dtype=bool)
    excluded[rows, self_col] = True
    target = np.zeros_like(logits)
    target[rows, pos_col] = 1.0
    loss, g_logits = _ce_rows(logits, target, excluded)
    cache = (u_loc, c_loc, u_all, c_all, g_logits / tau, n, z1.dtype)
    return np.asarray(loss, dtype=z1.dtype), cache


def info_nce_rank(z1, z2, z1_all, z2_all, *, rank, temperature=0.1):
    """Rank ``rank``'s NT-Xent loss (refssl's paper scale): local anchors, gathered columns.

        u = [z1; z2] / ||.||  (2n local anchors),   U = [z1_all; z2_all] / ||.||  (2N_g columns)
        L_r = 1/(2n) sum_{local anchors a} [ -U_pos(a) . u_a / tau
                                             + log sum_{c != self(a)} exp(U_c . u_a / tau) ]

    with local row i of view 1 at global column g = rank n + i, its positive at N_g + g (view 2) and
    vice versa (labels offset by rank, as the official TF code).  mean_r L_r = info_nce(z1_all, z2_all);
    z1, z2 must be rows ``rank n : (rank + 1) n`` of z1_all, z2_all.

    Shapes: z1, z2 (n, D); z1_all, z2_all (N_g, D) -> scalar.  Backward: :func:`info_nce_rank_backward`.
    Reference: Chen et al. 2020, arXiv 2002.05709; google-research/simclr tf2/objective.py
    (add_contrastive_loss with tpu_cross_replica_concat).  Derivation of the row gradient:
    derivations/contrastive_backward.md#info_nce.
    """
    return _info_nce_rank(z1, z2, z1_all, z2_all, rank, temperature, True)


def info_nce_rank_labels_not_offset(z1, z2, z1_all, z2_all, *, rank, temperature=0.1):
    """Bug variant: positive and self columns at the *local* index i, not rank n + i (solo-learn #206).

    Identical to :func:`info_nce_rank` on rank 0; on rank > 0 each anchor's target is another
    sample's view and its own view stays in the denominator.  Backward: :func:`info_nce_rank_backward`.
    """
    return _info_nce_rank(z1, z2, z1_all, z2_all, rank, temperature, False)


def info_nce_rank_backward(cache, grad_out=1.0):
    """-> (dz1, dz2, dz1_all, dz2_all): local anchor path, then gathered column path."""
    u_loc, c_loc, u_all, c_all, g_logits, n, dtype = cache
    g = _upstream(grad_out, dtype)
    gl = g * g_logits
    d_loc = _normalize_backward(c_loc, gl @ u_all)
    d_all = _normalize_backward(c_all, gl.T @ u_loc)
    n_g = d_all.shape[0] // 2
    return d_loc[:n], d_loc[n:], d_all[:n_g], d_all[n_g:]


def info_nce_rank_local_negatives(z1, z2, *, temperature=0.1):
    """Bug variant: no gather, ``info_nce`` on the local batch only (lightning-bolts #179).

    Shapes: z1, z2 (n, D) -> scalar; the registered op's (loss, cache), backward with
    ``registry.get("info_nce").backward``.  Its negatives are 2n - 2 local rows instead of 2N_g - 2.
    """
    return registry.get("info_nce").forward(z1, z2, temperature=temperature)


def _upstream(grad_out, dtype):
    from .ops._layer_checks import upstream
    return upstream(grad_out, (), dtype)[()]


# --------------------------------------------------------------------------------------------- clip
def clip_rank(img, txt, img_all, txt_all, logit_scale, *, rank):
    """Rank ``rank``'s CLIP loss with open_clip's gather_with_grad=True, local_loss=True.

        Lambda_I = exp(s) I_loc T_all^T,  Lambda_T = exp(s) T_loc I_all^T   (n x N_g, rows L2-normalised)
        L_r = 1/2 [ CE(Lambda_I, rank n + id) + CE(Lambda_T, rank n + id) ]

    mean_r L_r = clip(img_all, txt_all, s).  Shapes: img, txt (n, D); img_all, txt_all (N_g, D);
    logit_scale 0-d (replicated: each rank gets its own dL_r/ds) -> scalar.
    Reference: Radford et al. 2021, arXiv 2103.00020; mlfoundations/open_clip src/open_clip/loss.py
    (ClipLoss, gather_features).  Derivation: derivations/contrastive_backward.md#clip.
    """
    k, rank = _paired_views((img, txt, img_all, txt_all), ("img", "txt", "img_all", "txt_all"), rank)
    s = V.scalar_array(logit_scale, "logit_scale")
    n = img.shape[0]
    scale = np.exp(s)
    i_loc, ci_loc = _normalize(img)
    t_loc, ct_loc = _normalize(txt)
    i_all, ci_all = _normalize(img_all)
    t_all, ct_all = _normalize(txt_all)
    lam_i = scale * (i_loc @ t_all.T)
    lam_t = scale * (t_loc @ i_all.T)
    target = np.zeros_like(lam_i)
    target[np.arange(n), rank * n + np.arange(n)] = 1.0
    li, gi = _ce_rows(lam_i, target, None)
    lt, gt = _ce_rows(lam_t, target, None)
    cache = (i_loc, ci_loc, t_loc, ct_loc, i_all, ci_all, t_all, ct_all, gi / 2, gt / 2, lam_i, lam_t,
             scale, img.dtype)
    return np.asarray(0.5 * (li + lt), dtype=img.dtype), cache


def clip_rank_backward(cache, grad_out=1.0):
    """-> (dimg, dtxt, dimg_all, dtxt_all, dlogit_scale)."""
    i_loc, ci_loc, t_loc, ct_loc, i_all, ci_all, t_all, ct_all, gi, gt, lam_i, lam_t, scale, dtype = cache
    g = _upstream(grad_out, dtype)
    gi, gt = g * gi, g * gt
    d_img = _normalize_backward(ci_loc, scale * (gi @ t_all))
    d_txt_all = _normalize_backward(ct_all, scale * (gi.T @ i_loc))
    d_txt = _normalize_backward(ct_loc, scale * (gt @ i_all))
    d_img_all = _normalize_backward(ci_all, scale * (gt.T @ t_loc))
    d_s = np.asarray(np.sum(gi * lam_i) + np.sum(gt * lam_t), dtype=dtype)
    return d_img, d_txt, d_img_all, d_txt_all, d_s


# ------------------------------------------------------------------------------------------- supcon
def supcon_rank(z, labels, z_all, labels_all, *, rank, temperature=0.1, base_temperature=None):
    """Rank ``rank``'s SupCon L_out: its own anchors (all views), every rank's rows as contrast.

        anchors: local rows (v, i), v < V, i < n, at global contrast index v N_g + rank n + i
        L_r = 1/(V n) sum_{local anchors} L_i   (L_i as in ``supcon`` over the V N_g gathered rows)

    mean_r L_r = supcon(z_all, labels_all).  Shapes: z (n, V, D), labels (n,), z_all (N_g, V, D),
    labels_all (N_g,) -> scalar; the labels get no gradient.  The official SupContrast trains on one
    process; this is the sharding that reproduces it (anchors local, contrast gathered with gradient).
    Reference: Khosla et al. 2020, arXiv 2004.11362; HobbitLong/SupContrast losses.py.
    Derivation: derivations/contrastive_backward.md#supcon.
    """
    V.float_array(z, "z", ndim=3, shape_doc="(n, V, D)")
    V.float_array(z_all, "z_all", ndim=3, shape_doc="(N_g, V, D)")
    k, rank = _world(z, z_all, rank, "z", "z_all")
    n, nv, d = z.shape
    n_g = z_all.shape[0]
    y = V.labels_array(labels, "labels", n)
    y_all = V.labels_array(labels_all, "labels_all", n_g)
    if not np.array_equal(y, y_all[rank * n:(rank + 1) * n]):
        raise ValueError("labels must be rows rank*n:(rank+1)*n of labels_all")
    tau = V.positive(temperature, "temperature")
    tau_b = tau if base_temperature is None else V.positive(base_temperature, "base_temperature")
    u_loc, c_loc = _normalize(np.ascontiguousarray(z.transpose(1, 0, 2)).reshape(nv * n, d))
    u_all, c_all = _normalize(np.ascontiguousarray(z_all.transpose(1, 0, 2)).reshape(nv * n_g, d))
    logits = u_loc @ u_all.T / tau
    y_rows, y_cols = np.tile(y, nv), np.tile(y_all, nv)
    self_col = (np.arange(nv)[:, None] * n_g + rank * n + np.arange(n)[None, :]).reshape(-1)
    excluded = np.zeros(logits.shape, dtype=bool)
    excluded[np.arange(nv * n), self_col] = True
    pos = (y_rows[:, None] == y_cols[None, :]) & ~excluded
    count = pos.sum(axis=1, keepdims=True)
    target = pos / np.maximum(count, 1)
    loss, g_logits = _ce_rows(logits, target.astype(z.dtype), excluded)
    f = tau / tau_b
    cache = (u_loc, c_loc, u_all, c_all, f * g_logits / tau, n, nv, n_g, z.dtype)
    return np.asarray(f * loss, dtype=z.dtype), cache


def supcon_rank_backward(cache, grad_out=1.0):
    """-> (dz, None, dz_all, None)."""
    u_loc, c_loc, u_all, c_all, g_logits, n, nv, n_g, dtype = cache
    gl = _upstream(grad_out, dtype) * g_logits
    d_loc = _normalize_backward(c_loc, gl @ u_all).reshape(nv, n, -1).transpose(1, 0, 2)
    d_all = _normalize_backward(c_all, gl.T @ u_loc).reshape(nv, n_g, -1).transpose(1, 0, 2)
    return np.ascontiguousarray(d_loc), None, np.ascontiguousarray(d_all), None


# ------------------------------------------------------------------------------------------ moco_v3
def _moco_v3_rank(q1, q2, k1_all, k2_all, rank, temperature, offset_labels):
    k, rank = _paired_views((q1, q2, k1_all, k2_all), ("q1", "q2", "k1_all", "k2_all"), rank)
    tau = V.positive(temperature, "temperature")
    n = q1.shape[0]
    qh1, cq1 = _normalize(q1)
    qh2, cq2 = _normalize(q2)
    kh1, _ = _normalize(k1_all)
    kh2, _ = _normalize(k2_all)
    target = np.zeros((n, k1_all.shape[0]), dtype=q1.dtype)
    target[np.arange(n), _offset(rank, n, offset_labels) + np.arange(n)] = 1.0
    l1, g1 = _ce_rows(qh1 @ kh2.T / tau, target, None)
    l2, g2 = _ce_rows(qh2 @ kh1.T / tau, target, None)
    # 2 tau CE(. / tau): the cosine gradient is 2 (softmax - onehot) / n, no 1/tau
    cache = (cq1, cq2, kh1, kh2, 2.0 * g1, 2.0 * g2, q1.dtype)
    return np.asarray(2.0 * tau * (l1 + l2), dtype=q1.dtype), cache


def moco_v3_rank(q1, q2, k1_all, k2_all, *, rank, temperature=1.0):
    """Rank ``rank``'s MoCo v3 loss: local queries, keys all-gathered *without* gradient.

        L_r = 2 tau CE(q1_loc k2_all^T / tau, rank n + id) + 2 tau CE(q2_loc k1_all^T / tau, rank n + id)

    (rows L2-normalised).  mean_r L_r = moco_v3(q1_all, q2_all, k1_all, k2_all).  Shapes: q1, q2 (n, D);
    k1_all, k2_all (N_g, D), stop-gradient -> scalar.  The queries are not gathered, so
    :func:`reduce_gradients` only passes the local gradient through.
    Reference: Chen, Xie & He 2021, arXiv 2104.02057; facebookresearch/moco-v3 moco/builder.py
    (contrastive_loss, concat_all_gather).  Derivation: derivations/teacher_student.md#moco_v3.
    """
    return _moco_v3_rank(q1, q2, k1_all, k2_all, rank, temperature, True)


def moco_v3_rank_labels_not_offset(q1, q2, k1_all, k2_all, *, rank, temperature=1.0):
    """Bug variant: labels ``arange(n)`` instead of ``arange(n) + n rank``: on rank > 0 every query's
    target is a key of rank 0.  Backward: :func:`moco_v3_rank_backward`."""
    return _moco_v3_rank(q1, q2, k1_all, k2_all, rank, temperature, False)


def moco_v3_rank_backward(cache, grad_out=1.0):
    """-> (dq1, dq2, None, None)."""
    cq1, cq2, kh1, kh2, g1, g2, dtype = cache
    g = _upstream(grad_out, dtype)
    return (_normalize_backward(cq1, g * (g1 @ kh2)), _normalize_backward(cq2, g * (g2 @ kh1)),
            None, None)


# ------------------------------------------------------------------------------------ barlow_twins
def barlow_twins_rank(z1, z2, z1_all, z2_all, *, rank, lambd=0.0051):
    """Rank ``rank``'s Barlow Twins loss: SyncBN statistics and the correlation summed over ranks.

    The official code computes, on every rank, c_r = BN(z1)_loc^T BN(z2)_loc / N_g with global (SyncBN)
    statistics and sums c_r over ranks; sum_r c_r is the correlation of the gathered batch, so
    L_r = barlow_twins(z1_all, z2_all) on every rank (the registered op).  The local arrays enter only
    through the gather; with a differentiable all_reduce each rank's gradient is the gathered one and
    :func:`reduce_gradients` gives K times the single-process slice.  The official raw all_reduce
    gives the slice itself: :func:`reduce_gradients_raw_all_reduce`.

    Shapes: z1, z2 (n, D); z1_all, z2_all (N_g, D) -> scalar.
    Reference: Zbontar et al. 2021, arXiv 2103.03230; facebookresearch/barlowtwins main.py.
    Derivation: derivations/ib_connection.md#barlow_twins.
    """
    V.float_array(z1, "z1", ndim=2, shape_doc="(n, D)")
    V.float_array(z2, "z2", ndim=2, shape_doc="(n, D)")
    _world(z1, z1_all, rank, "z1", "z1_all")
    _world(z2, z2_all, rank, "z2", "z2_all")
    loss, cache = registry.get("barlow_twins").forward(z1_all, z2_all, lambd=lambd)
    return loss, ("global", cache, z1.shape, z1.dtype)


def barlow_twins_rank_per_rank_bn(z1, z2, z1_all, z2_all, *, rank, lambd=0.0051):
    """Bug variant (solo-learn's barlow_loss_func): batch norm with each rank's *own* statistics,
    C = (1/K) sum_s BN_s(z1_s)^T BN_s(z2_s) / n, then the Barlow Twins terms of C.

    Without solo-learn's 0.025 scale and with a differentiable reduction, so only the statistics
    differ from :func:`barlow_twins_rank`.  Equal to it exactly when every shard has the global column
    means and variances.  Backward: :func:`barlow_twins_rank_backward`.
    """
    V.float_array(z1, "z1", ndim=2, shape_doc="(n, D)")
    k, rank = _world(z1, z1_all, rank, "z1", "z1_all")
    _world(z2, z2_all, rank, "z2", "z2_all")
    lam = V.positive(lambd, "lambd")
    std = registry.get("batch_standardize")
    s1 = [std.forward(a) for a in shard(z1_all, k)]
    s2 = [std.forward(a) for a in shard(z2_all, k)]
    n, d = z1.shape
    c = sum(a[0].T @ b[0] for a, b in zip(s1, s2)) / (k * n)
    off = ~np.eye(d, dtype=bool)
    loss = np.sum((1.0 - np.diag(c)) ** 2) + lam * np.sum(c[off] ** 2)
    gc = np.where(off, 2.0 * lam * c, 0.0)
    gc[np.diag_indices(d)] = 2.0 * (np.diag(c) - 1.0)
    return np.asarray(loss, dtype=z1.dtype), ("per_rank", (s1, s2, gc, k * n), z1.shape, z1.dtype)


def barlow_twins_rank_backward(cache, grad_out=1.0):
    """-> (dz1, dz2, dz1_all, dz2_all); the local slots are zero (everything flows through the gather)."""
    kind, inner, shape, dtype = cache
    g = _upstream(grad_out, dtype)
    if kind == "global":
        d1, d2 = registry.get("barlow_twins").backward(inner, np.asarray(g, dtype=dtype))
    else:
        std = registry.get("batch_standardize")
        s1, s2, gc, n_g = inner
        d1 = gather([std.backward(a[1], g * b[0] @ gc.T / n_g)[0] for a, b in zip(s1, s2)])
        d2 = gather([std.backward(b[1], g * a[0] @ gc / n_g)[0] for a, b in zip(s1, s2)])
    zero = np.zeros(shape, dtype=dtype)
    return zero, zero.copy(), d1, d2


# ------------------------------------------------------------------------------------------- vicreg
def vicreg_rank(x, y, x_all, y_all, *, rank, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4,
                batch_size=None):
    """Rank ``rank``'s VICReg loss as the official code: invariance on the local batch, variance and
    covariance on the features gathered with gradient (FullGatherLayer).

        L_r = sim_coeff mse(x_loc, y_loc) + [vicreg(x_all, y_all) without its invariance term]

    with the covariance denominator ``batch_size - 1``, ``batch_size`` the configured global batch
    (default N_g).  mean_r L_r = vicreg(x_all, y_all, batch_size=batch_size).  Shapes: x, y (n, D);
    x_all, y_all (N_g, D) -> scalar.
    Reference: Bardes et al. 2022, arXiv 2105.04906; facebookresearch/vicreg main_vicreg.py
    (VICReg.forward, FullGatherLayer).  Derivation: derivations/ib_connection.md#vicreg.
    """
    V.float_array(x, "x", ndim=2, shape_doc="(n, D)")
    V.float_array(y, "y", ndim=2, shape_doc="(n, D)")
    V.same_shape([x, y], ["x", "y"])
    _world(x, x_all, rank, "x", "x_all")
    _world(y, y_all, rank, "y", "y_all")
    bs = x_all.shape[0] if batch_size is None else batch_size
    a = V.in_range(sim_coeff, "sim_coeff", 0.0, np.inf)
    diff = x - y
    inv = np.mean(diff * diff)
    rest, cache = registry.get("vicreg").forward(x_all, y_all, sim_coeff=0.0, std_coeff=std_coeff,
                                                 cov_coeff=cov_coeff, eps=eps, batch_size=bs)
    return np.asarray(a * inv + rest, dtype=x.dtype), (a, diff, cache, x.dtype)


def vicreg_rank_backward(cache, grad_out=1.0):
    """-> (dx, dy, dx_all, dy_all)."""
    a, diff, inner, dtype = cache
    g = _upstream(grad_out, dtype)
    d_inv = (g * a * 2.0 / diff.size) * diff
    dx_all, dy_all = registry.get("vicreg").backward(inner, np.asarray(g, dtype=dtype))
    return d_inv.astype(dtype), (-d_inv).astype(dtype), dx_all, dy_all


# --------------------------------------------------------------------------------- DINO center
def _center_shards(center, teacher_shards):
    V.float_array(center, "center", shape_doc="(K,) or (1, K)")
    out = []
    for r, t in enumerate(teacher_shards):
        V.float_array(t, f"teacher_shards[{r}]", shape_doc="(V_t, n, K)")
        if t.ndim != 3 or t.shape[-1] != center.shape[-1] or t.shape != teacher_shards[0].shape:
            raise ValueError(f"teacher_shards[{r}] must have shape (V_t, n, {center.shape[-1]}), the same "
                             f"on every rank, got {t.shape}")
        out.append(t)
    return out


def dino_center_update_sharded(center, teacher_shards, *, momentum=0.9) -> list[np.ndarray]:
    """The DINO center update on K ranks, as the official code: each rank sums its raw teacher outputs,
    the sums are all-reduced and divided by (rows per rank) x K.

        c_r <- m c + (1 - m) (sum_s sum(teacher_s)) / (V_t n K)     (the same on every rank)

    ``teacher_shards[r]`` (V_t, n, K): rank r's teacher outputs (the batch axis sharded).  Returns the
    K ranks' new centers; each equals ``refssl.state.dino_center_update(center, teacher_all)``.
    Reference: Caron et al. 2021, arXiv 2104.14294; facebookresearch/dino main_dino.py
    (DINOLoss.update_center).
    """
    shards = _center_shards(center, teacher_shards)
    m = V.in_range(momentum, "momentum", 0.0, 1.0)
    total = sum(t.reshape(-1, t.shape[-1]).sum(axis=0, dtype=np.float64) for t in shards)
    rows = shards[0].shape[0] * shards[0].shape[1]
    new = m * center.astype(np.float64) + (1.0 - m) * (total / (rows * len(shards))).reshape(center.shape)
    return [new.astype(center.dtype) for _ in shards]


def dino_center_update_local(center, teacher_shards, *, momentum=0.9) -> list[np.ndarray]:
    """Bug variant: no all_reduce; rank r's center follows its own batch mean, so the ranks' centers
    drift apart (their mean is still the spec's center: the update is linear)."""
    shards = _center_shards(center, teacher_shards)
    return [dino_center_update(center, t, momentum=momentum) for t in shards]


# --------------------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class Method:
    """How a sharded method maps the global arrays to one rank's arguments.

    ``sharded``: names of the global inputs split over ranks and also passed gathered (after all
    locals); ``replicated``: passed as is after them; ``op``: the registered single-process op.
    """

    name: str
    forward: Callable
    backward: Callable
    sharded: tuple[str, ...]
    gathered: tuple[str, ...]
    replicated: tuple[str, ...] = ()
    op: str = ""


METHODS = {
    "info_nce": Method("info_nce", info_nce_rank, info_nce_rank_backward, ("z1", "z2"), ("z1", "z2"),
                       op="info_nce"),
    "clip": Method("clip", clip_rank, clip_rank_backward, ("img", "txt"), ("img", "txt"),
                   ("logit_scale",), op="clip"),
    "supcon": Method("supcon", supcon_rank, supcon_rank_backward, ("z", "labels"), ("z", "labels"),
                     op="supcon"),
    "moco_v3": Method("moco_v3", moco_v3_rank, moco_v3_rank_backward, ("q1", "q2"), ("k1", "k2"),
                      op="moco_v3"),
    "barlow_twins": Method("barlow_twins", barlow_twins_rank, barlow_twins_rank_backward, ("z1", "z2"),
                           ("z1", "z2"), op="barlow_twins"),
    "vicreg": Method("vicreg", vicreg_rank, vicreg_rank_backward, ("x", "y"), ("x", "y"), op="vicreg"),
}


@dataclass
class ShardedRun:
    """What K ranks compute: ``losses[r]`` and ``grads[r]``, rank r's gradient of each global input's
    own rows after the reduction (a dict by input name; replicated inputs: the rank's own gradient;
    inputs without gradient absent)."""

    losses: list
    grads: list


def run(method, k: int, *arrays, forward=None, reduce=reduce_gradients, **hyper) -> ShardedRun:
    """Run ``method`` (a key of :data:`METHODS`) on ``k`` ranks from the global arrays.

    ``arrays`` are the single-process op's array inputs, in its order (e.g. moco_v3: q1, q2, k1, k2;
    clip: img, txt, logit_scale).  ``forward`` replaces the rank forward (a variant with the same
    signature and backward); ``reduce`` the gather's backward (:func:`reduce_gradients_no_grad_gather`,
    :func:`reduce_gradients_raw_all_reduce`).
    """
    m = METHODS[method]
    k = V.positive_int(k, "k")
    names = {"moco_v3": ("q1", "q2", "k1", "k2"), "clip": ("img", "txt", "logit_scale"),
             "supcon": ("z", "labels")}.get(method, m.sharded)
    if len(arrays) != len(names):
        raise TypeError(f"{method} takes {len(names)} arrays ({', '.join(names)}), got {len(arrays)}")
    glob = dict(zip(names, arrays))
    shards = {nm: shard(glob[nm], k) for nm in m.sharded}
    fwd = forward or m.forward
    losses, local, gath, rep = [], [], [], []
    for r in range(k):
        args = [shards[nm][r] for nm in m.sharded] + [glob[nm] for nm in m.gathered] \
            + [glob[nm] for nm in m.replicated]
        loss, cache = fwd(*args, rank=r, **hyper)
        g = m.backward(cache, 1.0)
        ns, ng = len(m.sharded), len(m.gathered)
        losses.append(loss)
        local.append(g[:ns])
        gath.append(g[ns:ns + ng])
        rep.append(g[ns + ng:])
    grads = [dict() for _ in range(k)]
    for nm in m.sharded:   # gathered-only inputs (MoCo v3's keys) are stop-gradient
        lg = [local[r][m.sharded.index(nm)] for r in range(k)]
        gg = [gath[r][m.gathered.index(nm)] if nm in m.gathered else None for r in range(k)]
        for r, gr in enumerate(reduce(lg, gg)):
            if gr is not None:
                grads[r][nm] = gr
    for r in range(k):
        for nm, gr in zip(m.replicated, rep[r]):
            grads[r][nm] = gr
    return ShardedRun(losses, grads)
