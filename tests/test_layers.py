"""Layer ops and networks against independent loop implementations and exact identities.

The registry-wide tests already check every layer's backward against finite differences; here the
forward values are compared with straightforward loops, and the network container is checked end to end.
"""

import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refssl import gradcheck, nn
from refssl.ops import activations, conv, linear, norm_layers, pooling

from .helpers import assert_gradients


# -- independent loop implementations (tiny inputs only) ------------------------------------------------
def conv_loops(x, w, b, stride, padding):
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    xp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding))
    xp[:, :, padding:padding + h, padding:padding + wd] = x
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, f, ho, wo))
    for a in range(n):
        for o in range(f):
            for i in range(ho):
                for j in range(wo):
                    acc = b[o]
                    for ch in range(c):
                        for p in range(kh):
                            for q in range(kw):
                                acc += w[o, ch, p, q] * xp[a, ch, stride * i + p, stride * j + q]
                    out[a, o, i, j] = acc
    return out


def conv_transpose_loops(x, w, b, stride, padding):
    n, c, h, wd = x.shape
    _, o, kh, kw = w.shape
    full = np.zeros((n, o, (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for a in range(n):
        for ch in range(c):
            for i in range(h):
                for j in range(wd):
                    full[a, :, stride * i:stride * i + kh, stride * j:stride * j + kw] += x[a, ch, i, j] * w[ch]
    out = full[:, :, padding:full.shape[2] - padding, padding:full.shape[3] - padding]
    return out + b[None, :, None, None]


def pool_loops(x, k, stride, reduce):
    n, c, h, w = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.zeros((n, c, ho, wo))
    for a in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    out[a, ch, i, j] = reduce(x[a, ch, stride * i:stride * i + k, stride * j:stride * j + k])
    return out


CONV_CASES = [  # (N, C, H, W, F, K, stride, padding)
    (2, 3, 5, 5, 4, 3, 1, 1),
    (1, 2, 6, 5, 3, 3, 2, 0),
    (2, 1, 7, 6, 2, 2, 2, 1),
    (1, 3, 4, 4, 2, 1, 1, 0),
    (2, 2, 5, 7, 3, 3, 3, 2),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_loops(case):
    n, c, h, wd, f, k, s, p = case
    rng = np.random.default_rng(sum(case))
    x, w, b = rng.standard_normal((n, c, h, wd)), rng.standard_normal((f, c, k, k)), rng.standard_normal(f)
    out, _ = conv.conv2d_forward(x, w, b, stride=s, padding=p)
    np.testing.assert_allclose(out, conv_loops(x, w, b, s, p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_transpose2d_matches_loops(case):
    n, c, h, wd, o, k, s, p = case
    if k <= 2 * p:
        p = 0
    rng = np.random.default_rng(sum(case) + 1)
    x, w, b = rng.standard_normal((n, c, h, wd)), rng.standard_normal((c, o, k, k)), rng.standard_normal(o)
    out, _ = conv.conv_transpose2d_forward(x, w, b, stride=s, padding=p)
    np.testing.assert_allclose(out, conv_transpose_loops(x, w, b, s, p), rtol=1e-12, atol=1e-12)


@pytest.mark.derivation("layers_backward.md#LB3")
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_transpose_is_the_adjoint_of_conv(case):
    n, c, h, wd, f, k, s, p = case
    rng = np.random.default_rng(sum(case) + 2)
    y = rng.standard_normal((n, c, h, wd))
    w = rng.standard_normal((f, c, k, k))
    cy, _ = conv.conv2d_forward(y, w, None, stride=s, padding=p)
    x = rng.standard_normal(cy.shape)
    if (h + 2 * p - k) % s == 0 and (wd + 2 * p - k) % s == 0:  # conv_transpose2d's output size then equals the conv input size
        tx, _ = conv.conv_transpose2d_forward(x, w, None, stride=s, padding=p)
        assert tx.shape == y.shape
        assert np.sum(cy * x) == pytest.approx(np.sum(y * tx), rel=1e-12)
    # The conv2d backward in x is the same adjoint, for every size.
    dy = conv.conv2d_backward(conv.conv2d_forward(y, w, None, stride=s, padding=p)[1], x)[0]
    assert np.sum(cy * x) == pytest.approx(np.sum(y * dy), rel=1e-12)


def test_conv2d_backward_matches_loop_gradients():
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    out, cache = conv.conv2d_forward(x, w, b, stride=2, padding=1)
    g = rng.standard_normal(out.shape)
    dx, dw, db = conv.conv2d_backward(cache, g)
    # Loop form of the gradients: every (output, window entry) pair contributes once.
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    dxp, dw_ref = np.zeros_like(xp), np.zeros_like(w)
    for a in range(2):
        for o in range(3):
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    win = (a, slice(None), slice(2 * i, 2 * i + 3), slice(2 * j, 2 * j + 3))
                    dw_ref[o] += g[a, o, i, j] * xp[win]
                    dxp[win] += g[a, o, i, j] * w[o]
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dxp[:, :, 1:-1, 1:-1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, g.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_conv2d_float32_and_errors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    out, cache = conv.conv2d_forward(x, w, None, padding=1)
    assert out.dtype == np.float32 and out.shape == (2, 4, 8, 8) and out.flags.c_contiguous
    assert all(g is None or g.dtype == np.float32 for g in conv.conv2d_backward(cache, np.ones_like(out)))
    with pytest.raises(ValueError, match="w"):
        conv.conv2d_forward(x, w[:, :2], None)
    with pytest.raises(ValueError, match="padding"):
        conv.conv2d_forward(x, w, None, padding=-1)
    with pytest.raises(ValueError, match="stride"):
        conv.conv2d_forward(x, w, None, stride=0)
    with pytest.raises(ValueError, match="larger"):
        conv.conv2d_forward(x[:, :, :2, :2], w, None)
    with pytest.raises(TypeError, match="dtype"):
        conv.conv2d_forward(x, w.astype(np.float64), None)


@pytest.mark.parametrize("k,stride", [(2, 2), (3, 1), (2, 1), (3, 2)])
def test_pooling_matches_loops(k, stride):
    rng = np.random.default_rng(k * 10 + stride)
    x = rng.standard_normal((2, 3, 7, 6))
    mx, cache = pooling.max_pool2d_forward(x, kernel=k, stride=stride)
    av, _ = pooling.avg_pool2d_forward(x, kernel=k, stride=stride)
    np.testing.assert_allclose(mx, pool_loops(x, k, stride, np.max), rtol=0, atol=0)
    np.testing.assert_allclose(av, pool_loops(x, k, stride, np.mean), rtol=1e-12, atol=1e-14)
    # Max-pool backward: one unit of gradient per window lands on that window's maximum.
    (dx,) = pooling.max_pool2d_backward(cache, np.ones_like(mx))
    ref = np.zeros_like(x)
    for a in range(2):
        for c in range(3):
            for i in range(mx.shape[2]):
                for j in range(mx.shape[3]):
                    win = x[a, c, stride * i:stride * i + k, stride * j:stride * j + k]
                    p, q = np.unravel_index(np.argmax(win), win.shape)
                    ref[a, c, stride * i + p, stride * j + q] += 1.0
    np.testing.assert_array_equal(dx, ref)


def test_pooling_errors():
    x = np.zeros((1, 1, 3, 3))
    with pytest.raises(ValueError, match="kernel"):
        pooling.max_pool2d_forward(x, kernel=4)
    with pytest.raises(ValueError, match="x must have shape"):
        pooling.avg_pool2d_forward(x[0])


def test_linear_without_bias_and_shape_errors():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    out, cache = linear.linear_forward(x, w, None)
    np.testing.assert_allclose(out, np.einsum("nd,dm->nm", x, w))
    assert linear.linear_backward(cache, np.ones((3, 2)))[2] is None
    with pytest.raises(ValueError, match="w"):
        linear.linear_forward(x, w.T, None)
    with pytest.raises(ValueError, match="b"):
        linear.linear_forward(x, w, np.zeros(3))


def test_gelu_and_sigmoid_against_math():
    x = np.linspace(-6, 6, 41)
    ref = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(activations.gelu_forward(x)[0], ref, rtol=1e-14, atol=1e-15)
    big = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0])
    with np.errstate(over="raise"):
        s, _ = activations.sigmoid_forward(big)
    np.testing.assert_allclose(s, [0.0, 1 / (1 + math.exp(30)), 0.5, 1 / (1 + math.exp(-30)), 1.0], rtol=1e-14)


@pytest.mark.derivation("layers_backward.md#LB1")
@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 4, 5)])
def test_batch_norm_gradient_is_blind_to_shift_and_scale(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 3 + 2
    c = shape[1]
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    for eps in (1e-5, 0.5):
        out, cache = norm_layers.batch_norm_forward(x, gamma, beta, eps=eps)
        xhat = (out - beta.reshape((1, c) + (1,) * (len(shape) - 2))) / gamma.reshape((1, c) + (1,) * (len(shape) - 2))
        g = rng.standard_normal(shape)
        dx, dgamma, _ = norm_layers.batch_norm_backward(cache, g)
        var = x.var(axis=axes)
        s = np.sqrt(var + eps)
        np.testing.assert_allclose(dx.sum(axis=axes), 0, atol=1e-11)
        np.testing.assert_allclose(np.sum(dx * xhat, axis=axes), gamma / s * dgamma * eps / (var + eps),
                                   rtol=1e-9, atol=1e-11)
        # The normalised output has zero mean and variance var / (var + eps) per channel.
        np.testing.assert_allclose(xhat.mean(axis=axes), 0, atol=1e-12)
        np.testing.assert_allclose(xhat.var(axis=axes), var / (var + eps), rtol=1e-12)


@pytest.mark.derivation("layers_backward.md#LB2")
def test_batch_norm_eval_with_batch_statistics_equals_train():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 2, 5)) * 2 - 1
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    train, cache = norm_layers.batch_norm_forward(x, gamma, beta)
    mean, unbiased = norm_layers.batch_norm_batch_stats(cache)
    m = 4 * 2 * 5
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(unbiased, x.var(axis=(0, 2, 3), ddof=1), rtol=1e-12)
    ev, _ = norm_layers.batch_norm_eval_forward(x, gamma, beta, mean, unbiased * (m - 1) / m)
    np.testing.assert_allclose(ev, train, rtol=1e-12, atol=1e-12)
    # ... and differs when evaluated with the unbiased variance
    ev2, _ = norm_layers.batch_norm_eval_forward(x, gamma, beta, mean, unbiased)
    assert not np.allclose(ev2, train, rtol=1e-6)


def test_running_statistics_update_is_pure_and_follows_the_formula():
    rm, rv = np.zeros(3), np.ones(3)
    bm, bv = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    nm, nv = norm_layers.batch_norm_update_running(rm, rv, bm, bv, momentum=0.1)
    np.testing.assert_allclose(nm, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(nv, [1.3, 1.4, 1.5])
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    with pytest.raises(ValueError, match="momentum"):
        norm_layers.batch_norm_update_running(rm, rv, bm, bv, momentum=1.5)


def test_batch_norm_needs_two_values_per_channel_and_running_var_nonnegative():
    with pytest.raises(ValueError, match="at least 2 values"):
        norm_layers.batch_norm_forward(np.ones((1, 3)), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="running_var"):
        norm_layers.batch_norm_eval_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), np.zeros(3), -np.ones(3))


def test_layer_norm_matches_rowwise_formula():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5)) * 4 + 1
    gamma, beta = rng.uniform(0.5, 2, 5), rng.standard_normal(5)
    out, _ = norm_layers.layer_norm_forward(x, gamma, beta, eps=1e-3)
    for idx in np.ndindex(2, 3):
        row = x[idx]
        ref = gamma * (row - row.mean()) / math.sqrt(row.var() + 1e-3) + beta
        np.testing.assert_allclose(out[idx], ref, rtol=1e-12)


class _LayerNormWithout:
    """layer_norm with gamma and/or beta left out (None), as an op of the arrays that are given."""

    def __init__(self, keep_gamma, keep_beta):
        self.keep = (keep_gamma, keep_beta)
        self.differentiable = tuple(range(1 + sum(self.keep)))

    def forward(self, x, *params):
        it = iter(params)
        gamma, beta = (next(it) if k else None for k in self.keep)
        return norm_layers.layer_norm_forward(x, gamma, beta, eps=1e-3)

    def backward(self, cache, g):
        dx, dgamma, dbeta = norm_layers.layer_norm_backward(cache, g)
        assert (dgamma is None) != self.keep[0] and (dbeta is None) != self.keep[1]
        return (dx,) + tuple(d for d, k in zip((dgamma, dbeta), self.keep) if k)


@pytest.mark.parametrize("keep_gamma,keep_beta", [(False, False), (True, False), (False, True)])
@settings(max_examples=6)
@given(seed=st.integers(0, 2**32 - 1))
def test_layer_norm_without_scale_or_shift(seed, keep_gamma, keep_beta):
    """gamma or beta None: the same values as gamma = 1 or beta = 0 (bit for bit), a None gradient slot, and
    gradients that pass the central-difference check; with neither, the output is read-only."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(2, 7)))) * 3 + 1
    d = x.shape[-1]
    gamma, beta = rng.uniform(0.5, 2, d), rng.standard_normal(d)
    g_used, b_used = (gamma if keep_gamma else None), (beta if keep_beta else None)
    out, _ = norm_layers.layer_norm_forward(x, g_used, b_used, eps=1e-3)
    ref, _ = norm_layers.layer_norm_forward(x, gamma if keep_gamma else np.ones(d),
                                            beta if keep_beta else np.zeros(d), eps=1e-3)
    np.testing.assert_array_equal(out, ref)
    if not (keep_gamma or keep_beta):
        with pytest.raises(ValueError, match="read-only"):
            out += 1
    args = (x,) + tuple(a for a in (g_used, b_used) if a is not None)
    assert_gradients(_LayerNormWithout(keep_gamma, keep_beta), args, {}, rng=rng)


# -- modules and networks --------------------------------------------------------------------------------
class _WholeNet:
    """A Sequential seen as one op of (x, *params) for the finite-difference checker."""

    def __init__(self, net, names, state, train):
        self.net, self.names, self.state, self.train = net, names, state, train
        self.differentiable = tuple(range(len(names) + 1))

    def forward(self, x, *arrays):
        out, cache, _ = self.net.forward(dict(zip(self.names, arrays)), self.state, x, train=self.train)
        return out, cache

    def backward(self, cache, g):
        dx, grads = self.net.backward(cache, g)
        return (dx, *(grads[k] for k in self.names))


@pytest.mark.parametrize("train", [True, False])
def test_sequential_backward_equals_gradcheck_of_the_whole_model(train):
    # (no bias before batch norm: its gradient is exactly 0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm(3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(3, 2, 2, stride=1, bias=False), nn.GELU(), nn.AvgPool2d(2, stride=1),
                        nn.Flatten(), nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 3, bias=False),
                        nn.L2Normalize())
    rng = np.random.default_rng(11)
    params, state = net.init(rng, np.float64)
    state = {k: v + rng.uniform(0.1, 0.5, v.shape) for k, v in state.items()}  # non-trivial running stats
    names = sorted(params)
    x = rng.standard_normal((3, 2, 6, 6))
    op = _WholeNet(net, names, state, train)
    rep = gradcheck.check(op, (x, *(params[k] for k in names)), {}, rng=rng, full_max_size=120,
                          n_directions=3, tolerance=1e-6, name="whole network")
    assert rep.ok, rep.describe()
    assert len(rep.inputs) == len(names) + 1


def test_batch_norm_module_train_updates_state_eval_does_not():
    bn = nn.BatchNorm(2, momentum=0.5)
    params, state = bn.init(np.random.default_rng(0), np.float64)
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    out, _, new = bn.forward(params, state, x, train=True)
    np.testing.assert_allclose(new["running_mean"], [1.0, 2.0])       # 0.5 * 0 + 0.5 * [2, 4]
    np.testing.assert_allclose(new["running_var"], [1.5, 4.5])        # 0.5 * 1 + 0.5 * [2, 8]
    np.testing.assert_array_equal(state["running_mean"], 0.0)         # old state untouched
    out_eval, _, same = bn.forward(params, new, x, train=False)
    assert same is new
    np.testing.assert_allclose(out_eval, (x - [1.0, 2.0]) / np.sqrt(np.array([1.5, 4.5]) + 1e-5))


def test_cnn_encoder_and_decoder_shapes_dtypes_and_determinism():
    enc = nn.cnn_encoder(channels=(4, 8), out_dim=5, image_size=16, norm="batch")
    dec = nn.conv_decoder(5, channels=(8, 4), image_size=16)
    p1, s1 = enc.init(np.random.default_rng(3))
    p2, _ = enc.init(np.random.default_rng(3))
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    x = np.random.default_rng(0).random((3, 3, 16, 16), dtype=np.float32)
    z, cache, s_new = enc.forward(p1, s1, x, train=True)
    assert z.shape == (3, 5) and z.dtype == np.float32 and set(s_new) == set(s1)
    dx, grads = enc.backward(cache, np.ones_like(z))
    assert dx.shape == x.shape and set(grads) == set(p1)
    assert all(grads[k].dtype == np.float32 and grads[k].shape == p1[k].shape for k in p1)
    pd, sd = dec.init(np.random.default_rng(4))
    y = dec(pd, sd, z)
    assert y.shape == (3, 3, 16, 16) and y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1
    lin = nn.linear_decoder(5, image_size=16)
    pl, sl = lin.init(np.random.default_rng(5))
    assert lin(pl, sl, z).shape == (3, 3, 16, 16)


def test_mlp_layout_and_names():
    net = nn.mlp([6, 8, 8, 3], norm="batch")
    params, state = net.init(np.random.default_rng(0), np.float64)
    assert sorted(params) == ["0.w", "1.beta", "1.gamma", "3.w", "4.beta", "4.gamma", "6.b", "6.w"]
    assert sorted(state) == ["1.running_mean", "1.running_var", "4.running_mean", "4.running_var"]
    assert params["0.w"].shape == (6, 8) and params["6.w"].shape == (8, 3)
    with pytest.raises(ValueError, match="norm"):
        nn.mlp([2, 3, 4], norm="group")
    flat = nn.mlp([12, 4], flatten=True)
    fp, fs = flat.init(np.random.default_rng(0), np.float64)
    assert sorted(fp) == ["1.b", "1.w"]
    x = np.random.default_rng(1).standard_normal((2, 3, 2, 2))
    np.testing.assert_allclose(flat(fp, fs, x), x.reshape(2, 12) @ fp["1.w"] + fp["1.b"], rtol=1e-12)


def test_save_load_roundtrip_is_atomic(tmp_path):
    params, _ = nn.mlp([3, 4, 2]).init(np.random.default_rng(0), np.float32)
    path = tmp_path / "p.npz"
    nn.save_npz(path, nn.prefixed(params, "enc"))
    nn.save_npz(path, nn.prefixed(params, "enc"))  # overwrite in place
    back = nn.load_npz(path)
    assert sorted(back) == sorted(f"enc.{k}" for k in params)
    for k, v in params.items():
        assert back[f"enc.{k}"].dtype == np.float32
        np.testing.assert_array_equal(back[f"enc.{k}"], v)
    assert os.listdir(tmp_path) == ["p.npz"]  # no temporary file left behind

    class Boom:
        def __array__(self, *a, **k):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        nn.save_npz(path, {"x": Boom()})
    assert os.listdir(tmp_path) == ["p.npz"]
    assert sorted(nn.load_npz(path)) == sorted(back)  # the old file survives a failed write


def test_first_layer_may_skip_the_input_gradient():
    net = nn.cnn_encoder(channels=(3,), out_dim=4, image_size=8)
    params, state = net.init(np.random.default_rng(0), np.float64)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8))
    z, cache, _ = net.forward(params, state, x)
    g = np.random.default_rng(2).standard_normal(z.shape)
    dx, full = net.backward(cache, g)
    none, partial = net.backward(cache, g, need_dx=False)
    assert dx.shape == x.shape and none is None
    assert full.keys() == partial.keys()
    for k in full:
        np.testing.assert_array_equal(full[k], partial[k])


def test_decoder_backward_equals_gradcheck_of_the_whole_model():
    net = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Unflatten((2, 2, 2)),
                        nn.ConvTranspose2d(2, 3, kernel=4, stride=2, padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(3, 2, kernel=3, stride=1, padding=1, bias=False), nn.Sigmoid())
    rng = np.random.default_rng(12)
    params, state = net.init(rng, np.float64)
    names = sorted(params)
    x = rng.standard_normal((2, 3))
    out, _, _ = net.forward(params, state, x)
    assert out.shape == (2, 2, 4, 4)
    rep = gradcheck.check(_WholeNet(net, names, state, True), (x, *(params[k] for k in names)), {}, rng=rng,
                          tolerance=1e-6, name="decoder")
    assert rep.ok, rep.describe()


def test_mse_known_values():
    from refssl.ops import reconstruction

    x = np.random.default_rng(0).random((2, 3, 4, 4)).astype(np.float32)
    loss, cache = reconstruction.mse_forward(x, x)
    assert loss == 0 and loss.dtype == np.float32
    loss, cache = reconstruction.mse_forward(x + np.float32(0.5), x)
    assert loss == pytest.approx(0.25, rel=1e-6)
    dx, dt = reconstruction.mse_backward(cache, 1.0)
    np.testing.assert_allclose(dx, np.full(x.shape, 2 * 0.5 / x.size), rtol=1e-5)
    assert dt is None
    with pytest.raises(ValueError, match="target"):
        reconstruction.mse_forward(x, x[:, :2])


def test_decoder_output_activation_choice():
    assert isinstance(nn.conv_decoder(4, image_size=8, channels=(2,)).layers[-1], nn.Sigmoid)
    assert isinstance(nn.conv_decoder(4, image_size=8, channels=(2,), out_act=None).layers[-1], nn.ConvTranspose2d)
    with pytest.raises(ValueError, match="out_act"):
        nn.conv_decoder(4, image_size=8, channels=(2,), out_act="tanh")


def test_linear_backward_without_input_gradient():
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((4, 5, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)
    _, cache = linear.linear_forward(x, w, b)
    g = rng.standard_normal((4, 5, 2))
    dx, dw, db = linear.linear_backward(cache, g, need_dx=False)
    assert dx is None
    np.testing.assert_allclose(dw, np.einsum("nld,nlm->dm", x, g), rtol=1e-12)
    np.testing.assert_allclose(db, g.sum(axis=(0, 1)), rtol=1e-12)
    with pytest.raises(TypeError, match="need_dx"):
        linear.linear_backward(cache, g, need_dx="no")
