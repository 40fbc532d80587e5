"""2-D average and max pooling (NCHW, no padding), vectorised over samples and pixels."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import validation as V
from .._blocks import map_batch_split
from ..registry import register
from ._layer_checks import upstream


def _pool_setup(x, kernel, stride):
    V.float_array(x, "x", ndim=4, shape_doc="(N, C, H, W)")
    kernel = V.positive_int(kernel, "kernel")
    stride = kernel if stride is None else V.positive_int(stride, "stride")
    n, c, h, w = x.shape
    if kernel > h or kernel > w:
        raise ValueError(f"kernel={kernel} is larger than the spatial size {h}x{w} of x")
    return kernel, stride, (h - kernel) // stride + 1, (w - kernel) // stride + 1


def _offsets(k, stride, ho, wo):
    """The k*k strided slices x[:, :, p::stride, q::stride] (each (N, C, Ho, Wo), views), row-major in (p, q).

    Pooling loops over these k*k kernel offsets (never over samples or pixels): each pass is one
    vectorised elementwise operation on an output-sized array.
    """
    hs, ws = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    for p in range(k):
        for q in range(k):
            yield (slice(None), slice(None), slice(p, p + hs, stride), slice(q, q + ws, stride))


def avg_pool2d_forward(x, *, kernel=2, stride=None):
    """Average pooling over kernel x kernel windows.

        out[n, c, i, j] = mean_{p, q < kernel} x[n, c, stride*i + p, stride*j + q]

    Shapes: x (N, C, H, W) -> out (N, C, Ho, Wo), Ho = (H - kernel) // stride + 1; ``stride`` defaults
    to ``kernel``; no padding (PyTorch ``nn.AvgPool2d`` with padding 0, floor mode).

    Reference: LeCun et al. 1998 (Proc. IEEE 86(11)) (subsampling layers); PyTorch
    torch/nn/modules/pooling.py (AvgPool2d).  Backward: derivations/layers_backward.md#avg_pool2d.
    """
    kernel, stride, ho, wo = _pool_setup(x, kernel, stride)
    out = np.zeros((x.shape[0], x.shape[1], ho, wo), dtype=x.dtype)
    for sl in _offsets(kernel, stride, ho, wo):
        out += x[sl]
    out *= x.dtype.type(1.0 / (kernel * kernel))
    return out, (x.shape, x.dtype, kernel, stride)


def avg_pool2d_backward(cache, grad_out):
    """Each window receives its output gradient divided by kernel^2."""
    xshape, dtype, k, stride = cache
    n, c, h, w = xshape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    g = upstream(grad_out, (n, c, ho, wo), dtype) * dtype.type(1.0 / (k * k))
    dx = np.zeros(xshape, dtype=dtype)
    for sl in _offsets(k, stride, ho, wo):
        dx[sl] += g
    return (dx,)


def _distinct_image(rng, dtype):
    """Random image whose entries are pairwise >= 0.05 apart, so a max never ties under a 1e-6 step."""
    n, c = (int(v) for v in rng.integers(1, 3, size=2))
    h, w = (int(v) for v in rng.integers(2, 6, size=2))
    size = n * c * h * w
    vals = (rng.permutation(size) * 0.05 - 0.025 * size).reshape(n, c, h, w)
    return vals.astype(dtype)


def _pool_example(rng, dtype=np.float64):
    x = _distinct_image(rng, dtype)
    k = int(rng.integers(1, min(x.shape[2:]) + 1))
    stride = int(rng.integers(1, k + 1))
    return (x,), {"kernel": k, "stride": stride}


register(
    "avg_pool2d",
    forward=avg_pool2d_forward,
    backward=avg_pool2d_backward,
    example=_pool_example,
    differentiable=(0,),
    reference="LeCun et al. 1998 (Proc. IEEE 86(11)); PyTorch torch/nn/modules/pooling.py (AvgPool2d)",
    derivation="derivations/layers_backward.md#avg_pool2d",
)


_POOL_CHUNK = 1 << 19  # input bytes per pass of the 2x2 path: its temporaries stay in (L2) cache


def _quadrants(a, ho, wo):
    """The four (N, C, Ho, Wo) views a[:, :, p::2, q::2] (cropped to 2*Ho x 2*Wo) in row-major (p, q) order.

    Built with explicit strides so that they are views for any memory layout of ``a`` (writes to the views
    of an output array land in it).
    """
    sn, sc, sh, sw = a.strides
    shape = (a.shape[0], a.shape[1], ho, wo)
    return [as_strided(a[:, :, p:, q:], shape, (sn, sc, 2 * sh, 2 * sw)) for p in (0, 1) for q in (0, 1)]


def _empty_in_layout(shape, dtype, axis_order):
    """An empty array of ``shape`` whose memory order of axes is ``axis_order`` (outermost first)."""
    base = np.empty([shape[i] for i in axis_order], dtype=dtype)
    return base.transpose(np.argsort(axis_order))


def _axis_order(a):
    """Axes of ``a`` from the largest stride to the smallest: e.g. (0, 2, 3, 1) for a channels-last view."""
    return tuple(sorted(range(a.ndim), key=lambda i: -abs(a.strides[i])))


def _max_pool2x2_forward(x, ho, wo, relu=False):
    """Non-overlapping 2x2 windows: out = max(max(x00, x01), max(x10, x11)) with the choice recorded as
    boolean planes: ``top`` (the top row holds a maximum), ``left0`` / ``left1`` (the left entry is a
    maximum of the top / bottom row).  With >= throughout, this picks the first maximum in row-major
    window order: top if max(x00, x01) >= max(x10, x11), then left if x00 >= x01 (resp. x10 >= x11).

    ``relu=True`` returns relu(out) instead, and the routing planes of relu(max_pool(x)):
    ``top`` and ``bottom`` are then (top row chosen, resp. bottom row) AND out > 0, so the backward sends
    the upstream gradient to the chosen entry only where the pooled value is positive.  Otherwise
    ``bottom`` is None (the backward takes the complement of ``top``)."""
    n, c = x.shape[:2]
    order = _axis_order(x)  # outputs in the input's layout: every pass below reads and writes in order
    out = _empty_in_layout((n, c, ho, wo), x.dtype, order)
    top, left0, left1 = (_empty_in_layout((n, c, ho, wo), bool, order) for _ in range(3))
    bottom = _empty_in_layout((n, c, ho, wo), bool, order) if relu else None
    x00, x01, x10, x11 = _quadrants(x, ho, wo)
    per = max(1, _POOL_CHUNK // max(1, x[0].nbytes))
    zero = x.dtype.type(0)

    def part(s, e):
        for a in range(s, e, per):
            b = min(a + per, e)
            r0 = np.maximum(x00[a:b], x01[a:b])
            r1 = np.maximum(x10[a:b], x11[a:b])
            np.maximum(r0, r1, out=out[a:b])
            np.greater_equal(r0, r1, out=top[a:b])
            np.greater_equal(x00[a:b], x01[a:b], out=left0[a:b])
            np.greater_equal(x10[a:b], x11[a:b], out=left1[a:b])
            if relu:
                o = out[a:b]
                np.maximum(o, zero, out=o)
                positive = o > zero
                np.logical_and(top[a:b], positive, out=top[a:b])
                np.logical_xor(positive, top[a:b], out=bottom[a:b])  # positive and not top

    map_batch_split(part, n, x.size)
    return out, ((top, bottom, left0, left1), order)


def _max_pool2x2_backward(choice, order, g, xshape, dtype):
    """Route g to the recorded entry: (top, left0) -> x00, (top, not left0) -> x01, and so on.

    g * mask is g or (signed) zero exactly, and g - g * mask the complement, so every window receives
    exactly its g, at one entry (or, after a fused ReLU, none where the pooled value is not positive)."""
    n, c, h, w = xshape
    ho, wo = g.shape[2:]
    # A row or column cut off by the 2x2 grid (odd H or W) gets no gradient: only then zero-fill.
    dx = _empty_in_layout(xshape, dtype, order)  # the layout of x
    if (h, w) != (2 * ho, 2 * wo):
        dx.fill(0)
    d00, d01, d10, d11 = _quadrants(dx, ho, wo)
    top, bottom, left0, left1 = choice
    per = max(1, _POOL_CHUNK // max(1, 4 * g[0].nbytes))

    def part(s, e):
        for a in range(s, e, per):
            b = min(a + per, e)
            gt = g[a:b] * top[a:b]
            gb = g[a:b] - gt if bottom is None else g[a:b] * bottom[a:b]
            np.multiply(gt, left0[a:b], out=d00[a:b])
            np.subtract(gt, d00[a:b], out=d01[a:b])
            np.multiply(gb, left1[a:b], out=d10[a:b])
            np.subtract(gb, d10[a:b], out=d11[a:b])

    map_batch_split(part, n, 4 * g.size)
    return dx


def relu_max_pool2x2_forward(x):
    """ReLU followed by 2x2 max pooling (kernel = stride = 2), in one pass over x.

        out[n, c, i, j] = max(0, max_{p, q < 2} x[n, c, 2i + p, 2j + q])
                        = max_pool2d(relu(x), kernel=2)[n, c, i, j]

    (relu is monotone, so it commutes with the max).  Shapes: x (N, C, H, W) -> out (N, C, H//2, W//2),
    in the memory layout of x.  The backward sends each upstream gradient to the first maximum of its
    window in row-major order when the pooled value is positive, and nowhere otherwise: exactly what
    ``relu_backward(max_pool2d_backward(g))`` gives (where the pooled value is positive the first
    maximum of relu(x) is the first maximum of x; elsewhere the ReLU derivative is 0).

    Not a registered op: the private path :class:`refssl.nn.Sequential` takes for a ``ReLU`` followed by
    a ``MaxPool2d(2)``, which saves the ReLU's two passes over the full-size activation.  Its pieces are
    the registered ``relu`` and ``max_pool2d``.  Backward: derivations/layers_backward.md#max_pool2d.
    """
    _, _, ho, wo = _pool_setup(x, 2, 2)
    out, (choice, order) = _max_pool2x2_forward(x, ho, wo, relu=True)
    return out, (x.shape, x.dtype, choice, order)


def relu_max_pool2x2_backward(cache, grad_out):
    """dx: the upstream gradient at the first maximum of each window whose pooled value is positive."""
    xshape, dtype, choice, order = cache
    g = upstream(grad_out, choice[0].shape, dtype)
    return (_max_pool2x2_backward(choice, order, g, xshape, dtype),)


def max_pool2d_forward(x, *, kernel=2, stride=None):
    """Max pooling over kernel x kernel windows.

        out[n, c, i, j] = max_{p, q < kernel} x[n, c, stride*i + p, stride*j + q]

    Shapes: x (N, C, H, W) -> out (N, C, Ho, Wo), Ho = (H - kernel) // stride + 1; ``stride`` defaults
    to ``kernel``; no padding (PyTorch ``nn.MaxPool2d`` with padding 0, floor mode).  On ties the gradient
    goes to the first maximum in row-major window order (a subgradient; PyTorch makes the same choice).

    kernel = stride = 2 (the CNN encoder's pooling) has its own path: three elementwise maxima over the
    window's four strided views, the choice of entry kept as three boolean planes (see
    ``_max_pool2x2_forward``), processed in cache-sized chunks of samples split over the threads.

    Reference: Ranzato et al. 2007 (CVPR); PyTorch torch/nn/modules/pooling.py (MaxPool2d).
    Backward: derivations/layers_backward.md#max_pool2d.
    """
    kernel, stride, ho, wo = _pool_setup(x, kernel, stride)
    if kernel == 2 and stride == 2:
        out, (choice, order) = _max_pool2x2_forward(x, ho, wo)
        return out, ("2x2", x.shape, x.dtype, choice, order)
    offsets = _offsets(kernel, stride, ho, wo)
    out = x[next(offsets)].copy()
    arg = np.zeros(out.shape, dtype=np.int8 if kernel * kernel < 128 else np.int32)
    for idx, sl in enumerate(offsets, start=1):
        v = x[sl]
        better = v > out  # strict: the first maximum in row-major window order wins ties
        np.maximum(out, v, out=out)
        arg = np.where(better, arg.dtype.type(idx), arg)
    return out, ("general", x.shape, x.dtype, kernel, stride, arg)


def max_pool2d_backward(cache, grad_out):
    """The output gradient is routed to the arg-max entry of each window."""
    if cache[0] == "2x2":
        _, xshape, dtype, choice, order = cache
        g = upstream(grad_out, choice[0].shape, dtype)
        return (_max_pool2x2_backward(choice, order, g, xshape, dtype),)
    _, xshape, dtype, k, stride, arg = cache
    g = upstream(grad_out, arg.shape, dtype)
    dx = np.zeros(xshape, dtype=dtype)
    zero = dtype.type(0)
    for idx, sl in enumerate(_offsets(k, stride, *arg.shape[2:])):
        if stride >= k:  # windows do not overlap: each input entry is written at most once
            dx[sl] = np.where(arg == idx, g, zero)
        else:
            dx[sl] += np.where(arg == idx, g, zero)
    return (dx,)


register(
    "max_pool2d",
    forward=max_pool2d_forward,
    backward=max_pool2d_backward,
    example=_pool_example,
    differentiable=(0,),
    reference="Ranzato et al. 2007 (CVPR); PyTorch torch/nn/modules/pooling.py (MaxPool2d)",
    derivation="derivations/layers_backward.md#max_pool2d",
)
