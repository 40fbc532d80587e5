"""ProtoNCE (Prototypical Contrastive Learning): instance InfoNCE plus prototype terms.

M clusterings (the E-step, :mod:`refssl.clustering`) are stored *stacked*:
``prototypes`` (K_1 + ... + K_M, D) and ``phis`` (K_1 + ... + K_M,) concatenate
the blocks of the M clusterings, ``num_clusters = (K_1, ..., K_M)`` gives the
block sizes, and ``assignments`` (M, N) holds, for each clustering, the
*local* cluster index (0 <= s < K_m) of every sample of the batch.  One array
per input keeps the op contract (every input an array with one dtype) while
allowing a different number of clusters per clustering, as the official
K = (25000, 50000, 100000).

Negative prototypes are sampled as in the official code: for clustering m,
``r`` prototypes uniformly without replacement among the clusters that are
*not* the positive cluster of any sample of the batch.  The sampling is
reproducible: pass either an ``np.random.Generator`` as ``rng`` (the op draws
with :func:`sample_negative_prototypes`) or the indices themselves as
``negative_indices`` (M, r); the indices actually used are returned in the
cache as ``cache["negative_indices"]``.
"""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..registry import Range, register
from .normalize import l2_normalize_backward, l2_normalize_forward

__all__ = ["proto_nce_forward", "proto_nce_backward", "sample_negative_prototypes", "cluster_offsets"]

DEFAULT_NUM_NEGATIVE_PROTOTYPES = 16384  # official pcl_r (= the queue size K)


def _ce_rows(logits):
    """Row log-sum-exp and softmax from one max-shifted exp (the softmax is reused by backward)."""
    m = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(axis=1, keepdims=True)
    return (np.log(s) + m)[:, 0], e / s


def cluster_offsets(num_clusters):
    """Start row of each clustering's block in the stacked prototypes: (0, K_1, K_1 + K_2, ...)."""
    return np.concatenate([[0], np.cumsum(num_clusters)[:-1]]).astype(np.int64)


def _check_num_clusters(num_clusters, total):
    if num_clusters is None:
        return (total,)
    try:
        nc = tuple(int(V.positive_int(k, "num_clusters")) for k in num_clusters)
    except TypeError:
        raise TypeError(f"num_clusters must be a sequence of positive ints (K_1, ..., K_M), got {num_clusters!r}")
    if not nc or sum(nc) != total:
        raise ValueError(f"num_clusters {nc} must sum to the number of prototype rows {total}")
    return nc


def _check_assignments(assignments, num_clusters, n):
    if not isinstance(assignments, np.ndarray) or assignments.dtype.kind not in "iu":
        raise TypeError(f"assignments must be an integer array (M, N), got "
                        f"{getattr(assignments, 'dtype', type(assignments).__name__)}")
    m = len(num_clusters)
    if assignments.shape != (m, n):
        raise ValueError(f"assignments must have shape (M, N) = ({m}, {n}) (M clusterings from num_clusters, "
                         f"N samples of q), got {assignments.shape}")
    if n and (assignments.min() < 0 or (assignments >= np.asarray(num_clusters)[:, None]).any()):
        raise ValueError(f"assignments[m] must be local cluster indices in [0, num_clusters[m]) "
                         f"with num_clusters = {num_clusters}")


def sample_negative_prototypes(assignments, num_clusters, r, rng):
    """Official negative sampling: r clusters per clustering, uniformly without replacement,
    among those that are not the positive cluster of any sample in the batch.

    assignments (M, N) local indices; returns (M, r) int64 local indices.
    Raises ValueError when a clustering has fewer than r candidates (the
    official ``random.sample`` fails there too).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    r = V.positive_int(r, "num_negative_prototypes", minimum=0)
    out = np.empty((len(num_clusters), r), dtype=np.int64)
    for m, k in enumerate(num_clusters):
        candidates = np.setdiff1d(np.arange(k), assignments[m])
        if len(candidates) < r:
            raise ValueError(f"num_negative_prototypes = {r} exceeds the {len(candidates)} clusters of clustering "
                             f"{m} that are not positive for any sample of the batch")
        out[m] = rng.choice(candidates, size=r, replace=False)
    return out


def proto_nce_forward(q, k, queue, prototypes, assignments, phis, *, temperature=0.2,
                      num_negative_prototypes=None, num_clusters=None, rng=None, negative_indices=None):
    """ProtoNCE loss L = L_inst + (1/M) sum_m L_proto^(m).

        L_inst    = CE([q^.k^, q^.queue_1, ..., q^.queue_K] / tau, 0)           (MoCo v2 term)
        L_proto^m = CE(Lambda^m, id),  Lambda^m_ij = q^_i . c_{a_j} / phi_{a_j}
                    columns a = (s_m(1), ..., s_m(N), n_1, ..., n_r): the positive prototypes of the
                    batch, then r sampled negative prototypes of clustering m

    with ^ the row-wise L2 normalisation (applied to q, k, queue and
    prototypes; it is the identity on the official unit-norm queue and
    prototypes) and CE the row-mean cross-entropy.

    Shapes: q, k (N, D); queue (K, D); prototypes (sum_m K_m, D) stacked;
    assignments (M, N) int, local cluster index of each sample;
    phis (sum_m K_m,) > 0 concentrations -> scalar.
    Gradient to q only: k (momentum encoder), queue, prototypes, assignments
    and phis are constants (slots None).

    Keywords: ``num_clusters`` (K_1, ..., K_M) block sizes (default: one
    clustering); negatives from ``negative_indices`` (M, r) ints (an array or
    nested lists) or sampled from
    ``rng`` (see the module docstring); ``num_negative_prototypes`` r
    (default 16384 when sampling, as the official pcl_r).

    Reference: Li et al. 2021, arXiv 2005.04966 (ProtoNCE); salesforce/PCL
    pcl/builder.py (forward), main_pcl.py (train).
    Backward: derivations/protonce_em.md#backward.
    """
    V.float_array(q, "q", ndim=2, shape_doc="(N, D)")
    V.float_array(k, "k", ndim=2, shape_doc="(N, D)")
    V.float_array(queue, "queue", ndim=2, shape_doc="(K, D)")
    V.float_array(prototypes, "prototypes", ndim=2, shape_doc="(sum_m K_m, D)")
    V.float_array(phis, "phis", ndim=1, shape_doc="(sum_m K_m,)")
    V.same_shape([q, k], ["q", "k"])
    V.same_dtype([q, k, queue, prototypes, phis], ["q", "k", "queue", "prototypes", "phis"])
    n, dim = q.shape
    for arr, name in ((queue, "queue"), (prototypes, "prototypes")):
        if arr.shape[1] != dim:
            raise ValueError(f"{name} must have width D = {dim} like q (N, D), got shape {arr.shape}")
    if phis.shape != (prototypes.shape[0],):
        raise ValueError(f"phis must have shape ({prototypes.shape[0]},), one concentration per prototype row, "
                         f"got {phis.shape}")
    if (phis <= 0).any():
        raise ValueError(f"phis must be > 0 (concentrations), got minimum {phis.min()}")
    tau = V.positive(temperature, "temperature")
    nc = _check_num_clusters(num_clusters, prototypes.shape[0])
    _check_assignments(assignments, nc, n)

    if negative_indices is None:
        if rng is None:
            raise ValueError("pass rng (a numpy.random.Generator) or negative_indices (M, r) to choose "
                             "the negative prototypes")
        r = DEFAULT_NUM_NEGATIVE_PROTOTYPES if num_negative_prototypes is None else num_negative_prototypes
        neg = sample_negative_prototypes(assignments, nc, r, rng)
    else:
        neg = np.asarray(negative_indices)
        if neg.size == 0 and neg.ndim == 2:
            neg = neg.astype(np.int64)  # [[]] * M parses as float
        if neg.dtype.kind not in "iu" or neg.ndim != 2 or neg.shape[0] != len(nc):
            raise ValueError(f"negative_indices must be an integer array (M, r) with M = {len(nc)}, "
                             f"got {neg.dtype} {neg.shape}")
        if num_negative_prototypes is not None and neg.shape[1] != num_negative_prototypes:
            raise ValueError(f"negative_indices has r = {neg.shape[1]} columns but "
                             f"num_negative_prototypes = {num_negative_prototypes}")
        for m, km in enumerate(nc):
            if neg[m].size and (neg[m].min() < 0 or neg[m].max() >= km
                                or np.isin(neg[m], assignments[m]).any()
                                or len(np.unique(neg[m])) != neg.shape[1]):
                raise ValueError(f"negative_indices[{m}] must be distinct cluster indices in [0, {km}) that are "
                                 "not the positive cluster of any sample of the batch")

    qh, cq = l2_normalize_forward(q)
    kh = l2_normalize_forward(k)[0]
    queueh = l2_normalize_forward(queue)[0]

    # instance term: column 0 is the positive key
    inst = np.concatenate([np.sum(qh * kh, axis=1, keepdims=True), qh @ queueh.T], axis=1) / tau
    inst_lse, inst_prob = _ce_rows(inst)
    loss_inst = np.mean(inst_lse - inst[:, 0])

    offsets = cluster_offsets(nc)
    terms = []
    proto_cache = []
    for m in range(len(nc)):
        cols = offsets[m] + np.concatenate([assignments[m], neg[m]]).astype(np.int64)
        # normalise only the selected prototypes; the concentration divides each column
        sel = l2_normalize_forward(prototypes[cols])[0] / phis[cols][:, None]
        logits = qh @ sel.T
        lse, prob = _ce_rows(logits)
        terms.append(np.mean(lse - np.diagonal(logits)))
        proto_cache.append((sel, prob))
    loss_proto = np.mean(terms) if terms else 0.0
    loss = V.finite_output(q.dtype.type(loss_inst + loss_proto), "proto_nce", temperature=tau)
    cache = {"qh": qh, "cq": cq, "kh": kh, "queueh": queueh, "inst_prob": inst_prob, "tau": tau, "proto": proto_cache,
             "negative_indices": neg, "instance_loss": q.dtype.type(loss_inst),
             "prototype_losses": np.asarray(terms, dtype=q.dtype)}
    return loss, cache


def proto_nce_backward(cache, grad_out):
    """dL/dq^ = sum over logit matrices of (softmax - target)/N times the column vectors; then L2 backward."""
    qh = cache["qh"]
    g = float(V.grad_out(grad_out, (), qh.dtype))
    n = qh.shape[0]
    gi = cache["inst_prob"].copy()
    gi[:, 0] -= 1.0
    dqh = (gi[:, :1] * cache["kh"] + gi[:, 1:] @ cache["queueh"]) * (g / (n * cache["tau"]))
    m = len(cache["proto"])
    for sel, prob in cache["proto"]:
        gp = prob.copy()
        gp[np.arange(n), np.arange(n)] -= 1.0
        dqh += (gp @ sel) * (g / (n * m))
    dq = l2_normalize_backward(cache["cq"], dqh.astype(qh.dtype, copy=False))[0]
    return dq.astype(qh.dtype, copy=False), None, None, None, None, None


def _example(rng, dtype=np.float64):
    n, d, kq = (int(v) for v in rng.integers(2, 6, size=3))
    m = int(rng.integers(1, 3))
    r = int(rng.integers(0, 3))
    nc = tuple(int(n + r + rng.integers(0, 3)) for _ in range(m))
    assignments = np.stack([rng.integers(0, km, size=n) for km in nc])
    neg = sample_negative_prototypes(assignments, nc, r, rng)
    q = rng.standard_normal((n, d))
    k = q + 0.5 * rng.standard_normal((n, d))
    queue = rng.standard_normal((kq, d))
    protos = rng.standard_normal((sum(nc), d))
    phis = rng.uniform(0.1, 0.4, size=sum(nc))
    args = tuple(a.astype(dtype) for a in (q, k, queue, protos)) + (assignments, phis.astype(dtype))
    # plain lists keep the example JSON-serialisable (golden-vector manifest)
    return args, {"temperature": 0.2, "num_clusters": list(nc), "negative_indices": neg.tolist()}


register(
    "proto_nce",
    forward=proto_nce_forward,
    backward=proto_nce_backward,
    example=_example,
    differentiable=(0,),
    reference="Li et al. 2021, arXiv 2005.04966; salesforce/PCL pcl/builder.py, main_pcl.py",
    derivation="derivations/protonce_em.md#backward",
    hyper_ranges={"temperature": Range(0.05, 1.0)},
)
