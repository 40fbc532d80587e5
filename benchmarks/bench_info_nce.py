"""Benchmark: info_nce forward + backward against the GEMM floor and torch autograd.

    python benchmarks/bench_info_nce.py [--threads 2] [--repeats 15] [--sizes 256,1024,2048] [--dims 128,256]

For each N (pairs), d and dtype it times

* refssl ``info_nce`` forward + backward (upstream gradient 1),
* the GEMM floor: the two matrix products any implementation needs, U U^T
  (2N x d times d x 2N) and one (2N x 2N)(2N x d) product,
* torch CPU autograd of the same formula (normalise, U U^T / tau, mask the
  diagonal, cross-entropy to the partner view, backward), if torch is installed,

all with the same number of threads, timed in turn (``_timing.interleaved``: the order rotating every
round, a short untimed pause before each call), and prints medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from _timing import interleaved, set_threads, torch_nt_xent_step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sizes", default="256,1024,2048")
    ap.add_argument("--dims", default="128,256")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--temperature", type=float, default=0.1)
    args = ap.parse_args(argv)
    set_threads(args.threads)  # before numpy/torch load their thread pools

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from refssl import registry

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None

    op = registry.get("info_nce")
    tau = args.temperature
    rng = np.random.default_rng(0)
    print(f"info_nce forward+backward, tau={tau}, {args.threads} threads, median of {args.repeats} "
          f"(torch {'%s' % torch.__version__ if torch else 'not installed'})")
    header = f"{'N':>5} {'d':>4} {'dtype':>7} | {'refssl ms':>9} {'floor ms':>9} {'torch ms':>9} | " \
             f"{'/floor':>6} {'/torch':>6}"
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes.split(","):
        dtype = np.dtype(dtype_name)
        for n in (int(s) for s in args.sizes.split(",")):
            for d in (int(s) for s in args.dims.split(",")):
                z1 = rng.standard_normal((n, d)).astype(dtype)
                z2 = (z1 + 0.5 * rng.standard_normal((n, d))).astype(dtype)

                def ours():
                    _, cache = op.forward(z1, z2, temperature=tau)
                    op.backward(cache, 1.0)

                u = rng.standard_normal((2 * n, d)).astype(dtype)
                ut = np.ascontiguousarray(u.T)
                m = rng.standard_normal((2 * n, 2 * n)).astype(dtype)
                fns = [ours, lambda: u @ u.T, lambda: u @ ut, lambda: m @ u]
                if torch is not None:
                    fns.append(torch_nt_xent_step(torch, z1, z2, tau))
                med = [statistics.median(t) for t in interleaved(fns, args.repeats)]
                t_ours, floor = med[0], min(med[1], med[2]) + med[3]
                t_torch = med[4] if torch is not None else float("nan")
                print(f"{n:>5} {d:>4} {dtype_name:>7} | {t_ours:>9.2f} {floor:>9.2f} {t_torch:>9.2f} | "
                      f"{t_ours / floor:>6.2f} {t_ours / t_torch:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
