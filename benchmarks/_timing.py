"""Timing helpers shared by the benchmark scripts (imported as ``from _timing import ...``)."""

from __future__ import annotations

import os
import sys
import time

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "REFSSL_NUM_THREADS")


# The process settings every benchmark runs under, for refssl and torch alike (they share the process),
# from refssl/runtime.py (its docstring says why): idle OpenBLAS threads sleep at once instead of spinning
# for ~0.1 s and taking a core from the elementwise work of refssl's thread pool and of torch's OpenMP
# threads; glibc keeps freed memory, so large temporaries are not faulted in again every step.  Both change
# speed only, never a result.  BENCH_DEFAULT_RUNTIME=1 leaves the process as it starts.
_runtime_notes: list[str] = []


def set_threads(n: int) -> None:
    """Pin BLAS/OpenMP and refssl's row-block pool to ``n`` threads and apply the benchmark runtime settings
    above; call before numpy is imported."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    if os.environ.get("BENCH_DEFAULT_RUNTIME") == "1":
        _runtime_notes.append("default runtime (BENCH_DEFAULT_RUNTIME=1)")
        return
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before numpy (and so refssl) is imported
    _runtime_notes.append(f"OPENBLAS_THREAD_TIMEOUT={os.environ['OPENBLAS_THREAD_TIMEOUT']}")
    use_checkout()
    from refssl.runtime import keep_freed_memory

    _runtime_notes.append("glibc keeps freed memory (refssl.runtime.keep_freed_memory)" if keep_freed_memory()
                          else "glibc heap settings unavailable")


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


# torch's OpenMP workers (libgomp) keep spinning for a few milliseconds after each parallel region.  A numpy
# call timed right after a torch call shares the cores with them: an (8320 x 128) (128 x 384) float32 GEMM
# took 12.6 ms right after a torch GEMM and 5.4-6.2 ms 10 ms or more later (2 threads, 2026-11-30).  So an
# interleaved loop pauses, untimed, before every timed call: each library starts on idle cores, as it
# would in a process of its own.
SETTLE_S = 0.02


def interleaved(fns, repeats: int, warmup: int = 1, clock=time.perf_counter, settle: float = SETTLE_S):
    """Milliseconds of ``repeats`` calls of each fn, taken in turn (a, b, c, b, c, a, c, a, b, ...) so that a
    change in the machine's speed during the run falls on all of them alike.  The order rotates every
    round, so no fn always follows the same other one, and every timed call comes after an untimed pause of
    ``settle`` seconds (see SETTLE_S)."""
    for f in fns:
        for _ in range(warmup):
            f()
    out = [[] for _ in fns]
    order = list(range(len(fns)))
    for _ in range(repeats):
        for i in order:
            time.sleep(settle)
            t0 = clock()
            fns[i]()
            out[i].append(1e3 * (clock() - t0))
        order = order[1:] + order[:1]
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


def torch_nt_xent_step(torch, z1, z2, tau):
    """A callable running forward + backward of the NT-Xent loss in torch autograd on copies of the numpy
    views z1, z2 (N, D): cosine logits / tau, self-similarity masked, cross-entropy to the partner view, the
    formula refssl's info_nce computes (the comparison in the contrastive benchmarks)."""
    n = z1.shape[0]
    tz1, tz2 = torch.from_numpy(z1).requires_grad_(True), torch.from_numpy(z2).requires_grad_(True)
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    eye = torch.eye(2 * n, dtype=torch.bool)

    def step():
        tz1.grad = tz2.grad = None
        uu = torch.nn.functional.normalize(torch.cat([tz1, tz2]), dim=1)
        logits = (uu @ uu.T / tau).masked_fill(eye, float("-inf"))
        torch.nn.functional.cross_entropy(logits, labels).backward()

    return step
