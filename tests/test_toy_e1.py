"""Toy experiments 1, 2, 3 and 9 at level "tiny": each completes and writes its report, metrics and figures.

Outcome quality is judged in the quick/full reports, not here; these tests check the code path and the
invariants that hold at any scale (finite metrics, accuracies in [0, 1], scores in [0, 100]).
"""

import io
import json
import math

import numpy as np
import pytest

import toy_experiments
from toy_experiments.framework import run_experiment

toy_experiments.load_all()


def _run(name, tmp_path):
    summary = run_experiment(name, level="tiny", seed=0, results_root=tmp_path, stream=io.StringIO())
    folder = tmp_path / name
    assert (folder / "report.md").is_file() and (folder / "metrics.json").is_file()
    for fig in summary["figures"]:
        assert (folder / fig).is_file() and (folder / fig).stat().st_size > 0
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["met"] is None  # a tiny run is not judged
    assert "not judged" in (folder / "report.md").read_text()
    return summary, metrics["metrics"]


def _probe_ok(res):
    for factor in ("shape", "color", "position", "size"):
        for key in ("linear_val", "knn_val", "chance"):
            assert 0.0 <= res[factor][key] <= 1.0


def test_autoencoder_tiny(tmp_path):
    summary, m = _run("autoencoder", tmp_path)
    assert {"knn_by_depth.png", "ae_retrieval_train.png", "ae_retrieval_val.png",
            "reconstructions.png"} <= set(summary["figures"])
    # pixels, one entry per conv block (3 at every level), the bottleneck
    assert len(m["depths"]) == 5 and m["depths"][0] == "pixels" and m["depths"][-1].startswith("bottleneck")
    for d in m["depths"]:
        for f in ("shape", "color", "position", "size"):
            assert 0.0 <= m["knn_by_depth"][d][f]["acc"] <= 1.0
            assert 0.0 < m["knn_by_depth"][d][f]["chance"] <= 1.0
    for rep in m["neighbour_sharing"].values():
        for f in ("shape", "color", "position", "size"):
            assert 0.0 <= rep[f]["share"] <= 1.0 and 0.0 < rep[f]["chance"] < 1.0
    _probe_ok(m["bottleneck_probe"])
    assert math.isfinite(m["mse_val"]) and m["mse_val"] >= 0


def test_encoder_layer_features_match_the_encoder():
    """Per-block features of the conv encoder: shapes from the architecture, the last entry is the encoder
    output, and block 1 recomputed by hand (conv -> ReLU -> 2x2 max) agrees."""
    from refssl import optim
    from refssl.train import Trainer
    from toy_experiments import common

    rng = np.random.default_rng(0)
    x = rng.random((5, 3, 16, 16), dtype=np.float32)
    tr = Trainer(common.conv_encoder(16, (4, 8, 16), 10), "info_nce", optim.Adam(lr=1e-3), log_every=0)
    feats = common.encoder_layer_features(tr, x, batch_size=2)
    assert list(feats) == ["block 1 (4x8x8)", "block 2 (8x4x4)", "block 3 (16x2x2)", "bottleneck (10)"]
    np.testing.assert_allclose(feats["bottleneck (10)"], tr.encode(x), rtol=1e-5, atol=1e-6)
    w, b = tr.params["enc.0.w"].astype(np.float64), tr.params["enc.0.b"].astype(np.float64)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((5, 4, 16, 16))
    for i in range(3):
        for j in range(3):
            conv += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 16, j:j + 16], w[:, :, i, j])
    h = np.maximum(conv + b[None, :, None, None], 0).reshape(5, 4, 8, 2, 8, 2).max(axis=(3, 5))
    np.testing.assert_allclose(feats["block 1 (4x8x8)"], h.reshape(5, -1), rtol=1e-4, atol=1e-5)


def test_neighbour_sharing_and_nn_accuracy_by_hand():
    """Features that copy the colour class: every neighbour shares colour (share 1); 1-NN colour accuracy 1;
    chance of a shared colour = mean over queries of the training frequency of the query's colour."""
    from refssl import data
    from toy_experiments import common

    rng = np.random.default_rng(1)
    ft, fv = data.sample_factors(200, rng), data.sample_factors(40, rng)
    xt = np.eye(8)[ft.color] * 10 + 0.01 * rng.standard_normal((200, 8))
    xv = np.eye(8)[fv.color] * 10
    share = common.neighbour_sharing(xt, ft, xv, fv, k=5)
    assert share["color"]["share"] == 1.0
    freq = np.bincount(ft.color, minlength=8) / 200
    assert share["color"]["chance"] == pytest.approx(np.mean(freq[fv.color]))
    acc = common.nn_factor_accuracy(xt, ft, xv, fv)
    assert acc["color"]["acc"] == 1.0
    assert acc["color"]["chance"] == pytest.approx(np.bincount(fv.color).max() / 40)


def test_augmentation_families_tiny(tmp_path):
    summary, m = _run("augmentation_families", tmp_path)
    assert set(m["probe"]) == {"A", "B", "C"}
    for fam in "ABC":
        _probe_ok(m["probe"][fam])
        assert f"retrieval_{fam}_val.png" in summary["figures"]
    assert all(-1.0 <= v <= 1.0 for v in m["above_chance_B"].values())
    # homework rows: predicted invariances as designed; observed ones are factors of the probe table
    assert m["predicted_invariant"] == {"A": ["color"], "B": ["position"], "C": ["shape", "position"]}
    for fam in "ABC":
        assert set(m["observed_invariant"][fam]) <= {"shape", "color", "position", "size"}


def test_circle_embedding_tiny(tmp_path):
    summary, m = _run("circle_embedding", tmp_path)
    assert "circle_angles.png" in summary["figures"]
    for fam in ("crop_only", "crop_color_jitter"):
        for f, k in (("color", 8), ("shape", 3)):
            st = m["circle"][fam][f]
            assert all(0.0 <= r <= 1.0 + 1e-9 for r in st["concentration"])
            # the K gaps between class means add up to the full circle, so the smallest is at most 2 pi / K
            assert 0.0 <= st["gap_ratio"] <= 1.0 + 1e-9


def test_invariance_tiny(tmp_path):
    summary, m = _run("invariance", tmp_path)
    assert summary["figures"] == ["invariance_scores.png"]
    assert set(m["scores"]) == {"InfoNCE-A", "InfoNCE-C", "autoencoder", "raw pixels", "BRIEF-256"}
    for rep in m["scores"].values():
        assert set(rep) == {"color", "shape", "position"}
        for sc in rep.values():
            assert all(0.0 <= v <= 100.0 + 1e-9 for v in sc.values())


def test_align_uniform_loss_gradient():
    """The composed loss object of experiment 3 against central differences (float64)."""
    from toy_experiments.exp_03_circle_embedding import AlignUniformLoss

    rng = np.random.default_rng(0)
    z1, z2 = rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    op = AlignUniformLoss()
    _, cache = op.forward(z1, z2, lam=0.7, t=2.0)
    g1, g2 = op.backward(cache, 1.0)
    h = 1e-6
    for z, g in ((z1, g1), (z2, g2)):
        num = np.zeros_like(z)
        for idx in np.ndindex(z.shape):
            old = z[idx]
            z[idx] = old + h
            lp = op.forward(z1, z2, lam=0.7, t=2.0)[0]
            z[idx] = old - h
            lm = op.forward(z1, z2, lam=0.7, t=2.0)[0]
            z[idx] = old
            num[idx] = (lp - lm) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-9)


def test_circle_stats_regular_polygon():
    """K classes at the vertices of a regular K-gon: R = 1 per class, gap ratio 1, overall R = 0."""
    from toy_experiments.exp_03_circle_embedding import circle_stats

    k = 5
    labels = np.repeat(np.arange(k), 4)
    theta = 2 * np.pi * labels / k + 0.3
    st = circle_stats(theta, labels, k)
    np.testing.assert_allclose(st["concentration"], 1.0)
    assert st["gap_ratio"] == pytest.approx(1.0)
    assert st["overall_R"] == pytest.approx(0.0, abs=1e-12)
