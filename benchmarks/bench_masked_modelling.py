"""Benchmark: masked-image-modelling ops, mask generators and the VQ-KD codebook EMA at ViT-B sizes.

    python benchmarks/bench_masked_modelling.py [--threads 2] [--repeats 7] [--batch 32] [--dtype float32]

For each op it times refssl forward + backward (upstream gradient 1 or ones) and, if torch is
installed, torch CPU autograd of the same formula with the same number of threads.  Sizes: 224 px
images, 16 px patches (L = 196, P = 768), MAE mask ratio 0.75, BEiT 75 masked of 196 with
vocabulary 8192, VQ-KD codebook 8192 x 32.  Mask generators are compared with a per-sample Python
loop of the official rules (what the official data loaders run, one image at a time).
"""

from __future__ import annotations

import argparse
import math
import random

from _timing import median_ms, set_threads, use_checkout


def _official_block_mask(h, w, target, lo, rnd):
    log_a = (math.log(0.3), math.log(1 / 0.3))
    import numpy as np

    mask = np.zeros((h, w), dtype=int)
    count = 0
    while count < target:
        room = target - count
        added = 0
        for _ in range(10):
            area = rnd.uniform(lo, room)
            aspect = math.exp(rnd.uniform(*log_a))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if bh < h and bw < w:
                top, left = rnd.randint(0, h - bh), rnd.randint(0, w - bw)
                new = bh * bw - mask[top:top + bh, left:left + bw].sum()
                if 0 < new <= room:
                    mask[top:top + bh, left:left + bw] = 1
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    set_threads(args.threads)

    import numpy as np

    use_checkout()
    from refssl import masking, state
    from refssl.ops import masked_modelling as mm

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None

    dt = np.dtype(args.dtype)
    n, r = args.batch, args.repeats
    rng = np.random.default_rng(0)
    rows = []

    def bench(name, ours, theirs=None):
        t_ours = median_ms(ours, r)
        t_torch = median_ms(theirs, r) if (theirs is not None and torch is not None) else float("nan")
        rows.append((name, t_ours, t_torch))

    # patchify (N, 3, 224, 224) -> (N, 196, 768)
    images = rng.standard_normal((n, 3, 224, 224)).astype(dt)
    g_p = np.ones((n, 196, 768), dt)

    def ours_patchify():
        _, c = mm.patchify_forward(images, patch=16)
        mm.patchify_backward(c, g_p)

    def torch_patchify():
        x = torch.from_numpy(images).requires_grad_(True)
        y = torch.einsum("nchpwq->nhwpqc", x.reshape(n, 3, 14, 16, 14, 16)).reshape(n, 196, 768)
        y.backward(torch.from_numpy(g_p))

    bench("patchify 224/16", ours_patchify, torch_patchify)

    # gather_tokens: MAE encoder keep (K = 49 of 196, D = 768) and a gather with repeats
    x = rng.standard_normal((n, 196, 768)).astype(dt)
    ids_keep, mask, ids_restore = masking.random_masking(n, 196, 0.75, rng)
    ids_rep = rng.integers(0, 196, size=(n, 49))

    def ours_gather(ids):
        def run():
            _, c = mm.gather_tokens_forward(x, ids)
            mm.gather_tokens_backward(c, np.ones((n, ids.shape[1], 768), dt))
        return run

    def torch_gather(ids):
        def run():
            tx = torch.from_numpy(x).requires_grad_(True)
            ti = torch.from_numpy(ids)[..., None].expand(-1, -1, 768)
            torch.gather(tx, 1, ti).sum().backward()
        return run

    bench("gather_tokens keep 49/196", ours_gather(ids_keep), torch_gather(ids_keep))
    bench("gather_tokens 49 w/ repeats", ours_gather(ids_rep), torch_gather(ids_rep))

    # mae_loss (N, 196, 768)
    pred = rng.standard_normal((n, 196, 768)).astype(dt)
    target = rng.standard_normal((n, 196, 768)).astype(dt)
    for norm_pix in (False, True):
        def ours_mae(norm_pix=norm_pix):
            _, c = mm.mae_loss_forward(pred, target, mask, norm_pix=norm_pix)
            mm.mae_loss_backward(c, 1.0)

        def torch_mae(norm_pix=norm_pix):
            tp = torch.from_numpy(pred).requires_grad_(True)
            tt = torch.from_numpy(target)
            tm = torch.from_numpy(mask.astype(dt))
            if norm_pix:
                tt = (tt - tt.mean(-1, keepdim=True)) / (tt.var(-1, keepdim=True) + 1e-6) ** 0.5
            ((((tp - tt) ** 2).mean(-1) * tm).sum() / tm.sum()).backward()

        bench(f"mae_loss norm_pix={norm_pix}", ours_mae, torch_mae)

    # masked_token_ce (N/4, 196, 8192): BEiT, 75 masked per image
    nb = max(1, n // 4)
    logits = rng.standard_normal((nb, 196, 8192)).astype(dt)
    targets = rng.integers(0, 8192, size=(nb, 196))
    bmask = masking.block_masking(nb, 14, 75, rng, min_num_patches=16)

    def ours_ce():
        _, c = mm.masked_token_ce_forward(logits, targets, bmask)
        mm.masked_token_ce_backward(c, 1.0)

    def torch_ce():
        tl = torch.from_numpy(logits).requires_grad_(True)
        tm = torch.from_numpy(bmask)
        torch.nn.functional.cross_entropy(tl[tm], torch.from_numpy(targets)[tm]).backward()

    bench(f"masked_token_ce N={nb} V=8192", ours_ce, torch_ce)

    # cosine_distill (N, 196, 512)
    p = rng.standard_normal((n, 196, 512)).astype(dt)
    t = rng.standard_normal((n, 196, 512)).astype(dt)

    def ours_cos():
        _, c = mm.cosine_distill_forward(p, t)
        mm.cosine_distill_backward(c, 1.0)

    def torch_cos():
        tp = torch.from_numpy(p).requires_grad_(True)
        tt = torch.from_numpy(t)
        (1 - (tp / tp.norm(dim=-1, keepdim=True) * (tt / tt.norm(dim=-1, keepdim=True))).sum(-1)).mean().backward()

    bench("cosine_distill (N,196,512)", ours_cos, torch_cos)

    # vector_quantize (N*196 rows, D = 32, K = 8192) and its EMA update
    z = rng.standard_normal((n, 196, 32)).astype(dt)
    codebook = rng.standard_normal((8192, 32)).astype(dt)
    codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    g_z = np.ones_like(z)

    def ours_vq():
        _, c = mm.vector_quantize_forward(z, codebook)
        mm.vector_quantize_backward(c, g_z)

    def torch_vq():
        tz = torch.from_numpy(z).requires_grad_(True)
        zh = torch.nn.functional.normalize(tz, dim=-1)
        flat = zh.reshape(-1, 32)
        tc = torch.from_numpy(codebook)
        d = flat.pow(2).sum(1, keepdim=True) + tc.pow(2).sum(1) - 2 * flat @ tc.t()
        zq = tc[d.argmin(1)].view(zh.shape)
        (zh + (zq - zh).detach()).backward(torch.from_numpy(g_z))

    bench(f"vector_quantize {n * 196}x8192x32", ours_vq, torch_vq)
    a = z.reshape(-1, 32)
    gemm = median_ms(lambda: a @ codebook.T, r)
    rows.append(("  (GEMM floor z c^T)", gemm, float("nan")))

    _, cache = mm.vector_quantize_forward(z, codebook)
    zh, idx = mm.vector_quantize_normalized_input(cache), mm.vector_quantize_indices(cache)
    size = np.zeros(8192, dt)

    def ours_ema():
        state.vq_ema_update(codebook, size, zh, idx)

    def torch_ema():  # the official recipe: one-hot encodings, embed_sum = z^T onehot
        with torch.no_grad():
            flat = torch.from_numpy(zh.reshape(-1, 32))
            enc = torch.nn.functional.one_hot(torch.from_numpy(idx.reshape(-1)), 8192).to(flat.dtype)
            bins = enc.sum(0)
            w = torch.from_numpy(codebook.copy())
            zero = bins == 0
            emb = torch.nn.functional.normalize((flat.t() @ enc / bins.masked_fill(zero, 1)).t(), dim=-1)
            emb = torch.where(zero[:, None], w, emb)
            w.mul_(0.99).add_(emb, alpha=0.01)
            torch.nn.functional.normalize(w, dim=-1)

    bench("vq_ema_update K=8192", ours_ema, torch_ema)

    # mask generators (256 images): vectorised vs a per-sample loop of the official rules
    rows.append(("random_masking 256x196", median_ms(lambda: masking.random_masking(256, 196, 0.75, rng), r),
                 float("nan")))
    rnd = random.Random(0)
    t_block = median_ms(lambda: masking.block_masking(256, 14, 75, rng, min_num_patches=16), r)
    t_loop = median_ms(lambda: [_official_block_mask(14, 14, 75, 16, rnd) for _ in range(256)], max(1, r // 2))
    rows.append(("block_masking 256x14x14", t_block, float("nan")))
    rows.append(("  (per-sample python loop)", t_loop, float("nan")))

    print(f"masked-image-modelling ops, {dt}, batch {n}, {args.threads} threads, median of {r} "
          f"(torch {torch.__version__ if torch else 'not installed'})")
    width = max(len(name) for name, _, _ in rows)
    print(f"{'op':<{width}} | {'refssl ms':>9} {'torch ms':>9} {'/torch':>6}")
    print("-" * (width + 30))
    for name, a_, b_ in rows:
        ratio = a_ / b_ if b_ == b_ else float("nan")
        print(f"{name:<{width}} | {a_:>9.2f} {b_:>9.2f} {ratio:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
