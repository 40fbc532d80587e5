"""Benchmark: proto_nce and icon (+ cosine Gaussian kernel) forward + backward against torch autograd.

    python benchmarks/bench_protonce_icon.py [--threads 2] [--repeats 7]

proto_nce: batch N, width D, queue K, M = 3 clusterings of sizes K_m with r
sampled negative prototypes each (fixed indices, so both sides see the same
columns).  icon: the InfoNCE composition -- 2N stacked rows, cosine Gaussian
kernel, augmentation p, masked diagonal, alpha-debiasing.  With torch installed
it also prints the largest relative difference of the loss and of the
gradient between refssl and torch autograd, in float64.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from _timing import median_ms, set_threads


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    set_threads(args.threads)

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from refssl import registry
    from refssl.ops.icon_kernels import augmentation_kernel
    from refssl.ops.protonce import cluster_offsets, sample_negative_prototypes

    try:
        import torch

        torch.set_num_threads(args.threads)
        F = torch.nn.functional
    except ImportError:
        torch = None

    rng = np.random.default_rng(0)
    print(f"{args.threads} threads, median of {args.repeats}, torch {torch.__version__ if torch else 'not installed'}")

    # -- proto_nce ------------------------------------------------------------------------------
    op = registry.get("proto_nce")
    print("\nproto_nce forward+backward (tau 0.2)")
    print(f"{'N':>4} {'D':>4} {'K':>6} {'K_m':>18} {'r':>5} {'dtype':>7} | {'refssl ms':>9} {'torch ms':>9} "
          f"{'ratio':>6} | {'loss rel':>8} {'grad rel':>8}")
    for n, d, kq, nc, r in [(256, 128, 4096, (2500, 5000, 10000), 1024), (256, 128, 16384, (2500, 5000, 10000), 2048)]:
        for dtype in (np.float32, np.float64):
            q = rng.standard_normal((n, d)).astype(dtype)
            k = (q + 0.3 * rng.standard_normal((n, d))).astype(dtype)
            queue = rng.standard_normal((kq, d)).astype(dtype)
            queue /= np.linalg.norm(queue, axis=1, keepdims=True)
            protos = rng.standard_normal((sum(nc), d)).astype(dtype)
            protos /= np.linalg.norm(protos, axis=1, keepdims=True)
            phis = rng.uniform(0.1, 0.3, sum(nc)).astype(dtype)
            assign = np.stack([rng.integers(0, km, n) for km in nc])
            neg = sample_negative_prototypes(assign, nc, r, rng)
            kw = dict(num_clusters=nc, negative_indices=neg, temperature=0.2)

            def ours():
                op.backward(op.forward(q, k, queue, protos, assign, phis, **kw)[1], 1.0)

            t_ours = median_ms(ours, args.repeats)
            t_torch = rel_l = rel_g = float("nan")
            if torch is not None:
                cols = [torch.from_numpy(off + np.concatenate([assign[m], neg[m]]))
                        for m, off in enumerate(cluster_offsets(nc))]
                tk, tqu, tpr, tph = (torch.from_numpy(a) for a in (k, queue, protos, phis))
                target = torch.arange(n)

                def torch_loss(tq):
                    qh, kh = F.normalize(tq, dim=1), F.normalize(tk, dim=1)
                    inst = torch.cat([(qh * kh).sum(1, keepdim=True), qh @ F.normalize(tqu, dim=1).T], 1) / 0.2
                    loss = F.cross_entropy(inst, torch.zeros(n, dtype=torch.long))
                    ph = F.normalize(tpr, dim=1)
                    proto = sum(F.cross_entropy(qh @ ph[c].T / tph[c], target) for c in cols) / len(cols)
                    return loss + proto

                tq = torch.from_numpy(q).requires_grad_(True)

                def theirs():
                    tq.grad = None
                    torch_loss(tq).backward()

                t_torch = median_ms(theirs, args.repeats)
                if dtype == np.float64:
                    tq.grad = None
                    lt = torch_loss(tq)
                    lt.backward()
                    lo, cache = op.forward(q, k, queue, protos, assign, phis, **kw)
                    gq = op.backward(cache, 1.0)[0]
                    rel_l = abs(float(lo) - lt.item()) / abs(lt.item())
                    rel_g = float(np.max(np.abs(gq - tq.grad.numpy())) / np.max(np.abs(gq)))
            print(f"{n:>4} {d:>4} {kq:>6} {str(nc):>18} {r:>5} {np.dtype(dtype).name:>7} | {t_ours:>9.2f} "
                  f"{t_torch:>9.2f} {t_ours / t_torch:>6.2f} | {rel_l:>8.1e} {rel_g:>8.1e}", flush=True)

    # -- icon (InfoNCE composition) ------------------------------------------------------------
    icon, gauss = registry.get("icon"), registry.get("gaussian_kernel")
    tau, alpha = 0.1, 0.2
    print(f"\nicon(augmentation p, cosine Gaussian kernel, masked, alpha {alpha}) forward+backward (tau {tau})")
    print(f"{'2N':>5} {'D':>4} {'dtype':>7} | {'refssl ms':>9} {'torch ms':>9} {'ratio':>6} | {'loss rel':>8} "
          f"{'grad rel':>8}")
    for n, d in [(512, 128), (2048, 128)]:
        for dtype in (np.float32, np.float64):
            z = rng.standard_normal((n, d)).astype(dtype)
            p = augmentation_kernel(n // 2, 2, dtype=dtype)
            sigma = math.sqrt(tau / 2)

            def ours():
                logits, ck = gauss.forward(z, z, sigma=sigma, metric="cosine")
                loss, ci = icon.forward(p, logits, alpha=alpha)
                gx, gy = gauss.backward(ck, icon.backward(ci, 1.0)[1])
                return loss, gx + gy

            t_ours = median_ms(ours, args.repeats)
            t_torch = rel_l = rel_g = float("nan")
            if torch is not None:
                tp = torch.from_numpy(p)
                eye = torch.eye(n, dtype=torch.bool)
                pt = torch.where(eye, 0.0, (1 - alpha) * tp + alpha / (n - 1)).to(tp.dtype)

                def torch_loss(tz):
                    u = F.normalize(tz, dim=1)
                    logq = torch.log_softmax((u @ u.T / tau).masked_fill(eye, float("-inf")), dim=1)
                    logq = logq.masked_fill(eye, 0.0)
                    return (torch.xlogy(pt, pt) - pt * logq).sum(1).mean()

                tz = torch.from_numpy(z).requires_grad_(True)

                def theirs():
                    tz.grad = None
                    torch_loss(tz).backward()

                t_torch = median_ms(theirs, args.repeats)
                if dtype == np.float64:
                    tz.grad = None
                    lt = torch_loss(tz)
                    lt.backward()
                    lo, g = ours()
                    rel_l = abs(float(lo) - lt.item()) / abs(lt.item())
                    rel_g = float(np.max(np.abs(g - tz.grad.numpy())) / np.max(np.abs(g)))
            print(f"{n:>5} {d:>4} {np.dtype(dtype).name:>7} | {t_ours:>9.2f} {t_torch:>9.2f} "
                  f"{t_ours / t_torch:>6.2f} | {rel_l:>8.1e} {rel_g:>8.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
