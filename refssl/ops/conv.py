"""2-D convolution and its adjoint, the transposed convolution (NCHW at the interface).

Both ops take NCHW tensors at their interface but work internally in NHWC (channels-last), where every
im2col row is a run of contiguous channel vectors: the window gather is a strided view (``as_strided``,
no copy) that one ``reshape`` turns into the column matrix, and the forward GEMM's (N*Ho*Wo, F) result
*is* the output in channels-last memory.  A bias rides along as a column of ones in the column matrix (and
the bias as the matching weight column), so the GEMM adds it and the weight-gradient GEMM returns db as
its last row.  The column matrix is never built whole: blocks of whole images (about 1 MB of columns,
``_Columns``) are gathered into a reused buffer and multiplied while they are in cache, and the backward
gathers them again from the padded input it keeps (a copy within the cache is cheaper than writing tens of
MB to memory and reading them back).  The GEMMs are cut to the size of OpenBLAS's direct kernel, and the
blocks are spread over the threads (``_over_blocks``); results do not depend on the number of threads.
With few input channels (KW*C < 16: the RGB input layer) the channels-last windows would be copied in
runs too short to be efficient, and the transposed column matrix is gathered channel-major instead
(``_PlaneColumns``: runs of whole image rows); the GEMM reads it transposed, so its output is
channels-last as well.

The input gradient of a stride-1 convolution (every convolution of the CNN encoder) avoids col2im with the
*shifted-rows* formulation: store the upstream gradient zero-padded and flattened, row r = output pixel
(n, i, j) at r = n*Hp*Wp + i*Wp + j (Hp, Wp the padded input size; zero rows where no output pixel is).
Output pixel r reads padded input pixels r + p*Wp + q, so the padded input gradient is

    dxp[r + p*Wp + q] += g[r] @ W[p, q]^T          for every kernel offset (p, q),

KH*KW GEMMs on row-shifted views of two matrices, summed in place, one block of a few images at a time
(the shifts never cross from one image to the next; ``_ShiftedRowsDx``).
Other strides use col2im: a loop over the KH*KW kernel offsets -- never over samples or pixels -- each a
strided slice-add.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import validation as V
from .._blocks import block_bounds, map_batch_split
from ..registry import register
from ._layer_checks import nonneg_int, param, upstream


def _windows(xp, kh, kw, stride, ho, wo):
    """View of the KH x KW windows of padded NHWC ``xp``: shape (N, Ho, Wo, KH, KW, C), no copy."""
    sn, sh, sw, sc = xp.strides
    n, _, _, c = xp.shape
    return as_strided(xp, shape=(n, ho, wo, kh, kw, c),
                      strides=(sn, sh * stride, sw * stride, sh, sw, sc), writeable=False)


def _col2im(blocks, hp, wp, stride):
    """Adjoint of :func:`_windows`: sum blocks (KH, KW, N, Ho, Wo, C) into an (N, Hp, Wp, C) image.

    ``blocks[p, q]`` holds, for every output position, the contribution to the input pixel at kernel
    offset (p, q).  With that layout each of the KH*KW slice-adds reads one contiguous block.
    """
    kh, kw, n, ho, wo, c = blocks.shape
    out = np.zeros((n, hp, wp, c), dtype=blocks.dtype)
    hspan, wspan = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + hspan:stride, j:j + wspan:stride, :] += blocks[i, j]
    return out


def _offset_gemm(a, w_offsets, kh, kw, n, ho, wo):
    """a (M, K) times each kernel-offset matrix w_offsets[k] (K, C) -> blocks (KH, KW, N, Ho, Wo, C).

    One batched matmul (KH*KW GEMMs); the result is laid out offset-major for :func:`_col2im`.
    """
    out = np.matmul(a, w_offsets)
    return out.reshape(kh, kw, n, ho, wo, w_offsets.shape[-1])


def _nhwc_padded(x, padding):
    """NCHW -> zero-padded NHWC copy (one pass, the batch split over the threads)."""
    n, c, h, w = x.shape
    xp = np.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=x.dtype)
    inner = xp[:, padding:padding + h, padding:padding + w, :]
    xt = x.transpose(0, 2, 3, 1)
    map_batch_split(lambda s, e: np.copyto(inner[s:e], xt[s:e]), n, x.size)
    return xp


def _check_conv_hyper(stride, padding):
    return V.positive_int(stride, "stride"), nonneg_int(padding, "padding")


# OpenBLAS (the BLAS numpy ships) computes a product with M*N*K <= 1e6 by a direct kernel that neither
# packs the operands nor wakes its threads; larger ones are packed and split over its threads.  The products
# of a small CNN are narrow (16..64 filters), and for them the direct kernel is the faster one (about 1.5x
# for the CNN encoder's layers), so the loops below cut their GEMMs to that size, and run blocks of images
# on several threads themselves (numpy's matmul releases the GIL).  Any other BLAS just sees smaller blocks.
_DIRECT_GEMM_MNK = 1_000_000
# Bytes of column matrix per block of images: a block is gathered and multiplied (in direct-kernel
# pieces) while it is in the (L2) cache, so the full column matrix (tens of MB) never goes through memory.
_BLOCK_BYTES = 1 << 20
# Below this many numbers per window row (KW*C) the channels-last gather copies runs too short to be
# efficient and the channel-major layout (runs of whole image rows) is used instead.
_MIN_CHANNELS_LAST_RUN = 16


def _direct_rows(*fixed):
    """Rows per GEMM call such that rows * prod(fixed) stays within the direct kernel's size (at least 16)."""
    return max(16, _DIRECT_GEMM_MNK // max(1, int(np.prod(fixed))))


def _image_blocks(n, bytes_per_image):
    """[(start, stop), ...]: consecutive blocks of whole images of about _BLOCK_BYTES."""
    return block_bounds(n, max(1, min(n, _BLOCK_BYTES // max(1, bytes_per_image))))


def _block_list(layout, xp, kh, kw, ho, wo, has_b):
    """The blocks of images (start, stop) for the column buffers of :class:`_Columns` (channels-last) or
    :class:`_PlaneColumns` (channel-major) on this padded input: about _BLOCK_BYTES of columns each."""
    if layout == "channel-major":
        width = kh * kw * xp.shape[0] + has_b
        return _image_blocks(xp.shape[1], width * ho * wo * xp.itemsize)
    return _image_blocks(xp.shape[0], ho * wo * (kh * kw * xp.shape[3] + has_b) * xp.itemsize)


def _over_blocks(part, blocks, work):
    """``part(blocks[i0:i1])`` for consecutive parts of the block list, one per thread.  Each thread
    gathers into its own buffer and multiplies with numpy's matmul, which releases the GIL; the GEMMs
    are direct-kernel sized, so each runs on its own thread's core and the threads work in parallel."""
    map_batch_split(lambda i0, i1: part(blocks[i0:i1]), len(blocks), work, min_work=1 << 18)


def _weight_matrix(w, b):
    """(KH*KW*C [+1], F): the filters as columns, rows in the (p, q, c) order of a column-matrix row, and
    the bias as the last row when there is one (the column matrix then ends in a column of ones)."""
    f, c, kh, kw = w.shape
    k = kh * kw * c
    wmat = np.empty((k + (b is not None), f), dtype=w.dtype)
    wmat[:k] = w.transpose(2, 3, 1, 0).reshape(k, f)
    if b is not None:
        wmat[k] = b
    return wmat


def _channels_last_rows(a):
    """An (N, C, H, W) array as its (N*H*W, C) channels-last matrix: a view when ``a`` has channels-last
    strides (the output of this module's ops and of the layers after them), else one copy."""
    n, c, h, w = a.shape
    return a.transpose(0, 2, 3, 1).reshape(n * h * w, c)


class _Columns:
    """The column matrix of a channels-last convolution, one block of images at a time.

    ``rows(s, e)`` gathers the (rows of) images s:e from the window view of the padded NHWC input into a
    reused buffer (a ones column at the end when the layer has a bias) and returns them as an
    ((e - s)*Ho*Wo, KH*KW*C [+1]) C-contiguous matrix, valid until the next call.  The buffer holds the
    largest of ``blocks``, the blocks it will be asked for.
    """

    def __init__(self, xp, kh, kw, stride, ho, wo, has_b, blocks):
        self.win = _windows(xp, kh, kw, stride, ho, wo)
        self.k = kh * kw * xp.shape[3]
        self.width = self.k + has_b
        per = max(e - s for s, e in blocks)
        self.buf = np.empty((per * ho * wo, self.width), dtype=xp.dtype)
        if has_b:
            self.buf[:, self.k] = 1

    def rows(self, s, e):
        _, ho, wo, kh, kw, c = self.win.shape
        blk = self.buf[:(e - s) * ho * wo]
        blk[:, :self.k].reshape(e - s, ho, wo, kh, kw, c)[...] = self.win[s:e]
        return blk


class _PlaneColumns:
    """The transposed column matrix of a channel-major convolution (few input channels), blockwise.

    ``images(s, e)`` returns an (e - s, KH*KW*C [+1], Ho*Wo) C-contiguous array: for each image of the
    block its transposed column matrix, gathered plane by plane (runs of whole image rows) from the padded
    (C, N, Hp, Wp) input into a reused buffer, which holds the largest of ``blocks``.
    """

    def __init__(self, xp, kh, kw, stride, ho, wo, has_b, blocks):
        self.planes = _cm_planes(xp, kh, kw, stride, ho, wo)
        self.shape = (kh, kw, xp.shape[0], ho, wo)
        self.k, self.width = kh * kw * xp.shape[0], kh * kw * xp.shape[0] + has_b
        per = max(e - s for s, e in blocks)
        self.buf = np.empty((per, self.width, ho * wo), dtype=xp.dtype)
        if has_b:
            self.buf[:, self.k] = 1

    def images(self, s, e):
        kh, kw, c, ho, wo = self.shape
        blk = self.buf[:e - s]
        b6 = blk[:, :self.k].reshape(e - s, kh, kw, c, ho, wo)
        for p, q, plane in self.planes:
            b6[:, p, q] = plane[:, s:e].transpose(1, 0, 2, 3)
        return blk


class _ShiftedRowsDx:
    """Input gradient of a stride-1 convolution by the shifted-rows formulation (module docstring), in
    blocks of a few images (each GEMM direct-kernel sized), spread over the threads: a block's upstream
    gradient is copied into the interior of a zero-padded buffer, and the KH*KW GEMMs run on row-shifted
    views of it, their products added into the block's rows of the padded input gradient (numpy's matmul
    cannot accumulate, but releases the GIL; the adds run on contiguous rows in cache).  ``dx()`` is the
    (N, C, H, W) view with channels-last strides into the padded gradient (no copy)."""

    def __init__(self, gmat, w, xshape, padding):
        n, c, h, wd = xshape
        f, _, kh, kw = w.shape
        self.hp, self.wp = h + 2 * padding, wd + 2 * padding
        self.ho, self.wo = self.hp - kh + 1, self.wp - kw + 1
        self.kh, self.kw, self.padding, self.xshape = kh, kw, padding, xshape
        self.gs = gmat.reshape(n, self.ho, self.wo, f)
        self.wt = np.ascontiguousarray(w.transpose(2, 3, 0, 1))  # wt[p, q] = W[p, q]^T, (F, C)
        tail = (kh - 1) * self.wp + (kw - 1)
        self.per = max(1, min(n, (_direct_rows(f, c) + tail) // (self.hp * self.wp)))
        self.dxp = np.empty((n * self.hp * self.wp, c), dtype=gmat.dtype)

    def part(self, blocks):
        f, c = self.wt.shape[2:]
        img, wp = self.hp * self.wp, self.wp
        gbuf = np.zeros((self.per, self.hp, self.wp, f), dtype=self.dxp.dtype)  # the border stays zero
        gv = gbuf.reshape(-1, f)
        wt = self.wt.reshape(-1, f, c)
        prods = np.empty((len(wt), len(gv), c), dtype=self.dxp.dtype)
        for s, e in blocks:
            gbuf[:e - s, :self.ho, :self.wo] = self.gs[s:e]
            # Rows >= valid belong to windows that would run past the block's last padded row; every
            # output pixel (n, i < Ho, j < Wo) sits below it.
            valid = (e - s) * img - (self.kh - 1) * wp - (self.kw - 1)
            pv = prods[:, :valid]
            np.matmul(gv[:valid], wt, out=pv)  # the KH*KW products g @ W[p, q]^T, one stacked matmul
            d = self.dxp[s * img:e * img]
            d[:valid] = pv[0]  # offset (0, 0)
            d[valid:] = 0
            for p in range(self.kh):
                for q in range(self.kw):
                    o = p * wp + q
                    if o:
                        d[o:o + valid] += pv[p * self.kw + q]

    def dx(self):
        n, c, h, wd = self.xshape
        _over_blocks(self.part, block_bounds(n, self.per), self.dxp.size * self.kh * self.kw)
        pad = self.padding
        return self.dxp.reshape(n, self.hp, self.wp, c)[:, pad:pad + h, pad:pad + wd, :].transpose(0, 3, 1, 2)


def _conv2d(x, w, b, stride, padding):
    """Checked conv2d: (out, cache) with ``out`` a channels-last (N, F, Ho, Wo) view of the GEMM result."""
    V.float_array(x, "x", ndim=4, shape_doc="(N, C, H, W)")
    V.float_array(w, "w", ndim=4, shape_doc="(F, C, KH, KW)")
    V.same_dtype([x, w], ["x", "w"])
    stride, padding = _check_conv_hyper(stride, padding)
    n, c, h, wd = x.shape
    f, cw, kh, kw = w.shape
    if cw != c:
        raise ValueError(f"w must have shape (F, C, KH, KW) with C = x.shape[1] = {c}, got shape {w.shape}")
    if c < 1:
        raise ValueError(f"x must have shape (N, C, H, W) with at least one channel, got shape {x.shape}")
    hp, wp = h + 2 * padding, wd + 2 * padding
    if kh < 1 or kw < 1:
        raise ValueError(f"w must have a kernel of at least 1x1 (shape (F, C, KH, KW)), got shape {w.shape}")
    if kh > hp or kw > wp:
        raise ValueError(f"kernel {kh}x{kw} of w is larger than the padded input {hp}x{wp} of x")
    if b is not None:
        param(b, "b", (f,), "(F,)", x)
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    m = ho * wo
    wmat = _weight_matrix(w, b)
    out = np.empty((n * m, f), dtype=x.dtype)  # channels-last: row (n, i, j), one column per filter
    has_b = b is not None
    if kw * c < _MIN_CHANNELS_LAST_RUN:
        # Channel-major: the padded input (C, N, Hp, Wp); image i's output rows are cols_i @ wmat, BLAS
        # reading the image's transposed columns cols_i^T (K, Ho*Wo) with the transpose flag.
        xp = np.zeros((c, n, hp, wp), dtype=x.dtype)
        xp[:, :, padding:padding + h, padding:padding + wd] = x.transpose(1, 0, 2, 3)
        layout = "channel-major"

        def part(blocks):
            cols = _PlaneColumns(xp, kh, kw, stride, ho, wo, has_b, blocks)
            for s, e in blocks:  # one stacked matmul: a GEMM per image, the loop in numpy
                np.matmul(cols.images(s, e).transpose(0, 2, 1), wmat, out=out[s * m:e * m].reshape(e - s, m, f))
    else:
        xp = _nhwc_padded(x, padding)
        layout = "channels-last"
        step = _direct_rows(wmat.shape[0], f)

        def part(blocks):
            cols = _Columns(xp, kh, kw, stride, ho, wo, has_b, blocks)
            for s, e in blocks:
                blk, o = cols.rows(s, e), out[s * m:e * m]
                q = len(blk) // step * step  # pieces of `step` rows as one stacked matmul, then the rest
                np.matmul(blk[:q].reshape(-1, step, blk.shape[1]), wmat, out=o[:q].reshape(-1, step, f))
                np.matmul(blk[q:], wmat, out=o[q:])

    _over_blocks(part, _block_list(layout, xp, kh, kw, ho, wo, has_b), n * m * wmat.shape[0])
    y = out.reshape(n, ho, wo, f).transpose(0, 3, 1, 2)
    # The padded input, not the column matrix, is kept: the backward gathers the columns again block by
    # block (a copy within the cache costs less than writing the whole matrix to memory and reading it back).
    return y, (layout, xp, w, x.shape, stride, padding, b is not None)


def _cm_planes(a, kh, kw, stride, ho, wo):
    """The KH*KW strided (C, N, Ho, Wo) views a[:, :, p::stride, q::stride] of a channel-major array."""
    return [(p, q, a[:, :, p:p + stride * (ho - 1) + 1:stride, q:q + stride * (wo - 1) + 1:stride])
            for p in range(kh) for q in range(kw)]


def conv2d_forward(x, w, b, *, stride=1, padding=0):
    """2-D cross-correlation (what deep-learning libraries call convolution), NCHW.

        out[n, f, i, j] = b[f] + sum_{c, p, q} w[f, c, p, q] * xpad[n, c, stride*i + p, stride*j + q]

    with xpad the input zero-padded by ``padding`` on each spatial side.
    Shapes: x (N, C, H, W), w (F, C, KH, KW), b (F,) or ``None`` -> out (N, F, Ho, Wo) with
    Ho = (H + 2*padding - KH) // stride + 1 (likewise Wo); PyTorch ``nn.Conv2d`` layout and semantics
    (dilation 1, groups 1, zero padding).  out and the backward's dx are C-contiguous NCHW arrays
    (:func:`conv2d_forward_strided` skips that final copy).

    Computed by im2col: the (N*Ho*Wo, KH*KW*C) column matrix (strided view + one copy) times the reshaped
    weights, in blocks of images that stay in cache; the backward gathers the blocks again for the weight
    gradient.  The input gradient: KH*KW accumulated GEMMs on row-shifted views for stride 1, col2im
    otherwise (module docstring).

    Reference: LeCun et al. 1998 (Proc. IEEE), "Gradient-based learning applied to document recognition";
    Chellapilla, Puri & Simard 2006 (im2col); PyTorch torch/nn/modules/conv.py.
    Backward: derivations/layers_backward.md#conv2d.
    """
    out, cache = _conv2d(x, w, b, stride, padding)
    return np.ascontiguousarray(out), cache + (True,)


def conv2d_forward_strided(x, w, b, *, stride=1, padding=0):
    """:func:`conv2d_forward` without the final copy to a C-contiguous array: ``out`` (and the backward's
    ``dx``) is an (N, F, Ho, Wo) view of the GEMM result, with channels-last strides (``dx`` has
    channel-major ones on the few-channel path).  Same values, same cache protocol (:func:`conv2d_backward`,
    :func:`conv2d_param_grads`).

    This is what :class:`refssl.nn.Conv2d` calls: the next layers (ReLU, pooling, batch norm, ...) accept
    any strides and ReLU and max-pool keep them, so a network's activations stay in the layout the
    convolution produced and no layer transposes them.  Values, shapes and dtypes are those of
    :func:`conv2d_forward`; only ``out.flags.c_contiguous`` differs.
    """
    out, cache = _conv2d(x, w, b, stride, padding)
    return out, cache + (False,)


def conv2d_backward(cache, grad_out):
    """dw = g_mat^T cols; db = sum g; dx by shifted rows (stride 1) or col2im, cropped by the padding."""
    return _conv2d_grads(cache, grad_out, need_dx=True)


def conv2d_param_grads(cache, grad_out):
    """(dw, db) only: the backward of a first layer, whose input (the images) needs no gradient.

    Skips the input-gradient GEMMs, about half of the backward cost.
    """
    return _conv2d_grads(cache, grad_out, need_dx=False)[1:]


def _conv2d_grads(cache, grad_out, need_dx):
    layout, xp, w, xshape, stride, padding, has_b, contiguous = cache
    n, c, h, wd = xshape
    f, _, kh, kw = w.shape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    m, k = ho * wo, kh * kw * c
    g = upstream(grad_out, (n, f, ho, wo), w.dtype)
    gmat = _channels_last_rows(g)
    channel_major = layout == "channel-major"
    width = k + has_b  # the ones column of the columns gives db as the last row of dW
    blocks = _block_list(layout, xp, kh, kw, ho, wo, has_b)
    # One partial dW per block of images, summed in block order at the end: the result does not depend on
    # how the blocks were spread over the threads.
    partial = [None] * len(blocks)
    index = {blk: i for i, blk in enumerate(blocks)}

    def part(own):
        # Stacked matmuls (a GEMM per piece, the loop in numpy), the pieces' products summed in order.
        if channel_major:
            cols = _PlaneColumns(xp, kh, kw, stride, ho, wo, has_b, own)
            for s, e in own:  # cols_i^T (K, Ho*Wo) times g_i (Ho*Wo, F) for each image i
                gb = gmat[s * m:e * m].reshape(e - s, m, f)
                partial[index[s, e]] = np.matmul(cols.images(s, e), gb).sum(axis=0)
        else:
            cols, step = _Columns(xp, kh, kw, stride, ho, wo, has_b, own), _direct_rows(width, f)
            for s, e in own:
                blk, gb = cols.rows(s, e), gmat[s * m:e * m]
                q = len(blk) // step * step
                acc = np.matmul(blk[:q].reshape(-1, step, width).transpose(0, 2, 1),
                                gb[:q].reshape(-1, step, f)).sum(axis=0)
                acc += blk[q:].T @ gb[q:]
                partial[index[s, e]] = acc

    _over_blocks(part, blocks, n * m * width)
    dwm = partial[0]
    for acc in partial[1:]:
        dwm += acc
    dw = np.ascontiguousarray(dwm[:k].reshape(kh, kw, c, f).transpose(3, 2, 0, 1))
    db = dwm[k].copy() if has_b else None
    if not need_dx:
        return None, dw, db
    if stride == 1 and not channel_major:
        dx = _ShiftedRowsDx(gmat, w, xshape, padding).dx()
    elif channel_major:
        wm = w.transpose(2, 3, 1, 0).reshape(k, f)  # rows in the (p, q, c) order
        dcols = (wm @ gmat.T).reshape(kh, kw, c, n, ho, wo)
        dxp = np.zeros((c, n, h + 2 * padding, wd + 2 * padding), dtype=w.dtype)
        for p, q, plane in _cm_planes(dxp, kh, kw, stride, ho, wo):
            plane += dcols[p, q]
        dx = dxp[:, :, padding:padding + h, padding:padding + wd].transpose(1, 0, 2, 3)
    else:
        # d cols = gmat @ wmat, computed per kernel offset so that col2im reads contiguous blocks.
        w_offsets = w.transpose(2, 3, 0, 1).reshape(kh * kw, f, c)  # (KH*KW, F, C)
        dxp = _col2im(_offset_gemm(gmat, w_offsets, kh, kw, n, ho, wo), h + 2 * padding, wd + 2 * padding,
                      stride)
        dx = dxp[:, padding:padding + h, padding:padding + wd, :].transpose(0, 3, 1, 2)
    return (np.ascontiguousarray(dx) if contiguous else dx), dw, db


def _conv_example(rng, dtype=np.float64):
    n, c, f = (int(v) for v in rng.integers(1, 4, size=3))
    k = int(rng.integers(1, 4))
    stride, padding = int(rng.integers(1, 3)), int(rng.integers(0, 2))
    h, wd = (int(v) for v in rng.integers(max(k - 2 * padding, 1), 6, size=2))
    x = rng.standard_normal((n, c, h, wd)).astype(dtype)
    w = (rng.standard_normal((f, c, k, k)) / np.sqrt(c * k * k)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    return (x, w, b), {"stride": stride, "padding": padding}


register(
    "conv2d",
    forward=conv2d_forward,
    backward=conv2d_backward,
    example=_conv_example,
    differentiable=(0, 1, 2),
    reference="LeCun et al. 1998 (Proc. IEEE 86(11)); Chellapilla et al. 2006 (im2col); "
              "PyTorch torch/nn/modules/conv.py (Conv2d)",
    derivation="derivations/layers_backward.md#conv2d",
)


def conv_transpose2d_forward(x, w, b, *, stride=1, padding=0):
    """Transposed 2-D convolution (the adjoint of :func:`conv2d_forward` in x), NCHW.

        out[n, o, :, :] = b[o] + crop_padding( sum_{c, p, q} x[n, c, i, j] * w[c, o, p, q]
                                               placed at row stride*i + p, column stride*j + q )

    i.e. every input pixel scatters a weighted KH x KW kernel into the output, with stride ``stride``,
    and ``padding`` rows/columns are cropped from each side.
    Shapes: x (N, C_in, H, W), w (C_in, C_out, KH, KW), b (C_out,) or ``None`` -> out (N, C_out, Ho, Wo)
    with Ho = (H - 1)*stride - 2*padding + KH (likewise Wo).  PyTorch ``nn.ConvTranspose2d`` layout and
    semantics with output_padding 0, dilation 1, groups 1.  With b = None,
    <conv2d(y; w), x> = <y, conv_transpose2d(x; w)> for the same w, stride and padding.

    Reference: Zeiler et al. 2010 (CVPR), "Deconvolutional networks"; Dumoulin & Visin 2016,
    arXiv 1603.07285 (ch. 4); PyTorch torch/nn/modules/conv.py (ConvTranspose2d).
    Backward: derivations/layers_backward.md#conv_transpose2d.
    """
    V.float_array(x, "x", ndim=4, shape_doc="(N, C_in, H, W)")
    V.float_array(w, "w", ndim=4, shape_doc="(C_in, C_out, KH, KW)")
    V.same_dtype([x, w], ["x", "w"])
    stride, padding = _check_conv_hyper(stride, padding)
    n, c, h, wd = x.shape
    cw, o, kh, kw = w.shape
    if cw != c:
        raise ValueError(f"w must have shape (C_in, C_out, KH, KW) with C_in = x.shape[1] = {c}, "
                         f"got shape {w.shape}")
    hp, wp = (h - 1) * stride + kh, (wd - 1) * stride + kw
    if hp - 2 * padding < 1 or wp - 2 * padding < 1:
        raise ValueError(f"padding={padding} crops the whole {hp}x{wp} output of x and w")
    if b is not None:
        param(b, "b", (o,), "(C_out,)", x)
    xmat = x.transpose(0, 2, 3, 1).reshape(n * h * wd, c)
    wmat = w.transpose(0, 2, 3, 1).reshape(c, kh * kw * o)  # rows: input channel; cols: (p, q, o)
    outp = _col2im(_offset_gemm(xmat, w.transpose(2, 3, 0, 1).reshape(kh * kw, c, o), kh, kw, n, h, wd),
                   hp, wp, stride)
    out = outp[:, padding:hp - padding, padding:wp - padding, :]
    if b is not None:
        out = out + b
    out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    return out, (xmat, wmat, x.shape, w.shape, stride, padding, b is not None)


def conv_transpose2d_backward(cache, grad_out):
    """dx = im2col(pad(g)) wmat^T (a conv2d of g); dw = xmat^T im2col(pad(g)); db = sum g."""
    xmat, wmat, xshape, wshape, stride, padding, has_b = cache
    n, c, h, wd = xshape
    _, o, kh, kw = wshape
    hp, wp = (h - 1) * stride + kh, (wd - 1) * stride + kw
    g = upstream(grad_out, (n, o, hp - 2 * padding, wp - 2 * padding), xmat.dtype)
    gp = _nhwc_padded(g, padding)
    gcols = _windows(gp, kh, kw, stride, h, wd).reshape(n * h * wd, kh * kw * o)
    dx = (gcols @ wmat.T).reshape(n, h, wd, c).transpose(0, 3, 1, 2)
    dw = (xmat.T @ gcols).reshape(c, kh, kw, o).transpose(0, 3, 1, 2)
    return (np.ascontiguousarray(dx), np.ascontiguousarray(dw), (g.sum(axis=(0, 2, 3)) if has_b else None))


def _convt_example(rng, dtype=np.float64):
    n, c, o = (int(v) for v in rng.integers(1, 4, size=3))
    k = int(rng.integers(1, 4))
    stride, padding = int(rng.integers(1, 3)), int(rng.integers(0, 2))
    if k <= 2 * padding:
        padding = 0
    h, wd = (int(v) for v in rng.integers(1 + padding, 5, size=2))  # output at least 1x1 after cropping
    x = rng.standard_normal((n, c, h, wd)).astype(dtype)
    w = (rng.standard_normal((c, o, k, k)) / np.sqrt(c * k * k)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    return (x, w, b), {"stride": stride, "padding": padding}


register(
    "conv_transpose2d",
    forward=conv_transpose2d_forward,
    backward=conv_transpose2d_backward,
    example=_convt_example,
    differentiable=(0, 1, 2),
    reference="Zeiler et al. 2010 (CVPR); Dumoulin & Visin 2016, arXiv 1603.07285; "
              "PyTorch torch/nn/modules/conv.py (ConvTranspose2d)",
    derivation="derivations/layers_backward.md#conv_transpose2d",
)
