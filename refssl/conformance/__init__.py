"""Conformance kit: refssl as the executable specification that ports are checked against.

* Spec suites: for every registered op, its example plus the named edge cases of its family
  (:mod:`refssl.conformance.edges`), each in float64 and float32, with inputs under their argument
  names, hyperparameters, a random upstream gradient, expected value and gradients, and a tolerance
  per case (:mod:`refssl.conformance.tolerance`).  :func:`build_cases` builds them in memory;
  :func:`export` writes them as plain ``.npz`` + ``manifest.json`` (``python -m refssl spec``).
* Checking a port: :func:`check` (``python -m refssl conformance``) runs a numpy, torch or JAX port
  on every case and reports per case, naming known scale conventions
  (:data:`refssl.conformance.conventions.CONVENTIONS`) when the port differs by one.

See docs/conformance.md.
"""

from .cases import Case, build_cases, degeneracies
from .checker import CaseResult, Report, check
from .conventions import CONVENTIONS, GENERIC, SCALE_NOTES
from .ports import UsageError
from .suite import SPEC_VERSION, export, load_cases, load_manifest

__all__ = ["check", "Report", "CaseResult", "UsageError", "Case", "build_cases", "degeneracies", "export",
           "load_cases", "load_manifest", "SPEC_VERSION", "CONVENTIONS", "GENERIC", "SCALE_NOTES"]
