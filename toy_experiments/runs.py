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

__all__ = ["run_each", "workers", "cpu_seconds", "ignore_sigint", "stop_pool"]

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


def ignore_sigint():
    """Initializer of a pool worker: Ctrl-C reaches the whole process group, and the parent stops the pool
    (:func:`stop_pool`), so a worker must not die of it on its own with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_pool(executor) -> None:
    """Shut a ProcessPoolExecutor down without waiting, and stop its running jobs too: their results are no
    longer wanted (and a caller may remove folders they write into).  Python >= 3.14 has
    ``executor.terminate_workers()`` for this."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=30)


def _init():
    ignore_sigint()
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
        stop_pool(executor)
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
