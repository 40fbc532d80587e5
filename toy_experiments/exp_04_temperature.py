"""Experiment 4: the InfoNCE temperature, and the logit-scaling shortcut of unnormalised embeddings.

An MLP encoder is trained with ``info_nce`` at several temperatures on view pairs of family A (the second view
re-renders the instance in another colour class; shape, position, size and rotation are shared).
On held-out view pairs we measure the alignment and uniformity metrics of Wang & Isola (arXiv 2005.10242,
on L2-normalised embeddings) and the factor probes.  derivations/temperature_limit.md predicts the trend:
a small tau concentrates the push on the hardest negatives and (T19-T20) turns the loss into a
nearest-neighbour (Tammes-like) repulsion, so the embedding spreads out (lower uniformity) at the cost of
alignment; a large tau leaves a loss that is linear in the similarities (T9) and asks only for alignment and
a zero mean, so alignment improves and uniformity worsens.

The second part drops the normalisation (``info_nce(..., normalize=False)``, raw dot products): by (T11-T13)
once the positives rank first, growing norms alone drive the loss towards 0, which the normalised loss
cannot do (T15, bounded below by T17).
"""

from __future__ import annotations

import numpy as np

from refssl import data, optim, registry
from refssl import eval as ev
from refssl.train import Trainer

from . import common
from .framework import Outcome, experiment, markdown_table
from .verdicts import monotone_trend, stated_optimum

FAMILY = "A"


def _train_tracked(ctx, pairs, *, size, hidden, out_dim, steps, every, temperature, normalize, probe_x, lr,
                   constant_lr=False):
    """Train with the Trainer (as :func:`common.train_pairs` does: Adam, warm-up, cosine decay; or a constant
    rate after the warm-up), pausing every ``every`` steps to record the mean embedding norm on a fixed
    held-out batch; returns (trainer, steps, norms)."""
    label = f"info_nce tau={temperature:g}" + ("" if normalize else " unnormalised")
    warm = max(1, steps // 20)
    schedule = ((lambda k: lr * min(1.0, (k + 1) / warm)) if constant_lr
                else optim.CosineSchedule(lr, steps, warmup_steps=warm))
    trainer = Trainer(common.mlp_encoder(size, hidden, out_dim), "info_nce", optim.Adam(lr=lr),
                      loss_kwargs={"temperature": temperature, "normalize": normalize},
                      schedule=schedule, seed=ctx.seed, log_every=0)
    ctx.progress(f"train {label}: {steps} steps")
    marks, norms = [0], [float(np.linalg.norm(trainer.encode(probe_x), axis=1).mean())]
    for stop in list(range(every, steps, every)) + [steps]:
        trainer.fit(pairs, steps=stop)
        marks.append(stop)
        norms.append(float(np.linalg.norm(trainer.encode(probe_x), axis=1).mean()))
    ctx.progress(f"  {label}: final loss {trainer.history[-1]:.4f}, mean norm {norms[-1]:.2f}")
    return trainer, marks, norms


@experiment(
    "temperature", order=4, title="Temperature: alignment, uniformity and probe accuracy",
    question="How does the InfoNCE temperature trade alignment against uniformity, and what happens without "
             "the L2 normalisation?",
    expected="From derivations/temperature_limit.md, judged over the whole sweep tau = 0.05, 0.1, 0.2, 0.5, 1 "
             "(not its end points): as tau falls the embedding becomes more uniform -- the uniformity metric "
             "rises with tau (Spearman >= 0.9 and no fall larger than 0.02 between successive taus, so its "
             "lowest value is at the smallest tau) -- and less aligned -- the alignment metric falls with tau "
             "(Spearman <= -0.9, no rise larger than 10 % between successive taus). Without normalisation the embedding norms grow (final mean "
             "norm > 2x its value at initialisation) and the loss falls towards 0 (final "
             "loss < 0.1x its initial value and below the lower bound L*(N, tau) of the normalised loss, T17, "
             "which the normalised run cannot cross); on held-out pairs the same directions rescaled to unit norm "
             "give a loss above that bound, so the norm is what lowers it.")
def run(ctx):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 16
    n_train = ctx.pick(tiny=300, quick=1500, full=6000)
    n_val = ctx.pick(tiny=128, quick=500, full=1500)
    steps = ctx.pick(tiny=3, quick=150, full=1000)
    taus = ctx.pick(tiny=(0.1, 1.0), quick=(0.05, 0.1, 0.2, 0.5, 1.0), full=(0.05, 0.1, 0.2, 0.5, 1.0))
    batch, hidden, out_dim, lr = ctx.pick(tiny=64, quick=128, full=256), 128, 32, 2e-3
    tau_raw = 0.2  # temperature of the unnormalised run and of its normalised comparison
    every = max(1, steps // 20)
    ds = common.dataset(ctx, n_train, n_val, size=size)
    ctx.setting(family=FAMILY, steps=steps, batch=batch, hidden=hidden, out_dim=out_dim, lr=lr,
                taus=list(taus), tau_unnormalised=tau_raw, encoder="MLP (BN) on the info_nce output")
    probe_x = ds.val.images[:256]
    # Held-out view pairs for the alignment metric (fixed across temperatures).
    v1, v2 = data.make_views(FAMILY, ds.val.factors, np.random.default_rng(ctx.seed + 99), images=ds.val.images)

    def stream(offset):
        return data.view_pair_stream(FAMILY, ds.train.factors, np.random.default_rng(ctx.seed * 1000 + offset),
                                     batch_size=batch, images=ds.train.images, size=size)

    rows, sweep, runs = [], {}, {}
    for tau in taus:
        tr, marks, norms = _train_tracked(ctx, stream(1), size=size, hidden=hidden, out_dim=out_dim, steps=steps,
                                          every=every, temperature=tau, normalize=True, probe_x=probe_x, lr=lr)
        runs[("norm", tau)] = (tr, marks, norms)
        z1, z2 = tr.encode(v1), tr.encode(v2)
        align = ev.alignment_metric(z1, z2)
        unif = ev.uniformity_metric(z1, rng=np.random.default_rng(ctx.seed), max_points=500)
        res, _ = common.probe(ds, tr.encode(ds.train.images), z1, name=f"tau={tau:g}", max_iter=50)
        sweep[tau] = {"alignment": align, "uniformity": unif, "final_loss": tr.history[-1],
                      **{f"linear_{f}": res[f]["linear_val"] for f in res},
                      **{f"knn_{f}": res[f]["knn_val"] for f in res}}
        rows.append({"tau": f"{tau:g}", "alignment": align, "uniformity": unif, "loss": tr.history[-1],
                     "shape (lin)": res["shape"]["linear_val"], "color (lin)": res["color"]["linear_val"],
                     "position (lin)": res["position"]["linear_val"], "size (lin)": res["size"]["linear_val"],
                     "shape (1-NN)": res["shape"]["knn_val"], "color (1-NN)": res["color"]["knn_val"]})

    # The shortcut: same temperature, raw dot products against normalised ones.  A constant rate after the
    # warm-up, so that a decaying schedule does not stop the norms by itself.
    nrm, raw = (_train_tracked(ctx, stream(2), size=size, hidden=hidden, out_dim=out_dim, steps=steps,
                               every=every, temperature=tau_raw, normalize=flag, probe_x=probe_x, lr=lr,
                               constant_lr=True) for flag in (True, False))
    n_b = batch
    bound = float(np.log1p(2 * (n_b - 1) * np.exp(-n_b / ((n_b - 1) * tau_raw))))  # (T17)
    # Held-out decomposition: the unnormalised run's loss at its own norms vs the same directions at unit norm
    # (= the normalised loss at tau, bounded below by T17).
    info = registry.get("info_nce")
    zr1, zr2 = raw[0].encode(v1[:n_b]), raw[0].encode(v2[:n_b])
    held_raw = float(info.forward(zr1, zr2, temperature=tau_raw, normalize=False)[0])
    held_unit = float(info.forward(zr1, zr2, temperature=tau_raw, normalize=True)[0])

    def head(h):
        return float(np.mean(h[:max(1, min(5, len(h)))]))

    def tail(h):
        return float(np.mean(h[-max(1, min(5, len(h))):]))

    shortcut = {
        "normalised": {"loss_start": head(nrm[0].history), "loss_end": tail(nrm[0].history),
                       "norm_start": nrm[2][0], "norm_end": nrm[2][-1]},
        "unnormalised": {"loss_start": head(raw[0].history), "loss_end": tail(raw[0].history),
                         "norm_start": raw[2][0], "norm_end": raw[2][-1]},
        "lower_bound_normalised": bound,
        "heldout_unnormalised_loss": held_raw,
        "heldout_same_directions_unit_norm_loss": held_unit,
    }
    rows2 = [{"run": k, "loss (first 5 steps)": v["loss_start"], "loss (last 5 steps)": v["loss_end"],
              "mean norm (init)": v["norm_start"], "mean norm (end)": v["norm_end"]}
             for k, v in shortcut.items() if isinstance(v, dict)]

    # Figures.
    ts = np.array(taus, dtype=float)
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.4))
    axes[0].plot(ts, [sweep[t]["alignment"] for t in taus], "o-", color="C0", label="alignment (lower = aligned)")
    axes[0].set_ylabel("alignment", color="C0")
    ax_u = axes[0].twinx()
    ax_u.plot(ts, [sweep[t]["uniformity"] for t in taus], "s-", color="C1", label="uniformity")
    ax_u.set_ylabel("uniformity (lower = more uniform)", color="C1")
    axes[0].set_title("held-out view pairs (normalised)")
    axes[1].plot([sweep[t]["alignment"] for t in taus], [sweep[t]["uniformity"] for t in taus], "o-")
    for t in taus:
        axes[1].annotate(f"τ={t:g}", (sweep[t]["alignment"], sweep[t]["uniformity"]), fontsize=8)
    axes[1].set_xlabel("alignment")
    axes[1].set_ylabel("uniformity")
    axes[1].set_title("alignment vs uniformity")
    for f, mk in (("shape", "o"), ("color", "s"), ("position", "^"), ("size", "v")):
        axes[2].plot(ts, [sweep[t][f"linear_{f}"] for t in taus], mk + "-", label=f)
    axes[2].set_ylim(0, 1)
    axes[2].set_ylabel("linear probe accuracy (val)")
    axes[2].set_title("factor probes")
    for ax in (axes[0], axes[2]):
        ax.set_xscale("log")
        ax.set_xlabel("temperature τ")
    axes[2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: not over the curves
    fig.suptitle(f"info_nce on {FAMILY} views, {steps} steps")
    fig.tight_layout()
    f1 = ctx.save_figure(fig, "temperature_sweep.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for (tr, marks, norms), lab in ((nrm, "normalised"), (raw, "unnormalised (raw dot products)")):
        axes[0].plot(np.arange(1, len(tr.history) + 1), tr.history, label=lab)
        axes[1].plot(marks, norms, "o-", label=lab)
    axes[0].axhline(bound, color="gray", ls=":", label="lower bound (normalised, T17)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("mean embedding norm (held-out)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"the logit-scaling shortcut, τ = {tau_raw:g} (constant learning rate after warm-up)")
    fig.tight_layout()
    f2 = ctx.save_figure(fig, "unnormalised_shortcut.png")

    lo, hi = min(taus), max(taus)
    s, r = shortcut["normalised"], shortcut["unnormalised"]
    unif_curve = [sweep[t]["uniformity"] for t in taus]
    align_curve = [sweep[t]["alignment"] for t in taus]
    v_unif = monotone_trend(taus, unif_curve, "increasing", min_spearman=0.9, tol=0.02, what="uniformity",
                            along="tau")
    v_align = monotone_trend(taus, align_curve, "decreasing", min_spearman=0.9, tol=0.1, relative=True,
                             what="alignment", along="tau")
    unif_best = stated_optimum(taus, unif_curve, lo, kind="min", what="uniformity", along="tau")  # reported
    checks = {
        "uniformity rises with tau over the sweep (most uniform at the smallest tau)": v_unif.holds,
        "alignment falls with tau over the sweep (least aligned at the smallest tau)": v_align.holds,
        "unnormalised_norm_grows": r["norm_end"] > 2 * r["norm_start"],
        "unnormalised_loss_to_zero": r["loss_end"] < 0.1 * r["loss_start"] and r["loss_end"] < bound,
        "heldout_loss_needs_the_norm": held_raw < bound <= held_unit,
    }
    met, _ = ctx.judge(checks)
    verdict = (f"Uniformity over tau = {', '.join(f'{t:g}' for t in taus)}: "
               f"{', '.join(f'{u:.2f}' for u in unif_curve)} (lowest at tau = {unif_best.stats['best_at']:g}, "
               f"Spearman with tau {v_unif.stats['spearman']:+.2f}); alignment "
               f"{', '.join(f'{a:.3f}' for a in align_curve)} (Spearman {v_align.stats['spearman']:+.2f}); "
               f"unnormalised run: "
               f"mean norm {r['norm_start']:.2f} -> {r['norm_end']:.2f} (the normalised run's grows too, {s['norm_start']:.2f} "
               f"-> {s['norm_end']:.2f}, but its loss ignores it), "
               f"loss {r['loss_start']:.3f} -> {r['loss_end']:.2g} (normalised {s['loss_end']:.3f}, bound "
               f"{bound:.3f}); on held-out pairs its loss is {held_raw:.3f} at its own norms but {held_unit:.3f} "
               f"with the same directions at unit norm. Linear probes (not judged): position {sweep[lo]['linear_position']:.2f} -> "
               f"{sweep[hi]['linear_position']:.2f}, colour {sweep[lo]['linear_color']:.2f} -> "
               f"{sweep[hi]['linear_color']:.2f} (the views differ in colour). Checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()) + ".")
    table = (markdown_table(rows) + "\n\nAccuracies are validation accuracies (linear probe and 1-NN). "
             "Logit-scaling shortcut at tau = %g:\n\n" % tau_raw + markdown_table(rows2))
    notes = ("Whole-sweep verdicts:\n\n" + "\n".join(f"- {v}" for v in (v_unif, v_align, unif_best))
             + " (the last is reported, not judged).\n\n"
             "The normalised run's embedding norms grow too, for a different reason: its gradient is orthogonal "
             "to each embedding (T15), so a gradient step on the last layer's output moves z along the sphere's "
             "tangent and increases |z| to second order; the loss itself does not change with the norm. "
             "Alignment and uniformity are computed on L2-normalised encoder outputs of held-out view pairs "
             "(uniformity with t = 2 on 500 points).")
    return Outcome(metrics={"sweep": {f"{t:g}": v for t, v in sweep.items()}, "shortcut": shortcut,
                            "sweep_verdicts": {"uniformity": str(v_unif), "alignment": str(v_align),
                                               "uniformity_lowest_at": unif_best.stats["best_at"]},
                            "checks": checks},
                   table=table, met=met, verdict=verdict, figures=[f1, f2], notes=notes)
