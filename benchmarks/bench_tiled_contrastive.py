"""Benchmark: peak memory and time of the tiled info_nce / clip (``block_size``) against the dense path.

    python benchmarks/bench_tiled_contrastive.py [--threads 2] [--repeats 7] [--block 1024] [--dim 128]
        [--memory-sizes 8192,16384,65536] [--dense-memory-max 16384] [--time-sizes 8192]
        [--floor-size 1024] [--ops info_nce,clip] [--skip memory,time,floor]

"rows" is the side of the similarity matrix: 2N for info_nce (N pairs), N for clip.  float32 throughout.

* memory: each configuration runs in a fresh subprocess that reports the peak traced memory of one forward +
  backward, inputs included (tracemalloc; numpy registers its array allocations with it), and the process's
  peak resident size (ru_maxrss: adds the interpreter, numpy and the thread stacks).  The dense path is run
  only up to --dense-memory-max rows (at 65,536 its matrix alone is 16 GiB; it needs about 33 GiB).
* time: dense and tiled forward + backward alternate in one subprocess; medians over --repeats.
* floor: the dense info_nce at N = --floor-size pairs against the two-GEMM floor (U U^T and one
  (2N x 2N)(2N x d) product) and torch CPU autograd of the same formula (if installed), alternating.

The machine may be shared: timings are medians over repeats, and the minimum is printed beside them.
Targets (issue 12): tiled peak < 1 GiB at 2N = 65,536, d = 128; tiled time <= 1.3x dense at 2N = 8,192;
dense info_nce <= 1.25x the floor and <= 0.6x torch at N = 1,024.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _timing import set_threads, torch_nt_xent_step, use_checkout


def _inputs(op_name, rows, d, np):
    rng = np.random.default_rng(0)
    n = rows // 2 if op_name == "info_nce" else rows
    z1 = rng.standard_normal((n, d)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    if op_name == "info_nce":
        return (z1, z2), {"temperature": 0.1}
    return (z1, z2, np.asarray(2.6593, dtype=np.float32)), {}


def _child(cfg: dict) -> dict:
    set_threads(cfg["threads"])
    import resource
    import time
    import tracemalloc

    import numpy as np

    use_checkout()
    from refssl import registry

    if cfg["mode"] == "memory":
        op = registry.get(cfg["op"])
        kw_block = {} if cfg["block"] is None else {"block_size": cfg["block"]}
        tracemalloc.start()
        args, kw = _inputs(cfg["op"], cfg["rows"], cfg["dim"], np)
        t0 = time.perf_counter()
        out, cache = op.forward(*args, **kw, **kw_block)
        grads = op.backward(cache, 1.0)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del cache, grads
        return {"peak": peak, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "seconds": seconds, "loss": float(out)}

    if cfg["mode"] == "time":
        op = registry.get(cfg["op"])
        args, kw = _inputs(cfg["op"], cfg["rows"], cfg["dim"], np)
        variants = {"dense": {}, "tiled": {"block_size": cfg["block"]}}
        times = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        for rep in range(cfg["repeats"] + 1):  # the first round warms up
            for name, extra in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                _, cache = op.forward(*args, **kw, **extra)
                op.backward(cache, 1.0)
                if rep:
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                del cache
        return {"wall": times, "cpu": cpu}

    # floor: dense info_nce vs the two GEMMs vs torch autograd
    op = registry.get("info_nce")
    n, d, tau = cfg["rows"] // 2, cfg["dim"], 0.1
    (z1, z2), _ = _inputs("info_nce", cfg["rows"], d, np)
    rng = np.random.default_rng(1)
    u = rng.standard_normal((2 * n, d)).astype(np.float32)
    ut = np.ascontiguousarray(u.T)
    m = rng.standard_normal((2 * n, 2 * n)).astype(np.float32)

    def ours():
        _, cache = op.forward(z1, z2, temperature=tau)
        op.backward(cache, 1.0)

    def floor():
        u @ ut
        m @ u

    fns = {"refssl": ours, "floor": floor}
    try:
        import torch

        torch.set_num_threads(cfg["threads"])
        fns["torch"] = torch_nt_xent_step(torch, z1, z2, tau)
    except ImportError:
        pass
    times = {k: [] for k in fns}
    for rep in range(cfg["repeats"] + 2):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    return times


def _run_child(cfg: dict) -> dict:
    env = dict(os.environ)
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _mib(nbytes):
    return nbytes / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--memory-sizes", default="8192,16384,65536")
    ap.add_argument("--dense-memory-max", type=int, default=16384)
    ap.add_argument("--time-sizes", default="8192")
    ap.add_argument("--floor-size", type=int, default=1024, help="N pairs (2N rows) for the floor comparison")
    ap.add_argument("--ops", default="info_nce,clip")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: memory,time,floor")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    skip = set(filter(None, args.skip.split(",")))
    ops = args.ops.split(",")
    base = {"threads": args.threads, "dim": args.dim}
    print(f"float32, d = {args.dim}, block_size = {args.block}, {args.threads} threads; "
          f"rows = 2N (info_nce) or N (clip)", flush=True)

    if "memory" not in skip:
        print("\n== peak memory of one forward + backward (fresh process each; traced = numpy arrays incl. "
              "inputs) ==")
        print(f"{'op':>8} {'rows':>6} {'path':>6} | {'traced MiB':>10} {'maxrss MiB':>10} {'seconds':>8}")
        for op_name in ops:
            for rows in (int(s) for s in args.memory_sizes.split(",")):
                for block in (None, args.block):
                    if block is None and rows > args.dense_memory_max:
                        est = 2 * rows * rows * 4
                        print(f"{op_name:>8} {rows:>6} {'dense':>6} | skipped: two {rows}x{rows} float32 "
                              f"matrices alone are {est / 2**30:.0f} GiB", flush=True)
                        continue
                    r = _run_child({**base, "mode": "memory", "op": op_name, "rows": rows, "block": block})
                    path = "dense" if block is None else "tiled"
                    if "error" in r:
                        print(f"{op_name:>8} {rows:>6} {path:>6} | error: {r['error']}", flush=True)
                        continue
                    print(f"{op_name:>8} {rows:>6} {path:>6} | {_mib(r['peak']):>10.1f} {_mib(r['maxrss']):>10.1f} "
                          f"{r['seconds']:>8.2f}", flush=True)

    if "time" not in skip:
        print(f"\n== forward + backward time, dense and tiled alternating, median (min) of {args.repeats}; "
              "cpu = process CPU time of all threads ==")
        print(f"{'op':>8} {'rows':>6} {'clock':>5} | {'dense ms':>16} {'tiled ms':>16} | {'tiled/dense':>11}")
        for op_name in ops:
            for rows in (int(s) for s in args.time_sizes.split(",")):
                r = _run_child({**base, "mode": "time", "op": op_name, "rows": rows, "block": args.block,
                                "repeats": args.repeats})
                if "error" in r:
                    print(f"{op_name:>8} {rows:>6} | error: {r['error']}", flush=True)
                    continue
                for clock in ("wall", "cpu"):
                    dn, tl = r[clock]["dense"], r[clock]["tiled"]
                    print(f"{op_name:>8} {rows:>6} {clock:>5} | {1e3 * _med(dn):>8.0f} ({1e3 * min(dn):>5.0f}) "
                          f"{1e3 * _med(tl):>8.0f} ({1e3 * min(tl):>5.0f}) | "
                          f"{_med(tl) / _med(dn):>5.2f} ({min(tl) / min(dn):.2f})", flush=True)

    if "floor" not in skip:
        reps = max(args.repeats, 15)
        print(f"\n== dense info_nce at N = {args.floor_size} (2N = {2 * args.floor_size}) against the two-GEMM floor "
              f"and torch autograd, alternating, median (min) of {reps} ==")
        r = _run_child({**base, "mode": "floor", "rows": 2 * args.floor_size, "repeats": reps})
        if "error" in r:
            print(f"error: {r['error']}")
        else:
            med = {k: _med(v) for k, v in r.items()}
            mins = {k: min(v) for k, v in r.items()}
            print("  ".join(f"{k} {1e3 * med[k]:.1f} ms ({1e3 * mins[k]:.1f})" for k in r))
            print(f"refssl / floor = {med['refssl'] / med['floor']:.2f} ({mins['refssl'] / mins['floor']:.2f})"
                  + (f"   refssl / torch = {med['refssl'] / med['torch']:.2f} "
                     f"({mins['refssl'] / mins['torch']:.2f})" if "torch" in r else "   (torch not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
