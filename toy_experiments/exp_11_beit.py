"""Experiment 11: BEiT vs BEiT v2 on colored shapes: what the visual tokens code, and what predicting them teaches.

Both methods corrupt an image by replacing blockwise-masked patch embeddings with a learned mask token and
train a ViT to predict a discrete token for every masked patch (cross-entropy).  They differ in where the
tokens come from:

* BEiT (Bao et al. 2021, arXiv 2106.08254): the tokens of a dVAE trained to reconstruct pixels.  The DALL-E
  dVAE cannot be fetched here; :class:`refssl.nn.PatchKMeansTokenizer` is refssl's documented substitute, a
  k-means codebook of per-patch standardised pixels (plus the patch mean): a low-level, pixel-statistics
  vocabulary, like the dVAE's.
* BEiT v2 (Peng et al. 2022, arXiv 2208.06366): the tokens of a VQ-KD tokenizer (:class:`refssl.nn.VQKD`)
  trained to reconstruct the patch features of a frozen *semantic* teacher (CLIP or DINO in the paper), plus
  a patch-aggregation head that makes the CLS token summarise the image.

The teacher.  The paper's teachers are joint-embedding models whose patch features are semantic (they
group patches by object, not by local pixel statistics).  The closest model this project trains is a
contrastive one, so the teacher here is a ViT of the same size as the BEiT encoders, pooled by the mean of its
final patch tokens, trained with InfoNCE (SimCLR; :class:`refssl.train.Trainer`) on the
``crop_color_jitter`` view family: experiment 2 and the book (Torralba, Isola & Freeman ch. 30) show that
colour jitter makes colour useless for matching the views, so such an encoder codes shape instead.  Its
final patch tokens (after the final LayerNorm) are the teacher features of VQ-KD.  A quick MAE encoder was
the alternative; it was not chosen because MAE is itself a pixel-reconstruction model (experiment 10), so
its tokens would give VQ-KD the same low-level targets as the k-means tokenizer and the comparison would
lose the teacher's point.  Mean pooling (not CLS) is used so that the final patch tokens themselves carry the
contrastive signal: with CLS pooling the last block's patch outputs receive no gradient.

Centred teacher features (a departure from the official recipe, which distils the raw teacher features).
The final LayerNorm tokens of this small teacher share one dominant direction: measured on the quick run,
their mean cosine similarity with the mean patch feature is 0.96, so a decoder that outputs that one
direction already reaches 1 - cos = 0.04, and the first quick run's VQ-KD settled there with a single code
in use (perplexity 1.0, every BEiT v2 target the same token).  The distillation targets are therefore the
teacher tokens minus their mean over the training patches (the cosine then measures how patches *differ*);
``teacher_cosine_to_mean`` in metrics.json records the shared component of each run.

Setting: 32 x 32 images, 8 x 8 patches (a 4 x 4 grid), every ViT 2 blocks of width 64 with 4 heads, float32;
both tokenizers have 32 codes; BEiT's blockwise masking scaled to the 4 x 4 grid (6 of 16 patches, BEiT's
75/196); AdamW with warm-up and cosine decay.  VQ-KD: a 1-block encoder and a 1-block decoder, code width 16,
codebook initialised by spherical k-means on the first batch (the official ``kmeans_init``), EMA decay 0.99,
dead codes re-seeded from the batch (refssl's documented addition).  BEiT v2's aggregation head: the CLS of
block 2 with the patch tokens of block 1, through 1 extra block.

Measured on validation images: linear probe and 1-NN per latent factor on the mean of the final patch tokens
of full images for the BEiT, BEiT v2, untrained (their shared initialisation) and teacher encoders; codebook
usage of both tokenizers (perplexity exp(H) of the token distribution over validation patches and the number
of codes used); masked-token prediction accuracy on the masked validation patches, against always answering
the tokenizer's most frequent training token.
"""

from __future__ import annotations

import time

import numpy as np

from refssl import data, nn, optim, state
from refssl.fit import fit
from refssl.nn.beit import BEiT, BEiTv2, PatchKMeansTokenizer, VQKD
from refssl.nn.io import subdict
from refssl.nn.transformer import ViT, no_decay
from refssl.train import Trainer

from . import common
from .common import _ProgressStream
from .framework import Outcome, experiment, markdown_table

__all__ = ["run", "codebook_usage", "FAMILY"]

FAMILY = "crop_color_jitter"
VIT = dict(image_size=32, patch=8, dim=64, depth=2, n_heads=4)
VOCAB = 32


def codebook_usage(tokens, n_codes):
    """(perplexity exp(H) of the token distribution, number of codes used, per-code counts)."""
    counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=n_codes)
    p = counts / counts.sum()
    nz = p[p > 0]
    return float(np.exp(-np.sum(nz * np.log(nz)))), int((counts > 0).sum()), counts


def _mean_cosine(feats, direction):
    """Mean cosine similarity of the rows of feats (..., D) with one direction (D,)."""
    f = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
    return float(np.mean(f @ direction / (np.linalg.norm(f, axis=1) * np.linalg.norm(direction) + 1e-12)))


def _adamw(lr):
    return optim.AdamW(lr=lr, betas=(0.9, 0.98), weight_decay=0.05, exclude=no_decay)


def _schedule(lr, steps):
    return optim.CosineSchedule(lr, steps, warmup_steps=max(1, steps // 20))


def _log(ctx, label):
    stream = _ProgressStream(ctx, label)
    return lambda m: print(m, file=stream)


def _batches(images, batch, rng):
    while True:
        yield rng.choice(len(images), size=batch, replace=False)


def _tokens_in_batches(fn, images, batch_size=500):
    return np.concatenate([fn(images[s:s + batch_size]) for s in range(0, len(images), batch_size)], axis=0)


def train_teacher(ctx, ds, *, steps, batch, lr=2e-3):
    """InfoNCE ViT on crop + colour-jitter views; returns (encoder, encoder params, losses)."""
    enc = ViT(pool="mean", **VIT)
    rng = np.random.default_rng(ctx.seed * 1000 + 211)
    pairs = data.view_pair_stream(FAMILY, ds.train.factors, rng, batch_size=batch, images=ds.train.images,
                                  size=32)
    trainer = Trainer(enc, "info_nce", _adamw(lr), projector=nn.projector(VIT["dim"], 128, 32),
                      schedule=_schedule(lr, steps), loss_kwargs={"temperature": 0.2}, seed=ctx.seed + 1,
                      log_every=max(1, steps // 4), stream=_ProgressStream(ctx, "teacher (InfoNCE ViT)"))
    ctx.progress(f"train the teacher: InfoNCE ViT on {FAMILY} views, {steps} steps, batch {batch}")
    losses = trainer.fit(pairs, steps=steps)
    return enc, subdict(trainer.params, "enc"), losses


def train_vqkd(ctx, ds, teacher_feats, *, steps, batch, lr=2e-3):
    """VQ-KD tokenizer distilling the teacher's patch features; returns (vqkd, params, state, history)."""
    vq = VQKD(image_size=32, patch=8, dim=VIT["dim"], depth=1, n_heads=4, code_dim=16, n_codes=VOCAB,
              dec_depth=1, teacher_dim=teacher_feats.shape[-1])
    rng = np.random.default_rng(ctx.seed * 1000 + 307)
    params, st = vq.init(np.random.default_rng(ctx.seed + 2), np.float32)
    idx_stream = _batches(ds.train.images, batch, rng)
    box = {"state": st}
    hist = {"distill": [], "commit": [], "dead_reset": 0}

    # The official kmeans_init: spherical k-means on the normalised encoder outputs of the first batch.
    first = next(idx_stream)
    _, cache = vq.loss(params, st, ds.train.images[first], teacher_feats[first])
    zhat = cache[-1]["zhat"]  # the L2-normalised encoder outputs that update_codebook also reads
    box["state"] = {"codebook": state.vq_kmeans_init(zhat, VOCAB, rng).astype(np.float32),
                    "cluster_size": st["cluster_size"]}

    def objective(p, step):
        idx = next(idx_stream)
        value, cache = vq.loss(p, box["state"], ds.train.images[idx], teacher_feats[idx])
        grads = vq.backward(cache)
        box["state"] = vq.update_codebook(box["state"], cache, rng)
        hist["distill"].append(cache[-1]["distill"])
        hist["commit"].append(cache[-1]["commit"])
        return value, grads

    ctx.progress(f"train VQ-KD: {steps} steps, batch {batch}")
    params, losses = fit(objective, params, _adamw(lr), steps, lr_schedule=_schedule(lr, steps),
                         log=_log(ctx, "VQ-KD"), log_every=max(1, steps // 4))
    hist["loss"] = losses
    return vq, params, box["state"], hist


def train_beit(ctx, model, ds, tokens, *, steps, batch, lr, label, seed_offset):
    """BEiT or BEiT v2 pretraining on precomputed training tokens; returns (initial params, params, losses)."""
    rng = np.random.default_rng(ctx.seed * 1000 + 401 + seed_offset)
    p0 = model.init(np.random.default_rng(ctx.seed + 3), np.float32)  # same encoder init for both models
    idx_stream = _batches(ds.train.images, batch, rng)

    def objective(p, step):
        idx = next(idx_stream)
        return model.loss_and_grads(p, ds.train.images[idx], tokens[idx], model.draw_mask(batch, rng))

    ctx.progress(f"train {label}: {steps} steps, batch {batch}")
    params, losses = fit(objective, p0, _adamw(lr), steps, lr_schedule=_schedule(lr, steps),
                         log=_log(ctx, label), log_every=max(1, steps // 4))
    return p0, params, losses


def masked_token_accuracy(model, params, images, tokens, mask, majority):
    """(accuracy of the argmax token at the masked patches, accuracy of always answering ``majority``)."""
    pred = np.concatenate([model.predict_tokens(params, images[s:s + 500], mask[s:s + 500])
                           for s in range(0, len(images), 500)], axis=0)
    return float(np.mean(pred[mask] == tokens[mask])), float(np.mean(tokens[mask] == majority))


def _patch_mosaic(images, tokens, n_codes, patch, cols=8, pad=1):
    """For each code (sorted by usage) the mean image patch assigned to it: (H, W, 3) mosaic, order, counts."""
    from refssl.ops.masked_modelling import patchify_forward

    p, _ = patchify_forward(images, patch=patch)  # (N, L, p p 3) in (row, column, channel) order
    p = p.reshape(-1, patch, patch, 3)
    t = tokens.reshape(-1)
    counts = np.bincount(t, minlength=n_codes)
    sums = np.zeros((n_codes, patch, patch, 3))
    np.add.at(sums, t, p)
    means = sums / np.maximum(counts, 1)[:, None, None, None]
    order = np.argsort(-counts, kind="stable")
    rows = -(-n_codes // cols)
    out = np.ones((rows * (patch + pad) + pad, cols * (patch + pad) + pad, 3))
    for k, code in enumerate(order):
        r, c = divmod(k, cols)
        y, x = pad + r * (patch + pad), pad + c * (patch + pad)
        out[y:y + patch, x:x + patch] = means[code] if counts[code] else 0.5
    return np.clip(out, 0, 1), order, counts


def _codebook_figure(ctx, images, tok, filename):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.0), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    fig.subplots_adjust(wspace=0.35)
    for ax, (name, t) in zip(axes[:2], tok.items()):
        mosaic, order, counts = _patch_mosaic(images, t, VOCAB, VIT["patch"])
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_axis_off()
        ppl, used, _ = codebook_usage(t, VOCAB)
        ax.set_title(f"{name}: mean patch per code\n(sorted by usage; perplexity {ppl:.1f}, {used} used)",
                     fontsize=8)
        share = np.sort(counts)[::-1] / counts.sum()
        axes[2].plot(np.arange(1, VOCAB + 1), share, "o-", ms=3, label=name)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("code rank (by usage)")
    axes[2].set_ylabel("share of validation patches")
    axes[2].legend(fontsize=8)
    axes[2].set_title("codebook usage", fontsize=9)
    return ctx.save_figure(fig, filename)


def _loss_figure(ctx, curves, filename):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.4 * len(curves), 3.0))
    for ax, (title, (ylabel, series)) in zip(axes, curves.items()):
        for name, loss in series.items():
            loss = np.asarray(loss)
            w = max(1, len(loss) // 25)
            ax.plot(np.arange(w, len(loss) + 1), np.convolve(loss, np.ones(w) / w, mode="valid"), label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=9)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.subplots_adjust(wspace=0.45)
    return ctx.save_figure(fig, filename)


def _probe_figure(ctx, results, filename):
    return common.probe_bar_figure(ctx, results, filename, figsize=(7.0, 3.0))


@experiment(
    "beit", order=11,
    title="BEiT vs BEiT v2: k-means patch tokens vs VQ-KD tokens of a contrastive teacher",
    question="Do the tokens of a tokenizer distilled from a semantic (shape-coding) teacher use the codebook "
             "differently from pixel-statistics tokens, and does predicting them teach the encoder more about "
             "the object than predicting pixel-level tokens?",
    expected="(Bao et al. 2021; Peng et al. 2022) (1) The VQ-KD tokens use the codebook more evenly than the "
             "k-means patch tokens: perplexity exp(H) of the token distribution over validation patches higher "
             "for VQ-KD (k-means spends one code on the many empty background patches; VQ-KD codes follow the "
             "teacher's context-dependent features). (2) Both pretrained encoders beat the untrained one (their "
             "shared initialisation) on shape linear-probe accuracy (validation, pooled tokens of full images). "
             "(3) BEiT v2 beats BEiT on shape linear-probe accuracy: its targets carry the teacher's "
             "colour-invariant, shape-coding features, while k-means tokens mostly code local colour. (4) Both "
             "models predict the tokens of masked validation patches more accurately than always answering the "
             "tokenizer's most frequent training token.",
)
def run(ctx):
    import matplotlib

    matplotlib.use("Agg")
    cpu0 = time.process_time()
    n_train = ctx.pick(tiny=128, quick=2000, full=4000)
    n_val = ctx.pick(tiny=64, quick=500, full=1000)
    t_steps = ctx.pick(tiny=2, quick=200, full=600)
    vq_steps = ctx.pick(tiny=2, quick=200, full=800)
    b_steps = ctx.pick(tiny=2, quick=500, full=1500)
    t_batch = ctx.pick(tiny=16, quick=64, full=128)
    batch = ctx.pick(tiny=8, quick=32, full=64)
    lr = 2e-3
    max_iter = ctx.pick(tiny=10, quick=40, full=100)
    ds = common.dataset(ctx, n_train, n_val, size=32)
    ctx.setting(patch=VIT["patch"], vit=f"dim {VIT['dim']}, {VIT['depth']} blocks, {VIT['n_heads']} heads",
                vocab=VOCAB, teacher=f"InfoNCE ViT on {FAMILY}, {t_steps} steps, batch {t_batch}",
                vqkd_steps=vq_steps, beit_steps=b_steps, batch=batch, lr=lr,
                optimizer="AdamW (0.9, 0.98), wd 0.05, warm-up 5 % + cosine", dtype="float32")
    timings = {}

    t0 = time.process_time()
    t_enc, t_params, t_losses = train_teacher(ctx, ds, steps=t_steps, batch=t_batch)
    teacher_train = _tokens_in_batches(lambda x: t_enc.tokens(t_params, x)[:, 1:], ds.train.images)
    # Centred targets (see the module docstring): the shared direction of the patch tokens is removed.
    teacher_mean = teacher_train.reshape(-1, teacher_train.shape[-1]).mean(axis=0)
    cos_to_mean = _mean_cosine(teacher_train, teacher_mean)
    teacher_train = teacher_train - teacher_mean
    timings["teacher"] = time.process_time() - t0

    t0 = time.process_time()
    vq, vq_params, vq_state, vq_hist = train_vqkd(ctx, ds, teacher_train, steps=vq_steps, batch=batch, lr=lr)
    timings["vqkd"] = time.process_time() - t0

    t0 = time.process_time()
    kmeans_tok = PatchKMeansTokenizer(patch=VIT["patch"], vocab_size=VOCAB)
    kmeans_tok.fit(ds.train.images, np.random.default_rng(ctx.seed * 1000 + 503))
    tok = {"k-means": {"train": kmeans_tok.encode(ds.train.images), "val": kmeans_tok.encode(ds.val.images)},
           "VQ-KD": {"train": vq.tokenize(vq_params, vq_state, ds.train.images),
                     "val": vq.tokenize(vq_params, vq_state, ds.val.images)}}
    timings["tokenize"] = time.process_time() - t0

    models = {"BEiT": (BEiT(vocab_size=VOCAB, **VIT), "k-means"),
              "BEiT v2": (BEiTv2(vocab_size=VOCAB, early_layers=1, head_layers=1, **VIT), "VQ-KD")}
    trained, losses, p_init = {}, {}, None
    for i, (name, (model, tk)) in enumerate(models.items()):
        t0 = time.process_time()
        p0, params, losses[name] = train_beit(ctx, model, ds, tok[tk]["train"], steps=b_steps, batch=batch, lr=lr,
                                              label=f"{name} ({tk} tokens)", seed_offset=i)
        trained[name] = params
        p_init = p0
        timings[name] = time.process_time() - t0

    # Token prediction on validation images, the same blockwise masks for both models.
    mask_val = models["BEiT"][0].draw_mask(n_val, np.random.default_rng(ctx.seed * 1000 + 601))
    usage, token_acc = {}, {}
    for name, (model, tk) in models.items():
        majority = int(np.argmax(np.bincount(tok[tk]["train"].reshape(-1), minlength=VOCAB)))
        acc, base = masked_token_accuracy(model, trained[name], ds.val.images, tok[tk]["val"], mask_val, majority)
        token_acc[name] = {"accuracy": acc, "majority_baseline": base, "tokens": tk}
    for tk in tok:
        ppl, used, counts = codebook_usage(tok[tk]["val"], VOCAB)
        usage[tk] = {"perplexity": ppl, "used_codes": used, "top_code_share": float(counts.max() / counts.sum()),
                     "counts": counts}

    t0 = time.process_time()
    ctx.progress("probe the encoders")
    feats = {"BEiT": lambda x: models["BEiT"][0].features(trained["BEiT"], x),
             "BEiT v2": lambda x: models["BEiT v2"][0].features(trained["BEiT v2"], x),
             "untrained": lambda x: models["BEiT"][0].features(p_init, x),
             "teacher": lambda x: t_enc.features(t_params, x)}
    probes = {}
    for name, f in feats.items():
        probes[name], _ = common.probe(ds, f(ds.train.images), f(ds.val.images), name=name, max_iter=max_iter)
    timings["probes"] = time.process_time() - t0

    figs = [_codebook_figure(ctx, ds.val.images, {k: v["val"] for k, v in tok.items()}, "codebooks.png"),
            _loss_figure(ctx, {
                "teacher: InfoNCE ViT": ("InfoNCE loss (T = 0.2)", {"teacher": t_losses}),
                "VQ-KD tokenizer": ("loss", {"total": vq_hist["loss"], "1 - cos (distill)": vq_hist["distill"],
                                             "commitment": vq_hist["commit"]}),
                "masked-token prediction": ("cross-entropy on masked patches\n(BEiT v2: sum of 2 heads)",
                                            {n: losses[n] for n in models}),
            }, "loss_curves.png"),
            _probe_figure(ctx, probes, "probes.png")]

    rows = [{"encoder": name, **{f"{f} (lin)": r[f]["linear_val"] for f in common.PROBE_FACTORS},
             **{f"{f} (1-NN)": r[f]["knn_val"] for f in common.PROBE_FACTORS}} for name, r in probes.items()]
    table = markdown_table(rows)
    table += "\n\n" + markdown_table(
        [{"tokenizer": tk, "perplexity exp(H)": u["perplexity"], "codes used": f"{u['used_codes']} / {VOCAB}",
          "most used code's share": u["top_code_share"]} for tk, u in usage.items()])
    table += "\n\n" + markdown_table(
        [{"model": n, "tokens": a["tokens"], "masked-token accuracy (val)": a["accuracy"],
          "most-frequent-token baseline": a["majority_baseline"]} for n, a in token_acc.items()])
    chance = probes["untrained"]["shape"]["chance"]
    table += f"\n\nAccuracies are validation fractions (shape chance {chance:.3f})."

    def shape_lin(name):
        return probes[name]["shape"]["linear_val"]

    checks = {
        "VQ-KD perplexity above k-means": usage["VQ-KD"]["perplexity"] > usage["k-means"]["perplexity"],
        "both pretrained encoders beat the untrained one on shape":
            min(shape_lin("BEiT"), shape_lin("BEiT v2")) > shape_lin("untrained"),
        "BEiT v2 beats BEiT on shape": shape_lin("BEiT v2") > shape_lin("BEiT"),
        "both models beat the most-frequent-token baseline":
            all(a["accuracy"] > a["majority_baseline"] for a in token_acc.values()),
    }
    met, failed = ctx.judge(checks)
    verdict = (f"Codebook perplexity VQ-KD {usage['VQ-KD']['perplexity']:.1f} vs k-means "
               f"{usage['k-means']['perplexity']:.1f} (of {VOCAB}). Shape linear probe: BEiT "
               f"{100 * shape_lin('BEiT'):.1f} %, BEiT v2 {100 * shape_lin('BEiT v2'):.1f} %, untrained "
               f"{100 * shape_lin('untrained'):.1f} %, teacher {100 * shape_lin('teacher'):.1f} % (chance "
               f"{100 * chance:.1f} %). Masked-token accuracy: " +
               ", ".join(f"{n} {100 * a['accuracy']:.1f} % (baseline {100 * a['majority_baseline']:.1f} %)"
                         for n, a in token_acc.items()) + ". " +
               ("All criteria hold." if not failed else "Not met: " + "; ".join(failed) + "."))
    notes = "Criteria: " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items()) + "."
    colour = {n: probes[n]["color"]["linear_val"] for n in probes}
    notes += ("\n\nObservation, not a criterion stated in advance: colour linear-probe accuracy BEiT "
              f"{100 * colour['BEiT']:.1f} %, BEiT v2 {100 * colour['BEiT v2']:.1f} %, teacher "
              f"{100 * colour['teacher']:.1f} %, untrained {100 * colour['untrained']:.1f} %: whatever "
              "invariance the colour-jittered teacher has reaches the BEiT v2 encoder through the VQ-KD tokens.")
    notes += ("\n\nThe two pretrainings differ in the tokens and in BEiT v2's extra aggregation head; the "
              "masked-token accuracies are not comparable across models (different vocabularies). The "
              "teacher row shows what VQ-KD was asked to reproduce.")
    metrics = {"cpu_seconds": time.process_time() - cpu0, "cpu_seconds_by_stage": timings,
               "teacher_cosine_to_mean": cos_to_mean,
               "probes": probes, "codebook_usage": usage, "masked_token": token_acc, "checks": checks,
               "shape_linear": {n: shape_lin(n) for n in probes},
               "losses": {"teacher": t_losses, "vqkd": vq_hist["loss"], "vqkd_distill": vq_hist["distill"],
                          **{n: losses[n] for n in models}}}
    return Outcome(metrics=metrics, table=table, met=met, verdict=verdict, figures=figs, notes=notes)
