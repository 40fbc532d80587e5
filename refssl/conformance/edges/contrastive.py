"""Contrastive losses: InfoNCE / NT-Xent, debiased, CLIP, SupCon, alignment and uniformity.

Where ports go wrong: exp of raw logits at small temperatures (tau = 0.01 gives logits up to 100,
e^100 overflows float32), forgetting to L2-normalise (large norms), the self-similarity mask and
duplicate samples (duplicate rows), the smallest batches, anchors without positives in SupCon.
"""

from __future__ import annotations

import math

import numpy as np

from . import Family, row_scales, tight_views, two_views

F = Family("contrastive", "InfoNCE-type losses over a batch of pairs or labelled views")

LN100 = math.log(100.0)


# ---------------------------------------------------------------------------------- info_nce and DCL

@F.edge(("info_nce", "debiased_info_nce"), "tau_0.01",
        "temperature 0.01: logits up to 100; exp of raw logits overflows float32 (needs a max shift)")
def _tau_001(rng):
    return tight_views(rng, 6, 8), {"temperature": 0.01}


@F.edge("info_nce", "n2", "N = 2, the smallest batch with a negative (2 negatives per anchor)")
def _nce_n2(rng):
    return two_views(rng, 2, 5, noise=1.0), {"temperature": 0.5}


@F.edge("debiased_info_nce", "n2", "N = 2, the smallest batch the estimator accepts (N_n = 2 negatives)")
def _dcl_n2(rng):
    return two_views(rng, 2, 5), {"temperature": 0.5, "tau_plus": 0.1}


@F.edge(("info_nce", "debiased_info_nce"), "duplicate_rows",
        "sample 1 repeats sample 0 in both views: a negative with the positive's logit")
def _dup_rows(rng):
    z1, z2 = two_views(rng, 5, 6)
    z1[1], z2[1] = z1[0], z2[0]
    return (z1, z2), {"temperature": 0.2}


@F.edge(("info_nce", "debiased_info_nce"), "large_norms",
        "row norms 1e2..1e4: the loss uses cosines, so a port that skips the L2 normalisation fails")
def _large_norms(rng):
    z1, z2 = two_views(rng, 5, 6)
    return (z1 * row_scales(rng, 5, 2, 4), z2 * row_scales(rng, 5, 2, 4)), {"temperature": 0.2}


@F.edge("debiased_info_nce", "tau_plus_0", "tau_plus = 0: no debiasing, info_nce at the paper scale")
def _dcl_plain(rng):
    return two_views(rng, 5, 6), {"temperature": 0.5, "tau_plus": 0.0}


@F.edge("debiased_info_nce", "clamp_active",
        "aligned views with tau_plus = 0.3: the negative estimate is clamped at N_n e^{-1/t} for every "
        "anchor, so only the positive carries gradient")
def _dcl_clamp(rng):
    z1 = rng.standard_normal((5, 6))
    return (z1, z1 + 0.05 * rng.standard_normal((5, 6))), {"temperature": 0.5, "tau_plus": 0.3}


# ---------------------------------------------------------------------------------------------- CLIP

def _clip_pair(rng, n, d):
    img = rng.standard_normal((n, d))
    return img, img + rng.standard_normal((n, d))


@F.edge("clip", "logit_scale_max", "logit_scale = ln 100, the clamp's upper end: logits up to 100")
def _clip_max(rng):
    img, txt = tight_views(rng, 6, 8)  # cosines near 1: logits near 100 yet an unsaturated softmax
    return (img, txt, np.asarray(LN100)), {}


@F.edge("clip", "n2", "N = 2 image-text pairs")
def _clip_n2(rng):
    img, txt = _clip_pair(rng, 2, 5)
    return (img, txt, np.asarray(1.0)), {}


@F.edge("clip", "duplicate_rows", "pair 1 repeats pair 0: a negative with the positive's logit")
def _clip_dup(rng):
    img, txt = _clip_pair(rng, 5, 6)
    img[1], txt[1] = img[0], txt[0]
    return (img, txt, np.asarray(1.5)), {}


@F.edge("clip", "large_norms", "row norms 1e2..1e4: cosines, so the L2 normalisation must be there")
def _clip_norms(rng):
    img, txt = _clip_pair(rng, 5, 6)
    return (img * row_scales(rng, 5, 2, 4), txt * row_scales(rng, 5, 2, 4), np.asarray(2.0)), {}


# -------------------------------------------------------------------------------------------- SupCon

SUPCON = ("supcon", "supcon_in")


def _labelled(rng, labels, views, d, spread=1.0, tight=False):
    """Class centres plus per-view noise; ``tight`` puts everything near one unit direction (tau = 0.01)."""
    b = len(labels)
    centers = rng.standard_normal((max(labels) + 1, 1, d))
    z = centers[labels] + spread * rng.standard_normal((b, views, d))
    if tight:
        u = rng.standard_normal(d)
        z = u / np.linalg.norm(u) + 0.1 * z / np.sqrt(d)
    return z, np.asarray(labels, dtype=np.int64)


@F.edge(SUPCON, "no_positive_anchors",
        "one view, labels 0 0 1 2 2 3: anchors 2 and 5 have no positive; they add 0 but count in the mean")
def _sc_nopos(rng):
    z, y = _labelled(rng, [0, 0, 1, 2, 2, 3], 1, 5)
    return (z, y), {"temperature": 0.5}


@F.edge(SUPCON, "tau_0.01", "temperature 0.01: logits up to 100 (float32 overflow without a max shift)")
def _sc_tau(rng):
    z, y = _labelled(rng, [0, 1, 0, 2, 1], 2, 6, tight=True)
    return (z, y), {"temperature": 0.01}


@F.edge(SUPCON, "base_temperature_0.07",
        "temperature 0.1 with the official default base_temperature 0.07: loss scaled by tau / tau_b")
def _sc_base(rng):
    z, y = _labelled(rng, [0, 1, 0, 2, 1, 2], 2, 5)
    return (z, y), {"temperature": 0.1, "base_temperature": 0.07}


@F.edge(SUPCON, "flat_rows", "features given as (M, D) rows with labels (M,) instead of (B, V, D)")
def _sc_flat(rng):
    z, y = _labelled(rng, [0, 1, 1, 2, 0, 2, 1], 1, 4)
    return (z[:, 0, :], y), {"temperature": 0.2}


@F.edge(SUPCON, "distinct_labels", "every label distinct with two views: SimCLR's positives only")
def _sc_simclr(rng):
    z, y = _labelled(rng, [0, 1, 2, 3], 2, 5)
    return (z, y), {"temperature": 0.1}


@F.edge(SUPCON, "large_norms", "row norms 1e2..1e4: refssl normalises (the official code expects unit rows)")
def _sc_norms(rng):
    z, y = _labelled(rng, [0, 1, 0, 1, 2], 2, 5)
    return (z * 10.0 ** rng.uniform(2, 4, size=(5, 2, 1)), y), {"temperature": 0.1}


# ------------------------------------------------------------------------------ alignment, uniformity

@F.edge("alignment", "alpha_1", "alpha = 1: mean Euclidean distance (gradient x - y over its norm)")
def _al_1(rng):
    x = rng.standard_normal((5, 4))
    return (x, x + 0.5 * rng.standard_normal((5, 4))), {"alpha": 1}


@F.edge("alignment", "alpha_0.5", "alpha = 0.5 (below 1: the gradient grows as pairs approach)")
def _al_half(rng):
    x = rng.standard_normal((5, 4))
    return (x, x + 0.5 * rng.standard_normal((5, 4))), {"alpha": 0.5}


@F.edge("alignment", "n1", "N = 1, a single pair")
def _al_n1(rng):
    x = rng.standard_normal((1, 6))
    return (x, x + 0.5 * rng.standard_normal((1, 6))), {"alpha": 2}


def _sphere(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@F.edge("uniformity", "t_10", "t = 10: pair potentials down to e^-40 (log of a mean of tiny numbers)")
def _un_t(rng):
    return (_sphere(rng, 6, 3),), {"t": 10}


@F.edge("uniformity", "n2", "N = 2, a single pair")
def _un_n2(rng):
    return (_sphere(rng, 2, 4),), {"t": 2}


@F.edge("uniformity", "duplicate_rows", "points 0 and 1 coincide: one pair at distance 0 (potential 1)")
def _un_dup(rng):
    x = _sphere(rng, 5, 3)
    x[1] = x[0]
    return (x,), {"t": 2}
