"""Throughput of the colored-shapes pipeline: generation, augmentations, view families and probes.

    python benchmarks/bench_data.py [--n 64000] [--threads 2] [--repeats 3]

Target: 64,000 32x32 images in under 30 s on 2 cores.  Prints the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse

from _timing import set_threads, times, use_checkout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64000, help="images to generate (default 64000)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256, help="batch size of the augmentation timings")
    ap.add_argument("--probe-n", type=int, default=4000, help="train size of the probe timings")
    args = ap.parse_args(argv)

    set_threads(args.threads)  # before numpy is imported
    use_checkout()

    import numpy as np

    from refssl import data
    from refssl.eval import factor_table

    def best_of(fn, repeats):
        return min(times(fn, repeats, warmup=0))

    print(f"threads={args.threads}  numpy {np.__version__}")
    t = best_of(lambda: data.generate(args.n, np.random.default_rng(0), size=args.size), args.repeats)
    verdict = "PASS" if (args.n, args.size) != (64000, 32) or t < 30 else "FAIL"
    print(f"generate {args.n} images of {args.size}x{args.size}: {t:.2f} s "
          f"({args.n / t:,.0f} images/s)  [target < 30 s for 64,000 at 32x32: {verdict}]")

    split = data.generate(args.batch, np.random.default_rng(1), size=args.size)
    im, f = split.images, split.factors
    rng = np.random.default_rng(2)
    rows = [
        ("random_resized_crop", lambda: data.random_resized_crop(im, rng)),
        ("random_translate", lambda: data.random_translate(im, rng)),
        ("horizontal_flip", lambda: data.horizontal_flip(im, rng)),
        ("color_jitter (hue 0.5)", lambda: data.color_jitter(im, rng, hue=0.5)),
        ("gaussian_noise", lambda: data.gaussian_noise(im, rng)),
        ("gaussian_blur", lambda: data.gaussian_blur(im, rng)),
        ("rerender color", lambda: data.rerender(f, rng, "color")),
    ] + [(f"make_views {fam}", (lambda fam=fam: data.make_views(fam, f, rng, images=im)))
         for fam in data.FAMILIES]
    print(f"\nper batch of {args.batch}:")
    for name, fn in rows:
        t = best_of(fn, max(args.repeats, 5))
        print(f"  {name:<28s} {1e3 * t:8.2f} ms  ({args.batch / t:,.0f} images/s)")

    ds = data.make_dataset(args.probe_n, args.probe_n // 4, np.random.default_rng(3), size=args.size)
    tr, va = ds.train, ds.val
    emb_t = np.random.default_rng(4).standard_normal((len(tr), 128)).astype(np.float32)
    emb_v = np.random.default_rng(5).standard_normal((len(va), 128)).astype(np.float32)
    t = best_of(lambda: factor_table(emb_t, tr.factors, emb_v, va.factors), 1)
    print(f"\nfactor_table (linear probe + 1-NN, 4 factors), {args.probe_n} train x 128-d: {t:.2f} s")


if __name__ == "__main__":
    main()
