"""Write a folder of exported files as a whole: staging folder, then a swap into place.

Used by the spec-suite export (:mod:`refssl.conformance.suite`) and its ``golden`` alias.  Afterwards
the folder holds exactly what the last export wrote: a subset export leaves no stale files of an
earlier one, and a manifest never disagrees with the files beside it.  Everything is written to a
staging folder next to the destination and renamed into place at the end, so an interrupted export
leaves the previous folder as it was (restored by the next export if the interruption fell between
the two renames of the swap, see :func:`refssl.nn.io.replace_dir`).  The destination must be new,
empty, or an earlier export (only ``manifest.json`` and ``*.npz`` files): a folder holding anything
else is refused rather than replaced.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from .nn import io as nnio

__all__ = ["check_destination", "write_folder"]


def check_destination(out: Path, what: str) -> None:
    """Refuse to replace anything but an earlier export (manifest.json + *.npz) or an empty folder."""
    if not out.name:
        raise ValueError(f"{what} folder {out} has no name; use a sub-folder")
    if out.is_symlink():
        raise ValueError(f"{what} folder {out} is a symbolic link; pass the folder it points to")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{what} output {out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir()
                     if not (p.is_file() and (p.name == "manifest.json" or p.suffix == ".npz")))
    if foreign:
        raise ValueError(f"{what} folder {out} holds files that are not part of an export "
                         f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); an export replaces "
                         "the whole folder, so choose a new or empty one")


def write_folder(out_dir, fill: Callable[[Path], None], what: str = "export") -> Path:
    """Run ``fill(staging)`` on a fresh staging folder, then swap it into ``out_dir``; returns its path.

    ``fill`` writes every file (``manifest.json`` last is customary but not required: nothing is
    visible at ``out_dir`` before the swap).  Any exception, KeyboardInterrupt included, removes the
    staging folder and leaves ``out_dir`` untouched.
    """
    out = Path(os.path.abspath(out_dir))
    staging_prefix = f".{out.name}.staging-"
    nnio.recover_dir(out, staging_prefix)
    check_destination(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f"{staging_prefix}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        fill(staging)
        nnio.replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
