"""Exporting and loading spec suites: one ``.npz`` per case plus ``manifest.json``.

Plain numpy + JSON, readable without refssl (schema in docs/conformance.md#schema):

* ``manifest.json``: ``format`` ("refssl-spec-suite"), ``spec_version``, ``refssl_version``,
  ``refssl_revision`` (git commit, "+dirty" when the checkout had changes; null outside git),
  ``seed``, ``error_measure``, ``tolerance_rule``, and ``ops``: per op its ``reference``,
  ``derivation``, ``family``, ``scale_notes``, ``conventions``, ``arguments``, ``differentiable``,
  ``hyperparameter_defaults`` and ``cases`` (name, dtype, file, sha256, description,
  hyperparameters, differentiable, inputs (shape, dtype), output_shape, tolerance,
  tolerance_basis, seed).
* ``OP.CASE.DTYPE.npz``: ``inputs/NAME`` for every argument, ``upstream``, ``expected/out`` and
  ``expected/grads/NAME`` for every differentiable argument (expected values always float64).

The folder is written as a whole (:func:`refssl.export_folder.write_folder`): staging folder, then
a swap, so a reader never sees a manifest that disagrees with the files beside it; ``load_cases``
also checks every file's sha256 against the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np

from .. import __version__, registry
from ..export_folder import write_folder
from . import cases as C
from . import edges as E
from .conventions import CONVENTIONS, SCALE_NOTES
from .ports import UsageError
from .tolerance import EPS32, FLOOR32, RTOL64, SAFETY32

__all__ = ["SPEC_VERSION", "FORMAT", "export", "load_manifest", "load_cases", "revision"]

SPEC_VERSION = 1
FORMAT = "refssl-spec-suite"

ERROR_MEASURE = ("per array (the value and each gradient): max|port - expected| / max|expected| "
                 "(absolute when expected is all zero); a case passes when every array is within its tolerance")
TOLERANCE_RULE = (f"d = max(refssl_float32_error, rounding_sensitivity, {FLOOR32:.3g}); kappa = d / {EPS32:.3g}; "
                  f"float32 tolerance = {SAFETY32:g} d; float64 tolerance = {RTOL64:g} kappa "
                  "(docs/conformance.md#how-tolerances-are-chosen)")


def revision() -> str | None:
    """The git commit of the refssl checkout (with "+dirty" for local changes), or None."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # an installed copy: do not report whatever repository encloses it
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _file_name(case) -> str:
    return f"{case.op}.{case.name}.{case.dtype}.npz"


def _arrays(case) -> dict:
    arrays = {f"inputs/{k}": np.asarray(v) for k, v in case.inputs.items()}
    arrays["upstream"] = np.asarray(case.upstream)
    arrays["expected/out"] = np.asarray(case.expected_out)
    arrays.update({f"expected/grads/{k}": np.asarray(v) for k, v in case.expected_grads.items()})
    return arrays


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _case_entry(case, file_name, digest) -> dict:
    return {
        "name": case.name, "dtype": case.dtype, "file": file_name, "sha256": digest,
        "description": case.description, "hyperparameters": case.hyper,
        "differentiable": list(case.differentiable),
        "inputs": {k: {"shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name} for k, v in case.inputs.items()},
        "output_shape": list(case.expected_out.shape),
        "tolerance": case.tolerance, "tolerance_basis": case.tolerance_basis, "seed": case.seed,
    }


def _op_entry(name: str) -> dict:
    op = registry.get(name)
    args = C.argument_names(name)
    return {
        "reference": op.reference, "derivation": op.derivation, "family": E.family_of(name),
        "scale_notes": SCALE_NOTES.get(name, "no other scale convention recorded"),
        "conventions": [{"factor": c.label, "name": c.name} for c in CONVENTIONS if c.op == name],
        "arguments": list(args), "differentiable": [args[k] for k in op.differentiable],
        "stop_gradient": list(C.STOP_GRADIENT.get(name, ())),
        "hyperparameter_defaults": C.hyper_defaults(name),
        "example_only": E.example_only_reason(name),
        "cases": [],
    }


def export(out_dir, names=None, seed: int = 0) -> Path:
    """Write the suites of ``names`` (default: every registered op) to ``out_dir``; returns the manifest path.

    ``out_dir`` ends up holding exactly the case files and ``manifest.json`` (replaced as a whole;
    a folder with other files is refused, see :mod:`refssl.export_folder`).  Unknown op names are
    rejected (KeyError) before anything is written.
    """
    names = list(names) if names else registry.names()
    for name in names:
        registry.get(name)

    def fill(staging: Path) -> None:
        ops = {}
        for name in names:
            entry = _op_entry(name)
            for case in C.build_cases(name, seed=seed):
                file_name = _file_name(case)
                buffer = io.BytesIO()  # zip in memory, one write: about twice as fast as np.savez to a path
                np.savez(buffer, **_arrays(case))
                data = buffer.getvalue()
                (staging / file_name).write_bytes(data)
                entry["cases"].append(_case_entry(case, file_name, hashlib.sha256(data).hexdigest()))
            ops[name] = entry
        manifest = {
            "format": FORMAT, "spec_version": SPEC_VERSION, "refssl_version": __version__,
            "refssl_revision": revision(), "seed": seed, "error_measure": ERROR_MEASURE,
            "tolerance_rule": TOLERANCE_RULE, "schema": "docs/conformance.md#schema", "ops": ops,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")

    return write_folder(out_dir, fill, "spec suite") / "manifest.json"


def load_manifest(folder) -> dict:
    """The manifest of an exported suite; UsageError when the folder is not one refssl can read."""
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{folder} is not a spec suite (no manifest.json); export one with "
                         "`python -m refssl spec --out DIR`") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{path} is not a refssl spec-suite manifest (an old `golden` export? re-export it)")
    if manifest.get("spec_version") != SPEC_VERSION:
        raise UsageError(f"{path} has spec_version {manifest.get('spec_version')}; this refssl reads version "
                         f"{SPEC_VERSION}: re-export the suite")
    return manifest


def load_cases(folder, op: str) -> list:
    """The cases of ``op`` from an exported suite (sha256 checked), as :class:`refssl.conformance.cases.Case`."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    if op not in manifest["ops"]:
        raise UsageError(f"the suite in {folder} has no op {op!r} (it holds {', '.join(sorted(manifest['ops']))})")
    out = []
    for entry in manifest["ops"][op]["cases"]:
        path = folder / entry["file"]
        try:
            digest = _sha256(path)
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
        if digest != entry["sha256"]:
            raise UsageError(f"{path} does not match the manifest (sha256 differs): the suite was modified")
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        inputs = {k[len("inputs/"):]: v for k, v in arrays.items() if k.startswith("inputs/")}
        order = manifest["ops"][op]["arguments"]
        inputs = {k: inputs[k] for k in order if k in inputs}
        out.append(C.Case(
            op=op, name=entry["name"], dtype=entry["dtype"], description=entry["description"], inputs=inputs,
            hyper=entry["hyperparameters"], differentiable=tuple(entry["differentiable"]),
            upstream=arrays["upstream"], expected_out=arrays["expected/out"],
            expected_grads={k[len("expected/grads/"):]: v for k, v in arrays.items()
                            if k.startswith("expected/grads/")},
            tolerance=float(entry["tolerance"]), tolerance_basis=entry.get("tolerance_basis", {}),
            seed=entry.get("seed")))
    return out
