"""End to end: an MLP trained with the registered ``info_nce`` on colored shapes learns colour.

Views are family C of :mod:`refssl.data` (shape and location re-rendered, colour kept), so colour is the
factor shared by the two views and InfoNCE must encode it; the linear probe measures that on held-out
images.
"""

import numpy as np

from refssl import data, nn, optim
from refssl.eval import linear_probe
from refssl.train import Trainer


def test_info_nce_mlp_learns_colour_on_colored_shapes(tmp_path):
    ds = data.make_dataset(2000, 500, np.random.default_rng(0))
    encoder = nn.mlp([3 * 32 * 32, 64, 64], norm="batch", flatten=True)
    trainer = Trainer(encoder, "info_nce", optim.Adam(lr=1e-3), projector=nn.mlp([64, 64, 32], norm="batch"),
                      loss_kwargs={"temperature": 0.2}, seed=0, log_every=0,
                      checkpoint_path=tmp_path / "ckpt.npz")
    colour = data.factor_labels(ds.train.factors)["color"][0]
    colour_val = data.factor_labels(ds.val.factors)["color"][0]

    def probe():
        return linear_probe(trainer.encode(ds.train.images), colour, trainer.encode(ds.val.images), colour_val,
                            n_classes=data.N_COLORS)["val"]

    before = probe()
    stream = data.view_pair_stream("C", ds.train.factors, np.random.default_rng(1), batch_size=64,
                                   images=ds.train.images)
    losses = np.array(trainer.fit(stream, steps=200))
    assert np.all(np.isfinite(losses))
    # InfoNCE with 2N = 128 candidates starts near log(127) = 4.8 and must fall well below it.
    assert losses[-20:].mean() < 0.7 * losses[:20].mean(), (losses[:20].mean(), losses[-20:].mean())

    after = probe()
    print(f"colour probe (validation): {before:.3f} at initialisation, {after:.3f} after training; "
          f"loss {losses[:20].mean():.3f} -> {losses[-20:].mean():.3f}")
    assert after > 0.8, after                   # chance is 1/8 = 0.125
    assert after > before + 0.1, (before, after)  # and training, not the random features, did it
    assert (tmp_path / "ckpt.npz").exists()
