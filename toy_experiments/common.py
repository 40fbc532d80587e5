"""Helpers shared by the experiments: data per level, small encoders, training and probing.

Everything here is a thin layer over :mod:`refssl.data`, :mod:`refssl.nn`,
:mod:`refssl.train` and :mod:`refssl.eval`, so each experiment module holds
only its own question.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from refssl import data, nn, optim
from refssl import eval as ev
from refssl.train import Trainer

__all__ = ["dataset", "mlp_encoder", "train_pairs", "train_on_family", "probe", "PROBE_FACTORS"]

PROBE_FACTORS = ("shape", "color", "position", "size")


@lru_cache(maxsize=8)
def _dataset(n_train: int, n_val: int, size: int, seed: int):
    return data.make_dataset(n_train, n_val, np.random.default_rng(seed), size=size)


def dataset(ctx, n_train: int, n_val: int, *, size: int = 32):
    """Colored-shapes train/validation splits for this run's seed (cached within a process)."""
    ctx.setting(n_train=n_train, n_val=n_val, image_size=size)
    return _dataset(int(n_train), int(n_val), int(size), int(ctx.seed))


def mlp_encoder(image_size: int, hidden: int = 256, out_dim: int = 64, *, norm="batch"):
    """Flatten -> linear -> (BN) -> ReLU -> linear: the small encoder most experiments train."""
    return nn.mlp([3 * image_size * image_size, hidden, out_dim], norm=norm, flatten=True)


class _ProgressStream:
    """File-like object forwarding the trainer's progress lines to the run's progress reporter."""

    def __init__(self, ctx, label):
        self.ctx, self.label, self.buf = ctx, label, ""

    def write(self, text):
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.ctx.progress(f"  {self.label}: {line}")

    def flush(self):
        pass


def train_pairs(ctx, pairs, *, encoder, loss, steps: int, lr: float = 1e-3, loss_kwargs=None, projector=None,
                predictor=None, target_momentum=None, decoder=None, seed_offset: int = 0, label: str = ""):
    """Train with :class:`refssl.train.Trainer` (Adam, cosine schedule), progress lines into the run log."""
    label = label or str(loss)
    trainer = Trainer(encoder, loss, optim.Adam(lr=lr), projector=projector, predictor=predictor,
                      target_momentum=target_momentum, decoder=decoder, loss_kwargs=loss_kwargs,
                      schedule=optim.CosineSchedule(lr, steps, warmup_steps=max(1, steps // 20)),
                      seed=ctx.seed + seed_offset, log_every=max(1, steps // 4), stream=_ProgressStream(ctx, label))
    ctx.progress(f"train {label}: {steps} steps")
    trainer.fit(pairs, steps=steps)
    return trainer


def train_on_family(ctx, ds, family: str, *, loss="info_nce", steps: int, batch_size: int = 128, hidden=256,
                    out_dim=64, loss_kwargs=None, lr=1e-3, projector=None, seed_offset: int = 0, **kw):
    """Train an MLP encoder on view pairs of augmentation ``family`` drawn from the training split."""
    size = ds.train.images.shape[-1]
    rng = np.random.default_rng(ctx.seed * 1000 + 17 + seed_offset)
    pairs = data.view_pair_stream(family, ds.train.factors, rng, batch_size=batch_size,
                                  images=ds.train.images, size=size)
    return train_pairs(ctx, pairs, encoder=mlp_encoder(size, hidden, out_dim), loss=loss, steps=steps,
                       lr=lr, loss_kwargs=loss_kwargs, projector=projector, seed_offset=seed_offset,
                       label=f"{loss}/{family}", **kw)


def probe(ds, z_train, z_val, *, name: str, k: int = 1, max_iter: int = 100):
    """Linear-probe and k-NN validation accuracy per latent factor: (results dict, markdown table)."""
    return ev.factor_table(z_train, ds.train.factors, z_val, ds.val.factors, name=name, k=k, max_iter=max_iter)


def probe_bar_figure(ctx, results, filename, *, title=None, figsize=(7.5, 3.2)):
    """Bar chart of linear-probe accuracy per factor for several representations (``results``: name ->
    ``{factor: {"linear_val": acc, "chance": c}}``), with the chance level of each factor marked."""
    import matplotlib.pyplot as plt

    factors = PROBE_FACTORS
    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / len(results)
    x = np.arange(len(factors))
    for i, (name, res) in enumerate(results.items()):
        ax.bar(x + (i - (len(results) - 1) / 2) * width, [res[f]["linear_val"] for f in factors], width,
               label=name)
    chance = [next(iter(results.values()))[f]["chance"] for f in factors]
    ax.scatter(x, chance, marker="_", s=900, color="k", label="chance", zorder=3)
    ax.set_xticks(x, factors)
    ax.set_ylabel("linear-probe accuracy (val)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title, fontsize=9)
    return ctx.save_figure(fig, filename)
