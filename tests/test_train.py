"""The trainer: gradients of the whole two-view objective, determinism, checkpoint/resume, progress line.

The losses here are tiny op-like objects defined in this file, so the trainer is tested independently
of the registered SSL losses.
"""

import io
import os
import re

import numpy as np
import pytest

from refssl import nn, optim
from refssl.nn import subdict
from refssl.train import Trainer


class HalfSquaredDistance:
    """L = 1/(2N) sum_n ||a_n - b_n||^2 (op interface)."""

    def forward(self, a, b):
        d = a - b
        return 0.5 * np.sum(d * d) / len(a), (d, len(a))

    def backward(self, cache, g):
        d, n = cache
        return (float(g) / n * d).astype(d.dtype), (-float(g) / n * d).astype(d.dtype)


class NegCosine:
    """L = -mean_n cos(a_n, b_n) (SimSiam's D), hand backward."""

    def forward(self, a, b):
        na = np.linalg.norm(a, axis=1, keepdims=True)
        nb = np.linalg.norm(b, axis=1, keepdims=True)
        ah, bh = a / na, b / nb
        return -np.mean(np.sum(ah * bh, axis=1)), (ah, bh, na, nb)

    def backward(self, cache, g):
        ah, bh, na, nb = cache
        n = len(ah)
        c = np.sum(ah * bh, axis=1, keepdims=True)
        da = -float(g) / n * (bh - c * ah) / na
        db = -float(g) / n * (ah - c * bh) / nb
        return da, db


def pair_stream(seed=7, n=16, d=6, noise=0.1, dtype=np.float64):
    """A deterministic function of the step: batch t is drawn from default_rng([seed, t])."""
    def data(start):
        t = start
        while True:
            r = np.random.default_rng([seed, t])
            x = r.standard_normal((n, d))
            yield (x + noise * r.standard_normal(x.shape)).astype(dtype), \
                  (x + noise * r.standard_normal(x.shape)).astype(dtype)
            t += 1
    return data


def make_trainer(seed=0, predictor=True, loss=None, dtype=np.float64, **kw):
    return Trainer(nn.mlp([6, 8, 5], norm="batch"), NegCosine() if loss is None else loss,
                   optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4),
                   projector=nn.mlp([5, 7, 4], norm="batch"),
                   predictor=nn.mlp([4, 6, 4], norm="batch") if predictor else None,
                   seed=seed, dtype=dtype, log_every=0, **kw)


def _objective(tr, online, target, x1, x2):
    """The two-view objective re-assembled from the modules; ``target`` feeds the stop-gradient branch."""
    def chain(params, names, x):
        for name in names:
            x = tr.nets[name].forward(subdict(params, name), subdict(tr.buffers, name), x, train=True)[0]
        return x
    trunk = ["enc", "proj"]
    if not tr.uses_targets:
        return tr.loss.forward(chain(online, trunk, x1), chain(online, trunk, x2))[0]
    head = trunk + ["pred"] if "pred" in tr.nets else trunk
    p1, p2 = chain(online, head, x1), chain(online, head, x2)
    t1, t2 = chain(target, trunk, x1), chain(target, trunk, x2)
    if tr.loss_arity == 4:
        return tr.loss.forward(p1, p2, t1, t2)[0]
    return 0.5 * (tr.loss.forward(p1, t2)[0] + tr.loss.forward(p2, t1)[0])


def _check_gradients(tr, target, x1, x2, n_entries=2):
    """Central differences of the objective in each online parameter tensor (target held fixed)."""
    value, grads, _ = tr.loss_and_grads(x1, x2)
    assert value == pytest.approx(_objective(tr, tr.params, target, x1, x2), rel=1e-12)
    assert set(grads) == set(tr.params)
    rng = np.random.default_rng(0)
    h = 1e-6
    for key in sorted(tr.params):
        for _ in range(n_entries):
            idx = tuple(int(rng.integers(s)) for s in tr.params[key].shape)
            plus = {k: v.copy() for k, v in tr.params.items()}
            minus = {k: v.copy() for k, v in tr.params.items()}
            plus[key][idx] += h
            minus[key][idx] -= h
            fd = (_objective(tr, plus, target, x1, x2) - _objective(tr, minus, target, x1, x2)) / (2 * h)
            assert grads[key][idx] == pytest.approx(fd, rel=1e-5, abs=1e-8), (key, idx)


@pytest.mark.parametrize("predictor,loss", [(False, HalfSquaredDistance()), (True, NegCosine())])
def test_trainer_gradients_match_finite_differences(predictor, loss):
    tr = make_trainer(predictor=predictor, loss=loss)
    x1, x2 = next(pair_stream(noise=0.5)(0))
    # The online branch is perturbed, the target branch (here: the same parameters) is a constant.
    _check_gradients(tr, {k: v.copy() for k, v in tr.params.items()}, x1, x2)


def test_byol_target_network_gradients_and_ema():
    """The registered four-input ``byol`` loss, a predictor and an EMA target network."""
    tr = make_trainer(seed=4, loss="byol", target_momentum=0.9)
    assert tr.uses_targets and tr.loss_arity == 4
    assert set(tr.target_params) == {k for k in tr.params if not k.startswith("pred.")}
    x1, x2 = next(pair_stream(noise=0.5)(0))
    # Move the target away from the online network so that the two branches differ.
    tr.target_params = {k: v + 0.05 * np.random.default_rng(1).standard_normal(v.shape)
                        for k, v in tr.target_params.items()}
    _check_gradients(tr, tr.target_params, x1, x2)
    before_online = {k: v.copy() for k, v in tr.params.items()}
    before_target = {k: v.copy() for k, v in tr.target_params.items()}
    tr.train_step(x1, x2)
    for k, t in tr.target_params.items():  # EMA after the optimiser step: 0.9 old target + 0.1 new online
        np.testing.assert_allclose(t, 0.9 * before_target[k] + 0.1 * tr.params[k], rtol=1e-12, atol=1e-15)
        assert not np.array_equal(tr.params[k], before_online[k])
    assert any(k.startswith("target.") for k in tr.buffers)  # the target keeps its own BN statistics


def test_four_input_simsiam_equals_symmetrised_neg_cosine():
    """simsiam(p1, p2, z1, z2) = (neg_cosine(p1, z2) + neg_cosine(p2, z1)) / 2, so both paths agree."""
    x1, x2 = next(pair_stream(noise=0.5)(0))
    four, two = make_trainer(seed=5, loss="simsiam"), make_trainer(seed=5, loss="neg_cosine")
    assert four.loss_arity == 4 and two.loss_arity == 2
    l4, g4, _ = four.loss_and_grads(x1, x2)
    l2, g2, _ = two.loss_and_grads(x1, x2)
    assert l4 == pytest.approx(l2, rel=1e-12)
    for k in g4:
        np.testing.assert_allclose(g4[k], g2[k], rtol=1e-9, atol=1e-13)


def test_loss_with_wrong_arity_is_rejected():
    class Three:
        def forward(self, a, b, c):
            return 0.0, None

        def backward(self, cache, g):
            return None, None, None

    with pytest.raises(ValueError, match="2 .* or 4"):
        make_trainer(loss=Three())


def test_loss_falls_and_buffers_move():
    tr = make_trainer(predictor=False, loss=HalfSquaredDistance())
    before = {k: v.copy() for k, v in tr.buffers.items()}
    losses = tr.fit(pair_stream(), steps=60)
    assert len(losses) == 60 and tr.step == 60
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert any(not np.array_equal(before[k], tr.buffers[k]) for k in before)
    z = tr.encode(next(pair_stream()(0))[0])
    assert z.shape == (16, 5) and np.all(np.isfinite(z))


def test_same_seed_same_run_different_seed_different_run():
    a, b, c = make_trainer(seed=1), make_trainer(seed=1), make_trainer(seed=2)
    for t in (a, b, c):
        t.fit(pair_stream(), steps=8)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert a.history == b.history
    assert not all(np.array_equal(a.params[k], c.params[k]) for k in a.params)


@pytest.mark.parametrize("kw", [{}, {"loss": "byol", "target_momentum": 0.99}], ids=["simsiam", "byol"])
def test_checkpoint_resume_is_exact(tmp_path, kw):
    ckpt = tmp_path / "run.npz"
    straight = make_trainer(seed=3, **kw)
    straight.fit(pair_stream(), steps=12)

    first = make_trainer(seed=3, checkpoint_path=ckpt, checkpoint_every=6, **kw)
    first.fit(pair_stream(), steps=6)
    assert ckpt.exists() and os.listdir(tmp_path) == ["run.npz"]
    resumed = make_trainer(seed=99, **kw)             # different init, overwritten by the checkpoint
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 6
    resumed.fit(pair_stream(), steps=12)
    for k in straight.params:
        np.testing.assert_array_equal(resumed.params[k], straight.params[k])
    for k in straight.opt_state:
        np.testing.assert_array_equal(resumed.opt_state[k], straight.opt_state[k])
    for k in straight.buffers:
        np.testing.assert_array_equal(resumed.buffers[k], straight.buffers[k])
    for k in (straight.target_params or {}):
        np.testing.assert_array_equal(resumed.target_params[k], straight.target_params[k])
    assert resumed.history == straight.history[6:]


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    ckpt = tmp_path / "a.npz"
    make_trainer(predictor=False).save_checkpoint(ckpt)
    with pytest.raises(ValueError, match="do not match"):
        make_trainer(predictor=True).load_checkpoint(ckpt)


def test_progress_line_and_schedule(tmp_path):
    out = io.StringIO()
    sch = optim.CosineSchedule(0.05, total_steps=10, warmup_steps=2)
    tr = Trainer(nn.mlp([6, 4]), HalfSquaredDistance(), optim.SGD(lr=1.0, momentum=0.0), schedule=sch,
                 dtype=np.float32, log_every=5, stream=out)
    tr.fit(pair_stream(dtype=np.float64), steps=10)   # float64 data is cast to the float32 model
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2
    pat = re.compile(r"^step (5|10)/10  loss \d+\.\d{4}  lr (\S+)  \d+\.\d pairs/s  ETA \d+:\d\d:\d\d$")
    assert all(pat.match(line) for line in lines), lines
    # the learning rate shown is the one used by the reported step (steps 4 and 9, 0-based)
    assert [float(pat.match(line).group(2)) for line in lines] == pytest.approx([sch(4), sch(9)], rel=1e-2)
    assert all(v.dtype == np.float32 for v in tr.params.values())


def test_bad_data_is_reported():
    tr = make_trainer(predictor=False)
    with pytest.raises(ValueError, match="ran out after 2"):
        tr.fit([next(pair_stream()(0))] * 2, steps=5)
    with pytest.raises(ValueError, match="same shape"):
        tr.train_step(np.zeros((4, 6)), np.zeros((3, 6)))


def _ae_trainer(seed=0, dtype=np.float64, lr=1e-3, width=4, latent=6, out_act="sigmoid"):
    enc = nn.cnn_encoder(in_channels=3, image_size=8, channels=(width,), out_dim=latent)
    dec = nn.conv_decoder(latent, out_channels=3, image_size=8, channels=(width,), out_act=out_act)
    return Trainer(enc, "mse", optim.Adam(lr=lr), decoder=dec, seed=seed, dtype=dtype, log_every=0)


def test_autoencoder_gradients_match_finite_differences():
    tr = _ae_trainer()
    assert sorted({k.split(".")[0] for k in tr.params}) == ["dec", "enc"]
    x = np.random.default_rng(0).random((3, 3, 8, 8))
    target = np.random.default_rng(1).random((3, 3, 8, 8))
    value, grads, _ = tr.loss_and_grads(x, target)

    def objective(params):
        h = tr.nets["enc"](subdict(params, "enc"), {}, x, train=True)
        out = tr.nets["dec"](subdict(params, "dec"), {}, h, train=True)
        return np.mean((out - target) ** 2)  # the MSE written out, independently of the op

    assert value == pytest.approx(objective(tr.params), rel=1e-12)
    rng, h = np.random.default_rng(2), 1e-6
    for key in sorted(tr.params):
        idx = tuple(int(rng.integers(s)) for s in tr.params[key].shape)
        plus = {k: v.copy() for k, v in tr.params.items()}
        minus = {k: v.copy() for k, v in tr.params.items()}
        plus[key][idx] += h
        minus[key][idx] -= h
        fd = (objective(plus) - objective(minus)) / (2 * h)
        assert grads[key][idx] == pytest.approx(fd, rel=1e-5, abs=1e-10), (key, idx)


def test_autoencoder_learns_to_reconstruct_colored_shapes():
    from refssl import data

    images = data.generate(256, np.random.default_rng(0), size=8).images
    tr = _ae_trainer(dtype=np.float32, lr=3e-3, width=16, latent=32, out_act=None)

    def stream(start):
        r = np.random.default_rng([3, start])
        while True:
            x = images[r.choice(len(images), 32, replace=False)]
            yield x, x

    losses = tr.fit(stream, steps=120)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:5])
    rec = tr.reconstruct(images[:16])
    assert rec.shape == (16, 3, 8, 8) and rec.dtype == np.float32
    # Better than the best constant image (the per-pixel mean), which knows nothing about the instance.
    baseline = np.mean((images[:16] - images.mean(axis=0)) ** 2)
    assert np.mean((rec - images[:16]) ** 2) < 0.5 * baseline


def test_autoencoder_mode_is_exclusive():
    with pytest.raises(ValueError, match="decoder"):
        Trainer(nn.mlp([4, 2]), "mse", optim.SGD(), decoder=nn.mlp([2, 4]), projector=nn.mlp([2, 2]))
