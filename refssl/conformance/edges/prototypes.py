"""Prototypes, kernels and neighbourhood-matching losses: ProtoNCE, I-Con and its kernels, SNE and t-SNE.

Where ports go wrong: several clusterings and the negative-prototype bookkeeping (ProtoNCE), the masked
diagonal and rectangular targets (I-Con), the distance metric and the heavy-tailed kernel exponents,
sharp cluster assignments, conditional vs joint probabilities.
"""

from __future__ import annotations

import numpy as np

from . import Family, example_where

F = Family("prototypes", "losses and kernels on prototypes, clusters and neighbourhood distributions")


# ---------------------------------------------------------------------------------------------- ProtoNCE

@F.edge("proto_nce", "two_clusterings", "M = 2 clusterings, each with sampled negative prototypes")
def _pn_two(rng):
    return example_where("proto_nce", rng, lambda a, kw: len(kw["num_clusters"]) == 2
                         and all(len(r) > 0 for r in kw["negative_indices"]))


@F.edge("proto_nce", "no_negative_prototypes", "r = 0: only the batch's positive prototypes as columns")
def _pn_none(rng):
    return example_where("proto_nce", rng, lambda a, kw: all(len(r) == 0 for r in kw["negative_indices"])
                         and len(set(a[4][0].tolist())) > 1)


@F.edge("proto_nce", "tau_0.05", "temperature 0.05 on the instance term")
def _pn_tau(rng):
    args, kw = example_where("proto_nce", rng, lambda a, kw: a[0].shape[0] >= 3)
    return args, {**kw, "temperature": 0.05}


# --------------------------------------------------------------------------------------------- I-Con

def _icon(rng, n, m, mask, scale=2.0):
    p = rng.random((n, m)) + 0.05
    if mask:
        p[np.diag_indices(n)] = 0
    p /= p.sum(axis=1, keepdims=True)
    return p, scale * rng.standard_normal((n, m))


@F.edge("icon", "rectangular", "p and logits (N, M) with M != N and no masked diagonal")
def _icon_rect(rng):
    return _icon(rng, 4, 6, False), {"alpha": 0.0, "alpha_q": 0.0, "mask_diagonal": False}


@F.edge("icon", "debias_both", "alpha = 0.3 on p and alpha_q = 0.3 on q")
def _icon_debias(rng):
    return _icon(rng, 5, 5, True), {"alpha": 0.3, "alpha_q": 0.3, "mask_diagonal": True}


@F.edge("icon", "large_logits", "logits ~15: the masked row softmax needs a max shift")
def _icon_large(rng):
    return _icon(rng, 5, 5, True, scale=15.0), {"alpha": 0.0, "alpha_q": 0.0, "mask_diagonal": True}


@F.edge("icon", "n2", "N = 2 with the diagonal masked: one neighbour per row")
def _icon_n2(rng):
    p, logits = _icon(rng, 2, 3, False)
    return (p, logits), {"alpha": 0.2, "alpha_q": 0.0, "mask_diagonal": False}


# ------------------------------------------------------------------------------------------ kernels

def _softmax_rows(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@F.edge("cluster_kernel", "sharp_assignments", "nearly one-hot cluster probabilities (0.9+ on one cluster)")
def _ck_sharp(rng):
    phi = 0.01 + 0.05 * rng.random((6, 3))
    phi[np.arange(6), rng.integers(0, 3, size=6)] = 1.0
    return (phi / phi.sum(axis=1, keepdims=True),), {}


@F.edge("cluster_kernel", "n2", "two samples, three clusters")
def _ck_n2(rng):
    return (_softmax_rows(rng.standard_normal((2, 3))),), {}


def _points(rng, n=6, m=5, d=4):
    x = rng.standard_normal((n, d))
    return x, x[:m] + 0.5 * rng.standard_normal((m, d)) if m <= n else rng.standard_normal((m, d))


for _metric in ("euclidean", "cosine", "dot"):
    F.edge("gaussian_kernel", f"metric_{_metric}", f"metric={_metric!r}")(
        lambda rng, metric=_metric: (_points(rng), {"sigma": 1.0, "metric": metric}))


@F.edge("gaussian_kernel", "sigma_0.5", "sigma = 0.5 (logits -d / 0.5)")
def _gk_sigma(rng):
    return _points(rng), {"sigma": 0.5, "metric": "euclidean"}


@F.edge("gaussian_kernel", "far_from_origin",
        "points about 100 from the origin: |x|^2 + |y|^2 - 2 x.y loses 4 digits unless the points are centred")
def _gk_far(rng):
    x, y = _points(rng)
    shift = 100.0 * rng.standard_normal(4)
    return (x + shift, y + shift), {"sigma": 1.0, "metric": "euclidean"}


@F.edge("student_t_kernel", "nu_0.5", "nu = 0.5: heavier tails (points kept apart: the cone at 0 is a kink)")
def _st_nu(rng):
    return _points(rng), {"gamma": 1.0, "nu": 0.5}


@F.edge("student_t_kernel", "gamma_2", "gamma = 2, nu = 2")
def _st_gamma(rng):
    return _points(rng), {"gamma": 2.0, "nu": 2.0}


# ------------------------------------------------------------------------------------------ SNE, t-SNE

def _conditional(rng, n):
    P = rng.random((n, n)) + 0.1
    P[np.diag_indices(n)] = 0
    return P / P.sum(axis=1, keepdims=True)


for _kernel in ("gaussian", "cauchy"):
    F.edge("sne", f"kernel_{_kernel}", f"kernel={_kernel!r}")(
        lambda rng, kernel=_kernel: ((rng.standard_normal((6, 2)), _conditional(rng, 6)), {"kernel": kernel}))


@F.edge("sne", "n3", "N = 3 points (N = 2 gives Q = P)")
def _sne_n3(rng):
    return (rng.standard_normal((3, 2)), _conditional(rng, 3)), {"kernel": "gaussian"}


@F.edge("tsne", "n3", "N = 3 points (N = 2 gives Q = P)")
def _tsne_n3(rng):
    P = _conditional(rng, 3)
    return (rng.standard_normal((3, 2)), (P + P.T) / 6.0), {}


@F.edge("tsne", "spread_out", "embedding spread x10: the Cauchy kernel's heavy tails dominate")
def _tsne_spread(rng):
    P = _conditional(rng, 6)
    return (10.0 * rng.standard_normal((6, 2)), (P + P.T) / 12.0), {}
