"""I-Con: the objective, its gradients, kernels, special cases against the dedicated ops, clustering."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refssl import registry
from refssl.clustering import soft_kmeans_objective
from refssl.icon_clustering import (ClusteringHead, fit_clustering_head, head_loss_and_gradients,
                                    supervisory_distribution)
from refssl.ops.icon import debias
from refssl.ops.icon_kernels import (augmentation_kernel, hard_cluster_kernel, knn_kernel, label_kernel,
                                     propagate)
from refssl.ops.tsne import joint_probabilities

from .helpers import assert_gradients, seeds

ICON = registry.get("icon")
GAUSS = registry.get("gaussian_kernel")
STUDENT = registry.get("student_t_kernel")
CLUSTER = registry.get("cluster_kernel")
TOL = 1e-10


def _needs(name):
    return pytest.mark.skipif(name not in registry.names(), reason=f"op {name} not available")


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _softmax(a):
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _stochastic(rng, n, m, mask):
    p = rng.random((n, m)) + 0.05
    if mask:
        p[np.diag_indices(n)] = 0
    return p / p.sum(axis=1, keepdims=True)


def icon_within(p, x, kernel, kernel_kw, **icon_kw):
    """I-Con loss of a kernel within one set x; returns (loss, dL/dx) through both kernel slots."""
    logits, ck = kernel.forward(x, x, **kernel_kw)
    loss, ci = ICON.forward(p, logits, **icon_kw)
    gx, gy = kernel.backward(ck, ICON.backward(ci, 1.0)[1])
    return loss, gx + gy


def icon_between(p, x, y, kernel, kernel_kw, **icon_kw):
    logits, ck = kernel.forward(x, y, **kernel_kw)
    loss, ci = ICON.forward(p, logits, **icon_kw)
    gx, gy = kernel.backward(ck, ICON.backward(ci, 1.0)[1])
    return loss, gx, gy


def _close(a, b, tol=TOL):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(b)))))


# ---------------------------------------------------------------------------------------------
# the objective
# ---------------------------------------------------------------------------------------------

def _loop_kl(p, logits, alpha, mask, alpha_q=0.0):
    n, m = p.shape
    total = 0.0
    for i in range(n):
        cols = [j for j in range(m) if not (mask and j == i)]
        mx = max(logits[i, j] for j in cols)
        lse = mx + math.log(sum(math.exp(logits[i, j] - mx) for j in cols))
        for j in cols:
            pt = (1 - alpha) * p[i, j] + alpha / len(cols)
            qt = (1 - alpha_q) * math.exp(logits[i, j] - lse) + alpha_q / len(cols)
            if pt > 0:
                total += pt * (math.log(pt) - math.log(qt)) / n
    return total


@pytest.mark.derivation("icon.md#IC1")
@given(seed=seeds)
def test_icon_is_the_row_mean_kl_and_cross_entropy_minus_entropy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    mask = bool(rng.integers(0, 2))
    m = n if mask else int(rng.integers(1, 7))
    p = _stochastic(rng, n, m, mask)
    p[0] = 0  # a row without target mass
    p[0, 1 if mask else 0] = 1.0
    logits = 3 * rng.standard_normal((n, m))
    alpha = float(rng.uniform(0, 0.9))
    loss = ICON(p, logits, alpha=alpha, mask_diagonal=mask)
    _close(loss, _loop_kl(p, logits, alpha, mask))
    pt = debias(p, alpha, mask_diagonal=mask)
    lg = np.where(np.eye(n, m, dtype=bool), -np.inf, logits) if mask else logits
    logq = lg - np.log(np.sum(np.exp(lg - lg.max(1, keepdims=True)), 1, keepdims=True)) - lg.max(1, keepdims=True)
    ce = -np.mean(np.sum(np.where(pt > 0, pt * np.where(pt > 0, logq, 0), 0), axis=1))
    ent = -np.mean(np.sum(np.where(pt > 0, pt * np.log(np.where(pt > 0, pt, 1)), 0), axis=1))
    _close(loss, ce - ent)


@pytest.mark.derivation("icon.md#IC17")
@given(seed=seeds)
def test_debiasing_q_against_loops(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    mask = bool(rng.integers(0, 2))
    m = n if mask else int(rng.integers(1, 6))
    p = _stochastic(rng, n, m, mask)
    logits = 3 * rng.standard_normal((n, m))
    alpha, alpha_q = float(rng.uniform(0, 0.9)), float(rng.uniform(0, 0.9))
    _close(ICON(p, logits, alpha=alpha, alpha_q=alpha_q, mask_diagonal=mask),
           _loop_kl(p, logits, alpha, mask, alpha_q))
    # both sides debiased with the same alpha and q = p: zero loss
    lg = np.log(np.where(p > 0, p, 1.0))
    assert abs(ICON(p, lg, alpha=0.4, alpha_q=0.4, mask_diagonal=mask)) < 1e-14
    with pytest.raises(ValueError, match="alpha_q"):
        ICON.forward(p, logits, alpha_q=1.0, mask_diagonal=mask)


@pytest.mark.derivation("icon.md#IC17")
@given(seed=seeds, mask=st.booleans())
def test_debiased_q_logit_gradient_formula(seed, mask):
    """(IC17) gradient: (q_ik sum_j p~_ij w_ij - p~_ik w_ik)/N with w = (1 - alpha_q) q / q~ in (0, 1)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 6))
    m = n if mask else int(rng.integers(2, 6))  # >= 2 admissible columns (with one, q = 1: nothing to debias)
    p = _stochastic(rng, n, m, mask)
    logits = 4 * rng.standard_normal((n, m))
    alpha, alpha_q = float(rng.uniform(0, 0.9)), float(rng.uniform(0.01, 0.9))
    g = float(rng.uniform(-2, 2))
    _, cache = ICON.forward(p, logits, alpha=alpha, alpha_q=alpha_q, mask_diagonal=mask)
    grad = ICON.backward(cache, g)[1]
    q = _q(logits, mask)
    qt = (1 - alpha_q) * q + alpha_q / ((m - 1) if mask else m)
    w = np.where(q > 0, (1 - alpha_q) * q / qt, 0)
    assert np.all((w >= 0) & (w < 1))
    pt = _debiased(p, alpha, mask)
    expected = g * (q * np.sum(pt * w, axis=1, keepdims=True) - pt * w) / n
    _close(grad, expected)
    # the debiasing of q changes the gradient (w < 1): the plain (q - p~)/N is a different value
    assert np.abs(grad - g * (q - pt) / n).max() > 1e-6 * max(1.0, abs(g))


def _debiased(p, alpha, mask):
    """p~ = (1 - alpha) p + alpha u, u uniform over the admissible columns (j != i when masked), written out."""
    n, m = p.shape
    if mask:
        return ((1 - alpha) * p + alpha / (m - 1)) * (1 - np.eye(n))
    return (1 - alpha) * p + alpha / m


def _q(logits, mask):
    lg = np.where(np.eye(*logits.shape, dtype=bool), -np.inf, logits) if mask else logits
    q = np.exp(lg - lg.max(axis=1, keepdims=True))
    return q / q.sum(axis=1, keepdims=True)


@pytest.mark.derivation("icon.md#IC2")
@given(seed=seeds, mask=st.booleans(), normalised=st.booleans())
def test_logit_gradient_is_q_times_row_mass_minus_p_over_n(seed, mask, normalised):
    """(IC2) with r_i = sum_j p~_ij: (q r - p~)/N; rows need not sum to 1 (a learned p), and a zero row with
    alpha = 0 contributes nothing."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    m = n if mask else int(rng.integers(1, 7))
    p = rng.random((n, m)) * rng.uniform(0.2, 3.0, (n, 1))
    if mask:
        p[np.diag_indices(n)] = 0
    if normalised:
        p /= p.sum(axis=1, keepdims=True)
    alpha = float(rng.choice([0.0, rng.uniform(0, 0.9)]))
    if alpha == 0:
        p[0] = 0
    logits = 3 * rng.standard_normal((n, m))
    g = float(rng.uniform(-2, 2))
    _, cache = ICON.forward(p, logits, alpha=alpha, mask_diagonal=mask)
    grad = ICON.backward(cache, np.asarray(g))[1]
    pt = _debiased(p, alpha, mask)
    q = _q(logits, mask)
    _close(grad, g * (q * pt.sum(axis=1, keepdims=True) - pt) / n)
    if mask:
        assert np.all(np.diag(grad) == 0)
    if alpha == 0:
        assert np.all(grad[0] == 0)


class _LearnedP:
    """icon with learn_p=True as an op double for the gradient checker (both slots differentiable)."""

    differentiable = (0, 1)
    name = "icon(learn_p=True)"

    def __init__(self, **kw):
        self.kw = kw

    def forward(self, p, logits):
        return ICON.forward(p, logits, learn_p=True, **self.kw)

    def backward(self, cache, g):
        return ICON.backward(cache, g)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_gradient_w_r_t_learned_p(alpha):
    rng = np.random.default_rng(1)
    p = _stochastic(rng, 4, 6, False)
    logits = rng.standard_normal((4, 6))
    assert_gradients(_LearnedP(alpha=alpha, mask_diagonal=False), (p, logits), {}, rng=rng)
    # masked: the off-diagonal entries (the diagonal of p must stay 0)
    p = _stochastic(rng, 5, 5, True)
    logits = rng.standard_normal((5, 5))
    loss, cache = ICON.forward(p, logits, alpha=alpha, learn_p=True)
    dp = ICON.backward(cache, 1.0)[0]
    assert np.all(np.diag(dp) == 0)
    h = 1e-6
    for i, j in [(0, 1), (2, 4), (4, 3)]:
        e = np.zeros_like(p)
        e[i, j] = h
        fd = (ICON(p + e, logits, alpha=alpha) - ICON(p - e, logits, alpha=alpha)) / (2 * h)
        assert abs(fd - dp[i, j]) < 1e-7 * max(1, abs(fd))
    assert ICON.backward(ICON.forward(p, logits)[1], 1.0)[0] is None


@pytest.mark.derivation("icon.md#IC3")
@given(seed=seeds, mask=st.booleans(), debias_q=st.booleans())
def test_learned_p_gradient_formula(seed, mask, debias_q):
    """(IC3): (1 - alpha)(log p~ + 1 - log q~)/N on the support of p~, 0 elsewhere (and on a masked diagonal)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    m = n if mask else int(rng.integers(2, 6))
    p = _stochastic(rng, n, m, mask)
    p[0, -1] = 0  # a zero entry: outside the support when alpha = 0
    logits = 2 * rng.standard_normal((n, m))
    alpha = float(rng.choice([0.0, rng.uniform(0.05, 0.9)]))
    alpha_q = float(rng.uniform(0.05, 0.9)) if debias_q else 0.0
    g = float(rng.uniform(-2, 2))
    _, cache = ICON.forward(p, logits, alpha=alpha, alpha_q=alpha_q, mask_diagonal=mask, learn_p=True)
    dp = ICON.backward(cache, g)[0]
    pt = _debiased(p, alpha, mask)
    cols = (m - 1) if mask else m
    qt = (1 - alpha_q) * _q(logits, mask) + alpha_q / cols
    support = pt > 0
    log_qt = np.log(np.where(support, qt, 1))  # a masked diagonal has q~ = 0 and p~ = 0
    expected = np.where(support, g * (1 - alpha) * (np.log(np.where(support, pt, 1)) + 1 - log_qt) / n, 0)
    _close(dp, expected)


@pytest.mark.derivation("icon.md#IC4")
def test_debiasing_splits_into_target_and_uniformity_terms():
    rng = np.random.default_rng(2)
    n = 6
    p = _stochastic(rng, n, n, True)
    logits = rng.standard_normal((n, n))
    off = 1 - np.eye(n)
    lg = np.where(off > 0, logits, -np.inf)
    logq = lg - np.max(lg, 1, keepdims=True)
    logq = np.where(off > 0, logq - np.log(np.sum(np.exp(logq), 1, keepdims=True)), 0)
    for alpha in (0.2, 0.7):
        pt = debias(p, alpha, mask_diagonal=True)
        np.testing.assert_allclose(pt.sum(1), 1.0, rtol=1e-14)
        assert np.all(np.diag(pt) == 0)
        ce = lambda t: -np.mean(np.sum(t * logq, axis=1))  # noqa: E731
        u = off / (n - 1)
        _close(ce(pt), (1 - alpha) * ce(p) + alpha * ce(u))
        ent = -np.mean(np.sum(pt * np.log(np.where(pt > 0, pt, 1)), axis=1))
        _close(ICON(p, logits, alpha=alpha), ce(pt) - ent)
    # the minimiser over q of the debiased KL is q = p~ (loss 0): every q_ij >= alpha / (n - 1)
    pt = debias(p, 0.5, mask_diagonal=True)
    assert abs(ICON(p, np.log(np.where(off > 0, pt, 1)), alpha=0.5)) < 1e-15
    # with a one-hot class target and no mask, debiasing is label smoothing with eps = alpha
    y = rng.integers(0, 4, 5)
    z = rng.standard_normal((5, 4))
    onehot = np.eye(4)[y]
    smooth = (1 - 0.1) * onehot + 0.1 / 4
    lsm = z - z.max(1, keepdims=True)
    lsm -= np.log(np.exp(lsm).sum(1, keepdims=True))
    ls_ce = -np.mean(np.sum(smooth * lsm, axis=1))
    _close(ICON(onehot, z, alpha=0.1, mask_diagonal=False) - np.mean(np.sum(smooth * np.log(smooth), 1)), ls_ce)


def test_icon_input_errors():
    p = _stochastic(np.random.default_rng(3), 4, 4, False)
    with pytest.raises(ValueError, match="zero diagonal"):
        ICON.forward(p, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="square"):
        ICON.forward(p[:, :3], np.zeros((4, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        ICON.forward(-p, np.zeros((4, 4)), mask_diagonal=False)
    with pytest.raises(ValueError, match="alpha"):
        ICON.forward(p, np.zeros((4, 4)), alpha=1.5, mask_diagonal=False)
    with pytest.raises(ValueError, match="same shape"):
        ICON.forward(p, np.zeros((4, 5)), mask_diagonal=False)


def test_icon_is_stable_for_huge_logits_in_float32():
    p = np.eye(3, dtype=np.float32)[[1, 2, 0]]
    logits = np.array([[0, 1e4, -1e4], [3e4, 0, 2e4], [5e3, -5e3, 0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, cache = ICON.forward(p, logits)
        g = ICON.backward(cache, 1.0)[1]
    assert loss.dtype == np.float32 and np.isfinite(loss) and np.all(np.isfinite(g))
    np.testing.assert_allclose(loss, 1e4 / 3, rtol=1e-6)  # only row 2 is wrong, by 1e4


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@pytest.mark.derivation("icon.md#IC5")
def test_cosine_gaussian_kernel_is_infonce_with_tau_two_sigma_squared():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    for tau in (0.07, 0.5, 2.0):
        logits = GAUSS(x, y, sigma=math.sqrt(tau / 2), metric="cosine")
        cos = _unit(x) @ _unit(y).T
        _close(logits, cos / tau - 1 / tau)
        _close(_softmax(logits), _softmax(cos / tau))


def test_kernel_values_against_loops():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((3, 2)), rng.standard_normal((4, 2))
    for i in range(3):
        for j in range(4):
            d = float(np.sum((x[i] - y[j]) ** 2))
            assert GAUSS(x, y, sigma=0.7)[i, j] == pytest.approx(-d / (2 * 0.49), rel=1e-12)
            assert GAUSS(x, y, sigma=0.7, metric="dot")[i, j] == pytest.approx(x[i] @ y[j] / 0.98, rel=1e-12)
            assert STUDENT(x, y, gamma=2.0, nu=1.5)[i, j] == pytest.approx(-math.log(1 + (d / 2) ** 1.5), rel=1e-12)
    with pytest.raises(ValueError, match="metric"):
        GAUSS.forward(x, y, metric="manhattan")
    with pytest.raises(ValueError, match="width"):
        GAUSS.forward(x, y[:, :1])


def test_student_t_gradient_with_coincident_points():
    # x_i = y_j exactly: d = 0, where (d/gamma)^(nu - 1) is singular for nu < 1; the gradient must stay finite
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3))
    y = np.concatenate([x[:2], rng.standard_normal((2, 3))])
    for nu in (0.5, 1.0, 2.0):
        logits, cache = STUDENT.forward(x, y, nu=nu)
        gx, gy = STUDENT.backward(cache, rng.standard_normal(logits.shape))
        assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))


@pytest.mark.derivation("icon.md#IC22")
@pytest.mark.parametrize("nu", [0.5, 0.75, 1.0, 2.0])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_student_t_at_coincident_points(nu, gamma):
    """Lambda = -log(1 + (d/gamma)^nu) ~ -|x - y|^(2 nu) / gamma^nu: at x = y the one-sided derivative along a unit
    direction is -1/sqrt(gamma) for nu = 1/2 (a cone: not differentiable) and 0 for nu > 1/2; the op returns 0."""
    rng = np.random.default_rng(12)
    y = rng.standard_normal((1, 3))
    x = y.copy()
    _, cache = STUDENT.forward(x, y, gamma=gamma, nu=nu)
    gx, gy = STUDENT.backward(cache, np.ones((1, 1)))
    assert np.all(gx == 0) and np.all(gy == 0)
    direction = _unit(rng.standard_normal(3))
    for h in (1e-4, 1e-6):
        for sign in (1, -1):
            step = float(STUDENT(x + sign * h * direction, y, gamma=gamma, nu=nu)[0, 0]) / h
            written = -(h ** (2 * nu)) / gamma**nu / h
            assert step == pytest.approx(written, rel=1e-3, abs=1e-12)
            if nu == 0.5:
                assert step == pytest.approx(-1 / math.sqrt(gamma), rel=1e-3)  # the same in both directions
            else:
                assert abs(step) < 0.05
    # the returned 0 lies in the generalised gradient of the cone (the ball of radius 1/sqrt(gamma))


@pytest.mark.derivation("icon.md#IC6")
def test_label_augmentation_knn_and_propagation_kernels():
    labels = np.array([0, 1, 0, 2, 1, 0])
    p = label_kernel(labels)
    for i in range(6):
        pos = [j for j in range(6) if j != i and labels[j] == labels[i]]
        for j in range(6):
            assert p[i, j] == (1 / len(pos) if j in pos else 0)
    assert np.all(label_kernel(np.array([0, 1, 1]))[0] == 0)  # no positive: a zero row
    aug = augmentation_kernel(3, 2)
    np.testing.assert_array_equal(aug, np.roll(np.eye(6), 3, axis=1))
    np.testing.assert_array_equal(label_kernel(labels, np.arange(3)), np.eye(3)[labels])
    np.testing.assert_array_equal(hard_cluster_kernel(np.array([1, 1, 0])),
                                  [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_array_equal(knn_kernel(x, 1), [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(knn_kernel(x, 2)[3], [0, 0.5, 0.5, 0])
    # propagation: against explicit matrix powers on a chain graph
    P = knn_kernel(x, 1)
    for k in (1, 2, 3):
        acc = sum(np.linalg.matrix_power(P, s) for s in range(1, k + 1))
        _close(propagate(P, k), acc / acc.sum(1, keepdims=True))
        reach = (acc > 0).astype(float)
        _close(propagate(P, k, uniform=True), reach / reach.sum(1, keepdims=True))
    assert propagate(P, 2)[3, 0] == 0 and propagate(P, 2)[3, 1] > 0  # 3 -> 2 -> 1 in two steps, 0 needs three


@pytest.mark.derivation("icon.md#IC7")
def test_cluster_kernel_is_symmetric_and_doubly_stochastic():
    rng = np.random.default_rng(7)
    phi = rng.dirichlet(np.ones(3), size=8)
    q = np.exp(CLUSTER(phi))
    _close(q, q.T)
    _close(q.sum(axis=1), np.ones(8))
    for i in range(8):
        for j in range(8):
            assert q[i, j] == pytest.approx(sum(phi[i, c] * phi[j, c] / phi[:, c].sum() for c in range(3)), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# special cases (float64, 1e-10)
# ---------------------------------------------------------------------------------------------

@_needs("info_nce")
@pytest.mark.derivation("icon.md#IC8")
@given(seed=seeds)
def test_infonce_special_case(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 6)), int(rng.integers(2, 6))
    tau = float(rng.uniform(0.05, 1.0))
    z1, z2 = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    op = registry.get("info_nce")
    ref, cache = op.forward(z1, z2, temperature=tau)
    g1, g2 = op.backward(cache, 1.0)
    loss, gz = icon_within(augmentation_kernel(n, 2), np.concatenate([z1, z2]), GAUSS,
                           dict(sigma=math.sqrt(tau / 2), metric="cosine"))
    _close(loss, ref)
    _close(gz, np.concatenate([g1, g2]))


@_needs("supcon")
@pytest.mark.derivation("icon.md#IC9")
@given(seed=seeds)
def test_supcon_special_case(seed):
    rng = np.random.default_rng(seed)
    m, d = int(rng.integers(2, 10)), int(rng.integers(2, 6))
    tau = float(rng.uniform(0.05, 1.0))
    z = rng.standard_normal((m, d))
    labels = rng.integers(0, 3, m)
    op = registry.get("supcon")
    ref, cache = op.forward(z, labels, temperature=tau)
    gref = op.backward(cache, 1.0)[0]
    p = label_kernel(labels)
    loss, gz = icon_within(p, z, GAUSS, dict(sigma=math.sqrt(tau / 2), metric="cosine"))
    npos = (p > 0).sum(axis=1)
    _close(loss + np.sum(np.log(np.maximum(npos, 1))) / m, ref)
    _close(gz, gref)


@_needs("clip")
@pytest.mark.derivation("icon.md#IC10")
@given(seed=seeds)
def test_clip_special_case(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 6)), int(rng.integers(2, 6))
    img, txt = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    s = np.asarray(rng.uniform(0.0, math.log(100)))
    op = registry.get("clip")
    ref, cache = op.forward(img, txt, s)
    gi_ref, gt_ref, _ = op.backward(cache, 1.0)
    kw = dict(sigma=math.sqrt(math.exp(-float(s)) / 2), metric="cosine")
    eye = np.eye(n)
    l_it, gi1, gt1 = icon_between(eye, img, txt, GAUSS, kw, mask_diagonal=False)
    l_ti, gt2, gi2 = icon_between(eye, txt, img, GAUSS, kw, mask_diagonal=False)
    _close(0.5 * (l_it + l_ti), ref)
    _close(0.5 * (gi1 + gi2), gi_ref)
    _close(0.5 * (gt1 + gt2), gt_ref)


@_needs("cross_entropy")
@pytest.mark.derivation("icon.md#IC11")
@given(seed=seeds)
def test_cross_entropy_special_case(seed):
    rng = np.random.default_rng(seed)
    n, c, d = int(rng.integers(1, 7)), int(rng.integers(2, 6)), int(rng.integers(1, 5))
    f, w = rng.standard_normal((n, d)), rng.standard_normal((c, d))
    y = rng.integers(0, c, n)
    op = registry.get("cross_entropy")
    ref, cache = op.forward(f @ w.T, y)
    glog = op.backward(cache, 1.0)[0]
    loss, gf, gw = icon_between(label_kernel(y, np.arange(c)), f, w, GAUSS,
                                dict(sigma=math.sqrt(0.5), metric="dot"), mask_diagonal=False)
    _close(loss, ref)
    _close(gf, glog @ w)
    _close(gw, glog.T @ f)


def _conditional_p(rng, n):
    """p_{j|i} from Gaussian affinities of random data with per-point bandwidths."""
    x = rng.standard_normal((n, 5))
    sig = rng.uniform(0.8, 2.0, n)
    d = np.sum((x[:, None] - x[None]) ** 2, axis=2)
    a = np.exp(-d / (2 * sig[:, None] ** 2))
    a[np.diag_indices(n)] = 0
    return a / a.sum(axis=1, keepdims=True)


@pytest.mark.derivation("icon.md#IC12")
@given(seed=seeds)
def test_sne_special_case(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 9))
    P, y = _conditional_p(rng, n), rng.standard_normal((n, 2))
    op = registry.get("sne")
    ref, cache = op.forward(y, P)
    loss, gy = icon_within(P, y, GAUSS, dict(sigma=math.sqrt(0.5)))
    _close(n * loss, ref)
    _close(n * gy, op.backward(cache, 1.0)[0])


@pytest.mark.derivation("icon.md#IC13")
@given(seed=seeds)
def test_conditional_tsne_special_case(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 9))
    P, y = _conditional_p(rng, n), rng.standard_normal((n, 2))
    op = registry.get("sne")
    ref, cache = op.forward(y, P, kernel="cauchy")
    loss, gy = icon_within(P, y, STUDENT, dict(gamma=1.0, nu=1.0))
    _close(n * loss, ref)
    _close(n * gy, op.backward(cache, 1.0)[0])


@pytest.mark.derivation("icon.md#IC14")
def test_tsne_value_and_classic_gradient_against_loops():
    rng = np.random.default_rng(8)
    n = 6
    P = joint_probabilities(_conditional_p(rng, n))
    y = rng.standard_normal((n, 2))
    w = np.array([[1 / (1 + np.sum((y[i] - y[j]) ** 2)) if i != j else 0 for j in range(n)] for i in range(n)])
    Q = w / w.sum()
    kl = sum(P[i, j] * math.log(P[i, j] / Q[i, j]) for i in range(n) for j in range(n) if i != j)
    grad = np.array([4 * sum((P[i, j] - Q[i, j]) * w[i, j] * (y[i] - y[j]) for j in range(n)) for i in range(n)])
    op = registry.get("tsne")
    loss, cache = op.forward(y, P)
    _close(loss, kl)
    _close(op.backward(cache, 1.0)[0], grad)
    with pytest.raises(ValueError, match="sum to 1"):
        op.forward(y, 2 * P)


@pytest.mark.derivation("icon.md#IC15")
def test_sne_classic_gradient_against_loops():
    rng = np.random.default_rng(9)
    n = 6
    P, y = _conditional_p(rng, n), rng.standard_normal((n, 2))
    a = np.exp(-np.sum((y[:, None] - y[None]) ** 2, axis=2))
    a[np.diag_indices(n)] = 0
    Q = a / a.sum(axis=1, keepdims=True)
    grad = np.array([2 * sum((P[i, j] - Q[i, j] + P[j, i] - Q[j, i]) * (y[i] - y[j]) for j in range(n))
                     for i in range(n)])
    op = registry.get("sne")
    loss, cache = op.forward(y, P)
    _close(loss, sum(P[i, j] * math.log(P[i, j] / Q[i, j]) for i in range(n) for j in range(n) if i != j))
    _close(op.backward(cache, 1.0)[0], grad)


@pytest.mark.derivation("icon.md#IC16")
@given(seed=seeds)
def test_kmeans_reverse_kl_identity(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(3, 10)), int(rng.integers(2, 4))
    x = rng.standard_normal((n, 3))
    sigma = float(rng.uniform(0.5, 2.0))
    d = np.sum((x[:, None] - x[None]) ** 2, axis=2)
    log_z = np.log(np.sum(np.exp(-d / (2 * sigma ** 2)), axis=1))
    for phi in (rng.dirichlet(np.ones(c), size=n), np.eye(c)[rng.integers(0, c, n)] * (1 - 1e-12) + 1e-12 / c):
        q = np.exp(CLUSTER(phi))
        entropy = -np.sum(q * np.log(q), axis=1)
        # reverse KL: the cluster kernel q in the target slot, the Gaussian logits of the data as the second
        logits = GAUSS(x, x, sigma=sigma)
        reverse = n * ICON(q, logits, mask_diagonal=False)
        _close(reverse, soft_kmeans_objective(x, phi) / sigma ** 2 - entropy.sum() + log_z.sum(), 1e-9)
    # for one-hot assignments L_kmeans is the k-means inertia
    assign = rng.integers(0, c, n)
    inertia = sum(np.sum((x[assign == k] - x[assign == k].mean(0)) ** 2) for k in set(assign))
    _close(soft_kmeans_objective(x, np.eye(c)[assign][:, sorted(set(assign))]), inertia)


def test_reverse_kl_gradient_w_r_t_soft_assignments():
    """d/dphi of the reverse I-Con loss by chaining icon(learn_p) -> exp -> cluster_kernel backward."""
    rng = np.random.default_rng(10)
    x, phi = rng.standard_normal((6, 2)), rng.dirichlet(np.ones(3), size=6)
    logits = GAUSS(x, x, sigma=1.0)

    def value(f):
        return ICON(np.exp(CLUSTER(f)), logits, mask_diagonal=False)

    logq, ck = CLUSTER.forward(phi)
    q = np.exp(logq)
    _, ci = ICON.forward(q, logits, mask_diagonal=False, learn_p=True)
    dphi = CLUSTER.backward(ck, ICON.backward(ci, 1.0)[0] * q)[0]
    h = 1e-6
    for idx in [(0, 0), (3, 1), (5, 2)]:
        e = np.zeros_like(phi)
        e[idx] = h
        fd = (value(phi + e) - value(phi - e)) / (2 * h)
        assert abs(fd - dphi[idx]) < 1e-7 * max(1.0, abs(fd))


# ---------------------------------------------------------------------------------------------
# Debiased InfoNCE Clustering
# ---------------------------------------------------------------------------------------------

def _head_gradient_as_written(head, x, p, alpha, alpha_q):
    """(IC18): qbar = -(1 - alpha_q) p~ / (R q~), the cluster-kernel backward, the softmax backward, then W and b."""
    r = len(x)
    z = x @ head.W + head.b
    phi = _softmax(z)
    s = phi.sum(axis=0)
    q = (phi / s) @ phi.T
    pt = (1 - alpha) * p + alpha / r
    qt = (1 - alpha_q) * q + alpha_q / r
    loss = np.sum(pt * np.log(pt / qt)) / r
    qbar = -(1 - alpha_q) * pt / (r * qt)
    dphi = (qbar + qbar.T) @ phi / s - np.einsum("ij,ic,jc->c", qbar, phi, phi) / s**2
    dz = phi * (dphi - np.sum(phi * dphi, axis=1, keepdims=True))
    return loss, x.T @ dz, dz.sum(axis=0)


@pytest.mark.derivation("icon.md#IC18")
@given(seed=seeds)
def test_clustering_head_gradient_is_the_written_chain(seed):
    rng = np.random.default_rng(seed)
    r, d, c = 2 * int(rng.integers(2, 6)), int(rng.integers(2, 5)), int(rng.integers(2, 5))
    x = rng.standard_normal((r, d))
    head = ClusteringHead(rng.standard_normal((d, c)), rng.standard_normal(c))
    p = supervisory_distribution(x, k=int(rng.integers(1, 3)), walk_steps=int(rng.integers(1, 3)))
    alpha, alpha_q = float(rng.uniform(0.05, 0.9)), float(rng.choice([0.0, rng.uniform(0.05, 0.9)]))
    got = head_loss_and_gradients(head, x, p, alpha=alpha, alpha_q=alpha_q)
    for a, b in zip(got, _head_gradient_as_written(head, x, p, alpha, alpha_q)):
        _close(a, b)


@pytest.mark.derivation("icon.md#IC19")
@given(seed=seeds)
def test_row_constant_of_the_icon_route_is_annihilated_by_the_softmax(seed):
    """icon's G / q = qbar + c 1^T; the cluster kernel maps c 1^T to c_a in every entry of row a of dL/dphi, and
    the softmax backward phi o (v - <v, phi>) removes it."""
    rng = np.random.default_rng(seed)
    r, cc = int(rng.integers(2, 8)), int(rng.integers(2, 5))
    phi = _softmax(rng.standard_normal((r, cc)))
    cvec = rng.standard_normal(r)
    logq, cache = CLUSTER.forward(phi)
    q = np.exp(logq)
    (dphi,) = CLUSTER.backward(cache, cvec[:, None] * q)  # G = c_i q_ij, i.e. dL/dq = c_i
    _close(dphi, np.repeat(cvec[:, None], cc, axis=1))
    _close(phi * (dphi - np.sum(phi * dphi, axis=1, keepdims=True)), np.zeros_like(phi))
    # and on the logit route of icon: G / q - qbar is that row constant, c_i = sum_j p~_ij w_ij / R
    p = _stochastic(rng, r, r, False)
    alpha, alpha_q = float(rng.uniform(0.05, 0.9)), float(rng.uniform(0.05, 0.9))
    _, ci = ICON.forward(p, logq, alpha=alpha, alpha_q=alpha_q, mask_diagonal=False)
    g_over_q = ICON.backward(ci, 1.0)[1] / q
    pt = (1 - alpha) * p + alpha / r
    qt = (1 - alpha_q) * q + alpha_q / r
    qbar = -(1 - alpha_q) * pt / (r * qt)
    c_expected = np.sum(pt * (1 - alpha_q) * q / qt, axis=1) / r
    _close(g_over_q - qbar, np.repeat(c_expected[:, None], r, axis=1))


@pytest.mark.derivation("icon.md#IC20")
@given(seed=seeds, hardness=st.floats(0.0, 30.0))
def test_debiasing_q_bounds_the_loss(seed, hardness):
    rng = np.random.default_rng(seed)
    r, cc = 2 * int(rng.integers(2, 5)), int(rng.integers(2, 4))
    x = rng.standard_normal((r, 3))
    p = supervisory_distribution(x, k=1)
    head = ClusteringHead(hardness * rng.standard_normal((3, cc)), np.zeros(cc))  # large weights: near one-hot phi
    alpha, alpha_q = float(rng.uniform(0.05, 0.9)), float(rng.uniform(0.05, 0.9))
    pt = (1 - alpha) * p + alpha / r
    entropy = -np.sum(pt * np.log(pt)) / r
    loss = head_loss_and_gradients(head, x, p, alpha=alpha, alpha_q=alpha_q)[0]
    assert loss <= math.log(r / alpha_q) - entropy + 1e-12


@pytest.mark.derivation("icon.md#IC20")
def test_without_debiasing_q_hard_assignments_cost_without_bound():
    """alpha > 0, alpha_q = 0: as the head hardens (W = h W0) the pairs in different clusters get q -> 0 against
    p~ >= alpha / R, and the loss grows linearly in h; with alpha_q = 0.3 it stays below the bound (IC20)."""
    rng = np.random.default_rng(0)
    r, alpha = 8, 0.3
    x = rng.standard_normal((r, 3))
    p = supervisory_distribution(x, k=1)
    w0 = rng.standard_normal((3, 3))
    assert len(set((x @ w0).argmax(axis=1))) > 1  # at least two clusters
    pt = (1 - alpha) * p + alpha / r
    bound = math.log(r / 0.3) + np.sum(pt * np.log(pt)) / r
    hard = [head_loss_and_gradients(ClusteringHead(h * w0, np.zeros(3)), x, p, alpha=alpha)[0] for h in (16, 32, 64)]
    assert hard[1] > 1.8 * hard[0] and hard[2] > 1.8 * hard[1] and hard[2] > 5 * bound
    for h in (16, 32, 64):
        assert head_loss_and_gradients(ClusteringHead(h * w0, np.zeros(3)), x, p, alpha=alpha, alpha_q=0.3)[0] <= bound


@pytest.mark.derivation("icon.md#IC21")
@given(seed=seeds, walk_steps=st.integers(1, 3), k=st.integers(1, 3))
def test_supervisory_distribution_is_the_written_average(seed, walk_steps, k):
    rng = np.random.default_rng(seed)
    b = int(rng.integers(3, 7))
    views = rng.standard_normal((2 * b, 4))
    p = supervisory_distribution(views, k=k, walk_steps=walk_steps)
    r = 2 * b
    aug = np.zeros((r, r))
    for i in range(r):
        aug[i, (i + b) % r] = 1.0
    u = views / np.linalg.norm(views, axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    knn = np.zeros((r, r))
    for i in range(r):
        for j in np.argsort(-sim[i], kind="stable")[:k]:
            knn[i, j] = 1.0 / k
    walk = sum(np.linalg.matrix_power(knn, s) for s in range(1, walk_steps + 1))
    np.fill_diagonal(walk, 0)
    walk /= walk.sum(axis=1, keepdims=True)
    _close(p, 0.5 * (aug + walk))
    _close(p.sum(axis=1), np.ones(r))
    assert np.all(np.diag(p) == 0)
    if walk_steps == 1:
        _close(p, 0.5 * (aug + knn))  # the default, one step: the kNN kernel itself


def test_clustering_head_gradient_against_finite_differences():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((10, 4))
    head = ClusteringHead(rng.standard_normal((4, 3)), rng.standard_normal(3))
    p = _stochastic(rng, 10, 10, True)
    kw = dict(alpha=0.5, alpha_q=0.3)
    loss, dW, db = head_loss_and_gradients(head, x, p, **kw)
    h = 1e-6
    for arr, grad in ((head.W, dW), (head.b, db)):
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            fp = head_loss_and_gradients(head, x, p, **kw)[0]
            arr[idx] = old - h
            fm = head_loss_and_gradients(head, x, p, **kw)[0]
            arr[idx] = old
            assert abs((fp - fm) / (2 * h) - grad[idx]) < 1e-7


def test_debiased_infonce_clustering_recovers_blobs():
    rng = np.random.default_rng(0)
    means = rng.standard_normal((5, 16))
    labels = np.repeat(np.arange(5), 60)
    x = means[labels] + 0.5 * rng.standard_normal((300, 16))
    for alpha, alpha_q in ((0.6, 0.0), (0.0, 0.6)):  # debiasing p (the text) or q (Table 1)
        head, hist = fit_clustering_head(x, 5, np.random.default_rng(1), labels=labels, alpha=alpha,
                                         alpha_q=alpha_q, epochs=8, lr=3e-2)
        assert hist.loss[-1] < hist.loss[0]
        assert hist.accuracy[-1] >= 0.95
        assert np.bincount(head.predict(x), minlength=5).min() > 0  # no collapse onto fewer clusters
