"""The backward formulas of derivations/contrastive_backward.md, evaluated as written.

Each test computes the tagged equation directly (explicit matrices, no code
shared with refssl/ops) and compares it with the op's backward pass, which the
registry-wide test in turn checks against finite differences.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refssl import registry

from .helpers import seeds


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def backward(name, *args, g=1.0, **kw):
    op = registry.get(name)
    _, cache = op.forward(*args, **kw)
    return op.backward(cache, g)


def tangent(u, du):
    """(B1) for unit-norm rows: remove the radial component."""
    return du - u * np.sum(u * du, axis=1, keepdims=True)


def rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.derivation("contrastive_backward.md#B0")
@given(seed=seeds)
def test_gram_backward_symmetrises(seed):
    u = rand(seed, 4, 3)
    sbar = rand(seed + 1, 4, 4)
    # L = <sbar, U U^T>; perturb each entry of U
    h = 1e-6
    num = np.zeros_like(u)
    for idx in np.ndindex(u.shape):
        up, um = u.copy(), u.copy()
        up[idx] += h
        um[idx] -= h
        num[idx] = (np.sum(sbar * (up @ up.T)) - np.sum(sbar * (um @ um.T))) / (2 * h)
    np.testing.assert_allclose((sbar + sbar.T) @ u, num, rtol=1e-7, atol=1e-8)


@pytest.mark.derivation("contrastive_backward.md#B1")
@given(seed=seeds, scale=st.floats(0.1, 10.0))
def test_l2_normalize_backward_formula_and_tangency(seed, scale):
    x = scale * rand(seed, 5, 4)
    g = rand(seed + 1, 5, 4)
    (dx,) = backward("l2_normalize", x, g=g)
    y = unit(x)
    expected = (g - y * np.sum(y * g, axis=1, keepdims=True)) / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.sum(y * dx, axis=1), 0, atol=1e-12)


@pytest.mark.derivation("contrastive_backward.md#B2")
@given(seed=seeds, tau=st.floats(0.05, 5.0), g=st.floats(-3, 3))
def test_info_nce_backward_formula(seed, tau, g):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 6)), int(rng.integers(2, 6))
    z1, z2 = unit(rng.standard_normal((n, d))), unit(rng.standard_normal((n, d)))
    u = np.concatenate([z1, z2])
    s = u @ u.T / tau
    np.fill_diagonal(s, -np.inf)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    swap = np.concatenate([u[n:], u[:n]])
    du = g / (2 * n * tau) * ((p + p.T) @ u - 2 * swap)
    d1, d2 = backward("info_nce", z1, z2, g=g, temperature=tau)
    expected = tangent(u, du)
    np.testing.assert_allclose(np.concatenate([d1, d2]), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.derivation("contrastive_backward.md#B3")
@given(seed=seeds, tau=st.floats(0.05, 5.0))
def test_symmetric_exponential_identity(seed, tau):
    u = unit(rand(seed, 6, 3))
    s = u @ u.T
    e = np.exp((s - 1) / tau)
    np.fill_diagonal(e, 0)
    r = 1 / e.sum(axis=1)
    p = r[:, None] * e  # row softmax over j != i
    np.testing.assert_allclose(p.sum(axis=1), 1)
    np.testing.assert_allclose(p + p.T, e * (r[:, None] + r[None, :]), rtol=1e-12)


@pytest.mark.derivation("contrastive_backward.md#B4")
@given(seed=seeds, s=st.floats(0.0, 4.6))
def test_clip_backward_formula(seed, s):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    img, txt = unit(rng.standard_normal((n, 4))), unit(rng.standard_normal((n, 4)))
    c = math.exp(s)
    lam = c * img @ txt.T
    pr = np.exp(lam - lam.max(axis=1, keepdims=True))
    pr /= pr.sum(axis=1, keepdims=True)
    pc = np.exp(lam - lam.max(axis=0, keepdims=True))
    pc /= pc.sum(axis=0, keepdims=True)
    G = (pr + pc - 2 * np.eye(n)) / (2 * n)
    di, dt, ds = backward("clip", img, txt, np.asarray(s))
    np.testing.assert_allclose(di, tangent(img, c * G @ txt), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dt, tangent(txt, c * G.T @ img), rtol=1e-9, atol=1e-12)
    assert float(ds) == pytest.approx(np.sum(G * lam), rel=1e-9, abs=1e-12)


@pytest.mark.derivation("contrastive_backward.md#B5")
@given(seed=seeds)
def test_cross_entropy_backward_formula(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 7)), int(rng.integers(1, 6))
    logits, y = rng.standard_normal((n, k)), rng.integers(0, k, size=n)
    soft = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = (soft - np.eye(k)[y]) / n * 0.5
    np.testing.assert_allclose(backward("cross_entropy", logits, y, g=0.5)[0], expected, rtol=1e-12, atol=1e-15)


def _supcon_rows(seed):
    rng = np.random.default_rng(seed)
    b, v = int(rng.integers(2, 5)), int(rng.integers(1, 3))
    z = unit(rng.standard_normal((b, v, 3)))
    y = rng.integers(0, 2, size=b)
    rows = np.concatenate([z[:, k] for k in range(v)])
    return z, y, rows, np.tile(y, v)


def _supcon_expected(rows, yy, tau, kappa, inside):
    m = len(rows)
    s = rows @ rows.T / tau
    np.fill_diagonal(s, -np.inf)
    q = np.exp(s - s.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    pos = (yy[:, None] == yy[None, :]) & ~np.eye(m, dtype=bool)
    if inside:
        w = np.where(pos, np.exp(np.where(pos, s, -np.inf) - s.max(axis=1, keepdims=True)), 0)
        target = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
    else:
        target = pos / np.maximum(pos.sum(axis=1, keepdims=True), 1)
    sbar = kappa / m * (q - target) * pos.any(axis=1, keepdims=True)
    return tangent(rows, (sbar + sbar.T) @ rows / tau)


@pytest.mark.derivation("contrastive_backward.md#B6")
@given(seed=seeds, tau=st.floats(0.05, 2.0))
def test_supcon_backward_formula(seed, tau):
    z, y, rows, yy = _supcon_rows(seed)
    (dz,) = [g for g in backward("supcon", z, y, temperature=tau, base_temperature=0.07) if g is not None]
    got = np.concatenate([dz[:, k] for k in range(z.shape[1])])
    np.testing.assert_allclose(got, _supcon_expected(rows, yy, tau, tau / 0.07, False), rtol=1e-9, atol=1e-11)


@pytest.mark.derivation("contrastive_backward.md#B7")
@given(seed=seeds, tau=st.floats(0.05, 2.0))
def test_supcon_in_backward_formula(seed, tau):
    z, y, rows, yy = _supcon_rows(seed)
    dz = backward("supcon_in", z, y, temperature=tau)[0]
    got = np.concatenate([dz[:, k] for k in range(z.shape[1])])
    np.testing.assert_allclose(got, _supcon_expected(rows, yy, tau, 1.0, True), rtol=1e-9, atol=1e-11)


@pytest.mark.derivation("contrastive_backward.md#B8")
@given(seed=seeds, t=st.floats(0.1, 2.0), tau_plus=st.sampled_from([0.0, 0.1, 0.3, 0.9]))
def test_debiased_backward_formula(seed, t, tau_plus):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 5))
    z1 = unit(rng.standard_normal((n, 3)))
    z2 = unit(z1 + 0.3 * rng.standard_normal((n, 3)))
    u = np.concatenate([z1, z2])
    n2, n_neg = 2 * n, 2 * n - 2
    a = u @ u.T / t
    grad = np.zeros((n2, n2))
    for i in range(n2):
        p = (i + n) % n2
        negs = [j for j in range(n2) if j not in (i, p)]
        pos = math.exp(a[i, p])
        neg = sum(math.exp(a[i, j]) for j in negs)
        est = (neg - tau_plus * n_neg * pos) / (1 - tau_plus)
        clamp = n_neg * math.exp(-1 / t)
        chi = 1.0 if est > clamp else 0.0
        big_s = pos + max(est, clamp)
        for j in negs:
            grad[i, j] = chi / (1 - tau_plus) * math.exp(a[i, j]) / big_s
        grad[i, p] = -1 + pos / big_s * (1 - chi * tau_plus * n_neg / (1 - tau_plus))
    sbar = grad / (n2 * t)
    d1, d2 = backward("debiased_info_nce", z1, z2, temperature=t, tau_plus=tau_plus)
    np.testing.assert_allclose(np.concatenate([d1, d2]), tangent(u, (sbar + sbar.T) @ u), rtol=1e-8, atol=1e-11)


@pytest.mark.derivation("contrastive_backward.md#B9")
@given(seed=seeds, alpha=st.floats(0.5, 4.0))
def test_alignment_backward_formula(seed, alpha):
    x, y = rand(seed, 4, 3), rand(seed + 7, 4, 3)
    d = x - y
    expected = alpha / 4 * np.linalg.norm(d, axis=1, keepdims=True) ** (alpha - 2) * d
    dx, dy = backward("alignment", x, y, alpha=alpha)
    np.testing.assert_allclose(dx, expected, rtol=1e-12)
    np.testing.assert_allclose(dy, -expected, rtol=1e-12)


@pytest.mark.derivation("contrastive_backward.md#B10")
@given(seed=seeds, t=st.floats(0.1, 10.0))
def test_uniformity_backward_formula(seed, t):
    x = unit(rand(seed, 5, 3))
    n = len(x)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    e = np.array([math.exp(-t * np.sum((x[i] - x[j]) ** 2)) for i, j in pairs])
    w = np.zeros((n, n))
    for (i, j), v in zip(pairs, e / e.sum()):
        w[i, j] = w[j, i] = v
    expected = np.stack([-2 * t * sum(w[i, j] * (x[i] - x[j]) for j in range(n) if j != i) for i in range(n)])
    np.testing.assert_allclose(backward("uniformity", x, t=t)[0], expected, rtol=1e-9, atol=1e-12)
