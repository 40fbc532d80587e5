"""Scalar diagnostics of an embedding: effective rank (a collapse detector), clustering accuracy with
Hungarian matching, k-means, and the alignment / uniformity metrics of Wang & Isola (arXiv 2005.10242)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["effective_rank", "cluster_accuracy", "kmeans", "clustering_accuracy", "alignment_metric",
           "uniformity_metric"]


def _matrix(x, name):
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise TypeError(f"{name} must be a float numpy array of shape (N, D)")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, D) with N, D >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def effective_rank(z, *, center=False, eps=1e-12):
    """Effective rank exp(H(p)) of the singular values sigma of z (N, D), with p = sigma / sum(sigma) and H
    the Shannon entropy (Roy & Vetterli 2007; used as RankMe by Garrido et al. 2023, arXiv 2210.02885).

    It lies in [1, min(N, D)]: 1 for a rank-one (fully collapsed) embedding, min(N, D) when all singular
    values are equal.  ``center`` subtracts the mean row first (then a constant embedding has rank 0 ->
    returned as 0.0).  Singular values below eps * max are treated as zero.
    """
    z = _matrix(z, "z").astype(np.float64)
    if center:
        z = z - z.mean(axis=0)
    s = np.linalg.svd(z, compute_uv=False)
    if s.size == 0 or s[0] <= 0:
        return 0.0
    s = s[s > eps * s[0]]
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def cluster_accuracy(y_true, y_pred):
    """Accuracy of a clustering under the best one-to-one matching of clusters to classes (Hungarian
    algorithm on the contingency table).  Works for any numbers of clusters and classes; points in
    unmatched clusters count as errors."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true and y_pred must be non-empty 1-d arrays of one shape, got "
                         f"{y_true.shape} and {y_pred.shape}")
    classes, ti = np.unique(y_true, return_inverse=True)
    clusters, pi = np.unique(y_pred, return_inverse=True)
    table = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(table, (pi, ti), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(y_true))


def kmeans(x, k, rng, *, n_iter=100, n_init=4):
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007); the best of ``n_init`` runs by
    inertia.  Returns ``(labels (N,), centers (k, D))``."""
    x = _matrix(x, "x").astype(np.float64)
    n = len(x)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}], got {k!r}")
    sq = (x * x).sum(1)
    best = None
    for _ in range(n_init):  # a few restarts; each run is vectorised over points
        centers = np.empty((k, x.shape[1]))
        centers[0] = x[rng.integers(n)]
        d2 = np.maximum(sq - 2 * x @ centers[0] + centers[0] @ centers[0], 0.0)
        for j in range(1, k):  # seeding picks centres one at a time by definition
            total = d2.sum()
            i = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
            centers[j] = x[i]
            d2 = np.minimum(d2, np.maximum(sq - 2 * x @ centers[j] + centers[j] @ centers[j], 0.0))
        labels = None
        for _ in range(n_iter):
            dist = sq[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None, :]
            new = np.argmin(dist, axis=1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            onehot = np.zeros((n, k))
            onehot[np.arange(n), labels] = 1.0
            counts = onehot.sum(0)
            sums = onehot.T @ x
            nonempty = counts > 0
            centers[nonempty] = sums[nonempty] / counts[nonempty, None]
        inertia = np.maximum(dist[np.arange(n), labels], 0.0).sum()
        if best is None or inertia < best[0]:
            best = (inertia, labels, centers.copy())
    return best[1], best[2]


def clustering_accuracy(z, labels, rng, *, k=None, n_init=4):
    """k-means on z (k = number of distinct labels by default), then Hungarian-matched accuracy."""
    labels = np.asarray(labels)
    k = int(len(np.unique(labels)) if k is None else k)
    pred, _ = kmeans(z, k, rng, n_init=n_init)
    return cluster_accuracy(labels, pred)


def _unit_rows(z):
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def alignment_metric(z1, z2, *, alpha=2, normalize=True):
    """L_align = mean_i ||x_i - y_i||^alpha of two views' embeddings (N, D), L2-normalised first unless
    ``normalize=False``; evaluated with the registered ``alignment`` op.  0 for identical views, 4 (alpha
    = 2) for antipodal ones."""
    from .. import registry

    z1, z2 = _matrix(z1, "z1").astype(np.float64), _matrix(z2, "z2").astype(np.float64)
    if normalize:
        z1, z2 = _unit_rows(z1), _unit_rows(z2)
    return float(registry.get("alignment").forward(z1, z2, alpha=alpha)[0])


def uniformity_metric(z, *, t=2, normalize=True, rng=None, max_points=512):
    """L_unif = log mean_{i<j} exp(-t ||x_i - x_j||^2) of embeddings (N, D), L2-normalised first unless
    ``normalize=False``; evaluated with the registered ``uniformity`` op over unique pairs.

    The op holds every pair difference in memory (N (N - 1) / 2 x D), so above ``max_points`` rows the
    metric is estimated on a random subset of that many rows drawn from ``rng`` (required then).  Lower
    is more uniform; on S^{D-1} it is bounded below by the value of the uniform distribution.
    """
    from .. import registry

    z = _matrix(z, "z").astype(np.float64)
    if len(z) > max_points:
        if rng is None:
            raise ValueError(f"z has {len(z)} rows > max_points={max_points}: pass rng to subsample, "
                             f"or raise max_points")
        z = z[np.sort(rng.choice(len(z), size=max_points, replace=False))]
    if normalize:
        z = _unit_rows(z)
    return float(registry.get("uniformity").forward(z, t=t)[0])
