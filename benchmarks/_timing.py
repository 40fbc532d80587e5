"""Timing helpers shared by the benchmark scripts (imported as ``from _timing import ...``)."""

from __future__ import annotations

import os
import sys
import time

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "REFSSL_NUM_THREADS")


# The process settings every benchmark runs under, for refssl and torch alike (they share the process):
# - OpenBLAS worker threads spin for about 2^28 cycles (~0.1 s) after each call before they sleep.  Between
#   two GEMMs, refssl's elementwise work runs in its own small thread pool and torch's in OpenMP threads;
#   either then competes for the 2 cores with a spinning BLAS thread that has nothing to do.  2^4 cycles
#   lets it sleep at once (waking it costs microseconds, against milliseconds per GEMM).
# - glibc returns freed memory above 128 KiB to the kernel (mmap / heap trimming), so every large temporary
#   of the next step is faulted in again page by page.  Keeping it in the heap removes those faults.
# Both change speed only, never a result.  BENCH_DEFAULT_RUNTIME=1 leaves the process as it starts.
SPIN_TIMEOUT = "4"  # OPENBLAS_THREAD_TIMEOUT: log2 of the cycles an idle OpenBLAS thread spins
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc mallopt parameters
_MMAP_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit: blocks above it are still mmapped
_runtime_notes: list[str] = []


def set_threads(n: int) -> None:
    """Pin BLAS/OpenMP and refssl's row-block pool to ``n`` threads and apply the benchmark runtime settings
    above; call before numpy is imported."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    if os.environ.get("BENCH_DEFAULT_RUNTIME") == "1":
        _runtime_notes.append("default runtime (BENCH_DEFAULT_RUNTIME=1)")
        return
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", SPIN_TIMEOUT)
    _runtime_notes.append(f"OPENBLAS_THREAD_TIMEOUT={os.environ['OPENBLAS_THREAD_TIMEOUT']}")
    _runtime_notes.append(_keep_heap())


def _keep_heap() -> str:
    """Ask glibc to keep freed memory (no trimming, no mmap below 32 MiB); a description of what was set."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
              and libc.mallopt(_M_TOP_PAD, 64 << 20))
    except (OSError, AttributeError):
        ok = False
    return "glibc heap kept (mmap threshold 32 MiB, no trim)" if ok else "glibc heap settings unavailable"


def use_checkout() -> None:
    """Import refssl from this checkout rather than an installed copy."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def times(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (allocations, thread pools)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    ts = sorted(times(fn, repeats))
    return 1e3 * ts[len(ts) // 2]


def blas_info() -> str:
    """Which BLAS kernel numpy runs (threadpoolctl, when installed) and the OpenBLAS overrides in force."""
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    try:
        from threadpoolctl import threadpool_info
        libs = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} x{i.get('num_threads')}"
                for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        libs = ["(threadpoolctl not installed: kernel not shown)"]
    runtime = "; ".join(_runtime_notes) or "default runtime"
    return f"BLAS: {'; '.join(libs)}; OpenBLAS overrides: {env or 'none'}\nruntime: {runtime}"
