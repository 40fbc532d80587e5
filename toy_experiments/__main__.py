"""Command line of the toy experiment suite (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")  # figures are written to files; no display needed
# The BLAS threads were pinned by the package's __init__, which Python imports before this module.

from refssl.runtime import keep_freed_memory  # noqa: E402

from . import load_all  # noqa: E402
from .framework import run_experiment  # noqa: E402
from .parallel import SchedulerUnavailable, require_distributed, run_suite  # noqa: E402


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same clean-up runs
    (the staging folder of the running experiment is removed, the index says the run was interrupted)."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    """Run the command line; Ctrl-C (status 130), SIGTERM (status 143), a file system error such as an
    output folder that cannot be written (status 1) and a Dask scheduler that is not installed or cannot be
    reached (status 2) end in one line instead of a traceback."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (main() called from a worker thread): leave signals alone
        previous = None
    keep_freed_memory()  # speed only (refssl/runtime.py): this process runs experiments and nothing else
    try:
        return _run(argv)
    except KeyboardInterrupt as e:
        what, status = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"python -m toy_experiments: {what} (finished experiments are kept; unfinished ones left "
              "nothing)", file=sys.stderr)
        return status
    except SchedulerUnavailable as e:
        print(f"python -m toy_experiments: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        print(f"python -m toy_experiments: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


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
        seed_group = p.add_mutually_exclusive_group()
        seed_group.add_argument("--seed", type=int, default=None, help="the seed (default 0)")
        seed_group.add_argument("--seeds", type=_seed_list, default=None, metavar="S,S,...",
                           help="run once per seed: NAME/seed-K/ holds each seed's result, NAME/report.md and "
                                "metrics.json the mean ± std over the seeds and the per-seed verdicts")
        where = p.add_mutually_exclusive_group()
        where.add_argument("--workers", type=_positive, default=None, metavar="N",
                           help="run the (experiment, seed) runs in N worker processes (default: one after "
                                "the other in this process); the results are the same")
        where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                           help="run them on a Dask distributed cluster (e.g. tcp://127.0.0.1:8786); needs "
                                "'dask[distributed]'; the results come back here and are written here")
        p.add_argument("--out", default=None,
                       help="output folder (run: the experiment's folder; all: the root, default results/)")
    args = ap.parse_args(argv)
    if args.command == "list":
        for e in ordered:
            print(f"{e.name:<16} {e.title}")
        return 0
    if args.scheduler is not None:
        require_distributed()  # before anything is written
    level = "tiny" if args.tiny else ("quick" if args.quick else "full")
    seeds = args.seeds if args.seeds is not None else [args.seed if args.seed is not None else 0]
    if args.command == "run":
        exp = exps[args.name]
        dest = Path(args.out) if args.out is not None else Path("results") / exp.name
        if len(seeds) == 1 and args.workers in (None, 1) and args.scheduler is None:
            run_experiment(exp.name, level=level, seed=seeds[0], out=dest)  # what run_suite would do, directly
            return 0
        run_suite([exp], level=level, seeds=seeds, dests={exp.name: dest}, workers=args.workers,
                  scheduler=args.scheduler)
        return 0
    root = Path(args.out or "results")
    return _run_all(ordered, root, level, seeds, workers=args.workers, scheduler=args.scheduler)


def _run_all(ordered, root: Path, level: str, seeds, stream=None, *, workers=None, scheduler=None) -> int:
    """Every experiment at every seed (``seeds``: one int or a list), with suite progress lines.

    index.md is rewritten (atomically) before the first run and after each experiment, so at every moment
    it describes this run: which experiments it finished, and which folders still hold an earlier run's
    result.  An interrupted run (Ctrl-C, SIGTERM, an error) marks it interrupted; a killed one leaves it
    saying "in progress" with the process id."""
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    root.mkdir(parents=True, exist_ok=True)
    index = root / "index.md"
    t0 = time.perf_counter()
    summaries = run_suite(ordered, level=level, seeds=seeds, dests={e.name: root / e.name for e in ordered},
                          workers=workers, scheduler=scheduler, index=index, stream=stream)
    runs = f" x {len(seeds)} seeds" if len(seeds) > 1 else ""
    print(f"{len(summaries)} experiments{runs} in {time.perf_counter() - t0:.1f}s; index: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
