"""2-D average and max pooling (NCHW, no padding), vectorised over samples and pixels."""

from __future__ import annotations

import numpy as np

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
    offsets = _offsets(kernel, stride, ho, wo)
    out = x[next(offsets)].copy()
    arg = np.zeros(out.shape, dtype=np.int8 if kernel * kernel < 128 else np.int32)
    for idx, sl in enumerate(offsets, start=1):
        v = x[sl]
        better = v > out  # strict: the first maximum in row-major window order wins ties
        np.maximum(out, v, out=out)
        arg = np.where(better, arg.dtype.type(idx), arg)
    return out, (x.shape, x.dtype, kernel, stride, arg)


def max_pool2d_backward(cache, grad_out):
    """The output gradient is routed to the arg-max entry of each window."""
    xshape, dtype, k, stride, arg = cache
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
