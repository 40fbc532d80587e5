"""Invariance measures of Purushwalkam & Gupta (NeurIPS 2020, arXiv 2007.13916), after Goodfellow et al.
(2009), "Measuring Invariances in Deep Networks"; the procedure follows the official
senthilps8/demystifyssl measure_invariances.py.

A unit i *fires* on x when f_i(x) > t_i.  With |Y| targets (classes, or instance ids when there are none):

- threshold t_i: the activation at rank floor(N p / 100) of the sorted dataset activations, where
  p = min((1 - 1/|Y|) 100, 95);  a mirrored threshold for the negated sign is taken from the same rank of
  the descending order, and a unit fires negatively when f_i(x) < t_i^-.
- global firing rate G(i) = mean_x 1[f_i(x) >= t_i] over the dataset, i.e. max(1/|Y|, 0.05) up to ties.
- local firing rate over the trajectories z of target y on which unit i fires at least once,
      L_y(i) = mean_{z in Z_y(i)} (1/|T(z)|) sum_{x in T(z)} 1[unit i fires on x],
  where on each trajectory the sign with more firings is used; trajectories with fewer than 3 frames are
  skipped.
- target-conditioned invariance J_y(i) = L_y(i) / G(i).
- score Inv_k = mean_y mean of the top-k J_y(i), reported as Inv_k * (100 - p), i.e. (without ties) the mean
  top-k local firing rate in percent: a unit that fires on every frame of every trajectory on which it
  fires at all scores 100.

Ties: with many equal activations (ReLU zeros, background pixels) the threshold sits on the tie, the
empirical G exceeds max(1/|Y|, 0.05) and the score no longer reads as a percentage; this follows the
official code, so compare such representations with care.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import validation as V

__all__ = ["firing_thresholds", "InvarianceResult", "invariance_scores", "invariance_table"]


def _feats(x, name):
    return V.float_array(x, name, ndim=2, shape_doc="(N, D)")


def firing_percent(n_targets: int) -> float:
    """The percentile p = min((1 - 1/|Y|) * 100, 95) at which units are thresholded."""
    if not isinstance(n_targets, (int, np.integer)) or n_targets < 1:
        raise ValueError(f"n_targets must be an integer >= 1, got {n_targets!r}")
    return min((1.0 - 1.0 / n_targets) * 100.0, 95.0)


def firing_thresholds(features, n_targets):
    """Per-unit thresholds from the dataset activations ``features`` (N, D).

    Returns ``(t_pos (D,), t_neg (D,), global_rate (D,), p)``: the positive and negated-sign thresholds,
    the empirical global firing rate mean(f >= t_pos) and the percentile p.
    """
    features = _feats(features, "features")
    p = firing_percent(n_targets)
    n = len(features)
    index = min(int((n * p) // 100), n - 1)
    t_pos = np.sort(features, axis=0)[index]
    t_neg = -np.sort(-features, axis=0)[index]
    g = np.mean(features >= t_pos, axis=0)
    return t_pos, t_neg, g, p


@dataclass(frozen=True)
class InvarianceResult:
    """t_pos, t_neg, global_rate: (D,);  local_rate, J: (|Y|, D) (rows in the order of ``targets``);
    scores: {k: Inv_k * (100 - p)};  targets: the target values;  p: the firing percentile."""

    t_pos: np.ndarray
    t_neg: np.ndarray
    global_rate: np.ndarray
    local_rate: np.ndarray
    J: np.ndarray
    scores: dict
    targets: np.ndarray
    p: float


def invariance_scores(features, n_targets, traj_features, traj_id, traj_target, *, ks=(10, 25),
                      min_length=3) -> InvarianceResult:
    """Invariance of each unit along transformation trajectories, and the top-k score.

    features : (N, D) activations on the dataset (sets thresholds and the global firing rate).
    n_targets : |Y|, the number of classes (or of instances when targets are instance ids).
    traj_features : (M, D) activations on the trajectory frames.
    traj_id : (M,) int, the trajectory of each frame.
    traj_target : (M,) int, the target (class) of each frame; a trajectory takes its first frame's.
    ks : the k of the top-k scores (clamped to D).
    The score averages over the distinct values of ``traj_target``; a target none of whose trajectories
    has ``min_length`` frames contributes 0, as in the official code.
    """
    t_pos, t_neg, g, p = firing_thresholds(features, n_targets)
    tf = _feats(traj_features, "traj_features")
    if tf.shape[1] != len(t_pos):
        raise ValueError(f"traj_features must have {len(t_pos)} columns like features, got {tf.shape[1]}")
    traj_id = np.asarray(traj_id)
    traj_target = np.asarray(traj_target)
    if traj_id.shape != (len(tf),) or traj_target.shape != (len(tf),):
        raise ValueError(f"traj_id and traj_target must have shape ({len(tf)},)")
    order = np.argsort(traj_id, kind="stable")
    ids, starts, lengths = np.unique(traj_id[order], return_index=True, return_counts=True)
    # firing counts per trajectory (one row each), summed over its frames in one reduceat
    pos = np.add.reduceat((tf[order] > t_pos).astype(np.int64), starts, axis=0)
    neg = np.add.reduceat((tf[order] < t_neg).astype(np.int64), starts, axis=0)
    count = np.maximum(pos, neg)
    keep = lengths >= min_length
    count, lengths = count[keep], lengths[keep]
    # as in the official code, every target counts in the mean score, also one whose trajectories were all
    # too short (its local rates are then 0)
    targets = np.unique(traj_target)
    tgt_idx = np.searchsorted(targets, traj_target[order][starts][keep])
    fired = count > 0
    frac = np.where(fired, count / lengths[:, None], 0.0)
    onehot = np.zeros((len(targets), len(tgt_idx)))
    onehot[tgt_idx, np.arange(len(tgt_idx))] = 1.0
    local = (onehot @ frac) / np.maximum(onehot @ fired, 1e-20)  # units that never fire get 0
    J = local / g[None, :]
    J_sorted = -np.sort(-J, axis=1)
    scores = {}
    for k in ks:
        kk = min(int(k), J.shape[1])
        scores[int(k)] = float(J_sorted[:, :kk].mean(axis=1).mean() * (100.0 - p))
    return InvarianceResult(t_pos, t_neg, g, local, J, scores, targets, p)


def invariance_table(encode, dataset_images, factors, rng, *, vary=("color", "shape", "position", "size",
                                                                     "rotation"),
                     target="shape", n_instances=200, n_steps=8, ks=(10, 25), name="representation"):
    """Invariance of a representation to each latent factor of the colored shapes.

    encode : callable mapping images (M, 3, S, S) to features (M, D).
    dataset_images, factors : a dataset split; its features set the thresholds, and its first
        ``n_instances`` instances are re-rendered along a trajectory of each factor in ``vary``
        (:func:`refssl.data.trajectories`; position paths are drawn from ``rng``).
    target : the factor whose classes are the targets Y (``"shape"`` or ``"color"``), or ``"instance"``
        (each instance its own target, the fallback of the official code).

    Returns ``(results, markdown)`` with ``results[factor] = {k: score}``.  A factor the representation
    is invariant to scores high (100 at most): units that fire on a trajectory keep firing along it.
    """
    from ..data.augment import trajectories
    from ..data.shapes import N_COLORS, SHAPES

    if target not in ("shape", "color", "instance"):
        raise ValueError(f"target must be 'shape', 'color' or 'instance', got {target!r}")
    size = dataset_images.shape[-1]
    feats = np.asarray(encode(dataset_images), dtype=np.float64)
    inst = factors.take(slice(0, min(n_instances, len(factors))))
    n_targets = {"shape": len(SHAPES), "color": N_COLORS, "instance": len(inst)}[target]
    results = {}
    for factor in vary:
        tr = trajectories(inst, factor, rng, n_steps=n_steps, size=size)
        tf = np.asarray(encode(tr.images), dtype=np.float64)
        # the target of a trajectory is the instance's own class (constant along every trajectory
        # except the one that varies that very factor, where the first frame's class is used)
        tgt = tr.traj_id if target == "instance" else getattr(inst, target)[tr.traj_id]
        results[factor] = invariance_scores(feats, n_targets, tf, tr.traj_id, tgt, ks=ks).scores
    lines = [f"| {name}: varied factor | " + " | ".join(f"Inv top-{k}" for k in ks) + " |",
             "|---|" + "---:|" * len(ks)]
    for factor, sc in results.items():
        lines.append(f"| {factor} | " + " | ".join(f"{sc[k]:.1f}" for k in ks) + " |")
    return results, "\n".join(lines)
