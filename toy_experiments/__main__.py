"""Command line of the toy experiment suite (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")  # figures are written to files; no display needed
# The networks here are small: multi-threaded BLAS gains little on their matrices and loses several times
# over when other processes share the cores.  One thread unless the caller chose otherwise.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from . import load_all  # noqa: E402
from .framework import run_experiment, write_index  # noqa: E402


def main(argv=None) -> int:
    """Run the command line; Ctrl-C (status 130) and a file system error such as an output folder that
    cannot be written (status 1) end in one line instead of a traceback."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("python -m toy_experiments: interrupted (finished experiments are kept; the interrupted one "
              "left nothing)", file=sys.stderr)
        return 130
    except OSError as e:
        if e.filename is None:
            raise
        print(f"python -m toy_experiments: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1


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
    t0 = time.perf_counter()
    summaries = [run_experiment(e.name, level=level, seed=args.seed, results_root=root) for e in ordered]
    write_index(summaries, root / "index.md")
    print(f"{len(summaries)} experiments in {time.perf_counter() - t0:.1f}s; index: {root / 'index.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
