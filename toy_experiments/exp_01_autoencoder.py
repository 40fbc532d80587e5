"""Experiment 1: what the layers of a conv autoencoder encode on colored shapes.

Book setting (Torralba, Isola & Freeman, *Foundations of Computer Vision*, ch. 30; canonical definitions D8):
a conv autoencoder (6 conv layers with ReLU in the encoder and in the decoder, bottleneck 128, Adam, batch 128)
trained with a squared reconstruction error; nearest neighbours in its code, and 1-NN accuracy of the latent
factors in pixel space and at the encoder's layers.  The book finds colour 1-NN accuracy best in pixel space
and falling with depth, and shape 1-NN accuracy rising with depth.

Here the encoder is :func:`toy_experiments.common.conv_encoder` (3 blocks conv3x3-ReLU-maxpool, then a linear
bottleneck of 128) and the decoder :func:`refssl.nn.conv_decoder` (its mirror: linear, then transposed
convolutions), so that a run fits the CPU budget.  1-NN accuracy is measured for raw pixels, after every conv
block and at the bottleneck; the seed homework's question -- do the code's nearest neighbours share colour,
size and location? -- is answered with the share of the k nearest training images that share each factor.
"""

from __future__ import annotations

import numpy as np

from refssl import baselines, nn
from refssl import eval as ev

from . import common
from .framework import Outcome, experiment, markdown_table
from .verdicts import monotone_trend, stated_optimum

__all__ = ["run", "train_autoencoder", "autoencoder_setting"]

K_NEIGHBOURS = 8


def _identity_pairs(images, rng, batch_size):
    """An endless stream of (x, x) batches: input and reconstruction target are the same images."""
    while True:
        idx = rng.choice(len(images), size=batch_size, replace=False)
        x = images[idx]
        yield x, x


def autoencoder_setting(ctx):
    """Sizes of the conv autoencoder per level (shared with experiment 9, which scores the same network)."""
    return {"image_size": ctx.pick(tiny=16, quick=16, full=24),
            "n_train": ctx.pick(tiny=256, quick=2000, full=6000),
            "n_val": ctx.pick(tiny=128, quick=500, full=1500),
            "steps": ctx.pick(tiny=3, quick=200, full=1500),
            "channels": ctx.pick(tiny=(4, 8, 16), quick=(8, 16, 32), full=(16, 32, 64)),
            "latent": 128, "batch_size": 128, "lr": 2e-3}


def train_autoencoder(ctx, ds, *, steps: int, channels, latent: int = 128, batch_size: int = 128,
                      lr: float = 2e-3, seed_offset: int = 0):
    """Train the conv autoencoder with the registered ``mse`` loss; returns the Trainer (cached per process:
    experiment 9 scores the same network)."""
    size = ds.train.images.shape[-1]

    def make():
        rng = np.random.default_rng(ctx.seed * 1000 + 101 + seed_offset)
        dec = nn.conv_decoder(latent, image_size=size, channels=tuple(channels)[::-1], out_act=None)
        return common.train_pairs(ctx, _identity_pairs(ds.train.images, rng, batch_size),
                                  encoder=common.conv_encoder(size, channels, latent), loss="mse", steps=steps,
                                  lr=lr, decoder=dec, seed_offset=seed_offset, label="autoencoder")

    key = ("autoencoder", common._ds_key(ctx, ds), steps, tuple(channels), latent, batch_size, lr, seed_offset)
    return common.cached_training(key, make)


def _reconstruction_figure(ctx, images, recon, filename):
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(0.9 * n, 2.1))
    for j in range(n):
        for i, im in enumerate((images[j], recon[j])):
            axes[i, j].imshow(np.clip(im.transpose(1, 2, 0), 0, 1), interpolation="nearest")
            axes[i, j].set_axis_off()
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    return ctx.save_figure(fig, filename)


def _depth_figure(ctx, depth_names, acc, filename):
    """1-NN accuracy against depth, one line per factor, its chance level dashed in the same colour."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 3.6))
    x = np.arange(len(depth_names))
    for j, (f, mk) in enumerate(zip(common.PROBE_FACTORS, "os^v")):
        ax.plot(x, [acc[d][f]["acc"] for d in depth_names], mk + "-", color=f"C{j}", label=f"{f} 1-NN")
        ax.axhline(acc[depth_names[0]][f]["chance"], color=f"C{j}", ls="--", lw=0.8, alpha=0.7)
    ax.plot([], [], "k--", lw=0.8, label="chance (per factor)")
    ax.set_xticks(x, [d.replace(" (", "\n(") for d in depth_names], fontsize=7)
    ax.set_xlabel("representation (depth in the encoder)")
    ax.set_ylabel("1-NN accuracy (val -> train)")
    ax.set_ylim(0, 1)
    ax.set_title("Conv autoencoder: what each layer's nearest neighbour shares", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ctx.save_figure(fig, filename)


@experiment(
    "autoencoder", order=1,
    title="Conv autoencoder: 1-NN accuracy per factor at every layer, and what nearest neighbours share",
    question="In pixel space and at every layer of a conv autoencoder's encoder, how well does the nearest "
             "training image predict the colour, shape, position and size of a validation image, and do the "
             "code's nearest neighbours share colour, size and location?",
    expected="(book ch. 30, D8) Depth trends of 1-NN accuracy (validation -> train) over pixels, conv block 1, "
             "2, 3 and the 128-d bottleneck: colour 1-NN is best in pixel space (pixels within 2 points of the "
             "best depth) and falls with depth (whole-sweep trend: Spearman <= -0.8, no rise larger than 3 "
             "points between successive depths); shape 1-NN rises with depth (Spearman >= +0.8, no fall larger "
             "than 3 points, and the bottleneck at least 5 points above pixels). Homework: among the 8 nearest "
             "training images of a validation image in the bottleneck code, the shares with the same colour "
             "class, size bin and position bin each exceed chance by at least 10 points. The autoencoder "
             "learned: validation MSE < 0.8 x that of predicting the mean training image.",
)
def run(ctx):
    import matplotlib

    matplotlib.use("Agg")
    st = autoencoder_setting(ctx)
    size, channels, latent, steps = st["image_size"], st["channels"], st["latent"], st["steps"]
    max_iter = ctx.pick(tiny=10, quick=50, full=100)
    ctx.setting(steps=steps, latent_dim=latent, batch_size=st["batch_size"], lr=st["lr"], loss="mse",
                encoder=common.conv_encoder_text(size, channels, latent),
                decoder=f"linear {latent} -> transposed convs {tuple(channels)[::-1]} -> 3 (linear output)",
                neighbours_k=K_NEIGHBOURS)
    ds = common.dataset(ctx, st["n_train"], st["n_val"], size=size)

    trainer = train_autoencoder(ctx, ds, steps=steps, channels=channels, latent=latent,
                                batch_size=st["batch_size"], lr=st["lr"])
    recon_val = trainer.reconstruct(ds.val.images)
    mse_val = float(np.mean((recon_val - ds.val.images) ** 2))
    mse_mean_image = float(np.mean((ds.train.images.mean(axis=0) - ds.val.images) ** 2))

    ctx.progress("1-NN per factor at every layer")
    feats_t = {"pixels": baselines.raw_pixels(ds.train.images),
               **common.encoder_layer_features(trainer, ds.train.images)}
    feats_v = {"pixels": baselines.raw_pixels(ds.val.images), **common.encoder_layer_features(trainer, ds.val.images)}
    depth_names = list(feats_t)
    bottleneck = depth_names[-1]
    acc = {d: common.nn_factor_accuracy(feats_t[d], ds.train.factors, feats_v[d], ds.val.factors)
           for d in depth_names}
    share = {d: common.neighbour_sharing(feats_t[d], ds.train.factors, feats_v[d], ds.val.factors, k=K_NEIGHBOURS)
             for d in ("pixels", bottleneck)}
    lat, _ = common.probe(ds, feats_t[bottleneck], feats_v[bottleneck], name="AE bottleneck", max_iter=max_iter)

    figs = [_depth_figure(ctx, depth_names, acc, "knn_by_depth.png")]
    grid_rng = np.random.default_rng(ctx.seed + 7)
    ev.retrieval_grids(str(ctx.out_dir), ds.train.images, feats_t[bottleneck], ds.val.images, feats_v[bottleneck],
                       grid_rng, prefix="ae_retrieval", representation="conv autoencoder bottleneck")
    figs += ["ae_retrieval_train.png", "ae_retrieval_val.png"]
    ev.retrieval_grids(str(ctx.out_dir), ds.train.images, feats_t["pixels"], ds.val.images, feats_v["pixels"],
                       np.random.default_rng(ctx.seed + 7), prefix="pixel_retrieval", representation="raw pixels")
    figs += ["pixel_retrieval_train.png", "pixel_retrieval_val.png"]
    figs.append(_reconstruction_figure(ctx, ds.val.images[:10], recon_val[:10], "reconstructions.png"))

    depth = np.arange(len(depth_names), dtype=float)
    col = [acc[d]["color"]["acc"] for d in depth_names]
    shp = [acc[d]["shape"]["acc"] for d in depth_names]
    v_col_best = stated_optimum(depth, col, 0, kind="max", tol=0.02, what="colour 1-NN", along="depth")
    v_col_falls = monotone_trend(depth, col, "decreasing", tol=0.03, min_spearman=0.8, what="colour 1-NN",
                                 along="depth")
    v_shp_rises = monotone_trend(depth, shp, "increasing", tol=0.03, min_spearman=0.8, what="shape 1-NN",
                                 along="depth")
    hw = share[bottleneck]
    checks = {
        "colour 1-NN best in pixel space (within 0.02 of the best depth)": v_col_best.holds,
        "colour 1-NN falls with depth (Spearman <= -0.8, no rise > 0.03)": v_col_falls.holds,
        "shape 1-NN rises with depth (Spearman >= 0.8, no fall > 0.03)": v_shp_rises.holds,
        "shape 1-NN at the bottleneck >= pixels + 0.05": shp[-1] >= shp[0] + 0.05,
        **{f"{K_NEIGHBOURS} nearest neighbours share {f} (share >= chance + 0.10)":
           hw[f]["share"] >= hw[f]["chance"] + 0.10 for f in ("color", "size", "position")},
        "the AE learned something (val MSE < 0.8 x mean-image MSE)": mse_val < 0.8 * mse_mean_image,
    }
    met, failed = ctx.judge(checks)

    rows = [{"representation": d, **{f"{f} 1-NN": acc[d][f]["acc"] for f in common.PROBE_FACTORS}}
            for d in depth_names]
    rows.append({"representation": "chance", **{f"{f} 1-NN": acc["pixels"][f]["chance"] for f in common.PROBE_FACTORS}})
    table = "1-NN accuracy (validation queries, training bank) per factor and depth:\n\n" + markdown_table(rows)
    hw_rows = [{"factor": f, f"share of {K_NEIGHBOURS}-NN, bottleneck": share[bottleneck][f]["share"],
                f"share of {K_NEIGHBOURS}-NN, pixels": share["pixels"][f]["share"], "chance": hw[f]["chance"],
                "judged": "yes" if f != "shape" else "no (reported)"} for f in ("color", "size", "position", "shape")]
    table += ("\n\nHomework (seed chapter): do the autoencoder's nearest neighbours share colour, size and "
              "location? Share of the " + str(K_NEIGHBOURS) + " nearest training images with the query's colour "
              "class / size bin (3) / position bin (3x3) / shape; chance = share of all training images:\n\n"
              + markdown_table(hw_rows))
    lin_rows = [{"factor": f, "linear (val)": lat[f]["linear_val"], "1-NN (val)": lat[f]["knn_val"],
                 "chance": lat[f]["chance"]} for f in common.PROBE_FACTORS]
    table += "\n\nBottleneck linear probe (reported, not judged):\n\n" + markdown_table(lin_rows)
    table += (f"\n\nValidation reconstruction MSE {mse_val:.4f} (predicting the mean training image: "
              f"{mse_mean_image:.4f}).")

    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    verdict = (f"1-NN over depth ({' / '.join(d.split(' (')[0] for d in depth_names)}): colour "
               f"{' / '.join(pct(v) for v in col)} %, shape {' / '.join(pct(v) for v in shp)} % (chance "
               f"{pct(acc['pixels']['shape']['chance'])} %); bottleneck neighbours share colour "
               f"{pct(hw['color']['share'])} % (chance {pct(hw['color']['chance'])}), size "
               f"{pct(hw['size']['share'])} % ({pct(hw['size']['chance'])}), position {pct(hw['position']['share'])} % "
               f"({pct(hw['position']['chance'])}), shape {pct(hw['shape']['share'])} % "
               f"({pct(hw['shape']['chance'])}). "
               + ("All criteria hold." if not failed else "Failed: " + "; ".join(failed) + "."))
    metrics = {"mse_val": mse_val, "mse_mean_image": mse_mean_image, "depths": depth_names,
               "knn_by_depth": acc, "neighbour_sharing": share, "bottleneck_probe": lat,
               "sweep_verdicts": {k: str(v) for k, v in (("colour_best_in_pixels", v_col_best),
                                                         ("colour_falls", v_col_falls), ("shape_rises", v_shp_rises))},
               "checks": checks}
    notes = "Criteria: " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items()) + "."
    notes += "\n\nWhole-sweep verdicts:\n\n" + "\n".join(f"- {v}" for v in (v_col_best, v_col_falls, v_shp_rises))
    notes += ("\n\nDepth: each block's features are its max-pool output, flattened; 1-NN uses Euclidean distance "
              "on raw features (no standardisation), as on pixels. Deviation from the book: 3 conv layers in the "
              "encoder instead of 6 and fewer steps (CPU budget of the suite).")
    return Outcome(metrics=metrics, table=table, met=met, verdict=verdict, figures=figs, notes=notes)
