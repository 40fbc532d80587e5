"""One training step of a ViT-tiny: refssl's hand-written backward vs the same model in torch autograd.

Model (``--model vit``, the default): ViT encoder D=128, 4 pre-norm blocks, 4 heads, MLP 512, 32x32x3
images in patches of 4 (64 patches + CLS = 65 tokens), fixed sin-cos positions, CLS pooling, then a
linear head to 10 classes and the mean softmax cross-entropy against random labels.  The loss head is the
same in both: refssl's registered ``linear`` + ``cross_entropy`` ops, torch's ``F.linear`` +
``F.cross_entropy``.  A step is forward + backward to every parameter gradient (no optimiser update: it
is the same handful of vector ops in both).  Batch 128, float32.

``--model mae`` times MAE instead (this encoder, mask ratio 0.75 so the encoder sees 16 patches + CLS,
decoder D=64 x 2 blocks over all 65 tokens, pixel MSE on the removed patches), totals only.

torch runs ``ports/torch/vit.py`` on the same weights (loaded from refssl's dict) and, for MAE, the same
masking; the losses and gradients are checked to float32 tolerance before anything is timed.  torch is
timed twice: attention written out (scores, softmax, weighted sum: the ops refssl computes) and with
``F.scaled_dot_product_attention`` (timm's fused path).  The ratio that counts is refssl / torch-SDPA.

Then a per-layer-type table: each op refssl's model calls, timed on its own on the same shapes, forward
and backward, times the number of calls per step; and the same layer written in torch autograd.

How it was run (2 cores; OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when the environment sets them for old
OpenBLAS builds, slow a current numpy, so they are unset for this command only):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_vit_step.py --threads 2

On a machine shared with other jobs the wall clock measures the other jobs too (calls are interleaved,
refssl, torch, refssl, ..., the order rotating every round, so that load falls on both alike, but BLAS
threads that wait on each other suffer most; each timed call follows a short untimed pause, so that torch's
OpenMP threads no longer spin when refssl starts: ``_timing.interleaved``).  Then ``--threads 1 --clock
cpu`` gives single-thread CPU time, which other processes change far less (only through shared caches and
cores):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_vit_step.py --threads 1 --clock cpu

Options: ``--batch 128 --repeats 15 --model vit|mae --no-layers --clock wall|cpu``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _timing import blas_info, interleaved, set_threads, use_checkout

CLASSES = 10
_clock = time.perf_counter  # --clock cpu: time.process_time


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--model", choices=["vit", "mae"], default="vit")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time, insensitive to other processes on a shared machine; "
                         "meaningful with --threads 1 only (with more, it adds up the threads, spin-waits included)")
    return ap.parse_args(argv)


def _median(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2]


def vit_tiny(np, rng, images, labels):
    """The benchmarked model: (vit, params, step), ``step()`` returning (loss, grads) of one refssl training
    step (forward + backward, no update) on ``images`` (N, 3, 32, 32) float32 and integer ``labels`` (N,).
    Parameters are drawn from ``rng``: the encoder's MAE initialisation, then the head."""
    from refssl.nn.transformer import ViT
    from refssl.ops import cross_entropy, linear

    vit = ViT(image_size=32, patch=4, in_channels=3, dim=128, depth=4, n_heads=4, mlp_ratio=4.0,
              pos="sincos", pool="cls")
    params = vit.init(rng, np.float32)[0]
    params["head.w"] = (rng.standard_normal((128, CLASSES)) / np.sqrt(128)).astype(np.float32)
    params["head.b"] = np.zeros(CLASSES, np.float32)
    enc_keys = [k for k in params if not k.startswith("head.")]

    def step():
        pooled, cache, _ = vit.forward({k: params[k] for k in enc_keys}, {}, images)
        logits, c_head = linear.linear_forward(pooled, params["head.w"], params["head.b"])
        loss, c_ce = cross_entropy.cross_entropy_forward(logits, labels)
        dlogits = cross_entropy.cross_entropy_backward(c_ce, 1.0)[0]
        dpooled, dhw, dhb = linear.linear_backward(c_head, dlogits)
        grads = vit.backward(cache, dpooled)[1]
        grads["head.w"], grads["head.b"] = dhw, dhb
        return loss, grads

    return vit, params, step


def torch_vit_tiny_loss(torch, tv, tp, timages, tlabels, sdpa):
    """The same model's loss in torch autograd (``ports/torch/vit.py``) on its weights ``tp`` (loaded from
    refssl's dict): attention written out, or ``F.scaled_dot_product_attention`` when ``sdpa``."""
    pooled = tv.vit_forward(tp, timages, patch=4, n_heads=4, pool="cls", sdpa=sdpa)
    return torch.nn.functional.cross_entropy(tv.linear(pooled, tp, "head"), tlabels)


def main(argv=None) -> int:
    global _clock
    args = _parse(argv)
    set_threads(args.threads)  # before numpy and torch start their thread pools
    if args.clock == "cpu":
        if args.threads != 1:
            raise SystemExit("--clock cpu measures process CPU time: use it with --threads 1")
        _clock = time.process_time

    import numpy as np
    use_checkout()
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing to compare against (pip install -e .[torch])")
        return 1
    torch.set_num_threads(args.threads)
    from ports.torch import vit as tv
    from refssl.nn.mae import MAE

    rng = np.random.default_rng(0)
    n = args.batch
    images = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, CLASSES, n)

    if args.model == "vit":
        vit, params, refssl_step = vit_tiny(np, rng, images, labels)
        tlabels = torch.as_tensor(labels)

        def torch_loss(tp, timages, sdpa):
            return torch_vit_tiny_loss(torch, tv, tp, timages, tlabels, sdpa)
        what = (f"ViT-tiny (D=128, 4 blocks, 4 heads, MLP 512, 65 tokens) + linear head + cross-entropy, "
                f"batch {n}")
    else:
        mae = MAE(image_size=32, patch=4, dim=128, depth=4, n_heads=4, dec_dim=64, dec_depth=2, dec_heads=4,
                  mlp_ratio=4.0, mask_ratio=0.75, norm_pix=False)
        params = mae.init(rng, np.float32)
        masks = mae.draw_masking(n, rng)

        def refssl_step():
            loss, cache = mae.loss(params, images, masks=masks)
            return loss, mae.backward(cache)

        def torch_loss(tp, timages, sdpa):
            return tv.mae_forward(tp, timages, *masks, patch=4, n_heads=4, dec_heads=4, sdpa=sdpa)
        what = f"MAE (encoder D=128 x 4 on 16 + 1 tokens, decoder D=64 x 2 on 65 tokens), mask 0.75, batch {n}"

    tp = tv.load_params(params, dtype=torch.float32)
    timages = torch.from_numpy(images)

    def torch_step(sdpa):
        for t in tp.values():
            t.grad = None
        loss = torch_loss(tp, timages, sdpa)
        loss.backward()
        return loss

    # -- the two compute the same function: check before timing --
    loss, grads = refssl_step()
    for sdpa in (False, True):
        tl = torch_step(sdpa)
        if not np.isclose(float(loss), tl.item(), rtol=1e-4, atol=1e-6):
            raise SystemExit(f"losses differ: refssl {float(loss):.7g}, torch (sdpa={sdpa}) {tl.item():.7g}")
        worst = max(float(np.max(np.abs(grads[k] - t.grad.numpy()))) / max(float(np.max(np.abs(t.grad.numpy()))),
                                                                           1e-30) for k, t in tp.items())
        if worst > 1e-3:
            raise SystemExit(f"gradients differ: worst scale-relative error {worst:.2e} (sdpa={sdpa})")
    print(f"{what}, float32, {args.threads} threads; torch {torch.__version__}, numpy {np.__version__}")
    print(blas_info())
    print(f"check: loss refssl {float(loss):.6f} torch {tl.item():.6f}; every gradient within 1e-3 of torch's "
          f"(scale-relative, worst {worst:.1e})")

    r = args.repeats
    load0 = os.getloadavg()[0]
    runs = dict(zip(("refssl", "exp", "sdpa"),
                    interleaved([refssl_step, lambda: torch_step(False), lambda: torch_step(True)], r,
                                clock=_clock)))
    med = {k: _median(v) for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}
    print(f"\nstep (forward + backward), median of {r} (best), {args.clock} clock; machine load average "
          f"{load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (above ~{args.threads}: other jobs)")
    print(f"  refssl                       {med['refssl']:8.1f} ms  ({best['refssl']:.1f})")
    print(f"  torch, attention written out {med['exp']:8.1f} ms  ({best['exp']:.1f})   refssl / torch = "
          f"{med['refssl'] / med['exp']:.2f}x")
    print(f"  torch, scaled_dot_product    {med['sdpa']:8.1f} ms  ({best['sdpa']:.1f})   refssl / torch = "
          f"{med['refssl'] / med['sdpa']:.2f}x   (target <= 1.5x)")
    per_round = sorted(a / b for a, b in zip(runs["refssl"], runs["sdpa"]))
    print(f"  refssl / torch-SDPA round by round: median {_median(per_round):.2f}x, middle half "
          f"{per_round[len(per_round) // 4]:.2f}-{per_round[(3 * len(per_round)) // 4]:.2f}x")

    if args.model == "vit" and not args.no_layers:
        layer_table(vit, params, images, labels, r, med, np, torch, tv)
    return 0


# -- per-layer-type table ------------------------------------------------------------------------------

ORDER = ["patch embed", "layer norm", "final norm", "qkv linear", "attention core", "proj linear", "fc1", "gelu", "fc2",
         "loss (head + CE)"]


def _refssl_layers(vit, params, images, labels, np):
    """{name: (calls per step, forward fn, backward fn)} on the model's shapes, calling what the model calls:
    its ``_ln`` / ``_lin`` helpers and the registered ops.  The attention core is the registered
    ``scaled_dot_product_attention`` on per-head q, k, v (the computation ``multi_head_attention`` runs
    between its two linears); "attention op" is that whole op, for the footnote."""
    from refssl.nn import transformer as T
    from refssl.nn.io import subdict
    from refssl.ops import activations, attention, cross_entropy, linear, norm_layers

    depth, d, heads = vit.depth, vit.dim, vit.n_heads
    b, length = len(images), vit.n_patches + 1
    pe = {k: v for k, v in params.items() if not k.startswith("head.")}
    pb = subdict(pe, "blocks.0")
    pa = subdict(pb, "attn")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, length, d)).astype(np.float32)
    hid = rng.standard_normal((b, length, vit.stack.blocks[0].hidden)).astype(np.float32)
    q, k, v = rng.standard_normal((3, b, heads, length, d // heads)).astype(np.float32)
    pooled = x[:, 0].copy()
    rows = {}

    def add(name, calls, fwd, bwd):
        out, cache = fwd()
        g = np.ones_like(out) if np.ndim(out) else 1.0
        rows[name] = (calls, fwd, lambda: bwd(cache, g))

    def loss_fwd():
        logits, c1 = linear.linear_forward(pooled, params["head.w"], params["head.b"])
        value, c2 = cross_entropy.cross_entropy_forward(logits, labels)
        return value, (c1, c2)

    def loss_bwd(c, g):
        linear.linear_backward(c[0], cross_entropy.cross_entropy_backward(c[1], g)[0])

    add("patch embed", 1, lambda: vit.embed_patches(pe, images), lambda c, g: vit.embed_patches_backward(c, g, {}))
    # the blocks' layer norms run without gamma and beta (applied through the next linear map); the final
    # norm with them
    add("layer norm", 2 * depth, lambda: norm_layers.layer_norm_forward(x, None, None, eps=T.LN_EPS),
        norm_layers.layer_norm_backward)
    add("final norm", 1, lambda: T._ln(pb, "norm1", x), lambda c, g: T._ln_backward(c, g, "norm1", {}))
    add("qkv linear", depth, lambda: T._lin(pa, "qkv", x), lambda c, g: T._lin_backward(c, g, "qkv", {}))
    add("attention core", depth, lambda: attention.scaled_dot_product_attention_forward(q, k, v),
        attention.scaled_dot_product_attention_backward)
    add("proj linear", depth, lambda: T._lin(pa, "proj", x), lambda c, g: T._lin_backward(c, g, "proj", {}))
    add("fc1", depth, lambda: T._lin(pb, "fc1", x), lambda c, g: T._lin_backward(c, g, "fc1", {}))
    add("gelu", depth, lambda: activations.gelu_forward(hid), activations.gelu_backward)
    add("fc2", depth, lambda: T._lin(pb, "fc2", hid), lambda c, g: T._lin_backward(c, g, "fc2", {}))
    add("loss (head + CE)", 1, loss_fwd, loss_bwd)
    add("attention op", 0, lambda: attention.multi_head_attention_forward(
        x, pa["qkv.w"], pa["qkv.b"], pa["proj.w"], pa["proj.b"], None, n_heads=heads),
        attention.multi_head_attention_backward)
    return rows


def _torch_layers(vit, params, images, labels, torch, tv):
    """The same layer types in torch autograd: {name: (calls, forward fn, backward fn)}; the attention core
    is ``F.scaled_dot_product_attention`` on per-head q, k, v, "attention written out" the explicit one."""
    import torch.nn.functional as F

    d, heads = vit.dim, vit.n_heads
    b, length = len(images), vit.n_patches + 1
    tp = tv.load_params(params, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, requires_grad=True)

    x, hid, pooled = leaf(b, length, d), leaf(b, length, vit.stack.blocks[0].hidden), leaf(b, d)
    q, k, v = (leaf(b, heads, length, d // heads) for _ in range(3))
    timages, tlabels = torch.from_numpy(images), torch.as_tensor(labels)
    pb = {key[len("blocks.0."):]: val for key, val in tp.items() if key.startswith("blocks.0.")}
    scale = (d // heads) ** -0.5

    norm = (lambda: F.layer_norm(x, (d,), pb["norm1.gamma"], pb["norm1.beta"], eps=tv.LN_EPS),
            [x, pb["norm1.gamma"], pb["norm1.beta"]])
    spec = {
        "patch embed": (1, lambda: tv.linear(tv.patchify(timages, vit.patch), tp, "patch"),
                        [tp["patch.w"], tp["patch.b"]]),
        "layer norm": (2 * vit.depth, *norm),  # torch's model applies gamma and beta in every norm
        "final norm": (1, *norm),
        "qkv linear": (vit.depth, lambda: tv.linear(x, pb, "attn.qkv"), [x, pb["attn.qkv.w"], pb["attn.qkv.b"]]),
        "attention core": (vit.depth, lambda: F.scaled_dot_product_attention(q, k, v), [q, k, v]),
        "attention written out": (0, lambda: torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v,
                                  [q, k, v]),
        "proj linear": (vit.depth, lambda: tv.linear(x, pb, "attn.proj"), [x, pb["attn.proj.w"], pb["attn.proj.b"]]),
        "fc1": (vit.depth, lambda: tv.linear(x, pb, "fc1"), [x, pb["fc1.w"], pb["fc1.b"]]),
        "gelu": (vit.depth, lambda: F.gelu(hid), [hid]),
        "fc2": (vit.depth, lambda: tv.linear(hid, pb, "fc2"), [hid, pb["fc2.w"], pb["fc2.b"]]),
        "loss (head + CE)": (1, lambda: F.cross_entropy(tv.linear(pooled, tp, "head"), tlabels),
                             [pooled, tp["head.w"], tp["head.b"]]),
    }
    rows = {}
    for name, (calls, fwd, inputs) in spec.items():
        out = fwd()
        rows[name] = (calls, fwd, lambda out=out, g=torch.ones_like(out), inputs=inputs:
                      torch.autograd.grad(out, inputs, g, retain_graph=True))
    return rows


def layer_table(vit, params, images, labels, repeats, med, np, torch, tv):
    ref = _refssl_layers(vit, params, images, labels, np)
    tch = _torch_layers(vit, params, images, labels, torch, tv)
    t, tt = {}, {}
    for name in ORDER + ["attention op", "attention written out"]:  # refssl and torch timed in turn
        fns = ([ref[name][1], ref[name][2]] if name in ref else []) + \
              ([tch[name][1], tch[name][2]] if name in tch else [])
        runs = [_median(r) for r in interleaved(fns, repeats, clock=_clock)]
        if name in ref:
            t[name], runs = tuple(runs[:2]), runs[2:]
        if name in tch:
            tt[name] = tuple(runs)

    print(f"\nper layer type, ms per call (median of {repeats}); n = calls per step; step ms = n (fwd + bwd); "
          f"torch = autograd of the same layer")
    hdr = (f"  {'layer':<18} {'n':>2} | {'refssl fwd':>10} {'bwd':>7} {'step ms':>8} {'share':>6} | "
           f"{'torch fwd':>9} {'bwd':>7} {'step ms':>8} | {'ratio':>5}")
    rule = "  " + "-" * (len(hdr) - 2)
    print(hdr)
    print(rule)
    tot_r = tot_t = 0.0
    for name in ORDER:
        c = ref[name][0]
        (f, b), (tf, tb) = t[name], tt[name]
        sr, st = c * (f + b), c * (tf + tb)
        tot_r, tot_t = tot_r + sr, tot_t + st
        print(f"  {name:<18} {c:>2} | {f:>10.2f} {b:>7.2f} {sr:>8.1f} {sr / med['refssl']:>6.0%} | "
              f"{tf:>9.2f} {tb:>7.2f} {st:>8.1f} | {sr / st:>5.2f}")
    print(rule)
    rest_r, rest_t = med["refssl"] - tot_r, med["sdpa"] - tot_t
    print(f"  {'sum of layers':<21} | {'':>10} {'':>7} {tot_r:>8.1f} {tot_r / med['refssl']:>6.0%} | "
          f"{'':>9} {'':>7} {tot_t:>8.1f} | {tot_r / tot_t:>5.2f}")
    print(f"  {'rest of the step':<21} | {'':>10} {'':>7} {rest_r:>8.1f} {rest_r / med['refssl']:>6.0%} | "
          f"{'':>9} {'':>7} {rest_t:>8.1f} |")
    print("  (rest: residual adds, head split / merge copies, CLS concatenation, slices, the folded norm weights, "
          "dict work; torch's rest is measured against its SDPA step)")
    (wf, wb) = t["attention op"]
    parts = [t[k] for k in ("qkv linear", "attention core", "proj linear")]
    print(f"  refssl multi_head_attention op whole: fwd {wf:.2f} bwd {wb:.2f} ms/call; its qkv linear + core + "
          f"proj timed apart: fwd {sum(p[0] for p in parts):.2f} bwd {sum(p[1] for p in parts):.2f} "
          f"(the difference is the head split / merge copies, less the validation the op skips)")
    ef, eb = tt["attention written out"]
    print(f"  torch attention core written out (scores, softmax, weighted sum): fwd {ef:.2f} bwd {eb:.2f} ms/call")


if __name__ == "__main__":
    sys.exit(main())
