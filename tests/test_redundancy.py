"""Barlow Twins, its HSIC variant, VICReg, HSIC, the Gaussian IB objective and batch standardisation.

Values are checked against slow references written independently below (explicit loops over samples and
dimensions, np.linalg.slogdet, an explicit centring matrix), the claims of derivations/ib_connection.md
against direct evaluation, and the scale conventions of other libraries against re-implementations of their
formulas.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, stats

from refssl import registry
from refssl.ops import redundancy

from .helpers import assert_gradients, seeds

BN_EPS = 1e-5


def _op(name):
    return registry.get(name)


def _views(rng, n, d, noise=0.5):
    base = rng.standard_normal((n, d))
    z1 = base + noise * rng.standard_normal((n, d))
    z2 = 1.7 * base + noise * rng.standard_normal((n, d)) + 0.3
    return z1, z2


# --------------------------------------------------------------------------------------------------------
# slow references: loops, no shared code with refssl
# --------------------------------------------------------------------------------------------------------

def ref_standardize(z, eps=BN_EPS, unbiased=False):
    n, d = z.shape
    out = np.empty_like(z)
    for j in range(d):
        col = [float(v) for v in z[:, j]]
        mu = sum(col) / n
        ss = sum((v - mu) ** 2 for v in col)
        sd = math.sqrt(ss / (n - 1)) if unbiased else math.sqrt(ss / n + eps)
        for i in range(n):
            out[i, j] = (col[i] - mu) / sd
    return out


def ref_cross_corr(s1, s2):
    n, d = s1.shape
    c = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            c[i, j] = sum(s1[k, i] * s2[k, j] for k in range(n)) / n
    return c


def ref_barlow(z1, z2, lambd, target=0.0, eps=BN_EPS, tsai=False):
    if tsai:
        z1 = np.array([r / max(math.sqrt(sum(v * v for v in r)), 1e-12) for r in z1])
        z2 = np.array([r / max(math.sqrt(sum(v * v for v in r)), 1e-12) for r in z2])
    c = ref_cross_corr(ref_standardize(z1, eps, tsai), ref_standardize(z2, eps, tsai))
    d = c.shape[0]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            loss += (1 - c[i, j]) ** 2 if i == j else lambd * (c[i, j] - target) ** 2
    return loss


def ref_vicreg(x, y, sim=25.0, std=25.0, cov=1.0, eps=1e-4, batch_size=None):
    n, d = x.shape
    m = n if batch_size is None else batch_size
    inv = sum((x[i, j] - y[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
    var_term, cov_term = 0.0, 0.0
    for z in (x, y):
        zc = z - z.mean(axis=0)
        for j in range(d):
            sd = math.sqrt(sum(zc[i, j] ** 2 for i in range(n)) / (n - 1) + eps)
            var_term += 0.5 * max(0.0, 1.0 - sd) / d
        for a in range(d):
            for b in range(d):
                if a != b:
                    cab = sum(zc[i, a] * zc[i, b] for i in range(n)) / (m - 1)
                    cov_term += cab ** 2 / d
    return sim * inv + std * var_term + cov * cov_term


def ref_hsic(x, y, kernel="linear", sigma=None):
    n = x.shape[0]

    def gram(z):
        if kernel == "linear":
            return np.array([[float(np.dot(z[i], z[j])) for j in range(n)] for i in range(n)])
        dist = np.array([[math.dist(z[i], z[j]) for j in range(n)] for i in range(n)])
        s = sigma if sigma is not None else float(np.median([dist[i, j] for i in range(n) for j in range(i + 1, n)]))
        return np.exp(-dist ** 2 / (2 * s * s))

    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(gram(x) @ h @ gram(y) @ h)) / (n - 1) ** 2


def ref_gaussian_ib(z1, z2, beta, eps, standardize=True):
    n, d = z1.shape
    if standardize:
        z1, z2 = ref_standardize(z1), ref_standardize(z2)
    cond = eps * np.eye(d)
    for k in range(n):
        dv = (z1[k] - z2[k])[:, None]
        cond += 0.5 * (dv @ dv.T) / n  # unbiased two-sample covariance, averaged over samples
    rows = list(z1) + list(z2)
    mean = sum(rows) / (2 * n)
    marg = eps * np.eye(d)
    for r in rows:
        v = (r - mean)[:, None]
        marg += (v @ v.T) / (2 * n)
    return np.linalg.slogdet(cond)[1] + (1 - beta) / beta * np.linalg.slogdet(marg)[1]


SHAPES = [(5, 3), (3, 7), (6, 6), (4, 11)]  # both N >= D (cross-correlation path) and N < D (Gram path)


@pytest.mark.parametrize("n,d", SHAPES)
def test_batch_standardize_matches_loops(n, d):
    z, _ = _views(np.random.default_rng(n * d), n, d)
    np.testing.assert_allclose(_op("batch_standardize")(z), ref_standardize(z), rtol=1e-12, atol=1e-13)


@pytest.mark.derivation("ib_connection.md#BT3")
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("name,target", [("barlow_twins", 0.0), ("barlow_twins_hsic", -1.0)])
def test_barlow_family_matches_loops(name, target, n, d):
    z1, z2 = _views(np.random.default_rng(10 * n + d), n, d)
    for lambd in (0.0051, 0.3):
        got = _op(name)(z1, z2, lambd=lambd)
        np.testing.assert_allclose(got, ref_barlow(z1, z2, lambd, target), rtol=1e-10)
    if name == "barlow_twins_hsic":
        got = _op(name)(z1, z2, lambd=0.0078125, normalization="tsai")
        np.testing.assert_allclose(got, ref_barlow(z1, z2, 0.0078125, -1.0, tsai=True), rtol=1e-10)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("batch_size", [None, 16])
def test_vicreg_matches_loops(n, d, batch_size):
    rng = np.random.default_rng(n + 7 * d)
    x, y = _views(rng, n, d)
    x[:, 0] *= 0.2  # one column below the hinge, others above
    got = _op("vicreg")(x, y, batch_size=batch_size)
    np.testing.assert_allclose(got, ref_vicreg(x, y, batch_size=batch_size), rtol=1e-10)
    got = _op("vicreg")(x, y, sim_coeff=1.0, std_coeff=3.0, cov_coeff=0.5, eps=1e-3)
    np.testing.assert_allclose(got, ref_vicreg(x, y, 1.0, 3.0, 0.5, 1e-3), rtol=1e-10)


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("gaussian", 1.3), ("gaussian", None)])
@pytest.mark.parametrize("n", [2, 5, 6])
def test_hsic_matches_explicit_centring_matrix(kernel, sigma, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 3))
    y = np.sin(x[:, :2]) + 0.3 * rng.standard_normal((n, 2))
    got = _op("hsic")(x, y, kernel=kernel, sigma=sigma)
    np.testing.assert_allclose(got, ref_hsic(x, y, kernel, sigma), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n,d", [(7, 2), (5, 4), (3, 6)])
@pytest.mark.parametrize("standardize", [True, False])
def test_gaussian_ib_matches_slogdet(n, d, standardize):
    z1, z2 = _views(np.random.default_rng(n * d), n, d)
    for beta, eps in ((2.0, 1e-4), (0.5, 1e-2)):
        got = _op("gaussian_ib")(z1, z2, beta=beta, eps=eps, standardize_views=standardize)
        np.testing.assert_allclose(got, ref_gaussian_ib(z1, z2, beta, eps, standardize), rtol=1e-9)


# --------------------------------------------------------------------------------------------------------
# backward passes against central differences, on configurations beyond the registry example (the tagged
# formulas themselves are evaluated as written further below)
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_batch_standardize_backward(eps):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 4)) * [0.1, 1.0, 3.0, 10.0]
    assert_gradients("batch_standardize", (x,), {"eps": eps}, rng=rng)


def test_unbiased_standardisation_backward_through_tsai_option():
    rng = np.random.default_rng(2)
    z1, z2 = _views(rng, 7, 3)
    assert_gradients("barlow_twins_hsic", (z1, z2), {"normalization": "tsai"}, rng=rng)


@pytest.mark.parametrize("name", ["barlow_twins", "barlow_twins_hsic"])
def test_barlow_backward_cross_correlation_path(name):
    rng = np.random.default_rng(3)
    z1, z2 = _views(rng, 12, 5)  # N >= D
    assert_gradients(name, (z1, z2), {"lambd": 0.2}, rng=rng)


@pytest.mark.parametrize("name", ["barlow_twins", "barlow_twins_hsic"])
def test_barlow_backward_gram_path(name):
    rng = np.random.default_rng(4)
    z1, z2 = _views(rng, 5, 16)  # N < D
    assert_gradients(name, (z1, z2), {"lambd": 0.2}, rng=rng)


@pytest.mark.parametrize("name", ["barlow_twins", "barlow_twins_hsic"])
@pytest.mark.parametrize("n,d", [(4, 9), (9, 4)])
def test_gram_and_cross_paths_agree(monkeypatch, name, n, d):
    z1, z2 = _views(np.random.default_rng(5), n, d)
    outs = []
    for use_gram in (True, False):
        monkeypatch.setattr(redundancy, "_use_gram", lambda n_, d_, u=use_gram: u)
        loss, cache = _op(name).forward(z1, z2, lambd=0.1)
        outs.append((loss, *_op(name).backward(cache, 0.7)))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("n,d,batch_size", [(10, 4, None), (4, 9, None), (6, 5, 32)])
def test_vicreg_backward(n, d, batch_size):
    rng = np.random.default_rng(6)
    x, y = _views(rng, n, d)
    x[:, 0] *= 0.2
    y[:, 1] *= 0.3
    assert_gradients("vicreg", (x, y), {"batch_size": batch_size}, rng=rng)


def test_vicreg_gram_and_cross_paths_agree(monkeypatch):
    x, y = _views(np.random.default_rng(8), 4, 9)
    outs = []
    for use_gram in (True, False):
        monkeypatch.setattr(redundancy, "_use_gram", lambda n_, d_, u=use_gram: u)
        loss, cache = _op("vicreg").forward(x, y)
        outs.append((loss, *_op("vicreg").backward(cache, 1.0)))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("gaussian", 0.8), ("gaussian", 2.5)])
def test_hsic_backward_fixed_kernels(kernel, sigma):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((8, 3))
    y = np.tanh(x @ rng.standard_normal((3, 4))) + 0.2 * rng.standard_normal((8, 4))
    kw = {"kernel": kernel} if sigma is None else {"kernel": kernel, "sigma": sigma}
    assert_gradients("hsic", (x, y), kw, rng=rng)


@pytest.mark.parametrize("n", [5, 6, 8])  # 10, 15, 28 pairs: odd and even numbers of pairs
def test_hsic_backward_through_median_bandwidth(n):
    rng = np.random.default_rng(10 + n)
    x = rng.standard_normal((n, 2))
    y = x ** 2 + 0.3 * rng.standard_normal((n, 2))
    assert_gradients("hsic", (x, y), {"kernel": "gaussian"}, rng=rng)
    # the bandwidth term matters: with sigma frozen at the same median values the gradient differs
    op = _op("hsic")
    med = [float(np.median([np.linalg.norm(z[i] - z[j]) for i in range(n) for j in range(i + 1, n)]))
           for z in (x, y)]
    g_med = op.backward(op.forward(x, y, kernel="gaussian")[1], 1.0)[0]
    frozen_x = _frozen_bandwidth_hsic_grad(x, y, med[0], med[1])
    # (the helper agrees with the op when the op's bandwidth is fixed)
    fixed = op.backward(op.forward(x, y, kernel="gaussian", sigma=1.3)[1], 1.0)[0]
    np.testing.assert_allclose(_frozen_bandwidth_hsic_grad(x, y, 1.3, 1.3), fixed, rtol=1e-5, atol=1e-8)
    assert np.abs(g_med - frozen_x).max() > 1e-3 * np.abs(g_med).max()


def _frozen_bandwidth_hsic_grad(x, y, sx, sy, h=1e-6):
    """Central differences in x of the reference HSIC with both bandwidths held fixed."""
    def f(xx):
        n = xx.shape[0]
        k = np.exp(-np.array([[np.sum((xx[i] - xx[j]) ** 2) for j in range(n)] for i in range(n)]) / (2 * sx**2))
        l = np.exp(-np.array([[np.sum((y[i] - y[j]) ** 2) for j in range(n)] for i in range(n)]) / (2 * sy**2))
        hh = np.eye(n) - 1.0 / n
        return np.trace(k @ hh @ l @ hh) / (n - 1) ** 2
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("n,d,eps", [(9, 3, 1e-4), (4, 6, 0.05)])
def test_gaussian_ib_backward(standardize, n, d, eps):
    rng = np.random.default_rng(11)
    z1, z2 = _views(rng, n, d)
    assert_gradients("gaussian_ib", (z1, z2), {"beta": 3.0, "eps": eps, "standardize_views": standardize},
                     rng=rng)


# --------------------------------------------------------------------------------------------------------
# the backward formulas of derivations/ib_connection.md, evaluated as written (numpy, no refssl code) and
# compared with the ops' backward passes
# --------------------------------------------------------------------------------------------------------

def _std(z, eps=BN_EPS, ddof=0):
    """(z - mean) / sqrt(Var + eps) per column, Var with N - ddof: (s, sigma~)."""
    zc = z - z.mean(axis=0)
    sig = np.sqrt(np.sum(zc * zc, axis=0) / (len(z) - ddof) + eps)
    return zc / sig, sig


def _bs1(y, sig, g, delta=0):
    """(BS1): (g - colmean(g) - y sum_n(g_n y_n) / (N - delta)) / sigma~."""
    return (g - g.mean(axis=0) - y * np.sum(g * y, axis=0) / (len(y) - delta)) / sig


def _bt_g(c, lambd, target):
    """G = dL/dC: 2 (C_ii - 1) on the diagonal, 2 lambd (C_ij - t) off it."""
    g = 2 * lambd * (c - target)
    np.fill_diagonal(g, 2 * (np.diag(c) - 1))
    return g


def _backward(name, args, kwargs, g):
    op = _op(name)
    return op.backward(op.forward(*args, **kwargs)[1], g)


def _shape(rng, wide):
    d = int(rng.integers(2, 7))
    n = int(rng.integers(2, d + 1)) if wide else int(rng.integers(d + 1, d + 8))
    return max(n, 3), d


@pytest.mark.derivation("ib_connection.md#BS1")
@given(seed=seeds)
def test_bs1_is_the_batch_standardize_backward(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(2, 9)), int(rng.integers(1, 6))
    x = rng.standard_normal((n, d)) * rng.uniform(0.01, 10, d) + rng.standard_normal(d)
    eps = float(rng.choice([1e-5, 0.3]))
    g = rng.standard_normal((n, d))
    y, sig = _std(x, eps)
    (dx,) = _backward("batch_standardize", (x,), {"eps": eps}, g)
    np.testing.assert_allclose(dx, _bs1(y, sig, g), rtol=1e-9, atol=1e-11 * np.abs(g).max() / sig.min())


@pytest.mark.derivation("ib_connection.md#BT1")
@pytest.mark.derivation("ib_connection.md#BS1")
@given(seed=seeds)
def test_bt1_then_bs1_is_the_barlow_backward(seed):
    """N >= D (the cross-correlation path): (BT1) then (BS1) on each view, both targets, any upstream g."""
    rng = np.random.default_rng(seed)
    n, d = _shape(rng, wide=False)
    z1, z2 = _views(rng, n, d)
    lambd, g = float(rng.uniform(0.001, 0.5)), float(rng.uniform(-2, 2))
    (s1, sig1), (s2, sig2) = _std(z1), _std(z2)
    for name, target in (("barlow_twins", 0.0), ("barlow_twins_hsic", -1.0)):
        gm = _bt_g(s1.T @ s2 / n, lambd, target)
        ds1, ds2 = g * s2 @ gm.T / n, g * s1 @ gm / n
        d1, d2 = _backward(name, (z1, z2), {"lambd": lambd}, g)
        np.testing.assert_allclose(d1, _bs1(s1, sig1, ds1), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(d2, _bs1(s2, sig2, ds2), rtol=1e-8, atol=1e-10)


@pytest.mark.derivation("ib_connection.md#BT2")
@given(seed=seeds)
def test_bt2_gram_form_is_the_barlow_backward_for_wide_views(seed):
    """N < D (the Gram path): (BT2) with K_k = s_k s_k^T, r_k = s_k 1, w = 2(c - 1) - 2 lambd (c - t); it equals
    (BT1) and, after (BS1), the op's backward."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(3, 6)), int(rng.integers(6, 12))
    z1, z2 = _views(rng, n, d)
    lambd, g = float(rng.uniform(0.001, 0.5)), float(rng.uniform(-2, 2))
    (s1, sig1), (s2, sig2) = _std(z1), _std(z2)
    k1, k2 = s1 @ s1.T, s2 @ s2.T
    r1, r2 = s1.sum(axis=1), s2.sum(axis=1)
    c = np.sum(s1 * s2, axis=0) / n
    ones = np.ones(d)
    for name, target in (("barlow_twins", 0.0), ("barlow_twins_hsic", -1.0)):
        w = 2 * (c - 1) - 2 * lambd * (c - target)
        ds1 = 2 * lambd / n**2 * k2 @ s1 - 2 * lambd * target / n * np.outer(r2, ones) + s2 * w / n
        ds2 = 2 * lambd / n**2 * k1 @ s2 - 2 * lambd * target / n * np.outer(r1, ones) + s1 * w / n
        gm = _bt_g(s1.T @ s2 / n, lambd, target)
        np.testing.assert_allclose(ds1, s2 @ gm.T / n, rtol=1e-10, atol=1e-12)  # (BT2) = (BT1)
        np.testing.assert_allclose(ds2, s1 @ gm / n, rtol=1e-10, atol=1e-12)
        d1, d2 = _backward(name, (z1, z2), {"lambd": lambd}, g)
        np.testing.assert_allclose(d1, _bs1(s1, sig1, g * ds1), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(d2, _bs1(s2, sig2, g * ds2), rtol=1e-8, atol=1e-10)


@pytest.mark.derivation("ib_connection.md#BS1")
@given(seed=seeds, wide=st.booleans())
def test_bs1_with_delta_one_is_the_tsai_backward(seed, wide):
    """normalization="tsai": rows L2-normalised, columns standardised with the unbiased std and no eps; backward
    (BT1), (BS1) with delta = 1, then (g - u u^T g)/||z|| per row."""
    rng = np.random.default_rng(seed)
    n, d = _shape(rng, wide)
    z1, z2 = _views(rng, n, d)
    lambd, g = float(rng.uniform(0.001, 0.5)), float(rng.uniform(-2, 2))
    norms = [np.linalg.norm(z, axis=1, keepdims=True) for z in (z1, z2)]
    u1, u2 = z1 / norms[0], z2 / norms[1]
    (s1, sig1), (s2, sig2) = _std(u1, 0.0, ddof=1), _std(u2, 0.0, ddof=1)
    gm = _bt_g(s1.T @ s2 / n, lambd, -1.0)
    du1 = _bs1(s1, sig1, g * s2 @ gm.T / n, delta=1)
    du2 = _bs1(s2, sig2, g * s1 @ gm / n, delta=1)
    expected = [(du - u * np.sum(u * du, axis=1, keepdims=True)) / nz for du, u, nz in
                ((du1, u1, norms[0]), (du2, u2, norms[1]))]
    d1, d2 = _backward("barlow_twins_hsic", (z1, z2), {"lambd": lambd, "normalization": "tsai"}, g)
    np.testing.assert_allclose(d1, expected[0], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(d2, expected[1], rtol=1e-7, atol=1e-9)


@pytest.mark.derivation("ib_connection.md#VR1")
@given(seed=seeds, wide=st.booleans(), configured=st.booleans())
def test_vr1_is_the_vicreg_backward(seed, wide, configured):
    rng = np.random.default_rng(seed)
    n, d = _shape(rng, wide)
    x, y = _views(rng, n, d)
    x[:, 0] *= 0.2  # hinge active on column 0 of x
    y[:, -1] *= 0.3
    m = int(rng.integers(n, 3 * n)) if configured else n
    c_sim, c_std, c_cov = (float(v) for v in rng.uniform(0.1, 30, 3))
    eps_v = 1e-4
    g = float(rng.uniform(-2, 2))

    def grad(a, b, sign):
        ac = a - a.mean(axis=0)
        sigma = np.sqrt(np.sum(ac * ac, axis=0) / (n - 1) + eps_v)
        cov = ac.T @ ac / (m - 1)
        off = cov - np.diag(np.diag(cov))
        return g * (sign * 2 * c_sim / (n * d) * (a - b) - c_std / (2 * d * (n - 1)) * ac * ((sigma < 1) / sigma)
                    + 4 * c_cov / (d * (m - 1)) * ac @ off)

    kw = dict(sim_coeff=c_sim, std_coeff=c_std, cov_coeff=c_cov, eps=eps_v, batch_size=m if configured else None)
    dx, dy = _backward("vicreg", (x, y), kw, g)
    np.testing.assert_allclose(dx, grad(x, y, 1), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(dy, grad(y, x, 1), rtol=1e-8, atol=1e-10)  # flipped x - y is y - x


def _centring(n):
    return np.eye(n) - np.ones((n, n)) / n


def _hs1(x, k, gamma, kernel, sigma=None):
    """(HS1): 2 Gamma x (linear) or (2 / sigma^2)(W x - diag(W 1) x), W = Gamma o K (Gaussian)."""
    if kernel == "linear":
        return 2 * gamma @ x
    w = gamma * k
    return 2 / sigma**2 * (w @ x - w.sum(axis=1)[:, None] * x)


def _gauss(x, sigma):
    d2 = np.sum((x[:, None] - x[None]) ** 2, axis=2)
    return np.exp(-d2 / (2 * sigma**2)), d2


@pytest.mark.derivation("ib_connection.md#HS1")
@given(seed=seeds, kernel=st.sampled_from(["linear", "gaussian"]))
def test_hs1_is_the_hsic_backward_for_fixed_kernels(seed, kernel):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    x = rng.standard_normal((n, int(rng.integers(1, 5))))
    y = np.tanh(x @ rng.standard_normal((x.shape[1], 3))) + 0.3 * rng.standard_normal((n, 3))
    sigma = float(rng.uniform(0.5, 3.0)) if kernel == "gaussian" else None
    g = float(rng.uniform(-2, 2))
    j = _centring(n)
    kx, ky = (z @ z.T if kernel == "linear" else _gauss(z, sigma)[0] for z in (x, y))
    gamma_x, gamma_y = g * j @ ky @ j / (n - 1) ** 2, g * j @ kx @ j / (n - 1) ** 2
    kw = {"kernel": kernel} if sigma is None else {"kernel": kernel, "sigma": sigma}
    dx, dy = _backward("hsic", (x, y), kw, g)
    np.testing.assert_allclose(dx, _hs1(x, kx, gamma_x, kernel, sigma), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dy, _hs1(y, ky, gamma_y, kernel, sigma), rtol=1e-9, atol=1e-12)


def _median_pairs(x):
    """The middle pair(s) of the sorted distances over i < j: one pair for an odd count, two for an even one."""
    n = len(x)
    pairs = sorted((float(np.linalg.norm(x[i] - x[j])), i, j) for i in range(n) for j in range(i + 1, n))
    p = len(pairs)
    return pairs[p // 2: p // 2 + 1] if p % 2 else pairs[p // 2 - 1: p // 2 + 1]


@pytest.mark.derivation("ib_connection.md#HS2")
@given(seed=seeds)
def test_hs2_adds_the_median_bandwidth_term(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 9))  # 3, 6, 10, ... pairs: odd and even counts
    x = rng.standard_normal((n, 2))
    y = x**2 + 0.3 * rng.standard_normal((n, 2))
    g = float(rng.uniform(-2, 2))
    j = _centring(n)
    out = []
    def median_sigma(z):
        mid = _median_pairs(z)
        return sum(dist for dist, _, _ in mid) / len(mid), mid

    for z, other in ((x, y), (y, x)):
        sigma, mid = median_sigma(z)
        k, d2 = _gauss(z, sigma)
        ko = _gauss(other, median_sigma(other)[0])[0]
        gamma = g * j @ ko @ j / (n - 1) ** 2
        grad = _hs1(z, k, gamma, "gaussian", sigma)
        dsigma = np.sum(gamma * k * d2) / sigma**3
        for dist, a, b in mid:
            step = dsigma / len(mid) * (z[a] - z[b]) / dist
            grad[a] += step
            grad[b] -= step
        out.append(grad)
    dx, dy = _backward("hsic", (x, y), {"kernel": "gaussian"}, g)
    np.testing.assert_allclose(dx, out[0], rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(dy, out[1], rtol=1e-8, atol=1e-11)


@pytest.mark.derivation("ib_connection.md#HS3")
@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 10, 16])
def test_hs3_median_is_zero_only_with_about_n_over_sqrt2_coinciding_rows(n):
    need = n * (n - 1) // 4 + 1
    m_min = next(m for m in range(2, n + 1) if m * (m - 1) // 2 >= need)
    rng = np.random.default_rng(n)
    y = rng.standard_normal((n, 2))
    for m in (m_min - 1, m_min):
        x = rng.standard_normal((n, 3))
        x[:m] = x[0]  # one group of m identical rows, the others distinct
        if m == m_min:
            with pytest.raises(ValueError, match="x: the median pairwise distance is 0"):
                _op("hsic")(x, y, kernel="gaussian")
        else:
            assert np.isfinite(_op("hsic")(x, y, kernel="gaussian"))
    assert abs(m_min - n / math.sqrt(2)) <= 1.5
    # two groups count their pairs together
    if n >= 6:
        x = rng.standard_normal((n, 3))
        x[:3] = x[0]
        x[3:6] = x[3]
        zero_pairs = 6
        raised = zero_pairs >= need
        try:
            _op("hsic")(x, y, kernel="gaussian")
            assert not raised
        except ValueError:
            assert raised


@pytest.mark.derivation("ib_connection.md#GI1")
@given(seed=seeds, standardize=st.booleans())
def test_gi1_is_the_gaussian_ib_backward(seed, standardize):
    """(GI1) d log|S| / dX = X S^-1 / N with explicit inverses, for both terms, then (BS1) when standardising."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 5))
    n = d + int(rng.integers(2, 6))
    z1, z2 = _views(rng, n, d)
    beta, eps, g = float(rng.uniform(0.3, 4)), float(rng.uniform(1e-3, 0.1)), float(rng.uniform(-2, 2))
    if standardize:
        (s1, sig1), (s2, sig2) = _std(z1), _std(z2)
    else:
        s1, s2 = z1, z2
    delta = s1 - s2
    b = np.concatenate([s1, s2])
    b = b - b.mean(axis=0)
    s_cond = delta.T @ delta / (2 * n) + eps * np.eye(d)
    s_marg = b.T @ b / (2 * n) + eps * np.eye(d)
    g_delta = g * delta @ np.linalg.inv(s_cond) / n
    g_b = g * (1 - beta) / beta * b @ np.linalg.inv(s_marg) / n
    ds1, ds2 = g_delta + g_b[:n], -g_delta + g_b[n:]
    if standardize:
        ds1, ds2 = _bs1(s1, sig1, ds1), _bs1(s2, sig2, ds2)
    d1, d2 = _backward("gaussian_ib", (z1, z2), {"beta": beta, "eps": eps, "standardize_views": standardize}, g)
    np.testing.assert_allclose(d1, ds1, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(d2, ds2, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------------------
# invariances and collapse
# --------------------------------------------------------------------------------------------------------

@pytest.mark.derivation("ib_connection.md#IB6")
@given(seed=seeds)
def test_standardisation_of_an_affine_map_rescales_eps(seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((int(rng.integers(2, 9)), int(rng.integers(1, 6))))
    a, b = float(rng.uniform(0.2, 5.0)), rng.standard_normal(z.shape[1]) * 3
    std = _op("batch_standardize")
    np.testing.assert_allclose(std(a * z + b, eps=1e-5), std(z, eps=1e-5 / a**2), rtol=1e-9, atol=1e-10)


@pytest.mark.derivation("ib_connection.md#IB6")
@pytest.mark.parametrize("name", ["barlow_twins", "barlow_twins_hsic"])
@given(seed=seeds)
def test_barlow_is_invariant_to_per_dimension_affine_maps(name, seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(3, 9)), int(rng.integers(2, 9))
    z1, z2 = _views(rng, n, d)
    a = rng.uniform(0.3, 3.0, size=d)  # a > 0, one scale per dimension
    b = 5 * rng.standard_normal(d)
    op = _op(name)
    for w1, w2 in ((a * z1 + b, z2), (z1, a * z2 + b), (a * z1 + b, a[::-1] * z2 - b)):
        # with a negligible eps the invariance is exact to rounding
        np.testing.assert_allclose(op(w1, w2, eps=1e-14), op(z1, z2, eps=1e-14), rtol=1e-8)
    # with eps the only change is eps -> eps / a^2 (IB6): exact for one scale a on both views
    s = float(a[0])
    np.testing.assert_allclose(op(s * z1 + b, s * z2 - b, eps=1e-5), op(z1, z2, eps=1e-5 / s**2), rtol=1e-9)
    # normalising the concatenated views (a known porting bug) would break L(x, x) = L(x, 2x + 4)
    np.testing.assert_allclose(op(z1, z1, eps=1e-14), op(z1, 2 * z1 + 4, eps=1e-14), rtol=1e-9)


def test_negative_scale_is_not_an_invariance():
    """a < 0 flips the sign of a column of C: the loss changes (so the invariance test can fail)."""
    z1, z2 = _views(np.random.default_rng(12), 8, 3)
    flipped = z1 * np.array([-1.0, 1.0, 1.0])
    assert abs(_op("barlow_twins")(flipped, z2) - _op("barlow_twins")(z1, z2)) > 1e-2


def _collapsed(rng, n=6, d=4):
    z1, z2 = _views(rng, n, d)
    z1[:, 1] = 3.0  # a constant (collapsed) column in each view
    z2[:, 1] = -2.0
    return z1, z2


def _finite_forward_backward(name, args, kwargs):
    op = _op(name)
    with np.errstate(all="raise"):
        out, cache = op.forward(*args, **kwargs)
        grads = op.backward(cache, np.ones_like(out) if np.ndim(out) else 1.0)
    assert np.all(np.isfinite(out))
    for g in grads:
        assert g is None or np.all(np.isfinite(g))
    return out, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_collapsed_columns_give_documented_finite_values(dtype):
    rng = np.random.default_rng(13)
    z1, z2 = (v.astype(dtype) for v in _collapsed(rng))
    y, _ = _finite_forward_backward("batch_standardize", (z1,), {})
    assert np.all(y[:, 1] == 0)  # a constant column standardises to zeros
    for name, target in (("barlow_twins", 0.0), ("barlow_twins_hsic", -1.0)):
        loss, _ = _finite_forward_backward(name, (z1, z2), {"lambd": 0.01})
        # the collapsed column contributes (1 - 0)^2 on the diagonal and (0 - t)^2 per off-diagonal entry
        np.testing.assert_allclose(loss, ref_barlow(z1.astype(float), z2.astype(float), 0.01, target), rtol=1e-4)
    loss, _ = _finite_forward_backward("vicreg", (z1, z2), {})
    np.testing.assert_allclose(loss, ref_vicreg(z1.astype(float), z2.astype(float)), rtol=1e-4)
    loss, _ = _finite_forward_backward("gaussian_ib", (z1, z2), {})
    assert np.isfinite(loss)


def test_fully_collapsed_inputs():
    n, d = 5, 3
    const = np.full((n, d), 2.0)
    # VICReg: every std is sqrt(eps) = 0.01, hinge 0.99 on each of the 2D columns, x 1/2 / D
    loss, _ = _finite_forward_backward("vicreg", (const, const), {"sim_coeff": 0.0, "std_coeff": 1.0,
                                                                    "cov_coeff": 0.0})
    np.testing.assert_allclose(loss, 0.99, rtol=1e-12)
    # Barlow Twins: C = 0, loss = D (+ lambd D (D - 1) for the -1 target)
    np.testing.assert_allclose(_finite_forward_backward("barlow_twins", (const, const), {})[0], d)
    np.testing.assert_allclose(_finite_forward_backward("barlow_twins_hsic", (const, const), {"lambd": 0.1})[0],
                               d + 0.1 * d * (d - 1))
    # HSIC: H K H = 0 for a constant input with a linear or fixed-bandwidth kernel
    y = np.random.default_rng(0).standard_normal((n, 2))
    assert _finite_forward_backward("hsic", (const, y), {})[0] == 0
    assert abs(_finite_forward_backward("hsic", (const, y), {"kernel": "gaussian", "sigma": 1.0})[0]) < 1e-15
    # median bandwidth with a zero-length lower middle pair (rows 0-2 coincide; 3 of 6 distances are 0):
    # sigma = half the 4th distance, finite; the zero pair gets the subgradient 0
    x = np.random.default_rng(1).standard_normal((4, 2))
    x[1] = x[2] = x[0]
    val, (gx, gy) = _finite_forward_backward("hsic", (x, y[:4]), {"kernel": "gaussian"})
    np.testing.assert_allclose(val, ref_hsic(x, y[:4], "gaussian"), rtol=1e-10)
    # Gaussian IB: both covariances are eps I, the collapsed value D log(eps) / beta
    np.testing.assert_allclose(_finite_forward_backward("gaussian_ib", (const, const), {"beta": 0.5})[0],
                               d * math.log(1e-4) / 0.5, rtol=1e-12)


def test_collapse_errors_where_the_value_is_undefined():
    z1, z2 = _collapsed(np.random.default_rng(14))
    z1[:, :] = 1.0  # rows identical: every row normalises to the same unit vector
    with pytest.raises(ValueError, match="z1 has constant columns"):
        _op("barlow_twins_hsic")(z1, z2, normalization="tsai")
    x = np.zeros((5, 2))
    x[4] = 1.0  # 4 of 5 rows coincide: the median pairwise distance is 0
    with pytest.raises(ValueError, match="x: the median pairwise distance is 0"):
        _op("hsic")(x, np.random.default_rng(0).standard_normal((5, 2)), kernel="gaussian")


# --------------------------------------------------------------------------------------------------------
# scale conventions of other implementations
# --------------------------------------------------------------------------------------------------------

def solo_learn_barlow(z1, z2, lamb=5e-3, scale_loss=0.025):
    """solo-learn barlow_loss_func: BatchNorm1d(affine=False), corr / N, (corr - I)^2 with off-diag x lamb."""
    n, d = z1.shape
    corr = ref_cross_corr(ref_standardize(z1), ref_standardize(z2))
    cdif = (corr - np.eye(d)) ** 2
    cdif[~np.eye(d, dtype=bool)] *= lamb
    return scale_loss * cdif.sum()


def first_release_barlow(z1, z2, lambd=3.9e-3, scale_loss=1 / 32):
    """The first official code release: scale_loss * (on_diag + lambd * off_diag)."""
    c = ref_cross_corr(ref_standardize(z1), ref_standardize(z2))
    on_diag = np.sum((np.diag(c) - 1) ** 2)
    off_diag = np.sum(c ** 2) - np.sum(np.diag(c) ** 2)
    return scale_loss * (on_diag + lambd * off_diag)


def solo_learn_vicreg(x, y, sim=25.0, var=25.0, cov=1.0):
    """solo-learn vicreg_loss_func: variance_loss without the 1/2 per view."""
    n, d = x.shape
    inv = np.mean((x - y) ** 2)
    var_loss = sum(np.mean(np.maximum(0, 1 - np.sqrt(z.var(axis=0, ddof=1) + 1e-4))) for z in (x, y))
    cov_loss = 0.0
    for z in (x, y):
        zc = z - z.mean(axis=0)
        cz = zc.T @ zc / (n - 1)
        cov_loss += (np.sum(cz ** 2) - np.sum(np.diag(cz) ** 2)) / d
    return sim * inv + var * var_loss + cov * cov_loss


@pytest.mark.parametrize("n,d", [(8, 3), (4, 10)])
def test_solo_learn_barlow_is_0025_times_official(n, d):
    z1, z2 = _views(np.random.default_rng(15), n, d)
    ours = _op("barlow_twins")(z1, z2, lambd=5e-3)
    np.testing.assert_allclose(solo_learn_barlow(z1, z2) / ours, 0.025, rtol=1e-10)


@pytest.mark.parametrize("n,d", [(8, 3), (4, 10)])
def test_first_barlow_release_is_one_32nd_with_lambda_3_9e_3(n, d):
    z1, z2 = _views(np.random.default_rng(16), n, d)
    ours = _op("barlow_twins")(z1, z2, lambd=3.9e-3)
    np.testing.assert_allclose(first_release_barlow(z1, z2) / ours, 1 / 32, rtol=1e-10)
    # and it is not the same loss at the current default lambda
    assert abs(first_release_barlow(z1, z2) * 32 / _op("barlow_twins")(z1, z2) - 1) > 1e-6


def test_solo_learn_vicreg_variance_term_is_twice_official():
    rng = np.random.default_rng(17)
    x, y = _views(rng, 9, 5)
    x *= 0.3  # all stds below 1: every hinge active
    official_v = _op("vicreg")(x, y, sim_coeff=0.0, std_coeff=1.0, cov_coeff=0.0)
    solo_v = solo_learn_vicreg(x, y, sim=0.0, var=1.0, cov=0.0)
    assert official_v > 0.1
    np.testing.assert_allclose(solo_v / official_v, 2.0, rtol=1e-12)
    # the other two terms agree, so the totals differ by exactly 25 * v at the default coefficients
    np.testing.assert_allclose(solo_learn_vicreg(x, y) - _op("vicreg")(x, y), 25 * official_v, rtol=1e-10)


def test_vicreg_configured_batch_size_rescales_the_covariance_term():
    x, y = _views(np.random.default_rng(18), 6, 4)
    only_cov = dict(sim_coeff=0.0, std_coeff=0.0, cov_coeff=1.0)
    default = _op("vicreg")(x, y, **only_cov)
    np.testing.assert_allclose(_op("vicreg")(x, y, batch_size=6, **only_cov), default, rtol=1e-14)
    np.testing.assert_allclose(_op("vicreg")(x, y, batch_size=21, **only_cov), default * (5 / 20) ** 2,
                               rtol=1e-12)


@pytest.mark.parametrize("n", [2, 4, 10])
def test_tsai_code_caps_the_diagonal_at_n_minus_1_over_n(n):
    z = np.random.default_rng(n).standard_normal((n, 1))
    # D = 1: no off-diagonal term; identical views give C_11 = (N - 1) / N, loss = 1 / N^2 (0.0625 at N = 4)
    np.testing.assert_allclose(_op("barlow_twins_hsic")(z, z, normalization="tsai"), 1 / n**2, rtol=1e-10)
    var = z.var()
    np.testing.assert_allclose(_op("barlow_twins_hsic")(z, z), (BN_EPS / (var + BN_EPS)) ** 2, rtol=1e-8)


# --------------------------------------------------------------------------------------------------------
# bad input specific to these ops
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["barlow_twins", "barlow_twins_hsic", "vicreg", "gaussian_ib"])
def test_views_with_different_shapes_are_rejected(name):
    rng = np.random.default_rng(0)
    p = "x" if name == "vicreg" else "z1"
    q = "y" if name == "vicreg" else "z2"
    a = rng.standard_normal((5, 3))
    for b in (rng.standard_normal((5, 4)), rng.standard_normal((4, 3))):
        with pytest.raises(ValueError, match=f"{p} and {q} must have the same shape"):
            _op(name)(a, b)
    with pytest.raises(ValueError, match=rf"{q} must have shape \(N, D\)"):
        _op(name)(a, rng.standard_normal(15))
    with pytest.raises(TypeError, match=f"{p} and {q} must have the same dtype"):
        _op(name)(a, a.astype(np.float32))


def test_hsic_needs_paired_rows_but_not_equal_widths():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3))
    assert np.isfinite(_op("hsic")(x, rng.standard_normal((5, 7))))
    with pytest.raises(ValueError, match="x and y must have the same number of rows"):
        _op("hsic")(x, rng.standard_normal((4, 3)))


def test_options_are_validated():
    rng = np.random.default_rng(0)
    z1, z2 = _views(rng, 5, 3)
    with pytest.raises(ValueError, match="normalization must be one of"):
        _op("barlow_twins_hsic")(z1, z2, normalization="l2")
    with pytest.raises(ValueError, match="eps"):
        _op("barlow_twins")(z1, z2, eps=0.0)
    with pytest.raises(ValueError, match="lambd"):
        _op("barlow_twins")(z1, z2, lambd=-0.1)
    with pytest.raises(ValueError, match="kernel must be one of"):
        _op("hsic")(z1, z2, kernel="rbf")
    with pytest.raises(ValueError, match="sigma applies only"):
        _op("hsic")(z1, z2, sigma=1.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        _op("hsic")(z1, z2, kernel="gaussian", sigma=0.0)
    for key in ("sim_coeff", "std_coeff", "cov_coeff"):
        with pytest.raises(ValueError, match=key):
            _op("vicreg")(z1, z2, **{key: -1.0})
        assert np.isfinite(_op("vicreg")(z1, z2, **{key: 0.0}))  # 0 is an allowed ablation
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        _op("vicreg")(z1, z2, batch_size=1)
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        _op("vicreg")(z1, z2, batch_size=8.0)
    with pytest.raises(TypeError, match="standardize_views must be a bool"):
        _op("gaussian_ib")(z1, z2, standardize_views=1)
    for name, kw in (("vicreg", {}), ("hsic", {}), ("barlow_twins_hsic", {"normalization": "tsai"})):
        with pytest.raises(ValueError, match="at least 2 rows"):
            _op(name)(z1[:1], z2[:1], **kw)


def test_float32_wide_loss_matches_float64():
    """The Gram path subtracts sum_i C_ii^2 from ||C||_F^2; float32 keeps the relative error small."""
    z1, z2 = _views(np.random.default_rng(19), 32, 256)
    for name in ("barlow_twins", "barlow_twins_hsic", "vicreg"):
        l64, c64 = _op(name).forward(z1, z2)
        l32, c32 = _op(name).forward(z1.astype(np.float32), z2.astype(np.float32))
        assert l32.dtype == np.float32
        np.testing.assert_allclose(float(l32), l64, rtol=1e-5)
        for g32, g64 in zip(_op(name).backward(c32, 1.0), _op(name).backward(c64, 1.0)):
            np.testing.assert_allclose(g32 / np.abs(g64).max(), g64 / np.abs(g64).max(), atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# claims of derivations/ib_connection.md
# --------------------------------------------------------------------------------------------------------

def _gaussian_ib_logdets(z1, z2, eps, standardize=True):
    """(log|S_{Z|X}|, log|S_Z|) through the op: beta = 1 keeps the conditional term alone, beta = 1/2 adds the
    marginal term with weight 1."""
    op = _op("gaussian_ib")
    cond = float(op(z1, z2, beta=1.0, eps=eps, standardize_views=standardize))
    return cond, float(op(z1, z2, beta=0.5, eps=eps, standardize_views=standardize)) - cond


@pytest.mark.derivation("ib_connection.md#IB1")
@given(seed=seeds, standardize=st.booleans())
def test_gaussian_entropy_of_the_ops_covariances_is_half_log_det(seed, standardize):
    """(IB1) with scipy's Gaussian entropy of the covariances the op estimates (written out here):
    H = D/2 log(2 pi e) + 1/2 log|S|, so 2 H - D log(2 pi e) is what gaussian_ib adds up."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 5))
    n = d + int(rng.integers(2, 8))
    z1, z2 = _views(rng, n, d)
    eps = float(rng.uniform(1e-4, 0.1))
    s1, s2 = (ref_standardize(z1), ref_standardize(z2)) if standardize else (z1, z2)
    delta = s1 - s2
    both = np.concatenate([s1, s2])
    both = both - both.mean(axis=0)
    s_cond = delta.T @ delta / (2 * n) + eps * np.eye(d)
    s_marg = both.T @ both / (2 * n) + eps * np.eye(d)
    cond, marg = _gaussian_ib_logdets(z1, z2, eps, standardize)
    for cov, logdet in ((s_cond, cond), (s_marg, marg)):
        entropy = stats.multivariate_normal(np.zeros(d), cov).entropy()
        np.testing.assert_allclose(entropy, 0.5 * (d * math.log(2 * math.pi * math.e) + logdet), rtol=1e-10)


@pytest.mark.derivation("ib_connection.md#IB13")
@given(seed=seeds)
def test_the_gaussian_has_the_largest_entropy_for_its_covariance(seed):
    """Z = A U with independent non-Gaussian U_d (uniform, Laplace, logistic): H(Z) = sum_d H(U_d) + log|det A|
    (scipy entropies) is below the Gaussian value 1/2 log((2 pi e)^D det(A Cov(U) A^T)); a Gaussian U attains it."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 5))
    a = np.linalg.qr(rng.standard_normal((d, d)))[0] * rng.uniform(0.5, 2.0, d)  # well conditioned
    logdet_a = np.linalg.slogdet(a)[1]
    for family in (stats.uniform(-1, 2), stats.laplace(0, 0.7), stats.logistic(0, 0.4), stats.norm(0, 1.3)):
        h = d * float(family.entropy()) + logdet_a
        cov = a @ (float(family.var()) * np.eye(d)) @ a.T
        gaussian = 0.5 * (d * math.log(2 * math.pi * math.e) + np.linalg.slogdet(cov)[1])
        if family.dist.name == "norm":
            np.testing.assert_allclose(h, gaussian, rtol=1e-10)
        else:
            assert h < gaussian - 1e-3 * d


def _uniform_plus_gaussian_entropy(a, s):
    """H(Z) of Z = X + E with X ~ U(-a, a), E ~ N(0, s^2) (either may be the 'noise'), by quadrature."""
    def dens(z):
        return (stats.norm.cdf((z + a) / s) - stats.norm.cdf((z - a) / s)) / (2 * a)

    lim = a + 12 * s
    val, _ = integrate.quad(lambda z: -dens(z) * math.log(max(dens(z), 1e-300)), -lim, lim, limit=200)
    return val


@pytest.mark.derivation("ib_connection.md#IB14")
@pytest.mark.parametrize("lam", [0.25, 0.5, 0.9])
def test_gaussian_surrogate_of_the_ib_is_neither_bound(lam):
    """IB = H(Z|X) - lam H(Z).  Case 1: X ~ N(0, s^2), Z = X + U, U ~ U(-a, a): Z|X uniform.  Case 2: X ~ U(-a, a),
    Z = X + E, E ~ N(0, s^2): Z|X Gaussian.  Same marginal.  The surrogate error is gap(Z|X) - lam gap(Z): positive
    in case 1, negative in case 2."""
    a, s = 2.0, 0.5  # wide uniform part: the marginal is visibly non-Gaussian
    h_z = _uniform_plus_gaussian_entropy(a, s)
    hg_z = 0.5 * math.log(2 * math.pi * math.e * (s * s + a * a / 3))
    gap_z = hg_z - h_z
    assert gap_z > 0.01
    cases = ((math.log(2 * a), a * a / 3, 1), (0.5 * math.log(2 * math.pi * math.e * s * s), s * s, -1))
    for h_cond, var_cond, sign in cases:
        hg_cond = 0.5 * math.log(2 * math.pi * math.e * var_cond)
        ib, ib_g = h_cond - lam * h_z, hg_cond - lam * hg_z
        np.testing.assert_allclose(ib_g - ib, (hg_cond - h_cond) - lam * gap_z, rtol=1e-12)
        assert sign * (ib_g - ib) > 1e-3
@pytest.mark.derivation("ib_connection.md#IB2")
@given(seed=seeds)
def test_beta_regimes_of_the_gaussian_ib(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(4, 10)), int(rng.integers(1, 4))
    z1, z2 = _views(rng, n, d)
    eps = 1e-3
    op = _op("gaussian_ib")
    for beta in (0.3, 0.7, 1.0):
        collapsed = d * math.log(eps) / beta
        for kw in ({}, {"standardize_views": False}):
            assert op(z1, z2, beta=beta, eps=eps, **kw) >= collapsed - 1e-9
        np.testing.assert_allclose(op(np.ones((n, d)), np.ones((n, d)), beta=beta, eps=eps), collapsed)
    for beta in (1.5, 4.0):
        lam = (beta - 1) / beta
        same = op(z1, z1, beta=beta, eps=eps)
        marg = op(z1, z1, beta=0.5, eps=eps) - d * math.log(eps)  # (1 - 0.5) / 0.5 = 1: log|S_Z| alone
        np.testing.assert_allclose(same, d * math.log(eps) - lam * marg, rtol=1e-9)
        assert same < d * math.log(eps) / beta


def _correlation(rng, d, scale):
    e = scale * rng.uniform(-1, 1, size=(d, d))
    e = np.triu(e, 1)
    return np.eye(d) + e + e.T


@pytest.mark.derivation("ib_connection.md#IB3")
def test_second_order_link_between_log_det_and_off_diagonal_squares():
    rng = np.random.default_rng(21)
    for scale in (0.05, 0.1, 0.2):
        c = _correlation(rng, 8, scale)
        mu = np.linalg.eigvalsh(c) - 1  # eigenvalues of E
        exact = -np.linalg.slogdet(c)[1]
        approx = 0.5 * np.sum((c - np.eye(8)) ** 2)  # = sum_{i != j} C_ij^2 / 2 = tr E^2 / 2
        # the remainder is O(||E||^3): |sum_k [-log(1 + mu) + mu - mu^2/2]| <= sum_k |mu|^3 / (3 (1 - |mu|))
        bound = np.sum(np.abs(mu) ** 3 / (3 * (1 - np.abs(mu))))
        assert abs(exact - approx) <= bound
        if scale == 0.05:  # off-diagonals of about 0.05 at D = 8: agreement to about 1 %
            np.testing.assert_allclose(exact, approx, rtol=0.02)
    # the cubic term is the next one: -log|C| - tr E^2 / 2 + tr E^3 / 3 = O(||E||^4)
    c = _correlation(rng, 8, 0.05)
    e = c - np.eye(8)
    rem3 = -np.linalg.slogdet(c)[1] - 0.5 * np.trace(e @ e) + np.trace(e @ e @ e) / 3
    assert abs(rem3) <= np.sum(np.abs(np.linalg.eigvalsh(e)) ** 4 / (4 * (1 - 0.5)))


@pytest.mark.derivation("ib_connection.md#IB4")
@given(seed=seeds)
def test_hadamard_log_det_of_a_correlation_matrix_is_at_most_zero(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(6, 20)), int(rng.integers(2, 6))
    s = _op("batch_standardize")(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)), eps=1e-14)
    r = s.T @ s / n
    assert np.linalg.slogdet(r)[1] < 0
    assert np.linalg.slogdet(np.eye(d))[1] == 0


@pytest.mark.derivation("ib_connection.md#IB4")
@given(seed=seeds)
def test_hadamard_bounds_the_marginal_log_det_of_gaussian_ib(seed):
    """Standardised views: diag S_Z = (rho_1 + rho_2)/2 + eps_IB, and log|S_Z| (through the op) is at most the sum
    of the logs of that diagonal; equality for views whose pooled rows have orthogonal, zero-mean columns."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 5))
    n = d + int(rng.integers(2, 8))
    z1, z2 = _views(rng, n, d)
    eps = float(rng.uniform(1e-4, 0.1))
    rho = lambda z: z.var(axis=0) / (z.var(axis=0) + BN_EPS)  # noqa: E731
    marg = _gaussian_ib_logdets(z1, z2, eps)[1]
    assert marg <= np.sum(np.log(0.5 * (rho(z1) + rho(z2)) + eps)) + 1e-12
    # orthonormal columns orthogonal to 1 (zero mean), rescaled: orthogonal, zero-mean columns
    q = np.linalg.qr(np.hstack([np.ones((n, 1)), rng.standard_normal((n, d))]))[0][:, 1:] * rng.uniform(0.5, 2, d)
    marg = _gaussian_ib_logdets(q, -q, eps, standardize=False)[1]  # pooled rows [q; -q]: S_Z = q^T q / N + eps I
    np.testing.assert_allclose(marg, np.sum(np.log(np.sum(q * q, axis=0) / n + eps)), rtol=1e-10)
@pytest.mark.derivation("ib_connection.md#IB5")
@given(seed=seeds)
def test_identical_views(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(3, 9)), int(rng.integers(1, 7))
    z = rng.standard_normal((n, d)) * rng.uniform(0.001, 1.0, size=d)  # small variances make eps visible
    s = _op("batch_standardize")(z)
    var = z.var(axis=0)
    np.testing.assert_allclose(np.sum(s * s, axis=0) / n, var / (var + BN_EPS), rtol=1e-10)
    r = s.T @ s / n
    expected = np.sum((BN_EPS / (var + BN_EPS)) ** 2) + 0.0051 * (np.sum(r**2) - np.sum(np.diag(r) ** 2))
    np.testing.assert_allclose(_op("barlow_twins")(z, z), expected, rtol=1e-9, atol=1e-15)


@pytest.mark.derivation("ib_connection.md#IB7")
@given(seed=seeds)
def test_linear_hsic_of_standardised_views_is_scaled_frobenius_norm_of_c(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(3, 10)), int(rng.integers(1, 8))
    z1, z2 = _views(rng, n, d)
    s1, s2 = _op("batch_standardize")(z1), _op("batch_standardize")(z2)
    c = ref_cross_corr(s1, s2)
    np.testing.assert_allclose(_op("hsic")(s1, s2), n**2 / (n - 1) ** 2 * np.sum(c**2), rtol=1e-9)


@pytest.mark.derivation("ib_connection.md#IB8")
@given(seed=seeds)
def test_hsic_variant_is_barlow_twins_plus_a_linear_term(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(3, 10)), int(rng.integers(1, 8))
    z1, z2 = _views(rng, n, d)
    lambd = float(rng.uniform(0.001, 0.5))
    c = ref_cross_corr(_op("batch_standardize")(z1), _op("batch_standardize")(z2))
    rhs = _op("barlow_twins")(z1, z2, lambd=lambd) + 2 * lambd * (c.sum() - np.trace(c)) + lambd * d * (d - 1)
    np.testing.assert_allclose(_op("barlow_twins_hsic")(z1, z2, lambd=lambd), rhs, rtol=1e-10, atol=1e-15)


@pytest.mark.derivation("ib_connection.md#IB9")
def test_alignment_identity():
    rng = np.random.default_rng(22)
    z1, z2 = _views(rng, 7, 4)
    z1[:, 0] *= 1e-3  # a small-variance column makes rho visibly < 1
    s1, s2 = _op("batch_standardize")(z1), _op("batch_standardize")(z2)
    rho = lambda z: z.var(axis=0) / (z.var(axis=0) + BN_EPS)  # noqa: E731
    lhs = np.sum((s1 - s2) ** 2) / 7
    np.testing.assert_allclose(lhs, np.sum(rho(z1) + rho(z2)) - 2 * np.trace(ref_cross_corr(s1, s2)), rtol=1e-12)
    assert rho(z1)[0] < 0.95


@pytest.mark.derivation("ib_connection.md#IB10")
@given(seed=seeds)
def test_off_diagonal_target_minus_one_is_unreachable(seed):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(3, 9))
    s = _op("batch_standardize")(rng.standard_normal((int(rng.integers(2, 12)), d)), eps=1e-14)
    c = s.T @ s / s.shape[0]  # identical views: C is an auto-correlation with unit diagonal
    mean_off = (c.sum() - np.trace(c)) / (d * (d - 1))
    assert mean_off >= -1 / (d - 1) - 1e-9
    np.testing.assert_allclose(c.sum(), np.sum(s.sum(axis=1) ** 2) / s.shape[0], rtol=1e-9, atol=1e-12)  # |s 1|^2/N
    simplex = d / (d - 1) * (np.eye(d) - np.ones((d, d)) / d)
    np.testing.assert_allclose(np.diag(simplex), 1.0)
    assert np.linalg.eigvalsh(simplex).min() > -1e-12
    np.testing.assert_allclose((simplex.sum() - d) / (d * (d - 1)), -1 / (d - 1))


def _simplex_views(rng, n, d):
    """s (N, D) with zero-mean columns and s^T s / N = D/(D-1) J_D: needs D - 1 <= N - 1 orthonormal directions
    orthogonal to 1_N, i.e. N >= D."""
    u = np.linalg.qr(np.hstack([np.ones((n, 1)), rng.standard_normal((n, d - 1))]))[0][:, 1:]
    v = np.linalg.qr(np.hstack([np.ones((d, 1)), rng.standard_normal((d, d - 1))]))[0][:, 1:]
    return math.sqrt(n * d / (d - 1)) * u @ v.T


@pytest.mark.derivation("ib_connection.md#IB10")
@pytest.mark.parametrize("d", [3, 4, 6])
def test_the_simplex_equality_case_needs_n_at_least_d(d):
    rng = np.random.default_rng(d)
    for n in (d, d + 3):
        s = _op("batch_standardize")(_simplex_views(rng, n, d), eps=1e-14)  # already standardised: unchanged
        c = s.T @ s / n
        np.testing.assert_allclose(c, d / (d - 1) * (np.eye(d) - np.ones((d, d)) / d), atol=1e-9)
        np.testing.assert_allclose((c.sum() - d) / (d * (d - 1)), -1 / (d - 1), atol=1e-10)
        np.testing.assert_allclose(s.sum(axis=1), 0, atol=1e-9)  # equality iff every row of s sums to 0
    for n in range(2, d):  # N < D: C has rank <= N - 1 < D - 1, never the simplex
        s = _op("batch_standardize")(rng.standard_normal((n, d)), eps=1e-14)
        assert np.linalg.matrix_rank(s.T @ s / n, tol=1e-9) <= n - 1 < d - 1
@pytest.mark.derivation("ib_connection.md#IB11")
def test_conditional_covariance_diagonal_is_one_minus_c_ii():
    rng = np.random.default_rng(23)
    z1, z2 = _views(rng, 9, 3)
    z1[:, 2] *= 1e-3
    s1, s2 = _op("batch_standardize")(z1), _op("batch_standardize")(z2)
    rho = lambda z: z.var(axis=0) / (z.var(axis=0) + BN_EPS)  # noqa: E731
    c = np.diag(ref_cross_corr(s1, s2))
    cond_diag = np.sum((s1 - s2) ** 2, axis=0) / (2 * 9)
    np.testing.assert_allclose(cond_diag, 0.5 * (rho(z1) + rho(z2)) - c, rtol=1e-10)
    # the same through gaussian_ib on one dimension (beta = 1 keeps only log|S_{Z|X}|)
    eps = 1e-3
    for j in range(3):
        val = _op("gaussian_ib")(z1[:, j:j + 1], z2[:, j:j + 1], beta=1.0, eps=eps)
        np.testing.assert_allclose(math.exp(val) - eps, 0.5 * (rho(z1)[j] + rho(z2)[j]) - c[j], rtol=1e-9)


@pytest.mark.derivation("ib_connection.md#IB12")
@given(seed=seeds, standardize=st.booleans())
def test_pooling_the_conditional_covariance_bounds_the_mean_log_det(seed, standardize):
    """(1/N) sum_n log|Sigma_n| <= log|S_{Z|X}| = gaussian_ib(beta=1), Sigma_n = (s1_n - s2_n)(...)^T / 2 + eps I."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 5))
    n = d + int(rng.integers(2, 8))
    z1, z2 = _views(rng, n, d)
    eps = float(rng.uniform(1e-4, 0.1))
    s1, s2 = (ref_standardize(z1), ref_standardize(z2)) if standardize else (z1, z2)
    per_sample = [np.linalg.slogdet(0.5 * np.outer(a - b, a - b) + eps * np.eye(d))[1] for a, b in zip(s1, s2)]
    pooled = _gaussian_ib_logdets(z1, z2, eps, standardize)[0]
    assert np.mean(per_sample) <= pooled + 1e-12
    if d > 1:
        assert np.mean(per_sample) < pooled - 1e-6  # different directions: strict
    # equal per-sample covariances (a constant shift between the views): equality
    shift = rng.standard_normal(d)
    sigma = 0.5 * np.outer(shift, shift) + eps * np.eye(d)
    np.testing.assert_allclose(_gaussian_ib_logdets(z1 + shift, z1, eps, standardize=False)[0],
                               np.linalg.slogdet(sigma)[1], rtol=1e-10)


@pytest.mark.derivation("ib_connection.md#IB15")
@given(seed=seeds)
def test_tsai_normalisation_is_invariant_to_row_scales_not_to_column_affine_maps(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(3, 9)), int(rng.integers(2, 7))
    z1, z2 = _views(rng, n, d)
    op = _op("barlow_twins_hsic")
    base = op(z1, z2, normalization="tsai")
    r1, r2 = rng.uniform(0.2, 5, (n, 1)), rng.uniform(0.2, 5, (n, 1))
    np.testing.assert_allclose(op(r1 * z1, r2 * z2, normalization="tsai"), base, rtol=1e-9)
    a, b = rng.uniform(0.3, 3.0, d), 2 * rng.standard_normal(d)
    assert abs(op(a * z1 + b, z2, normalization="tsai") - base) > 1e-6 * max(1.0, abs(base))
    # the batchnorm normalisation is invariant to the same affine map (IB6) and not to row scales
    np.testing.assert_allclose(op(a * z1 + b, z2, eps=1e-14), op(z1, z2, eps=1e-14), rtol=1e-8)
    assert abs(op(r1 * z1, z2, eps=1e-14) - op(z1, z2, eps=1e-14)) > 1e-6 * max(1.0, abs(base))


@pytest.mark.derivation("ib_connection.md#IB16")
@given(seed=seeds)
def test_hadamard_bounds_the_conditional_log_det_by_its_diagonal(seed):
    """log|S_{Z|X}| (through gaussian_ib) <= sum_d log((rho_1 + rho_2)/2 - C_dd + eps_IB); equality when the
    differences of the views have orthogonal columns."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 5))
    n = d + int(rng.integers(2, 8))
    z1, z2 = _views(rng, n, d)
    eps = float(rng.uniform(1e-4, 0.1))
    rho = lambda z: z.var(axis=0) / (z.var(axis=0) + BN_EPS)  # noqa: E731
    c = np.diag(ref_cross_corr(ref_standardize(z1), ref_standardize(z2)))
    bound = np.sum(np.log(0.5 * (rho(z1) + rho(z2)) - c + eps))
    cond = _gaussian_ib_logdets(z1, z2, eps)[0]
    assert cond <= bound + 1e-10
    if d == 1:
        np.testing.assert_allclose(cond, bound, rtol=1e-9)
    q = np.linalg.qr(rng.standard_normal((n, d)))[0] * rng.uniform(0.5, 2, d)  # orthogonal columns
    diag = np.sum(q * q, axis=0) / (2 * n) + eps
    np.testing.assert_allclose(_gaussian_ib_logdets(z2 + q, z2, eps, standardize=False)[0], np.sum(np.log(diag)),
                               rtol=1e-10)
