"""Flat dicts of arrays: prefixing, summing, and atomic save/load to ``.npz``; atomic folder replacement."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["prefixed", "subdict", "add_into", "save_npz", "load_npz", "replace_dir", "recover_dir", "process_alive"]

# Names that np.savez consumes as its own arguments instead of storing them ("allow_pickle" would be
# dropped silently, "file" is a TypeError).
_SAVEZ_RESERVED = frozenset(name for name, p in inspect.signature(np.savez).parameters.items()
                            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

# Temporary files of save_npz: ".tmp-HOST-PID-RANDOM.npz" next to the destination.
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TMP_RE = re.compile(r"^\.tmp-(?:(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-)?[a-z0-9_]+\.npz$")
STALE_SECONDS = 3600.0  # a temp file nobody has written to for an hour is an orphan, whoever made it
_cleaned_dirs: set[str] = set()


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


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (True when that cannot be told)."""
    if os.name == "nt":  # os.kill would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _clean_orphans(d: str) -> None:
    """Remove temp files of save_npz left in ``d`` by killed writers.

    A file is an orphan when its writer (host and pid in its name) is this machine's and no longer
    runs, or when nobody has written to it for STALE_SECONDS (other hosts on a shared disk, files of
    older refssl versions without a pid).  A live writer is never touched: its pid is alive and its
    file is being written.  Done once per folder and process.
    """
    if d in _cleaned_dirs:
        return
    _cleaned_dirs.add(d)
    now = time.time()
    try:
        entries = list(os.scandir(d))
    except OSError:
        return
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m is None:
            continue
        try:
            pid = int(m["pid"]) if m["pid"] else None
            mine = m["host"] == _HOST and pid is not None
            if mine and pid == os.getpid():
                continue
            orphan = (mine and not process_alive(pid)) or now - entry.stat().st_mtime > STALE_SECONDS
            if orphan and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        except OSError:  # gone already, or not ours to remove
            pass


def _savable(arrays) -> dict:
    """The arrays as ndarrays that np.savez stores and np.load(allow_pickle=False) reads back."""
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a dict of name -> array, got {type(arrays).__name__}")
    out = {}
    for k, v in arrays.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"array names must be non-empty strings, got {k!r}")
        if k in _SAVEZ_RESERVED:
            raise ValueError(f"cannot save an array named {k!r}: np.savez takes {k!r} as its own argument "
                             "(the entry would be lost); rename it")
        if v is None:
            raise ValueError(f"arrays[{k!r}] is None: only arrays and numbers can be saved")
        try:
            a = np.asarray(v)
        except ValueError as e:  # a ragged nested sequence
            raise ValueError(f"arrays[{k!r}] is not a rectangular array ({e})") from None
        if a.dtype.hasobject:
            raise ValueError(f"arrays[{k!r}] has dtype object (a ragged sequence or Python objects): it could "
                             "only be read back with pickles, which load_npz does not allow")
        out[k] = a
    return out


def save_npz(path, arrays: dict) -> None:
    """Write ``arrays`` (name -> array or scalar) to ``path`` atomically.

    The data go to a temporary file ``.tmp-HOST-PID-RANDOM.npz`` in the same directory, which is
    fsynced and then renamed over ``path`` with :func:`os.replace`: a crash leaves either the old file
    or the new one, never a torn one.  Temporary files of writers that were killed are removed at the
    first save into that directory (see :func:`_clean_orphans`).  Names that np.savez reserves
    (``file``, ``allow_pickle``), None values and ragged/object arrays are rejected with a ValueError
    before anything is written.
    """
    path = os.fspath(path)
    clean = _savable(arrays)
    d = os.path.dirname(os.path.abspath(path))
    _clean_orphans(d)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{_HOST}-{os.getpid()}-", suffix=".npz", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **clean)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_npz(path) -> dict:
    """All arrays of an ``.npz`` file as a dict (loaded into memory; no pickles).

    A truncated or corrupt file is a ValueError naming the path (not a zipfile error).
    """
    try:
        z = np.load(path, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error) as e:
        raise ValueError(f"{os.fspath(path)} is not a readable .npz file (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{os.fspath(path)} holds a single array (an .npy file), not an .npz archive")
    try:
        with z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, zlib.error) as e:
        raise ValueError(f"{os.fspath(path)} is not a readable .npz file (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None


def replace_dir(staging, dest) -> None:
    """Move a finished folder ``staging`` to ``dest``, replacing a previous ``dest`` (same file system).

    ``dest`` is first renamed to ``.NAME.old-PID`` beside it, then ``staging`` is renamed to ``dest``, then
    the old folder is removed.  A crash between the two renames leaves no ``dest`` but the complete
    previous result in ``.NAME.old-PID``; :func:`recover_dir` (called before the next write) puts it back.
    """
    staging, dest = Path(staging), Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
    try:
        os.replace(staging, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.replace(old, dest)  # put the previous result back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(dest, staging_prefix: str | None = None) -> None:
    """Undo what killed writers of ``dest`` left behind (see :func:`replace_dir`).

    * ``dest`` missing and a ``.NAME.old-PID`` of a dead process beside it: the swap was interrupted
      between its two renames; the previous result is restored (the newest one if there are several).
    * ``dest`` present: leftover ``.NAME.old-PID`` folders of dead processes are removed.
    * staging folders ``STAGING_PREFIX...-PID-...`` of dead processes are removed.

    Folders of live processes (a concurrent writer) are never touched.
    """
    dest = Path(dest)
    parent = dest.parent
    if not parent.is_dir():
        return
    old_re = re.compile(rf"^\.{re.escape(dest.name)}\.old-(\d+)$")
    olds = []
    for entry in parent.iterdir():
        m = old_re.match(entry.name)
        if m and entry.is_dir() and not process_alive(int(m.group(1))):
            olds.append(entry)
        elif staging_prefix and entry.name.startswith(staging_prefix) and entry.is_dir():
            pid = re.match(r"(\d+)-", entry.name[len(staging_prefix):])
            if pid and not process_alive(int(pid.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
    olds.sort(key=lambda p: p.stat().st_mtime)
    if olds and not dest.exists():
        os.replace(olds.pop(), dest)
    for o in olds:
        shutil.rmtree(o, ignore_errors=True)
