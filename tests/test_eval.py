"""Evaluation: probes, k-NN, factor tables, retrieval grids, invariance measures, effective rank, clustering
accuracy and the non-learned baselines.

Reference values come from math (closed-form optima, constructed features with known invariance) or from
straightforward loop re-implementations written here.
"""

import numpy as np
import pytest
from hypothesis import given
from scipy.optimize import minimize

from refssl.baselines import brief, brief_pairs, evaluate_baselines, raw_pixels
from refssl.data import factor_labels, make_dataset, sample_factors, trajectories
from refssl.clustering import clustering_accuracy as cluster_accuracy
from refssl.eval import (
    alignment_metric, uniformity_metric, kmeans_accuracy, effective_rank, factor_table, firing_thresholds,
    invariance_scores, knn_accuracy, linear_probe, nearest_neighbors, retrieval_grids,
    retrieval_mosaic,
)
from refssl.eval.probes import lbfgs
from tests.helpers import seeds


@pytest.fixture(scope="module")
def small_dataset():
    return make_dataset(600, 300, np.random.default_rng(0), size=16)


# ---------------------------------------------------------------------------------------------------
# Linear probe


def test_lbfgs_reaches_the_closed_form_minimum():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 20))
    h = a.T @ a + 0.1 * np.eye(20)
    b = rng.standard_normal(20)
    x, f, _ = lbfgs(lambda x: (0.5 * x @ h @ x - b @ x, h @ x - b), np.zeros(20), max_iter=500, gtol=1e-10)
    np.testing.assert_allclose(x, np.linalg.solve(h, b), rtol=1e-6, atol=1e-8)


def test_linear_probe_matches_an_independent_fit():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 3)) * [1.0, 3.0, 0.5] + [2.0, -1.0, 0.0]
    y = (x[:, 0] + 0.3 * x[:, 1] + 0.5 * rng.standard_normal(60) > 1.5).astype(np.int64) + (x[:, 2] > 0.4)
    l2 = 0.05
    out = linear_probe(x, y, n_classes=3, l2=l2, max_iter=500, return_model=True)
    xs = (x - x.mean(0)) / x.std(0)

    def objective(theta):  # written out per sample, minimised with numerical gradients
        w, b = theta[:9].reshape(3, 3), theta[9:]
        total = 0.0
        for i in range(60):
            z = xs[i] @ w + b
            total += np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[y[i]]
        return total / 60 + 0.5 * l2 * np.sum(w * w)

    ref = minimize(objective, np.zeros(12), method="BFGS", options={"gtol": 1e-8}).x
    np.testing.assert_allclose(out["W"], ref[:9].reshape(3, 3), atol=2e-4)
    np.testing.assert_allclose(out["b"], ref[9:], atol=2e-4)


def test_linear_probe_separable_and_random_labels():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 10))
    y = np.argmax(x[:, :4], axis=1)  # linearly separable: argmax of 4 coordinates
    r = linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert r["train"] > 0.97 and r["val"] > 0.9
    noise = rng.integers(0, 4, 400)
    r = linear_probe(x[:300], noise[:300], x[300:], noise[300:])
    assert r["val"] < 0.4


def test_linear_probe_on_raw_pixels_recovers_colour(small_dataset):
    tr, va = small_dataset.train, small_dataset.val
    yt, yv = factor_labels(tr.factors)["color"][0], factor_labels(va.factors)["color"][0]
    r = linear_probe(raw_pixels(tr.images), yt, raw_pixels(va.images), yv)
    assert r["val"] > 0.6  # chance is 1/8


# ---------------------------------------------------------------------------------------------------
# k-NN


def _knn_loop(bank, bank_y, queries, k, dist, exclude_self):
    pred = []
    for i, q in enumerate(queries):
        d = np.array([dist(q, b) for b in bank], dtype=np.float64)
        if exclude_self:
            d[i] = np.inf
        order = sorted(range(len(bank)), key=lambda j: (d[j], j))[:k]
        counts = {}
        for rank, j in enumerate(order):
            counts.setdefault(bank_y[j], [0, rank])[0] += 1
        pred.append(max(counts, key=lambda c: (counts[c][0], -counts[c][1])))
    return np.array(pred)


@pytest.mark.parametrize("metric, k", [("euclidean", 1), ("euclidean", 5), ("cosine", 3), ("hamming", 3)])
def test_knn_matches_loops(metric, k):
    rng = np.random.default_rng(3)
    if metric == "hamming":
        bank = rng.random((80, 24)) < 0.5
        query = rng.random((30, 24)) < 0.5
        dist = lambda a, b: np.sum(a != b)  # noqa: E731
    else:
        bank = rng.standard_normal((80, 6))
        query = rng.standard_normal((30, 6))
        if metric == "euclidean":
            dist = lambda a, b: np.sqrt(np.sum((a - b) ** 2))  # noqa: E731
        else:
            dist = lambda a, b: 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    by = rng.integers(0, 4, 80)
    qy = rng.integers(0, 4, 30)
    out = knn_accuracy(bank, by, query, qy, k=k, metric=metric)
    loo = _knn_loop(bank, by, bank, k, dist, True)
    val = _knn_loop(bank, by, query, k, dist, False)
    assert out["train"] == pytest.approx(np.mean(loo == by))
    assert out["val"] == pytest.approx(np.mean(val == qy))


def test_nearest_neighbors_excludes_self_and_orders():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    nn = nearest_neighbors(x, x, 2, exclude_self=True)
    assert nn.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbors(x, x, 4, exclude_self=True)


# ---------------------------------------------------------------------------------------------------
# Factor table, retrieval


def test_factor_table_on_an_oracle_representation(small_dataset):
    tr, va = small_dataset.train, small_dataset.val

    def oracle(f):  # one-hot colour + position coordinates, nothing about shape
        return np.concatenate([np.eye(8)[f.color] * 5, f.position * 10], axis=1)

    res, md = factor_table(oracle(tr.factors), tr.factors, oracle(va.factors), va.factors, name="oracle")
    assert set(res) == {"shape", "color", "position", "size"}
    assert res["color"]["linear_val"] == 1.0 and res["color"]["knn_val"] == 1.0
    assert res["position"]["linear_val"] > 0.9
    assert res["shape"]["linear_val"] < res["shape"]["chance"] + 0.12
    assert md.splitlines()[0].startswith("| oracle: factor") and len(md.splitlines()) == 6
    assert "| color | 8 |" in md


def test_retrieval_grid_files_and_mosaic(small_dataset, tmp_path):
    tr, va = small_dataset.train, small_dataset.val
    emb_t, emb_v = raw_pixels(tr.images), raw_pixels(va.images)
    paths = retrieval_grids(str(tmp_path), tr.images, emb_t, va.images, emb_v, np.random.default_rng(0),
                            n_queries=4, k=5)
    import matplotlib.image as mpimg

    for p in paths:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 4 * 16 and img.shape[1] > 6 * 16
    mosaic = retrieval_mosaic(tr.images[:2], tr.images, np.array([[5, 6], [7, 8]]), pad=2, gap=6)
    s = 16
    np.testing.assert_allclose(mosaic[2:2 + s, 2:2 + s], tr.images[0].transpose(1, 2, 0))
    x1 = 2 + s + 2 + 6  # pad + tile + pad + gap
    np.testing.assert_allclose(mosaic[2 + s + 2:2 + 2 * s + 2, x1:x1 + s], tr.images[7].transpose(1, 2, 0))


# ---------------------------------------------------------------------------------------------------
# Invariance measures


def _invariance_loop(feat, n_targets, tfeat, tid, ttarget, k):
    """The official procedure, written with explicit loops over units and trajectories."""
    n, d = feat.shape
    p = min((1 - 1 / n_targets) * 100, 95)
    idx = int((n * p) // 100)
    t_pos = np.array([sorted(feat[:, i])[idx] for i in range(d)])
    t_neg = np.array([sorted(feat[:, i], reverse=True)[idx] for i in range(d)])
    g = np.array([np.mean(feat[:, i] >= t_pos[i]) for i in range(d)])
    targets = sorted(set(ttarget.tolist()))
    local = np.zeros((len(targets), d))
    count = np.zeros((len(targets), d))
    for z in sorted(set(tid.tolist())):
        rows = np.flatnonzero(tid == z)
        if len(rows) < 3:
            continue
        c = targets.index(ttarget[rows[0]])
        for i in range(d):
            fires = max(sum(tfeat[r, i] > t_pos[i] for r in rows), sum(tfeat[r, i] < t_neg[i] for r in rows))
            if fires > 0:
                local[c, i] += fires / len(rows)
                count[c, i] += 1
    local = local / (count + 1e-20)
    score = np.mean([np.mean(sorted(local[c] / g, reverse=True)[:k]) for c in range(len(targets))])
    return t_pos, t_neg, local, score * (100 - p)


@given(seeds)
def test_invariance_matches_the_loop_procedure(seed):
    rng = np.random.default_rng(seed)
    d, n_targets = 7, 4
    feat = rng.standard_normal((120, d))
    lengths = rng.integers(2, 6, 15)  # includes trajectories of length 2, which are skipped
    tid = np.repeat(np.arange(15), lengths)
    perm = rng.permutation(len(tid))  # frames need not be grouped
    tid = tid[perm]
    ttarget = rng.integers(0, n_targets, 15)[tid]
    tfeat = rng.standard_normal((len(tid), d)) * 1.5
    res = invariance_scores(feat, n_targets, tfeat, tid, ttarget, ks=(3,))
    t_pos, t_neg, local, score = _invariance_loop(feat, n_targets, tfeat, tid, ttarget, 3)
    np.testing.assert_array_equal(res.t_pos, t_pos)
    np.testing.assert_array_equal(res.t_neg, t_neg)
    np.testing.assert_allclose(res.local_rate, local)
    assert res.scores[3] == pytest.approx(score)


def test_invariance_score_of_constructed_units():
    rng = np.random.default_rng(0)
    n_traj, t = 200, 8
    tid = np.repeat(np.arange(n_traj), t)
    target = np.repeat(rng.integers(0, 3, n_traj), t)
    level = rng.standard_normal(n_traj)
    constant = level[tid]  # the same value on every frame of a trajectory: perfectly invariant
    # positive on the first half of each trajectory, 0 on the second: fires on at most half the frames
    half = np.where(np.tile(np.arange(t), n_traj) < t // 2, np.abs(level)[tid], 0.0)
    noise = rng.standard_normal(n_traj * t)  # changes on every frame
    feats = np.stack([constant, half, noise], 1)
    # with 20 targets the firing rate is 5 %; the dataset is the trajectory frames themselves
    res = invariance_scores(feats, 20, feats, tid, target, ks=(1,))
    assert res.global_rate[0] == pytest.approx(0.05)
    np.testing.assert_allclose(res.local_rate[:, 0], 1.0)
    np.testing.assert_allclose(res.J[:, 0] * 0.05 * 100, 100.0)
    assert res.scores[1] == pytest.approx(100.0)
    assert np.all(res.local_rate[:, 2] < 0.5)
    only_half = invariance_scores(feats[:, 1:2], 20, feats[:, 1:2], tid, target, ks=(1,))
    # the top 5 % of its values are the first halves of the 20 largest-|level| trajectories (G = 0.05;
    # half the frames are 0, so the negated sign never fires): L = 1/2, score 50
    assert only_half.global_rate[0] == pytest.approx(0.05)
    np.testing.assert_allclose(only_half.local_rate[:, 0], 0.5)
    assert only_half.scores[1] == pytest.approx(50.0)


def test_invariance_on_shape_trajectories_separates_colour_from_shape_features():
    f = sample_factors(60, np.random.default_rng(0))
    tr = trajectories(f, "color", np.random.default_rng(1))
    # unit 0 reads the mean brightness of the red channel (changes with colour), unit 1 the shape
    # coverage area (independent of colour along a colour trajectory)
    red = tr.images[:, 0].mean((1, 2)).astype(np.float64)
    area = (tr.images.max(1) > 0).mean((1, 2)).astype(np.float64) + 1e-3 * tr.factors.shape
    feats = np.stack([red, area], 1)
    res = invariance_scores(feats, 20, feats, tr.traj_id, tr.factors.shape, ks=(1,))
    fired = res.local_rate[:, 1] > 0  # targets (shapes) on which the area unit fires at all
    assert fired.any()
    np.testing.assert_allclose(res.local_rate[fired, 1], 1.0)  # then on every frame
    assert res.local_rate[:, 0].max() < 0.9


def test_firing_thresholds_rate():
    feat = np.random.default_rng(0).standard_normal((1000, 5))
    t_pos, t_neg, g, p = firing_thresholds(feat, 3)
    assert p == pytest.approx(100 * 2 / 3)
    np.testing.assert_allclose(g, 1 - 666 / 1000)
    np.testing.assert_allclose(np.mean(feat < t_neg, 0), 1 - 667 / 1000)


# ---------------------------------------------------------------------------------------------------
# Effective rank, clustering


def test_effective_rank_known_cases():
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((100, 1)), rng.standard_normal((1, 16))
    assert effective_rank(u @ v) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    assert effective_rank(3.0 * q[:, :7]) == pytest.approx(7.0)  # 7 equal singular values
    iso = rng.standard_normal((20000, 16))
    assert 15.8 < effective_rank(iso) <= 16.0
    s = np.array([3.0, 1.0])  # two singular values: exp of the entropy of (3/4, 1/4)
    expect = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert effective_rank(np.diag(s)) == pytest.approx(expect)
    assert effective_rank(np.ones((10, 4)), center=True) == 0.0


@given(seeds)
def test_hungarian_accuracy_of_a_permuted_labelling_is_one(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, 200)
    perm = rng.permutation(6) + 10
    assert cluster_accuracy(y, perm[y]) == 1.0


def test_hungarian_accuracy_known_table():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    y_pred = np.array([1, 1, 0, 0, 0, 2, 2, 2, 1, 1])
    # best matching: cluster1->0 (2), cluster0->1 (2), cluster2->2 (3) = 7/10
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(0.7)
    assert cluster_accuracy(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0])) == pytest.approx(0.5)


def test_kmeans_accuracy_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 5)) * 10
    y = rng.integers(0, 4, 300)
    x = centres[y] + rng.standard_normal((300, 5)) * 0.5
    assert kmeans_accuracy(x, y, np.random.default_rng(2)) == 1.0
    assert kmeans_accuracy(x, y, np.random.default_rng(2), k=1) == pytest.approx(np.bincount(y).max() / 300)


# ---------------------------------------------------------------------------------------------------
# Baselines


def test_brief_bits_match_loops():
    rng = np.random.default_rng(0)
    images = rng.random((3, 3, 12, 12)).astype(np.float32)
    pairs = brief_pairs(12, np.random.default_rng(1), n_bits=40, color=True)
    bits = brief(images, pairs, sigma=1.0)
    from refssl.data import gaussian_blur

    sm = gaussian_blur(images, sigma=1.0)
    for n in range(3):
        for j in range(40):
            c = pairs.channel[j]
            a, b = sm[n, c, pairs.p_row[j], pairs.p_col[j]], sm[n, c, pairs.q_row[j], pairs.q_col[j]]
            assert bits[n, j] == (a < b)
    grey_pairs = brief_pairs(12, np.random.default_rng(1), n_bits=40)
    g = np.tensordot([0.299, 0.587, 0.114], sm, axes=([0], [1]))
    expect = g[:, grey_pairs.p_row, grey_pairs.p_col] < g[:, grey_pairs.q_row, grey_pairs.q_col]
    np.testing.assert_array_equal(brief(images, grey_pairs), expect)
    assert np.all((grey_pairs.p_row != grey_pairs.q_row) | (grey_pairs.p_col != grey_pairs.q_col))


def test_evaluate_baselines_runs_on_small_data():
    ds = make_dataset(300, 100, np.random.default_rng(3), size=16)
    out = evaluate_baselines(ds, np.random.default_rng(4), n_bits=64, max_iter=30)
    assert set(out) == {"pixels", "brief"}
    res, md = out["pixels"]
    assert res["color"]["knn_val"] > 2 * res["color"]["chance"]
    assert "BRIEF-64" in out["brief"][1]


# ---------------------------------------------------------------------------------------------------
# Alignment / uniformity metrics (the registered ops on normalised embeddings)


def test_alignment_metric_known_values():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((50, 8))
    assert alignment_metric(z, 3.0 * z) == pytest.approx(0.0, abs=1e-12)  # same direction after normalising
    assert alignment_metric(z, -z) == pytest.approx(4.0)  # antipodal: ||x - (-x)||^2 = 4
    # orthogonal unit pairs: squared distance 2, distance^1 = sqrt 2
    e = np.eye(4)
    assert alignment_metric(e, np.roll(e, 1, axis=1), alpha=1) == pytest.approx(np.sqrt(2))


def test_uniformity_metric_known_values():
    # the regular K-gon on S^1: pairwise squared distances 2 - 2 cos(2 pi m / K), written out here
    k = 6
    ang = 2 * np.pi * np.arange(k) / k
    pts = np.stack([np.cos(ang), np.sin(ang)], 1) * 5.0  # normalised by the metric
    vals = [np.exp(-2 * (2 - 2 * np.cos(ang[j] - ang[i]))) for i in range(k) for j in range(i + 1, k)]
    assert uniformity_metric(pts) == pytest.approx(np.log(np.mean(vals)))
    collapsed = np.ones((10, 3))
    assert uniformity_metric(collapsed) == pytest.approx(0.0, abs=1e-12)  # log e^0
    big = np.random.default_rng(0).standard_normal((2000, 3))
    with pytest.raises(ValueError, match="max_points"):
        uniformity_metric(big)
    est = uniformity_metric(big, rng=np.random.default_rng(1), max_points=400)
    # uniform on S^2 with t = 2: E exp(-2 |x - y|^2) = (1 - e^{-8}) / 8 exactly (|x - y|^2 = 2 - 2u, u ~ U(-1, 1))
    assert est == pytest.approx(np.log((1 - np.exp(-8)) / 8), abs=0.08)


def test_invariance_table_of_a_colour_only_feature():
    from refssl.data import generate
    from refssl.eval import invariance_table

    split = generate(600, np.random.default_rng(0))  # 3 shape targets: 600 * 2/3 is whole, G = 1/3

    def encode(images):  # the colour of the shape: invariant to every factor but colour
        return images.reshape(len(images), 3, -1).max(-1).astype(np.float64)

    res, md = invariance_table(encode, split.images, split.factors, np.random.default_rng(1),
                               n_instances=60, n_steps=4, ks=(1, 3))
    for factor in ("shape", "position", "size", "rotation"):
        assert res[factor][1] == pytest.approx(100.0, abs=1e-6), factor
    assert res["color"][1] < 60.0
    assert md.count("\n") == 6 and "| color |" in md
