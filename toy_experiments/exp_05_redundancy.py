"""Experiment 5: redundancy reduction -- Barlow Twins, its HSIC variant and VICReg.

The same encoder + projector is trained with ``barlow_twins`` (Zbontar et al. 2021, arXiv 2103.03230) and
``barlow_twins_hsic`` (Tsai et al. 2021, arXiv 2104.13712: off-diagonal target -1 instead of 0) over a sweep of
the off-diagonal weight lambda, and with ``vicreg`` at its official coefficients (25, 25, 1; Bardes et al.,
arXiv 2105.04906).  For each run: the effective rank of the projector output (the matrix the loss
decorrelates) and of the encoder output, and the factor probes of the encoder output.

The HSIC variant is run with the same per-view batch standardisation as Barlow Twins
(``normalization="batchnorm"``), so the off-diagonal target is the only difference; its extra term is
2 lambda (1^T C 1 - tr C) + const (derivations/ib_connection.md), a push that grows with lambda.
"""

from __future__ import annotations

import numpy as np

from refssl import nn
from refssl import eval as ev

from . import common
from .framework import Outcome, experiment, markdown_table
from .verdicts import monotone_trend, stated_optimum

FAMILY = "A"
PROBED = ("shape", "position", "size", "color")


def _rank(z):
    return ev.effective_rank(np.asarray(z, dtype=np.float64))


@experiment(
    "redundancy", order=5, title="Redundancy reduction: Barlow Twins, its HSIC variant, VICReg",
    question="Do Barlow Twins, its HSIC variant and VICReg all avoid collapse, does the HSIC variant behave like "
             "Barlow Twins, and what does the off-diagonal weight lambda do to the rank of the embedding?",
    expected="No run collapses (effective rank of the projector output > 3 for every loss and lambda). The HSIC "
             "variant matches Barlow Twins at lambda = 1/D (as Tsai et al. report): mean linear-probe accuracy "
             "(shape, position, size) within 0.05 and effective rank within 25%. The off-diagonal weight "
             "controls the rank, judged over the whole sweep lambda = 1e-4, 1e-3, 1/D, 0.1, 1: for Barlow Twins "
             "the effective rank of the projector output rises with lambda (Spearman >= 0.8, no fall larger "
             "than 10 % of the rank between successive lambdas, so the largest rank is at the largest lambda) "
             "and the rank at the largest lambda exceeds 1.5x that at the smallest (with a tiny lambda only "
             "the diagonal is fitted, so redundant, correlated dimensions cost nothing).")
def run(ctx):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 16
    n_train = ctx.pick(tiny=300, quick=1000, full=5000)
    n_val = ctx.pick(tiny=128, quick=400, full=1000)
    steps = ctx.pick(tiny=2, quick=100, full=600)
    batch = ctx.pick(tiny=64, quick=128, full=256)
    hidden, out_dim, proj_dim, lr = 128, 32, 64, 2e-3
    lambdas = ctx.pick(tiny=(1e-3, 1.0), quick=(1e-4, 1e-3, 1.0 / proj_dim, 0.1, 1.0),
                       full=(1e-4, 1e-3, 1.0 / proj_dim, 0.1, 1.0))
    ds = common.dataset(ctx, n_train, n_val, size=size)
    ctx.setting(family=FAMILY, steps=steps, batch=batch, hidden=hidden, encoder_out=out_dim, projector_out=proj_dim,
                lr=lr, lambdas=[float(f"{x:.4g}") for x in lambdas], vicreg="sim 25, std 25, cov 1",
                hsic_normalization="batchnorm (as Barlow Twins)")
    held = ds.val.images[:256]

    runs = [("barlow_twins", lam) for lam in lambdas] + [("barlow_twins_hsic", lam) for lam in lambdas]
    runs.append(("vicreg", None))
    rows, metrics = [], {}
    for loss, lam in runs:
        kwargs = {} if lam is None else {"lambd": float(lam)}
        tr = common.train_on_family(ctx, ds, FAMILY, loss=loss, steps=steps, batch_size=batch, hidden=hidden,
                                    out_dim=out_dim, loss_kwargs=kwargs, lr=lr,
                                    projector=nn.projector(out_dim, hidden, proj_dim))
        z_tr, z_val = tr.encode(ds.train.images), tr.encode(ds.val.images)
        res, _ = common.probe(ds, z_tr, z_val, name=loss, max_iter=50)
        key = loss if lam is None else f"{loss} lambda={lam:.4g}"
        m = {"loss": loss, "lambda": lam, "rank_projector": _rank(tr.encode(held, head=True)),
             "rank_encoder": _rank(tr.encode(held)), "final_loss": float(np.mean(tr.history[-5:])),
             **{f"linear_{f}": res[f]["linear_val"] for f in res}, **{f"knn_{f}": res[f]["knn_val"] for f in res}}
        m["linear_mean"] = float(np.mean([m[f"linear_{f}"] for f in ("shape", "position", "size")]))
        metrics[key] = m
        rows.append({"loss": loss, "lambda": "-" if lam is None else f"{lam:.4g}",
                     "eff. rank (projector, D=%d)" % proj_dim: m["rank_projector"],
                     "eff. rank (encoder, %d)" % out_dim: m["rank_encoder"],
                     **{f"{f} (lin)": m[f"linear_{f}"] for f in PROBED}, "mean lin (s/p/s)": m["linear_mean"]})

    def curve(loss, field):
        return [metrics[f"{loss} lambda={lam:.4g}"][field] for lam in lambdas]

    vic = metrics["vicreg"]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
    for loss, mk, col in (("barlow_twins", "o", "C0"), ("barlow_twins_hsic", "s", "C1")):
        axes[0].plot(lambdas, curve(loss, "rank_projector"), mk + "-", color=col, label=f"{loss} (projector)")
        axes[0].plot(lambdas, curve(loss, "rank_encoder"), mk + ":", color=col, alpha=0.6,
                     label=f"{loss} (encoder)")
        axes[1].plot(lambdas, curve(loss, "linear_mean"), mk + "-", color=col, label=f"{loss}: shape/position/size")
        axes[1].plot(lambdas, curve(loss, "linear_color"), mk + ":", color=col, alpha=0.6, label=f"{loss}: colour")
    axes[0].axhline(vic["rank_projector"], color="C2", ls="--", label="vicreg (projector)")
    axes[0].axhline(vic["rank_encoder"], color="C2", ls=":", alpha=0.6, label="vicreg (encoder)")
    axes[1].axhline(vic["linear_mean"], color="C2", ls="--", label="vicreg: shape/position/size")
    axes[1].axhline(vic["linear_color"], color="C2", ls=":", alpha=0.6, label="vicreg: colour")
    axes[0].set_ylabel("effective rank (held-out)")
    axes[1].set_ylabel("linear probe accuracy (val)")
    axes[1].set_ylim(0, 1)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("off-diagonal weight λ")
        ax.axvline(1.0 / proj_dim, color="gray", lw=0.8)
        ax.legend(fontsize=6.5)
    fig.suptitle(f"{FAMILY} views, {steps} steps (grey line: λ = 1/D)")
    fig.tight_layout()
    f1 = ctx.save_figure(fig, "lambda_sweep.png")

    lo, hi = min(lambdas), max(lambdas)
    ref = 1.0 / proj_dim if 1.0 / proj_dim in lambdas else lambdas[len(lambdas) // 2]
    bt, hs = metrics[f"barlow_twins lambda={ref:.4g}"], metrics[f"barlow_twins_hsic lambda={ref:.4g}"]
    bt_lo, bt_hi = metrics[f"barlow_twins lambda={lo:.4g}"], metrics[f"barlow_twins lambda={hi:.4g}"]
    lowest = min(metrics, key=lambda k: metrics[k]["rank_projector"])
    min_rank = metrics[lowest]["rank_projector"]
    bt_ranks = curve("barlow_twins", "rank_projector")
    v_rank = monotone_trend(lambdas, bt_ranks, "increasing", min_spearman=0.8, tol=0.1, relative=True,
                            what="Barlow Twins projector rank", along="lambda")
    rank_peak = stated_optimum(lambdas, bt_ranks, hi, kind="max", what="Barlow Twins projector rank",
                               along="lambda")  # reported: where the rank peaks
    checks = {
        "no_collapse": min_rank > 3,
        "hsic_matches_bt": abs(bt["linear_mean"] - hs["linear_mean"]) < 0.05
        and abs(bt["rank_projector"] - hs["rank_projector"]) < 0.25 * bt["rank_projector"],
        "lambda_controls_rank (BT rank rises with lambda over the whole sweep, Spearman >= 0.8, no fall > 10 %)":
            v_rank.holds,
        "BT rank at the largest lambda > 1.5x that at the smallest":
            bt_hi["rank_projector"] > 1.5 * bt_lo["rank_projector"],
    }
    met, _ = ctx.judge(checks)
    verdict = (f"Smallest projector effective rank over all runs {min_rank:.1f} ({lowest}); at lambda = {ref:.4g} BT vs HSIC: "
               f"mean probe {bt['linear_mean']:.3f} vs {hs['linear_mean']:.3f}, rank {bt['rank_projector']:.1f} vs "
               f"{hs['rank_projector']:.1f}; BT rank at lambda {lo:.4g} -> {hi:.4g}: {bt_lo['rank_projector']:.1f} -> "
               f"{bt_hi['rank_projector']:.1f}; over the whole sweep "
               f"{', '.join(f'{x:.1f}' for x in bt_ranks)} (peak at lambda = {rank_peak.stats['best_at']:.4g}, "
               f"Spearman {v_rank.stats['spearman']:+.2f}); VICReg rank {vic['rank_projector']:.1f}, mean probe "
               f"{vic['linear_mean']:.3f}. Not judged: the colour probe (the factor the views change; lower = more "
               f"invariant) is {bt_lo['linear_color']:.2f} / {bt['linear_color']:.2f} / {bt_hi['linear_color']:.2f} for BT "
               f"at lambda {lo:.4g} / {ref:.4g} / {hi:.4g} and {vic['linear_color']:.2f} for VICReg. Checks: "
               + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()) + ".")
    notes = ("Whole-sweep verdicts:\n\n" + "\n".join(f"- {v}" for v in (v_rank, rank_peak))
             + " (the second is reported, not judged).\n\nEffective rank: exp of the entropy of the normalised "
             "singular values of 256 held-out embeddings "
             "(uncentred; 1 = collapsed). Probes are validation accuracies on the encoder output; the views differ "
             "in colour only, so colour is the factor the losses are asked to discard.")
    sweep_verdicts = {"rank": str(v_rank), "rank_peak_at": rank_peak.stats["best_at"]}
    return Outcome(metrics={"runs": metrics, "checks": checks, "sweep_verdicts": sweep_verdicts},
                   table=markdown_table(rows), met=met,
                   verdict=verdict, figures=[f1], notes=notes)
