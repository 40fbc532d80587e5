"""Golden vectors: every registered op evaluated on its example, exported for ports to other frameworks.

    python -m refssl golden --out golden/ [--seed 0] [OP ...]

writes ``OP.npz`` per op (inputs ``arg0, arg1, ...``, the output ``out``, a
random upstream gradient ``grad_out`` and the gradients ``grad0, ...`` of the
differentiable inputs, all float64) and ``manifest.json`` (hyperparameters,
differentiable positions, reference and derivation of each op).  A port that
reproduces ``out`` and the gradients from the inputs matches this reference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import registry

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


def export(out_dir, names=None, seed: int = 0) -> Path:
    """Write golden vectors for ``names`` (default: all ops) to ``out_dir``; returns the manifest path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in names or registry.names():
        arrays, meta = _entry(name, seed)
        tmp = out / f".{name}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, out / f"{name}.npz")
        manifest[name] = meta
    path = out / "manifest.json"
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load(out_dir, name: str) -> tuple[tuple, dict, dict]:
    """Inputs, hyperparameters and expected arrays (``out``, ``grad_out``, ``gradK``) of one op."""
    out = Path(out_dir)
    meta = json.loads((out / "manifest.json").read_text())[name]
    with np.load(out / f"{name}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    args = tuple(arrays.pop(f"arg{k}") for k in range(meta["n_args"]))
    return args, meta["kwargs"], arrays
