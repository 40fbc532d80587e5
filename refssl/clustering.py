"""Clustering for ProtoNCE and I-Con: k-means (E-step), concentration, the EM loop, Hungarian accuracy.

Nothing here is a differentiable op; everything is deterministic given an
``np.random.Generator``.

* :func:`kmeans` -- Lloyd's algorithm with k-means++ seeding and restarts
  (the official PCL E-step uses faiss: 20 iterations, 5 restarts; faiss also
  subsamples to at most 1000 points per centroid for training, which is not replicated).
* :func:`concentration` -- the per-prototype concentration phi of PCL's
  ``run_kmeans``, step by step.
* :func:`e_step` -- M clusterings of L2-normalised features, stacked in the
  layout of :func:`refssl.ops.protonce.proto_nce_forward`.
* :func:`protonce_em` -- a small end-to-end EM loop (linear encoder, momentum
  encoder, queue) on fixed features.
* :func:`clustering_accuracy` -- accuracy under the best one-to-one matching
  of clusters to classes (Hungarian algorithm).
* :func:`soft_kmeans_objective` -- the k-means objective with soft assignments.

Derivations: derivations/protonce_em.md#e-step (hard EM by k-means on the
momentum features, the average over M clusterings),
derivations/protonce_em.md#concentration (phi, steps 1-5),
derivations/protonce_em.md#the-em-loop (the loop); the soft k-means objective
as a reverse I-Con loss: derivations/icon.md#kmeans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from . import validation as V
from .ops.icon_kernels import squared_distances
from .ops.normalize import l2_normalize_forward
from .ops.protonce import proto_nce_backward, proto_nce_forward

__all__ = ["KMeansResult", "kmeans", "concentration", "Clusterings", "e_step", "clustering_accuracy",
           "soft_kmeans_objective", "EMHistory", "protonce_em"]


def _generator(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return rng


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------

@dataclass
class KMeansResult:
    centroids: np.ndarray    # (k, D)
    assignments: np.ndarray  # (n,) int64, index of the nearest centroid
    inertia: float           # sum_i ||x_i - c_{a_i}||^2
    n_iter: int              # Lloyd iterations of the returned restart


def _kmeans_pp(x, k, rng):
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with probability
    proportional to the squared distance to the nearest centre already chosen."""
    n = x.shape[0]
    centres = np.empty((k, x.shape[1]), dtype=np.float64)
    centres[0] = x[rng.integers(n)]
    closest = squared_distances(x, centres[:1])[0][:, 0]
    for c in range(1, k):
        total = closest.sum()
        # all points coincide with chosen centres: any point is as good as another
        idx = rng.integers(n) if total <= 0 else rng.choice(n, p=closest / total)
        centres[c] = x[idx]
        closest = np.minimum(closest, squared_distances(x, centres[c:c + 1])[0][:, 0])
    return centres


def _lloyd(x, centres, max_iter):
    n, k = x.shape[0], centres.shape[0]
    assign = None
    for it in range(1, max_iter + 1):
        d = squared_distances(x, centres)[0]
        new = np.argmin(d, axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, x)
        centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            # re-seed empty clusters at the points farthest from their centroid (deterministic)
            far = np.argsort(-d[np.arange(n), assign], kind="stable")[:empty.size]
            centres[empty] = x[far]
    d = squared_distances(x, centres)[0]
    assign = np.argmin(d, axis=1)
    return centres, assign, float(d[np.arange(n), assign].sum()), it


def kmeans(x, k, rng, *, n_init=5, max_iter=20):
    """k-means with k-means++ seeding and ``n_init`` restarts; the lowest inertia wins.

    x (n, D) float; k <= n clusters; ``rng`` an ``np.random.Generator`` (the
    result is a deterministic function of its state).  Defaults follow the
    official PCL E-step (faiss niter = 20, nredo = 5).  Returns a
    :class:`KMeansResult`; assignments are the nearest centroids of the
    returned centres (ties to the lower index).
    """
    V.float_array(x, "x", ndim=2, shape_doc="(n, D)")
    k = V.positive_int(k, "k")
    if k > x.shape[0]:
        raise ValueError(f"k must be <= n = {x.shape[0]} points, got {k}")
    n_init = V.positive_int(n_init, "n_init")
    max_iter = V.positive_int(max_iter, "max_iter")
    rng = _generator(rng)
    x64 = x.astype(np.float64)
    best = None
    for _ in range(n_init):
        res = _lloyd(x64, _kmeans_pp(x64, k, rng), max_iter)
        if best is None or res[2] < best[2]:
            best = res
    centres, assign, inertia, it = best
    return KMeansResult(centres.astype(x.dtype), assign.astype(np.int64), inertia, it)


# ---------------------------------------------------------------------------------------------
# concentration (PCL run_kmeans)
# ---------------------------------------------------------------------------------------------

def concentration(features, centroids, assignments, *, alpha=10.0, temperature=0.2):
    """Per-prototype concentration phi, exactly as PCL's ``run_kmeans``.

    1. For each cluster c with Z_c > 1 members: phi_c = mean_z ||v'_z - c|| / log(Z_c + alpha),
       the paper's sum_z ||v'_z - c|| / (Z log(Z + alpha)); distances are to the *unnormalised*
       centroid (faiss returns squared L2 distances; their square root is averaged).
    2. Clusters with Z_c <= 1 (singletons and empty clusters) get the maximum phi of step 1.
    3. Clip phi to [P10, P90], its 10th and 90th percentiles (linear interpolation, numpy's default,
       as in the official code).
    4. Rescale phi <- temperature * phi / mean(phi), so the mean concentration is exactly temperature.
    5. (Not here: the caller L2-normalises the centroids afterwards; see :func:`e_step`.)

    features (n, D), centroids (k, D), assignments (n,) int -> phi (k,) float64.
    Derivation: derivations/protonce_em.md#concentration (equations PE5, PE6).
    alpha >= 0 keeps phi finite and damps small clusters (log(Z + alpha) >= log(2 + alpha)).
    Raises ValueError if every cluster is a singleton or all points sit on their centroids (phi
    would be 0/0).
    """
    V.float_array(features, "features", ndim=2, shape_doc="(n, D)")
    V.float_array(centroids, "centroids", ndim=2, shape_doc="(k, D)")
    n, k = features.shape[0], centroids.shape[0]
    if centroids.shape[1] != features.shape[1]:
        raise ValueError(f"centroids must have width D = {features.shape[1]}, got shape {centroids.shape}")
    V.labels_array(assignments, "assignments", n, num_classes=k)
    alpha = V.in_range(alpha, "alpha", 0.0, np.inf)
    temperature = V.positive(temperature, "temperature")
    x = features.astype(np.float64)
    c = centroids.astype(np.float64)
    dist = np.sqrt(np.sum((x - c[assignments]) ** 2, axis=1))                  # step 1
    size = np.bincount(assignments, minlength=k)
    total = np.bincount(assignments, weights=dist, minlength=k)
    multi = size > 1
    if not multi.any():
        raise ValueError("concentration needs at least one cluster with more than one member")
    phi = np.zeros(k)
    phi[multi] = total[multi] / size[multi] / np.log(size[multi] + alpha)
    phi[~multi] = phi[multi].max()                                            # step 2
    phi = np.clip(phi, np.percentile(phi, 10), np.percentile(phi, 90))        # step 3
    if phi.mean() <= 0:
        raise ValueError("all points coincide with their centroids: the concentration is undefined")
    return temperature * phi / phi.mean()                                     # step 4


@dataclass
class Clusterings:
    """M clusterings stacked as :func:`refssl.ops.protonce.proto_nce_forward` expects."""

    prototypes: np.ndarray   # (sum_m K_m, D), L2-normalised centroids (step 5)
    phis: np.ndarray         # (sum_m K_m,) concentrations
    assignments: np.ndarray  # (M, n) local cluster index of every data point
    num_clusters: tuple      # (K_1, ..., K_M)
    inertia: tuple           # k-means inertia of each clustering

    def batch(self, index):
        """assignments of the samples ``index`` of a batch: (M, len(index))."""
        return self.assignments[:, index]


def e_step(features, num_clusters, rng, *, alpha=10.0, temperature=0.2, n_init=5, max_iter=20):
    """PCL E-step: k-means with each K_m on the L2-normalised features, then concentration, then
    normalised centroids.  features (n, D) (momentum-encoder outputs).

    Hard EM: one-hot assignments instead of the posterior (derivations/protonce_em.md#e-step)."""
    V.float_array(features, "features", ndim=2, shape_doc="(n, D)")
    rng = _generator(rng)
    v = l2_normalize_forward(features.astype(np.float64))[0]
    protos, phis, assigns, inertia = [], [], [], []
    for km in num_clusters:
        res = kmeans(v, km, rng, n_init=n_init, max_iter=max_iter)
        phis.append(concentration(v, res.centroids, res.assignments, alpha=alpha, temperature=temperature))
        protos.append(l2_normalize_forward(res.centroids)[0])                 # step 5
        assigns.append(res.assignments)
        inertia.append(res.inertia)
    return Clusterings(np.concatenate(protos).astype(features.dtype), np.concatenate(phis).astype(features.dtype),
                       np.stack(assigns), tuple(int(k) for k in num_clusters), tuple(inertia))


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

def clustering_accuracy(y_true, y_pred):
    """max over one-to-one maps of clusters to classes of the fraction of points mapped correctly.

    Builds the contingency table and solves the assignment problem with
    ``scipy.optimize.linear_sum_assignment`` (Hungarian algorithm).  The
    numbers of clusters and classes may differ (unmatched clusters count as
    errors).
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    V.labels_array(y_true, "y_true", y_true.shape[0] if y_true.ndim == 1 else -1)
    V.labels_array(y_pred, "y_pred", y_true.shape[0])
    if y_true.size == 0:
        raise ValueError("y_true must not be empty")
    table = np.zeros((y_pred.max() + 1, y_true.max() + 1), dtype=np.int64)
    np.add.at(table, (y_pred, y_true), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return table[rows, cols].sum() / y_true.size


def soft_kmeans_objective(x, phi):
    """sum_c sum_i phi_ic ||x_i - mu_c||^2 with mu_c = sum_i phi_ic x_i / sum_i phi_ic.

    With one-hot phi this is the k-means inertia of the partition.
    Derivation: derivations/icon.md#kmeans (equation IC16).
    """
    s = phi.sum(axis=0)
    mu = (phi.T @ x) / s[:, None]
    d = squared_distances(x, mu)[0]
    return float(np.sum(phi * d))


# ---------------------------------------------------------------------------------------------
# end-to-end EM
# ---------------------------------------------------------------------------------------------

@dataclass
class EMHistory:
    loss: list = field(default_factory=list)             # mean ProtoNCE loss of each epoch's M-step
    instance: list = field(default_factory=list)         # its instance (InfoNCE) part
    prototype: list = field(default_factory=list)        # its prototype part (mean over clusterings)
    estep_loss: list = field(default_factory=list)       # prototype term on all clean data after the E-step
    mstep_loss: list = field(default_factory=list)       # the same, same prototypes, after the M-step
    accuracy: list = field(default_factory=list)         # Hungarian accuracy of the first clustering
    inertia: list = field(default_factory=list)          # k-means inertia of the first clustering


def _augment(x, rng, noise):
    return x + noise * rng.standard_normal(x.shape)


def protonce_em(x, num_clusters, rng, *, labels=None, dim=8, epochs=6, batch_size=32, lr=0.5,
                momentum=0.9, queue_size=64, temperature=0.2, noise=0.1, alpha=10.0, n_init=3):
    """A small ProtoNCE EM loop on fixed features x (n, D_in) with a linear encoder W (D_in, dim).

    Each epoch:
      E-step -- momentum-encoder features of the clean x, L2-normalised, clustered with
                :func:`e_step` (k-means + concentration + normalised prototypes);
      M-step -- one pass of SGD over shuffled mini-batches on ProtoNCE, with two noisy views
                (q from W, k from the momentum encoder), a FIFO queue of past keys and no
                sampled negative prototypes (r = 0; with K_m <= batch size every cluster is
                usually positive for some sample, so the official r would have no candidates).
    The momentum encoder follows W_k <- m W_k + (1 - m) W after every step; the queue is
    updated after the logits are formed (MoCo order).

    Returns (W, EMHistory).  ``labels`` (n,) adds the Hungarian accuracy of the first clustering.
    The official schedule warms up 20 epochs with InfoNCE only; the toy data cluster from the
    start, so the E-step runs from epoch 0.
    """
    V.float_array(x, "x", ndim=2, shape_doc="(n, D_in)")
    rng = _generator(rng)
    n, d_in = x.shape
    w = rng.standard_normal((d_in, dim)) / np.sqrt(d_in)
    wk = w.copy()
    queue = l2_normalize_forward(rng.standard_normal((queue_size, dim)))[0]
    hist = EMHistory()
    full = np.arange(n)

    def objective(w_enc, clus, idx):
        xa = x[idx]
        cache = proto_nce_forward(xa @ w_enc, xa @ wk, queue, clus.prototypes, clus.batch(idx), clus.phis,
                                  temperature=temperature, num_clusters=clus.num_clusters,
                                  negative_indices=np.zeros((len(num_clusters), 0), np.int64))[1]
        return float(np.mean(cache["prototype_losses"]))

    for _ in range(epochs):
        clus = e_step(x @ wk, num_clusters, rng, alpha=alpha, temperature=temperature, n_init=n_init)
        hist.inertia.append(clus.inertia[0])
        if labels is not None:
            hist.accuracy.append(clustering_accuracy(labels, clus.assignments[0]))
        hist.estep_loss.append(objective(w, clus, full))
        losses, inst, proto = [], [], []
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            xq, xk = _augment(x[idx], rng, noise), _augment(x[idx], rng, noise)
            loss, cache = proto_nce_forward(
                xq @ w, xk @ wk, queue, clus.prototypes, clus.batch(idx), clus.phis,
                temperature=temperature, num_clusters=clus.num_clusters,
                negative_indices=np.zeros((len(num_clusters), 0), np.int64))
            dq = proto_nce_backward(cache, 1.0)[0]
            w -= lr * (xq.T @ dq)
            wk = momentum * wk + (1 - momentum) * w
            queue = np.concatenate([cache["kh"], queue])[:queue_size]  # FIFO: newest keys first
            losses.append(float(loss))
            inst.append(float(cache["instance_loss"]))
            proto.append(float(np.mean(cache["prototype_losses"])))
        hist.loss.append(float(np.mean(losses)))
        hist.instance.append(float(np.mean(inst)))
        hist.prototype.append(float(np.mean(proto)))
        hist.mstep_loss.append(objective(w, clus, full))
    return w, hist
