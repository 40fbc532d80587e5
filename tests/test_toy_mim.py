"""Toy experiments 10 (MAE) and 11 (BEiT vs BEiT v2) at level "tiny": they complete and write their files.

Outcome quality is judged in the quick/full reports, not here; these tests check the code path, the
metrics' keys and the ranges every value must lie in at any scale.
"""

import math

import numpy as np
import pytest

from .helpers import run_tiny_experiment as _run

FACTORS = ("shape", "color", "position", "size")


def _check_probe(res):
    assert set(res) == set(FACTORS)
    for r in res.values():
        for key in ("chance", "linear_val", "linear_train", "knn_val", "knn_train"):
            assert 0.0 <= r[key] <= 1.0


def test_mae_tiny(tmp_path):
    m, summary = _run("mae", tmp_path)
    assert summary["figures"] == ["reconstructions.png", "loss_curves.png", "probes.png"]
    # tiny runs the quick grid: four ratios without norm_pix, 0.75 with it
    assert set(m["runs"]) == {"r=0.25", "r=0.5", "r=0.75", "r=0.9", "r=0.75 norm_pix"}
    assert set(m["probes"]) == set(m["runs"]) | {"untrained", "raw pixels"}
    for name, r in m["runs"].items():
        assert len(r["losses"]) == 2 and all(math.isfinite(v) and v > 0 for v in r["losses"])
        # pixels are in [0, 1], so a squared error per pixel is too
        assert 0.0 < r["removed_mse"] <= 1.0 and 0.0 < r["mean_patch_mse"] <= 1.0
        assert r["norm_pix"] == name.endswith("norm_pix")
    for res in m["probes"].values():
        _check_probe(res)
    assert set(m["checks"]) and all(isinstance(v, bool) for v in m["checks"].values())
    assert list(m["removed_mse_by_ratio"]) == ["0.25", "0.5", "0.75", "0.9"]


def test_removed_patch_mse_counts_only_removed_patches():
    """Independent of the model: a reconstruction that is exact on the visible patches and off by a constant
    c on the removed ones has removed-patch MSE c^2, whatever the mask."""
    from toy_experiments.exp_10_mae import removed_patch_mse

    rng = np.random.default_rng(0)
    images = rng.random((3, 3, 16, 16)).astype(np.float32)
    mask = np.zeros((3, 3, 16, 16), np.float32)
    mask[:, :, :8, 8:] = 1.0  # one 8 x 8 patch of the 2 x 2 grid removed in every image
    mask[1, :, 8:, :8] = 1.0

    class Fake:
        def reconstruct(self, params, imgs, rng, *, mask_ratio=None):
            return imgs + 0.25 * mask, mask

    value, _, _ = removed_patch_mse(Fake(), None, images, rng, 0.5)
    assert value == pytest.approx(0.0625, rel=1e-5)


def test_beit_tiny(tmp_path):
    m, summary = _run("beit", tmp_path)
    assert summary["figures"] == ["codebooks.png", "loss_curves.png", "probes.png"]
    assert set(m["probes"]) == {"BEiT", "BEiT v2", "untrained", "teacher"}
    for res in m["probes"].values():
        _check_probe(res)
    for tk in ("k-means", "VQ-KD"):
        u = m["codebook_usage"][tk]
        assert 1 <= u["used_codes"] <= 32 and 1.0 - 1e-9 <= u["perplexity"] <= u["used_codes"] + 1e-9
        assert len(u["counts"]) == 32 and sum(u["counts"]) == 64 * 16  # every validation patch has a token
        assert 0.0 < u["top_code_share"] <= 1.0
    for a in m["masked_token"].values():
        assert 0.0 <= a["accuracy"] <= 1.0 and 0.0 <= a["majority_baseline"] <= 1.0
    assert -1.0 <= m["teacher_cosine_to_mean"] <= 1.0
    for name in ("teacher", "vqkd", "BEiT", "BEiT v2"):
        assert len(m["losses"][name]) == 2 and all(math.isfinite(v) for v in m["losses"][name])
    assert set(m["checks"]) and all(isinstance(v, bool) for v in m["checks"].values())


def test_codebook_usage_perplexity():
    from toy_experiments.exp_11_beit import codebook_usage

    # uniform over 4 of 8 codes: perplexity exactly 4; one code: 1
    ppl, used, counts = codebook_usage(np.array([[0, 1], [2, 3]] * 5), 8)
    assert ppl == pytest.approx(4.0) and used == 4 and counts.tolist() == [5, 5, 5, 5, 0, 0, 0, 0]
    ppl, used, _ = codebook_usage(np.zeros((3, 4), int), 8)
    assert ppl == pytest.approx(1.0) and used == 1
    # a skewed distribution, checked against the entropy written out by hand
    ppl, _, _ = codebook_usage(np.array([0, 0, 0, 1]), 2)
    assert ppl == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
