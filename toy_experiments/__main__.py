"""Command line of the toy experiment suite (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")  # figures are written to files; no display needed
# The networks here are small: multi-threaded BLAS gains little on their matrices and loses several times
# over when other processes share the cores.  One thread unless the caller chose otherwise.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from . import load_all  # noqa: E402
from .framework import run_experiment, suite_estimate, write_index, _duration  # noqa: E402


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same clean-up runs
    (the staging folder of the running experiment is removed, the index says the run was interrupted)."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    """Run the command line; Ctrl-C (status 130), SIGTERM (status 143) and a file system error such as an
    output folder that cannot be written (status 1) end in one line instead of a traceback."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (main() called from a worker thread): leave signals alone
        previous = None
    try:
        return _run(argv)
    except KeyboardInterrupt as e:
        what, status = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"python -m toy_experiments: {what} (finished experiments are kept; the interrupted one "
              "left nothing)", file=sys.stderr)
        return status
    except OSError as e:
        if e.filename is None:
            raise
        print(f"python -m toy_experiments: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv) -> int:
    exps = load_all()
    ordered = sorted(exps.values(), key=lambda e: (e.order, e.name))
    ap = argparse.ArgumentParser(prog="python -m toy_experiments", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    for cmd in ("run", "all"):
        p = sub.add_parser(cmd, help="run one experiment" if cmd == "run" else "run every experiment")
        if cmd == "run":
            p.add_argument("name", choices=[e.name for e in ordered])
        p.add_argument("--quick", action="store_true", help="small, fast settings (minutes for the suite)")
        p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke-test level
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=None,
                       help="output folder (run: the experiment's folder; all: the root, default results/)")
    args = ap.parse_args(argv)
    if args.command == "list":
        for e in ordered:
            print(f"{e.name:<16} {e.title}")
        return 0
    level = "tiny" if args.tiny else ("quick" if args.quick else "full")
    if args.command == "run":
        run_experiment(args.name, level=level, seed=args.seed, out=args.out)
        return 0
    root = Path(args.out or "results")
    return _run_all(ordered, root, level, args.seed)


def _run_all(ordered, root: Path, level: str, seed: int, stream=None) -> int:
    """Every experiment in turn, with a suite progress line before each one.

    index.md is rewritten (atomically) before the first experiment and after each one, so at every moment
    it describes this run: which experiments it finished, and which folders still hold an earlier run's
    result.  An interrupted run (Ctrl-C, SIGTERM, an error) marks it interrupted; a killed one leaves it
    saying "in progress" with the process id."""
    stream = stream if stream is not None else sys.stderr
    names = [e.name for e in ordered]
    index = root / "index.md"
    root.mkdir(parents=True, exist_ok=True)
    summaries: list[dict] = []
    write_index(summaries, index, planned=names, status="running")
    t0 = time.perf_counter()
    try:
        for i, e in enumerate(ordered):
            elapsed = time.perf_counter() - t0
            left = suite_estimate([s["seconds"] for s in summaries], names[i:], root, level)
            eta = f"about {_duration(left)} left" if left is not None else "no estimate yet"
            print(f"[suite {i + 1}/{len(ordered)}, {_duration(elapsed)} elapsed, {eta}] {e.name}",
                  file=stream, flush=True)
            summaries.append(run_experiment(e.name, level=level, seed=seed, results_root=root))
            write_index(summaries, index, planned=names, status="running")
    except BaseException:
        try:
            write_index(summaries, index, planned=names, status="interrupted")
        except OSError:
            pass  # the original error is the one to report
        raise
    write_index(summaries, index, planned=names, status="complete")
    print(f"{len(summaries)} experiments in {time.perf_counter() - t0:.1f}s; index: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
