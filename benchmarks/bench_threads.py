"""Where refssl's second core goes: the same numpy work on two threads of one process and on two processes.

refssl runs numpy calls from several threads (``refssl._blocks``' pool for elementwise work, OpenBLAS's own
threads inside each GEMM).  numpy releases the GIL inside each call but holds it between calls, so threads
that make many short calls wait on each other; separate processes do not.  This script times parts of the
ViT-tiny step of ``bench_vit_step.py`` (batch 128, float32) three ways:

* ``1 thread``: the whole workload in a single-threaded process;
* ``2 threads``: the whole workload in this process with 2 threads (what refssl runs);
* ``2 processes``: each of two single-threaded processes does half of it (half the elements, rows or
  batch), both started together; a round lasts until the slower one is done.  This is what the two cores
  do with the same numpy calls when no thread waits for another: a bound on what threads could reach.

Workloads: ``gelu`` forward on the MLP activations (128 x 65 x 512), about 19 short numpy calls per
64K-element chunk; the ``fc1`` GEMM (8320 x 128)(128 x 512), a single BLAS call; the whole ``vit`` step
(forward + backward); and ``vit torch``, torch autograd's step of the same model on the same weights, the
same three ways.  Rounds take every (workload, way) in turn, the order rotating, each timed call after a
short pause (``_timing.interleaved``); medians.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_threads.py

Options: ``--repeats 15``, ``--no-torch``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

from _timing import blas_info, interleaved, set_threads

BATCH = 128
WAYS = ("1 thread", "2 threads", "2 processes")


def _workloads(np, rows: slice, with_torch: bool):
    """{name: fn} over the batch rows ``rows`` of fixed seeded data (the same data in every process); with
    torch, also "vit torch": torch autograd's step of the same model on the same weights and data
    (``ports/torch/vit.py``, fused attention)."""
    from bench_vit_step import vit_tiny

    from refssl.ops import activations

    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)[rows]
    labels = rng.integers(0, 10, BATCH)[rows]
    hidden = rng.standard_normal((BATCH, 65, 512)).astype(np.float32)[rows]
    tokens = rng.standard_normal((BATCH * 65, 128)).astype(np.float32)[rows.start * 65:rows.stop * 65]
    w1 = rng.standard_normal((128, 512)).astype(np.float32)
    params, step = vit_tiny(np, np.random.default_rng(1), images, labels)[1:]
    fns = {"gelu": lambda: activations.gelu_forward(hidden), "fc1": lambda: tokens @ w1, "vit": step}
    if with_torch:
        fns["vit torch"] = _torch_vit_step(params, images, labels)
    return fns


def _torch_vit_step(params, images, labels):
    import torch
    from bench_vit_step import torch_vit_tiny_loss

    from ports.torch import vit as tv

    tp = tv.load_params(params, dtype=torch.float32)
    timages, tlabels = torch.from_numpy(images), torch.as_tensor(labels)

    def step():
        for t in tp.values():
            t.grad = None
        torch_vit_tiny_loss(torch, tv, tp, timages, tlabels, sdpa=True).backward()

    return step


def _child(rows, with_torch, conn, barrier):
    """A single-threaded process: on each workload name received, wait for its partners, run it, send the
    milliseconds back; stop on None."""
    set_threads(1)
    import numpy as np

    if with_torch:
        import torch

        torch.set_num_threads(1)
    fns = _workloads(np, rows, with_torch)
    for f in fns.values():  # warm up: allocations, first-touch page faults, thread pools
        f()
    conn.send("ready")
    while (name := conn.recv()) is not None:
        barrier.wait()
        t0 = time.perf_counter()
        fns[name]()
        conn.send(1e3 * (time.perf_counter() - t0))


class _Processes:
    """Single-threaded worker processes, each with its own rows of the batch; ``run(name)`` starts the
    workload in all of them at once and returns the time of the slowest (as it measured itself: the pipe
    and barrier round trips are not part of the work)."""

    def __init__(self, parts, with_torch):
        ctx = mp.get_context("spawn")  # a fresh interpreter: thread settings apply before numpy loads
        self.barrier = ctx.Barrier(len(parts))
        self.conns, self.procs = [], []
        for rows in parts:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(rows, with_torch, child, self.barrier), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for c in self.conns:
            if c.recv() != "ready":
                raise RuntimeError("a worker process failed to start")

    def run(self, name):
        for c in self.conns:
            c.send(name)
        return max(c.recv() for c in self.conns)

    def close(self):
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    set_threads(2)
    import numpy as np

    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch
        except ImportError:
            print("torch is not installed: its row is left out")
            with_torch = False
        else:
            torch.set_num_threads(2)
    fns = _workloads(np, slice(0, BATCH), with_torch)
    half = BATCH // 2
    ways = {"1 thread": _Processes([slice(0, BATCH)], with_torch),
            "2 processes": _Processes([slice(0, half), slice(half, BATCH)], with_torch)}

    # Every (workload, way) in one interleaved loop.  The worker processes report their own times; this
    # process's runs ("2 threads") are timed by the loop.
    cells, reported = {}, {}
    for name in fns:
        for way, procs in ways.items():
            log = reported[(name, way)] = []
            cells[(name, way)] = lambda name=name, procs=procs, log=log: log.append(procs.run(name))
        cells[(name, "2 threads")] = fns[name]
    keys = list(cells)
    runs = dict(zip(keys, interleaved([cells[k] for k in keys], args.repeats, warmup=1)))
    for k, log in reported.items():
        runs[k] = log[1:]  # the first was the warm-up call
    med = {k: statistics.median(r) for k, r in runs.items()}
    for procs in ways.values():
        procs.close()

    print(f"refssl's ViT-tiny workloads (batch {BATCH}, float32) on 1 thread, on 2 threads of one process and "
          f"on 2 single-threaded processes each with half of it; {os.cpu_count()} cores, numpy {np.__version__}")
    print(blas_info())
    print(f"median of {args.repeats} (ms, wall clock); speed-up = 1 thread / that column\n")
    print(f"  {'workload':<10} {'1 thread':>9} {'2 threads':>10} {'speed-up':>9} {'2 processes':>12} {'speed-up':>9}")
    for name in fns:
        a, b, c = (med[(name, way)] for way in WAYS)
        print(f"  {name:<10} {a:>9.1f} {b:>10.1f} {a / b:>8.2f}x {c:>12.1f} {a / c:>8.2f}x")
    if with_torch:
        print("\n  refssl / torch:  " + ",  ".join(f"{way} {med[('vit', way)] / med[('vit torch', way)]:.2f}x"
                                                 for way in WAYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
