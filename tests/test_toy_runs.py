"""toy_experiments/runs.py: independent runs of one experiment in a process pool give the numbers of the
runs one after another, in order; a failing run stops the pool; the MAE experiment's results do not depend
on how many processes trained its models."""

import json
import multiprocessing

import numpy as np
import pytest

from tests import toy_dummies
import toy_experiments.exp_10_mae  # noqa: F401  (registers "mae")
from toy_experiments import runs
from toy_experiments.framework import run_experiment


def test_pool_gives_the_sequential_results_in_order():
    calls = [(s, 200 + 50 * s) for s in range(5)]
    seen = []
    with runs.workers(1):
        alone = runs.run_each(toy_dummies.blas_run, calls)
    with runs.workers(2):
        pooled = runs.run_each(toy_dummies.blas_run, calls, done=lambda i, r: seen.append(i))
    assert [r[0] for r in pooled] == list(range(5)) and sorted(seen) == list(range(5))
    for (_, a, pid_a), (_, b, pid_b) in zip(alone, pooled):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)
    assert {r[2] for r in alone} == {__import__("os").getpid()}  # workers(1): in this process
    assert __import__("os").getpid() not in {r[2] for r in pooled}  # workers(2): elsewhere


def test_a_failing_run_raises_here_and_stops_the_others():
    """Run 1 fails while run 0 has 30 s to go: the error is raised here at once and no worker is left
    running (other tests' child processes, a Dask cluster's or a pool still shutting down, are not ours)."""
    import time

    before = set(multiprocessing.active_children())
    t0 = time.monotonic()
    with runs.workers(2), pytest.raises(ValueError, match="run 1 failed"):
        runs.run_each(toy_dummies.failing_run, [(0,), (1,), (2,), (3,)])
    assert time.monotonic() - t0 < 20
    deadline = time.monotonic() + 5
    while not set(multiprocessing.active_children()) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(multiprocessing.active_children()) <= before


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items()
                if "seconds" not in k and k not in ("finished", "environment")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_mae_results_do_not_depend_on_the_number_of_processes(tmp_path):
    out = {}
    for n in (1, 2):
        with runs.workers(n):
            run_experiment("mae", level="tiny", seed=0, out=tmp_path / str(n))
        out[n] = _without_timings(json.loads((tmp_path / str(n) / "metrics.json").read_text()))
    assert out[1]["metrics"]["runs"]["r=0.25"]["losses"]  # the comparison below compares something
    assert out[1] == out[2]


@pytest.mark.skipif(runs.resource is None, reason="no resource module (Windows): children's CPU time is not counted")
def test_cpu_seconds_count_the_runs_done_in_the_pool():
    import time

    c0, p0 = runs.cpu_seconds(), time.process_time()
    with runs.workers(2):
        runs.run_each(toy_dummies.burn, [(0.4,), (0.4,)])
    assert runs.cpu_seconds() - c0 >= 0.75  # the two runs' CPU time, spent in the workers
    assert time.process_time() - p0 < 0.4  # not in this process
