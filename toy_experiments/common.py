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

__all__ = ["dataset", "mlp_encoder", "conv_encoder", "train_pairs", "train_on_family", "probe", "PROBE_FACTORS",
           "encoder_layer_features", "nn_factor_accuracy", "neighbour_sharing", "probe_bar_figure"]

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


def conv_encoder(image_size: int, channels=(8, 16, 32), out_dim: int = 64, *, norm=None, global_pool=False):
    """The conv encoder of the book's setting, narrowed to this CPU budget: per entry of ``channels`` a block
    conv3x3 -> [BN] -> ReLU -> 2x2 max-pool, then Flatten -> Linear to ``out_dim`` (:func:`refssl.nn.cnn_encoder`).
    ``global_pool=True`` averages the last feature map over its positions before the Linear (a head that
    cannot read where in the image a feature sits).  The book's encoder has 6 conv layers; 3 blocks keep a
    training step within the suite's budget."""
    enc = nn.cnn_encoder(image_size=image_size, channels=tuple(channels), out_dim=out_dim, norm=norm)
    if not global_pool:
        return enc
    s = int(image_size) >> len(channels)
    return nn.Sequential(enc.layers[:-2] + [nn.AvgPool2d(s), nn.Flatten(), nn.Linear(channels[-1], out_dim)])


def conv_encoder_text(image_size: int, channels, out_dim: int, norm=None, global_pool=False) -> str:
    """One line describing :func:`conv_encoder` for a report's setting."""
    s, parts = image_size, []
    for c in channels:
        s //= 2
        parts.append(f"conv3x3-{c}{'-BN' if norm else ''}-ReLU-pool ({c}x{s}x{s})")
    return (f"{image_size}x{image_size}x3 -> " + " -> ".join(parts) + (" -> global average" if global_pool else "")
            + f" -> linear {out_dim}")


def encoder_layer_features(trainer, x, *, net: str = "enc", batch_size: int = 500):
    """Evaluation-mode features of ``x`` at every block of a conv encoder trained by ``trainer``.

    Returns an ordered dict ``{name: (N, d) float32}``: the output of each conv block (after its pooling
    layer, flattened: ``"block 1 (8x8x8)"``) and the encoder output (``"bottleneck (D)"``).  The layers of
    the encoder's :class:`refssl.nn.Sequential` are run one by one on the trainer's parameters and buffers.
    """
    from refssl.nn import io as nnio
    from refssl.nn.layers import AvgPool2d, MaxPool2d

    seq = trainer.nets[net]
    params, buffers = nnio.subdict(trainer.params, net), nnio.subdict(trainer.buffers, net)
    cuts = [i for i, layer in enumerate(seq.layers) if isinstance(layer, (MaxPool2d, AvgPool2d))]
    last = len(seq.layers) - 1
    x = np.asarray(x, dtype=trainer.dtype)
    chunks = {}
    for s in range(0, len(x), batch_size):
        h = x[s:s + batch_size]
        for i, layer in enumerate(seq.layers):
            h = layer(nnio.subdict(params, str(i)), nnio.subdict(buffers, str(i)), h, train=False)
            if i in cuts or i == last:
                chunks.setdefault(i, []).append(np.asarray(h))
    out = {}
    for b, i in enumerate(cuts):
        f = np.concatenate(chunks[i])
        out[f"block {b + 1} ({'x'.join(map(str, f.shape[1:]))})"] = f.reshape(len(f), -1)
    f = np.concatenate(chunks[last])
    out[f"bottleneck ({f.shape[1]})"] = f.reshape(len(f), -1)
    return out


def _labels_and_chance(train_factors, val_factors):
    lab_t, lab_v = data.factor_labels(train_factors), data.factor_labels(val_factors)
    return lab_t, lab_v


def nn_factor_accuracy(train_x, train_factors, val_x, val_factors):
    """1-NN (Euclidean) validation accuracy of every probed factor, from one neighbour search:
    ``{factor: {"acc": a, "chance": c}}`` with chance the most frequent validation class's share."""
    lab_t, lab_v = _labels_and_chance(train_factors, val_factors)
    nn_idx = ev.nearest_neighbors(val_x, train_x, 1)[:, 0]
    out = {}
    for f in PROBE_FACTORS:
        yt, nc = lab_t[f]
        yv = lab_v[f][0]
        out[f] = {"acc": float(np.mean(yt[nn_idx] == yv)),
                  "chance": float(np.bincount(yv, minlength=nc).max() / len(yv))}
    return out


def neighbour_sharing(train_x, train_factors, val_x, val_factors, *, k: int = 8):
    """For validation queries, the share of their ``k`` nearest training images that have the query's value
    of each factor (shape, colour class, position bin, size bin), against chance: the share of ALL
    training images with the query's value, averaged over queries.  ``{factor: {"share": s, "chance": c}}``.
    """
    lab_t, lab_v = _labels_and_chance(train_factors, val_factors)
    nbrs = ev.nearest_neighbors(val_x, train_x, k)
    out = {}
    for f in PROBE_FACTORS:
        yt, nc = lab_t[f]
        yv = lab_v[f][0]
        freq = np.bincount(yt, minlength=nc) / len(yt)
        out[f] = {"share": float(np.mean(yt[nbrs] == yv[:, None])), "chance": float(np.mean(freq[yv]))}
    return out


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
                    out_dim=64, loss_kwargs=None, lr=1e-3, projector=None, seed_offset: int = 0, encoder=None, **kw):
    """Train an encoder (default: the MLP of :func:`mlp_encoder`) on view pairs of augmentation ``family``
    drawn from the training split."""
    size = ds.train.images.shape[-1]
    rng = np.random.default_rng(ctx.seed * 1000 + 17 + seed_offset)
    pairs = data.view_pair_stream(family, ds.train.factors, rng, batch_size=batch_size,
                                  images=ds.train.images, size=size)
    return train_pairs(ctx, pairs, encoder=encoder if encoder is not None else mlp_encoder(size, hidden, out_dim),
                       loss=loss, steps=steps, lr=lr, loss_kwargs=loss_kwargs, projector=projector,
                       seed_offset=seed_offset, label=f"{loss}/{family}", **kw)


# Trained encoders shared by experiments in one process (experiment 9 scores the encoders that experiments 1
# and 2 train).  Training is deterministic given the key, so a cached trainer is the one a new run would
# produce; the key holds the seed, the dataset and every training setting.
_TRAINED: dict = {}
_TRAINED_MAX = 8


def cached_training(key, make):
    """``make()`` once per ``key`` within this process (a few most recent kept)."""
    if key not in _TRAINED:
        if len(_TRAINED) >= _TRAINED_MAX:
            _TRAINED.pop(next(iter(_TRAINED)))
        _TRAINED[key] = make()
    return _TRAINED[key]


def _ds_key(ctx, ds):
    return (int(ctx.seed), len(ds.train.images), len(ds.val.images), int(ds.train.images.shape[-1]))


def family_conv_encoder(ctx, ds, family: str, *, steps: int, batch_size: int, channels, out_dim: int, lr: float,
                        temperature: float, seed_offset: int):
    """An InfoNCE-trained :func:`conv_encoder` on ``family`` view pairs (cached per process, see above)."""
    size = ds.train.images.shape[-1]
    key = ("family", _ds_key(ctx, ds), family, steps, batch_size, tuple(channels), out_dim, lr, temperature,
           seed_offset)
    return cached_training(key, lambda: train_on_family(
        ctx, ds, family, steps=steps, batch_size=batch_size, lr=lr, loss_kwargs={"temperature": temperature},
        seed_offset=seed_offset, encoder=conv_encoder(size, channels, out_dim)))


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
