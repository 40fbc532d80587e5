"""One training step of the small CNN encoder: forward + backward + optimiser update.

Batch 256 of 32x32x3 float32 images, 2 threads, default ``refssl.nn.cnn_encoder`` (conv3x3-ReLU-maxpool
x3 with 16/32/64 channels, then Linear to 128).  The loss is a mean squared error to a fixed random
target (its cost is negligible next to the network's), the optimiser SGD with momentum.  Prints the median
of several timed steps, a per-layer breakdown, and the same step in PyTorch when torch is installed.

    python benchmarks/bench_cnn_step.py [--batch 256] [--repeats 10] [--norm batch]
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = os.environ.get("BENCH_THREADS", "2")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from _timing import times, use_checkout  # noqa: E402

use_checkout()
from refssl import nn, optim  # noqa: E402


def _median_time(fn, repeats):
    """Median and minimum over ``repeats`` timed calls after one warm-up call."""
    ts = times(fn, repeats)
    return statistics.median(ts), min(ts)


def bench_refssl(batch, repeats, norm):
    net = nn.cnn_encoder(norm=norm)
    params, state = net.init(np.random.default_rng(0), np.float32)
    opt = optim.SGD(lr=1e-3, momentum=0.9, weight_decay=1e-4)
    ostate = opt.init(params)
    x = np.random.default_rng(1).random((batch, 3, 32, 32), dtype=np.float32)
    target = np.random.default_rng(2).standard_normal((batch, 128)).astype(np.float32)
    box = {"p": params, "s": state, "o": ostate}

    def step():
        z, cache, box["s"] = net.forward(box["p"], box["s"], x, train=True)
        _, grads = net.backward(cache, (z - target) / batch, need_dx=False)  # gradient of the mean squared error / 2
        box["p"], box["o"] = opt.step(box["p"], grads, box["o"])

    total, best = _median_time(step, repeats)

    # Per-layer breakdown (forward and backward separately, one pass each after the warm-up).
    rows, h, caches = [], x, []
    for i, layer in enumerate(net.layers):
        sub = {k.split(".", 1)[1]: v for k, v in box["p"].items() if k.startswith(f"{i}.")}
        st = {k.split(".", 1)[1]: v for k, v in box["s"].items() if k.startswith(f"{i}.")}
        t0 = time.perf_counter()
        h, c, _ = layer.forward(sub, st, h, train=True)
        rows.append([f"{i}:{type(layer).__name__}", time.perf_counter() - t0, 0.0])
        caches.append(c)
    g = np.ones_like(h)
    for i in range(len(net.layers) - 1, -1, -1):
        t0 = time.perf_counter()
        g, _ = net.layers[i].backward(caches[i], g, need_dx=i > 0)
        rows[i][2] = time.perf_counter() - t0
    return (total, best), rows, sum(v.size for v in params.values())


def bench_torch(batch, repeats, norm, threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers, c_prev = [], 3
    for c in (16, 32, 64):
        layers += [torch.nn.Conv2d(c_prev, c, 3, padding=1, bias=norm is None)]
        if norm == "batch":
            layers.append(torch.nn.BatchNorm2d(c))
        layers += [torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        c_prev = c
    layers += [torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 128)]
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x = torch.rand(batch, 3, 32, 32)
    target = torch.randn(batch, 128)

    def step():
        opt.zero_grad(set_to_none=True)
        (0.5 * ((net(x) - target) ** 2).sum() / batch).backward()
        opt.step()

    return _median_time(step, repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--norm", choices=["none", "batch"], default="none")
    args = ap.parse_args()
    norm = None if args.norm == "none" else "batch"
    threads = int(os.environ["OMP_NUM_THREADS"])
    (total, best), rows, n_params = bench_refssl(args.batch, args.repeats, norm)
    print(f"small CNN ({n_params} parameters, norm={args.norm}), batch {args.batch}, 32x32x3 float32, "
          f"{threads} threads")
    print(f"refssl: {total * 1e3:8.1f} ms / step  ({args.batch / total:7.0f} images/s)  median of {args.repeats}"
          f" (best {best * 1e3:.1f} ms)")
    print("  per layer (ms):  forward  backward")
    for name, f, b in rows:
        print(f"    {name:<14s} {f * 1e3:8.1f} {b * 1e3:9.1f}")
    res = bench_torch(args.batch, args.repeats, norm, threads)
    if res is None:
        print("torch: not installed, comparison skipped")
    else:
        t, tbest = res
        print(f"torch : {t * 1e3:8.1f} ms / step  ({args.batch / t:7.0f} images/s)  median (best {tbest * 1e3:.1f} ms)"
              f"   refssl / torch = {total / t:.2f}x (best/best {best / tbest:.2f}x)")


if __name__ == "__main__":
    main()
