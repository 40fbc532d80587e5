"""Toy experiment vision_language at the tiny level (runs end to end, writes its report, figures and the
required metrics, all fractions in [0, 1]), and its evaluation helpers on hand-made inputs."""

import io
import json
import math

import numpy as np
import pytest

from toy_experiments import load_all, run_experiment
from toy_experiments.exp_12_vision_language import recall_at_k, same_count_partners, standardise_regions

load_all()

REQUIRED = ("mlm_color_acc_true_image", "mlm_color_acc_other_image", "mlm_color_acc_text_only", "itm_acc",
            "clip_recall_at_1", "zero_shot_color_acc", "zero_shot_shape_acc")
FRACTIONS = REQUIRED + ("mlm_shape_acc_true_image", "mlm_shape_acc_other_image", "mlm_shape_acc_text_only",
                        "itm_acc_any_negative", "clip_i2t_recall_at_1", "clip_t2i_recall_at_1",
                        "clip_i2t_recall_at_5", "clip_t2i_recall_at_5", "probe_color_acc", "probe_shape_acc",
                        "probe_color_acc_untrained", "probe_shape_acc_untrained")


def test_vision_language_tiny(tmp_path):
    summary = run_experiment("vision_language", level="tiny", seed=0, results_root=tmp_path,
                             stream=io.StringIO())
    folder = tmp_path / "vision_language"
    assert "not judged" in (folder / "report.md").read_text()
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["met"] is None
    m = saved["metrics"]
    for key in FRACTIONS:
        assert m[key] is not None and 0.0 <= m[key] <= 1.0, key
    for key in ("mlm_color_acc_true_image_multi_object", "attention_top_region_acc"):
        assert m[key] is None or 0.0 <= m[key] <= 1.0, key  # None: no multi-object caption drawn
    assert 1.0 <= m["clip_final_logit_scale"] <= 100.0  # exp of the clamped parameter
    assert math.isfinite(m["vb_final_mlm_loss"]) and math.isfinite(m["clip_final_loss"])
    names = set(summary["figures"])
    assert {"retrieval_grid.png", "zero_shot_confusion.png"} <= names
    for f in names:
        assert (folder / f).stat().st_size > 1000


def test_recall_at_k():
    assert recall_at_k(np.eye(5), 1) == 1.0
    # Row i ranks its match (i + 1)-th: the matching score is the i-th largest of the row.
    sim = np.tile(np.arange(4, 0, -1, dtype=float), (4, 1))
    assert recall_at_k(sim, 1) == 0.25 and recall_at_k(sim, 2) == 0.5 and recall_at_k(sim, 4) == 1.0
    # A tie with another column counts against the match.
    assert recall_at_k(np.ones((3, 3)), 1) == 0.0 and recall_at_k(np.ones((3, 3)), 3) == 1.0


def test_same_count_partners():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 4, size=200)
    idx = rng.integers(0, 200, size=5000)
    out = same_count_partners(counts, idx, rng)
    assert (out != idx).all() and (counts[out] == counts[idx]).all()
    # Uniform over the other scenes of that count: every one of them is drawn.
    pool = set(np.flatnonzero(counts == counts[idx[0]])) - {idx[0]}
    big = same_count_partners(counts, np.full(20000, idx[0]), rng)
    assert set(big) == pool
    with pytest.raises(ValueError, match="only one scene"):
        same_count_partners(np.array([1, 2, 2]), np.array([0]), rng)


def test_standardise_regions():
    rng = np.random.default_rng(1)
    crops = rng.random((50, 3, 3, 4, 4)).astype(np.float32) * np.array([1, 2, 3])[:, None, None]
    valid = rng.random((50, 3)) < 0.6
    out, (mu, sd) = standardise_regions(crops, valid)
    assert out.dtype == np.float32 and (out[~valid] == 0).all()
    present = out[valid]
    np.testing.assert_allclose(present.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(present.std(axis=(0, 2, 3)), 1, atol=1e-4)
    # Other splits use the given statistics.
    out2, _ = standardise_regions(crops[:10], valid[:10], stats=(mu, sd))
    np.testing.assert_allclose(out2, out[:10], atol=1e-6)
