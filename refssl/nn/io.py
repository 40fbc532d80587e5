"""Flat dicts of arrays: prefixing, summing, and atomic save/load to ``.npz``."""

from __future__ import annotations

import os
import tempfile

import numpy as np

__all__ = ["prefixed", "subdict", "add_into", "save_npz", "load_npz"]


def prefixed(d: dict, prefix: str) -> dict:
    """``{"0.w": a}`` -> ``{"enc.0.w": a}`` (no copy of the arrays)."""
    return {f"{prefix}.{k}": v for k, v in d.items()}


def subdict(d: dict, prefix: str) -> dict:
    """Entries of ``d`` named ``prefix.*``, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in d.items() if k.startswith(p)}


def add_into(total: dict, more: dict) -> dict:
    """A new dict with ``more`` summed into ``total`` key by key (neither input is modified)."""
    out = dict(total)
    for k, v in more.items():
        out[k] = out[k] + v if k in out else v
    return out


def save_npz(path, arrays: dict) -> None:
    """Write ``arrays`` (name -> array or scalar) to ``path`` atomically.

    The data go to a temporary file in the same directory, which is fsynced and then renamed over
    ``path`` with :func:`os.replace`: a crash leaves either the old file or the new one, never a torn one.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_npz(path) -> dict:
    """All arrays of an ``.npz`` file as a dict (loaded into memory; no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
