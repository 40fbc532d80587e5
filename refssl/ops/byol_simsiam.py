"""BYOL, SimSiam and the negative cosine: regression onto a stop-gradient target.

The targets (t1, t2 for BYOL, z for SimSiam / neg_cosine) are constants: their
gradient slot is ``None``.  Derivation: derivations/teacher_student.md.
"""

from __future__ import annotations

import numpy as np

from ..registry import register
from ._ts_common import check_views, grad_scalar
from .normalize import l2_normalize_backward, l2_normalize_forward

# JAX/TF normalise with x * rsqrt(max(||x||^2, 1e-12)), i.e. a floor of 1e-6 on
# the norm itself: the same map as l2_normalize_forward(x, eps=1e-6).
BYOL_EPS = 1e-6
# torch.nn.functional.cosine_similarity: x.y / (max(||x||, 1e-8) max(||y||, 1e-8)).
COSINE_EPS = 1e-8


# -- BYOL -------------------------------------------------------------------------------


def byol_forward(p1, p2, t1, t2):
    """Official BYOL loss (symmetrised regression of predictions onto target projections).

        L = (1/N) sum_i [ ||p̂1_i - t̂2_i||^2 + ||p̂2_i - t̂1_i||^2 ]
          = (1/N) sum_i [ (2 - 2 cos(p1_i, t2_i)) + (2 - 2 cos(p2_i, t1_i)) ]   in [0, 8]

    Shapes: p1, p2 (online predictions) and t1, t2 (target projections of views
    1 and 2) all (N, D); returns a scalar.  t1, t2 are stop-gradient targets:
    their gradient slots are None.  Normalisation uses the JAX convention of the
    official code, x / sqrt(max(||x||^2, 1e-12)) (norm floor 1e-6, see BYOL_EPS).
    The squared distance is evaluated directly, as the official code does, so
    identical predictions and targets give exactly 0.

    Reference: Grill et al. 2020, arXiv 2006.07733; google-deepmind/deepmind-research
    byol/byol_experiment.py (loss_fn), byol/utils/helpers.py (regression_loss,
    l2_normalize).  The online-evaluation classifier term of loss_fn is not part
    of this op.  Backward: derivations/teacher_student.md#byol.
    """
    dtype = check_views([p1, p2, t1, t2], ["p1", "p2", "t1", "t2"])
    p1n, c1 = l2_normalize_forward(p1, eps=BYOL_EPS)
    p2n, c2 = l2_normalize_forward(p2, eps=BYOL_EPS)
    t1n = l2_normalize_forward(t1, eps=BYOL_EPS)[0]
    t2n = l2_normalize_forward(t2, eps=BYOL_EPS)[0]
    d1 = p1n - t2n  # view-1 prediction regresses onto the view-2 target
    d2 = p2n - t1n
    n = p1.shape[0]
    loss = (np.sum(d1 * d1) + np.sum(d2 * d2)) / n
    return dtype.type(loss), (c1, c2, d1, d2, n, dtype)


def byol_backward(cache, grad_out):
    """dL/dp̂1 = 2 (p̂1 - t̂2) / N (likewise p̂2), then the L2-normalisation chain."""
    c1, c2, d1, d2, n, dtype = cache
    s = grad_scalar(grad_out, dtype) * dtype.type(2.0 / n)
    (g1,) = l2_normalize_backward(c1, s * d1)
    (g2,) = l2_normalize_backward(c2, s * d2)
    return g1, g2, None, None


def _example_byol(rng, dtype=np.float64):
    n, d = int(rng.integers(1, 7)), int(rng.integers(2, 9))
    args = tuple(rng.standard_normal((n, d)).astype(dtype) for _ in range(4))
    return args, {}


register(
    "byol",
    forward=byol_forward,
    backward=byol_backward,
    example=_example_byol,
    differentiable=(0, 1),
    reference="Grill et al. 2020, arXiv 2006.07733; google-deepmind/deepmind-research "
              "byol/byol_experiment.py (loss_fn), byol/utils/helpers.py",
    derivation="derivations/teacher_student.md#byol",
)


# -- negative cosine (one direction) ----------------------------------------------------


def neg_cosine_forward(p, z):
    """Negative cosine similarity of predictions to stop-gradient targets, batch mean.

        L = -(1/N) sum_i cos(p_i, z_i),   cos(a, b) = a.b / (max(||a||, 1e-8) max(||b||, 1e-8))

    Shapes: p, z (N, D); returns a scalar in [-1, 1].  z is a stop-gradient
    target (gradient slot None).  This is SimSiam's D(p, z) and lightly's
    NegativeCosineSimilarity applied to a detached z.  One BYOL direction is
    (1/N) sum ||p̂ - ẑ||^2 = 2 + 2 neg_cosine(p, z) (up to the eps convention).

    Reference: Chen & He 2020, arXiv 2011.10566; facebookresearch/simsiam
    main_simsiam.py (criterion = CosineSimilarity(dim=1)).  Backward:
    derivations/teacher_student.md#simsiam.
    """
    dtype = check_views([p, z], ["p", "z"])
    pn, cp = l2_normalize_forward(p, eps=COSINE_EPS)
    zn = l2_normalize_forward(z, eps=COSINE_EPS)[0]
    n = p.shape[0]
    return dtype.type(-np.sum(pn * zn) / n), (cp, zn, n, dtype)


def neg_cosine_backward(cache, grad_out):
    """dL/dp̂ = -ẑ / N, then the L2-normalisation chain; z gets None."""
    cp, zn, n, dtype = cache
    g = grad_scalar(grad_out, dtype) * dtype.type(-1.0 / n)
    return l2_normalize_backward(cp, g * zn)[0], None


def _example_pair(rng, dtype=np.float64):
    n, d = int(rng.integers(1, 7)), int(rng.integers(2, 9))
    return (rng.standard_normal((n, d)).astype(dtype), rng.standard_normal((n, d)).astype(dtype)), {}


register(
    "neg_cosine",
    forward=neg_cosine_forward,
    backward=neg_cosine_backward,
    example=_example_pair,
    differentiable=(0,),
    reference="Chen & He 2020, arXiv 2011.10566; facebookresearch/simsiam main_simsiam.py",
    derivation="derivations/teacher_student.md#simsiam",
)


# -- SimSiam ------------------------------------------------------------------------------


def simsiam_forward(p1, p2, z1, z2):
    """SimSiam loss: symmetrised negative cosine onto stop-gradient projections.

        L = -1/2 [ (1/N) sum_i cos(p1_i, z2_i) + (1/N) sum_i cos(p2_i, z1_i) ]   in [-1, 1]

    Shapes: p1, p2 (predictor outputs), z1, z2 (projector outputs) all (N, D);
    returns a scalar.  z1, z2 are stop-gradient (slots None).  Cosine with
    torch's eps 1e-8 on each norm.  Minimum -1 (p parallel to the other view's z).
    lightly and solo-learn compute the same value.

    Reference: Chen & He 2020, arXiv 2011.10566; facebookresearch/simsiam
    main_simsiam.py, simsiam/builder.py.  Backward: derivations/teacher_student.md#simsiam.
    """
    dtype = check_views([p1, p2, z1, z2], ["p1", "p2", "z1", "z2"])
    p1n, c1 = l2_normalize_forward(p1, eps=COSINE_EPS)
    p2n, c2 = l2_normalize_forward(p2, eps=COSINE_EPS)
    z1n = l2_normalize_forward(z1, eps=COSINE_EPS)[0]
    z2n = l2_normalize_forward(z2, eps=COSINE_EPS)[0]
    n = p1.shape[0]
    loss = -0.5 * (np.sum(p1n * z2n) + np.sum(p2n * z1n)) / n
    return dtype.type(loss), (c1, c2, z1n, z2n, n, dtype)


def simsiam_backward(cache, grad_out):
    """dL/dp̂1 = -ẑ2 / (2N), dL/dp̂2 = -ẑ1 / (2N), then the normalisation chain."""
    c1, c2, z1n, z2n, n, dtype = cache
    s = grad_scalar(grad_out, dtype) * dtype.type(-0.5 / n)
    return (l2_normalize_backward(c1, s * z2n)[0], l2_normalize_backward(c2, s * z1n)[0], None, None)


register(
    "simsiam",
    forward=simsiam_forward,
    backward=simsiam_backward,
    example=_example_byol,
    differentiable=(0, 1),
    reference="Chen & He 2020, arXiv 2011.10566; facebookresearch/simsiam main_simsiam.py, "
              "simsiam/builder.py",
    derivation="derivations/teacher_student.md#simsiam",
)
