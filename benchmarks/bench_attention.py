"""Benchmark: attention ops forward + backward against torch CPU autograd.

    python benchmarks/bench_attention.py [--threads 2] [--repeats 15] [--rounds 4] [--dtypes float32]

Cases (float32 by default):

* ``scaled_dot_product_attention`` at B=64, H=4, L=65, dh=32 (a ViT-Ti/S-sized batch of 64 tokens + CLS),
  without and with a key mask, against autograd through ``torch.nn.functional.scaled_dot_product_attention``;
* ``multi_head_attention`` at B=128, L=65, D=128, 4 heads, against the same computation written with
  ``torch.nn.functional`` (linear, reshape/permute, scaled_dot_product_attention, merge, linear).

Before timing, each case checks that refssl's output and every gradient agree with torch to float32
tolerance.  Thread counts are pinned before numpy and torch load (environment variables, then
threadpoolctl when installed, and ``torch.set_num_threads``).  refssl and torch are timed in alternating
rounds with a pause between them, so that a slow spell of the machine hits both and one library's idle
worker threads do not compete with the other's.  Each round gives the median of ``--repeats`` calls; the
table shows the best round of each library (what a quiet machine gives: other sessions may share this one)
and the median round, each with the ratio refssl / torch.

How the numbers in the commit that added this script were obtained (2-core Xeon VM, numpy 2.4 with
OpenBLAS 0.3.31 running its SkylakeX kernels, torch 2.13.0+cpu; the machine was shared with other
sessions, load average 6-11, so every time is inflated and torch's OpenMP more than refssl's pool):

  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_attention.py --threads 2 --repeats 5 --rounds 16

Some machines here set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (older OpenBLAS builds need them); they select
slower kernels in a current numpy, so unset both together for a benchmark, in that command only, and check
the "BLAS" line printed first (threadpoolctl reports the kernel).  Never change them for tests or CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _timing import set_threads, times, use_checkout


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _alternate(ours, theirs, repeats: int, rounds: int, pause: float = 0.2):
    """Per-round medians (ms) of ``ours`` and ``theirs``, timed in alternating rounds of ``repeats`` calls."""
    a, b = [], []
    for _ in range(rounds):
        a.append(1e3 * _median(times(ours, repeats)))
        time.sleep(pause)
        b.append(1e3 * _median(times(theirs, repeats)))
        time.sleep(pause)
    return a, b


def _row(label, dtype_name, rounds_ours, rounds_theirs, err):
    """Best round (the machine's quiet spells; other sessions share it) and median round, with ratios."""
    bo, bt = min(rounds_ours), min(rounds_theirs)
    mo, mt = _median(rounds_ours), _median(rounds_theirs)
    print(f"{label:<40} {dtype_name:>7} | {bo:>8.2f} {bt:>8.2f} {bo / bt:>5.2f} | {mo:>8.2f} {mt:>8.2f} "
          f"{mo / mt:>5.2f} | {err:>7.1e}", flush=True)


def _close(name, ours, theirs, rtol):
    """Fail loudly unless two arrays agree relative to the larger one's scale (float32 tolerance)."""
    import numpy as np

    theirs = np.asarray(theirs, dtype=np.float64)
    ours = np.asarray(ours, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(theirs))))
    err = float(np.max(np.abs(ours - theirs))) / scale
    if err > rtol:
        raise SystemExit(f"{name}: refssl and torch disagree (max error {err:.2e} relative to {scale:.2e})")
    return err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=4, help="alternating refssl/torch rounds")
    ap.add_argument("--dtypes", default="float32")
    args = ap.parse_args(argv)
    set_threads(args.threads)  # before numpy/torch load their thread pools

    import numpy as np

    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(args.threads)
        blas = ", ".join(f"{i['internal_api']} {i.get('version')} {i.get('architecture')} "
                         f"{i['num_threads']} threads" for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        blas = "threadpoolctl not installed; threads set by environment variables"
    use_checkout()
    from refssl import registry
    from refssl.ops.attention import attention_probs

    try:
        import torch

        torch.set_num_threads(args.threads)
        F = torch.nn.functional
    except ImportError:
        torch = None

    print(f"attention forward+backward, {args.threads} threads, {args.rounds} rounds of {args.repeats} calls; "
          f"torch {torch.__version__ if torch else 'not installed'}")
    print(f"BLAS: {blas}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    header = (f"{'':<40} {'':>7} | {'best round':^23} | {'median round':^23} |\n"
              f"{'case':<40} {'dtype':>7} | {'refssl':>8} {'torch':>8} {'ratio':>5} | {'refssl':>8} {'torch':>8} "
              f"{'ratio':>5} | {'max err':>7}")
    print(header)
    print("-" * len(header.splitlines()[-1]))
    rng = np.random.default_rng(0)
    sdpa, mha = registry.get("scaled_dot_product_attention"), registry.get("multi_head_attention")

    for dtype_name in args.dtypes.split(","):
        dtype = np.dtype(dtype_name)
        tol = 2e-4 if dtype == np.float32 else 1e-10

        # -- scaled_dot_product_attention ------------------------------------------------------------------
        b, h, n_tok, dh = 64, 4, 65, 32
        q, k, v, g = (rng.standard_normal((b, h, n_tok, dh)).astype(dtype) for _ in range(4))
        padding = np.ones((b, n_tok), dtype=bool)
        padding[:, 50:] = rng.random((b, n_tok - 50)) < 0.5  # ragged tails
        for masked in (False, True):
            mask = padding if masked else None
            label = f"sdpa B={b} H={h} L={n_tok} dh={dh}" + (" key_mask" if masked else "")

            def ours():
                out, cache = sdpa.forward(q, k, v, mask)
                return out, sdpa.backward(cache, g), cache

            if torch is None:
                t_ours = 1e3 * _median(times(ours, args.repeats * args.rounds))
                print(f"{label:<40} {dtype_name:>7} | {t_ours:>8.2f} (torch not installed)", flush=True)
                continue
            tq, tk, tv = (torch.from_numpy(a).requires_grad_(True) for a in (q, k, v))
            tg = torch.from_numpy(g)
            tmask = None if mask is None else torch.from_numpy(mask)[:, None, None, :]

            def theirs():
                tq.grad = tk.grad = tv.grad = None
                out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)
                out.backward(tg)
                return out

            out, (dq, dk, dv, _), cache = ours()
            tout = theirs()
            err = max(_close(f"{label} out", out, tout.detach().numpy(), tol),
                      _close(f"{label} dq", dq, tq.grad.numpy(), tol),
                      _close(f"{label} dk", dk, tk.grad.numpy(), tol),
                      _close(f"{label} dv", dv, tv.grad.numpy(), tol))
            if masked:
                probs = attention_probs(cache)
                assert np.all(probs[np.broadcast_to(~padding[:, None, None, :], probs.shape)] == 0)
            _row(label, dtype_name, *_alternate(ours, theirs, args.repeats, args.rounds), err)

        # -- multi_head_attention --------------------------------------------------------------------------
        b, n_tok, d, n_heads = 128, 65, 128, 4
        dh = d // n_heads
        x = rng.standard_normal((b, n_tok, d)).astype(dtype)
        w_qkv = (rng.standard_normal((d, 3 * d)) / np.sqrt(d)).astype(dtype)
        b_qkv = (0.1 * rng.standard_normal(3 * d)).astype(dtype)
        w_out = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(dtype)
        b_out = (0.1 * rng.standard_normal(d)).astype(dtype)
        g = rng.standard_normal((b, n_tok, d)).astype(dtype)
        label = f"mha B={b} L={n_tok} D={d} heads={n_heads}"

        def ours():
            out, cache = mha.forward(x, w_qkv, b_qkv, w_out, b_out, n_heads=n_heads)
            return out, mha.backward(cache, g)

        if torch is None:
            t_ours = 1e3 * _median(times(ours, args.repeats * args.rounds))
            print(f"{label:<40} {dtype_name:>7} | {t_ours:>8.2f} (torch not installed)", flush=True)
            continue
        # torch weights are (out, in): pass the transposes, contiguous, as the leaf tensors
        leaves = [torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True)
                  for a in (x, w_qkv.T, b_qkv, w_out.T, b_out)]
        tg = torch.from_numpy(g)

        def theirs():
            tx, tw_qkv, tb_qkv, tw_out, tb_out = leaves
            for t in leaves:
                t.grad = None
            qkv = F.linear(tx, tw_qkv, tb_qkv).reshape(b, n_tok, 3, n_heads, dh).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            out = F.linear(o.transpose(1, 2).reshape(b, n_tok, d), tw_out, tb_out)
            out.backward(tg)
            return out

        out, grads = ours()
        tout = theirs()
        torch_grads = [leaves[0].grad, leaves[1].grad.T, leaves[2].grad, leaves[3].grad.T, leaves[4].grad]
        err = _close(f"{label} out", out, tout.detach().numpy(), tol)
        for name, ga, gb in zip(("dx", "dw_qkv", "db_qkv", "dw_out", "db_out"), grads, torch_grads):
            err = max(err, _close(f"{label} {name}", ga, gb.numpy(), tol))
        _row(label, dtype_name, *_alternate(ours, theirs, args.repeats, args.rounds), err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
