"""Several seeds and worker processes: per-seed folders and their aggregate (mean ± std, per-seed verdicts,
one stated rule), the one-seed layout unchanged, a process pool giving the sequential run's numbers, and
interrupted or failed runs that leave no partial folder."""

import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import toy_dummies
from toy_experiments import framework as fw
from toy_experiments import seeds as sd
from toy_experiments.parallel import run_suite

toy_dummies.unregister()  # registered only while a test uses the fixture (workers import the module anew)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dummies():
    exps = toy_dummies.register()
    yield {e.name: e for e in exps}
    toy_dummies.unregister()


def _hidden(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".")]


# --- aggregation, without running anything ----------------------------------------------------------------

def test_metrics_aggregate_leafwise_with_sample_std():
    per_seed = [
        {"acc": 0.5, "probe": {"shape": [1, 2], "ok": True, "label": "p"}, "phi": None, "only_first": 5.0},
        {"acc": 0.75, "probe": {"shape": [3, 5], "ok": False, "label": "q"}, "phi": 4.0},
        {"acc": 1.0, "probe": {"shape": [2, 2], "ok": True, "label": "p"}, "phi": 6.5},
    ]
    agg = sd.aggregate_metrics(per_seed)
    assert agg["acc"] == {"mean": 0.75, "std": statistics.stdev([0.5, 0.75, 1.0]), "n": 3}
    assert agg["probe"]["shape"][0] == {"mean": 2.0, "std": 1.0, "n": 3}
    assert agg["probe"]["shape"][1]["mean"] == 3.0
    assert agg["probe"]["shape"][1]["std"] == pytest.approx(statistics.stdev([2, 5, 2]), rel=1e-15)
    # not numbers: listed per seed, never averaged
    assert agg["probe"]["ok"] == {"per_seed": [True, False, True]}
    assert agg["probe"]["label"] == {"per_seed": ["p", "q", "p"]}
    # NaN (null in metrics.json) on one seed: left out, n says over how many seeds
    assert agg["phi"] == {"mean": 5.25, "std": statistics.stdev([4.0, 6.5]), "n": 2}
    # present on one seed only: its value, and no std (ddof = 1 needs two)
    assert agg["only_first"] == {"mean": 5.0, "std": None, "n": 1}


def test_verdict_rule_met_only_when_met_on_every_seed():
    ok = {"seed": 0, "met": True, "criteria": {"a": True, "b": True}}
    bad = {"seed": 4, "met": False, "criteria": {"a": True, "b": False}}
    assert sd.aggregate_verdict([ok, dict(ok, seed=1)])[:3] == (True, 2, 2)
    met, k, n, sentence = sd.aggregate_verdict([ok, bad, dict(ok, seed=7)])
    assert (met, k, n) == (False, 2, 3)
    assert "2 of 3 seeds" in sentence and "seed 4 (failed: b)" in sentence
    assert sd.aggregate_verdict([dict(ok, met=None), dict(bad, met=None)])[:3] == (None, 0, 0)  # tiny runs
    assert "every seed" in sd.RULE


# --- layout, report, index ---------------------------------------------------------------------------------

def test_one_seed_keeps_the_one_folder_layout(tmp_path, dummies, capsys):
    from toy_experiments.__main__ import main

    assert main(["run", "toy_dummy_a", "--tiny", "--seeds", "3", "--out", str(tmp_path / "seeds")]) == 0
    assert main(["run", "toy_dummy_a", "--tiny", "--seed", "3", "--out", str(tmp_path / "seed")]) == 0
    files = sorted(p.name for p in (tmp_path / "seeds").iterdir())
    assert files == ["curve.npy", "metrics.json", "report.md"]
    assert files == sorted(p.name for p in (tmp_path / "seed").iterdir())
    one, other = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("seeds", "seed"))
    assert one["seed"] == 3 and one["metrics"] == other["metrics"]
    assert one["criteria"] == {"loss_falls": True, "seed_is_even": False}  # what ctx.judge was given


def test_several_seeds_folders_report_and_index(tmp_path, dummies):
    from toy_experiments.__main__ import _run_all

    exps = [dummies["toy_dummy_a"], dummies["toy_dummy_b"]]
    log = io.StringIO()
    assert _run_all(exps, tmp_path, "quick", [0, 1], stream=log) == 0
    a = tmp_path / "toy_dummy_a"
    assert sorted(p.name for p in a.iterdir()) == ["metrics.json", "report.md", "seed-0", "seed-1"]
    assert sorted(p.name for p in (a / "seed-1").iterdir()) == ["curve.npy", "metrics.json", "report.md"]
    assert _hidden(tmp_path) == []
    runs = [json.loads((a / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1)]
    agg = json.loads((a / "metrics.json").read_text())
    assert agg["seeds"] == [0, 1] and agg["rule"] == sd.RULE
    # seed 1 of toy_dummy_a fails its criterion seed_is_even: not met in aggregate, 1 of 2
    assert (agg["met"], agg["seeds_met"], agg["seeds_judged"]) == (False, 1, 2)
    per_seed = [(s["seed"], s["met"], s["failed"]) for s in agg["per_seed"]]
    assert per_seed == [(0, True, []), (1, False, ["seed_is_even"])]
    firsts = [r["metrics"]["loss"]["first"] for r in runs]
    assert agg["metrics"]["loss"]["first"]["mean"] == pytest.approx(statistics.mean(firsts), rel=1e-15)
    assert agg["metrics"]["loss"]["first"]["std"] == pytest.approx(statistics.stdev(firsts), rel=1e-12)
    assert agg["metrics"]["solver"] == {"per_seed": ["gradient descent", "gradient descent"]}
    report = (a / "report.md").read_text()
    assert "(2 seeds)" in report and "ddof = 1" in report and sd.RULE in report
    assert "Met on 1 of 2 seeds" in report and "seed_is_even" in report
    assert f"| `loss/first` | {statistics.mean(firsts):.4g} ± {statistics.stdev(firsts):.4g} |" in report
    assert "[seed-0/report.md](seed-0/report.md)" in report
    index = (tmp_path / "index.md").read_text()
    rows = [ln for ln in index.splitlines() if ln.startswith("| [")]
    assert len(rows) == 2 and "NOT met (1/2 seeds met)" in rows[0] and "met (2/2 seeds met)" in rows[1]
    lines = [ln for ln in log.getvalue().splitlines() if ln.startswith("[suite")]
    assert [ln.split(",")[0] for ln in lines] == [f"[suite {k}/4" for k in range(1, 5)]
    assert all("elapsed" in ln for ln in lines)
    assert lines[0].endswith("toy_dummy_a (seed 0)") and lines[3].endswith("toy_dummy_b (seed 1)")
    # the next run's index and estimate read the aggregate as one experiment over two seeds
    fw.write_index([], tmp_path / "index.md", planned=["toy_dummy_a"], status="interrupted")
    assert "EARLIER run (quick, seeds 0,1," in (tmp_path / "index.md").read_text()
    assert fw.suite_estimate([], ["toy_dummy_a"], tmp_path, "quick") == pytest.approx(agg["seconds"] / 2)


def test_a_failing_seed_leaves_no_partial_folder(tmp_path, dummies):
    exps = [dummies["toy_dummy_b"], dummies["toy_dummy_fail"]]
    with pytest.raises(RuntimeError, match="dummy failure on seed 1"):
        run_suite(exps, level="tiny", seeds=[0, 1], dests={e.name: tmp_path / e.name for e in exps},
                  index=tmp_path / "index.md", stream=io.StringIO())
    # toy_dummy_b finished and is kept; toy_dummy_fail's seed 0 was done but its folder is never half there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.md", "toy_dummy_b"]
    assert "Run interrupted** after 1 of 2" in (tmp_path / "index.md").read_text()


# --- worker processes --------------------------------------------------------------------------------------

def test_workers_give_the_numbers_of_the_sequential_run(tmp_path, dummies):
    exps = [dummies["toy_dummy_a"], dummies["toy_dummy_b"]]
    names, seeds = [e.name for e in exps], [0, 1]
    log = io.StringIO()
    for where, workers in (("sequential", None), ("pool", 2)):
        run_suite(exps, level="tiny", seeds=seeds, dests={e.name: tmp_path / where / e.name for e in exps},
                  workers=workers, stream=log if workers else io.StringIO())
    sequential = toy_dummies.results(tmp_path / "sequential", names, seeds)
    pooled = toy_dummies.results(tmp_path / "pool", names, seeds)
    assert pooled == sequential
    assert sequential["toy_dummy_a", 1]["seed"] == 1 and sequential["toy_dummy_a", 1]["metrics"]["odd_only"] == 2.0
    lines = log.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == [f"[suite {k}/4 finished" for k in range(1, 5)]
    assert all("elapsed" in ln and ("left]" in ln or "no estimate" in ln) and "2 worker processes" in ln
               for ln in lines)
    # the workers' BLAS: this process's thread variables, in force when numpy loaded there
    threads = os.environ["OPENBLAS_NUM_THREADS"]
    for seed in seeds:
        run = tmp_path / "pool" / "toy_dummy_a" / f"seed-{seed}" / "metrics.json"
        env = json.loads(run.read_text())["environment"]
        assert env["blas_threads"]["OPENBLAS_NUM_THREADS"] == threads
        if env["threadpools"] is not None:  # threadpoolctl installed: the thread count numpy's BLAS really uses
            assert {p["num_threads"] for p in env["threadpools"] if p["internal_api"] == "openblas"} == {int(threads)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_sigterm_stops_the_workers_and_leaves_nothing(tmp_path):
    driver = ("import sys; from tests import toy_dummies; from toy_experiments.__main__ import main; "
              "sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "slow"
    p = subprocess.Popen([sys.executable, "-c", driver, "run", "toy_dummy_slow", "--tiny", "--seeds", "0,1",
                          "--workers", "2", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    pids = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:  # both seeds are running in their workers
            line = p.stderr.readline()
            if not line:
                break
            if "waiting in process" in line:
                pids.append(int(line.split()[-1]))
        assert len(pids) == 2, "the workers did not start"
        assert set(pids).isdisjoint({p.pid}) and len(set(pids)) == 2
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 143, err
    assert "Traceback" not in err and "terminated (SIGTERM)" in err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # no staging folder, no half result
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "a worker outlived the run"


# --- the command line --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--seed", "1", "--seeds", "0,1"], "not allowed with argument"),
    (["--seeds", "0,0"], "distinct"),
    (["--seeds", "0,x"], "comma-separated integers"),
    (["--workers", "0"], "positive integer"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"], "not allowed with argument"),
])
def test_usage_errors(args, message, dummies, capsys, tmp_path):
    from toy_experiments.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["run", "toy_dummy_b", "--tiny", "--out", str(tmp_path / "x"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_independent_runs_use_the_cores_in_process_and_not_inside_a_pool(dummies, tmp_path):
    """An experiment's independent runs (toy_experiments/runs.py) go to a pool of their own when the job runs
    in the command's process, and stay in the job's process inside a --workers pool, whose cores are taken;
    the numbers are the same either way."""
    exp = dummies["toy_dummy_runs"]
    got = {}
    for where, workers in (("here", None), ("pool", 2)):
        run_suite([exp], level="tiny", seeds=[0], dests={exp.name: tmp_path / where}, workers=workers,
                  stream=io.StringIO())
        got[where] = json.loads((tmp_path / where / "metrics.json").read_text())["metrics"]
    assert got["here"]["pooled"] is ((os.cpu_count() or 1) > 1)
    assert got["pool"]["pooled"] is False
    assert got["here"]["sums"] == got["pool"]["sums"]
