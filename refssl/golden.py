"""Golden vectors: every registered op evaluated on its example, exported for ports to other frameworks.

    python -m refssl golden --out golden/ [--seed 0] [OP ...]

writes ``OP.npz`` per op (inputs ``arg0, arg1, ...``, the output ``out``, a
random upstream gradient ``grad_out`` and the gradients ``grad0, ...`` of the
differentiable inputs, all float64) and ``manifest.json`` (hyperparameters,
differentiable positions, reference and derivation of each op).  A port that
reproduces ``out`` and the gradients from the inputs matches this reference.

The output folder is written as a whole: afterwards it holds exactly the
exported ops and a manifest listing them (a subset export leaves no stale
files of an earlier one).  Everything is written to a staging folder beside it
and renamed into place at the end, so an interrupted export leaves the
previous folder as it was (restored on the next export if the interruption
fell between the two renames of the swap).  The folder must be new, empty, or
an earlier export: a folder holding anything else is refused rather than
replaced.  Unknown op names are rejected before anything is written.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from . import registry
from .nn import io as nnio

__all__ = ["export", "load"]


def _entry(name: str, seed: int) -> tuple[dict, dict]:
    op = registry.get(name)
    rng = np.random.default_rng(seed)
    args, kwargs = op.example(rng, np.float64)
    out, cache = op.forward(*args, **kwargs)
    grad_out = rng.standard_normal(np.shape(out))
    grads = op.backward(cache, grad_out if np.ndim(out) else float(grad_out))
    arrays = {f"arg{k}": np.asarray(a) for k, a in enumerate(args)}
    arrays.update(out=np.asarray(out), grad_out=np.asarray(grad_out))
    arrays.update({f"grad{k}": np.asarray(g) for k, g in enumerate(grads) if g is not None})
    meta = {"kwargs": kwargs, "differentiable": list(op.differentiable), "n_args": len(args),
            "reference": op.reference, "derivation": op.derivation, "seed": seed}
    return arrays, meta


def _check_destination(out: Path) -> None:
    """Refuse to replace anything but a previous golden export (or an empty folder)."""
    if not out.name:
        raise ValueError(f"golden output folder {out} has no name; use a sub-folder")
    if out.is_symlink():
        raise ValueError(f"golden output folder {out} is a symbolic link; pass the folder it points to")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"golden output {out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir()
                     if not (p.is_file() and (p.name == "manifest.json" or p.suffix == ".npz")))
    if foreign:
        raise ValueError(f"golden output folder {out} holds files that are not golden vectors "
                         f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); an export replaces "
                         "the whole folder, so choose a new or empty one")


def export(out_dir, names=None, seed: int = 0) -> Path:
    """Write golden vectors for ``names`` (default: all ops) to ``out_dir``; returns the manifest path.

    ``out_dir`` ends up holding exactly ``NAME.npz`` for each exported op and ``manifest.json``; the
    folder is replaced atomically (see the module docstring).
    """
    names = list(names) if names else registry.names()
    for name in names:
        registry.get(name)  # KeyError naming the unknown op, before anything is written
    out = Path(os.path.abspath(out_dir))
    staging_prefix = f".{out.name}.staging-"
    nnio.recover_dir(out, staging_prefix)
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f"{staging_prefix}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        manifest = {}
        for name in names:
            arrays, meta = _entry(name, seed)
            np.savez(staging / f"{name}.npz", **arrays)  # the staging folder as a whole is what is atomic
            manifest[name] = meta
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        nnio.replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / "manifest.json"


def load(out_dir, name: str) -> tuple[tuple, dict, dict]:
    """Inputs, hyperparameters and expected arrays (``out``, ``grad_out``, ``gradK``) of one op."""
    out = Path(out_dir)
    meta = json.loads((out / "manifest.json").read_text())[name]
    with np.load(out / f"{name}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    args = tuple(arrays.pop(f"arg{k}") for k in range(meta["n_args"]))
    return args, meta["kwargs"], arrays
