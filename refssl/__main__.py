"""Command line: ``python -m refssl gradcheck [OP ...]``, ``list``, ``spec --out DIR`` and ``conformance``.

Errors a user can cause (an unknown op, ``--seeds 0``, an output folder that cannot be written) end
in one line on stderr and exit status 2 (usage) or 1 (the write failed); Ctrl-C ends in one line and
status 130.  Failures of refssl itself still show their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from . import gradcheck, registry

DESCRIPTION = """\
refssl: a numpy reference implementation of self-supervised / similarity-based representation
learning.  Every registered op (a loss or a layer) has a hand-written backward pass, a paper and
official-code reference, and a derivation file."""

EPILOG = """\
examples:
  python -m refssl list                               the ops, their references and derivations
  python -m refssl gradcheck info_nce clip --seeds 5  check two backward passes on 5 examples each
  python -m refssl spec --out spec/                   spec suites (inputs, outputs, gradients, tolerances)
  python -m refssl conformance --op info_nce --port mylib.losses:info_nce --framework torch
                                                      check a port against refssl (docs/conformance.md)

Run `python -m refssl COMMAND --help` for the options of a command."""


def _fail(message: str, status: int) -> int:
    print(f"python -m refssl: error: {message}", file=sys.stderr)
    return status


def _unknown(names: list[str]) -> list[str]:
    known = set(registry.names())
    return [n for n in names if n not in known]


def _gradcheck(ops: list[str], seeds: int) -> int:
    names = ops or registry.names()
    unknown = _unknown(names)
    if unknown:
        return _fail(f"unknown op(s): {', '.join(unknown)}; see `python -m refssl list`", 2)
    if seeds < 1:
        return _fail(f"--seeds must be >= 1 (example seeds per op), got {seeds}", 2)
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


def _spec(ops: list[str], out: str, seed: int) -> int:
    from .conformance import export

    unknown = _unknown(ops)
    if unknown:
        return _fail(f"unknown op(s): {', '.join(unknown)}; see `python -m refssl list`", 2)
    try:
        path = export(out, ops or None, seed=seed)
    except ValueError as e:  # a folder that must not be replaced
        return _fail(str(e), 2)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        return _fail(f"cannot write the spec suite to {out}: {e.strerror or e}{where}", 1)
    print(f"wrote {path}")
    return 0


def _conformance(args) -> int:
    from .conformance import UsageError, check

    try:
        report = check(args.op, args.port, framework=args.framework, dtype=args.dtype, suite=args.suite,
                       name_map=args.map or None)
    except UsageError as e:
        return _fail(" ".join(str(e).split()), 2)
    print(report)
    return 0 if report.ok else 1


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (a missing option, an invalid choice) and status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    def fmt(prog):
        return argparse.RawDescriptionHelpFormatter(prog, max_help_position=20, width=100)

    parser = _Parser(prog="python -m refssl", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, title="commands")
    sub.add_parser("list", help="list the registered ops with their references and derivation files")
    p = sub.add_parser("gradcheck", help="check every registered backward against float64 finite differences")
    p.add_argument("ops", nargs="*", help="op names (default: all registered ops)")
    p.add_argument("--seeds", type=int, default=3, help="example seeds per op, >= 1 (default 3)")
    for name, help_text in (("spec", "export the spec suites (inputs, outputs, gradients, tolerances) of the ops"),
                            ("golden", "alias of spec (the spec suites replace the golden vectors)")):
        g = sub.add_parser(name, help=help_text)
        g.add_argument("ops", nargs="*", help="op names (default: all registered ops)")
        g.add_argument("--out", required=True,
                       help="output folder: new, empty, or an earlier export (replaced as a whole)")
        g.add_argument("--seed", type=int, default=0, help="suite seed (default 0)")
    c = sub.add_parser("conformance", help="check a numpy, torch or JAX port of an op against its spec suite",
                       description="Run a port on every case of an op's spec suite and report the value error, "
                                   "the worst gradient error and the tolerance of each case; exit status 0 "
                                   "exactly when every case passes (1: a case fails, 2: bad usage).  "
                                   "See docs/conformance.md.")
    c.add_argument("--op", required=True, help="registered op name (see `python -m refssl list`)")
    c.add_argument("--port", required=True, metavar="MODULE:CALLABLE",
                   help="the port: a function or class, as module:name or path/file.py:name")
    c.add_argument("--framework", choices=("numpy", "torch", "jax"), default="numpy",
                   help="how the port takes arrays and gives gradients (default numpy)")
    c.add_argument("--dtype", choices=("float32", "float64", "all"), default="all", help="cases to run (default all)")
    c.add_argument("--suite", metavar="DIR", help="an exported suite (default: built in memory)")
    c.add_argument("--map", action="append", metavar="NAME=PORT_NAME",
                   help="pass hyperparameter NAME as keyword PORT_NAME (NAME= drops it); repeatable")
    return parser


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    # a stable op must not overflow on its examples; scoped, so importing callers keep their settings
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        if args.command == "gradcheck":
            return _gradcheck(args.ops, args.seeds)
        if args.command in ("spec", "golden"):
            return _spec(args.ops, args.out, args.seed)
        if args.command == "conformance":
            return _conformance(args)
    for name in registry.names():
        op = registry.get(name)
        print(f"{name}\n    reference:  {op.reference}\n    derivation: {op.derivation}")
    return 0


def main(argv=None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("python -m refssl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python -m refssl list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
