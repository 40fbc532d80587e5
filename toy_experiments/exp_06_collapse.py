"""Experiment 6: what keeps the non-contrastive methods from collapsing.

Three pairs of runs, each differing in one ingredient:

* SimSiam (Chen & He 2020, arXiv 2011.10566) with and without the stop-gradient on the target branch.  The
  Trainer always detaches the targets, so both arms run through :func:`_simsiam_run`, a short explicit loop
  that lets the gradient flow into the target branch when ``stop_gradient=False``
  (L = -1/2 [cos(p1, z2) + cos(p2, z1)], gradients to p and z).
* BYOL (Grill et al. 2020, arXiv 2006.07733) with an EMA target, with and without the predictor (the
  Trainer's predictor / target mode and the registered ``byol`` loss).
* DINO (Caron et al. 2021, arXiv 2104.14294) with centering + sharpening (teacher temperature below the
  student's) and with sharpening but the center fixed at 0: :func:`_dino_run`, an explicit loop (student MLP +
  head, EMA teacher via :func:`refssl.state.ema_update`, the ``dino`` op, :func:`refssl.state.dino_center_update`
  after the loss).

Collapse is read from the effective rank of the embedding the loss sees (1 = every input mapped to one
direction), the per-dimension std of the L2-normalised embedding (SimSiam's diagnostic: 0 when collapsed,
about 1/sqrt(d) for a spread-out embedding) and the factor probes of the encoder output.
"""

from __future__ import annotations

import numpy as np

from refssl import data, nn, optim, registry, state
from refssl import eval as ev
from refssl.nn import io as nnio
from refssl.numerics import softmax
from refssl.train import Trainer

from . import common
from .framework import Outcome, experiment, markdown_table

FAMILY = "crop_color_jitter"


def _schedule(lr, steps):
    """Short linear warm-up, then a constant rate: collapse is a dynamical process, and a cosine decay to 0
    over a short run would freeze it half-way."""
    warm = max(1, steps // 20)
    return lambda step: lr * min(1.0, (step + 1) / warm)


def _norm_std(z):
    """Mean over dimensions of the std over samples of the L2-normalised rows (SimSiam Fig. 2)."""
    u = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return float(u.std(axis=0).mean())


LOSS_LABELS = {  # the y-axis of losses.png: what each curve measures
    "SimSiam": "loss: -mean cos(p, z), symmetrised",
    "BYOL": "loss: sum of 2 - 2 cos, in [0, 8]",
    "DINO": "loss: cross-entropy teacher -> student",
}


def _rank(z):
    return ev.effective_rank(np.asarray(z, dtype=np.float64))


class _Nets:
    """Named Sequential networks with prefixed parameter / buffer dicts (as the Trainer keeps them)."""

    def __init__(self, nets: dict, rng, dtype=np.float32):
        self.nets, self.params, self.buffers = nets, {}, {}
        for name, net in nets.items():
            p, s = net.init(rng, dtype)
            self.params.update(nnio.prefixed(p, name))
            self.buffers.update(nnio.prefixed(s, name))

    def forward(self, name, x, train=True, params=None, buffer_prefix=""):
        params = self.params if params is None else params
        key = buffer_prefix + name
        out, cache, s = self.nets[name].forward(nnio.subdict(params, name), nnio.subdict(self.buffers, key), x,
                                                train=train)
        if train:
            self.buffers = {**self.buffers, **nnio.prefixed(s, key)}
        return out, cache

    def backward(self, name, cache, dout, grads, need_dx=True):
        dx, g = self.nets[name].backward(cache, dout, need_dx=need_dx)
        return dx, nnio.add_into(grads, nnio.prefixed(g, name))


def _cosine_terms(p, z):
    """-mean_i cos(p_i, z_i) and its gradients with respect to p and z (both, no stop-gradient)."""
    l2n = registry.get("l2_normalize")
    pn, cp = l2n.forward(p)
    zn, cz = l2n.forward(z)
    n = p.shape[0]
    loss = -float(np.sum(pn * zn)) / n
    dp = l2n.backward(cp, (-zn / n).astype(p.dtype))[0]
    dz = l2n.backward(cz, (-pn / n).astype(z.dtype))[0]
    return loss, dp, dz


def _simsiam_run(ctx, pairs, *, size, hidden, dim, steps, lr, stop_gradient, every, probe_x):
    """SimSiam with (official) or without the stop-gradient on z; returns (nets, history, marks, ranks)."""
    rng = np.random.default_rng(ctx.seed)
    m = _Nets({"enc": common.mlp_encoder(size, hidden, dim), "proj": nn.projector(dim, hidden, dim),
               "pred": nn.predictor(dim, hidden // 2)}, rng)
    opt = optim.Adam(lr=lr)
    opt_state = opt.init(m.params)
    sched = _schedule(lr, steps)
    label = f"simsiam {'with' if stop_gradient else 'WITHOUT'} stop-gradient"
    ctx.progress(f"train {label}: {steps} steps")
    history, marks, ranks = [], [], []
    for step in range(steps):
        x1, x2 = next(pairs)
        grads, outs = {}, []
        for x in (x1, x2):  # each view through the networks separately (per-view BN statistics)
            h, ch = m.forward("enc", x)
            z, cz = m.forward("proj", h)
            p, cp = m.forward("pred", z)
            outs.append((z, p, ch, cz, cp))
        (z1, p1, *c1), (z2, p2, *c2) = outs
        la, dp1, dz2_t = _cosine_terms(p1, z2)
        lb, dp2, dz1_t = _cosine_terms(p2, z1)
        history.append(0.5 * (la + lb))
        for (z, p, ch, cz, cp), dp, dz_t in (((z1, p1, *c1), dp1, dz1_t), ((z2, p2, *c2), dp2, dz2_t)):
            dz, grads = m.backward("pred", cp, 0.5 * dp, grads)
            if not stop_gradient:  # the target branch z also receives its gradient
                dz = dz + 0.5 * dz_t
            dh, grads = m.backward("proj", cz, dz, grads)
            _, grads = m.backward("enc", ch, dh, grads, need_dx=False)
        m.params, opt_state = opt.step(m.params, grads, opt_state, lr=sched(step))
        if (step + 1) % every == 0 or step + 1 == steps:
            marks.append(step + 1)
            ranks.append(_rank(_simsiam_embed(m, probe_x)))
    ctx.progress(f"  {label}: final loss {history[-1]:.4f}, effective rank of the projector output "
                 f"{ranks[-1]:.2f}")
    return m, history, marks, ranks


def _simsiam_embed(m, x, head=True):
    h, _ = m.forward("enc", x, train=False)
    return m.forward("proj", h, train=False)[0] if head else h


def _byol_run(ctx, pairs, *, size, hidden, dim, steps, lr, predictor, momentum, every, probe_x):
    """BYOL through the Trainer (EMA target, ``byol`` loss), with or without the predictor."""
    label = f"byol {'with' if predictor else 'WITHOUT'} predictor"
    trainer = Trainer(common.mlp_encoder(size, hidden, dim), "byol", optim.Adam(lr=lr),
                      projector=nn.projector(dim, hidden, dim),
                      predictor=nn.predictor(dim, hidden // 2) if predictor else None,
                      target_momentum=momentum,
                      schedule=_schedule(lr, steps), seed=ctx.seed, log_every=0)
    ctx.progress(f"train {label}: {steps} steps")
    marks, ranks = [], []
    for stop in list(range(every, steps, every)) + [steps]:
        trainer.fit(pairs, steps=stop)
        marks.append(stop)
        ranks.append(_rank(trainer.encode(probe_x, head=True)))
    ctx.progress(f"  {label}: final loss {trainer.history[-1]:.4f}, effective rank of the projector output "
                 f"{ranks[-1]:.2f}")
    return trainer, list(trainer.history), marks, ranks


def _dino_run(ctx, pairs, *, size, hidden, dim, k_out, steps, lr, centering, momentum, every, probe_x,
              student_temp=0.1, teacher_temp=0.04, center_momentum=0.9):
    """DINO with two global views: student = encoder + head, teacher = EMA copy (train-mode BN with its own
    running statistics), loss with the old center, center update after the loss (or center fixed at 0)."""
    rng = np.random.default_rng(ctx.seed)
    m = _Nets({"enc": common.mlp_encoder(size, hidden, dim), "head": nn.projector(dim, hidden, k_out)}, rng)
    teacher = {k: v.copy() for k, v in m.params.items()}
    m.buffers.update({f"teacher.{k}": v.copy() for k, v in m.buffers.items()})
    center = np.zeros(k_out, dtype=np.float32)
    dino = registry.get("dino")
    opt = optim.Adam(lr=lr)
    opt_state = opt.init(m.params)
    sched = _schedule(lr, steps)
    label = f"dino {'with' if centering else 'WITHOUT'} centering"
    ctx.progress(f"train {label}: {steps} steps")
    history, marks, ranks, prob_ranks = [], [], [], []
    for step in range(steps):
        x1, x2 = next(pairs)
        s_out, caches, t_out = [], [], []
        for x in (x1, x2):
            h, ch = m.forward("enc", x)
            g, cg = m.forward("head", h)
            s_out.append(g)
            caches.append((ch, cg))
        for x in (x1, x2):
            h, _ = m.forward("enc", x, params=teacher, buffer_prefix="teacher.")
            t_out.append(m.forward("head", h, params=teacher, buffer_prefix="teacher.")[0])
        student, tea = np.stack(s_out), np.stack(t_out)
        loss, cache = dino.forward(student, tea, center, student_temp=student_temp, teacher_temp=teacher_temp)
        history.append(float(loss))
        if centering:  # after the loss: this step used the old center
            center = state.dino_center_update(center, tea, momentum=center_momentum)
        dstudent = dino.backward(cache, 1.0)[0]
        grads = {}
        for v, (ch, cg) in enumerate(caches):
            dh, grads = m.backward("head", cg, dstudent[v], grads)
            _, grads = m.backward("enc", ch, dh, grads, need_dx=False)
        m.params, opt_state = opt.step(m.params, grads, opt_state, lr=sched(step))
        teacher = state.ema_update(teacher, m.params, momentum=momentum)
        if (step + 1) % every == 0 or step + 1 == steps:
            marks.append(step + 1)
            t_logits = _dino_embed(m, probe_x, teacher)
            ranks.append(_rank(t_logits))
            prob_ranks.append(_rank(softmax((t_logits - center) / teacher_temp, axis=-1)))
    # Two different quantities: the report judges the softmax output (what collapses to one-hot); the raw
    # logits can keep a higher rank while the softmax is already collapsed.
    ctx.progress(f"  {label}: final loss {history[-1]:.4f}, effective rank of the teacher softmax output "
                 f"{prob_ranks[-1]:.2f} (judged in the report), of its raw logits {ranks[-1]:.2f}")
    return m, teacher, center, history, marks, ranks, prob_ranks


def _dino_embed(m, x, params, head=True):
    h, _ = m.forward("enc", x, train=False, params=params, buffer_prefix="teacher.")
    return m.forward("head", h, train=False, params=params, buffer_prefix="teacher.")[0] if head else h


@experiment(
    "collapse", order=6, title="Collapse: stop-gradient, predictor, centering",
    question="Which ingredient keeps SimSiam, BYOL and DINO from collapsing to a constant embedding?",
    expected="SimSiam without stop-gradient collapses (effective rank of the projector output -> about 1, std "
             "of the normalised embedding -> 0) and with it does not; BYOL without predictor collapses "
             "(effective rank -> about 1) and with the predictor (and the EMA target) does not; DINO without "
             "centering collapses (the teacher's sharpened softmax output concentrates on a few prototypes: "
             "its effective rank falls towards 1) and with centering + sharpening does not. What is judged, per "
             "pair: the arm without the ingredient ends with effective rank < 2.5 (for DINO: of the teacher's "
             "softmax output over a held-out batch) and the arm with it above twice that. The share of inputs "
             "whose teacher argmax is the most used prototype is reported for DINO, not judged.")
def run(ctx):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 16
    n_train = ctx.pick(tiny=300, quick=1000, full=4000)
    n_val = ctx.pick(tiny=128, quick=400, full=1000)
    steps = ctx.pick(tiny=2, quick=350, full=1000)
    batch = ctx.pick(tiny=32, quick=128, full=256)
    hidden, dim, k_out, lr, momentum = 128, 32, 32, 3e-3, 0.95
    every = max(1, steps // 12)
    ds = common.dataset(ctx, n_train, n_val, size=size)
    ctx.setting(family=FAMILY, steps=steps, batch=batch, hidden=hidden, embed_dim=dim, dino_out=k_out, lr=lr,
                ema_momentum=momentum, dino_temps="student 0.1, teacher 0.04", optimizer="Adam, warm-up then constant rate")
    probe_x = ds.val.images[:256]

    def stream(offset):
        return data.view_pair_stream(FAMILY, ds.train.factors, np.random.default_rng(ctx.seed * 1000 + offset),
                                     batch_size=batch, images=ds.train.images, size=size)

    kw = dict(size=size, hidden=hidden, dim=dim, steps=steps, lr=lr, every=every, probe_x=probe_x)
    runs = {}
    for sg in (True, False):
        m, hist, marks, ranks = _simsiam_run(ctx, stream(1), stop_gradient=sg, **kw)
        name = f"SimSiam {'with' if sg else 'without'} stop-grad"
        runs[name] = dict(history=hist, marks=marks, ranks=ranks,
                          embed=lambda x, m=m: _simsiam_embed(m, x), rep=lambda x, m=m: _simsiam_embed(m, x, False))
    for pred in (True, False):
        tr, hist, marks, ranks = _byol_run(ctx, stream(2), predictor=pred, momentum=momentum, **kw)
        name = f"BYOL {'with' if pred else 'without'} predictor"
        runs[name] = dict(history=hist, marks=marks, ranks=ranks, embed=lambda x, t=tr: t.encode(x, head=True),
                          rep=lambda x, t=tr: t.encode(x))
    for cen in (True, False):
        m, teacher, center, hist, marks, ranks, pranks = _dino_run(ctx, stream(3), k_out=k_out, centering=cen,
                                                                  momentum=momentum, **kw)
        name = f"DINO {'with' if cen else 'without'} centering"
        # What DINO collapses is the teacher's output distribution: judge on its effective rank.
        runs[name] = dict(history=hist, marks=marks, ranks=pranks, logit_ranks=ranks,
                          embed=lambda x, m=m, t=teacher: _dino_embed(m, x, t),
                          rep=lambda x, m=m, t=teacher: _dino_embed(m, x, t, head=False),
                          center=center)

    rows, metrics = [], {}
    for name, r in runs.items():
        ctx.progress(f"probe {name}")
        z_val = r["embed"](ds.val.images)
        res, _ = common.probe(ds, r["rep"](ds.train.images), r["rep"](ds.val.images), name=name, max_iter=50)
        mt = {"final_rank": r["ranks"][-1], "rank_curve": r["ranks"], "steps": r["marks"],
              "final_loss": r["history"][-1], "norm_std": _norm_std(z_val),
              "encoder_rank": _rank(r["rep"](ds.val.images)),
              **{f"linear_{f}": res[f]["linear_val"] for f in res}}
        if "logit_ranks" in r:
            p = softmax((z_val - r["center"]) / 0.04, axis=-1)
            mt["logit_rank_curve"] = r["logit_ranks"]
            mt["teacher_logit_rank"] = _rank(z_val)
            mt["top_prototype_share"] = float(np.bincount(p.argmax(1), minlength=p.shape[1]).max() / len(p))
        metrics[name] = mt
        rows.append({"run": name, "eff. rank (projector out; DINO: teacher softmax)": mt["final_rank"],
                     "eff. rank (DINO teacher raw logits)": mt.get("teacher_logit_rank", ""),
                     "eff. rank (encoder)": mt["encoder_rank"],
                     "std of normalised z": mt["norm_std"], "final loss": mt["final_loss"],
                     "shape (lin)": mt["linear_shape"], "position (lin)": mt["linear_position"],
                     "size (lin)": mt["linear_size"],
                     "top prototype share": mt.get("top_prototype_share", "")})

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharey=True)
    for ax, method in zip(axes, ("SimSiam", "BYOL", "DINO")):
        for name, r in runs.items():
            if name.startswith(method):
                ax.plot(r["marks"], r["ranks"], "o-" if "with " in name else "x--", label=name)
        ax.axhline(1.0, color="gray", ls=":")
        ax.set_xlabel("step")
        ax.set_title(method + (" (teacher softmax output)" if method == "DINO" else " (projector output)"))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("effective rank (held-out batch)")
    axes[0].set_yscale("log")
    fig.tight_layout()
    f1 = ctx.save_figure(fig, "effective_rank.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for ax, method in zip(axes, ("SimSiam", "BYOL", "DINO")):
        for name, r in runs.items():
            if name.startswith(method):
                ax.plot(np.arange(1, len(r["history"]) + 1), r["history"], label=name)
        ax.set_xlabel("step")
        ax.set_title(f"{method} training loss")
        ax.set_ylabel(LOSS_LABELS[method])
        ax.legend(fontsize=8)
    fig.tight_layout()
    f2 = ctx.save_figure(fig, "losses.png")

    pairs = [("SimSiam", "SimSiam without stop-grad", "SimSiam with stop-grad"),
             ("BYOL", "BYOL without predictor", "BYOL with predictor"),
             ("DINO", "DINO without centering", "DINO with centering")]
    checks, parts = {}, []
    for method, bad, good in pairs:
        rb, rg = metrics[bad]["final_rank"], metrics[good]["final_rank"]
        checks[method] = bool(rb < 2.5 and rg > 2 * rb)
        extra = ""
        if method == "DINO":
            extra = (f", teacher's top prototype takes {metrics[bad]['top_prototype_share']:.0%} of the inputs "
                     f"without vs {metrics[good]['top_prototype_share']:.0%} with centering")
        else:
            extra = (f", std of normalised z {metrics[good]['norm_std']:.3f} with vs {metrics[bad]['norm_std']:.3f} "
                     f"without (1/sqrt(d) = {1 / np.sqrt(dim):.3f})")
        parts.append(f"{method}: effective rank {rg:.2f} with vs {rb:.2f} without{extra} "
                     f"({'as expected' if checks[method] else 'NOT as expected'})")
    met, _ = ctx.judge(checks)
    verdict = "; ".join(parts) + "."
    return Outcome(metrics={"runs": metrics, "checks": checks}, table=markdown_table(rows), met=met,
                   verdict=verdict, figures=[f1, f2],
                   notes="Effective rank: exp of the entropy of the normalised singular values of the held-out "
                         "embedding (uncentred), 1 for a constant embedding. Probes (validation accuracy) use the "
                         "encoder output; colour is removed by the colour jitter of the views. For DINO the rank is "
                         "that of the teacher's softmax output (centred with the final center), the quantity that "
                         "collapses to one-hot; the rank of its raw logits is in metrics.json. The collapse is measured at "
                         "the loss input (projector / head output); the encoder output below it keeps more rank and "
                         "the probes change little in these short runs.")
