"""The biased HSIC estimator with linear or Gaussian kernels."""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..registry import register

KERNELS = ("linear", "gaussian")


def _center(k):
    """H K H with H = I - 11^T/n, without forming H."""
    kc = k - k.mean(axis=0, keepdims=True)
    kc -= kc.mean(axis=1, keepdims=True)
    return kc


def _median_pairs(d2):
    """Median of the pairwise distances ||x_i - x_j|| (i < j) and the pair(s) that define it.

    For an even number of pairs the median is the mean of the two middle
    distances (``np.median``); the returned index arrays list those pairs.
    """
    n = d2.shape[0]
    iu, ju = np.triu_indices(n, k=1)
    dist = np.sqrt(d2[iu, ju])
    order = np.argsort(dist, kind="stable")
    m = dist.size
    sel = order[[m // 2]] if m % 2 else order[[m // 2 - 1, m // 2]]
    return iu[sel], ju[sel]


def _kernel(x, name, kernel, sigma):
    if kernel == "linear":
        return x @ x.T, ("linear", x)
    sq = np.einsum("nd,nd->n", x, x)
    d2 = sq[:, None] + sq[None, :] - 2 * (x @ x.T)
    np.maximum(d2, 0, out=d2)
    np.fill_diagonal(d2, 0)
    pairs = None
    if sigma is None:
        a, b = _median_pairs(d2)
        diffs = x[a] - x[b]  # exact differences of the median pair(s), not the expanded form
        norms = np.sqrt(np.einsum("pd,pd->p", diffs, diffs))
        s = float(norms.mean())
        if s == 0:
            raise ValueError(f"{name}: the median pairwise distance is 0 (more than half of the N(N-1)/2 "
                             "pairs of rows coincide, e.g. about N/sqrt(2) identical rows: a collapsed input); "
                             "the median-heuristic bandwidth is undefined, pass sigma explicitly")
        pairs = (a, b, diffs, norms)
    else:
        s = sigma
    k = np.exp(d2 * x.dtype.type(-0.5 / s**2))
    return k, ("gaussian", x, k, d2, s, pairs)


def _kernel_backward(kc_cache, gk):
    """Gradient w.r.t. x of <gk, K(x)> for a symmetric gk (= dHSIC/dK)."""
    if kc_cache[0] == "linear":
        x = kc_cache[1]
        return 2 * (gk @ x)
    _, x, k, d2, s, pairs = kc_cache
    dt = x.dtype.type
    w = gk * k
    # d/dx_i of sum_ij W_ij (-D2_ij / (2 s^2)) = -(2 / s^2) (rowsum(W)_i x_i - (W x)_i)
    gx = (w @ x - w.sum(axis=1)[:, None] * x) * dt(2 / s**2)
    if pairs is not None:
        # bandwidth from the median heuristic: dK_ij/ds = K_ij D2_ij / s^3, s = mean of the median pair norms
        gs = float(np.vdot(w, d2)) / s**3
        a, b, diffs, norms = pairs
        # d||v||/dv = v/||v||; a zero-length middle pair (coincident rows) gets the subgradient 0
        scale = np.zeros_like(norms)
        np.divide(gs / len(a), norms, out=scale, where=norms > 0)
        contrib = diffs * scale[:, None].astype(dt)
        np.add.at(gx, a, contrib)
        np.add.at(gx, b, -contrib)
    return gx


def hsic_forward(x, y, *, kernel="linear", sigma=None):
    """Biased HSIC estimator of the dependence between paired samples x_n and y_n.

        HSIC(x, y) = tr(K H L H) / (N - 1)^2,   H = I - 1 1^T / N,
        K_ij = k(x_i, x_j), L_ij = k(y_i, y_j)

    Kernels: ``"linear"`` k(a, b) = a^T b; ``"gaussian"``
    k(a, b) = exp(-||a - b||^2 / (2 sigma^2)).  Normaliser (N - 1)^2 as in
    Gretton et al. 2005; the 1/N^2 convention is this value times ((N-1)/N)^2.
    With linear kernels on column-standardised features,
    HSIC = N^2 / (N - 1)^2 * ||C||_F^2 with C = s_x^T s_y / N
    (derivations/ib_connection.md#barlow_twins_hsic, equation IB7).

    ``sigma`` (Gaussian kernel only): a bandwidth > 0 used for both inputs, or
    ``None`` (default) for the median heuristic, computed separately for x and
    y: sigma = median over pairs i < j of ||x_i - x_j|| (np.median, so the mean
    of the two middle values for an even number of pairs).  The gradient flows
    through this bandwidth (it is not treated as a constant), so backward is
    the exact derivative of the forward wherever the median pair is unique.
    The median is 0 when more than half of the N(N-1)/2 pairs have distance
    0 (floor(N(N-1)/4) + 1 of them; one group of identical rows must hold
    about N/sqrt(2) rows, e.g. 4 of 5), and then a ValueError is raised
    (derivations/ib_connection.md#hsic, equation HS3); with a fixed sigma (or
    a linear kernel) a collapsed input gives HSIC = 0.

    Shapes: x (N, Dx), y (N, Dy) with N >= 2 -> scalar.
    Reference: Gretton et al. 2005 (ALT, "Measuring statistical dependence with
    Hilbert-Schmidt norms"), biased estimator; used as a loss by Tsai et al.
    2021, arXiv 2104.13712 (yaohungt/Barlow-Twins-HSIC).
    Backward: derivations/ib_connection.md#hsic.
    """
    V.float_array(x, "x", ndim=2, min_rows=2, shape_doc="(N, Dx)")
    V.float_array(y, "y", ndim=2, min_rows=2, shape_doc="(N, Dy)")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows N (paired samples), got "
                         f"x {x.shape} and y {y.shape}")
    V.same_dtype((x, y), ("x", "y"))
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if sigma is not None:
        if kernel != "gaussian":
            raise ValueError("sigma applies only to kernel='gaussian'")
        sigma = V.positive(sigma, "sigma")
    n = x.shape[0]
    k, kx = _kernel(x, "x", kernel, sigma)
    l, ky = _kernel(y, "y", kernel, sigma)
    kc = _center(k)
    lc = _center(l)
    norm = x.dtype.type(1.0 / (n - 1) ** 2)
    val = np.vdot(kc, l) * norm  # tr(K H L H) = <H K H, L>
    return x.dtype.type(val), (kx, ky, kc, lc, norm)


def hsic_backward(cache, grad_out):
    """dHSIC/dK = H L H / (N-1)^2 and dHSIC/dL = H K H / (N-1)^2, then through each kernel."""
    kx, ky, kc, lc, norm = cache
    g = norm * V.grad_out(grad_out, (), kc.dtype)[()]
    return _kernel_backward(kx, lc * g), _kernel_backward(ky, kc * g)


def _example(rng, dtype=np.float64):
    n, dx, dy = int(rng.integers(3, 8)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
    x = rng.standard_normal((n, dx))
    y = np.tanh(x @ rng.standard_normal((dx, dy))) + 0.5 * rng.standard_normal((n, dy))
    r = rng.uniform()
    kw = {"kernel": "linear"} if r < 0.34 else {"kernel": "gaussian"}
    if r > 0.67:
        kw["sigma"] = float(rng.uniform(0.7, 3.0))
    return (x.astype(dtype), y.astype(dtype)), kw


register(
    "hsic",
    forward=hsic_forward,
    backward=hsic_backward,
    example=_example,
    differentiable=(0, 1),
    reference="Gretton et al. 2005 (ALT), biased HSIC estimator; Tsai et al. 2021, arXiv 2104.13712",
    derivation="derivations/ib_connection.md#hsic",
)
