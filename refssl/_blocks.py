"""Row-blocked evaluation of elementwise work on large (n x n) similarity matrices.

numpy ufuncs run on one core and stream the whole matrix through memory once
per operation.  For the O(n^2) part of a contrastive loss (shift, exp, row
sums) we process blocks of rows instead: each block stays in cache across the
fused steps, and blocks are spread over a small thread pool (ufuncs release the
GIL), so the elementwise work uses the same cores as the BLAS calls around it.
Results are identical to the unblocked computation: blocks partition rows and
every step is row-local.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["block_bounds", "map_row_blocks", "map_batch_split", "num_threads"]

_MIN_PARALLEL_ROWS = 512
_pool: ThreadPoolExecutor | None = None
_CORES = os.cpu_count() or 1  # read once: os.cpu_count() is a system call (~20 us), and this is asked per op


def num_threads() -> int:
    """Worker threads for blocked elementwise work: REFSSL_NUM_THREADS, else the BLAS/OMP setting, else cores."""
    for var in ("REFSSL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return max(1, min(8, _CORES))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=num_threads(), thread_name_prefix="refssl-rows")
    return _pool


def block_bounds(n: int, block: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) blocks of ``block`` items covering ``range(n)``, the last one shorter."""
    return [(s, min(s + block, n)) for s in range(0, n, block)]


def map_row_blocks(fn, n_rows: int, block: int = 128) -> None:
    """Call ``fn(start, stop)`` for consecutive row blocks covering ``range(n_rows)``.

    Blocks run concurrently when the matrix is large enough for threads to pay
    off; ``fn`` must only write rows ``start:stop`` of its outputs.
    """
    bounds = block_bounds(n_rows, block)
    # A single block runs inline: handing it to a pool thread and waiting costs a thread switch and saves
    # nothing (a small batch makes many such calls per step).
    if n_rows < _MIN_PARALLEL_ROWS or len(bounds) == 1 or num_threads() == 1:
        for s, e in bounds:
            fn(s, e)
        return
    for fut in [_executor().submit(fn, s, e) for s, e in bounds]:
        fut.result()


def map_batch_split(fn, n: int, work: int, min_work: int = 1 << 18) -> None:
    """Call ``fn(start, stop)`` once per thread on equal consecutive parts of ``range(n)`` (the batch).

    For memory-bound passes over a batch (``work`` elements in all): one part per thread keeps the
    scheduling overhead to a single hand-off, and ``fn`` chunks its part itself when it needs
    cache-sized temporaries.  Runs inline when ``work < min_work`` (threads would cost more than they
    save) or with one thread.  ``fn`` must only write samples ``start:stop`` of its outputs.
    """
    parts = min(num_threads(), n)
    if work < min_work or parts <= 1:
        fn(0, n)
        return
    bounds = [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]
    futs = [_executor().submit(fn, s, e) for s, e in bounds[1:]]
    try:
        fn(*bounds[0])  # the calling thread takes the first part instead of waiting idle
    finally:
        for fut in futs:
            fut.result()
