"""The fast paths of the CNN layers against loop references and finite differences.

conv2d has two im2col layouts (channels-last for KW*C >= 16, channel-major for the RGB input layer), both
gathered in blocks of images, a shifted-rows input gradient for stride 1 (per block) and col2im otherwise,
and a variant whose output is a channels-last view; max-pool has a 2x2 path with its own tie rule
bookkeeping; ReLU keeps the memory layout of its input; map_batch_split spreads the batch over threads.
The registry-wide tests use tiny examples (channel-major conv only), so each path is exercised here.
"""

import numpy as np
import pytest

from refssl import gradcheck, nn
from refssl import validation as V
from refssl._blocks import map_batch_split
from refssl.ops import activations, conv, pooling
from refssl.ops._layer_checks import upstream


def conv_reference(x, w, b, stride, padding):
    """Sum over kernel offsets of a channel contraction of the strided input plane (no im2col)."""
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, f, ho, wo)) + (0 if b is None else b[None, :, None, None])
    for p in range(kh):
        for q in range(kw):
            patch = xp[:, :, p:p + stride * (ho - 1) + 1:stride, q:q + stride * (wo - 1) + 1:stride]
            out += np.einsum("nchw,fc->nfhw", patch, w[:, :, p, q])
    return out


# (N, C, H, W, F, KH, KW, stride, padding, bias); KW*C >= 16 takes the channels-last path
CASES = [
    (2, 8, 6, 5, 3, 3, 3, 1, 1, True),     # channels-last, shifted-rows input gradient
    (2, 16, 5, 5, 4, 1, 1, 1, 0, False),   # channels-last 1x1
    (1, 6, 7, 6, 2, 2, 3, 1, 2, True),     # channels-last, non-square kernel, padding 2
    (2, 8, 7, 6, 3, 3, 3, 2, 1, True),     # channels-last, stride 2 (col2im)
    (2, 3, 6, 6, 4, 3, 3, 1, 1, True),     # channel-major (the RGB layer)
    (1, 2, 5, 7, 3, 3, 2, 2, 0, False),    # channel-major, stride 2, non-square kernel
    (2, 5, 4, 4, 2, 3, 3, 3, 2, True),     # channel-major, stride = kernel (windows do not overlap)
]


def _layer(case, rng, dtype=np.float64):
    n, c, h, wd, f, kh, kw, s, p, bias = case
    x = rng.standard_normal((n, c, h, wd)).astype(dtype)
    w = (rng.standard_normal((f, c, kh, kw)) / np.sqrt(c * kh * kw)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype) if bias else None
    return x, w, b, s, p


@pytest.mark.parametrize("case", CASES)
def test_conv2d_paths_match_the_reference(case):
    rng = np.random.default_rng(sum(case))
    x, w, b, s, p = _layer(case, rng)
    ref = conv_reference(x, w, b, s, p)
    out, _ = conv.conv2d_forward(x, w, b, stride=s, padding=p)
    view, _ = conv.conv2d_forward_strided(x, w, b, stride=s, padding=p)
    assert out.flags.c_contiguous and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(view, ref, rtol=1e-12, atol=1e-12)
    # Any memory layout of x gives the same result (a channels-last view, a cropped view).
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(conv.conv2d_forward(x_cl, w, b, stride=s, padding=p)[0], ref, rtol=1e-12,
                               atol=1e-12)
    big = np.zeros(x.shape[:2] + (x.shape[2] + 1, x.shape[3] + 2))
    big[:, :, 1:, 2:] = x
    np.testing.assert_allclose(conv.conv2d_forward(big[:, :, 1:, 2:], w, b, stride=s, padding=p)[0], ref,
                               rtol=1e-12, atol=1e-12)


class _Op:
    """conv2d_forward_strided (or the registered op) as an op for the finite-difference checker."""

    def __init__(self, fwd, stride, padding, has_b):
        self.fwd, self.kw = fwd, {"stride": stride, "padding": padding}
        self.differentiable = (0, 1, 2) if has_b else (0, 1)

    def forward(self, x, w, b=None):
        return self.fwd(x, w, b, **self.kw)

    def backward(self, cache, g):
        dx, dw, db = conv.conv2d_backward(cache, g)
        return (dx, dw, db) if len(self.differentiable) == 3 else (dx, dw)


@pytest.mark.parametrize("fwd", [conv.conv2d_forward, conv.conv2d_forward_strided])
@pytest.mark.parametrize("case", CASES)
def test_conv2d_paths_gradients(case, fwd):
    rng = np.random.default_rng(sum(case) + 1)
    x, w, b, s, p = _layer(case, rng)
    op = _Op(fwd, s, p, b is not None)
    args = (x, w) if b is None else (x, w, b)
    rep = gradcheck.check(op, args, {}, rng=rng, full_max_size=80, n_directions=4, tolerance=1e-6,
                          name="conv2d path")
    assert rep.ok, rep.describe()


@pytest.mark.parametrize("case", CASES)
def test_conv2d_backward_takes_any_layout_and_first_layer_grads_agree(case):
    rng = np.random.default_rng(sum(case) + 2)
    x, w, b, s, p = _layer(case, rng)
    out, cache = conv.conv2d_forward_strided(x, w, b, stride=s, padding=p)
    g = rng.standard_normal(out.shape)
    g_cl = np.ascontiguousarray(g.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dx, dw, db = conv.conv2d_backward(cache, g)
    for got, want in zip(conv.conv2d_backward(cache, g_cl), (dx, dw, db)):
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    pdw, pdb = conv.conv2d_param_grads(cache, g)
    np.testing.assert_allclose(pdw, dw, rtol=1e-12, atol=1e-12)
    assert (pdb is None) == (b is None)
    if b is not None:
        np.testing.assert_allclose(pdb, g.sum(axis=(0, 2, 3)), rtol=1e-12)
    # The contiguous op returns a C-contiguous dx; the strided one may return a view, equal in value.
    cdx = conv.conv2d_backward(conv.conv2d_forward(x, w, b, stride=s, padding=p)[1], g)[0]
    assert cdx.flags.c_contiguous
    np.testing.assert_allclose(cdx, dx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("images_per_block, direct_mnk", [(1, 1), (2, 1), (2, 10 ** 6)])
@pytest.mark.parametrize("case", CASES)
def test_conv2d_blocks_of_images_match_one_block(case, images_per_block, direct_mnk, monkeypatch):
    # The column matrix is gathered, multiplied and (in the backward) gathered again in blocks of whole
    # images, each GEMM cut into pieces of at least 16 rows (fewer when the direct-kernel size allows), and
    # the stride-1 input gradient is computed per block of images.  Tiny test inputs fit in one block and
    # one piece: shrink both so that 5 images make several blocks (2 + 2 + 1) and pieces.
    n, c, h, wd, f, kh, kw, s, p, bias = case
    rng = np.random.default_rng(sum(case) + 3)
    x, w, b, s, p = _layer((5,) + case[1:], rng)
    out, cache = conv.conv2d_forward_strided(x, w, b, stride=s, padding=p)
    g = rng.standard_normal(out.shape)
    want = conv.conv2d_backward(cache, g)
    ho, wo = out.shape[2:]
    per_image = ho * wo * (kh * kw * c + bias) * 8
    monkeypatch.setattr(conv, "_BLOCK_BYTES", images_per_block * per_image)
    monkeypatch.setattr(conv, "_DIRECT_GEMM_MNK", direct_mnk)
    first_start, first_stop = conv._image_blocks(5, per_image)[0]
    assert first_stop - first_start == images_per_block
    bout, bcache = conv.conv2d_forward_strided(x, w, b, stride=s, padding=p)
    np.testing.assert_allclose(bout, conv_reference(x, w, b, s, p), rtol=1e-12, atol=1e-12)
    for got, ref in zip(conv.conv2d_backward(bcache, g), want):
        if ref is not None:
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    pdw, pdb = conv.conv2d_param_grads(bcache, g)
    np.testing.assert_allclose(pdw, want[1], rtol=1e-12, atol=1e-12)
    # dx of the blocked path against the adjoint identity <conv(x; w, no bias), g> = <x, dx>, independently
    # of the one-block result.
    dx = conv.conv2d_backward(bcache, g)[0]
    np.testing.assert_allclose(np.sum(conv_reference(x, w, None, s, p) * g), np.sum(x * dx), rtol=1e-10)


def test_conv2d_float32_paths_and_empty_kernel_errors():
    rng = np.random.default_rng(0)
    for c in (3, 16):
        x = rng.standard_normal((3, c, 9, 9)).astype(np.float32)
        w = (rng.standard_normal((5, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        b = rng.standard_normal(5).astype(np.float32)
        out, cache = conv.conv2d_forward_strided(x, w, b, padding=1)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, conv_reference(x.astype(float), w.astype(float), b.astype(float), 1, 1),
                                   rtol=1e-4, atol=1e-5)
        assert all(a.dtype == np.float32 for a in conv.conv2d_backward(cache, np.ones_like(out)))
    with pytest.raises(ValueError, match="kernel"):
        conv.conv2d_forward(np.ones((1, 2, 4, 4)), np.ones((3, 2, 0, 3)), None)
    with pytest.raises(ValueError, match="channel"):
        conv.conv2d_forward(np.ones((1, 0, 4, 4)), np.ones((3, 0, 3, 3)), None)


# -- max-pool 2x2 ----------------------------------------------------------------------------------------
def pool_reference(x):
    """max and the routing of each window's gradient to its first maximum in row-major order (np.argmax)."""
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    out, route = np.zeros((n, c, ho, wo)), np.zeros((n, c, ho, wo, 2), dtype=int)
    for idx in np.ndindex(n, c, ho, wo):
        a, ch, i, j = idx
        win = x[a, ch, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        out[idx] = win.max()
        route[idx] = np.unravel_index(np.argmax(win), (2, 2))
    return out, route


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (1, 2, 5, 7), (3, 1, 2, 2)])
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "cropped"])
def test_max_pool_2x2_ties_go_to_the_first_maximum(shape, layout):
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 3, size=shape).astype(np.float64)  # many ties, and all-equal windows
    x[0, 0, :2, :2] = 0.0  # one window of four equal entries
    if layout == "channels-last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif layout == "cropped":
        big = np.full(shape[:2] + (shape[2] + 1, shape[3] + 1), 9.0)
        big[:, :, 1:, 1:] = x
        x = big[:, :, 1:, 1:]
    out, cache = pooling.max_pool2d_forward(x, kernel=2, stride=2)
    ref, route = pool_reference(x)
    np.testing.assert_array_equal(out, ref)
    g = rng.standard_normal(out.shape) + 5.0  # nonzero everywhere
    (dx,) = pooling.max_pool2d_backward(cache, g)
    want = np.zeros(x.shape)
    for idx in np.ndindex(*out.shape):
        a, ch, i, j = idx
        p, q = route[idx]
        want[a, ch, 2 * i + p, 2 * j + q] = g[idx]
    np.testing.assert_array_equal(dx, want)  # exactly one entry per window, cut-off rows/columns zero


def test_max_pool_2x2_gradients_float32_and_layout():
    rng = np.random.default_rng(4)
    vals = (rng.permutation(2 * 3 * 6 * 4) * 0.05).reshape(2, 3, 6, 4)  # distinct: no kinks
    rep = gradcheck.check(_PoolOp(), (vals,), {}, rng=rng, full_max_size=200, tolerance=1e-7, name="pool")
    assert rep.ok, rep.describe()
    x32 = np.ascontiguousarray(vals.astype(np.float32).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    out, cache = pooling.max_pool2d_forward(x32, kernel=2, stride=2)
    assert out.dtype == np.float32 and out.transpose(0, 2, 3, 1).flags.c_contiguous  # layout kept
    (dx,) = pooling.max_pool2d_backward(cache, np.ones(out.shape, np.float32))
    assert dx.dtype == np.float32 and dx.transpose(0, 2, 3, 1).flags.c_contiguous
    np.testing.assert_array_equal(dx.reshape(2, 3, 3, 2, 2, 2).sum(axis=(3, 5)), 1.0)


class _PoolOp:
    differentiable = (0,)

    def forward(self, x):
        return pooling.max_pool2d_forward(x, kernel=2, stride=2)

    def backward(self, cache, g):
        return pooling.max_pool2d_backward(cache, g)


# -- ReLU and the thread split ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "padded view"])
def test_relu_keeps_layout_and_routes_by_the_output_sign(layout):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 8, 12, 12))  # above the size at which the batch is split over threads
    x[0, 0, 0, :4] = 0.0  # exact zeros: derivative 0
    if layout == "channels-last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif layout == "padded view":
        big = np.zeros((64, 14, 14, 8))
        big[:, 1:13, 1:13] = x.transpose(0, 2, 3, 1)
        x = big[:, 1:13, 1:13].transpose(0, 3, 1, 2)
    out, cache = activations.relu_forward(x)
    np.testing.assert_array_equal(out, np.where(x > 0, x, 0.0))
    assert sorted(range(4), key=lambda i: -out.strides[i]) == sorted(range(4), key=lambda i: -x.strides[i])
    g = rng.standard_normal(x.shape)
    (dx,) = activations.relu_backward(cache, g)
    np.testing.assert_array_equal(dx, np.where(x > 0, g, 0.0))


def test_map_batch_split_covers_the_batch_once_and_propagates_errors():
    seen = []
    map_batch_split(lambda s, e: seen.append((s, e)), 10, work=10 ** 9)
    assert sorted(seen)[0][0] == 0 and sorted(seen)[-1][1] == 10
    covered = sorted(i for s, e in seen for i in range(s, e))
    assert covered == list(range(10))
    small = []
    map_batch_split(lambda s, e: small.append((s, e)), 10, work=5)
    assert small == [(0, 10)]  # inline, one call

    def boom(s, e):
        raise RuntimeError("part failed")

    with pytest.raises(RuntimeError, match="part failed"):
        map_batch_split(boom, 10, work=10 ** 9)


class _WholeNet:
    """A Sequential seen as one op of (x, *params) for the finite-difference checker."""

    def __init__(self, net, names):
        self.net, self.names = net, names
        self.differentiable = tuple(range(len(names) + 1))

    def forward(self, x, *arrays):
        out, cache, _ = self.net.forward(dict(zip(self.names, arrays)), {}, x)
        return out, cache

    def backward(self, cache, g):
        dx, grads = self.net.backward(cache, g)
        return (dx, *(grads[k] for k in self.names))


def test_cnn_encoder_with_channels_last_activations_passes_gradcheck():
    # channels (3 -> 8 -> 8): the second conv takes the channels-last path, the first the channel-major one
    net = nn.cnn_encoder(channels=(8, 8), out_dim=3, image_size=8)
    rng = np.random.default_rng(6)
    params, _ = net.init(rng, np.float64)
    names = sorted(params)
    x = rng.standard_normal((2, 3, 8, 8))
    rep = gradcheck.check(_WholeNet(net, names), (x, *(params[k] for k in names)), {}, rng=rng,
                          full_max_size=60, n_directions=3, tolerance=1e-6, name="cnn encoder")
    assert rep.ok, rep.describe()
    # The same network through the registered (C-contiguous) ops gives the same output.
    h = x
    for i, layer in enumerate(net.layers):
        sub = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{i}.")}
        if isinstance(layer, nn.Conv2d):
            h = conv.conv2d_forward(h, sub["w"], sub["b"], padding=1)[0]
        else:
            h = layer.forward(sub, {}, h)[0]
    np.testing.assert_allclose(net(params, {}, x), h, rtol=1e-12, atol=1e-12)


# -- checks on channels-last views -----------------------------------------------------------------------
def _channels_last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def test_channels_last_views_are_checked_like_any_array():
    # conv and pooling validate their channels-last inputs and upstream gradients with the ordinary checks
    # (validation scans such a view in memory order): same acceptance and errors as for a C-ordered array,
    # and no copy of an accepted gradient.
    rng = np.random.default_rng(9)
    good = _channels_last(rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    assert not good.flags.c_contiguous
    assert V.float_array(good, "x", ndim=4, shape_doc="(N, C, H, W)") is good
    g = upstream(good, (2, 3, 4, 5), np.float32)
    assert g.shape == good.shape and np.shares_memory(g, good)
    np.testing.assert_array_equal(g, good)
    for bad_value in (np.nan, np.inf, -np.inf):
        bad = good.copy(order="K")
        bad[1, 2, 3, 4] = bad_value
        assert not bad.flags.c_contiguous
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            V.float_array(bad, "x", ndim=4, shape_doc="(N, C, H, W)")
        with pytest.raises(ValueError, match="grad_out contains NaN or inf"):
            upstream(bad, (2, 3, 4, 5), np.float32)
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            conv.conv2d_forward_strided(bad, np.ones((1, 3, 1, 1), np.float32), None)
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            pooling.max_pool2d_forward(bad, kernel=2)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        upstream(good, (2, 3, 5, 4), np.float32)
    cast = upstream(good, (2, 3, 4, 5), np.float64)  # cast to the op's dtype
    assert cast.dtype == np.float64
    np.testing.assert_array_equal(cast, good)
    with pytest.raises(TypeError, match="x must be a float32 or float64 array"):
        V.float_array(_channels_last(np.ones((1, 2, 2, 2), dtype=np.int64)), "x", ndim=4, shape_doc="(N, C, H, W)")
    with pytest.raises(ValueError, match="x must have shape"):
        V.float_array(good[0], "x", ndim=4, shape_doc="(N, C, H, W)")
    with pytest.raises(ValueError, match="empty batch"):
        V.float_array(good[:0], "x", ndim=4, shape_doc="(N, C, H, W)")
    gaps = np.full((1, 1, 2, 4), np.nan)[:, :, :, ::2]  # a view with gaps
    with pytest.raises(ValueError, match="x contains NaN"):
        V.float_array(gaps, "x", ndim=4, shape_doc="(N, C, H, W)")


@pytest.mark.parametrize("channels", [3, 16])
def test_conv2d_results_do_not_depend_on_the_number_of_threads(channels, monkeypatch):
    # Blocks of images go to the threads; the weight gradient is summed per block, in block order.
    import refssl._blocks as blocks

    rng = np.random.default_rng(10)
    x = _channels_last(rng.standard_normal((80, channels, 12, 12)).astype(np.float32))  # enough work to split
    w = (rng.standard_normal((8, channels, 3, 3)) / 6).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    monkeypatch.setattr(conv, "_BLOCK_BYTES", 20000)  # several blocks per thread
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(blocks, "num_threads", lambda t=threads: t)
        monkeypatch.setattr(blocks, "_pool", None)
        out, cache = conv.conv2d_forward_strided(x, w, b, padding=1)
        g = _channels_last(np.cos(np.arange(out.size, dtype=np.float32)).reshape(out.shape))
        results.append((out.copy(),) + conv.conv2d_backward(cache, g))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            np.testing.assert_array_equal(a, b_)
