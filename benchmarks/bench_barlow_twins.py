"""Forward + backward time of ``barlow_twins`` against torch CPU autograd of the same formula.

    python benchmarks/bench_barlow_twins.py [--threads 2] [--repeats 30] [--rounds 5]

Both sides run in float32 on the same inputs with the same number of threads
(set before numpy / torch are imported).  torch is optional: without it only
the refssl times are printed.  The torch side is the official formula
(facebookresearch/barlowtwins main.py): affine-free batch norm of each view,
C = z1n^T z2n / N, on-diagonal (C_ii - 1)^2 plus lambd * off-diagonal C_ij^2,
then ``loss.backward()``.  The table reports median times and their ratio
(refssl / torch; < 1 means refssl is faster).  refssl uses N x N Gram matrices
when N < D (derivations/ib_connection.md, BT2/BT3); the "DxD path" column forces the D x D
cross-correlation path for comparison.  Timing: best of ``--rounds`` (5)
rounds of the median of ``--repeats`` (30) calls, each op in its own block after 5 warm-up calls.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    return p.parse_args()


ARGS = _parse()
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from refssl import registry  # noqa: E402
from refssl.ops import redundancy  # noqa: E402

try:
    import torch
except ImportError:  # the comparison is optional
    torch = None

LAMBD = 0.0051


def _median_times(fns, repeats, warmup=5, rounds=5):
    """Per function: the best over ``rounds`` of the median of ``repeats`` timed calls.

    Each function runs in its own block after ``warmup`` untimed calls: interleaving single calls of
    numpy (OpenBLAS threads) and torch (OpenMP threads) makes the two spinning thread pools compete for
    the same cores and slows both.  Repeating the blocks in rounds evens out load from other processes.
    """
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[k] = min(best[k], float(np.median(times)))
    return best


def _refssl_step(op, z1, z2, gram=None):
    """refssl forward + backward; ``gram`` forces the N x N Gram path (True) or the D x D path (False)."""
    choose = redundancy._use_gram

    def step():
        if gram is not None:
            redundancy._use_gram = lambda n, d: gram
        try:
            loss, cache = op.forward(z1, z2, lambd=LAMBD)
            return loss, op.backward(cache, 1.0)
        finally:
            redundancy._use_gram = choose
    return step


def _torch_step(z1, z2):
    a = torch.from_numpy(z1).requires_grad_(True)
    b = torch.from_numpy(z2).requires_grad_(True)
    n, d = z1.shape

    def off_diagonal(x):  # the official code's strided view of the off-diagonal entries
        m = x.shape[0]
        return x.flatten()[:-1].view(m - 1, m + 1)[:, 1:].flatten()

    def step():
        a.grad = None
        b.grad = None
        an = torch.nn.functional.batch_norm(a, None, None, training=True, eps=1e-5)
        bn = torch.nn.functional.batch_norm(b, None, None, training=True, eps=1e-5)
        c = an.T @ bn / n
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
        loss = on_diag + LAMBD * off_diag
        loss.backward()
        return loss.detach(), a.grad, b.grad
    return step


def main():
    op = registry.get("barlow_twins")
    if torch is not None:
        torch.set_num_threads(ARGS.threads)
    rng = np.random.default_rng(0)
    rows = []
    for d in ARGS.dims:
        base = rng.standard_normal((ARGS.n, d)).astype(np.float32)
        z1 = base + 0.5 * rng.standard_normal((ARGS.n, d)).astype(np.float32)
        z2 = base + 0.5 * rng.standard_normal((ARGS.n, d)).astype(np.float32)
        ours = _refssl_step(op, z1, z2)
        cross = _refssl_step(op, z1, z2, gram=False)
        if torch is None:
            t_ours, t_cross = _median_times([ours, cross], ARGS.repeats, rounds=ARGS.rounds)
        else:
            theirs = _torch_step(z1, z2)
            t_ours, t_cross, t_torch = _median_times([ours, cross, theirs], ARGS.repeats, rounds=ARGS.rounds)
        row = {"N": ARGS.n, "D": d, "refssl_ms": 1e3 * t_ours, "cross_ms": 1e3 * t_cross}
        if torch is not None:
            l0, (g1, g2) = ours()
            l1, t1, t2 = theirs()
            row.update(torch_ms=1e3 * t_torch, ratio=t_ours / t_torch,
                       loss_rel=abs(float(l0) - float(l1)) / abs(float(l1)),
                       grad_rel=max(float(np.abs(g1 - t1.numpy()).max() / np.abs(t1.numpy()).max()),
                                    float(np.abs(g2 - t2.numpy()).max() / np.abs(t2.numpy()).max())))
        rows.append(row)

    print(f"barlow_twins forward+backward, float32, {ARGS.threads} threads, "
          f"best of {ARGS.rounds} rounds of the median of {ARGS.repeats}")
    if torch is None:
        print("torch not installed: refssl times only")
        print(f"{'N':>5} {'D':>6} {'refssl ms':>10} {'DxD path ms':>12}")
        for r in rows:
            print(f"{r['N']:>5} {r['D']:>6} {r['refssl_ms']:>10.2f} {r['cross_ms']:>12.2f}")
        return
    print(f"torch {torch.__version__}")
    print(f"{'N':>5} {'D':>6} {'refssl ms':>10} {'torch ms':>9} {'ratio':>6} {'DxD path ms':>12} "
          f"{'DxD ratio':>9} {'loss rel diff':>14} {'grad rel diff':>14}")
    for r in rows:
        print(f"{r['N']:>5} {r['D']:>6} {r['refssl_ms']:>10.2f} {r['torch_ms']:>9.2f} {r['ratio']:>6.2f} "
              f"{r['cross_ms']:>12.2f} {r['cross_ms'] / r['torch_ms']:>9.2f} "
              f"{r['loss_rel']:>14.2e} {r['grad_rel']:>14.2e}")
    print("ratio = refssl / torch (refssl picks the N x N Gram path when N < D); "
          "DxD path = refssl forced to form the D x D cross-correlation like torch")


if __name__ == "__main__":
    main()
