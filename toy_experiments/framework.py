"""Experiment registry, run context and atomic result writing for the toy experiment suite.

An experiment is a function ``run(ctx) -> Outcome`` registered with
:func:`experiment`.  It states its question and its expected outcome up front;
the :class:`Outcome` it returns holds the measured metrics, a markdown table,
and whether the measured numbers meet the expectation (with the reason, from
the numbers).  :func:`run_experiment` writes ``metrics.json``, ``report.md``
and the figures to a staging folder next to the destination and renames it
into place only when everything is written, so an interrupted run never leaves
partial results.

Replacing an earlier result takes two renames (the old folder to a hidden
``.NAME.old-PID``, then the staging folder to ``NAME``).  A run killed between
them leaves no ``NAME``; the next run of that experiment finds the
``.NAME.old-PID`` of the dead process and renames it back before it starts
(the interrupted run's result is lost, the previous one is intact).  Leftover
``.NAME.old-PID`` folders next to an existing ``NAME`` and staging folders
``.NAME.tmp-PID-...`` of dead processes are deleted; those of running
processes are left alone (:func:`refssl.nn.io.recover_dir`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from refssl.nn.io import recover_dir, replace_dir

__all__ = ["Experiment", "Outcome", "Context", "experiment", "EXPERIMENTS", "run_experiment", "run_in_folder",
           "make_staging", "write_index", "LEVELS", "markdown_table", "runtime_info", "suite_estimate"]

LEVELS = ("tiny", "quick", "full")  # tiny: smoke test of the code path; quick: minutes; full: the real run


@dataclass
class Outcome:
    """What an experiment measured and whether that meets its stated expectation."""

    metrics: dict
    table: str
    met: bool | None  # None: the run was too small to judge (tiny level)
    verdict: str  # one or two sentences, citing the numbers
    figures: list[str] = field(default_factory=list)
    notes: str = ""


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    question: str
    expected: str
    run: Callable[["Context"], Outcome]
    order: int = 100


EXPERIMENTS: dict[str, Experiment] = {}


def experiment(name: str, *, title: str, question: str, expected: str, order: int = 100):
    """Decorator registering ``run(ctx) -> Outcome`` as a toy experiment."""

    def wrap(fn):
        if name in EXPERIMENTS:
            raise ValueError(f"experiment {name!r} registered twice")
        EXPERIMENTS[name] = Experiment(name, title, question, expected, fn, order)
        return fn

    return wrap


class Context:
    """What a running experiment gets: its level, seed, output folder and a progress reporter.

    ``label`` starts its progress lines (default: the name; a run among several seeds adds its seed)."""

    def __init__(self, name: str, level: str, seed: int, out_dir: Path, stream=None, *, label: str | None = None):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self.name, self.level, self.seed, self.out_dir = name, level, seed, Path(out_dir)
        self.label = label or name
        self.rng = np.random.default_rng(seed)
        self.stream = stream if stream is not None else sys.stderr
        self.settings: dict = {}
        self.criteria: dict = {}  # name -> bool, every criterion judged (see judge); kept in metrics.json
        self._t0 = time.perf_counter()

    def pick(self, tiny, quick, full):
        """The value of a size parameter for this run's level (recorded in the report's setting)."""
        return {"tiny": tiny, "quick": quick, "full": full}[self.level]

    def setting(self, **values):
        """Record parameters of the run for the report; returns them for convenience."""
        self.settings.update(values)
        return values

    def progress(self, message: str) -> None:
        elapsed = time.perf_counter() - self._t0
        # one write per line: workers running side by side share the stream
        self.stream.write(f"[{self.label} {elapsed:6.1f}s] {message}\n")
        self.stream.flush()

    def judge(self, checks: dict) -> tuple[bool | None, list[str]]:
        """``(met, failed)`` for named criteria: met is ``all(checks)``, or None at the tiny level (a smoke
        test is too small to judge); ``failed`` lists the names of the criteria that do not hold."""
        failed = [name for name, ok in checks.items() if not ok]
        self.criteria.update({name: bool(ok) for name, ok in checks.items()})
        return (None if self.level == "tiny" else not failed), failed

    def figure_path(self, filename: str) -> Path:
        return self.out_dir / filename

    def save_figure(self, fig, filename: str) -> str:
        """Save a matplotlib figure into the run folder and close it; returns the file name."""
        import matplotlib.pyplot as plt

        fig.savefig(self.out_dir / filename, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return filename


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".3f") -> str:
    """Rows of dicts as a markdown table."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "nan" if not math.isfinite(float(v)) else format(float(v), floatfmt)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                         "NUMEXPR_NUM_THREADS")


def runtime_info() -> dict:
    """What the numbers of a run depend on besides seed and level: the BLAS thread count (results change in
    the last digits between 1 and 2 threads: summation order), and the numpy / refssl / Python versions.

    ``blas_threads`` holds the thread variables as set (None: unset) and, when threadpoolctl happens to be
    importable (it is not a dependency), the thread pools it sees: ``threadpools``."""
    import platform

    import refssl

    info = {
        "blas_threads": {v: os.environ.get(v) for v in BLAS_THREAD_VARIABLES},
        "numpy": np.__version__,
        "refssl": getattr(refssl, "__version__", "unknown"),
        "python": platform.python_version(),
    }
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        info["threadpools"] = None  # threadpoolctl not installed: the variables are all we know
    else:
        pools = [{k: d.get(k) for k in ("user_api", "internal_api", "num_threads", "version")}
                 for d in threadpool_info()]
        # in a fixed order, not the order the libraries happened to load in: runs compare equal
        info["threadpools"] = sorted(pools, key=lambda d: tuple(str(v) for v in d.values()))
    return info


def _runtime_line(info: dict) -> str:
    threads = ", ".join(f"{k}={v}" for k, v in info["blas_threads"].items() if v is not None) or "none set"
    pools = info.get("threadpools")
    if pools is None:
        seen = "threadpoolctl not installed"
    else:
        seen = "; ".join(f"{p['internal_api']} {p['num_threads']} thread(s)" for p in pools) or "no BLAS pool"
    return (f"**Environment.** BLAS thread variables: {threads} (threadpoolctl: {seen}); numpy {info['numpy']}, "
            f"refssl {info['refssl']}, Python {info['python']}. The last digits of the numbers depend on the "
            f"BLAS thread count; the verdicts do not.")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def _verdict_word(met) -> str:
    return {True: "met", False: "NOT met", None: "not judged (tiny run)"}[met]


def _report(exp: Experiment, ctx: Context, out: Outcome, seconds: float, info: dict | None = None) -> str:
    setting = ", ".join(f"{k} = {v}" for k, v in ctx.settings.items()) or "(defaults)"
    parts = [
        f"# {exp.title}",
        "",
        f"**Question.** {exp.question}",
        "",
        f"**Expected outcome (stated before running).** {exp.expected}",
        "",
        f"**Setting.** level `{ctx.level}`, seed {ctx.seed}; {setting}. Wall time {seconds:.1f} s.",
        "",
        _runtime_line(info if info is not None else runtime_info()),
        "",
        "## Measured",
        "",
        out.table,
        "",
        f"**Outcome: expectation {_verdict_word(out.met)}.** {out.verdict}",
    ]
    if out.notes:
        parts += ["", out.notes]
    if out.figures:
        parts += ["", "## Figures", ""] + [f"![{f}]({f})" for f in out.figures]
    return "\n".join(parts) + "\n"


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


def run_in_folder(exp: Experiment, *, level: str, seed: int, folder: str | Path, stream=None,
                  shown_as: str | None = None, label: str | None = None) -> tuple[dict, Context]:
    """Run ``exp`` with its figures, ``metrics.json`` and ``report.md`` written into ``folder`` (an existing,
    empty folder: a staging folder, never the destination itself); returns ``(summary, ctx)``.

    The summary is what metrics.json holds (numbers not yet made JSON-friendly).  ``shown_as`` names where
    the result will end up, for the progress line; ``label`` starts the progress lines (see Context)."""
    folder = Path(folder)
    ctx = Context(exp.name, level, seed, folder, stream=stream, label=label)
    ctx.progress(f"start ({level}, seed {seed})")
    t0 = time.perf_counter()
    outcome = exp.run(ctx)
    seconds = time.perf_counter() - t0
    info = runtime_info()
    for f in outcome.figures:
        if not (folder / f).is_file():
            raise RuntimeError(f"experiment {exp.name} reported figure {f} but did not write it")
    summary = {
        "name": exp.name, "title": exp.title, "level": level, "seed": seed, "seconds": round(seconds, 2),
        "expected": exp.expected, "met": outcome.met, "verdict": outcome.verdict,
        "settings": ctx.settings, "criteria": ctx.criteria, "metrics": outcome.metrics,
        "figures": outcome.figures, "environment": info, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (folder / "metrics.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    (folder / "report.md").write_text(_report(exp, ctx, outcome, seconds, info))
    if shown_as is not None:
        ctx.progress(f"done in {seconds:.1f}s: expectation {_verdict_word(outcome.met)} -> {shown_as}")
    return summary, ctx


def make_staging(dest: str | Path) -> Path:
    """A fresh staging folder ``.NAME.tmp-PID-...`` beside ``dest``, with the mode mkdir would give, after
    undoing what killed earlier writers of ``dest`` left (see the module docstring)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging_prefix = f".{dest.name}.tmp-"
    recover_dir(dest, staging_prefix)
    staging = Path(tempfile.mkdtemp(prefix=f"{staging_prefix}{os.getpid()}-", dir=dest.parent))
    try:
        # mkdtemp makes the folder 0700 (private scratch space); a result folder is shared like any other
        # folder the user creates, so give it the mode mkdir would: 0777 minus the umask.
        staging.chmod(0o777 & ~_umask())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def run_experiment(name: str, *, level: str = "full", seed: int = 0, out: str | Path | None = None,
                   results_root: str | Path = "results", stream=None) -> dict:
    """Run one experiment and write its folder atomically; returns a summary dict."""
    exp = EXPERIMENTS[name]
    dest = Path(out) if out is not None else Path(results_root) / name
    staging = make_staging(dest)
    try:
        summary, ctx = run_in_folder(exp, level=level, seed=seed, folder=staging, stream=stream)
        replace_dir(staging, dest)
        ctx.progress(f"done in {summary['seconds']:.1f}s: expectation {_verdict_word(summary['met'])} -> {dest}")
        summary["path"] = str(dest)
        return summary
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _earlier_result(folder: Path) -> dict | None:
    """The summary a previous run left in ``folder`` (its metrics.json), or None."""
    try:
        return json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def suite_estimate(done_seconds: list[float], remaining: list[str], root: str | Path, level: str) -> float | None:
    """Seconds the ``remaining`` runs of a suite will take, or None when there is nothing to go on.

    ``remaining`` names the experiment of each run still to do (once per seed when there are several).

    The experiments differ tenfold in cost, so each remaining one is estimated by its own last run at this
    level (its metrics.json under ``root``) when there is one, else by the mean of those done in this run."""
    mean = sum(done_seconds) / len(done_seconds) if done_seconds else None
    total = 0.0
    for name in remaining:
        prev = _earlier_result(Path(root) / name)
        if prev is not None and prev.get("level") == level and isinstance(prev.get("seconds"), (int, float)):
            # a result over several seeds records the seconds of all of them; a remaining entry is one run
            total += float(prev["seconds"]) / max(1, len(prev.get("seeds") or [None]))
        elif mean is not None:
            total += mean
        else:
            return None
    return total


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _index_verdict(summary: dict) -> str:
    """The expectation column of the index: the verdict, and for a run over several seeds how many met it."""
    word = _verdict_word(summary.get("met"))
    seeds = summary.get("seeds")
    if isinstance(seeds, list) and len(seeds) > 1 and summary.get("seeds_judged"):
        word += f" ({summary.get('seeds_met')}/{summary['seeds_judged']} seeds met)"
    return word


def _seeds_text(summary: dict) -> str:
    seeds = summary.get("seeds")
    if isinstance(seeds, list) and len(seeds) > 1:
        return "seeds " + ",".join(str(s) for s in seeds)
    return f"seed {summary.get('seed')}"


def write_index(summaries: list[dict], path: str | Path, *, planned: list[str] | None = None,
                status: str = "complete") -> None:
    """Index report of a suite run (written atomically: a reader sees the old or the new index, never half).

    A summary over several seeds (:func:`toy_experiments.seeds.write_aggregate`) is one row, its expectation
    column saying on how many seeds the expectation was met.

    ``planned``: the names the run set out to do; those not in ``summaries`` are listed as well, with what
    their folder holds: the result of an earlier run (level, seed, when it finished) or nothing.  ``status``:
    ``complete``, ``running`` (written after every experiment, so a run killed outright leaves an index that
    says how far it got) or ``interrupted``."""
    if status not in ("complete", "running", "interrupted"):
        raise ValueError(f"status must be complete, running or interrupted, got {status!r}")
    path = Path(path)
    rows = [{"experiment": f"[{s['name']}]({Path(s['path']).name}/report.md)", "title": s["title"],
             "expectation": _index_verdict(s), "seconds": s["seconds"], "from": "this run"}
            for s in summaries]
    done = {s["name"] for s in summaries}
    earlier = []
    for name in planned or []:
        if name in done:
            continue
        prev = _earlier_result(path.parent / name)
        if prev is None:
            rows.append({"experiment": name, "title": EXPERIMENTS[name].title if name in EXPERIMENTS else "",
                         "expectation": "not run", "seconds": "", "from": "-"})
        else:
            earlier.append(name)
            rows.append({"experiment": f"[{name}]({name}/report.md)", "title": prev.get("title", ""),
                         "expectation": _index_verdict(prev), "seconds": prev.get("seconds", ""),
                         "from": f"EARLIER run ({prev.get('level')}, {_seeds_text(prev)}, "
                                 f"finished {prev.get('finished', 'at an unknown time')})"})
    met = sum(1 for s in summaries if s["met"] is True)
    judged = sum(1 for s in summaries if s["met"] is not None)
    n_planned = len(planned) if planned else len(summaries)
    head = {
        "complete": f"{len(summaries)} experiments",
        "running": f"**Run in progress** (process {os.getpid()}, updated {time.strftime('%Y-%m-%d %H:%M:%S')}): "
                   f"{len(summaries)} of {n_planned} experiments done. If that process is gone, the run was "
                   f"killed and the rows not marked 'this run' are not from it",
        "interrupted": f"**Run interrupted** after {len(summaries)} of {n_planned} experiments; only the rows "
                       f"marked 'this run' are from it",
    }[status]
    lines = [
        "# Toy experiment suite",
        "",
        f"{head}; expectation met in {met} of {judged} judged runs of this run; "
        f"total {sum(s['seconds'] for s in summaries):.1f} s.",
        "",
    ]
    if earlier:
        lines += [f"Folders from an earlier run, not this one: {', '.join(earlier)}.", ""]
    lines += [markdown_table(rows, floatfmt=".1f"), ""]
    lines += [f"- **{s['name']}**: {s['verdict']}" for s in summaries]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
