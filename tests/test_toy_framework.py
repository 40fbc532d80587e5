"""The toy-experiment framework: reports, metrics, atomic result folders."""

import json

import pytest

from toy_experiments import framework as fw


@pytest.fixture
def dummy():
    calls = []

    def run(ctx):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = ctx.pick(tiny=3, quick=5, full=50)
        ctx.setting(n=n)
        calls.append(ctx.level)
        if ctx.settings.get("n") == 3 and getattr(run, "explode", False):
            raise RuntimeError("boom")
        fig, ax = plt.subplots()
        ax.plot(range(n))
        name = ctx.save_figure(fig, "line.png")
        return fw.Outcome(metrics={"n": n, "mean": (n - 1) / 2}, table=fw.markdown_table([{"n": n}]),
                          met=n > 2, verdict=f"n = {n} > 2", figures=[name])

    fw.experiment("dummy_test_exp", title="Dummy", question="Does it run?", expected="n > 2")(run)
    yield run, calls
    fw.EXPERIMENTS.pop("dummy_test_exp")


def test_run_writes_report_metrics_and_figures(tmp_path, dummy):
    summary = fw.run_experiment("dummy_test_exp", level="tiny", seed=3, results_root=tmp_path)
    folder = tmp_path / "dummy_test_exp"
    assert sorted(p.name for p in folder.iterdir()) == ["line.png", "metrics.json", "report.md"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metrics"] == {"n": 3, "mean": 1.0} and metrics["met"] is True and metrics["seed"] == 3
    report = (folder / "report.md").read_text()
    assert "Does it run?" in report and "expectation met" in report and "![line.png](line.png)" in report
    assert summary["path"] == str(folder)


def test_failed_run_leaves_previous_result_untouched(tmp_path, dummy):
    run, _ = dummy
    fw.run_experiment("dummy_test_exp", level="tiny", results_root=tmp_path)
    before = (tmp_path / "dummy_test_exp" / "metrics.json").read_text()
    run.explode = True
    with pytest.raises(RuntimeError, match="boom"):
        fw.run_experiment("dummy_test_exp", level="tiny", results_root=tmp_path)
    assert (tmp_path / "dummy_test_exp" / "metrics.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dummy_test_exp"]  # no staging folder left behind


def test_index_and_markdown_table(tmp_path, dummy):
    s = fw.run_experiment("dummy_test_exp", level="quick", results_root=tmp_path)
    fw.write_index([s], tmp_path / "index.md")
    text = (tmp_path / "index.md").read_text()
    assert "[dummy_test_exp](dummy_test_exp/report.md)" in text and "met in 1 of 1" in text
    assert fw.markdown_table([{"a": 1.23456, "b": "x"}]) == "| a | b |\n|---|---|\n| 1.235 | x |"


def test_unknown_level_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="level must be one of"):
        fw.Context("x", "huge", 0, tmp_path)
