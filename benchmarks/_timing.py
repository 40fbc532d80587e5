"""Timing helpers shared by the benchmark scripts (imported as ``from _timing import ...``)."""

from __future__ import annotations

import os
import sys
import time

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "REFSSL_NUM_THREADS")


def set_threads(n: int) -> None:
    """Pin BLAS/OpenMP and refssl's row-block pool to ``n`` threads; call before numpy is imported."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)


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
    return f"BLAS: {'; '.join(libs)}; OpenBLAS overrides: {env or 'none'}"
