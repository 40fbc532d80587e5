"""Running (experiment, seed) jobs: in this process, in a local process pool, or on a Dask cluster.

:func:`run_suite` owns every result folder.  For each experiment it makes one staging folder beside the
destination (:func:`toy_experiments.framework.make_staging`); the seeds' results go into it (``seed-K/``
sub-folders when there are several seeds, then the aggregate of :mod:`toy_experiments.seeds`), and it is
renamed into place when the experiment's last seed is done.  So a folder ``NAME`` is always a complete
result, and an interrupted or failed run removes the staging folders it had open (after stopping its
workers) and keeps the experiments it finished.

Where the jobs run:

* in this process, one after the other (the default);
* ``workers=N``: a pool of N processes started with "spawn" (a fresh interpreter, so no BLAS thread pool
  copied from a fork).  They inherit this process's environment, hence its BLAS thread variables (one thread
  unless the caller chose otherwise, see the package ``__init__``), set before numpy loads in them.  Each
  worker writes into the staging folder it is given;
* ``scheduler=ADDRESS``: Dask distributed.  A worker runs the job in a temporary folder of its own and
  returns the files (metrics.json, report.md, figures) to this process, which writes them: the workers need
  no file system shared with the client, only this repository's ``toy_experiments`` and ``refssl``
  importable, and so does the scheduler, which unpickles the jobs (start both with the checkout on
  PYTHONPATH).  Each job runs with the client's BLAS thread count when threadpoolctl is installed in the
  worker (Dask's nanny starts workers with one thread anyway; the limit is per process, so give the workers
  one thread each, ``dask worker --nthreads 1``, when the client asks for another thread count than theirs).

A job run in this process may train an experiment's independent models side by side on the idle cores
(:mod:`toy_experiments.runs`; ``mae`` does); a job in a pool or on Dask trains them one after another, its
cores being the pool's.

Results do not depend on where a job ran: a job's numbers are a function of (experiment, level, seed) and
the BLAS thread count, which every report records.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

os.environ.setdefault("MPLBACKEND", "Agg")  # also in spawned workers, which import this module first

from refssl.nn.io import replace_dir  # noqa: E402
from refssl.runtime import keep_freed_memory  # noqa: E402

from . import runs  # noqa: E402
from .framework import (EXPERIMENTS, Experiment, _duration, _jsonable, _verdict_word, make_staging,  # noqa: E402
                        run_in_folder, suite_estimate, write_index)
from .seeds import seed_folder, write_aggregate  # noqa: E402

__all__ = ["Job", "run_job", "run_suite", "SchedulerUnavailable", "require_distributed"]


class SchedulerUnavailable(RuntimeError):
    """``--scheduler`` without Dask distributed installed, or a scheduler that cannot be reached."""


@dataclass(frozen=True)
class Job:
    """One run of one experiment at one seed, as sent to a worker (picklable: names, no functions)."""

    name: str
    module: str  # importing it registers the experiment (a worker process starts with an empty registry)
    level: str
    seed: int
    folder: str | None = None  # write the result here; None: into a temporary folder, returned as bytes
    shown_as: str = ""  # where the result will end up, for the progress line
    label: str | None = None  # starts the progress lines of the run (None: the experiment's name)
    blas_threads: int | None = None  # run under this BLAS thread limit (threadpoolctl), None: as the process is
    run_workers: int | None = None  # processes for the experiment's independent runs (runs.py), None: the cores


def _experiment(job: Job) -> Experiment:
    if job.name not in EXPERIMENTS:
        importlib.import_module(job.module)
    if job.name not in EXPERIMENTS:
        raise LookupError(f"experiment {job.name!r} is not registered in worker process {os.getpid()}: "
                          f"importing {job.module} did not register it (workers can only run experiments "
                          "registered at import time of an importable module)")
    return EXPERIMENTS[job.name]


def _thread_limit(threads: int | None):
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not a dependency: the worker's own setting (recorded in the report) applies
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def run_job(job: Job) -> dict:
    """Run one job (in whatever process this is); returns ``{"summary": ..., "files": ...}``: the summary as
    metrics.json holds it, and, when the job had no folder, every file of the result as bytes by relative
    path."""
    exp = _experiment(job)
    keep_freed_memory()  # speed only (refssl/runtime.py); this process runs experiments and nothing else
    with _thread_limit(job.blas_threads), runs.workers(job.run_workers):
        if job.folder is not None:
            summary, _ = run_in_folder(exp, level=job.level, seed=job.seed, folder=job.folder,
                                       shown_as=job.shown_as, label=job.label)
            return {"summary": _jsonable(summary), "files": None}
        with tempfile.TemporaryDirectory(prefix=f"toy-{job.name}-") as tmp:
            summary, _ = run_in_folder(exp, level=job.level, seed=job.seed, folder=tmp, shown_as=job.shown_as,
                                       label=job.label)
            files = {p.relative_to(tmp).as_posix(): p.read_bytes()
                     for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
            return {"summary": _jsonable(summary), "files": files}


def _write_files(folder: Path, files: dict) -> None:
    for rel, data in files.items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise ValueError(f"a worker returned a file outside its result folder: {rel!r}")
        path = folder.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _local_blas_threads() -> int | None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    return None


# --- where the jobs run ------------------------------------------------------------------------------------

class _InProcess:
    """One job at a time, in this process."""

    capacity = slots = 1
    local, where = True, "in this process"

    def submit(self, job):
        return job

    def wait_one(self, handles):
        job = next(iter(handles))
        return job, run_job(job)

    def abort(self, handles):
        pass

    def close(self):
        pass


class _Pool:
    """A local pool of spawned worker processes."""

    local = True

    def __init__(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.capacity = self.slots = workers
        self.where = f"in {workers} worker processes"
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=runs.ignore_sigint)

    def submit(self, job):
        return self.executor.submit(run_job, job)

    def wait_one(self, handles):
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(list(handles), return_when=FIRST_COMPLETED)
        future = next(f for f in handles if f in done)  # the earliest submitted of those done
        return future, future.result()

    def abort(self, handles):
        runs.stop_pool(self.executor)  # no worker may still write into a staging folder removed next

    def close(self):
        self.executor.shutdown(wait=True, cancel_futures=True)


def require_distributed():
    """The ``distributed`` module, or SchedulerUnavailable saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise SchedulerUnavailable("--scheduler needs Dask distributed, which is not installed (python -m pip "
                                   "install 'dask[distributed]', or the cluster extra of this repository)") from None
    return distributed


class _Dask:
    """The jobs on a Dask distributed cluster; the results come back to this process."""

    local = False

    def __init__(self, address: str):
        distributed = require_distributed()
        self.distributed = distributed
        try:
            self.client = distributed.Client(address, set_as_default=False)
        except (OSError, ValueError) as e:  # unreachable (after Dask's connect timeout), malformed address
            raise SchedulerUnavailable(f"cannot connect to the Dask scheduler at {address}: {e}") from None
        self.capacity = None  # submit everything: the scheduler balances the jobs over its workers
        self.slots = max(1, sum(self.client.nthreads().values()))  # jobs at once, for the estimate
        self.where = f"on the Dask scheduler {address}"
        self.completed = distributed.as_completed(loop=self.client.loop)  # this client's, not a default one

    def submit(self, job):
        key = f"toy-{job.name}-seed{job.seed}-{os.urandom(4).hex()}"  # unique: never a result of another run
        future = self.client.submit(run_job, job, pure=False, key=key)
        self.completed.add(future)
        return future

    def wait_one(self, handles):
        future = next(self.completed)
        try:
            return future, future.result()
        except Exception as e:
            missing = next((x for x in (e, e.__cause__) if isinstance(x, ModuleNotFoundError)), None)
            if missing is None:
                raise
            checkout = Path(__file__).resolve().parents[1]
            raise SchedulerUnavailable(
                f"the Dask cluster cannot import {missing.name!r}: its scheduler and workers need refssl and this "
                f"checkout's toy_experiments importable (start them with PYTHONPATH={checkout})") from e

    def abort(self, handles):
        # A task already running on a worker finishes there and is dropped; its temporary folder is the
        # worker's and is removed by the worker.
        self.client.cancel(list(handles))

    def close(self):
        self.client.close()


def _runner(workers: int | None, scheduler: str | None):
    if scheduler is not None:
        return _Dask(scheduler)
    if workers is not None and workers > 1:
        return _Pool(workers)
    return _InProcess()


# --- the suite ---------------------------------------------------------------------------------------------

def run_suite(exps: list[Experiment], *, level: str, seeds: list[int], dests: dict[str, Path],
              workers: int | None = None, scheduler: str | None = None, index: Path | None = None,
              stream=None) -> list[dict]:
    """Run every experiment of ``exps`` at every seed of ``seeds`` and write each to ``dests[name]``
    (atomically, see the module docstring); returns one summary per experiment (the aggregate's when there
    are several seeds), in the order they finished.

    ``index``: the index.md to keep up to date (before the first job, after each experiment, and marked
    interrupted when the run stops early); None for none.  Progress lines go to ``stream`` (stderr): in this
    process one before each job, with workers one as each job finishes; either says which job of how many,
    the time elapsed and an estimate of the time left.

    With ``workers``, a script that calls this must do so under ``if __name__ == "__main__":`` (the workers
    are spawned: they import the main module)."""
    stream = stream if stream is not None else sys.stderr
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    multi = len(seeds) > 1
    names = [e.name for e in exps]
    blas = _local_blas_threads()
    jobs = deque(Job(e.name, e.run.__module__, level, s,
                     shown_as=str(Path(dests[e.name]) / seed_folder(s)) if multi else str(dests[e.name]),
                     label=f"{e.name} seed {s}" if multi else None)
                 for e in exps for s in seeds)
    total, finished, summaries, done_seconds = len(jobs), 0, [], []
    staging: dict[str, Path] = {}
    per_seed: dict[str, dict[int, dict]] = {e.name: {} for e in exps}
    by_name = {e.name: e for e in exps}
    show_progress = total > 1 or index is not None
    t0 = time.perf_counter()

    def estimate(remaining_names, slots) -> str:
        left = suite_estimate(done_seconds, remaining_names, Path(dests[remaining_names[0]]).parent, level) \
            if remaining_names else 0.0
        if left is None:
            return "no estimate yet"
        return f"about {_duration(left / max(1, min(slots, len(remaining_names))))} left"

    def folder_for(job: Job) -> Path:
        if job.name not in staging:
            staging[job.name] = make_staging(dests[job.name])
        folder = staging[job.name] / seed_folder(job.seed) if multi else staging[job.name]
        folder.mkdir(exist_ok=True)
        return folder

    runner = None
    inflight: dict = {}
    try:
        if index is not None:
            Path(index).parent.mkdir(parents=True, exist_ok=True)
            write_index(summaries, index, planned=names, status="running")
        runner = _runner(workers, scheduler)
        capacity = runner.capacity or total
        while jobs or inflight:
            while jobs and len(inflight) < capacity:
                job = jobs.popleft()
                if runner.local:
                    job = replace(job, folder=str(folder_for(job)))
                else:
                    job = replace(job, blas_threads=blas)
                if not isinstance(runner, _InProcess):  # its cores are the pool's (a Dask worker may not fork)
                    job = replace(job, run_workers=1)
                if isinstance(runner, _InProcess) and show_progress:
                    remaining = [job.name] + [j.name for j in jobs]
                    print(f"[suite {finished + 1}/{total}, {_duration(time.perf_counter() - t0)} elapsed, "
                          f"{estimate(remaining, 1)}] {job.name}" + (f" (seed {job.seed})" if multi else ""),
                          file=stream, flush=True)
                inflight[runner.submit(job)] = job
            handle, payload = runner.wait_one(inflight)
            job = inflight.pop(handle)
            if payload["files"] is not None:
                _write_files(folder_for(job), payload["files"])
            summary = payload["summary"]
            finished += 1
            done_seconds.append(float(summary["seconds"]))
            per_seed[job.name][job.seed] = summary
            if not isinstance(runner, _InProcess):
                remaining = [j.name for j in inflight.values()] + [j.name for j in jobs]
                print(f"[suite {finished}/{total} finished, {_duration(time.perf_counter() - t0)} elapsed, "
                      f"{estimate(remaining, runner.slots)}] {job.name}" + (f" seed {job.seed}" if multi else "")
                      + f": expectation {_verdict_word(summary['met'])} ({summary['seconds']:.1f} s "
                      f"{runner.where})", file=stream, flush=True)
            if len(per_seed[job.name]) == len(seeds):
                summaries.append(_finish(by_name[job.name], level, seeds, per_seed[job.name],
                                         staging[job.name], Path(dests[job.name])))
                del staging[job.name]
                if index is not None:
                    write_index(summaries, index, planned=names, status="running")
    except BaseException:
        try:
            if runner is not None:
                runner.abort(inflight)  # first: no worker may still write into a folder removed next
        finally:
            for folder in staging.values():
                shutil.rmtree(folder, ignore_errors=True)
            if index is not None:
                try:
                    write_index(summaries, index, planned=names, status="interrupted")
                except OSError:
                    pass  # the original error is the one to report
        raise
    finally:
        if runner is not None:
            runner.close()
    if index is not None:
        write_index(summaries, index, planned=names, status="complete")
    return summaries


def _finish(exp: Experiment, level: str, seeds: list[int], results: dict, staging: Path, dest: Path) -> dict:
    """Every seed of ``exp`` is in ``staging``: add the aggregate (several seeds) and rename it into place."""
    if len(seeds) > 1:
        summary = write_aggregate(exp, level, [results[s] for s in seeds], staging)
    else:
        summary = results[seeds[0]]
    replace_dir(staging, dest)
    return dict(summary, path=str(dest))
