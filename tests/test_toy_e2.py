"""Toy experiments temperature, redundancy and collapse at the tiny level: they run end to end, write their
report, metrics and figures, and their metrics are finite and in range (outcomes are judged in the reports)."""

import json
import math

from toy_experiments import load_all, run_experiment

load_all()


def _finite(values):
    return all(v is not None and math.isfinite(v) for v in values)


def _run(name, tmp_path):
    summary = run_experiment(name, level="tiny", seed=0, results_root=tmp_path)
    folder = tmp_path / name
    assert (folder / "report.md").is_file() and (folder / "metrics.json").is_file()
    assert summary["figures"], "every experiment names at least one figure"
    for f in summary["figures"]:
        assert (folder / f).is_file() and (folder / f).stat().st_size > 1000
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["met"] is None  # tiny runs are never judged
    report = (folder / "report.md").read_text()
    assert "Expected outcome" in report and "not judged" in report
    return saved["metrics"]


def test_temperature_tiny(tmp_path):
    m = _run("temperature", tmp_path)
    assert set(m["sweep"]) == {"0.1", "1"}
    for row in m["sweep"].values():
        assert 0.0 <= row["alignment"] <= 4.0  # mean squared distance of unit vectors
        assert row["uniformity"] <= 0.0  # log of a mean of exp(-t d^2) <= log 1
        assert all(0.0 <= row[f"linear_{f}"] <= 1.0 for f in ("shape", "color", "position", "size"))
    short = m["shortcut"]
    assert _finite([short["unnormalised"]["norm_end"], short["normalised"]["loss_end"],
                    short["heldout_unnormalised_loss"], short["heldout_same_directions_unit_norm_loss"]])
    # The unit-norm loss can never fall below the lower bound T17 of the normalised loss.
    assert short["heldout_same_directions_unit_norm_loss"] >= short["lower_bound_normalised"] - 1e-4


def test_redundancy_tiny(tmp_path):
    m = _run("redundancy", tmp_path)
    runs = m["runs"]
    assert {r["loss"] for r in runs.values()} == {"barlow_twins", "barlow_twins_hsic", "vicreg"}
    for r in runs.values():
        assert 1.0 - 1e-9 <= r["rank_projector"] <= 64 and 1.0 - 1e-9 <= r["rank_encoder"] <= 32
        assert all(0.0 <= r[f"linear_{f}"] <= 1.0 for f in ("shape", "color", "position", "size"))
        assert _finite([r["final_loss"]])


def test_collapse_tiny(tmp_path):
    m = _run("collapse", tmp_path)
    runs = m["runs"]
    assert len(runs) == 6
    for name, r in runs.items():
        assert 1.0 - 1e-9 <= r["final_rank"] <= 32, name
        assert 0.0 <= r["norm_std"] <= 1.0, name
        assert _finite([r["final_loss"]] + r["rank_curve"]), name
    # SimSiam's loss is a mean negative cosine: in [-1, 1].
    assert all(-1.0 - 1e-6 <= runs[k]["final_loss"] <= 1.0 for k in runs if k.startswith("SimSiam"))
    assert 0.0 < runs["DINO with centering"]["top_prototype_share"] <= 1.0


def test_collapse_cosine_gradient_reaches_both_inputs():
    """The no-stop-gradient SimSiam arm needs d(-mean cos(p, z))/dz too: central differences, float64."""
    import numpy as np

    from toy_experiments.exp_06_collapse import _cosine_terms

    rng = np.random.default_rng(0)
    p, z = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    loss, dp, dz = _cosine_terms(p, z)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    assert abs(loss + np.mean(np.sum(pn * zn, axis=1))) < 1e-12

    def numeric(which):
        g, h = np.zeros((5, 4)), 1e-6
        for i in range(5):
            for j in range(4):
                a, b = p.copy(), z.copy()
                (a if which == "p" else b)[i, j] += h
                up = _cosine_terms(a, b)[0]
                (a if which == "p" else b)[i, j] -= 2 * h
                g[i, j] = (up - _cosine_terms(a, b)[0]) / (2 * h)
        return g

    np.testing.assert_allclose(dp, numeric("p"), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dz, numeric("z"), rtol=1e-6, atol=1e-9)
