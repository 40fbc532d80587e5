"""I-Con: the objective, its gradients, kernels, special cases against the dedicated ops, clustering."""

import math

import numpy as np
import pytest
from hypothesis import given

from refssl import registry
from refssl.clustering import soft_kmeans_objective
from refssl.icon_clustering import ClusteringHead, fit_clustering_head, head_loss_and_gradients
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


@pytest.mark.derivation("icon.md#IC2")
def test_logit_gradient_is_q_minus_p_over_n():
    rng = np.random.default_rng(0)
    p = _stochastic(rng, 5, 5, True)
    logits = rng.standard_normal((5, 5))
    loss, cache = ICON.forward(p, logits, alpha=0.2)
    g = ICON.backward(cache, np.asarray(1.0))[1]
    lg = np.where(np.eye(5, dtype=bool), -np.inf, logits)
    q = np.exp(lg - lg.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    pt = 0.8 * p + 0.2 / 4 * (1 - np.eye(5))
    _close(g, (q - pt) / 5)
    assert np.all(np.diag(g) == 0)


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


@pytest.mark.derivation("icon.md#IC3")
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
