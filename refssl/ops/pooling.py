"""2-D average and max pooling (NCHW, no padding) via strided window views."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import validation as V
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


def _windows(x, k, stride, ho, wo):
    """View (N, C, Ho, Wo, k, k) of the pooling windows of NCHW ``x``, no copy."""
    sn, sc, sh, sw = x.strides
    n, c = x.shape[:2]
    return as_strided(x, shape=(n, c, ho, wo, k, k),
                      strides=(sn, sc, sh * stride, sw * stride, sh, sw), writeable=False)


def _scatter(vals, xshape, stride):
    """Adjoint of :func:`_windows`: sum window values (N, C, Ho, Wo, k, k) back into an image."""
    n, c, ho, wo, k, _ = vals.shape
    out = np.zeros(xshape, dtype=vals.dtype)
    if stride == k:  # non-overlapping windows: a pure reshape (the common case)
        blk = vals.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho * k, wo * k)
        out[:, :, :ho * k, :wo * k] = blk
        return out
    hs, ws = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    for i in range(k):
        for j in range(k):
            out[:, :, i:i + hs:stride, j:j + ws:stride] += vals[:, :, :, :, i, j]
    return out


def avg_pool2d_forward(x, *, kernel=2, stride=None):
    """Average pooling over kernel x kernel windows.

        out[n, c, i, j] = mean_{p, q < kernel} x[n, c, stride*i + p, stride*j + q]

    Shapes: x (N, C, H, W) -> out (N, C, Ho, Wo), Ho = (H - kernel) // stride + 1; ``stride`` defaults
    to ``kernel``; no padding (PyTorch ``nn.AvgPool2d`` with padding 0, floor mode).

    Reference: LeCun et al. 1998 (Proc. IEEE 86(11)) (subsampling layers); PyTorch
    torch/nn/modules/pooling.py (AvgPool2d).  Backward: derivations/layers_backward.md#avg_pool2d.
    """
    kernel, stride, ho, wo = _pool_setup(x, kernel, stride)
    out = _windows(x, kernel, stride, ho, wo).mean(axis=(4, 5))
    return out, (x.shape, x.dtype, kernel, stride)


def avg_pool2d_backward(cache, grad_out):
    """Each window receives its output gradient divided by kernel^2."""
    xshape, dtype, k, stride = cache
    n, c, h, w = xshape
    g = upstream(grad_out, (n, c, (h - k) // stride + 1, (w - k) // stride + 1), dtype)
    vals = np.broadcast_to((g / dtype.type(k * k))[..., None, None], g.shape + (k, k))
    return (_scatter(vals, xshape, stride),)


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


def max_pool2d_forward(x, *, kernel=2, stride=None):
    """Max pooling over kernel x kernel windows.

        out[n, c, i, j] = max_{p, q < kernel} x[n, c, stride*i + p, stride*j + q]

    Shapes: x (N, C, H, W) -> out (N, C, Ho, Wo), Ho = (H - kernel) // stride + 1; ``stride`` defaults
    to ``kernel``; no padding (PyTorch ``nn.MaxPool2d`` with padding 0, floor mode).  On ties the gradient
    goes to the first maximum in row-major window order (a subgradient; PyTorch makes the same choice).

    Reference: Ranzato et al. 2007 (CVPR); PyTorch torch/nn/modules/pooling.py (MaxPool2d).
    Backward: derivations/layers_backward.md#max_pool2d.
    """
    kernel, stride, ho, wo = _pool_setup(x, kernel, stride)
    win = _windows(x, kernel, stride, ho, wo).reshape(x.shape[0], x.shape[1], ho, wo, kernel * kernel)
    arg = np.argmax(win, axis=-1)
    out = np.take_along_axis(win, arg[..., None], axis=-1)[..., 0]
    return out, (x.shape, x.dtype, kernel, stride, arg)


def max_pool2d_backward(cache, grad_out):
    """The output gradient is routed to the arg-max entry of each window."""
    xshape, dtype, k, stride, arg = cache
    g = upstream(grad_out, arg.shape, dtype)
    vals = np.zeros(arg.shape + (k * k,), dtype=dtype)
    np.put_along_axis(vals, arg[..., None], g[..., None], axis=-1)
    return (_scatter(vals.reshape(arg.shape + (k, k)), xshape, stride),)


register(
    "max_pool2d",
    forward=max_pool2d_forward,
    backward=max_pool2d_backward,
    example=_pool_example,
    differentiable=(0,),
    reference="Ranzato et al. 2007 (CVPR); PyTorch torch/nn/modules/pooling.py (MaxPool2d)",
    derivation="derivations/layers_backward.md#max_pool2d",
)
