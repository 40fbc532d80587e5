"""Process-wide settings that make refssl faster without changing any result (opt-in, call once).

refssl's ops return fresh arrays and keep forward intermediates in caches, so one training step allocates
and frees many large temporaries.  glibc hands freed blocks above 128 KiB back to the kernel (mmap, heap
trimming), and the next step faults every page of them in again: in a ViT-tiny step about 15 % of the
time.  :func:`keep_freed_memory` asks glibc to keep them.  It is a decision about the whole process (every
library in it allocates through the same malloc), so refssl never makes it on import: the benchmark
scripts and the toy-experiment command line call it; other programs may.

The second setting is OpenBLAS's idle spin.  Its worker threads spin for about 2^28 cycles after each call
before they sleep, and refssl runs elementwise work in its own small thread pool between BLAS calls: a
spinning BLAS thread then takes a core from it.  ``OPENBLAS_THREAD_TIMEOUT=4`` in the environment before
numpy is imported (so before refssl is: importing refssl imports numpy) lets them sleep at once; it cannot
be changed afterwards.  The benchmark scripts and the toy-experiment command line set it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc mallopt parameters
_MMAP_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit: larger blocks are still mmapped


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process (no heap trimming; blocks up to 32 MiB from the heap,
    not mmap); True when it accepted.  False, and nothing changed, on a C library without ``mallopt``
    (musl, macOS, Windows).  Memory freed by refssl is then reused by the next step instead of being
    returned to the kernel and faulted in again; the process's resident size stays at its peak."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX) and mallopt(_M_TRIM_THRESHOLD, 1 << 30)
                and mallopt(_M_TOP_PAD, 64 << 20))
