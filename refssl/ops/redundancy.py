"""Redundancy-reduction losses: Barlow Twins, its HSIC variant, and VICReg.

All three penalise the (cross-)correlation or covariance matrix of two views.
That D x D matrix is never needed when the batch is smaller than the width
(N < D, the usual case for wide projectors): its squared Frobenius norm is the
inner product of the two N x N Gram matrices, ||A^T B||_F^2 = <A A^T, B B^T>,
and its products with the embeddings are (A A^T) B.  Both code paths give the
same loss and gradient (derivations/ib_connection.md#barlow_twins); the Gram
path costs O(N^2 D) instead of O(N D^2).
"""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..registry import Range, register
from .normalize import l2_normalize_backward, l2_normalize_forward
from .standardize import DEFAULT_EPS, standardize, standardize_backward

_NORMALIZATIONS = ("batchnorm", "tsai")


def _use_gram(n: int, d: int) -> bool:
    """Work with N x N Gram matrices instead of the D x D correlation when that is cheaper."""
    return n < d


def _check_views(a, b, na, nb, *, min_rows=1):
    V.float_array(a, na, ndim=2, min_rows=min_rows, shape_doc="(N, D)")
    V.float_array(b, nb, ndim=2, min_rows=min_rows, shape_doc="(N, D)")
    V.same_shape((a, b), (na, nb))
    V.same_dtype((a, b), (na, nb))


# ---------------------------------------------------------------------------
# Barlow Twins family
# ---------------------------------------------------------------------------

def _normalize_view(z, name, normalization, eps):
    """Standardised view and what its backward needs."""
    if normalization == "batchnorm":
        s, sigma = standardize(z, eps)
        return s, ("batchnorm", s, sigma)
    # Tsai et al.'s code: F.normalize over features, then (u - mean) / std with torch's unbiased std, no eps.
    u, ucache = l2_normalize_forward(z)

    def collapsed(cols):
        raise ValueError(f"{name} has constant columns {cols[:5].tolist()} after L2 normalisation; "
                         "normalization='tsai' divides by the unbiased std without eps and is undefined "
                         "for collapsed inputs (use normalization='batchnorm')")

    s, sigma = standardize(u, 0.0, ddof=1, on_zero=collapsed)
    return s, ("tsai", s, sigma, ucache)


def _normalize_view_backward(cache, g, work=None):
    # g = dL/ds_1 is s_2 G^T / N (plus a multiple of s_2 1 1^T): its columns have zero mean because the
    # columns of s_2 do, so the mean-subtraction pass of the standardisation backward is skipped.
    if cache[0] == "batchnorm":
        _, s, sigma = cache
        return standardize_backward(s, sigma, g, work=work, centered=True)
    _, s, sigma, ucache = cache
    gu = standardize_backward(s, sigma, g, ddof=1, work=work, centered=True)
    return l2_normalize_backward(ucache, gu)[0]


def _bt_forward(z1, z2, lambd, target, normalization, eps):
    """Sum_i (1 - C_ii)^2 + lambd * Sum_{i != j} (C_ij - target)^2 with C = s1^T s2 / N."""
    _check_views(z1, z2, "z1", "z2", min_rows=2 if normalization == "tsai" else 1)
    lambd = V.positive(lambd, "lambd")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    eps = V.positive(eps, "eps")
    n, d = z1.shape
    dt = z1.dtype.type
    s1, nc1 = _normalize_view(z1, "z1", normalization, eps)
    s2, nc2 = _normalize_view(z2, "z2", normalization, eps)
    c = np.einsum("nd,nd->d", s1, s2) / dt(n)  # diagonal of C
    if _use_gram(n, d):
        k1 = s1 @ s1.T
        k2 = s2 @ s2.T
        off_sq = np.vdot(k1, k2) / dt(n * n) - np.dot(c, c)  # ||C||_F^2 - sum_i C_ii^2
        mats = ("gram", k1, k2)
    else:
        cm = s1.T @ s2
        cm /= dt(n)
        np.fill_diagonal(cm, 0)  # keep only the off-diagonal part; the diagonal is c
        off_sq = np.vdot(cm, cm)
        mats = ("cross", cm)
    off = off_sq
    if target != 0:
        # sum_{i != j} (C_ij - t)^2 = off_sq - 2 t sum_{i != j} C_ij + t^2 D (D - 1),
        # sum_{i != j} C_ij = (s1 1)^T (s2 1) / N - tr C with row sums r_k = s_k 1
        r1, r2 = s1.sum(axis=1), s2.sum(axis=1)
        off_sum = np.dot(r1, r2) / dt(n) - c.sum()
        off = off_sq - 2 * target * off_sum + target * target * d * (d - 1)
        mats = mats + (r1, r2)
    loss = np.sum((1 - c) ** 2) + dt(lambd) * off
    cache = (s1, s2, nc1, nc2, c, lambd, target, mats)
    name = "barlow_twins" if target == 0 else "barlow_twins_hsic"
    return V.finite_output(dt(loss), name, lambd=lambd, eps=eps), cache


def _bt_backward(cache, grad_out):
    s1, s2, nc1, nc2, c, lambd, target, mats = cache
    n, d = s1.shape
    dt = s1.dtype.type
    go = float(V.grad_out(grad_out, (), s1.dtype))
    # G = dL/dC: 2 lambd (C_ij - t) off the diagonal, 2 (C_ii - 1) on it.
    if mats[0] == "gram":
        k1, k2 = mats[1], mats[2]
        # s2 G^T = 2 lambd K2 s1 / N - 2 lambd t (s2 1) 1^T + s2 diag(w), w = 2(c - 1) - 2 lambd (c - t)
        w = (2 * (c - 1) - 2 * lambd * (c - target)) * dt(go / n)
        f = dt(2 * lambd * go / (n * n))
        # scale the N x N factor rather than the N x D product (fewer flops for N < D); one scratch
        # buffer serves every elementwise product below
        g1 = (k2 * f) @ s1
        work = np.multiply(s2, w)
        g1 += work
        g2 = (k1 * f) @ s2
        g2 += np.multiply(s1, w, out=work)
        if target != 0:
            r1, r2 = mats[3], mats[4]
            t = dt(2 * lambd * target * go / n)
            g1 -= t * r2[:, None]
            g2 -= t * r1[:, None]
    else:
        cm = mats[1]
        gm = cm * dt(2 * lambd * go / n)
        if target != 0:
            gm -= dt(2 * lambd * target * go / n)
        np.fill_diagonal(gm, 2 * (c - 1) * dt(go / n))
        g1 = s2 @ gm.T
        g2 = s1 @ gm
        work = None
    return _normalize_view_backward(nc1, g1, work), _normalize_view_backward(nc2, g2, work)


def barlow_twins_forward(z1, z2, *, lambd=0.0051, eps=DEFAULT_EPS):
    """Barlow Twins loss of two views.

        s_k = (z_k - mean) / sqrt(Var_b + eps)          per column, each view with its own statistics
        C   = s_1^T s_2 / N                              (D, D) cross-correlation
        L   = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

    Shapes: z1, z2 (N, D) -> scalar.  Var_b is the biased variance and
    eps = 1e-5 (affine-free BatchNorm1d in training mode), lambd = 0.0051 as in
    the official code.  Identical views give C_ii = Var_b / (Var_b + eps),
    slightly below 1.  A constant (collapsed) column standardises to zeros and
    contributes (1 - 0)^2 = 1: finite, never NaN.

    Scale conventions of other implementations (tested in tests/test_redundancy.py):
    solo-learn multiplies this loss by 0.025 (lambd = 5e-3); the first official
    code release multiplied it by 1/32 with lambd = 3.9e-3.

    Reference: Zbontar et al. 2021, arXiv 2103.03230; facebookresearch/barlowtwins
    main.py (class BarlowTwins).  Backward: derivations/ib_connection.md#barlow_twins.
    """
    return _bt_forward(z1, z2, lambd, 0, "batchnorm", eps)


def barlow_twins_backward(cache, grad_out):
    """Gradients (dz1, dz2) through C and both standardisations."""
    return _bt_backward(cache, grad_out)


def barlow_twins_hsic_forward(z1, z2, *, lambd=0.0051, eps=DEFAULT_EPS, normalization="batchnorm"):
    """Barlow Twins with an off-diagonal target of -1 (HSIC variant, Tsai et al. 2021).

        L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} (1 + C_ij)^2

    with C as in ``barlow_twins``.  Shapes: z1, z2 (N, D) -> scalar.
    Equivalently L = L_BT + 2 lambd (1^T C 1 - tr C) + lambd D (D - 1): a weak
    linear push toward negative correlation (derivations/ib_connection.md#barlow_twins_hsic,
    equation IB8).

    ``normalization``:
      * ``"batchnorm"`` (default): per-view BatchNorm standardisation with the
        biased variance and ``eps``, exactly as ``barlow_twins``.
      * ``"tsai"``: reproduces the authors' code -- each row is first
        L2-normalised (torch ``F.normalize``), then every column is divided by
        its *unbiased* std with no eps, and C is still s_1^T s_2 / N, so
        C_ii <= (N - 1) / N (0.75 at N = 4).  Needs N >= 2; constant columns
        raise ValueError (division by a zero std).  ``eps`` is unused.

    Reference: Tsai et al. 2021, arXiv 2104.13712; yaohungt/Barlow-Twins-HSIC
    main.py (corr_neg_one), model.py (F.normalize).  Their code's default
    lambd is 0.005 and its default off-diagonal target is 0 (= barlow_twins).
    Backward: derivations/ib_connection.md#barlow_twins_hsic.
    """
    return _bt_forward(z1, z2, lambd, -1, normalization, eps)


def barlow_twins_hsic_backward(cache, grad_out):
    """Gradients (dz1, dz2); the -1 target adds a row-sum term to dL/ds."""
    return _bt_backward(cache, grad_out)


def _bt_example(rng, dtype=np.float64):
    n, d = int(rng.integers(3, 9)), int(rng.integers(2, 8))  # N = 2 standardises to +-1: gradient ~ eps
    base = rng.standard_normal((n, d))
    z1 = base + 0.5 * rng.standard_normal((n, d))
    z2 = 2.0 * base + 0.5 * rng.standard_normal((n, d)) + 1.0
    return (z1.astype(dtype), z2.astype(dtype)), {"lambd": float(rng.uniform(0.003, 0.3))}


def _bt_hsic_example(rng, dtype=np.float64):
    args, kw = _bt_example(rng, dtype)
    if rng.uniform() < 0.5:
        kw["normalization"] = "tsai"
    return args, kw


register(
    "barlow_twins",
    forward=barlow_twins_forward,
    backward=barlow_twins_backward,
    example=_bt_example,
    differentiable=(0, 1),
    reference="Zbontar et al. 2021, arXiv 2103.03230; facebookresearch/barlowtwins main.py (BarlowTwins)",
    derivation="derivations/ib_connection.md#barlow_twins",
    hyper_ranges={"lambd": Range(1e-3, 1.0)},
)

register(
    "barlow_twins_hsic",
    forward=barlow_twins_hsic_forward,
    backward=barlow_twins_hsic_backward,
    example=_bt_hsic_example,
    differentiable=(0, 1),
    reference="Tsai et al. 2021, arXiv 2104.13712; yaohungt/Barlow-Twins-HSIC main.py, model.py",
    derivation="derivations/ib_connection.md#barlow_twins_hsic",
    hyper_ranges={"lambd": Range(1e-3, 1.0)},
)


# ---------------------------------------------------------------------------
# VICReg
# ---------------------------------------------------------------------------

def _offdiag_sq(xc, m1):
    """sum_{i != j} Cov_ij^2 with Cov = xc^T xc / m1, and what its gradient needs."""
    n, d = xc.shape
    dt = xc.dtype.type
    cdiag = np.einsum("nd,nd->d", xc, xc) / dt(m1)
    if _use_gram(n, d):
        k = xc @ xc.T
        val = np.vdot(k, k) / dt(m1 * m1) - np.dot(cdiag, cdiag)
        return val, ("gram", k, cdiag)
    cov = xc.T @ xc
    cov /= dt(m1)
    np.fill_diagonal(cov, 0)
    return np.vdot(cov, cov), ("cross", cov)


def _offdiag_sq_grad(xc, m1, aux, scale):
    """scale * d/dxc sum_{i != j} Cov_ij^2 = scale * 4 xc offdiag(Cov) / m1."""
    dt = xc.dtype.type
    if aux[0] == "gram":
        k, cdiag = aux[1], aux[2]
        g = k @ xc
        g *= dt(4 * scale / (m1 * m1))
        g -= xc * (cdiag * dt(4 * scale / m1))
        return g
    return xc @ (aux[1] * dt(4 * scale / m1))


def vicreg_forward(x, y, *, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, batch_size=None):
    """VICReg loss, exactly as the official code computes it.

        s = (1/(N D)) sum_{n,d} (x_nd - y_nd)^2                                      invariance (MSE)
        v = 1/2 * (1/D) sum_d relu(1 - sqrt(Var_u(x_d) + eps))
          + 1/2 * (1/D) sum_d relu(1 - sqrt(Var_u(y_d) + eps))                        variance
        c = (1/D) sum_{i != j} Cov(x)_ij^2 + (1/D) sum_{i != j} Cov(y)_ij^2,
            Cov(x) = x_c^T x_c / (batch_size - 1), x_c = x - column mean              covariance
        L = sim_coeff * s + std_coeff * v + cov_coeff * c

    Shapes: x, y (N, D) with N >= 2 (unbiased variance) -> scalar.  eps = 1e-4
    and the hinge target 1 are hard-coded in the official code.  The 1/2 on
    each variance term is in the official code but not in the paper's equation;
    solo-learn omits it (variance term x2).  ``batch_size`` is the configured
    (global) batch size that the official code uses in the covariance
    denominator; ``None`` (default) means the number of rows N.  The
    coefficients may be 0 (ablations).  The hinge relu'(0) is taken as 0.
    A constant (collapsed) column gives std = sqrt(eps) = 0.01: finite.

    Reference: Bardes et al. 2022, arXiv 2105.04906; facebookresearch/vicreg
    main_vicreg.py (VICReg.forward).  Backward: derivations/ib_connection.md#vicreg.
    """
    _check_views(x, y, "x", "y", min_rows=2)
    sim_coeff = V.in_range(sim_coeff, "sim_coeff", 0.0, np.inf)
    std_coeff = V.in_range(std_coeff, "std_coeff", 0.0, np.inf)
    cov_coeff = V.in_range(cov_coeff, "cov_coeff", 0.0, np.inf)
    eps = V.positive(eps, "eps")
    n, d = x.shape
    m1 = (n if batch_size is None else V.positive_int(batch_size, "batch_size", minimum=2)) - 1
    dt = x.dtype.type

    diff = x - y
    inv = np.vdot(diff, diff) / dt(n * d)
    xc = x - x.mean(axis=0, keepdims=True)
    yc = y - y.mean(axis=0, keepdims=True)
    std_x = np.sqrt(np.einsum("nd,nd->d", xc, xc) / dt(n - 1) + dt(eps))
    std_y = np.sqrt(np.einsum("nd,nd->d", yc, yc) / dt(n - 1) + dt(eps))
    var_term = (np.maximum(1 - std_x, 0).mean() + np.maximum(1 - std_y, 0).mean()) / 2
    cx, ax = _offdiag_sq(xc, m1)
    cy, ay = _offdiag_sq(yc, m1)
    cov_term = (cx + cy) / dt(d)
    loss = dt(sim_coeff) * inv + dt(std_coeff) * var_term + dt(cov_coeff) * cov_term
    cache = (diff, xc, yc, std_x, std_y, ax, ay, m1, sim_coeff, std_coeff, cov_coeff)
    return V.finite_output(dt(loss), "vicreg", sim_coeff=sim_coeff, std_coeff=std_coeff, cov_coeff=cov_coeff,
                           eps=eps), cache


def vicreg_backward(cache, grad_out):
    """Gradients (dx, dy).  Centring needs no backward term: every gradient below has zero column means."""
    diff, xc, yc, std_x, std_y, ax, ay, m1, sim_coeff, std_coeff, cov_coeff = cache
    n, d = xc.shape
    dt = xc.dtype.type
    go = float(V.grad_out(grad_out, (), xc.dtype))
    out = []
    for sign, zc, std, aux in ((1.0, xc, std_x, ax), (-1.0, yc, std_y, ay)):
        g = _offdiag_sq_grad(zc, m1, aux, go * cov_coeff / d)
        g += diff * dt(sign * 2 * sim_coeff * go / (n * d))
        # d/dz of -(std_coeff / (2D)) sqrt(Var_u + eps) on the active hinges
        w = np.where(std < 1, -std_coeff * go / (2 * d * (n - 1)) / std, 0).astype(zc.dtype)
        g += zc * w
        out.append(g)
    return tuple(out)


def _vicreg_example(rng, dtype=np.float64):
    n, d = int(rng.integers(3, 8)), int(rng.integers(2, 8))
    x = rng.standard_normal((n, d))
    y = x + 0.5 * rng.standard_normal((n, d))
    out = []
    for z in (x, y):
        # exact per-column unbiased std, kept away from the hinge at 1
        zc = z - z.mean(axis=0)
        zc /= zc.std(axis=0, ddof=1)
        target = np.where(rng.uniform(size=d) < 0.5, rng.uniform(0.3, 0.8, d), rng.uniform(1.2, 2.0, d))
        out.append((zc * target + rng.standard_normal(d)).astype(dtype))
    return tuple(out), {}


register(
    "vicreg",
    forward=vicreg_forward,
    backward=vicreg_backward,
    example=_vicreg_example,
    differentiable=(0, 1),
    reference="Bardes et al. 2022, arXiv 2105.04906; facebookresearch/vicreg main_vicreg.py (VICReg.forward)",
    derivation="derivations/ib_connection.md#vicreg",
    # coefficients may be 0 (ablation), so their ranges start at 0 (uniform sampling)
    hyper_ranges={"sim_coeff": Range(0.0, 50.0, log=False), "std_coeff": Range(0.0, 50.0, log=False),
                  "cov_coeff": Range(0.0, 5.0, log=False), "eps": Range(1e-6, 1e-2)},
)
