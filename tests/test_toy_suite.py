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


@pytest.fixture
def two():
    runs = {}

    def make(name):
        def run(ctx):
            ctx.setting(n=1)
            if runs.get(name) == "interrupt":
                raise KeyboardInterrupt
            return fw.Outcome(metrics={}, table="", met=True, verdict=f"{name} ok")
        return run

    for i, name in enumerate(("suite_dummy_x", "suite_dummy_y")):
        fw.experiment(name, title=name.upper(), question="?", expected="runs", order=i)(make(name))
    yield runs, [fw.EXPERIMENTS["suite_dummy_x"], fw.EXPERIMENTS["suite_dummy_y"]]
    for name in ("suite_dummy_x", "suite_dummy_y"):
        fw.EXPERIMENTS.pop(name)


def test_suite_estimate_uses_earlier_runs_then_the_mean(tmp_path, two):
    assert fw.suite_estimate([], ["suite_dummy_x"], tmp_path, "quick") is None  # nothing to go on
    assert fw.suite_estimate([2.0, 4.0], ["a", "b"], tmp_path, "quick") == pytest.approx(6.0)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"level": "quick", "seconds": 10.0}))
    assert fw.suite_estimate([2.0, 4.0], ["a", "b"], tmp_path, "quick") == pytest.approx(13.0)
    assert fw.suite_estimate([2.0, 4.0], ["a", "b"], tmp_path, "full") == pytest.approx(6.0)  # other level


def test_interrupted_all_leaves_an_index_that_tells_this_run_from_earlier_ones(tmp_path, two):
    import io

    from toy_experiments import __main__ as toy_cli

    runs, exps = two
    assert toy_cli._run_all(exps, tmp_path, "tiny", 0, stream=io.StringIO()) == 0
    text = (tmp_path / "index.md").read_text()
    assert "2 experiments" in text and "EARLIER" not in text and text.count("| this run |") == 2
    # second run: x finishes, y is interrupted; y's folder still holds the first run's result
    runs["suite_dummy_y"] = "interrupt"
    log = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        toy_cli._run_all(exps, tmp_path, "tiny", 0, stream=log)
    text = (tmp_path / "index.md").read_text()
    assert "Run interrupted** after 1 of 2" in text
    row_x = next(ln for ln in text.splitlines() if ln.startswith("| [suite_dummy_x]"))
    row_y = next(ln for ln in text.splitlines() if ln.startswith("| [suite_dummy_y]"))
    assert "this run" in row_x and "EARLIER run (tiny, seed 0" in row_y
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("[suite 1/2,") and "elapsed" in lines[0] and lines[0].endswith("suite_dummy_x")
    assert lines[1].startswith("[suite 2/2,") and "left]" in lines[1]  # an estimate once there is a run


def _sigterm_run(args, cwd, wait_for):
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "toy_experiments", *args], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            if not line or wait_for in line:
                break
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return p.returncode, err


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    rc, err = _sigterm_run(["all", "--tiny", "--out", str(tmp_path)], tmp_path, "[autoencoder")
    assert rc == 143, err
    assert "Traceback" not in err
    assert "terminated (SIGTERM)" in err.strip().splitlines()[-1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    assert "Run interrupted" in (tmp_path / "index.md").read_text()


def test_runs_from_another_folder(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "toy_experiments", "list"], cwd="/tmp", env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "autoencoder"
    # a tiny run from a folder that is not the repository: nothing is read relative to the cwd
    out = subprocess.run([sys.executable, "-m", "toy_experiments", "run", "autoencoder", "--tiny"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "results" / "autoencoder" / "report.md").is_file()
