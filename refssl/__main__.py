"""Command line: ``python -m refssl gradcheck [OP ...]``, ``list`` and ``golden --out DIR``."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from . import gradcheck, registry


def _gradcheck(ops: list[str], seeds: int) -> int:
    names = ops or registry.names()
    unknown = [n for n in names if n not in registry.names()]
    if unknown:
        print(f"unknown op(s): {', '.join(unknown)}; see `python -m refssl list`", file=sys.stderr)
        return 2
    width = max(len(n) for n in names)
    print(f"{'op':<{width}}  {'worst rel err':>13}  {'tolerance':>9}  {'result':>6}  {'time (s)':>8}")
    print("-" * (width + 46))
    failures = []
    for name in names:
        reports = [gradcheck.check_registered(name, seed=s) for s in range(seeds)]
        worst = max(reports, key=lambda r: (not r.ok, r.rel_error))
        seconds = sum(r.seconds for r in reports)
        status = "pass" if all(r.ok for r in reports) else "FAIL"
        print(f"{name:<{width}}  {worst.rel_error:>13.2e}  {worst.tolerance:>9.1e}  {status:>6}  {seconds:>8.3f}")
        if status == "FAIL":
            failures.append(worst)
    print("-" * (width + 46))
    print(f"{len(names) - len(failures)} passed, {len(failures)} failed "
          f"({seeds} example seed{'s' if seeds != 1 else ''} per op, float64 central differences)")
    for rep in failures:
        print(rep.describe())
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refssl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("gradcheck", help="check every registered backward against finite differences")
    p.add_argument("ops", nargs="*", help="op names (default: all registered ops)")
    p.add_argument("--seeds", type=int, default=3, help="example seeds per op (default 3)")
    sub.add_parser("list", help="list registered ops with their references")
    g = sub.add_parser("golden", help="export golden vectors (inputs, outputs, gradients) of every op")
    g.add_argument("ops", nargs="*", help="op names (default: all registered ops)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    np.seterr(over="raise", divide="raise", invalid="raise")  # a stable op must not overflow on its examples
    if args.command == "gradcheck":
        return _gradcheck(args.ops, args.seeds)
    if args.command == "golden":
        from .golden import export

        print(f"wrote {export(args.out, args.ops or None, seed=args.seed)}")
        return 0
    for name in registry.names():
        op = registry.get(name)
        print(f"{name}\n    reference:  {op.reference}\n    derivation: {op.derivation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
