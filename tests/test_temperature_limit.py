"""Numerical checks of derivations/temperature_limit.md (tags T1..T22).

Every expected value is computed here from the formulas of the derivation, with explicit loops over the tiny
inputs (cosines, softmaxes, ties, gaps), never from the code under test.  The ops are reached through the
registry: ``info_nce`` for the loss itself, ``cross_entropy`` on the self-excluded logit rows s_ij/tau for
per-row gradients (it computes the same loss, checked in T1), ``clip`` and ``uniformity`` for sections 5-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refssl import registry
from refssl.ops.clip import LOGIT_SCALE_MAX, clamp_logit_scale

from .helpers import seeds

INFO = registry.get("info_nce")
CE = registry.get("cross_entropy")
CLIP = registry.get("clip")
UNIF = registry.get("uniformity")

temperatures = st.floats(math.log(0.05), math.log(5.0)).map(math.exp)


# ------------------------------------------------------------------------------------ independent helpers


def _views(rng, n, d, kind="random"):
    """Two (n, d) views with random row norms.

    kind: "random" (correlated views), "aligned" (z2 a positive rescaling of z1, so u_{i+N} = u_i),
    "tied" (aligned, and sample 1 duplicates sample 0, which creates ties at the row maximum).
    """
    z1 = rng.standard_normal((n, d))
    if kind == "tied" and n >= 2:
        z1[1] = z1[0]
    scale1 = rng.uniform(0.5, 2.0, size=(n, 1))
    if kind == "random":
        z2 = z1 + 0.7 * rng.standard_normal((n, d))
    else:
        z2 = z1 * rng.uniform(0.5, 2.0, size=(n, 1))
    return z1 * scale1, z2


def _cosines(z1, z2):
    """Stacked unit rows u and s_ij = u_i . u_j, by explicit loops."""
    rows = [np.asarray(r, dtype=np.float64) for r in list(z1) + list(z2)]
    u = np.array([r / math.sqrt(sum(x * x for x in r)) for r in rows])
    m = len(rows)
    s = np.array([[float(sum(a * b for a, b in zip(u[i], u[j]))) for j in range(m)] for i in range(m)])
    return u, s


def _partner(i, m):
    return (i + m // 2) % m


def _row_logits(s, tau):
    """Logits s_ij/tau over j != i and the column of the positive in each row."""
    m = s.shape[0]
    cols = [[j for j in range(m) if j != i] for i in range(m)]
    logits = np.array([[s[i, j] / tau for j in cols[i]] for i in range(m)])
    labels = np.array([cols[i].index(_partner(i, m)) for i in range(m)])
    return logits, labels, cols


def _softmax_offdiag(s, tau):
    """P_ij = exp(s_ij/tau) / sum_{k != i} exp(s_ik/tau), P_ii = 0, with a max shift per row."""
    m = s.shape[0]
    p = np.zeros_like(s)
    for i in range(m):
        top = max(s[i, j] for j in range(m) if j != i)
        w = {j: math.exp((s[i, j] - top) / tau) for j in range(m) if j != i}
        tot = sum(w.values())
        for j, v in w.items():
            p[i, j] = v / tot
    return p


def _negatives(i, m):
    return [j for j in range(m) if j not in (i, _partner(i, m))]


def _ties_and_gap(values, tol=1e-12):
    """(max, number of entries within tol of it, gap to the next smaller value or inf)."""
    top = max(values)
    count = sum(1 for v in values if top - v <= tol)
    rest = [top - v for v in values if top - v > tol]
    return top, count, (min(rest) if rest else math.inf)


def _info_nce(z1, z2, tau):
    return float(INFO.forward(z1, z2, temperature=tau)[0])


def _ce_rows(s, tau):
    """cross_entropy on the self-excluded logit rows: (loss, dL/ds_ij as an (m, m-1) array, labels, cols)."""
    logits, labels, cols = _row_logits(s, tau)
    loss, cache = CE.forward(logits, labels)
    dlogits = CE.backward(cache, 1.0)[0]
    return float(loss), dlogits / tau, labels, cols


def _hardness_from_op(s, tau):
    """r_ij (T4) from the op's gradient: each negative's share of the row's total push."""
    m = s.shape[0]
    _, ds, labels, cols = _ce_rows(s, tau)
    r = []
    for i in range(m):
        neg = [c for c in range(m - 1) if c != labels[i]]
        push = ds[i, neg]
        r.append(push / push.sum())
    return r


def _entropy(r):
    r = r[r > 0]
    return float(-np.sum(r * np.log(r)))


def _simplex(n, d, rng):
    """n unit vectors with pairwise cosine -1/(n-1), randomly rotated into R^d (d >= n - 1)."""
    e = np.eye(n) - 1.0 / n  # rows sum to zero, span the (n-1)-dim subspace orthogonal to ones
    basis = np.linalg.svd(e)[2][: n - 1]  # orthonormal basis of that subspace, (n-1, n)
    coords = e @ basis.T  # (n, n-1) coordinates of the centred vertices
    coords /= np.linalg.norm(coords, axis=1, keepdims=True)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0][: n - 1]  # (n-1, d) orthonormal rows
    return coords @ q


def _lower_bound(n, tau):
    return math.log1p(2 * (n - 1) * math.exp(-n / ((n - 1) * tau)))


def _circle(angles):
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _pair_sq_dists(x):
    k = x.shape[0]
    return [float(sum((x[p, c] - x[q, c]) ** 2 for c in range(x.shape[1]))) for p in range(k)
            for q in range(p + 1, k)]


# ------------------------------------------------------------------------------- 1. gradient w.r.t. s


@pytest.mark.derivation("temperature_limit.md#T1")
@given(seed=seeds, n=st.integers(1, 5), d=st.integers(2, 6), tau=temperatures)
def test_similarity_gradient_is_softmax_minus_onehot_over_tau(seed, n, d, tau):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d)
    _, s = _cosines(z1, z2)
    loss, ds, labels, cols = _ce_rows(s, tau)
    # the per-row formulation is the loss info_nce computes
    assert loss == pytest.approx(_info_nce(z1, z2, tau), rel=1e-12, abs=1e-14)
    m = 2 * n
    p = _softmax_offdiag(s, tau)
    expected = np.array([[(p[i, j] - (j == _partner(i, m))) / tau for j in cols[i]] for i in range(m)])
    np.testing.assert_allclose(ds * m, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.derivation("temperature_limit.md#T2")
@given(seed=seeds, n=st.integers(2, 5), d=st.integers(2, 6), tau=temperatures)
def test_pull_on_the_positive_equals_total_push_on_negatives(seed, n, d, tau):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d)
    _, s = _cosines(z1, z2)
    loss, ds, labels, _ = _ce_rows(s, tau)
    m = 2 * n
    rows = np.arange(m)
    pull = -ds[rows, labels]
    push = ds.sum(axis=1) + pull
    assert np.all(pull >= 0) and np.all(push > 0)  # pull is 0 when P_pos rounds to 1
    # pull = (1 - P_pos)/tau comes from P_pos - 1 in the op: absolute precision ~ eps / tau
    np.testing.assert_allclose(push, pull, rtol=1e-10, atol=5e-15 / tau)
    # the integrated form: adding a constant to a row of logits leaves the loss unchanged
    logits, labels, _ = _row_logits(s, tau)
    shifted = logits + rng.uniform(-3, 3, size=(m, 1))
    assert float(CE.forward(shifted, labels)[0]) == pytest.approx(loss, rel=1e-12)


@pytest.mark.derivation("temperature_limit.md#T3")
@given(seed=seeds, n=st.integers(1, 5), d=st.integers(2, 6), tau=temperatures)
def test_embedding_gradient_is_projected_symmetrised_similarity_gradient(seed, n, d, tau):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d)
    u, s = _cosines(z1, z2)
    m = 2 * n
    p = _softmax_offdiag(s, tau)
    g = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            if j != i:
                g[i, j] = (p[i, j] - (j == _partner(i, m))) / (tau * m)
    z = np.concatenate([z1, z2])
    expected = np.empty_like(z)
    for k in range(m):
        du = sum((g[k, j] + g[j, k]) * u[j] for j in range(m))
        expected[k] = (du - u[k] * float(u[k] @ du)) / math.sqrt(float(z[k] @ z[k]))
    _, cache = INFO.forward(z1, z2, temperature=tau)
    dz1, dz2 = INFO.backward(cache, 1.0)
    natural = 1.0 / (tau * np.linalg.norm(z, axis=1).min())  # the size of one row's gradient terms
    np.testing.assert_allclose(np.concatenate([dz1, dz2]), expected, rtol=1e-9, atol=1e-13 * natural)


# ------------------------------------------------------------------------------------ 2. hardness


@pytest.mark.derivation("temperature_limit.md#T4")
@given(seed=seeds, n=st.integers(2, 5), d=st.integers(2, 6), tau=temperatures)
def test_hardness_weight_is_the_share_of_the_push(seed, n, d, tau):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d)
    _, s = _cosines(z1, z2)
    m = 2 * n
    r_op = _hardness_from_op(s, tau)
    p = _softmax_offdiag(s, tau)
    for i in range(m):
        neg = _negatives(i, m)
        w = [math.exp(s[i, j] / tau) for j in neg]
        np.testing.assert_allclose(r_op[i], np.array(w) / sum(w), rtol=1e-10)
        rest = 1 - p[i, _partner(i, m)]  # computed by cancellation: relative error ~ 1e-16 / rest
        if rest > 1e-8:
            np.testing.assert_allclose(r_op[i], p[i, neg] / rest, rtol=1e-10 + 1e-15 / rest)


@pytest.mark.derivation("temperature_limit.md#T5")
@given(seed=seeds, n=st.integers(2, 5), d=st.integers(2, 6), tau=temperatures)
def test_hardness_entropy_derivative_is_variance_over_tau_cubed(seed, n, d, tau):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d)
    _, s = _cosines(z1, z2)
    m = 2 * n
    h = 1e-4 * tau
    up, down, at = (_hardness_from_op(s, t) for t in (tau + h, tau - h, tau))
    for i in range(m):
        neg = _negatives(i, m)
        fd = (_entropy(up[i]) - _entropy(down[i])) / (2 * h)
        mean = sum(r * s[i, j] for r, j in zip(at[i], neg))
        var = sum(r * (s[i, j] - mean) ** 2 for r, j in zip(at[i], neg))
        assert var >= 0
        assert fd == pytest.approx(var / tau**3, rel=1e-5, abs=1e-9)
    # strictly increasing in tau for a generic configuration
    grid = np.exp(np.linspace(math.log(0.1), math.log(30.0), 20))
    ent = np.array([[_entropy(r) for r in _hardness_from_op(s, t)] for t in grid])  # (grid, rows)
    assert np.all(np.diff(ent, axis=0) > 0)


@pytest.mark.derivation("temperature_limit.md#T5")
@pytest.mark.parametrize("n", [2, 3, 5])
def test_hardness_entropy_is_flat_when_negatives_are_equally_similar(n):
    """Equality case of T5: on the aligned regular simplex Var = 0, so H = log(2N-2) at every tau."""
    v = _simplex(n, n + 1, np.random.default_rng(n))
    _, s = _cosines(v, 3.0 * v)
    for tau in (0.05, 0.5, 5.0):
        for r in _hardness_from_op(s, tau):
            assert _entropy(r) == pytest.approx(math.log(2 * n - 2), abs=1e-12)


@pytest.mark.derivation("temperature_limit.md#T6")
@given(seed=seeds, n=st.integers(2, 5), d=st.integers(2, 6))
def test_hardness_entropy_tends_to_log_of_negatives_at_large_tau(seed, n, d):
    rng = np.random.default_rng(seed)
    _, s = _cosines(*_views(rng, n, d))
    for r in _hardness_from_op(s, 1e4):
        assert _entropy(r) == pytest.approx(math.log(2 * n - 2), abs=1e-7)


@pytest.mark.derivation("temperature_limit.md#T6")
def test_hardness_entropy_tends_to_log_of_hardest_ties_at_small_tau():
    """Aligned points on a circle at angles 0, 1, 2.5: every anchor's hardest negatives are the two views of its
    nearest other sample (h = 2, gap >= 0.3); an unaligned rotation of the second view breaks the tie (h = 1)."""
    angles = np.array([0.0, 1.0, 2.5])
    z = _circle(angles)
    cases = [(_cosines(z, 2.0 * z)[1], 2), (_cosines(z, _circle(angles + 0.2))[1], 1)]
    for s, hardest in cases:
        errors = []
        for tau in (0.1, 0.01, 0.002):
            errors.append(max(abs(_entropy(r) - math.log(hardest)) for r in _hardness_from_op(s, tau)))
        assert errors[0] > 1e-6 and errors[0] > errors[1] >= errors[2] - 1e-15
        assert errors[-1] < 1e-9


# ------------------------------------------------------------------------------------ 3. tau -> 0


def _hinge_ties_gaps(s):
    """Per anchor: max(hardest negative - positive, 0), ties c_i at the row maximum, gap gamma_i."""
    m = s.shape[0]
    hinge, ties, gaps = [], [], []
    for i in range(m):
        row = [s[i, j] for j in range(m) if j != i]
        top, count, gap = _ties_and_gap(row)
        neg = _negatives(i, m)
        hardest = max(s[i, j] for j in neg) if neg else -math.inf
        hinge.append(max(hardest - s[i, _partner(i, m)], 0.0))
        ties.append(count)
        gaps.append(gap)
    return np.array(hinge), np.array(ties), np.array(gaps)


@pytest.mark.derivation("temperature_limit.md#T7")
@given(seed=seeds, n=st.integers(1, 5), d=st.integers(2, 6), kind=st.sampled_from(["random", "aligned", "tied"]))
def test_small_temperature_limit_is_a_hinge_on_the_hardest_negative(seed, n, d, kind):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d, kind)
    _, s = _cosines(z1, z2)
    hinge = _hinge_ties_gaps(s)[0].mean()
    k = 2 * n - 1
    for tau in (1e-1, 1e-2, 1e-3, 1e-4):
        err = tau * _info_nce(z1, z2, tau) - hinge
        assert -1e-12 <= err <= tau * math.log(k) + 1e-12


@pytest.mark.derivation("temperature_limit.md#T7")
def test_small_temperature_limit_of_a_hand_computed_configuration():
    """N = 2 on the circle with crossed views: rows at angles 0, 1 (z1) and 0.9, 0.1 (z2); positives 0<->2 and
    1<->3 are 0.9 rad apart, while each anchor has a negative only 0.1 rad away.  Every anchor: positive cos .9,
    hardest negative cos .1, next value cos .8.  So tau L -> cos .1 - cos .9 with an exponentially small error
    (the maximum is unique, gap cos .1 - cos .8)."""
    z1 = _circle(np.array([0.0, 1.0]))
    z2 = _circle(np.array([0.9, 0.1]))
    limit = math.cos(0.1) - math.cos(0.9)
    gap = math.cos(0.1) - math.cos(0.8)
    for tau in (1e-1, 1e-2, 1e-3):
        err = tau * _info_nce(z1, z2, tau) - limit
        assert -1e-13 <= err <= tau * 2 * math.exp(-gap / tau) + 1e-13
    assert abs(1e-2 * _info_nce(z1, z2, 1e-2) - limit) < 1e-12


@pytest.mark.derivation("temperature_limit.md#T8")
@given(seed=seeds, n=st.integers(1, 5), d=st.integers(2, 6), kind=st.sampled_from(["random", "aligned", "tied"]))
def test_small_temperature_error_is_tau_log_ties_plus_exponentially_small(seed, n, d, kind):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d, kind)
    _, s = _cosines(z1, z2)
    hinge, ties, gaps = _hinge_ties_gaps(s)
    k = 2 * n - 1
    for tau in (0.2, 0.05, 0.01, 0.002):
        err = tau * _info_nce(z1, z2, tau) - hinge.mean()
        low = tau * np.log(ties).mean()
        high = low + np.mean(tau * (k - ties) / ties * np.exp(-gaps / tau))
        assert low - 1e-11 <= err <= high + 1e-11
        assert err <= tau * math.log(k) + 1e-11  # the middle term is also at most tau log K


@pytest.mark.derivation("temperature_limit.md#T8")
@pytest.mark.parametrize("tau", [0.3, 1.0, 3.0])
def test_tau_log_k_bounds_the_middle_term_not_the_exponential_bound(tau):
    """One row, c = 1, K = 3, gap 0.01 << tau: tau log(c + R) <= tau log 3 ~ 1.10 tau while the exponential bound
    tau log c + tau (K - c)/c e^(-gap/tau) ~ 2 tau exceeds it; per row through cross_entropy on s / tau."""
    s = np.array([[0.50, 0.49, 0.48]])  # column 0 the positive and the unique row maximum
    loss = float(CE.forward(s / tau, np.array([0]))[0])
    mu, c, gap = _ties_and_gap(list(s[0]))
    assert (mu, c) == (0.50, 1) and gap == pytest.approx(0.01)
    hinge = max(max(s[0, 1:]) - s[0, 0], 0.0)
    middle = tau * loss - hinge
    expected_middle = tau * math.log(sum(math.exp(-(mu - v) / tau) for v in s[0]))  # tau log(c + R)
    assert middle == pytest.approx(expected_middle, rel=1e-12)
    exponential = tau * math.log(c) + tau * (3 - c) / c * math.exp(-gap / tau)
    assert tau * math.log(c) <= middle <= min(tau * math.log(3), exponential)
    assert exponential > tau * math.log(3)  # "(<= tau log K)" would be false as a continuation of the chain


@pytest.mark.derivation("temperature_limit.md#T8")
def test_small_temperature_error_slope_is_log_of_ties():
    """Samples 0 and 1 identical, views aligned: anchors of samples 0/1 have c = 3 terms at s = 1
    (positive, the duplicate's two views), sample 2's anchors have c = 1.  (tau L - hinge)/tau -> mean log c."""
    z1 = _circle(np.array([0.0, 0.0, 2.0]))
    _, s = _cosines(z1, z1)
    hinge, ties, _ = _hinge_ties_gaps(s)
    assert list(ties) == [3, 3, 1, 3, 3, 1] and np.all(hinge == 0)
    slope = np.log(ties).mean()
    for tau in (1e-2, 1e-3, 1e-4):
        assert _info_nce(z1, z1, tau) == pytest.approx(slope, abs=1e-9)  # the hinge is 0: L -> mean log c


# ------------------------------------------------------------------------------------ 4. tau -> inf


def _large_tau_terms(s):
    """Per anchor: (linear coefficient l_i, range w_i, variance sigma_i^2, third central moment)."""
    m = s.shape[0]
    k = m - 1
    lin, width, var, third = [], [], [], []
    for i in range(m):
        row = [s[i, j] for j in range(m) if j != i]
        pos = s[i, _partner(i, m)]
        lin.append(-(k - 1) / k * pos + sum(s[i, j] for j in _negatives(i, m)) / k)
        mean = sum(row) / k
        width.append(max(row) - min(row))
        var.append(sum((x - mean) ** 2 for x in row) / k)
        third.append(sum((x - mean) ** 3 for x in row) / k)
    return (np.array(a) for a in (lin, width, var, third))


@pytest.mark.derivation("temperature_limit.md#T9")
@given(seed=seeds, n=st.integers(1, 5), d=st.integers(2, 6), kind=st.sampled_from(["random", "aligned"]))
def test_large_temperature_limit_is_linear_with_hoeffding_remainder(seed, n, d, kind):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d, kind)
    u, s = _cosines(z1, z2)
    lin, width, _, _ = _large_tau_terms(s)
    k = 2 * n - 1
    # the batch form of the linear term: (||sum u||^2 - 2N) / (2N (2N - 1)) - mean positive similarity
    total = u.sum(axis=0)
    mean_pos = sum(s[i, _partner(i, 2 * n)] for i in range(2 * n)) / (2 * n)
    assert lin.mean() == pytest.approx((total @ total - 2 * n) / (2 * n * k) - mean_pos, rel=1e-12, abs=1e-14)
    previous = math.inf
    for tau in (3.0, 30.0, 300.0, 3000.0):
        eps = _info_nce(z1, z2, tau) - (math.log(k) + lin.mean() / tau)
        assert -1e-13 <= eps <= np.mean(width**2) / (8 * tau**2) + 1e-13
        assert eps <= 1 / (2 * tau**2) + 1e-13
        assert eps <= previous + 1e-15
        previous = eps


@pytest.mark.derivation("temperature_limit.md#T10")
@given(seed=seeds, n=st.integers(2, 5), d=st.integers(2, 6))
def test_large_temperature_remainder_is_half_the_variance_over_tau_squared(seed, n, d):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d)
    _, s = _cosines(z1, z2)
    lin, _, var, third = _large_tau_terms(s)
    k = 2 * n - 1
    for tau in (30.0, 100.0, 300.0, 1000.0):
        eps = _info_nce(z1, z2, tau) - (math.log(k) + lin.mean() / tau)
        assert eps * tau**2 == pytest.approx(var.mean() / 2, abs=2.0 / tau)
        # next order: tau^3 (eps - sigma^2 / (2 tau^2)) -> kappa_3 / 6, up to O(1/tau)
        assert tau**3 * (eps - var.mean() / (2 * tau**2)) == pytest.approx(third.mean() / 6, abs=0.5 / tau)


# ------------------------------------------------------------------------------- 5. logit scaling


def _raw_features(rng, n, d):
    return rng.standard_normal((n, d)) / math.sqrt(d), rng.standard_normal((n, d)) / math.sqrt(d)


def _raw_products(f, g):
    return np.array([[float(sum(a * b for a, b in zip(fi, gk))) for gk in g] for fi in f])


def _row_loss(logits_row, label):
    """Loss of one row through the op (a one-row batch)."""
    return float(CE.forward(np.asarray([logits_row], dtype=np.float64), np.array([label]))[0])


betas = st.floats(math.log(0.1), math.log(10.0)).map(math.exp)


@pytest.mark.derivation("temperature_limit.md#T11")
@given(seed=seeds, n=st.integers(2, 6), d=st.integers(2, 6), beta=betas)
def test_scaled_loss_is_log_one_plus_sum_of_exp_negative_margins(seed, n, d, beta):
    rng = np.random.default_rng(seed)
    f, g = _raw_features(rng, n, d)
    s = _raw_products(f, g)
    per_row = [math.log1p(sum(math.exp(-beta * (s[i, i] - s[i, k])) for k in range(n) if k != i))
               for i in range(n)]
    assert float(CE.forward(beta * s, np.arange(n))[0]) == pytest.approx(sum(per_row) / n, rel=1e-12)
    # the same with the features themselves scaled by a: beta = a^2 / tau
    a, tau = math.sqrt(beta * 0.3), 0.3
    scaled = _raw_products(a * f, a * g) / tau
    assert float(CE.forward(scaled, np.arange(n))[0]) == pytest.approx(sum(per_row) / n, rel=1e-11)


@pytest.mark.derivation("temperature_limit.md#T12")
@given(seed=seeds, n=st.integers(2, 6), d=st.integers(2, 6), beta=betas)
def test_scale_derivative_is_expected_similarity_minus_positive(seed, n, d, beta):
    rng = np.random.default_rng(seed)
    f, g = _raw_features(rng, n, d)
    s = _raw_products(f, g)
    labels = np.arange(n)
    _, cache = CE.forward(beta * s, labels)
    d_beta = float(np.sum(CE.backward(cache, 1.0)[0] * s))  # chain rule through logits = beta s
    expected = 0.0
    for i in range(n):
        w = [math.exp(beta * (s[i, k] - s[i].max())) for k in range(n)]
        expected += (sum(wk * s[i, k] for k, wk in enumerate(w)) / sum(w) - s[i, i]) / n
    assert d_beta == pytest.approx(expected, rel=1e-10, abs=1e-14)
    h = 1e-5 * beta
    fd = (float(CE.forward((beta + h) * s, labels)[0]) - float(CE.forward((beta - h) * s, labels)[0])) / (2 * h)
    assert fd == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.derivation("temperature_limit.md#T12")
@given(seed=seeds, n=st.integers(2, 5), beta=betas)
def test_scale_derivative_is_negative_once_the_positive_ranks_first(seed, n, beta):
    rng = np.random.default_rng(seed)
    d = n + 1
    q = np.linalg.qr(rng.standard_normal((d, d)))[0][:n]  # orthonormal rows
    f = q * rng.uniform(0.5, 1.5, size=(n, 1))
    g = f + 0.02 * rng.standard_normal((n, d))
    s = _raw_products(f, g)
    margins = np.array([[s[i, i] - s[i, k] for k in range(n) if k != i] for i in range(n)])
    assert np.all(margins > 0)  # the precondition: every positive ranks first
    for i in range(n):
        _, cache = CE.forward(np.asarray([beta * s[i]]), np.array([i]))
        assert float(np.sum(CE.backward(cache, 1.0)[0] * s[i])) < 0


@pytest.mark.derivation("temperature_limit.md#T13")
@given(seed=seeds, n=st.integers(2, 6), d=st.integers(2, 6))
def test_correctly_ranked_loss_vanishes_exponentially_in_the_scale(seed, n, d):
    rng = np.random.default_rng(seed)
    row = rng.uniform(-1, 0.5, size=n)
    row[0] = 1.0  # the positive (label 0) ranks first with margin >= 0.5
    delta = 1.0 - row[1:].max()
    previous = math.inf
    for beta in (1.0, 4.0, 16.0, 64.0):
        loss = _row_loss(beta * row, 0)
        assert loss <= (n - 1) * math.exp(-beta * delta) + 1e-15 * beta
        assert loss <= previous
        previous = loss


@pytest.mark.derivation("temperature_limit.md#T13")
def test_correctly_ranked_loss_times_exp_margin_tends_to_the_ties():
    row = np.array([1.0, 0.0, 0.0, -1.0])  # margins 1, 1, 2: delta = 1 attained c = 2 times
    errors = [abs(math.exp(beta) * _row_loss(beta * row, 0) - 2.0) for beta in (2.0, 4.0, 8.0, 16.0)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-6


@pytest.mark.derivation("temperature_limit.md#T14")
@given(seed=seeds, n=st.integers(2, 6))
def test_misranked_loss_diverges_linearly_in_the_scale(seed, n):
    rng = np.random.default_rng(seed)
    row = rng.uniform(-1, 1, size=n)
    row[0] = row[1:].max() - rng.uniform(0.05, 1.0)  # some negative beats the positive
    delta = row[0] - row[1:].max()
    for beta in (1.0, 10.0, 100.0, 1000.0):
        loss = _row_loss(beta * row, 0)
        assert -beta * delta - 1e-12 * beta <= loss <= -beta * delta + math.log(n) + 1e-12 * beta
    # the exact asymptote on a hand-made row: delta = -1 attained twice -> L - beta -> log 2
    hand = np.array([0.0, 1.0, 1.0, -1.0])
    errors = [abs(_row_loss(beta * hand, 0) - beta - math.log(2)) for beta in (1.0, 10.0, 100.0, 1000.0)]
    assert errors[1] < 1e-4 and errors[2] < 1e-12 and errors[3] < 1e-12


@pytest.mark.derivation("temperature_limit.md#T15")
@given(seed=seeds, n=st.integers(1, 5), d=st.integers(2, 6), tau=temperatures)
def test_normalisation_removes_the_scale(seed, n, d, tau):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d)
    base = _info_nce(z1, z2, tau)
    for a in (1e-3, 0.37, 1e3):
        assert _info_nce(a * z1, a * z2, tau) == pytest.approx(base, rel=1e-12, abs=1e-14)
    _, cache = INFO.forward(z1, z2, temperature=tau)
    dz = np.concatenate(INFO.backward(cache, 1.0))
    z = np.concatenate([z1, z2])
    radial = np.einsum("ij,ij->i", z, dz)
    assert np.all(np.abs(radial) <= 1e-13 * np.linalg.norm(z, axis=1) * np.linalg.norm(dz, axis=1).max())


@pytest.mark.derivation("temperature_limit.md#T16")
@given(seed=seeds, n=st.integers(2, 5), d=st.integers(2, 6),
       theta=st.floats(0.0, LOGIT_SCALE_MAX), noise=st.sampled_from([0.05, 0.5]))
def test_clip_logit_scale_gradient_is_the_scale_derivative(seed, n, d, theta, noise):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, d))
    txt = img + noise * rng.standard_normal((n, d))
    ui = img / np.linalg.norm(img, axis=1, keepdims=True)
    ut = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    c = _raw_products(ui, ut)
    lam = math.exp(theta)
    rows = cols = 0.0
    for i in range(n):
        w = [math.exp(lam * (c[i, k] - 1)) for k in range(n)]
        rows += sum(wk * c[i, k] for k, wk in enumerate(w)) / sum(w) - c[i, i]
        w = [math.exp(lam * (c[k, i] - 1)) for k in range(n)]
        cols += sum(wk * c[k, i] for k, wk in enumerate(w)) / sum(w) - c[i, i]
    expected = lam / 2 * (rows / n + cols / n)
    _, cache = CLIP.forward(img, txt, np.asarray(theta))
    d_theta = float(CLIP.backward(cache, 1.0)[2])
    # both sides subtract nearly equal numbers of size ~ lambda: absolute precision ~ eps * lambda
    assert d_theta == pytest.approx(expected, rel=1e-9, abs=1e-14 * lam)
    ranked = all(c[i, i] > c[i, k] and c[i, i] > c[k, i] for i in range(n) for k in range(n) if k != i)
    if ranked:
        assert d_theta <= 1e-14 * lam  # <= 0 up to the rounding of sum(G * logits)


@pytest.mark.derivation("temperature_limit.md#T16")
def test_clip_loss_decreases_in_the_scale_until_the_clamp():
    # four unit vectors with pairwise cosine 0.8: margins of 0.2 keep the loss resolvable up to the clamp
    img = np.concatenate([np.full((4, 1), math.sqrt(0.8)), math.sqrt(0.2) * np.eye(4)], axis=1)
    txt = img + 1e-3 * np.random.default_rng(0).standard_normal(img.shape)
    thetas = np.linspace(0.0, LOGIT_SCALE_MAX, 12)
    losses, grads = [], []
    for theta in thetas:
        loss, cache = CLIP.forward(img, txt, np.asarray(theta))
        losses.append(float(loss))
        grads.append(float(CLIP.backward(cache, 1.0)[2]))
    assert np.all(np.diff(losses) < 0) and np.all(np.array(grads) < 0)
    # np.asarray: clamp_logit_scale returns a numpy scalar (np.clip of a 0-d array), which clip rejects
    clamped = np.asarray(clamp_logit_scale(np.asarray(LOGIT_SCALE_MAX + 1.0)))
    assert float(clamped) == pytest.approx(math.log(100.0), abs=1e-15)
    assert float(CLIP.forward(img, txt, clamped)[0]) == pytest.approx(losses[-1], rel=1e-12)
    assert losses[-1] > 0


# --------------------------------------------------------------------------------- 6. lower bound


@pytest.mark.derivation("temperature_limit.md#T17")
@given(seed=seeds, n=st.integers(2, 6), d=st.integers(2, 8), tau=temperatures,
       kind=st.sampled_from(["random", "aligned", "tied", "near_simplex"]),
       noise=st.floats(math.log(1e-4), math.log(0.3)).map(math.exp))
def test_loss_is_above_the_simplex_bound(seed, n, d, tau, kind, noise):
    rng = np.random.default_rng(seed)
    if kind == "near_simplex":
        d = max(d, n - 1)
        v = _simplex(n, d, rng)
        z1 = v + noise * rng.standard_normal(v.shape)
        z2 = v + noise * rng.standard_normal(v.shape)
    else:
        z1, z2 = _views(rng, n, d, kind)
    bound = _lower_bound(n, tau)
    loss = _info_nce(z1, z2, tau)
    assert loss >= bound - 1e-12 * max(1.0, bound)
    assert 2 * loss >= 2 * bound - 1e-12  # the official TF scale


@pytest.mark.derivation("temperature_limit.md#T18")
@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 2.0])
def test_aligned_regular_simplex_attains_the_bound(n, tau):
    rng = np.random.default_rng(10 * n)
    for d in (n - 1, n + 2):
        if d < 1:
            continue
        v = _simplex(n, max(d, 1), rng)
        z1 = v * rng.uniform(0.5, 2.0, size=(n, 1))
        z2 = v * rng.uniform(0.5, 2.0, size=(n, 1))
        closed = math.log1p((2 * n - 2) * math.exp((-1 / (n - 1) - 1) / tau))
        assert closed == pytest.approx(_lower_bound(n, tau), rel=1e-14, abs=1e-300)
        loss, cache = INFO.forward(z1, z2, temperature=tau)
        assert abs(float(loss) - _lower_bound(n, tau)) <= 1e-10
        # tight and stationary: the gradient vanishes at the aligned simplex
        dz1, dz2 = INFO.backward(cache, 1.0)
        assert max(np.abs(dz1).max(), np.abs(dz2).max()) <= 1e-11 / tau
        # pitfall: counting the 2N-1 other rows as distinct simplex vertices overestimates the minimum
        naive = math.log1p((2 * n - 2) * math.exp(-(2 * n - 1) / ((2 * n - 2) * tau)))
        assert float(loss) < naive
        # a perturbation of the directions is strictly above (where the loss resolves the difference)
        if float(loss) > 1e-6 and d > 1:
            bumped = _info_nce(z1 + 1e-2 * rng.standard_normal(z1.shape), z2, tau)
            assert bumped > float(loss) * (1 + 1e-9)


@pytest.mark.derivation("temperature_limit.md#T19")
@given(seed=seeds, n=st.integers(2, 6), d=st.integers(2, 6), tau=temperatures)
def test_aligned_loss_is_a_gaussian_potential_at_t_one_over_two_tau(seed, n, d, tau):
    rng = np.random.default_rng(seed)
    z1, z2 = _views(rng, n, d, "aligned")
    v = _cosines(z1, z1)[0][:n]
    t = 1 / (2 * tau)
    expected = 0.0
    for a in range(n):
        pot = sum(math.exp(-t * sum((v[a, c] - v[b, c]) ** 2 for c in range(d))) for b in range(n) if b != a)
        expected += math.log1p(2 * pot) / n
    assert _info_nce(z1, z2, tau) == pytest.approx(expected, rel=1e-10, abs=1e-13)


@pytest.mark.derivation("temperature_limit.md#T20")
@given(seed=seeds, k=st.integers(2, 7), d=st.integers(2, 4))
def test_uniformity_over_t_tends_to_minus_the_smallest_squared_distance(seed, k, d):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dists = _pair_sq_dists(x)
    p = len(dists)
    neg_top, c, gap = _ties_and_gap([-v for v in dists])
    d_min = -neg_top
    for t in (1.0, 10.0, 100.0, 1000.0):
        val = float(UNIF.forward(x, t=t)[0]) / t + d_min
        low = math.log(c / p) / t
        high = (math.log(c / p) + (p - c) / c * math.exp(-t * gap)) / t
        assert low - 1e-12 <= val <= high + 1e-12


@pytest.mark.derivation("temperature_limit.md#T20")
@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_uniformity_rate_on_the_regular_polygon_counts_the_tied_pairs(k):
    x = _circle(2 * np.pi * np.arange(k) / k + 0.3)
    p, c = k * (k - 1) // 2, (1 if k == 2 else k)  # all k adjacent pairs tie (one pair when k = 2)
    for t in (10.0, 100.0, 1000.0):
        val = float(UNIF.forward(x, t=t)[0]) + t * 4 * math.sin(math.pi / k) ** 2
        assert val == pytest.approx(math.log(c / p), abs=1e-9 + 2 * (p - c) / c * math.exp(-t * 1.0))


@pytest.mark.derivation("temperature_limit.md#T21")
@given(seed=seeds, k=st.integers(2, 8), jitter=st.floats(math.log(1e-3), math.log(1.0)).map(math.exp))
def test_regular_polygon_maximises_the_minimum_distance_on_the_circle(seed, k, jitter):
    rng = np.random.default_rng(seed)
    optimum = 4 * math.sin(math.pi / k) ** 2
    polygon = _circle(2 * np.pi * np.arange(k) / k + rng.uniform(0, 2 * np.pi))
    assert min(_pair_sq_dists(polygon)) == pytest.approx(optimum, abs=1e-12)
    near = _circle(2 * np.pi * np.arange(k) / k + jitter * rng.uniform(-0.5, 0.5, size=k))
    rand = _circle(rng.uniform(0, 2 * np.pi, size=k))
    for x in (near, rand):
        assert min(_pair_sq_dists(x)) <= optimum + 1e-12
        # the same through the op: -L_unif / t <= D_min + log(P) / t
        t = 1e3
        assert -float(UNIF.forward(x, t=t)[0]) / t <= optimum + math.log(k * (k - 1) / 2) / t + 1e-12
    assert min(_pair_sq_dists(near)) < optimum  # independent jitters break the equal gaps


@pytest.mark.derivation("temperature_limit.md#T22")
@given(seed=seeds, k=st.integers(2, 8), t=st.floats(math.log(0.1), math.log(20.0)).map(math.exp),
       jitter=st.floats(math.log(1e-3), math.log(1.0)).map(math.exp))
def test_regular_polygon_minimises_uniformity_at_every_t(seed, k, t, jitter):
    rng = np.random.default_rng(seed)
    base = 2 * np.pi * np.arange(k) / k + rng.uniform(0, 2 * np.pi)
    polygon = _circle(base)
    closed = math.log(sum(math.exp(-4 * t * math.sin(math.pi * m / k) ** 2) for m in range(1, k)) / (k - 1))
    value, cache = UNIF.forward(polygon, t=t)
    assert float(value) == pytest.approx(closed, abs=1e-12 * max(1.0, abs(closed)))
    # a critical point on the circle: the tangential gradient vanishes
    (grad,) = UNIF.backward(cache, 1.0)
    tangent = np.stack([-np.sin(base), np.cos(base)], axis=1)
    assert np.abs(np.einsum("ij,ij->i", grad, tangent)).max() <= 1e-12 * max(1.0, t)
    for x in (_circle(base + jitter * rng.uniform(-0.5, 0.5, size=k)), _circle(rng.uniform(0, 2 * np.pi, size=k))):
        assert float(UNIF.forward(x, t=t)[0]) >= closed - 1e-12 * max(1.0, abs(closed))


# ------------------------------------------------------------------------- 7. many negatives (Wang & Isola)

ALIGN = registry.get("alignment")


def _uniform_pairs_at_angle(rng, n, theta):
    """n positive pairs on S^2: u uniform, v = cos(theta) u + sin(theta) w with w a uniform unit vector orthogonal
    to u.  Both marginals are uniform and every positive similarity is cos(theta)."""
    u = rng.standard_normal((n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w = rng.standard_normal((n, 3))
    w -= u * np.sum(u * w, axis=1, keepdims=True)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    return u, math.cos(theta) * u + math.sin(theta) * w


@pytest.mark.derivation("temperature_limit.md#T23")
@pytest.mark.derivation("temperature_limit.md#T24")
@pytest.mark.parametrize("tau", [0.2, 0.5, 1.0])
def test_large_m_limit_on_the_sphere_by_monte_carlo(tau):
    """info_nce - log(2N - 2) at N = 700 against the closed-form limit -cos(theta)/tau + log(tau sinh(1/tau)) on S^2,
    and against its decomposition t L_align + L_unif(t), t = 1/(2 tau), through the alignment and uniformity ops."""
    n, theta = 700, 0.6
    z1, z2 = _uniform_pairs_at_angle(np.random.default_rng(int(100 * tau)), n, theta)
    mc = _info_nce(z1, z2, tau) - math.log(2 * n - 2)
    limit = -math.cos(theta) / tau + math.log(tau * math.sinh(1 / tau))
    assert abs(mc - limit) < 0.012  # O(1/N) bias + Monte Carlo noise, both ~1e-3 here
    t = 1 / (2 * tau)
    align = float(ALIGN.forward(z1, z2, alpha=2)[0])
    assert align == pytest.approx(2 - 2 * math.cos(theta), rel=1e-12)
    unif = float(UNIF.forward(np.concatenate([z1, z2]), t=t)[0])
    assert abs(mc - (t * align + unif)) < 0.012  # uniform marginal: the Jensen step of (T24) is an equality
    assert abs(unif - (-1 / tau + math.log(tau * math.sinh(1 / tau)))) < 0.012
    # the coupling matters: L_unif at t = 1/tau (instead of 1/(2 tau)) is far off
    wrong = t * align + float(UNIF.forward(np.concatenate([z1, z2]), t=1 / tau)[0])
    assert abs(mc - wrong) > 0.1


_FINITE = np.array([[1.0, 0.0, 0.0], [0.9, 0.3, 0.1], [0.8, 0.1, -0.4], [-0.6, -0.5, 0.6]])
_FINITE = _FINITE / np.linalg.norm(_FINITE, axis=1, keepdims=True)  # three clumped points and one far away


@pytest.mark.derivation("temperature_limit.md#T23")
@pytest.mark.parametrize("tau", [0.2, 0.5, 1.0])
def test_large_m_limit_on_a_finite_distribution(tau):
    """p_data uniform on 4 points, positives identical (aligned views).  A batch holding every point n times makes
    each anchor's 2N - 2 negatives an exact sample of p_data up to O(1/N): info_nce - log(2N - 2) converges to the
    limit of (T23), evaluated by enumeration."""
    x = _FINITE
    k = len(x)
    s = [[float(sum(a * b for a, b in zip(x[i], x[j]))) for j in range(k)] for i in range(k)]
    limit = -1 / tau + sum(math.log(sum(math.exp(s[a][b] / tau) for b in range(k)) / k) for a in range(k)) / k
    errors = []
    for n in (25, 100):
        z = np.repeat(x, n, axis=0)
        errors.append(abs(_info_nce(z, z, tau) - math.log(2 * k * n - 2) - limit))
    assert errors[1] < 0.3 / (k * 100)
    assert errors[1] < errors[0]


@pytest.mark.derivation("temperature_limit.md#T24")
@pytest.mark.parametrize("tau", [0.2, 0.5, 1.0])
def test_uniformity_term_and_its_jensen_bound_on_finite_distributions(tau):
    """(T24) by enumeration on p_data uniform over K points, the population L_unif recovered from the uniformity op
    (it averages the K(K-1)/2 unique pairs; the population mean adds the K self-pairs at distance 0)."""
    t = 1 / (2 * tau)

    def terms(x):
        k = len(x)
        d = [[float(sum((x[i, c] - x[j, c]) ** 2 for c in range(x.shape[1]))) for j in range(k)] for i in range(k)]
        inner = sum(math.log(sum(math.exp(-t * d[a][b]) for b in range(k)) / k) for a in range(k)) / k
        s_lse = -1 / tau + sum(math.log(sum(math.exp((1 - d[a][b] / 2) / tau) for b in range(k)) / k)
                               for a in range(k)) / k
        l_unif = math.log((1 + (k - 1) * math.exp(float(UNIF.forward(x, t=t)[0]))) / k)
        return inner, s_lse, l_unif

    # aligned positives: L_align = 0, so the limit is the uniformity term alone
    inner, s_lse, l_unif = terms(_FINITE)
    assert s_lse == pytest.approx(inner, rel=1e-12)  # the -1/tau + 1/tau constants cancel
    assert inner < l_unif - 0.03  # clumped points: a strict Jensen gap
    # all points alike (a regular polygon): E_{x-} e^{-t||f(x) - f(x-)||^2} is the same for every x, equality
    polygon = _circle(2 * np.pi * np.arange(5) / 5 + 0.4)
    inner, s_lse, l_unif = terms(polygon)
    assert inner == pytest.approx(l_unif, rel=1e-12, abs=1e-14)


# --------------------------------------------------------------------- 8. uniformity vs tolerance (Wang & Liu)


def _clustered(rng, classes=4, per=8, d=3, spread=0.15):
    centres = rng.standard_normal((classes, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(classes), per)
    e = centres[labels] + spread * rng.standard_normal((classes * per, d))
    return e / np.linalg.norm(e, axis=1, keepdims=True), labels


def _tolerance(e, labels):
    """T = mean cosine over ordered pairs of distinct samples of the same class, by loops."""
    vals = [float(e[i] @ e[j]) for i in range(len(e)) for j in range(len(e)) if i != j and labels[i] == labels[j]]
    return sum(vals) / len(vals)


@pytest.mark.derivation("temperature_limit.md#T25")
@given(seed=seeds, tau=temperatures)
def test_share_of_the_push_on_similar_negatives_falls_with_tau(seed, tau):
    """d log r_ij / d tau and d r_iS / d tau of (T25) against central differences in tau of the hardness weights
    taken from the op's gradient (T4), S = the same-class negatives of a class-clustered embedding."""
    rng = np.random.default_rng(seed)
    e, labels = _clustered(rng, classes=3, per=3)
    n = len(e)
    _, s = _cosines(e, e)
    m = 2 * n
    lab = np.concatenate([labels, labels])
    h = 1e-5 * tau
    r0, rp, rm = (_hardness_from_op(s, tt) for tt in (tau, tau + h, tau - h))
    for i in range(m):
        neg = _negatives(i, m)
        sim = np.array([s[i, j] for j in neg])
        mean = float(np.sum(r0[i] * sim))
        fd = (np.log(rp[i]) - np.log(rm[i])) / (2 * h)
        np.testing.assert_allclose(fd, -(sim - mean) / tau**2, rtol=1e-4, atol=1e-6 / tau**2)
        same = np.array([lab[j] == lab[i] for j in neg])
        share = r0[i][same].sum()
        fd_share = (rp[i][same].sum() - rm[i][same].sum()) / (2 * h)
        cond = float(np.sum(r0[i][same] * sim[same]) / share)
        np.testing.assert_allclose(fd_share, -share / tau**2 * (cond - mean), rtol=1e-4, atol=1e-6 / tau**2)
    # the limits: the nearest negatives' share as tau -> 0, |S| / (2N - 2) as tau -> inf
    i = 0
    neg = _negatives(i, m)
    same = np.array([lab[j] == lab[i] for j in neg])
    assert _hardness_from_op(s, 1e4)[i][same].sum() == pytest.approx(same.sum() / (m - 2), rel=1e-3)


@pytest.mark.derivation("temperature_limit.md#T26")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_temperature_is_more_uniform_and_less_tolerant(seed):
    """Gradient descent on info_nce(e, e) of free unit embeddings that start clustered by class, 300 steps of size
    0.05 * tau * 2N (the gradient scales as 1/tau and 1/(2N)), then L_unif(t = 2) and the tolerance."""
    out = {}
    for tau in (0.1, 1.0):
        e, labels = _clustered(np.random.default_rng(seed))
        for _ in range(300):
            _, cache = INFO.forward(e, e, temperature=tau)
            g1, g2 = INFO.backward(cache, 1.0)
            e = e - 0.05 * tau * len(e) * (g1 + g2)
            e /= np.linalg.norm(e, axis=1, keepdims=True)
        out[tau] = (float(UNIF.forward(e, t=2.0)[0]), _tolerance(e, labels))
    (u_small, t_small), (u_large, t_large) = out[0.1], out[1.0]
    assert u_small < u_large - 0.01
    assert t_small < t_large - 0.02
