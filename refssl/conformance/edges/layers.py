"""Layers: linear, convolutions, normalisation layers, activations, pooling, embedding lookup.

Where ports go wrong: weight layouts and batched leading axes (linear, conv), stride and padding
arithmetic, the transposed convolution's cropping, batch statistics per channel of NCHW input and a
constant channel, eval-mode running statistics, large row offsets in layer norm, saturated
activations, overlapping pooling windows and ties in max pooling (the gradient goes to the first
maximum in row-major window order, as PyTorch's CPU kernel does), repeated ids in a lookup.
"""

from __future__ import annotations

import numpy as np

from . import Family, row_scales

F = Family("layers", "network layers (PyTorch definitions)")

F.example_only("flatten", "a reshape (N, ...) -> (N, prod ...): the example covers it; no edge exists")


@F.edge("linear", "batched_3d", "x (B, T, D): the layer acts on the last axis of any leading shape")
def _lin_3d(rng):
    return (rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)) / 2, rng.standard_normal(5)), {}


@F.edge("linear", "n1", "a single row")
def _lin_n1(rng):
    return (rng.standard_normal((1, 6)), rng.standard_normal((6, 3)) / 2, rng.standard_normal(3)), {}


def _conv_args(rng, n, c, f, k, h, w, transpose=False):
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((c, f, k, k) if transpose else (f, c, k, k)) / np.sqrt(c * k * k)
    return x, wt, rng.standard_normal(f)


@F.edge("conv2d", "stride2_padding1", "3x3 kernel, stride 2, padding 1 on a 7x6 image (floor arithmetic)")
def _conv_s2(rng):
    return _conv_args(rng, 2, 3, 4, 3, 7, 6), {"stride": 2, "padding": 1}


@F.edge("conv2d", "kernel1", "1x1 convolution: a per-pixel linear map over channels")
def _conv_k1(rng):
    return _conv_args(rng, 2, 3, 2, 1, 4, 3), {"stride": 1, "padding": 0}


@F.edge("conv2d", "kernel_wider_than_stride", "2x2 kernel, stride 1, no padding: overlapping windows")
def _conv_overlap(rng):
    return _conv_args(rng, 1, 2, 3, 2, 4, 5), {"stride": 1, "padding": 0}


@F.edge("conv_transpose2d", "stride2_padding1", "3x3 kernel, stride 2, padding 1 (output cropped by 1 per side)")
def _convt_s2(rng):
    return _conv_args(rng, 2, 3, 2, 3, 3, 4, transpose=True), {"stride": 2, "padding": 1}


@F.edge("conv_transpose2d", "kernel4_stride2", "4x4 kernel, stride 2, padding 1: the DCGAN-style upsampling")
def _convt_k4(rng):
    return _conv_args(rng, 1, 2, 3, 4, 3, 3, transpose=True), {"stride": 2, "padding": 1}


# ----------------------------------------------------------------------------------- normalisation

def _affine(rng, c):
    return rng.uniform(0.5, 1.5, c), rng.standard_normal(c)


@F.edge("batch_norm", "nchw", "(N, C, H, W) input: statistics per channel over N, H, W")
def _bn_nchw(rng):
    x = rng.standard_normal((2, 3, 2, 3)) * 2 + 1
    return (x, *_affine(rng, 3)), {"eps": 1e-5}


@F.edge("batch_norm_eval", "nchw", "(N, C, H, W) with running statistics (eval mode)")
def _bne_nchw(rng):
    x = rng.standard_normal((2, 3, 2, 3)) * 2 + 1
    return (x, *_affine(rng, 3), rng.standard_normal(3), rng.uniform(0.5, 3.0, 3)), {"eps": 1e-5}


@F.edge("batch_norm", "collapsed_channel", "channel 0 constant: normalised to 0 through sqrt(eps)", exact=True)
def _bn_const(rng):
    x = rng.standard_normal((5, 3)) * 2 + 1
    x[:, 0] = 0.75
    return (x, *_affine(rng, 3)), {"eps": 1e-5}


@F.edge("batch_norm", "n3", "N = 3, a small batch (N = 2 leaves x only an ~eps gradient)")
def _bn_n3(rng):
    return (rng.standard_normal((3, 4)) * 2 + 1, *_affine(rng, 4)), {"eps": 1e-5}


@F.edge("batch_norm_eval", "large_eps", "eps = 0.1 with small running variances: eps is not negligible")
def _bne_eps(rng):
    x = rng.standard_normal((4, 3))
    return (x, *_affine(rng, 3), rng.standard_normal(3), rng.uniform(0.05, 0.2, 3)), {"eps": 0.1}


@F.edge("layer_norm", "batched_3d", "(B, T, D) input: statistics over the last axis")
def _ln_3d(rng):
    return (rng.standard_normal((2, 3, 5)) * 2 + 0.5, *_affine(rng, 5)), {"eps": 1e-5}


@F.edge("layer_norm", "large_offsets", "row means around 10: x - mean per row")
def _ln_offsets(rng):
    x = rng.standard_normal((4, 6)) + 10.0 * rng.choice([-1.0, 1.0], size=(4, 1))
    return (x, *_affine(rng, 6)), {"eps": 1e-5}


@F.edge("layer_norm", "d3", "D = 3, the smallest width with a gradient (D = 2 normalises to +-1)")
def _ln_d3(rng):
    return (rng.standard_normal((4, 3)) * 2, *_affine(rng, 3)), {"eps": 1e-5}


@F.edge("l2_normalize", "large_norms", "row norms 1e2..1e4")
def _l2_large(rng):
    return (rng.standard_normal((4, 5)) * row_scales(rng, 4, 2, 4),), {}


@F.edge("l2_normalize", "small_norms", "row norms 1e-5..1e-4, far above eps = 1e-12")
def _l2_small(rng):
    return (rng.standard_normal((4, 5)) * row_scales(rng, 4, -5, -4),), {}


# ------------------------------------------------------------------------------------- activations

def _away_from_zero(rng, shape, low, high):
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(low, high, size=shape)


@F.edge(("relu", "gelu", "sigmoid"), "large_magnitude", "|x| in 5..30: saturated tails (exp(-x) overflow paths)")
def _act_large(rng):
    return (_away_from_zero(rng, (4, 5), 5.0, 30.0),), {}


@F.edge(("relu", "gelu", "sigmoid"), "near_zero", "|x| in 1e-3..1e-2 (kept off 0, relu's kink)")
def _act_small(rng):
    return (_away_from_zero(rng, (4, 5), 1e-3, 1e-2),), {}


# ------------------------------------------------------------------------------------------ pooling

def _distinct_image(rng, n, c, h, w):
    """Entries pairwise >= 0.05 apart (no ties)."""
    size = n * c * h * w
    return (rng.permutation(size) * 0.05 - 0.025 * size).reshape(n, c, h, w)


@F.edge(("avg_pool2d", "max_pool2d"), "overlapping", "3x3 windows with stride 1: each entry in several windows")
def _pool_overlap(rng):
    return (_distinct_image(rng, 1, 2, 5, 4),), {"kernel": 3, "stride": 1}


@F.edge(("avg_pool2d", "max_pool2d"), "default_stride", "kernel 2, stride None (= kernel) on a 5x4 image: the "
        "last row falls outside every window")
def _pool_default(rng):
    return (_distinct_image(rng, 2, 1, 5, 4),), {"kernel": 2}


@F.edge(("avg_pool2d", "max_pool2d"), "gaps", "kernel 2 with stride 3: entries between windows get no gradient")
def _pool_gaps(rng):
    return (_distinct_image(rng, 1, 2, 6, 5),), {"kernel": 2, "stride": 3}


@F.edge("max_pool2d", "ties", "exact ties inside windows (multiples of 1/4, exact in float32): the gradient goes to "
        "the first maximum in row-major window order", exact=True)
def _pool_ties(rng):
    x = rng.integers(-3, 4, size=(1, 2, 4, 6)) / 4.0
    x[0, 0, 0, :2] = x[0, 0, 1, :2] = 2.0  # a window whose four entries all tie
    x[0, 1, 2, 2] = x[0, 1, 3, 3] = 3.0  # a diagonal tie
    return (x,), {"kernel": 2, "stride": 2}


@F.edge("embedding", "repeated_ids", "ids repeating one row many times: its gradient accumulates")
def _emb_rep(rng):
    ids = np.array([[0, 2, 0, 0], [1, 0, 2, 2]], dtype=np.int64)
    return (ids, rng.standard_normal((4, 3))), {}


@F.edge("embedding", "unused_rows", "rows 3 and 4 are never looked up: zero gradient there")
def _emb_unused(rng):
    ids = np.array([[0, 1], [2, 1], [0, 2]], dtype=np.int64)
    return (ids, rng.standard_normal((5, 2))), {}
