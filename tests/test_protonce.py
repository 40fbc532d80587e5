"""ProtoNCE, the PCL E-step (k-means, concentration), the EM loop and Hungarian accuracy."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from scipy import special, stats

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


def _op_prototype_terms(q, protos, phis, assignments):
    """The prototype terms of the proto_nce op when every clustering has N clusters and the N samples are assigned
    to distinct clusters (assignments (M, N), each row a permutation) with no sampled negatives: the columns of
    each row are then all prototypes of the clustering, and the term is the full-softmax cross-entropy."""
    m, n = assignments.shape
    queue = _unit(np.ones((1, q.shape[1])))
    _, cache = OP.forward(q, q, queue, protos, assignments, phis, num_clusters=[n] * m,
                          negative_indices=np.zeros((m, 0), np.int64))
    return cache["prototype_losses"]


def _augment_for_bias(v, c):
    """[v, 1]/sqrt2 and [c, -1]/sqrt2: unit vectors whose inner product is (v.c - 1)/2 = -||v - c||^2/4."""
    one = np.ones((len(v), 1))
    return np.hstack([v, one]) / np.sqrt(2), np.hstack([c, -np.ones((len(c), 1))]) / np.sqrt(2)


def _mixture_log_joint(v, c, sigma2):
    """log p(x_i, c_j) = log(1/k) + log N(v_i; c_j, sigma2_j I): a normalised Gaussian mixture (scipy densities)."""
    k = len(c)
    return np.stack([stats.multivariate_normal(c[j], sigma2[j] * np.eye(v.shape[1])).logpdf(v) for j in range(k)],
                    axis=1) - np.log(k)


@pytest.mark.derivation("protonce_em.md#PE1")
@given(seed=seeds)
def test_hard_estep_gap_is_the_op_prototype_loss(seed):
    """Equal-variance Gaussian mixture: log-likelihood minus the hard-Q ELBO is N times proto_nce's prototype term."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(2, 7)), int(rng.integers(2, 5))
    v, c = _unit(rng.standard_normal((n, d))), _unit(rng.standard_normal((n, d)))
    sigma2 = float(rng.uniform(0.1, 1.0))
    log_joint = _mixture_log_joint(v, c, np.full(n, sigma2))
    loglik = np.sum(np.logaddexp.reduce(log_joint, axis=1))
    s = rng.permutation(n)
    hard_elbo = np.sum(log_joint[np.arange(n), s])  # one-hot Q: the entropy term is 0
    assert hard_elbo <= loglik
    proto = _op_prototype_terms(v, c, np.full(n, sigma2), s[None])[0]
    np.testing.assert_allclose(loglik - hard_elbo, n * proto, rtol=1e-10, atol=1e-12)


@pytest.mark.derivation("protonce_em.md#PE3")
@given(seed=seeds)
def test_equal_variance_gaussian_posterior_is_the_op_with_phi_sigma_squared(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(2, 8)), int(rng.integers(2, 6))
    v, c = _unit(rng.standard_normal((n, d))), _unit(rng.standard_normal((n, d)))
    s = rng.permutation(n)
    for sigma2 in (0.05, 0.3, 1.7):
        exact = np.mean([_gaussian_nll(v[i], c, np.full(n, sigma2), s[i]) for i in range(n)])
        np.testing.assert_allclose(_op_prototype_terms(v, c, np.full(n, sigma2), s[None])[0], exact,
                                   rtol=1e-11, atol=1e-13)
        # writing the exponent as ||v - c||^2 / sigma^2 (no 2) gives phi = sigma^2 / 2
        no_two = np.mean([_nll(list(-np.sum((v[i] - c) ** 2, axis=1) / sigma2), s[i]) for i in range(n)])
        np.testing.assert_allclose(_op_prototype_terms(v, c, np.full(n, sigma2 / 2), s[None])[0], no_two,
                                   rtol=1e-11, atol=1e-13)


@pytest.mark.derivation("protonce_em.md#PE4")
@given(seed=seeds)
def test_unequal_variances_add_a_bias_that_the_op_drops(seed):
    """The exact NLL of the prototype-normalised model has logits v.c/phi - 1/phi (PE4).  The op reproduces it on
    augmented unit vectors ([v, 1] / sqrt2 . [c, -1] / sqrt2 = (v.c - 1) / 2, with phi / 2) and drops the bias on
    the plain ones."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(3, 8)), int(rng.integers(2, 6))
    v, c = _unit(rng.standard_normal((n, d))), _unit(rng.standard_normal((n, d)))
    phi = rng.uniform(0.1, 0.5, n)
    s = rng.permutation(n)
    exact = np.mean([_gaussian_nll(v[i], c, phi, s[i]) for i in range(n)])
    written = np.mean([_nll(list(c @ v[i] / phi - 1 / phi), s[i]) for i in range(n)])
    np.testing.assert_allclose(written, exact, rtol=1e-12, atol=1e-14)
    va, ca = _augment_for_bias(v, c)
    np.testing.assert_allclose(_op_prototype_terms(va, ca, phi / 2, s[None])[0], exact, rtol=1e-11, atol=1e-13)
    dropped = _op_prototype_terms(v, c, phi, s[None])[0]
    plain = np.mean([_nll(list(c @ v[i] / phi), s[i]) for i in range(n)])
    np.testing.assert_allclose(dropped, plain, rtol=1e-11, atol=1e-13)
    assert abs(dropped - exact) > 1e-6  # the bias -1/phi_j matters once the phi_j differ


@pytest.mark.derivation("protonce_em.md#PE8")
@pytest.mark.derivation("protonce_em.md#PE4")
@given(seed=seeds)
def test_normalised_densities_add_minus_d_over_2_log_phi(seed):
    rng = np.random.default_rng(seed)
    k, d = int(rng.integers(2, 7)), int(rng.integers(2, 9))
    v, c = _unit(rng.standard_normal((3, d))), _unit(rng.standard_normal((k, d)))
    phi = rng.uniform(0.05, 0.6, k)
    log_joint = _mixture_log_joint(v, c, phi)  # N(c_j, phi_j I), normalised in R^D
    reference = log_joint - np.logaddexp.reduce(log_joint, axis=1, keepdims=True)

    def log_softmax(z):
        return z - np.logaddexp.reduce(z, axis=1, keepdims=True)

    written = v @ c.T / phi - 1 / phi - d / 2 * np.log(phi)
    np.testing.assert_allclose(log_softmax(written), reference, rtol=1e-10, atol=1e-10)
    # without the normaliser (PE4) the posterior is a different one
    assert np.abs(log_softmax(v @ c.T / phi - 1 / phi) - reference).max() > 1e-6
    # b(phi) = -1/phi - (D/2) log phi: b' = (2 - D phi) / (2 phi^2), positive below 2/D, negative above
    b = lambda f: -1 / f - d / 2 * np.log(f)  # noqa: E731
    for f in (0.3 / d, 1.0 / d, 3.0 / d, 0.2):
        h = 1e-6 * f
        slope = (b(f + h) - b(f - h)) / (2 * h)
        np.testing.assert_allclose(slope, (2 - d * f) / (2 * f * f), rtol=1e-6)
        assert (slope > 0) == (f < 2 / d)


def _log_vmf_normaliser(d, kappa):
    """log C_D(kappa) = (D/2 - 1) log kappa - (D/2) log 2 pi - log I_{D/2-1}(kappa), via the scaled Bessel ive."""
    nu = d / 2 - 1
    return nu * np.log(kappa) - d / 2 * np.log(2 * np.pi) - (np.log(special.ive(nu, kappa)) + kappa)


@pytest.mark.derivation("protonce_em.md#PE8")
@pytest.mark.parametrize("d", [3, 16, 128])
def test_von_mises_fisher_normaliser_in_both_regimes(d):
    nu = d / 2 - 1
    # kappa >> D^2: log C_D + kappa - ((D-1)/2) log kappa -> -((D-1)/2) log 2 pi,
    # with first correction (4 nu^2 - 1)/(8 kappa)
    const = -(d - 1) / 2 * np.log(2 * np.pi)
    for kappa in (100.0 * d * d, 1000.0 * d * d):
        err = _log_vmf_normaliser(d, kappa) + kappa - (d - 1) / 2 * np.log(kappa) - const
        assert abs(err) <= 1.01 * (4 * nu * nu - 1) / (8 * kappa) + 1e-9
    # kappa << D: log C_D(kappa) = const' - kappa^2 / (2D) + O(kappa^4 / D^3)
    if d >= 16:
        k0 = 1e-2
        for kappa in (0.5, 1.0, 2.0):
            err = _log_vmf_normaliser(d, kappa) - _log_vmf_normaliser(d, k0) + (kappa**2 - k0**2) / (2 * d)
            assert abs(err) <= kappa**4 / d**3
    if d == 128:
        # PCL's regime (phi = 0.2, kappa = 5, D = 128): the vMF bias log C_D(1/phi) is small and increasing in phi
        # (the sign of (PE4)), while the Gaussian bias -1/phi - (D/2) log phi is large and decreasing
        h = 1e-6
        vmf = (_log_vmf_normaliser(d, 1 / (0.2 + h)) - _log_vmf_normaliser(d, 1 / (0.2 - h))) / (2 * h)
        gauss = (2 - d * 0.2) / (2 * 0.2**2)
        np.testing.assert_allclose(vmf, 1 / (d * 0.2**3), rtol=0.02)  # d/dphi of -1/(2 D phi^2)
        assert vmf > 0 > gauss
        assert abs(_log_vmf_normaliser(d, 5.0) - _log_vmf_normaliser(d, 2.5)) < 0.1  # a factor 2 in phi: < 0.1 nat


@pytest.mark.derivation("protonce_em.md#PE9")
@given(seed=seeds)
def test_average_over_clusterings_bounds_the_average_log_likelihood(seed):
    rng = np.random.default_rng(seed)
    n, d, m = int(rng.integers(2, 6)), int(rng.integers(2, 5)), int(rng.integers(1, 4))
    v = _unit(rng.standard_normal((n, d)))
    protos = _unit(rng.standard_normal((m * n, d)))
    sigma2 = rng.uniform(0.1, 1.0, m)  # one equal-variance mixture per granularity
    phis = np.repeat(sigma2, n)
    assign = np.stack([rng.permutation(n) for _ in range(m)])
    lhs, rhs = 0.0, 0.0
    for j in range(m):
        log_joint = _mixture_log_joint(v, protos[j * n:(j + 1) * n], np.full(n, sigma2[j]))
        lhs += np.sum(log_joint[np.arange(n), assign[j]]) / m
        rhs += np.sum(np.logaddexp.reduce(log_joint, axis=1)) / m
    assert lhs <= rhs
    terms = _op_prototype_terms(v, protos, phis, assign)
    np.testing.assert_allclose(rhs - lhs, n * np.mean(terms), rtol=1e-10, atol=1e-12)  # the op averages the M terms


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


def _steps_of_pe6(x, cents, assign, alpha, tau):
    """(PE5) then (PE6) as written: singleton rule before the percentile clip, then the rescale to mean tau."""
    k = len(cents)
    size = np.array([np.sum(assign == c) for c in range(k)])
    phi1 = np.array([np.linalg.norm(x[assign == c] - cents[c], axis=1).sum() / (size[c] * np.log(size[c] + alpha))
                     if size[c] > 1 else np.nan for c in range(k)])
    phi2 = np.where(size > 1, phi1, np.nanmax(phi1))
    phi3 = np.clip(phi2, np.percentile(phi2, 10), np.percentile(phi2, 90))
    return tau * phi3 / phi3.mean(), phi1, size


@pytest.mark.derivation("protonce_em.md#PE6")
@given(seed=seeds)
def test_concentration_steps_singleton_rule_before_the_clip(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(4, 12))
    n_single = int(rng.integers(1, 3))
    sizes = np.concatenate([rng.integers(2, 7, k - n_single - 1), np.ones(n_single, int), [0]])  # one empty
    assign = np.repeat(np.arange(k), sizes)
    x = rng.standard_normal((len(assign), 3))
    cents = rng.standard_normal((k, 3))
    tau = float(rng.uniform(0.05, 1.0))
    phi = concentration(x, cents, assign, alpha=10, temperature=tau)
    expected, phi1, size = _steps_of_pe6(x, cents, assign, 10, tau)
    np.testing.assert_allclose(phi, expected, rtol=1e-12)
    assert abs(phi.mean() - tau) < 1e-14
    # singletons and the empty cluster share one value: the pre-clip maximum after the clip
    np.testing.assert_allclose(phi[size <= 1], phi[size <= 1][0], rtol=0)
    # the order matters: assigning the maximum after clipping the multi-member clusters alone gives other values
    # whenever the singletons move the percentiles
    multi = phi1[size > 1]
    clipped = np.clip(multi, np.percentile(multi, 10), np.percentile(multi, 90))
    other = np.empty(k)
    other[size > 1], other[size <= 1] = clipped, clipped.max()
    other = tau * other / other.mean()
    moved = (np.percentile(np.where(size > 1, phi1, np.nanmax(phi1)), [10, 90])
             != np.percentile(multi, [10, 90])).any()
    if moved:
        assert np.abs(other - phi).max() > 1e-12


def test_concentration_needs_a_multi_member_cluster():
    rng = np.random.default_rng(6)
    x, cents = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    with pytest.raises(ValueError, match="more than one member"):
        concentration(x, cents, np.arange(3))


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
