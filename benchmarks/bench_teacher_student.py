"""Benchmark and cross-check: teacher-student ops against torch autograd of the official formulas.

    python benchmarks/bench_teacher_student.py [--threads 2] [--repeats 9] [--ops byol,dino,...]

For each op, at a training-like size, it

* evaluates refssl and an independent torch re-implementation of the official
  code path (stop-gradients by ``detach``, gradients by autograd) in float64 and
  prints the largest relative difference of the value and of the gradients;
* times forward + backward (upstream gradient 1) of both in float32 with the
  same number of threads and prints medians and the ratio refssl / torch.

torch is optional: without it only the refssl timings are printed.
"""

from __future__ import annotations

import argparse
import os
import sys

from _timing import median_ms, set_threads


def _cases(np, rng):
    """name -> (args, kwargs) at a training-like (reduced where the official size is huge) scale."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    n, d = 256, 256
    r = lambda *s: rng.standard_normal(s)  # noqa: E731
    return {
        "byol": ((r(n, d), r(n, d), r(n, d), r(n, d)), {}),
        "simsiam": ((r(n, d), r(n, d), r(n, d), r(n, d)), {}),
        "moco_v3": ((r(n, d), r(n, d), r(n, d), r(n, d)), {"temperature": 0.2}),
        "moco_queue": ((r(n, 128), r(n, 128), unit(r(16384, 128))), {"temperature": 0.2}),
        # 2 global + 8 local crops, K reduced from 65536 to 4096.
        "dino": ((r(10, 64, 4096), r(2, 64, 4096), 0.1 * r(4096)), {"student_temp": 0.1, "teacher_temp": 0.04}),
        "nnclr": ((r(n, d), r(n, d), r(n, d), r(n, d), unit(r(16384, d))), {"temperature": 0.1}),
        "mean_shift": ((r(n, 512), r(n, 512), unit(r(16384, 512))), {"k": 5, "ptr": 1024}),
    }


def _torch_losses(torch):
    F = torch.nn.functional

    def byol(p1, p2, t1, t2):
        def reg(x, y):  # deepmind helpers.regression_loss with the JAX normalisation
            xn = x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=1e-12))
            yn = y * torch.rsqrt(torch.clamp((y * y).sum(-1, keepdim=True), min=1e-12))
            return ((xn - yn) ** 2).sum(-1)
        return (reg(p1, t2.detach()) + reg(p2, t1.detach())).mean()

    def simsiam(p1, p2, z1, z2):
        return -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=1).mean()
                       + F.cosine_similarity(p2, z1.detach(), dim=1).mean())

    def moco_v3(q1, q2, k1, k2, temperature):
        def ctr(q, k):
            q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
            logits = q @ k.T / temperature
            labels = torch.arange(q.shape[0])
            return F.cross_entropy(logits, labels) * (2 * temperature)
        return ctr(q1, k2) + ctr(q2, k1)

    def moco_queue(q, k, queue, temperature):
        q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k)[:, None]
        l_neg = q @ queue.detach().T
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))

    def dino(student, teacher, center, student_temp, teacher_temp):
        s = (student / student_temp).unbind(0)
        t = F.softmax((teacher - center) / teacher_temp, dim=-1).detach().unbind(0)
        total, terms = 0.0, 0
        for iq, q in enumerate(t):
            for v in range(len(s)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                terms += 1
        return total / terms

    def nnclr(p1, p2, z1, z2, support, temperature):
        with torch.no_grad():
            sn = F.normalize(support, dim=1)
            nn1 = sn[(F.normalize(z1, dim=1) @ sn.T).argmax(1)]
            nn2 = sn[(F.normalize(z2, dim=1) @ sn.T).argmax(1)]
        labels = torch.arange(p1.shape[0])

        def ce(nn, p):
            return F.cross_entropy(nn @ F.normalize(p, dim=1).T / temperature, labels)
        return 0.5 * ce(nn1, p2) + 0.5 * ce(nn2, p1)

    def mean_shift(query, target, bank, k, ptr):
        query = F.normalize(query, dim=1)
        with torch.no_grad():
            t = F.normalize(target, dim=1)
            mem = bank.clone()
            mem[ptr:ptr + t.shape[0]] = t  # official enqueue (no wrap at this size)
        dist_t = 2 - 2 * t @ mem.T
        dist_q = 2 - 2 * query @ mem.T
        _, idx = dist_t.topk(k, dim=1, largest=False)
        return (torch.gather(dist_q, 1, idx).sum(1) / k).mean()

    return {"byol": byol, "simsiam": simsiam, "moco_v3": moco_v3, "moco_queue": moco_queue, "dino": dino,
            "nnclr": nnclr, "mean_shift": mean_shift}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--ops", default="byol,simsiam,moco_v3,moco_queue,dino,nnclr,mean_shift")
    args = ap.parse_args(argv)
    set_threads(args.threads)  # before numpy/torch start their thread pools

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from refssl import registry

    try:
        import torch

        torch.set_num_threads(args.threads)
        torch_losses = _torch_losses(torch)
    except ImportError:
        torch, torch_losses = None, {}

    cases = _cases(np, np.random.default_rng(0))
    print(f"teacher-student ops, forward+backward, {args.threads} threads, median of {args.repeats} "
          f"(torch {torch.__version__ if torch else 'not installed'})")
    header = (f"{'op':>10} | {'rel err value':>13} {'rel err grad':>12} | {'refssl ms':>9} {'torch ms':>9} "
              f"{'ratio':>6}")
    print(header)
    print("-" * len(header))
    for name in args.ops.split(","):
        op = registry.get(name)
        args64, kw = cases[name]
        err_v = err_g = float("nan")
        if torch is not None:
            out, cache = op.forward(*args64, **kw)
            ours = op.backward(cache, 1.0)
            ts = [torch.tensor(a, requires_grad=(k in op.differentiable)) for k, a in enumerate(args64)]
            loss = torch_losses[name](*ts, **kw)
            loss.backward()
            err_v = abs(float(out) - loss.item()) / max(abs(loss.item()), 1e-300)
            err_g = max(float(np.max(np.abs(ours[k] - ts[k].grad.numpy())) / np.max(np.abs(ts[k].grad.numpy())))
                        for k in op.differentiable)
        args32 = tuple(a.astype(np.float32) for a in args64)

        def run_ours():
            op.backward(op.forward(*args32, **kw)[1], 1.0)

        t_ours = median_ms(run_ours, args.repeats)
        t_torch = float("nan")
        if torch is not None:
            def run_torch():
                ts = [torch.tensor(a, requires_grad=(k in op.differentiable)) for k, a in enumerate(args32)]
                torch_losses[name](*ts, **kw).backward()

            t_torch = median_ms(run_torch, args.repeats)
        print(f"{name:>10} | {err_v:13.2e} {err_g:12.2e} | {t_ours:9.2f} {t_torch:9.2f} {t_ours / t_torch:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
