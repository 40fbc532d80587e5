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

Options: ``--batch 128 --repeats 15 --model vit|mae --no-layers``.
"""

from __future__ import annotations

import argparse
import os
import sys

import time

from _timing import set_threads, use_checkout

CLASSES = 10


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--model", choices=["vit", "mae"], default="vit")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    return ap.parse_args(argv)


def interleaved(fns, repeats: int, warmup: int = 1) -> list[list[float]]:
    """Milliseconds of ``repeats`` calls of each fn, taken in turn (a, b, c, a, b, c, ...) so that a change
    in the machine's load during the run falls on all of them alike."""
    for f in fns:
        for _ in range(warmup):
            f()
    out = [[] for _ in fns]
    for _ in range(repeats):
        for f, ts in zip(fns, out):
            t0 = time.perf_counter()
            f()
            ts.append(1e3 * (time.perf_counter() - t0))
    return out


def _median(ts):
    ts = sorted(ts)
    return ts[len(ts) // 2]


def _blas_info():
    """Which BLAS kernel numpy runs (threadpoolctl, when installed) and the OpenBLAS overrides in force."""
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    try:
        from threadpoolctl import threadpool_info
        libs = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} x{i.get('num_threads')}"
                for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        libs = ["(threadpoolctl not installed: kernel not shown)"]
    return f"BLAS: {'; '.join(libs)}; OpenBLAS overrides: {env or 'none'}"


def main(argv=None) -> int:
    args = _parse(argv)
    set_threads(args.threads)  # before numpy and torch start their thread pools

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
    from refssl.nn.transformer import ViT
    from refssl.ops import cross_entropy, linear

    rng = np.random.default_rng(0)
    n = args.batch
    images = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, CLASSES, n)

    if args.model == "vit":
        vit = ViT(image_size=32, patch=4, in_channels=3, dim=128, depth=4, n_heads=4, mlp_ratio=4.0,
                  pos="sincos", pool="cls")
        params = vit.init(rng, np.float32)[0]
        params["head.w"] = (rng.standard_normal((128, CLASSES)) / np.sqrt(128)).astype(np.float32)
        params["head.b"] = np.zeros(CLASSES, np.float32)
        enc_keys = [k for k in params if not k.startswith("head.")]

        def refssl_step():
            pooled, cache, _ = vit.forward({k: params[k] for k in enc_keys}, {}, images)
            logits, c_head = linear.linear_forward(pooled, params["head.w"], params["head.b"])
            loss, c_ce = cross_entropy.cross_entropy_forward(logits, labels)
            dlogits = cross_entropy.cross_entropy_backward(c_ce, 1.0)[0]
            dpooled, dhw, dhb = linear.linear_backward(c_head, dlogits)
            grads = vit.backward(cache, dpooled)[1]
            grads["head.w"], grads["head.b"] = dhw, dhb
            return loss, grads

        tlabels = torch.as_tensor(labels)

        def torch_loss(tp, timages, sdpa):
            pooled = tv.vit_forward(tp, timages, patch=4, n_heads=4, pool="cls", sdpa=sdpa)
            return torch.nn.functional.cross_entropy(tv.linear(pooled, tp, "head"), tlabels)
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
    print(_blas_info())
    print(f"check: loss refssl {float(loss):.6f} torch {tl.item():.6f}; every gradient within 1e-3 of torch's "
          f"(scale-relative, worst {worst:.1e})")

    r = args.repeats
    runs = dict(zip(("refssl", "exp", "sdpa"),
                    interleaved([refssl_step, lambda: torch_step(False), lambda: torch_step(True)], r)))
    med = {k: _median(v) for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}
    print(f"\nstep (forward + backward), median of {r} (best):")
    print(f"  refssl                       {med['refssl']:8.1f} ms  ({best['refssl']:.1f})")
    print(f"  torch, attention written out {med['exp']:8.1f} ms  ({best['exp']:.1f})   refssl / torch = "
          f"{med['refssl'] / med['exp']:.2f}x")
    print(f"  torch, scaled_dot_product    {med['sdpa']:8.1f} ms  ({best['sdpa']:.1f})   refssl / torch = "
          f"{med['refssl'] / med['sdpa']:.2f}x   (target <= 1.5x)")

    if args.model == "vit" and not args.no_layers:
        layer_table(vit, params, images, labels, r, med, np, torch, tv)
    return 0


# -- per-layer-type table ------------------------------------------------------------------------------

def _refssl_layers(vit, params, images, labels, np):
    """(name, calls per step, forward fn, backward fn) for each layer type, on the model's shapes, calling
    the same functions the model calls (its ``_ln`` / ``_lin`` helpers and the registered ops)."""
    from refssl.nn import transformer as T
    from refssl.nn.io import subdict
    from refssl.ops import activations, attention, cross_entropy, linear

    depth, d = vit.depth, vit.dim
    pe = {k: v for k, v in params.items() if not k.startswith("head.")}
    pb = subdict(pe, "blocks.0")
    pa = subdict(pb, "attn")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((len(images), vit.n_patches + 1, d)).astype(np.float32)
    hid = rng.standard_normal((len(images), vit.n_patches + 1, vit.stack.blocks[0].hidden)).astype(np.float32)
    pooled = x[:, 0].copy()
    rows = []

    def add(name, calls, fwd, bwd):
        out, cache = fwd()
        g = np.ones_like(out) if np.ndim(out) else 1.0
        rows.append((name, calls, fwd, lambda: bwd(cache, g)))

    add("patch embed", 1, lambda: vit.embed_patches(pe, images),
        lambda c, g: vit.embed_patches_backward(c, g, {}))
    add("layer norm", 2 * depth + 1, lambda: T._ln(pb, "norm1", x), lambda c, g: T._ln_backward(c, g, "norm1", {}))
    add("qkv linear", depth, lambda: T._lin(pa, "qkv", x), lambda c, g: T._lin_backward(c, g, "qkv", {}))
    add("attention (whole op)", 0, lambda: attention.multi_head_attention_forward(
        x, pa["qkv.w"], pa["qkv.b"], pa["proj.w"], pa["proj.b"], None, n_heads=vit.n_heads),
        attention.multi_head_attention_backward)
    qkv = rng.standard_normal((3, len(images), vit.n_heads, vit.n_patches + 1, d // vit.n_heads)).astype(np.float32)
    add("sdpa op", 0, lambda: attention.scaled_dot_product_attention_forward(qkv[0], qkv[1], qkv[2]),
        attention.scaled_dot_product_attention_backward)
    add("proj linear", depth, lambda: T._lin(pa, "proj", x), lambda c, g: T._lin_backward(c, g, "proj", {}))
    add("fc1", depth, lambda: T._lin(pb, "fc1", x), lambda c, g: T._lin_backward(c, g, "fc1", {}))
    add("gelu", depth, lambda: activations.gelu_forward(hid), activations.gelu_backward)
    add("fc2", depth, lambda: T._lin(pb, "fc2", hid), lambda c, g: T._lin_backward(c, g, "fc2", {}))

    def loss_fwd():
        logits, c1 = linear.linear_forward(pooled, params["head.w"], params["head.b"])
        value, c2 = cross_entropy.cross_entropy_forward(logits, labels)
        return value, (c1, c2)

    def loss_bwd(c, g):
        linear.linear_backward(c[0], cross_entropy.cross_entropy_backward(c[1], g)[0])

    add("loss (head + CE)", 1, loss_fwd, loss_bwd)
    return rows


def _torch_layers(vit, params, images, labels, torch, tv):
    """The same layer types in torch autograd: (name, calls, forward fn, backward fn)."""
    import torch.nn.functional as F

    d, heads = vit.dim, vit.n_heads
    dh = d // heads
    tp = tv.load_params(params, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    b, length = len(images), vit.n_patches + 1
    x = torch.randn(b, length, d, generator=gen, requires_grad=True)
    x3 = torch.randn(b, length, 3 * d, generator=gen, requires_grad=True)
    hid = torch.randn(b, length, vit.stack.blocks[0].hidden, generator=gen, requires_grad=True)
    pooled = torch.randn(b, d, generator=gen, requires_grad=True)
    timages, tlabels = torch.from_numpy(images), torch.as_tensor(labels)
    pb = {k[len("blocks.0."):]: v for k, v in tp.items() if k.startswith("blocks.0.")}

    def core(qkv, sdpa):
        q, k, v = qkv.reshape(b, length, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
        if sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax((q @ k.transpose(-2, -1)) * dh ** -0.5, dim=-1) @ v
        return o.transpose(1, 2).reshape(b, length, d)

    spec = [
        ("patch embed", 1, lambda: tv.linear(tv.patchify(timages, vit.patch), tp, "patch"),
         [tp["patch.w"], tp["patch.b"]]),
        ("layer norm", 2 * vit.depth + 1,
         lambda: F.layer_norm(x, (d,), pb["norm1.gamma"], pb["norm1.beta"], eps=tv.LN_EPS),
         [x, pb["norm1.gamma"], pb["norm1.beta"]]),
        ("qkv linear", vit.depth, lambda: tv.linear(x, pb, "attn.qkv"), [x, pb["attn.qkv.w"], pb["attn.qkv.b"]]),
        ("attn core (written out)", vit.depth, lambda: core(x3, False), [x3]),
        ("attn core (sdpa)", 0, lambda: core(x3, True), [x3]),
        ("proj linear", vit.depth, lambda: tv.linear(x, pb, "attn.proj"), [x, pb["attn.proj.w"], pb["attn.proj.b"]]),
        ("fc1", vit.depth, lambda: tv.linear(x, pb, "fc1"), [x, pb["fc1.w"], pb["fc1.b"]]),
        ("gelu", vit.depth, lambda: F.gelu(hid), [hid]),
        ("fc2", vit.depth, lambda: tv.linear(hid, pb, "fc2"), [hid, pb["fc2.w"], pb["fc2.b"]]),
        ("loss (head + CE)", 1, lambda: F.cross_entropy(tv.linear(pooled, tp, "head"), tlabels),
         [pooled, tp["head.w"], tp["head.b"]]),
    ]
    rows = []
    for name, calls, fwd, inputs in spec:
        out = fwd()
        g = torch.ones_like(out)
        rows.append((name, calls, fwd,
                     lambda out=out, g=g, inputs=inputs: torch.autograd.grad(out, inputs, g, retain_graph=True)))
    return rows


def layer_table(vit, params, images, labels, repeats, med, np, torch, tv):
    ref = _refssl_layers(vit, params, images, labels, np)
    tch = {name: (calls, f, b) for name, calls, f, b in _torch_layers(vit, params, images, labels, torch, tv)}
    t, tt = {}, {}
    for name, _, f, b in ref:  # each refssl layer timed in turn with its torch twin
        twin = tch.get(name)
        runs = interleaved([f, b] + ([twin[1], twin[2]] if twin else []), repeats)
        t[name] = (_median(runs[0]), _median(runs[1]))
        if twin:
            tt[name] = (_median(runs[2]), _median(runs[3]))
    for name in ("attn core (written out)", "attn core (sdpa)"):
        runs = interleaved([tch[name][1], tch[name][2]], repeats)
        tt[name] = (_median(runs[0]), _median(runs[1]))

    # The attention op holds qkv and proj; its core (scores, mask, softmax, weighted sum, head reshapes)
    # is the whole op less the two linears timed on their own.
    whole = t.pop("attention (whole op)")
    sdpa_op = t.pop("sdpa op")
    core = tuple(w - q - p for w, q, p in zip(whole, t["qkv linear"], t["proj linear"]))
    order = ["patch embed", "layer norm", "qkv linear", "attention core", "proj linear", "fc1", "gelu", "fc2",
             "loss (head + CE)"]
    t["attention core"] = core
    calls = {name: c for name, c, _, _ in ref}
    calls["attention core"] = vit.depth
    tt["attention core"] = tt["attn core (sdpa)"]

    print(f"\nper layer type, median of {repeats} per call; 'x n' = calls per step; torch = autograd of the "
          f"same layer (attention core: SDPA; written out in the last line)")
    hdr = (f"  {'layer':<18} {'n':>2} | {'refssl fwd':>10} {'bwd':>7} {'step ms':>8} {'share':>6} | "
           f"{'torch fwd':>9} {'bwd':>7} {'step ms':>8} | {'ratio':>5}")
    print(hdr)
    print("  " + "-" * (len(hdr) - 2))
    tot_r = tot_t = 0.0
    for name in order:
        c = calls[name]
        f, b = t[name]
        tf, tb = tt[name]
        sr, st = c * (f + b), c * (tf + tb)
        tot_r += sr
        tot_t += st
        print(f"  {name:<18} {c:>2} | {f:>10.2f} {b:>7.2f} {sr:>8.1f} {sr / med['refssl']:>6.0%} | "
              f"{tf:>9.2f} {tb:>7.2f} {st:>8.1f} | {sr / st:>5.2f}")
    print("  " + "-" * (len(hdr) - 2))
    print(f"  {'sum of layers':<21} | {'':>10} {'':>7} {tot_r:>8.1f} {tot_r / med['refssl']:>6.0%} | "
          f"{'':>9} {'':>7} {tot_t:>8.1f} | {tot_r / tot_t:>5.2f}")
    print(f"  {'rest of the step':<21} | {'':>10} {'':>7} {med['refssl'] - tot_r:>8.1f} "
          f"{(med['refssl'] - tot_r) / med['refssl']:>6.0%} | {'':>9} {'':>7} {med['sdpa'] - tot_t:>8.1f} |"
          f"   (residual adds, concatenations, slices, dict work)")
    print("  attention core, refssl = multi_head_attention op less its two linears "
          f"(op whole: fwd {whole[0]:.2f} bwd {whole[1]:.2f} ms/call);")
    print(f"    refssl scaled_dot_product_attention op alone: fwd {sdpa_op[0]:.2f} bwd {sdpa_op[1]:.2f} ms/call;"
          f"  torch core written out: fwd {tt['attn core (written out)'][0]:.2f} "
          f"bwd {tt['attn core (written out)'][1]:.2f} ms/call")


if __name__ == "__main__":
    sys.exit(main())
