"""The fused ReLU -> 2x2 max-pool path (pooling.relu_max_pool2x2_*) and Sequential's use of it.

The fused op must give exactly what the registered relu and max_pool2d give one after the other: the same
output and the same input gradient, ties and non-positive windows included, for any memory layout.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refssl import gradcheck, nn
from refssl.ops import activations, pooling


def _unfused(x, g):
    r, rc = activations.relu_forward(x)
    out, pc = pooling.max_pool2d_forward(r, kernel=2, stride=2)
    (dr,) = pooling.max_pool2d_backward(pc, g)
    (dx,) = activations.relu_backward(rc, dr)
    return out, dx


def _layout(x, layout):
    if layout == "channels-last":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if layout == "channel-major":
        return np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    if layout == "cropped":
        big = np.full(x.shape[:2] + (x.shape[2] + 1, x.shape[3] + 2), 7.0, dtype=x.dtype)
        big[:, :, 1:, 2:] = x
        return big[:, :, 1:, 2:]
    return x


@settings(deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(2, 7), st.integers(2, 7)),
       seed=st.integers(0, 2 ** 31 - 1),
       layout=st.sampled_from(["nchw", "channels-last", "channel-major", "cropped"]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_fused_relu_max_pool_equals_relu_then_max_pool(shape, seed, layout, dtype):
    rng = np.random.default_rng(seed)
    # Small integers: many ties inside windows, exact zeros, windows with no positive entry.
    x = _layout(rng.integers(-3, 3, size=shape).astype(dtype), layout)
    out, cache = pooling.relu_max_pool2x2_forward(x)
    g = (rng.standard_normal(out.shape) + 5.0).astype(dtype)  # nonzero everywhere
    (dx,) = pooling.relu_max_pool2x2_backward(cache, g)
    want_out, want_dx = _unfused(x, g)
    assert out.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(dx, want_dx)
    # The layout of x is kept (the next convolution reads channels-last activations without a copy).
    order = sorted(range(4), key=lambda i: -x.strides[i])
    assert sorted(range(4), key=lambda i: -out.strides[i]) == order or out.shape[2:] == (1, 1)


def test_fused_relu_max_pool_routes_to_the_first_positive_maximum():
    # One window per case, (x00, x01, x10, x11): the gradient goes to the first maximum in row-major order
    # when the maximum is positive, nowhere otherwise.
    cases = [((1, 2, 3, 4), 3), ((4, 3, 2, 1), 0), ((1, 5, 5, 0), 1), ((2, 0, 2, 2), 0),
             ((-1, -2, -3, -4), None), ((0, 0, 0, 0), None), ((-1, 0, -2, 0), None), ((0, -1, 3, 3), 2)]
    x = np.array([c for c, _ in cases], dtype=np.float64).reshape(len(cases), 1, 2, 2)
    out, cache = pooling.relu_max_pool2x2_forward(x)
    np.testing.assert_array_equal(out.ravel(), [max(0.0, max(c)) for c, _ in cases])
    (dx,) = pooling.relu_max_pool2x2_backward(cache, np.full(out.shape, 2.5))
    for k, (_, where) in enumerate(cases):
        want = np.zeros(4)
        if where is not None:
            want[where] = 2.5
        np.testing.assert_array_equal(dx[k].ravel(), want)


class _FusedOp:
    differentiable = (0,)

    def forward(self, x):
        return pooling.relu_max_pool2x2_forward(x)

    def backward(self, cache, g):
        return pooling.relu_max_pool2x2_backward(cache, g)


def test_fused_relu_max_pool_gradient_by_finite_differences():
    rng = np.random.default_rng(3)
    # Distinct values at least 0.05 apart and away from 0: no ties or kinks under the step.
    vals = (rng.permutation(2 * 3 * 6 * 5) * 0.05 - 8.975).reshape(2, 3, 6, 5)
    rep = gradcheck.check(_FusedOp(), (vals,), {}, rng=rng, full_max_size=200, tolerance=1e-7, name="relu+pool")
    assert rep.ok, rep.describe()


def test_fused_relu_max_pool_rejects_bad_input():
    with pytest.raises(ValueError, match="x"):
        pooling.relu_max_pool2x2_forward(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="x"):
        pooling.relu_max_pool2x2_forward(np.array([[[[1.0, np.nan], [0.0, 1.0]]]]))
    with pytest.raises(ValueError, match="kernel"):
        pooling.relu_max_pool2x2_forward(np.ones((1, 1, 1, 4)))
    with pytest.raises(TypeError, match="x"):
        pooling.relu_max_pool2x2_forward(np.ones((1, 1, 2, 2), dtype=np.int64))
    _, cache = pooling.relu_max_pool2x2_forward(np.ones((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="grad_out"):
        pooling.relu_max_pool2x2_backward(cache, np.ones((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="grad_out"):
        pooling.relu_max_pool2x2_backward(cache, np.full((1, 2, 2, 2), np.inf))


def _layerwise(net, params, x, g):
    """Forward and backward calling each layer's own forward/backward (the unfused computation)."""
    h, caches = x, []
    for i, layer in enumerate(net.layers):
        sub = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{i}.")}
        h, c, _ = layer.forward(sub, {}, h)
        caches.append(c)
    grads = {}
    for i in range(len(net.layers) - 1, -1, -1):
        g, gr = net.layers[i].backward(caches[i], g)
        grads.update({f"{i}.{k}": v for k, v in gr.items()})
    return h, g, grads


@pytest.mark.parametrize("pool_stride", [None, 2])
def test_sequential_fuses_relu_max_pool_with_identical_results(pool_stride):
    net = nn.Sequential([nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, pool_stride),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 2 * 2, 5)])
    rng = np.random.default_rng(7)
    params, state = net.init(rng, np.float64)
    x = rng.standard_normal((3, 3, 8, 8))
    out, cache, new_state = net.forward(params, state, x)
    assert new_state == {}
    g = rng.standard_normal(out.shape)
    dx, grads = net.backward(cache, g)
    want_out, want_dx, want_grads = _layerwise(net, params, x, g)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(dx, want_dx)
    assert sorted(grads) == sorted(want_grads) == sorted(params)
    for k in grads:
        np.testing.assert_array_equal(grads[k], want_grads[k])


def test_sequential_fuses_only_relu_then_2x2_max_pool():
    # Not fused: a 3x3 or stride-1 max-pool, an average pool, a pool not preceded by a ReLU.  Results must
    # match the layerwise computation in every case.
    for layers in ([nn.ReLU(), nn.MaxPool2d(3)], [nn.ReLU(), nn.MaxPool2d(2, 1)], [nn.ReLU(), nn.AvgPool2d(2)],
                   [nn.MaxPool2d(2), nn.ReLU()], [nn.ReLU(), nn.ReLU(), nn.MaxPool2d(2)]):
        net = nn.Sequential(layers)
        rng = np.random.default_rng(8)
        x = rng.standard_normal((2, 3, 6, 6))
        out, cache, _ = net.forward({}, {}, x)
        g = rng.standard_normal(out.shape)
        dx, _ = net.backward(cache, g)
        want_out, want_dx, _ = _layerwise(net, {}, x, g)
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_array_equal(dx, want_dx)


def test_sequential_fused_path_reports_pool_errors():
    net = nn.Sequential([nn.ReLU(), nn.MaxPool2d(2)])
    with pytest.raises(ValueError, match="x"):
        net.forward({}, {}, np.ones((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        net.forward({}, {}, np.full((1, 1, 2, 2), np.nan))
