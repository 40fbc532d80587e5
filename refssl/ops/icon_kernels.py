"""Neighbourhood kernels of I-Con: learned ones as ops, supervisory ones as plain functions.

Learned kernels return **logits** (the log of the unnormalised kernel), so that
:func:`refssl.ops.icon.icon_forward` turns each row into ``q(.|i)`` with a
stable softmax.  Supervisory kernels return row-stochastic matrices ``p``.

Differentiable (registered ops):

* ``gaussian_kernel(x, y, sigma, metric)``  logits -d_ij / (2 sigma^2) with
  d = squared Euclidean distance, 1 - cos, or -x.y  (cosine: InfoNCE with
  tau = 2 sigma^2);
* ``student_t_kernel(x, y, gamma, nu)``  logits -log(1 + (d_ij/gamma)^nu)
  (gamma = nu = 1: the Cauchy kernel of t-SNE);
* ``cluster_kernel(phi)``  log q_ij = log sum_c phi_ic phi_jc / sum_k phi_kc.

Plain functions (no embeddings to differentiate): :func:`label_kernel`,
:func:`augmentation_kernel`, :func:`knn_kernel`, :func:`hard_cluster_kernel`,
:func:`propagate`.

Reference: Alshammari et al., ICLR 2025, arXiv 2504.16929; ShadeAlsha/ICon
distributions/ (Gaussian, StudentT, Label, Augmentation, UniformKNN,
UniformCluster).
"""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..registry import Range, register
from .normalize import l2_normalize_backward, l2_normalize_forward

__all__ = [
    "gaussian_kernel_forward", "gaussian_kernel_backward",
    "student_t_kernel_forward", "student_t_kernel_backward",
    "cluster_kernel_forward", "cluster_kernel_backward",
    "label_kernel", "augmentation_kernel", "knn_kernel", "hard_cluster_kernel", "propagate",
    "squared_distances",
]

METRICS = ("euclidean", "cosine", "dot")


def _pair(x, y):
    V.float_array(x, "x", ndim=2, shape_doc="(N, D)")
    V.float_array(y, "y", ndim=2, shape_doc="(M, D)")
    V.same_dtype([x, y], ["x", "y"])
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x (N, D) and y (M, D) must have the same width D, got {x.shape} and {y.shape}")


def squared_distances(x, y):
    """||x_i - y_j||^2 by the expansion |x|^2 + |y|^2 - 2 x.y, clamped at 0 (as the official code).

    Both sets are first shifted by the mean of x (distances do not change): the expansion
    cancels catastrophically when the points sit far from the origin (|x| = 1e5 would cost
    ten digits).  Returns (d, active) where ``active`` marks the entries not clamped.
    """
    d, active, _, _ = _centred_distances(x, y)
    return d, active


def _centred_distances(x, y):
    """squared_distances plus the shifted x and y (what the distance backward should use)."""
    shift = x.mean(axis=0, keepdims=True)
    xc = x - shift
    yc = xc if y is x else y - shift
    sq = np.sum(xc * xc, axis=1)[:, None] + np.sum(yc * yc, axis=1)[None, :] - 2.0 * (xc @ yc.T)
    active = sq > 0
    return np.where(active, sq, 0).astype(x.dtype, copy=False), active, xc, yc


def _distance_backward(x, y, gd):
    """Gradients of sum_ij gd_ij ||x_i - y_j||^2 w.r.t. x and y."""
    gx = 2.0 * (gd.sum(axis=1)[:, None] * x - gd @ y)
    gy = 2.0 * (gd.sum(axis=0)[:, None] * y - gd.T @ x)
    return gx, gy


# ---------------------------------------------------------------------------------------------
# Gaussian kernel
# ---------------------------------------------------------------------------------------------

def gaussian_kernel_forward(x, y, *, sigma=1.0, metric="euclidean"):
    """Gaussian-kernel logits between the rows of x and y.

        logits_ij = -d(x_i, y_j) / (2 sigma^2)
        euclidean: d = max(||x_i - y_j||^2, 0)  (squared distance)
        cosine:    d = 1 - cos(x_i, y_j)         -> softmax(cos / tau), tau = 2 sigma^2 (InfoNCE)
        dot:       d = -x_i . y_j

    Shapes: x (N, D), y (M, D) -> logits (N, M).  Pass the same array twice
    for a kernel within one set and add the two gradients; the diagonal is
    excluded downstream by ``icon(mask_diagonal=True)``.

    Reference: Alshammari et al. 2025, arXiv 2504.16929 (Table 1);
    ShadeAlsha/ICon distributions/ (Gaussian kernel, sigma and metric options).
    Backward: derivations/icon.md#kernels.
    """
    _pair(x, y)
    sigma = V.positive(sigma, "sigma")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    c = 0.5 / sigma / sigma  # overflows to inf (never ZeroDivisionError) for a tiny sigma
    if not c <= np.finfo(x.dtype).max:
        raise ValueError(f"sigma must be large enough that 1 / (2 sigma^2) is finite in {x.dtype}, got {sigma:g}")
    if metric == "euclidean":
        d, active, xc, yc = _centred_distances(x, y)
        logits = -c * d
        cache = (metric, c, xc, yc, active, None, None)
    elif metric == "cosine":
        xh, cx = l2_normalize_forward(x)
        yh, cy = l2_normalize_forward(y)
        logits = c * (xh @ yh.T - 1.0)
        cache = (metric, c, xh, yh, None, cx, cy)
    else:
        logits = c * (x @ y.T)
        cache = (metric, c, x, y, None, None, None)
    logits = logits.astype(x.dtype, copy=False)
    return V.finite_output(logits, "gaussian_kernel", sigma=sigma), cache


def gaussian_kernel_backward(cache, grad_out):
    """Chain rule through d: see derivations/icon.md#kernels."""
    metric, c, a, b, active, ca, cb = cache
    g = V.grad_out(grad_out, (a.shape[0], b.shape[0]), a.dtype)
    if metric == "euclidean":
        gx, gy = _distance_backward(a, b, -c * g * active)
    elif metric == "cosine":
        gx = l2_normalize_backward(ca, c * (g @ b))[0]
        gy = l2_normalize_backward(cb, c * (g.T @ a))[0]
    else:
        gx, gy = c * (g @ b), c * (g.T @ a)
    return gx.astype(a.dtype, copy=False), gy.astype(a.dtype, copy=False)


def _pair_example(rng, dtype):
    n, m, d = (int(v) for v in rng.integers(2, 7, size=3))
    return rng.standard_normal((n, d)).astype(dtype), rng.standard_normal((m, d)).astype(dtype)


def _gaussian_example(rng, dtype=np.float64):
    x, y = _pair_example(rng, dtype)
    return (x, y), {"sigma": 1.0, "metric": METRICS[int(rng.integers(0, 3))]}


register(
    "gaussian_kernel",
    forward=gaussian_kernel_forward,
    backward=gaussian_kernel_backward,
    example=_gaussian_example,
    differentiable=(0, 1),
    reference="Alshammari et al. 2025, arXiv 2504.16929; ShadeAlsha/ICon distributions/ (Gaussian)",
    derivation="derivations/icon.md#kernels",
    hyper_ranges={"sigma": Range(0.5, 3.0)},
)


# ---------------------------------------------------------------------------------------------
# Student-t kernel
# ---------------------------------------------------------------------------------------------

def student_t_kernel_forward(x, y, *, gamma=1.0, nu=1.0):
    """Student-t kernel logits: logits_ij = -log(1 + (d_ij / gamma)^nu), d = ||x_i - y_j||^2.

    gamma = nu = 1 is the Cauchy kernel (1 + ||x_i - y_j||^2)^-1 of t-SNE.
    Shapes: x (N, D), y (M, D) -> logits (N, M).  Evaluated as
    -softplus(nu log(d_ij / gamma)), so (d/gamma)^nu is never formed and a large
    nu or a small gamma does not overflow to -inf.

    Reference: van der Maaten & Hinton 2008 (t-SNE); Alshammari et al. 2025,
    arXiv 2504.16929; ShadeAlsha/ICon distributions/ (StudentT).
    Backward: derivations/icon.md#kernels.
    """
    _pair(x, y)
    gamma = V.positive(gamma, "gamma")
    nu = V.positive(nu, "nu")
    d, active, xc, yc = _centred_distances(x, y)
    # log(1 + t^nu) = softplus(nu log t), t = d / gamma: no t^nu that overflows for a large nu or a
    # small gamma; d = 0 gives a = -inf and the logit 0.
    with np.errstate(divide="ignore"):
        a = nu * (np.log(d) - np.log(gamma)).astype(x.dtype, copy=False)
    logits = -(np.maximum(a, 0) + np.log1p(np.exp(-np.abs(a))))
    logits = V.finite_output(logits.astype(x.dtype, copy=False), "student_t_kernel", gamma=gamma, nu=nu)
    return logits, (xc, yc, d, active, a, nu)


def student_t_kernel_backward(cache, grad_out):
    """d logits / d d = -(nu / d) sigmoid(nu log(d / gamma)) for d > 0; at d = 0 the distance gradient is 0."""
    xc, yc, d, active, a, nu = cache
    g = V.grad_out(grad_out, d.shape, xc.dtype)
    sig = np.exp(-(np.maximum(-a, 0) + np.log1p(np.exp(-np.abs(a)))))  # sigmoid(a) = exp(-softplus(-a))
    dlog = np.zeros_like(d)
    np.divide(-nu * sig, d, out=dlog, where=active)
    gx, gy = _distance_backward(xc, yc, g * dlog)
    return gx.astype(xc.dtype, copy=False), gy.astype(xc.dtype, copy=False)


def _student_example(rng, dtype=np.float64):
    x, y = _pair_example(rng, dtype)
    return (x, y), {"gamma": 1.0, "nu": 1.0}


register(
    "student_t_kernel",
    forward=student_t_kernel_forward,
    backward=student_t_kernel_backward,
    example=_student_example,
    differentiable=(0, 1),
    reference="van der Maaten & Hinton 2008 (t-SNE); Alshammari et al. 2025, arXiv 2504.16929; "
              "ShadeAlsha/ICon distributions/ (StudentT)",
    derivation="derivations/icon.md#kernels",
    hyper_ranges={"gamma": Range(0.5, 2.0), "nu": Range(0.5, 2.0)},
)


# ---------------------------------------------------------------------------------------------
# Soft cluster kernel
# ---------------------------------------------------------------------------------------------

def cluster_kernel_forward(phi):
    """Log of the soft cluster kernel: log q_ij = log sum_c phi_ic phi_jc / S_c, S_c = sum_k phi_kc.

    q(j|i) is the probability that j is drawn from the cluster of i, choosing a
    cluster c with probability phi_ic and a member with probability
    phi_jc / S_c.  Rows of q sum to 1 when the rows of phi do, so
    ``softmax(log q) = q`` and the output composes with ``icon(...,
    mask_diagonal=False)`` (the diagonal is part of q, as in the official
    UniformCluster kernel).

    Shapes: phi (N, C) soft assignments, all entries > 0 (e.g. a softmax)
    -> log q (N, N).

    Reference: Alshammari et al. 2025, arXiv 2504.16929 (Thm 13, 15);
    ShadeAlsha/ICon distributions/ (UniformCluster).
    Backward: derivations/icon.md#cluster_kernel.
    """
    V.float_array(phi, "phi", ndim=2, shape_doc="(N, C)")
    if (phi <= 0).any():
        raise ValueError(f"phi must be strictly positive soft assignments (e.g. a softmax), got minimum {phi.min()}")
    s = phi.sum(axis=0)
    w = phi / s
    q = phi @ w.T
    return np.log(q).astype(phi.dtype, copy=False), (phi, s, w, q)


def cluster_kernel_backward(cache, grad_out):
    """With H = G / q: dphi = (H + H^T) phi / S - 1 (diag(phi^T H phi) / S^2)^T."""
    phi, s, w, q = cache
    h = V.grad_out(grad_out, q.shape, phi.dtype) / q
    col = np.sum((h @ phi) * phi, axis=0) / (s * s)
    return (((h + h.T) @ w - col[None, :]).astype(phi.dtype, copy=False),)


def _cluster_example(rng, dtype=np.float64):
    n, c = int(rng.integers(2, 8)), int(rng.integers(2, 5))
    logits = rng.standard_normal((n, c))
    phi = np.exp(logits - logits.max(axis=1, keepdims=True))
    phi /= phi.sum(axis=1, keepdims=True)
    return (phi.astype(dtype),), {}


register(
    "cluster_kernel",
    forward=cluster_kernel_forward,
    backward=cluster_kernel_backward,
    example=_cluster_example,
    differentiable=(0,),
    reference="Alshammari et al. 2025, arXiv 2504.16929 (Thm 13); ShadeAlsha/ICon distributions/ (UniformCluster)",
    derivation="derivations/icon.md#cluster_kernel",
)


# ---------------------------------------------------------------------------------------------
# Supervisory kernels (plain functions: nothing to differentiate)
# ---------------------------------------------------------------------------------------------

def _labels(labels, name):
    if not isinstance(labels, np.ndarray) or labels.ndim != 1:
        raise ValueError(f"{name} must be a 1-d integer array (N,), got {type(labels).__name__} "
                         f"of shape {getattr(labels, 'shape', None)}")
    return V.labels_array(labels, name, labels.shape[0])


def _rows_normalised(k, dtype):
    s = k.sum(axis=1, keepdims=True)
    return np.divide(k, s, out=np.zeros(k.shape, dtype=dtype), where=s > 0)


def label_kernel(labels, labels_other=None, *, mask_diagonal=True, dtype=np.float64):
    """p(j|i) uniform over the j with the same label as i (j != i when mask_diagonal).

    ``labels`` (N,) int.  With ``labels_other`` (M,) the kernel maps the N
    rows to M columns (e.g. data -> class prototypes with
    ``labels_other = arange(C)``: the class indicator of cross-entropy); the
    diagonal is then not masked.  Rows without any positive are all zero
    (they contribute 0 to the I-Con loss, as SupCon anchors without positives).
    """
    labels = _labels(labels, "labels")
    mask_diagonal = V.flag(mask_diagonal, "mask_diagonal")
    if labels_other is None:
        k = labels[:, None] == labels[None, :]
        if mask_diagonal:
            k[np.diag_indices(len(labels))] = False
    else:
        labels_other = _labels(labels_other, "labels_other")
        k = labels[:, None] == labels_other[None, :]
    return _rows_normalised(k.astype(dtype), dtype)


def augmentation_kernel(n, views=2, *, dtype=np.float64):
    """p(j|i) uniform over the other views of the same sample.

    Rows are stacked view-major (view 0 of samples 0..n-1, then view 1, ...),
    the layout of SimCLR and SupCon; the label kernel on the sample index with
    the diagonal masked.
    """
    n = V.positive_int(n, "n")
    views = V.positive_int(views, "views", minimum=2)
    return label_kernel(np.tile(np.arange(n), views), mask_diagonal=True, dtype=dtype)


def knn_kernel(x, k, *, metric="euclidean"):
    """p(j|i) uniform over the k nearest neighbours of x_i (self excluded).

    ``metric`` is "euclidean" or "cosine".  Ties are broken by the lower
    index (stable sort), so the result is deterministic.
    """
    V.float_array(x, "x", ndim=2, shape_doc="(N, D)")
    n = x.shape[0]
    k = V.positive_int(k, "k")
    if k >= n:
        raise ValueError(f"k must be < N = {n} (self is excluded), got {k}")
    if metric == "cosine":
        xh = l2_normalize_forward(x)[0]
        d = -(xh @ xh.T)
    elif metric == "euclidean":
        d = squared_distances(x, x)[0]
    else:
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    d = d.astype(np.float64)
    d[np.diag_indices(n)] = np.inf
    nn = np.argsort(d, axis=1, kind="stable")[:, :k]
    p = np.zeros((n, n), dtype=x.dtype)
    p[np.arange(n)[:, None], nn] = 1.0 / k
    return p


def hard_cluster_kernel(assignments, *, dtype=np.float64):
    """The cluster kernel with one-hot phi: uniform over the members of i's cluster (self included)."""
    assignments = _labels(assignments, "assignments")
    return label_kernel(assignments, mask_diagonal=False, dtype=dtype)


def propagate(p, steps, *, uniform=False):
    """Neighbour propagation: P~ proportional to P + P^2 + ... + P^steps, rows renormalised.

    ``uniform=True`` gives the uniform distribution over the points reachable
    in at most ``steps`` steps, 1[P + ... + P^steps > 0], rows normalised.
    The diagonal is kept (walks may return to i); zero it before use with a
    masked q.
    """
    V.float_array(p, "p", ndim=2, shape_doc="(N, N)")
    if p.shape[0] != p.shape[1]:
        raise ValueError(f"p must be square (N, N), got shape {p.shape}")
    steps = V.positive_int(steps, "steps")
    uniform = V.flag(uniform, "uniform")
    acc = p.copy()
    power = p
    for _ in range(steps - 1):
        power = power @ p
        acc += power
    if uniform:
        acc = (acc > 0).astype(p.dtype)
    return _rows_normalised(acc, p.dtype)
