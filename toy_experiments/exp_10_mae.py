"""Experiment 10: masked autoencoders (MAE) on colored shapes: mask ratio, norm_pix, and what the encoder learns.

He et al. 2021 (arXiv 2111.06377; facebookresearch/mae ``models_mae.py``): a ViT encoder sees only the
visible patches of an image, a light decoder fills in the removed ones from the encoder's tokens plus a
shared mask token, and the loss is the pixel MSE on the removed patches only (optionally against per-patch
standardised pixels, ``norm_pix``).  The paper's findings that a toy run can test:

* a high mask ratio (75 %) gives the best linear probe (Fig. 5): an easy task (few patches removed) can be
  solved by interpolating neighbours and teaches little;
* the reconstruction gets harder, i.e. its error on the removed patches grows, as fewer patches stay
  visible;
* the normalised-pixel target gives a better representation than raw pixels (Table 1c).

Setting: :class:`refssl.nn.MAE` on 32 x 32 images cut into 8 x 8 patches (16 patches: a 4 x 4 grid; at ratio
0.9, int(16 * 0.1) = 1 patch stays visible), a 2-block encoder of width 64 and a 1-block decoder of width
32, float32, AdamW (betas 0.9 / 0.95, weight decay 0.05 except biases, norms, tokens; MAE's recipe) with
warm-up and cosine decay, no data augmentation (the images are already centred objects).  Each run trains
one model per (mask ratio, norm_pix); the ``quick`` level runs the four ratios without ``norm_pix`` and
ratio 0.75 with it (five models), the ``full`` level the whole 4 x 2 grid with more steps and data.

Evaluation, all on validation images:

* reconstruction error: pixel MSE over the removed patches, each model at its own training ratio, with the
  ``norm_pix`` prediction mapped back to pixels with each patch's own mean and std (so the runs are
  comparable); reference: predicting every removed patch by the mean training patch at that position;
* linear probe and 1-NN per latent factor (:func:`refssl.eval.factor_table`) on the mean of the encoder's
  final patch tokens for FULL images (no masking at evaluation), against raw pixels and against the
  untrained encoder (the same architecture and initialisation, before training).
"""

from __future__ import annotations

import time

import numpy as np

from refssl import baselines, optim
from refssl.fit import fit
from refssl.nn.mae import MAE
from refssl.nn.transformer import no_decay

from . import common
from .framework import Outcome, experiment, markdown_table
from .runs import cpu_seconds, run_each

__all__ = ["run", "RATIOS", "removed_patch_mse"]

RATIOS = (0.25, 0.5, 0.75, 0.9)
MAIN_RATIO = 0.75  # the paper's default; the model whose probe is compared with the baselines
ARCH = dict(image_size=32, patch=8, dim=64, depth=2, n_heads=4, dec_dim=32, dec_depth=1, dec_heads=4)


def _run_name(ratio, norm_pix):
    return f"r={ratio:g}" + (" norm_pix" if norm_pix else "")


def removed_patch_mse(model, params, images, rng, ratio):
    """Pixel MSE over the removed patches of ``images`` (masks drawn from ``rng``; norm_pix undone)."""
    recon, mask_img = model.reconstruct(params, images, rng, mask_ratio=ratio)
    err = (recon.astype(np.float64) - images) ** 2 * mask_img
    return float(err.sum() / mask_img.sum()), recon, mask_img


def _mean_patch_mse(train_images, val_images, mask_img):
    """The same error for the trivial prediction: the mean training image (per pixel) in every removed patch."""
    mean = train_images.mean(axis=0, dtype=np.float64)[None]
    err = (mean - val_images) ** 2 * mask_img
    return float(err.sum() / mask_img.sum())


def _train(seed, images, ratio, norm_pix, steps, batch, lr, seed_offset):
    """Train one MAE (a run of :func:`toy_experiments.runs.run_each`, possibly in another process); returns
    (initial params, trained params, per-step losses, CPU seconds, the trainer's progress lines)."""
    model = MAE(mask_ratio=ratio, norm_pix=norm_pix, **ARCH)
    # Same initialisation for every run (the untrained baseline is this init), different data order.
    p0 = model.init(np.random.default_rng(seed), np.float32)
    data_rng = np.random.default_rng(seed * 1000 + 31 + seed_offset)
    mask_rng = np.random.default_rng(seed * 1000 + 57 + seed_offset)

    def objective(params, step):
        x = images[data_rng.choice(len(images), size=batch, replace=False)]
        return model.loss_and_grads(params, x, mask_rng)

    opt = optim.AdamW(lr=lr, betas=(0.9, 0.95), weight_decay=0.05, exclude=no_decay)
    sched = optim.CosineSchedule(lr, steps, warmup_steps=max(1, steps // 20))
    log = []
    t0 = time.process_time()
    params, losses = fit(objective, p0, opt, steps, lr_schedule=sched, log=log.append,
                         log_every=max(1, steps // 4))
    return p0, params, losses, time.process_time() - t0, log


def _mosaic(rows, pad=2, value=1.0):
    """A list of rows of (3, S, S) images as one (H, W, 3) array with ``pad`` pixels of ``value`` between."""
    s = rows[0][0].shape[-1]
    n_r, n_c = len(rows), max(len(r) for r in rows)
    out = np.full((n_r * (s + pad) + pad, n_c * (s + pad) + pad, 3), value, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            y, x = pad + i * (s + pad), pad + j * (s + pad)
            out[y:y + s, x:x + s] = np.clip(im.transpose(1, 2, 0), 0, 1)
    return out


def _reconstruction_figure(ctx, images, shown, filename):
    """Rows: original, then (masked input, reconstruction) per run; removed patches grey in the input.
    One mosaic image (a grid of axes costs seconds to draw)."""
    import matplotlib.pyplot as plt

    rows, labels = [list(images)], ["original"]
    for name, (recon, mask_img) in shown.items():
        rows += [list(images * (1 - mask_img) + 0.5 * mask_img), list(recon)]
        labels += [f"{name}: masked", f"{name}: reconstruction"]
    mosaic = _mosaic(rows)
    s, pad = images.shape[-1], 2
    fig, ax = plt.subplots(figsize=(0.5 + 0.42 * len(images), 0.42 * len(rows)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([pad + i * (s + pad) + s / 2 for i in range(len(rows))], labels, fontsize=7)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title("MAE on validation images: visible patches pasted back, removed ones predicted "
                 "(norm_pix undone)", fontsize=8)
    return ctx.save_figure(fig, filename)


def _loss_figure(ctx, runs, filename):
    import matplotlib.pyplot as plt

    groups = [g for g in (False, True) if any(r["norm_pix"] == g for r in runs.values())]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.0 * len(groups), 3.4), squeeze=False)
    fig.subplots_adjust(wspace=0.4)
    for ax, g in zip(axes[0], groups):
        for name, r in runs.items():
            if r["norm_pix"] != g:
                continue
            loss = np.asarray(r["losses"])
            w = max(1, len(loss) // 25)
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(w, len(loss) + 1), smooth, label=name)
        if not g:  # the plateau every run first sits on: the mean training image in every removed patch
            ax.axhline(np.mean([r["mean_patch_mse"] for r in runs.values()]), color="gray", ls=":",
                       label="mean image (val)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss: MSE on removed patches\n" +
                      ("(per-patch normalised pixels)" if g else "(pixels in [0, 1])"))
        ax.set_yscale("log")
        ax.set_title("norm_pix " + ("on" if g else "off") + f" (moving mean over {w} steps)", fontsize=9)
        ax.legend(fontsize=7)
    return ctx.save_figure(fig, filename)


def _probe_figure(ctx, results, filename):
    return common.probe_bar_figure(ctx, results, filename,
                                   title="Linear probe on pooled encoder features of full images")


@experiment(
    "mae", order=10,
    title="MAE: mask ratio, norm_pix and the encoder's linear probe",
    question="On colored shapes, does a masked autoencoder's encoder learn the shape of the object, how does "
             "the difficulty of the reconstruction depend on the mask ratio, and does the normalised-pixel "
             "target help?",
    expected="(He et al. 2021) (1) Pixel MSE on the removed patches of validation images (norm_pix off, each "
             "model at its own training ratio) rises strictly with the mask ratio: 0.25 < 0.5 < 0.75 < 0.9. "
             "(2) The encoder trained at ratio 0.75 (norm_pix off) beats the untrained encoder of the same "
             "architecture on shape linear-probe accuracy (validation, pooled tokens of full images) by at "
             "least 3 points, and (3) beats raw pixels on shape. (4) A high ratio teaches more than a low one "
             "(paper Fig. 5): shape linear-probe accuracy at ratio 0.75 above that at 0.25. (5) norm_pix helps "
             "the representation (paper Table 1c): shape linear-probe accuracy at ratio 0.75 higher with "
             "norm_pix than without.",
)
def run(ctx):
    import matplotlib

    matplotlib.use("Agg")
    cpu0 = cpu_seconds()
    n_train = ctx.pick(tiny=128, quick=1500, full=4000)
    n_val = ctx.pick(tiny=64, quick=500, full=1000)
    # Below ~500 steps every run sits on the plateau of predicting the mean image (measured while choosing
    # the setting: removed-patch MSE equal to the mean-image baseline); 800 steps of 32 images leave it.
    steps = ctx.pick(tiny=2, quick=800, full=1200)
    batch = ctx.pick(tiny=8, quick=32, full=64)
    lr = 2e-3
    max_iter = ctx.pick(tiny=10, quick=40, full=100)
    grid = [(r, False) for r in RATIOS] + [(r, True) for r in RATIOS]
    if ctx.level != "full":  # the four ratios without norm_pix, and norm_pix at the paper's ratio only
        grid = [(r, False) for r in RATIOS] + [(MAIN_RATIO, True)]
    ds = common.dataset(ctx, n_train, n_val, size=32)
    ctx.setting(patch=ARCH["patch"], patches=(32 // ARCH["patch"]) ** 2,
                encoder=f"ViT dim {ARCH['dim']}, {ARCH['depth']} blocks, {ARCH['n_heads']} heads",
                decoder=f"dim {ARCH['dec_dim']}, {ARCH['dec_depth']} block", steps=steps, batch=batch, lr=lr,
                optimizer="AdamW (0.9, 0.95), wd 0.05, warm-up 5 % + cosine",
                runs=", ".join(_run_name(r, g) for r, g in grid), dtype="float32")

    runs, shown, probes = {}, {}, {}
    n_show = ctx.pick(tiny=4, quick=8, full=10)
    # The runs share nothing: trained side by side on the idle cores (toy_experiments/runs.py; the numbers
    # are those of training them one after another), then evaluated here in order.
    for ratio, norm_pix in grid:
        ctx.progress(f"train MAE {_run_name(ratio, norm_pix)}: {steps} steps, batch {batch}")

    def trained(i, result):
        for line in result[4]:
            ctx.progress(f"  MAE {_run_name(*grid[i])}: {line}")

    results = run_each(_train, [(ctx.seed, ds.train.images, ratio, norm_pix, steps, batch, lr, i)
                                for i, (ratio, norm_pix) in enumerate(grid)], done=trained)
    for i, ((ratio, norm_pix), (p0, params, losses, secs, _)) in enumerate(zip(grid, results)):
        name = _run_name(ratio, norm_pix)
        model = MAE(mask_ratio=ratio, norm_pix=norm_pix, **ARCH)
        # The same validation masks for every run at one ratio (a fixed rng per ratio).
        mse, recon, mask_img = removed_patch_mse(model, params, ds.val.images,
                                                 np.random.default_rng(ctx.seed * 1000 + int(100 * ratio)), ratio)
        shown[name] = (recon[:n_show], mask_img[:n_show])
        ctx.progress(f"probe MAE {name} (removed-patch MSE {mse:.4f})")
        res, _ = common.probe(ds, model.features(params, ds.train.images), model.features(params, ds.val.images),
                              name=name, max_iter=max_iter)
        probes[name] = res
        tail = max(1, len(losses) // 10)
        runs[name] = {"ratio": ratio, "norm_pix": norm_pix, "losses": losses, "train_cpu_seconds": secs,
                      "final_loss": float(np.mean(losses[-tail:])), "removed_mse": mse,
                      "mean_patch_mse": _mean_patch_mse(ds.train.images, ds.val.images, mask_img),
                      "probe": res}
        if i == 0:
            ctx.progress("probe the untrained encoder and raw pixels")
            probes["untrained"], _ = common.probe(ds, model.features(p0, ds.train.images),
                                                  model.features(p0, ds.val.images), name="untrained",
                                                  max_iter=max_iter)
            probes["raw pixels"], _ = common.probe(ds, baselines.raw_pixels(ds.train.images),
                                                   baselines.raw_pixels(ds.val.images), name="raw pixels",
                                                   max_iter=max_iter)

    figs = [_reconstruction_figure(ctx, ds.val.images[:n_show], shown, "reconstructions.png"),
            _loss_figure(ctx, runs, "loss_curves.png"),
            _probe_figure(ctx, probes, "probes.png")]

    rows = []
    for name, res in probes.items():
        r = runs.get(name, {})
        rows.append({"representation": name,
                     "removed-patch MSE": r.get("removed_mse", ""),
                     "mean-image MSE": r.get("mean_patch_mse", ""),
                     "ratio of the two": r["removed_mse"] / r["mean_patch_mse"] if r else "",
                     "final train loss": r.get("final_loss", ""),
                     **{f"{f} (lin)": res[f]["linear_val"] for f in common.PROBE_FACTORS},
                     **{f"{f} (1-NN)": res[f]["knn_val"] for f in common.PROBE_FACTORS}})
    table = markdown_table(rows)
    chance = {f: probes["untrained"][f]["chance"] for f in common.PROBE_FACTORS}
    table += ("\n\nAccuracies are validation fractions (chance: " +
              ", ".join(f"{f} {chance[f]:.3f}" for f in common.PROBE_FACTORS) +
              "). Removed-patch MSE: pixel MSE on the removed patches of the validation images at the run's own "
              "ratio; mean-image MSE: the same patches predicted by the mean training image (ratio of the two below 1: "
              "the model does better than the mean image). With norm_pix the prediction is mapped back to pixels "
              "with the removed patch's own mean and std (as in MAE's visualisation), which hands the model those "
              "two numbers: its MSE is not comparable with the other runs'.")

    def shape_lin(name):
        return probes[name]["shape"]["linear_val"]

    plain = [runs[_run_name(r, False)]["removed_mse"] for r in RATIOS]
    main, main_np = _run_name(MAIN_RATIO, False), _run_name(MAIN_RATIO, True)
    checks = {
        "removed-patch MSE rises strictly with the ratio (norm_pix off)": bool(np.all(np.diff(plain) > 0)),
        "MAE r=0.75 beats the untrained encoder on shape by >= 3 points":
            shape_lin(main) >= shape_lin("untrained") + 0.03,
        "MAE r=0.75 beats raw pixels on shape": shape_lin(main) > shape_lin("raw pixels"),
        "shape at r=0.75 above r=0.25": shape_lin(main) > shape_lin(_run_name(0.25, False)),
        "norm_pix raises shape at r=0.75": shape_lin(main_np) > shape_lin(main),
    }
    met, failed = ctx.judge(checks)
    verdict = (f"Removed-patch MSE (norm_pix off) at ratios {', '.join(f'{r:g}' for r in RATIOS)}: "
               f"{', '.join(f'{v:.4f}' for v in plain)}. Shape linear probe: MAE r=0.75 "
               f"{100 * shape_lin(main):.1f} % vs untrained {100 * shape_lin('untrained'):.1f} %, raw pixels "
               f"{100 * shape_lin('raw pixels'):.1f} %, r=0.25 {100 * shape_lin(_run_name(0.25, False)):.1f} %, "
               f"r=0.75 with norm_pix {100 * shape_lin(main_np):.1f} % (chance {100 * chance['shape']:.1f} %). "
               + ("All criteria hold." if not failed else "Not met: " + "; ".join(failed) + "."))
    notes = "Criteria: " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items()) + "."
    if ctx.level != "full":
        notes += (f"\n\nThis `{ctx.level}` run trains the four ratios without norm_pix and ratio 0.75 with it; the "
                  "full level runs the whole 4 x 2 grid with more data and steps.")
    notes += ("\n\nWith 16 patches the ratios keep 12, 8, 4 and 1 visible patches. The probe features are the mean "
              "of the final (normed) patch tokens of the encoder run on all 16 patches, as in MAE's linear-probe "
              "protocol apart from the pooling (the paper probes the CLS token).")
    metrics = {"cpu_seconds": cpu_seconds() - cpu0, "runs": runs, "probes": probes, "checks": checks,
               "removed_mse_by_ratio": dict(zip([str(r) for r in RATIOS], plain)),
               "shape_linear": {name: shape_lin(name) for name in probes}}
    return Outcome(metrics=metrics, table=table, met=met, verdict=verdict, figures=figs, notes=notes)
