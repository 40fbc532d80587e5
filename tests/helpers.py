"""Small utilities shared by the tests."""

from __future__ import annotations

import math

from hypothesis import strategies as st

from refssl import gradcheck, registry

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def draw_hyper(data, op) -> dict:
    """Draw each float hyperparameter of ``op`` from its registered range."""
    out = {}
    for key, r in op.hyper_ranges.items():
        if r.log:
            out[key] = math.exp(data.draw(st.floats(math.log(r.low), math.log(r.high)), label=key))
        else:
            out[key] = data.draw(st.floats(r.low, r.high), label=key)
    return out


def assert_gradients(name_or_op, args, kwargs, rng=None, **kw):
    """Gradcheck and fail with the full report."""
    op = registry.get(name_or_op) if isinstance(name_or_op, str) else name_or_op
    rep = gradcheck.check(op, args, kwargs, rng=rng, **kw)
    assert rep.ok, rep.describe()
    return rep


def run_tiny_experiment(name, tmp_path):
    """Run toy experiment ``name`` at the tiny level into ``tmp_path``; check that it wrote its figures,
    an unjudged ``metrics.json`` and a report with its expectation; return (metrics, summary)."""
    import io
    import json

    from toy_experiments import load_all, run_experiment

    load_all()
    summary = run_experiment(name, level="tiny", seed=0, results_root=tmp_path, stream=io.StringIO())
    folder = tmp_path / name
    metrics = json.loads((folder / "metrics.json").read_text())
    report = (folder / "report.md").read_text()
    for fig in summary["figures"]:
        assert (folder / fig).is_file() and (folder / fig).stat().st_size > 1000
    assert metrics["met"] is None  # tiny runs are not judged
    assert "Expected outcome" in report and "## Measured" in report
    return metrics["metrics"], summary
