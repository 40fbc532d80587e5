"""The toy suite as a user meets it: environment in every report, folder modes, suite progress, SIGTERM,
the index of an interrupted ``all``, running from another folder."""

import json
import os
import stat

import numpy as np
import pytest

from toy_experiments import framework as fw


@pytest.fixture
def dummy():
    def run(ctx):
        ctx.setting(n=3)
        if getattr(run, "explode", False):
            raise KeyboardInterrupt
        return fw.Outcome(metrics={"n": 3}, table=fw.markdown_table([{"n": 3}]), met=True, verdict="n = 3")

    fw.experiment("suite_dummy_a", title="Dummy A", question="?", expected="runs", order=1)(run)
    yield run
    fw.EXPERIMENTS.pop("suite_dummy_a")


def test_report_and_metrics_record_blas_threads_and_versions(tmp_path, dummy, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # read at report time, not at numpy import
    fw.run_experiment("suite_dummy_a", level="tiny", results_root=tmp_path)
    folder = tmp_path / "suite_dummy_a"
    env = json.loads((folder / "metrics.json").read_text())["environment"]
    assert env["blas_threads"]["OPENBLAS_NUM_THREADS"] == "3"
    assert env["numpy"] == np.__version__
    import refssl

    assert env["refssl"] == refssl.__version__
    report = (folder / "report.md").read_text()
    assert "OPENBLAS_NUM_THREADS=3" in report and f"numpy {np.__version__}" in report
    assert f"refssl {refssl.__version__}" in report


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_result_folder_gets_the_users_umask_not_0700(tmp_path, dummy, mask):
    old = os.umask(mask)
    try:
        fw.run_experiment("suite_dummy_a", level="tiny", results_root=tmp_path)
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "suite_dummy_a").stat().st_mode)
    assert mode == 0o777 & ~mask, oct(mode)
