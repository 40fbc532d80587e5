"""Cheap toy experiments for the tests of seeds, workers and Dask.

They register themselves when this module is imported, as the real experiments do: a worker process (local
pool or Dask) gets an empty registry and imports the module an experiment's function lives in.  Tests
remove them again with :func:`unregister` so that no other test sees them.

``toy_dummy_a`` and ``toy_dummy_b`` compute with BLAS from the seed's random numbers (a result that depended
on anything but the seed and the thread count would show); at the quick level ``toy_dummy_a`` meets its
expectation on even seeds only, so that the aggregate verdict has something to aggregate.
"""

import os
import time

import numpy as np

from toy_experiments import framework as fw

NAMES = ("toy_dummy_a", "toy_dummy_b", "toy_dummy_slow", "toy_dummy_fail", "toy_dummy_runs")


def _figure(ctx, values):
    """A result file standing in for a figure (matplotlib would only make the workers slower to start)."""
    np.save(ctx.out_dir / "curve.npy", np.asarray(values))
    return "curve.npy"


def _run_a(ctx):
    n = ctx.pick(tiny=96, quick=128, full=256)
    ctx.setting(n=n, steps=30)
    x = ctx.rng.standard_normal((n, 40))
    y = x @ ctx.rng.standard_normal((40, 8)) + 0.1 * ctx.rng.standard_normal((n, 8))
    w = np.zeros((40, 8))
    losses = []
    for _ in range(30):  # least squares by gradient descent: many matrix products, each summing in BLAS
        r = x @ w - y
        losses.append(0.5 * float(np.mean(r * r)))
        w -= 0.05 * x.T @ r / n
    met, _ = ctx.judge({"loss_falls": losses[-1] < losses[0], "seed_is_even": ctx.seed % 2 == 0})
    metrics = {"loss": {"first": losses[0], "last": losses[-1], "curve": losses[::10]},
               "weight_norms": np.linalg.norm(w, axis=0)[:3], "steps": 30, "solver": "gradient descent",
               "odd_only": float("nan") if ctx.seed % 2 == 0 else 1.0 + ctx.seed}
    return fw.Outcome(metrics=metrics, table=fw.markdown_table([{"first": losses[0], "last": losses[-1]}]),
                      met=met, verdict=f"loss {losses[0]:.4f} -> {losses[-1]:.4f}", figures=[_figure(ctx, losses)])


def _run_b(ctx):
    a = ctx.rng.standard_normal((64, 64))
    g = a @ a.T / 64
    eig = np.linalg.eigvalsh(g)
    met, _ = ctx.judge({"positive": bool(eig.min() > -1e-9)})
    return fw.Outcome(metrics={"eig": {"min": eig.min(), "max": eig.max()}, "trace": float(np.trace(g))},
                      table="", met=met, verdict=f"largest eigenvalue {eig.max():.3f}")


def _run_slow(ctx):
    """Writes a file, then waits (for a signal to stop the run) up to a minute."""
    (ctx.out_dir / "partial.txt").write_text("a half-written result\n")
    ctx.progress(f"waiting in process {os.getpid()}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return fw.Outcome(metrics={}, table="", met=None, verdict="waited")


def _run_fail(ctx):
    if ctx.seed == 1:
        raise RuntimeError("dummy failure on seed 1")
    return fw.Outcome(metrics={"x": 1.0}, table="", met=True, verdict="fine")


def _run_runs(ctx):
    """Two independent runs through toy_experiments.runs: reports whether they ran in other processes."""
    from toy_experiments import runs

    out = runs.run_each(blas_run, [(ctx.seed, 128), (ctx.seed + 1, 128)])
    return fw.Outcome(metrics={"sums": [float(x.sum(dtype=np.float64)) for _, x, _ in out],
                               "pooled": any(pid != os.getpid() for _, _, pid in out)},
                      table="", met=None, verdict="ran")


_RUNS = {"toy_dummy_a": (_run_a, 901), "toy_dummy_b": (_run_b, 902), "toy_dummy_slow": (_run_slow, 903),
         "toy_dummy_fail": (_run_fail, 904), "toy_dummy_runs": (_run_runs, 905)}


def register():
    """Register the dummies (again, after :func:`unregister`); returns them in order."""
    for name, (run, order) in _RUNS.items():
        if name not in fw.EXPERIMENTS:
            fw.experiment(name, title=name.replace("_", " "), question="Does it run?", expected="it runs",
                          order=order)(run)
    return [fw.EXPERIMENTS[name] for name in NAMES]


def unregister():
    for name in NAMES:
        fw.EXPERIMENTS.pop(name, None)


register()


# What must not depend on where a run ran (its seconds, finishing time and environment may).
RESULT_KEYS = ("name", "level", "seed", "met", "verdict", "settings", "criteria", "metrics", "figures")
AGGREGATE_KEYS = ("name", "level", "seeds", "met", "seeds_met", "seeds_judged", "verdict", "settings", "metrics")


def results(root, names, seeds):
    """{(name, seed or "aggregate"): the parts of metrics.json that must not depend on where the run ran}."""
    import json
    from pathlib import Path

    out = {}
    for name in names:
        agg = json.loads((Path(root) / name / "metrics.json").read_text())
        out[name, "aggregate"] = {k: agg[k] for k in AGGREGATE_KEYS}
        out[name, "aggregate"]["per_seed"] = [{k: v for k, v in s.items() if k != "seconds"} for s in agg["per_seed"]]
        for seed in seeds:
            run = json.loads((Path(root) / name / f"seed-{seed}" / "metrics.json").read_text())
            out[name, seed] = {k: run[k] for k in RESULT_KEYS}
    return out


def blas_run(seed, n):
    """One independent run for tests/test_toy_runs.py: BLAS products of the seed's random numbers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    for _ in range(5):
        x = np.tanh(x @ rng.standard_normal((64, 64)).astype(np.float32) / 8)
    return seed, x, os.getpid()


def failing_run(seed):
    """Run 1 fails at once; the others would take 30 s (unless the pool is stopped)."""
    if seed == 1:
        raise ValueError(f"run {seed} failed")
    time.sleep(30)
    return seed


def burn(seconds):
    """Busy for ``seconds`` of CPU time (tests/test_toy_runs.py counts it from the parent)."""
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        pass
    return seconds
