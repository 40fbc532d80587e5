"""One training step of the small CNN encoder: forward + backward + optimiser update, refssl vs torch.

Batch 256 of 32x32x3 float32 images, 2 threads, default ``refssl.nn.cnn_encoder`` (conv3x3-ReLU-maxpool
x3 with 16/32/64 channels, then Linear to 128).  The loss is a mean squared error to a fixed random
target (its cost is negligible next to the network's), the optimiser SGD with momentum.  torch runs the
same network (same weights, loaded from refssl's dict; the loss and every gradient are checked to float32
tolerance before anything is timed) in autograd.

The machine this runs on is shared, so the timings are noisy: the refssl and torch steps are run interleaved
in one process (in turn, the order rotating every round, each timed call after a short untimed pause so that
neither library's idle threads still spin when the other starts: ``_timing.interleaved``), so that a change
of load falls on both alike, and the medians are reported, with the median of the per-pair ratios. The
per-layer table times every layer of both networks the same way (forward and backward separately, on the
step's shapes, the upstream gradient in the memory layout of the layer's output for refssl and contiguous
for torch); a ReLU followed by a 2x2 max-pool is one row, as refssl's Sequential runs the pair as one fused
op. Layers timed one at a time reuse their freed memory, so the table's sum can fall short of the step,
where all the caches are alive at once and fresh pages are faulted in.

How it was run (2 cores; OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when the environment sets them for old
OpenBLAS builds, slow a current numpy, so they are unset for this command only):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_cnn_step.py

Options: ``--threads 2 --batch 256 --repeats 15 --norm none|batch --no-layers``.
"""

from __future__ import annotations

import argparse
import os
import statistics

from _timing import blas_info, interleaved, set_threads, use_checkout


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--norm", choices=["none", "batch"], default="none")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    return ap.parse_args(argv)


def _torch_net(torch, net, params, norm):
    """The same network in torch, with refssl's weights (Linear weights transposed to torch's layout)."""
    layers = []
    for i, layer in enumerate(net.layers):
        kind = type(layer).__name__
        if kind == "Conv2d":
            m = torch.nn.Conv2d(layer.c_in, layer.c_out, layer.kernel, stride=layer.stride, padding=layer.padding,
                                bias=layer.bias)
            m.weight.data = torch.from_numpy(params[f"{i}.w"].copy())
            if layer.bias:
                m.bias.data = torch.from_numpy(params[f"{i}.b"].copy())
        elif kind == "BatchNorm":
            m = torch.nn.BatchNorm2d(layer.channels, eps=layer.eps)
        elif kind == "ReLU":
            m = torch.nn.ReLU()
        elif kind == "MaxPool2d":
            m = torch.nn.MaxPool2d(layer.kernel)
        elif kind == "AvgPool2d":
            m = torch.nn.AvgPool2d(layer.kernel)
        elif kind == "Flatten":
            m = torch.nn.Flatten()
        elif kind == "Linear":
            m = torch.nn.Linear(layer.d_in, layer.d_out, bias=layer.bias)
            m.weight.data = torch.from_numpy(params[f"{i}.w"].T.copy())
            if layer.bias:
                m.bias.data = torch.from_numpy(params[f"{i}.b"].copy())
        else:
            raise SystemExit(f"no torch counterpart for {kind}")
        layers.append(m)
    return torch.nn.Sequential(*layers)


def main(argv=None) -> int:
    args = _parse(argv)
    set_threads(args.threads)  # before numpy and torch start their thread pools

    import numpy as np
    use_checkout()
    from refssl import nn, optim

    norm = None if args.norm == "none" else "batch"
    batch = args.batch
    net = nn.cnn_encoder(norm=norm)
    params, state = net.init(np.random.default_rng(0), np.float32)
    opt = optim.SGD(lr=1e-3, momentum=0.9, weight_decay=1e-4)
    x = np.random.default_rng(1).random((batch, 3, 32, 32), dtype=np.float32)
    target = np.random.default_rng(2).standard_normal((batch, 128)).astype(np.float32)
    box = {"p": dict(params), "s": state, "o": opt.init(params)}

    def refssl_step():
        z, cache, box["s"] = net.forward(box["p"], box["s"], x, train=True)
        _, grads = net.backward(cache, (z - target) / batch, need_dx=False)  # gradient of the mean squared error / 2
        box["p"], box["o"] = opt.step(box["p"], grads, box["o"])
        return z, grads

    n_params = sum(v.size for v in params.values())
    print(f"small CNN ({n_params} parameters, norm={args.norm}), batch {batch}, 32x32x3 float32, "
          f"{args.threads} threads; numpy {np.__version__}")
    print(blas_info())
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        r = interleaved([refssl_step], args.repeats)[0]
        print(f"refssl: {statistics.median(r):8.1f} ms / step, median of {args.repeats} (best {min(r):.1f}); "
              "torch not installed, comparison skipped")
        return 0
    torch.set_num_threads(args.threads)
    tnet = _torch_net(torch, net, params, norm)
    topt = torch.optim.SGD(tnet.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    tx, ttarget = torch.from_numpy(x), torch.from_numpy(target)

    def torch_step():
        topt.zero_grad(set_to_none=True)
        z = tnet(tx)
        (0.5 * ((z - ttarget) ** 2).sum() / batch).backward()
        topt.step()
        return z

    # -- the two compute the same function: check the first step (same weights) before timing --
    z, grads = refssl_step()
    tz = torch_step()
    tgrads = {f"{i}.{'w' if n == 'weight' else 'b'}": p.grad.numpy() for i, m in enumerate(tnet)
              for n, p in m.named_parameters() if n in ("weight", "bias") and type(m).__name__ != "BatchNorm2d"}
    worst_z = float(np.max(np.abs(z - tz.detach().numpy())) / np.max(np.abs(z)))
    worst_g = 0.0
    for k, tg in tgrads.items():
        g = grads[k].T if k.endswith(".w") and grads[k].ndim == 2 else grads[k]
        worst_g = max(worst_g, float(np.max(np.abs(g - tg)) / max(float(np.max(np.abs(tg))), 1e-30)))
    # A near-tie in a max-pool window can route one gradient entry differently in the two float32
    # computations (about 1e-4 of the gradient scale here); a real error is of order 1.
    if worst_z > 1e-4 or worst_g > 1e-2:
        raise SystemExit(f"refssl and torch differ: output {worst_z:.1e}, worst gradient {worst_g:.1e}")
    print(f"check: output and every gradient match torch's (scale-relative: output {worst_z:.1e}, "
          f"gradients {worst_g:.1e})")

    r = args.repeats
    ts, tt = interleaved([refssl_step, torch_step], r)
    ratios = [a / b for a, b in zip(ts, tt)]
    ms, mt = statistics.median(ts), statistics.median(tt)
    print(f"\nstep (forward + backward + SGD), interleaved, median of {r} (best):")
    print(f"  refssl {ms:8.1f} ms  ({min(ts):.1f})  {batch / ms * 1e3:6.0f} images/s")
    print(f"  torch  {mt:8.1f} ms  ({min(tt):.1f})  {batch / mt * 1e3:6.0f} images/s")
    print(f"  refssl / torch = {ms / mt:.2f}x (ratio of medians); median of per-pair ratios "
          f"{statistics.median(ratios):.2f}x; best/best {min(ts) / min(tt):.2f}x   (target <= 1.5x)")
    if not args.no_layers:
        layer_table(net, box, tnet, x, r, np, torch)
    return 0


def layer_table(net, box, tnet, x, repeats, np, torch):
    """Forward and backward of every layer on the step's shapes, refssl and torch interleaved.

    A ReLU followed by a 2x2 max-pool is one row: refssl's Sequential runs the pair as one fused op, so
    that op is timed (and torch's two modules together)."""
    from refssl.nn.layers import _relu_then_max_pool2x2
    from refssl.ops import pooling

    rows, h = [], x
    th = torch.from_numpy(x)
    i = 0
    while i < len(net.layers):
        layer = net.layers[i]
        need_dx = i > 0
        tin = th.detach().clone().requires_grad_(need_dx)
        if _relu_then_max_pool2x2(net.layers, i):
            name, span = f"{i}-{i + 1}:ReLU+MaxPool", 2
            tmod = torch.nn.Sequential(tnet[i], tnet[i + 1])
            out, cache = pooling.relu_max_pool2x2_forward(h)

            def r_fwd(h=h):
                pooling.relu_max_pool2x2_forward(h)

            def r_bwd_of(g, cache=cache):
                return lambda: pooling.relu_max_pool2x2_backward(cache, g)
        else:
            name, span = f"{i}:{type(layer).__name__}", 1
            tmod = tnet[i]
            sub = {k.split(".", 1)[1]: v for k, v in box["p"].items() if k.startswith(f"{i}.")}
            st = {k.split(".", 1)[1]: v for k, v in box["s"].items() if k.startswith(f"{i}.")}
            out, cache, _ = layer.forward(sub, st, h, train=True)

            def r_fwd(layer=layer, sub=sub, st=st, h=h):
                layer.forward(sub, st, h, train=True)

            def r_bwd_of(g, layer=layer, cache=cache, need_dx=need_dx):
                return lambda: layer.backward(cache, g, need_dx=need_dx)
        # The upstream gradient in the memory layout the next layer's backward would hand over (that of
        # the output: channels-last after a convolution), and contiguous for torch.
        g = np.empty_like(out)
        g[...] = np.random.default_rng(i).standard_normal(out.shape)
        tg = torch.from_numpy(np.ascontiguousarray(g))
        tout = tmod(tin)

        def t_fwd(m=tmod, tin=tin):
            m(tin)

        def t_bwd(tout=tout, tg=tg):
            tout.backward(tg, retain_graph=True)

        rf, rb, tf, tb = (statistics.median(t) for t in interleaved([r_fwd, r_bwd_of(g), t_fwd, t_bwd], repeats))
        rows.append((name, rf, rb, tf, tb))
        h, th = out, tout.detach()
        i += span
    print(f"\nper layer, ms (median of {repeats}, refssl and torch interleaved):")
    print(f"  {'layer':<18s} {'refssl fwd':>10s} {'bwd':>7s} {'torch fwd':>10s} {'bwd':>7s}")
    for name, rf, rb, tf, tb in rows:
        print(f"  {name:<18s} {rf:10.1f} {rb:7.1f} {tf:10.1f} {tb:7.1f}")
    tot = [sum(r[k] for r in rows) for k in range(1, 5)]
    print(f"  {'sum':<18s} {tot[0]:10.1f} {tot[1]:7.1f} {tot[2]:10.1f} {tot[3]:7.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
