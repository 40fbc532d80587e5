"""ProtoNCE, the PCL E-step (k-means, concentration), the EM loop and Hungarian accuracy."""

import itertools

import numpy as np
import pytest
from hypothesis import given

from refssl import registry
from refssl.clustering import (clustering_accuracy, concentration, e_step, kmeans, protonce_em)
from refssl.ops.protonce import sample_negative_prototypes

from .helpers import assert_gradients, seeds

OP = registry.get("proto_nce")


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _blobs(rng, k=4, per=30, dim=6, spread=0.3, scale=3.0):
    means = scale * rng.standard_normal((k, dim))
    labels = np.repeat(np.arange(k), per)
    return means[labels] + spread * rng.standard_normal((k * per, dim)), labels


def _nll(logits, target):
    """-log softmax(logits)[target], written with a plain max shift for one row."""
    m = max(logits)
    return -(logits[target] - m - np.log(sum(np.exp(v - m) for v in logits)))


# ---------------------------------------------------------------------------------------------
# proto_nce against an explicit per-sample loop
# ---------------------------------------------------------------------------------------------

def _loop_proto_nce(q, k, queue, protos, assignments, phis, nc, neg, tau):
    """Per-sample, per-clustering loops over python lists: an independent re-implementation."""
    n = len(q)
    qh, kh, qu, pr = _unit(q), _unit(k), _unit(queue), _unit(protos)
    inst = 0.0
    for i in range(n):
        row = [qh[i] @ kh[i] / tau] + [qh[i] @ qu[j] / tau for j in range(len(queue))]
        inst += _nll(row, 0) / n
    proto = 0.0
    start = 0
    for m, km in enumerate(nc):
        cols = [start + a for a in assignments[m]] + [start + a for a in neg[m]]
        for i in range(n):
            row = [qh[i] @ pr[c] / phis[c] for c in cols]
            proto += _nll(row, i) / (n * len(nc))
        start += km
    return inst + proto


@given(seed=seeds)
def test_proto_nce_matches_explicit_loops(seed):
    rng = np.random.default_rng(seed)
    args, kw = OP.example(rng, np.float64)
    q, k, queue, protos, assignments, phis = args
    expected = _loop_proto_nce(q, k, queue, protos, assignments, phis, kw["num_clusters"],
                               kw["negative_indices"], kw["temperature"])
    np.testing.assert_allclose(OP(*args, **kw), expected, rtol=1e-12)


def _three_clusterings(rng, n=5, d=4, nc=(9, 12, 15), r=3, dtype=np.float64):
    q = rng.standard_normal((n, d))
    k = q + 0.3 * rng.standard_normal((n, d))
    queue = _unit(rng.standard_normal((7, d)))
    protos = _unit(rng.standard_normal((sum(nc), d)))
    phis = rng.uniform(0.1, 0.3, sum(nc))
    assignments = np.stack([rng.integers(0, km, n) for km in nc])
    return [a.astype(dtype) for a in (q, k, queue, protos)] + [assignments, phis.astype(dtype)], nc


def test_negative_sampling_is_official_and_reproducible():
    rng = np.random.default_rng(0)
    args, nc = _three_clusterings(rng)
    assignments = args[4]
    loss_a, cache_a = OP.forward(*args, num_clusters=nc, num_negative_prototypes=3, rng=np.random.default_rng(5))
    loss_b, cache_b = OP.forward(*args, num_clusters=nc, num_negative_prototypes=3, rng=np.random.default_rng(5))
    assert loss_a == loss_b
    neg = cache_a["negative_indices"]
    np.testing.assert_array_equal(neg, cache_b["negative_indices"])
    np.testing.assert_array_equal(neg, sample_negative_prototypes(assignments, nc, 3, np.random.default_rng(5)))
    for m, km in enumerate(nc):
        assert len(set(neg[m])) == 3 and set(neg[m]).isdisjoint(assignments[m]) and neg[m].max() < km
    # every non-positive cluster is drawn with the same probability (uniform without replacement)
    counts = np.zeros(nc[0])
    g = np.random.default_rng(1)
    for _ in range(3000):
        counts[sample_negative_prototypes(assignments[:1], nc[:1], 3, g)[0]] += 1
    cand = np.setdiff1d(np.arange(nc[0]), assignments[0])
    assert counts[np.setdiff1d(np.arange(nc[0]), cand)].sum() == 0
    freq = counts[cand] / 3000
    np.testing.assert_allclose(freq, 3 / len(cand), atol=0.04)
    # the explicit-index path gives the same value
    same = OP(*args, num_clusters=nc, negative_indices=neg)
    assert same == loss_a


def test_gradient_to_q_with_three_clusterings():
    rng = np.random.default_rng(2)
    args, nc = _three_clusterings(rng)
    neg = sample_negative_prototypes(args[4], nc, 3, rng)
    assert_gradients(OP, args, dict(num_clusters=nc, negative_indices=neg, temperature=0.2), rng=rng)


def test_float32_input_gives_float32_loss_and_gradient():
    rng = np.random.default_rng(3)
    args, nc = _three_clusterings(rng, dtype=np.float32)
    loss, cache = OP.forward(*args, num_clusters=nc, num_negative_prototypes=2, rng=rng)
    assert loss.dtype == np.float32
    grads = OP.backward(cache, np.float32(1.0))
    assert grads[0].dtype == np.float32 and all(g is None for g in grads[1:])


@pytest.mark.parametrize("change,match", [
    (dict(num_clusters=(9, 12, 14)), "num_clusters"),
    (dict(num_clusters=(9, 27)), "assignments"),
    (dict(num_negative_prototypes=100, rng=np.random.default_rng(0)), "num_negative_prototypes"),
    (dict(), "rng"),
    (dict(negative_indices=np.zeros((3, 2), np.int64)), "negative_indices"),
])
def test_bad_clustering_arguments_are_value_errors(change, match):
    args, nc = _three_clusterings(np.random.default_rng(4))
    args[4] = args[4].copy()
    args[4][:, 0] = 0  # cluster 0 is positive for sample 0 in every clustering
    kw = dict(num_clusters=nc)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        OP.forward(*args, **kw)


def test_assignments_out_of_range_and_non_positive_phi():
    args, nc = _three_clusterings(np.random.default_rng(4))
    bad = list(args)
    bad[4] = args[4].copy()
    bad[4][0, 0] = nc[0]
    with pytest.raises(ValueError, match="assignments"):
        OP.forward(*bad, num_clusters=nc, negative_indices=np.zeros((3, 0), np.int64))
    bad = list(args)
    bad[5] = args[5].copy()
    bad[5][0] = 0.0
    with pytest.raises(ValueError, match="phis"):
        OP.forward(*bad, num_clusters=nc, negative_indices=np.zeros((3, 0), np.int64))


# ---------------------------------------------------------------------------------------------
# derivation claims
# ---------------------------------------------------------------------------------------------

@pytest.mark.derivation("protonce_em.md#PE1")
def test_jensen_lower_bound_and_tightness():
    rng = np.random.default_rng(0)
    joint = rng.random((6, 4))  # p(x_i, c) for 6 samples, 4 latent prototypes
    loglik = np.sum(np.log(joint.sum(axis=1)))
    for _ in range(20):
        Q = rng.dirichlet(np.ones(4), size=6)
        elbo = np.sum(Q * np.log(joint / Q))
        gap = np.sum(Q * np.log(Q / (joint / joint.sum(axis=1, keepdims=True))))
        assert elbo < loglik
        np.testing.assert_allclose(loglik - elbo, gap, rtol=1e-12)
    posterior = joint / joint.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.sum(posterior * np.log(joint / posterior)), loglik, rtol=1e-13)


@pytest.mark.derivation("protonce_em.md#PE2")
def test_small_variance_posterior_is_the_kmeans_assignment():
    rng = np.random.default_rng(1)
    x, _ = _blobs(rng, k=3, per=20, dim=4)
    res = kmeans(x, 3, np.random.default_rng(0))
    sigma = 0.02
    d = np.sum((x[:, None, :] - res.centroids[None]) ** 2, axis=2)
    logits = -d / (2 * sigma ** 2)
    post = np.exp(logits - logits.max(axis=1, keepdims=True))
    post /= post.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(post, np.eye(3)[res.assignments], atol=1e-12)


def _gaussian_nll(v, c, sigma2, s):
    logits = -np.sum((v - c) ** 2, axis=1) / (2 * sigma2)
    return _nll(list(logits), s)


@pytest.mark.derivation("protonce_em.md#PE3")
def test_equal_variance_gaussian_posterior_is_protonce_with_phi_sigma_squared():
    rng = np.random.default_rng(2)
    v, c = _unit(rng.standard_normal(5)), _unit(rng.standard_normal((7, 5)))
    for sigma2 in (0.05, 0.3, 1.7):
        for s in range(7):
            proto = _nll(list(c @ v / sigma2), s)
            np.testing.assert_allclose(_gaussian_nll(v, c, np.full(7, sigma2), s), proto, rtol=1e-12)


@pytest.mark.derivation("protonce_em.md#PE4")
def test_unequal_variances_add_a_per_prototype_bias():
    rng = np.random.default_rng(3)
    v, c = _unit(rng.standard_normal(5)), _unit(rng.standard_normal((7, 5)))
    phi = rng.uniform(0.1, 0.5, 7)
    for s in range(7):
        exact = _gaussian_nll(v, c, phi, s)
        np.testing.assert_allclose(exact, _nll(list(c @ v / phi - 1 / phi), s), rtol=1e-12)
        assert abs(exact - _nll(list(c @ v / phi), s)) > 1e-3  # ProtoNCE drops the bias


def _official_concentration(x, centroids, im2cluster, alpha, temperature):
    """run_kmeans of salesforce/PCL, transcribed with per-cluster python lists."""
    k = len(centroids)
    dcluster = [[] for _ in range(k)]
    for im, i in enumerate(im2cluster):
        dcluster[i].append(float(np.sum((x[im] - centroids[i]) ** 2)))  # faiss: squared L2
    density = np.zeros(k)
    for i, dist in enumerate(dcluster):
        if len(dist) > 1:
            density[i] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + alpha)
    dmax = density.max()
    for i, dist in enumerate(dcluster):
        if len(dist) <= 1:
            density[i] = dmax
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    return temperature * density / density.mean()


@pytest.mark.derivation("protonce_em.md#PE5")
@given(seed=seeds)
def test_concentration_matches_official_run_kmeans(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(12, 40)), int(rng.integers(3, 9))
    x = _unit(rng.standard_normal((n, 4)))
    centroids = rng.standard_normal((k, 4)) * 0.5
    assign = rng.integers(0, k, n)
    assign[:2] = 0  # at least one cluster with two members
    alpha, tau = float(rng.uniform(0, 20)), float(rng.uniform(0.05, 1))
    np.testing.assert_allclose(concentration(x, centroids, assign, alpha=alpha, temperature=tau),
                               _official_concentration(x, centroids, assign, alpha, tau), rtol=1e-12)


@pytest.mark.derivation("protonce_em.md#PE5")
def test_concentration_formula_on_equidistant_clusters():
    # clusters of Z points, all at distance r_c from their centroid: phi_c proportional to r_c / log(Z + alpha)
    rng = np.random.default_rng(5)
    sizes, radii = [2, 3, 5, 8, 13], [0.1, 0.2, 0.3, 0.4, 0.5]
    cents = 10 * rng.standard_normal((5, 3))
    pts, assign = [], []
    for c, (z, r) in enumerate(zip(sizes, radii)):
        pts.append(cents[c] + r * _unit(rng.standard_normal((z, 3))))
        assign += [c] * z
    phi = concentration(np.concatenate(pts), cents, np.asarray(assign), alpha=10, temperature=1.0)
    raw = np.asarray(radii) / np.log(np.asarray(sizes) + 10)
    raw = np.clip(raw, np.percentile(raw, 10), np.percentile(raw, 90))
    np.testing.assert_allclose(phi, raw / raw.mean(), rtol=1e-12)


@pytest.mark.derivation("protonce_em.md#PE6")
def test_concentration_mean_is_the_temperature_and_singletons_get_the_max():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((30, 3))
    assign = np.concatenate([np.repeat(np.arange(5), 5), [5, 6, 7, 8, 9]])  # 5 singletons
    cents = rng.standard_normal((10, 3))
    phi = concentration(x, cents, assign, alpha=10, temperature=0.2)
    assert abs(phi.mean() - 0.2) < 1e-15
    raw = concentration(x, cents, assign, alpha=10, temperature=0.2)
    assert np.all(raw[5:] == raw.max())  # singletons: the max of step 2, which survives the 90% clip
    with pytest.raises(ValueError, match="more than one member"):
        concentration(x[:3], cents[:3], np.arange(3))


@pytest.mark.derivation("protonce_em.md#PE7")
def test_infonce_is_protonce_with_keys_as_prototypes():
    rng = np.random.default_rng(7)
    n, d, kq, tau = 6, 5, 4, 0.2
    q, k = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    queue = _unit(rng.standard_normal((kq, d)))
    protos = np.concatenate([_unit(k), queue])
    _, cache = OP.forward(q, k, queue, protos, np.arange(n)[None], np.full(n + kq, tau), temperature=tau,
                          negative_indices=np.arange(n, n + kq)[None])
    qh, kh = _unit(q), _unit(k)
    expected = np.mean([_nll(list(np.concatenate([kh @ qh[i], queue @ qh[i]]) / tau), i) for i in range(n)])
    np.testing.assert_allclose(cache["prototype_losses"][0], expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# k-means, E-step, accuracy, EM loop
# ---------------------------------------------------------------------------------------------

def test_kmeans_is_deterministic_and_a_lloyd_fixed_point():
    x, labels = _blobs(np.random.default_rng(8))
    a = kmeans(x, 4, np.random.default_rng(3))
    b = kmeans(x, 4, np.random.default_rng(3))
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert clustering_accuracy(labels, a.assignments) == 1.0
    # converged: every point is at its nearest centroid and every centroid is its members' mean
    d = np.sum((x[:, None] - a.centroids[None]) ** 2, axis=2)
    np.testing.assert_array_equal(a.assignments, d.argmin(axis=1))
    for c in range(4):
        np.testing.assert_allclose(a.centroids[c], x[a.assignments == c].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(a.inertia, d.min(axis=1).sum(), rtol=1e-12)


def test_kmeans_restarts_keep_the_best_inertia():
    x = np.random.default_rng(9).standard_normal((60, 2))
    many = kmeans(x, 6, np.random.default_rng(0), n_init=8)
    singles = [kmeans(x, 6, np.random.default_rng(s), n_init=1).inertia for s in range(8)]
    assert many.inertia <= np.median(singles) + 1e-12
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x[:3], 4, np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng"):
        kmeans(x, 2, 0)


def test_e_step_stacks_normalised_prototypes():
    x, labels = _blobs(np.random.default_rng(10), k=3, per=20)
    clus = e_step(x, (3, 5), np.random.default_rng(0))
    assert clus.prototypes.shape == (8, x.shape[1]) and clus.phis.shape == (8,)
    np.testing.assert_allclose(np.linalg.norm(clus.prototypes, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose([clus.phis[:3].mean(), clus.phis[3:].mean()], 0.2, rtol=1e-12)
    assert clus.assignments.shape == (2, 60) and clus.assignments[1].max() < 5
    assert clustering_accuracy(labels, clus.assignments[0]) == 1.0


def test_clustering_accuracy_matches_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(20):
        y = rng.integers(0, 4, 15)
        pred = rng.integers(0, 4, 15)
        best = max(np.mean(np.asarray(perm)[pred] == y) for perm in itertools.permutations(range(4)))
        assert clustering_accuracy(y, pred) == pytest.approx(best, abs=1e-15)
    assert clustering_accuracy(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])) == 1.0
    assert clustering_accuracy(np.array([0, 0, 0, 0]), np.array([0, 1, 2, 3])) == 0.25


def test_em_loop_lowers_the_loss_and_recovers_the_clusters():
    rng = np.random.default_rng(0)
    means = rng.standard_normal((4, 16))
    labels = np.repeat(np.arange(4), 60)
    x = means[labels] + 0.7 * rng.standard_normal((240, 16))
    _, hist = protonce_em(x, (4, 8), np.random.default_rng(1), labels=labels, epochs=6)
    assert len(hist.loss) == 6
    assert hist.loss[-1] < 0.9 * hist.loss[0]
    assert hist.instance[-1] < hist.instance[0] and hist.prototype[-1] < hist.prototype[0]
    assert hist.accuracy[-1] >= 0.95
