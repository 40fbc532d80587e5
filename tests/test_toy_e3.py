"""Toy experiments 7 (ProtoNCE EM) and 8 (I-Con) at level "tiny": they complete and write their files.

Outcome quality is judged in the quick-mode report, not here; these tests check the code path and
invariants that hold at any scale.
"""

import math

import numpy as np
import pytest

from .helpers import run_tiny_experiment as _run


def _in_unit(values):
    return all(0.0 <= v <= 1.0 for v in values)


def test_protonce_tiny(tmp_path):
    m, summary = _run("protonce", tmp_path)
    assert summary["figures"] == ["protonce_em.png"]
    epochs = len(m["acc_colour"])
    assert epochs >= 2 and len(m["acc_shape"]) == epochs and len(m["phi"]) == epochs
    assert _in_unit(m["acc_colour"]) and _in_unit(m["acc_shape"])
    for phi, sizes in zip(m["phi"], m["cluster_sizes"]):
        phi = np.array(phi)
        # the concentration is rescaled to mean temperature 0.2 and is positive; sizes cover all points
        assert phi.shape == (8,) and np.all(phi > 0) and phi.mean() == pytest.approx(0.2, rel=1e-9)
        assert sum(sizes) == 256
    assert all(math.isfinite(v) for v in m["mstep_loss"])


def test_icon_tiny(tmp_path):
    m, summary = _run("icon", tmp_path)
    assert summary["figures"] == ["icon_alpha_sweep.png", "icon_tsne.png"]
    assert set(m["alpha_accuracy"]) == {"0.0", "0.6"}
    assert set(m["alpha_q_accuracy"]) == {"0.6"}
    for accs in list(m["alpha_accuracy"].values()) + list(m["alpha_q_accuracy"].values()):
        assert _in_unit(accs)
    assert _in_unit(m["kmeans_accuracy"])
    for emb in m["tsne_knn"].values():
        assert _in_unit(emb.values())
    # N x the row-mean I-Con loss with a Cauchy q is the conditional t-SNE objective (independent op)
    assert m["icon_vs_sne_rel_diff"] < 1e-8
    first, last = m["tsne_loss_first_last"]
    assert math.isfinite(first) and math.isfinite(last)


def test_conditional_gaussian_hits_the_perplexity():
    from toy_experiments.exp_08_icon import conditional_gaussian

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    p = conditional_gaussian(x, 8.0)
    assert np.allclose(p.sum(axis=1), 1) and np.all(np.diagonal(p) == 0)
    # perplexity 2^H = e^H (natural-log entropy) of every row, checked with an explicit loop
    for i in range(40):
        row = [v for j, v in enumerate(p[i]) if j != i and v > 0]
        entropy = -sum(v * math.log(v) for v in row)
        assert math.exp(entropy) == pytest.approx(8.0, rel=1e-3)


def test_circle_direction_association():
    """Experiment 3's angle-vs-object-direction score: 1 for a rotated or mirrored direction, small for noise."""
    from toy_experiments.exp_03_circle_embedding import direction_association

    rng = np.random.default_rng(0)
    pos = 0.5 + 0.3 * rng.uniform(-1, 1, (400, 2))
    phi = np.array([math.atan2(y - 0.5, x - 0.5) for x, y in pos])  # the direction, computed point by point
    assert direction_association(phi + 1.3, pos) == pytest.approx(1.0)
    assert direction_association(-phi + 0.4, pos) == pytest.approx(1.0)
    assert direction_association(rng.uniform(-math.pi, math.pi, 400), pos) < 0.15
