"""Golden vectors, kept for compatibility: they are now the spec suites of :mod:`refssl.conformance`.

``python -m refssl golden --out DIR`` is an alias of ``python -m refssl spec --out DIR``: every op's
example plus its family's edge cases, float64 and float32, inputs under their argument names, with
tolerances and a versioned manifest (docs/conformance.md).  :func:`export` writes that suite;
:func:`load` reads the float64 example of one op back in the old ``(args, kwargs, arrays)`` form.
"""

from __future__ import annotations

from pathlib import Path

from .conformance.suite import export as _export_suite
from .conformance.suite import load_cases

__all__ = ["export", "load"]


def export(out_dir, names=None, seed: int = 0) -> Path:
    """Write the spec suites of ``names`` (default: all ops) to ``out_dir``; returns the manifest path."""
    return _export_suite(out_dir, names, seed=seed)


def load(out_dir, name: str) -> tuple[tuple, dict, dict]:
    """The float64 example of ``name``: inputs, hyperparameters and ``out``, ``grad_out``, ``gradK`` arrays."""
    case = next(c for c in load_cases(out_dir, name) if c.name == "example" and c.dtype == "float64")
    names = list(case.inputs)
    arrays = {"out": case.expected_out, "grad_out": case.upstream}
    arrays.update({f"grad{k}": case.expected_grads[n] for k, n in enumerate(names) if n in case.expected_grads})
    return tuple(case.inputs.values()), dict(case.hyper), arrays
