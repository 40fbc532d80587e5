"""Scalar diagnostics of an embedding: effective rank (a collapse detector), k-means clustering accuracy
with Hungarian matching, and the alignment / uniformity metrics of Wang & Isola (arXiv 2005.10242)."""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..clustering import clustering_accuracy, kmeans

__all__ = ["effective_rank", "kmeans_accuracy", "alignment_metric", "uniformity_metric"]


def _matrix(x, name):
    return V.float_array(x, name, ndim=2, shape_doc="(N, D)")


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


def kmeans_accuracy(z, labels, rng, *, k=None, n_init=4):
    """k-means on z (k = number of distinct labels by default), then Hungarian-matched accuracy.

    Uses :func:`refssl.clustering.kmeans` and :func:`refssl.clustering.clustering_accuracy`.
    """
    labels = np.asarray(labels)
    k = int(len(np.unique(labels)) if k is None else k)
    pred = kmeans(_matrix(z, "z").astype(np.float64), k, rng, n_init=n_init, max_iter=100).assignments
    return float(clustering_accuracy(labels, pred))


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
