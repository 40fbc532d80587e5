"""Independent training runs of one experiment, spread over the machine's cores.

An experiment such as ``mae`` trains several models that share nothing (one per mask ratio).  Each is small:
one BLAS thread is what suits it (see the package ``__init__``), so a run on its own leaves the other cores
idle.  :func:`run_each` trains them in a pool of spawned processes instead, one run per process at a time.

A run's numbers do not depend on where it ran: the function gets the same arguments, and a spawned process
inherits this process's environment, hence the same BLAS thread variables (set before numpy loads).
``tests/test_toy_runs.py`` checks that the results are bit for bit those of the runs one after another.

How many processes: :func:`workers` sets it for the code inside (``None``: one per core).  The suite sets 1
for jobs that already run in a pool of its own or on a Dask cluster (their cores are taken, and a Dask
worker may not start processes); a plain ``run`` or ``all`` in this process uses the cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

try:
    import resource
except ImportError:  # not on Windows: the children's CPU time is then not counted
    resource = None

__all__ = ["run_each", "workers", "cpu_seconds"]

_workers: int | None = None  # None: one process per core


@contextlib.contextmanager
def workers(n: int | None):
    """Use at most ``n`` processes for :func:`run_each` inside the block (1: in this process)."""
    global _workers
    previous, _workers = _workers, n
    try:
        yield
    finally:
        _workers = previous


def _init():
    # Ctrl-C reaches the whole process group; the parent stops the pool, a worker must not die on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from refssl.runtime import keep_freed_memory

    keep_freed_memory()  # speed only, as in the parent (refssl/runtime.py)


def run_each(fn, calls: list[tuple], *, done=None) -> list:
    """``[fn(*args) for args in calls]``, in a pool of spawned processes when more than one is allowed.

    ``fn`` must be a module-level function and its arguments and results picklable.  ``done(i, result)`` is
    called in this process as each run finishes (in the order they finish), e.g. to report progress.  If this
    process is interrupted, the workers are stopped before the exception propagates.
    """
    n = min(len(calls), _workers if _workers is not None else (os.cpu_count() or 1))
    if n <= 1:
        results = []
        for i, args in enumerate(calls):
            results.append(fn(*args))
            if done is not None:
                done(i, results[-1])
        return results

    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    executor = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"), initializer=_init)
    try:
        futures = {executor.submit(fn, *args): i for i, args in enumerate(calls)}  # submitted in order
        results: list = [None] * len(calls)
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(finished, key=futures.get):
                results[futures[fut]] = fut.result()
                if done is not None:
                    done(futures[fut], results[futures[fut]])
    except BaseException:
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(timeout=30)
        raise
    executor.shutdown(wait=True)
    return results


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the pool of :func:`run_each` is
    joined before it returns, so its runs are counted wherever they ran)."""
    if resource is None:
        return time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime
