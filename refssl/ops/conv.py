"""2-D convolution and its adjoint, the transposed convolution (NCHW at the interface).

Stride 1 (every convolution of the CNN encoder) uses the *shifted-rows* formulation: the zero-padded input
is stored channels-last and flattened to an (N*Hp*Wp, C) matrix ``xf`` whose row r is padded pixel r.  The
window of the output pixel whose top-left corner is padded pixel r covers rows r + p*Wp + q of ``xf``, so

    out[r] = sum_{p, q} xf[r + p*Wp + q] @ W[p, q]          (W[p, q] the (C, F) weights at offset (p, q))

is a sum of KH*KW GEMMs on *row-shifted views* of one matrix: no im2col copy.  Rows r whose window runs off
the right or bottom edge (or into the next image) are computed and discarded; the cost is the padded/valid
area ratio.  The KW offsets of one kernel row are merged into one GEMM with K = KW*C by a single KW-times
copy ``xk`` (row r holds pixels r .. r+KW-1), leaving KH GEMMs, accumulated in place by BLAS (beta = 1,
``scipy.linalg.blas``: numpy's matmul cannot accumulate).  The backward is the same structure: dW[p] =
xk_p^T g and dx = sum_{p,q} (row-shift by p*Wp + q of) g @ W[p, q]^T.

Other strides use im2col: the NHWC window gather is a strided view (``as_strided``, no copy) that one
``reshape`` turns into the column matrix, and the GEMM is a single ``@``; the scatter-add that inverts
im2col (col2im) loops over the KH*KW kernel offsets -- never over samples or pixels.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided
from scipy.linalg import blas as _blas

from .. import validation as V
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
    """NCHW -> zero-padded NHWC copy (one pass)."""
    n, c, h, w = x.shape
    xp = np.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=x.dtype)
    xp[:, padding:padding + h, padding:padding + w, :] = x.transpose(0, 2, 3, 1)
    return xp


def _check_conv_hyper(stride, padding):
    return V.positive_int(stride, "stride"), nonneg_int(padding, "padding")


_GEMM = {np.dtype(np.float32): _blas.sgemm, np.dtype(np.float64): _blas.dgemm}


def _blas_operand(m):
    """(array, trans) such that BLAS (column-major) reads ``m^T`` from it without a copy."""
    if m.flags.f_contiguous and not m.flags.c_contiguous:
        return m, 1  # m^T is C-ordered, i.e. m itself seen column-major and transposed
    return m.T, 0


def _gemm_into(c, a, b, beta):
    """c <- a @ b + beta * c in place; c is C-contiguous (e.g. a block of rows of a C-contiguous matrix).

    BLAS is column-major, so it is asked for c^T = b^T a^T: the transposes of C-ordered arrays are
    Fortran-ordered views, and an operand given as the transpose of a C-ordered array is passed with the
    transpose flag instead, so nothing is copied.  With beta = 0 the old content of c is never read (BLAS
    contract), so c may be uninitialised.
    """
    (bt, tb), (at, ta) = _blas_operand(b), _blas_operand(a)
    r = _GEMM[c.dtype](1.0, bt, at, beta=beta, c=c.T, trans_a=tb, trans_b=ta, overwrite_c=True)
    if r.ctypes.data != c.ctypes.data:  # f2py had to work on a copy of c: write the result back
        c[...] = r.T


def _fill_rows(out, row):
    """out[i] = row for every row of the C-contiguous matrix ``out``, by doubling contiguous copies
    (a broadcast assignment loops over short rows, at several times the cost)."""
    out[:1] = row
    done = 1
    while done < len(out):
        k = min(done, len(out) - done)
        out[done:done + k] = out[:k]
        done += k


def _s1_geometry(xshape, wshape, padding):
    """Sizes of the shifted-rows formulation (stride 1): padded size, output size, rows, valid rows."""
    n, c, h, wd = xshape
    f, _, kh, kw = wshape
    hp, wp = h + 2 * padding, wd + 2 * padding
    rows = n * hp * wp
    # Rows >= valid have a window that runs past the last row of the flattened image; every output pixel
    # (n, i < Ho, j < Wo) sits at a row below it.
    return hp, wp, hp - kh + 1, wp - kw + 1, rows, rows - (kh - 1) * wp - (kw - 1)


def _conv2d_s1_forward(x, w, b, padding):
    """Stride-1 convolution by KH accumulated GEMMs on row-shifted views (see the module docstring).

    Returns the output as an (N, F, Ho, Wo) *view* of the padded channels-last result (strides of an
    (N, Hp, Wp, F) array): no copy out of the padded layout."""
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    hp, wp, ho, wo, rows, valid = _s1_geometry(x.shape, w.shape, padding)
    xp = np.zeros((n, hp, wp, c), dtype=x.dtype)
    xp[:, padding:padding + h, padding:padding + wd, :] = x.transpose(0, 2, 3, 1)
    xf = xp.reshape(rows, c)
    # xk[r] = xf[r : r + KW] flattened (q-major, then channel): the KW offsets of a kernel row in one GEMM.
    xk = xf if kw == 1 else as_strided(xf, (rows - kw + 1, kw * c), xf.strides, writeable=False).copy()
    wk = w.transpose(2, 3, 1, 0).reshape(kh, kw * c, f)  # wk[p, q*C + c, f] = w[f, c, p, q]
    out = np.empty((rows, f), dtype=x.dtype)
    if b is not None:
        _fill_rows(out[:valid], b)  # the bias as the GEMMs' starting value: no extra pass over the output
    for p in range(kh):
        _gemm_into(out[:valid], xk[p * wp:p * wp + valid], wk[p], 0.0 if p == 0 and b is None else 1.0)
    y = out.reshape(n, hp, wp, f)[:, :ho, :wo, :].transpose(0, 3, 1, 2)
    return y, ("s1", xk, w, x.shape, padding, b is not None)


def _conv2d_s1_grads(cache, grad_out, need_dx):
    """dW[p] = xk_p^T g, db = sum g, dx = crop(sum_{p,q} shift_{p*Wp+q}(g @ W[p, q]^T)).

    dx is returned as a view of the padded channels-last gradient, like the forward's output."""
    _, xk, w, xshape, padding, has_b = cache
    n, c, h, wd = xshape
    f, _, kh, kw = w.shape
    hp, wp, ho, wo, rows, valid = _s1_geometry(xshape, w.shape, padding)
    g = upstream(grad_out, (n, f, ho, wo), xk.dtype)
    # g in the padded row layout of the output: row n*Hp*Wp + i*Wp + j, zero where no output pixel is.
    gf = np.empty((rows, f), dtype=xk.dtype)
    g4 = gf.reshape(n, hp, wp, f)
    g4[:, :ho, :wo, :] = g.transpose(0, 2, 3, 1)
    g4[:, ho:] = 0
    g4[:, :ho, wo:] = 0
    gv = gf[:valid]
    dwk = np.empty((kh, kw * c, f), dtype=xk.dtype)
    for p in range(kh):
        np.matmul(xk[p * wp:p * wp + valid].T, gv, out=dwk[p])
    dw = np.ascontiguousarray(dwk.reshape(kh, kw, c, f).transpose(3, 2, 0, 1))
    db = (np.ones(valid, dtype=gv.dtype) @ gv) if has_b else None  # zero rows add nothing; BLAS sums
    if not need_dx:
        return None, dw, db
    wt = np.ascontiguousarray(w.transpose(2, 3, 0, 1))  # wt[p, q] = W[p, q]^T, (F, C)
    dxp = np.zeros((rows, c), dtype=xk.dtype)
    for p in range(kh):
        for q in range(kw):
            s = p * wp + q
            _gemm_into(dxp[s:s + valid], gv, wt[p, q], 1.0)
    dx = dxp.reshape(n, hp, wp, c)[:, padding:padding + h, padding:padding + wd, :].transpose(0, 3, 1, 2)
    return dx, dw, db


def _conv2d(x, w, b, stride, padding):
    """Checked conv2d; the output may be a strided view (stride-1 path)."""
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
    if stride == 1:
        return _conv2d_s1_forward(x, w, b, padding)
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    xp = _nhwc_padded(x, padding)
    cols = _windows(xp, kh, kw, stride, ho, wo).reshape(n * ho * wo, kh * kw * c)
    wmat = w.transpose(0, 2, 3, 1).reshape(f, kh * kw * c)  # (F, KH*KW*C), matches the column order
    out = cols @ wmat.T
    if b is not None:
        out += b
    out = np.ascontiguousarray(out.reshape(n, ho, wo, f).transpose(0, 3, 1, 2))
    return out, ("im2col", cols, wmat, x.shape, w.shape, stride, padding, b is not None)


def conv2d_forward(x, w, b, *, stride=1, padding=0):
    """2-D cross-correlation (what deep-learning libraries call convolution), NCHW.

        out[n, f, i, j] = b[f] + sum_{c, p, q} w[f, c, p, q] * xpad[n, c, stride*i + p, stride*j + q]

    with xpad the input zero-padded by ``padding`` on each spatial side.
    Shapes: x (N, C, H, W), w (F, C, KH, KW), b (F,) or ``None`` -> out (N, F, Ho, Wo) with
    Ho = (H + 2*padding - KH) // stride + 1 (likewise Wo); PyTorch ``nn.Conv2d`` layout and semantics
    (dilation 1, groups 1, zero padding).  out and the backward's dx are C-contiguous NCHW arrays
    (:func:`conv2d_forward_strided` skips that final copy).

    Stride 1: the shifted-rows formulation of the module docstring, KH GEMMs with K = KW*C accumulated in
    place on row-shifted views of the padded channels-last input; the backward reuses the same views
    (KH GEMMs for the weights, KH*KW for the input gradient, accumulated in place), no col2im.
    Other strides: im2col, an (N*Ho*Wo, KH*KW*C) column matrix (strided view + one copy) times the
    reshaped weights, a single GEMM; the input gradient is computed per kernel offset and added back by
    col2im.

    Reference: LeCun et al. 1998 (Proc. IEEE), "Gradient-based learning applied to document recognition";
    Chellapilla, Puri & Simard 2006 (im2col); PyTorch torch/nn/modules/conv.py.
    Backward: derivations/layers_backward.md#conv2d.
    """
    out, cache = _conv2d(x, w, b, stride, padding)
    return np.ascontiguousarray(out), cache + (True,)


def conv2d_forward_strided(x, w, b, *, stride=1, padding=0):
    """:func:`conv2d_forward` without the final copy to a C-contiguous array: ``out`` (and the backward's
    ``dx``) may be an (N, F, Ho, Wo) view with channels-last strides into a padded buffer.  Same values,
    same cache protocol (:func:`conv2d_backward`, :func:`conv2d_param_grads`).

    This is what :class:`refssl.nn.Conv2d` calls: the next layers (ReLU, pooling, batch norm, ...) accept
    any strides, so the network's activations stay channels-last and no layer transposes them.
    """
    out, cache = _conv2d(x, w, b, stride, padding)
    return out, cache + (False,)


def conv2d_backward(cache, grad_out):
    """dw = g_mat^T cols; db = sum g; dx = col2im(g_mat wmat), cropped by the padding."""
    return _conv2d_grads(cache, grad_out, need_dx=True)


def conv2d_param_grads(cache, grad_out):
    """(dw, db) only: the backward of a first layer, whose input (the images) needs no gradient.

    Skips the input-gradient GEMMs, about half of the backward cost.
    """
    return _conv2d_grads(cache, grad_out, need_dx=False)[1:]


def _conv2d_grads(cache, grad_out, need_dx):
    *cache, contiguous = cache
    if cache[0] == "s1":
        dx, dw, db = _conv2d_s1_grads(cache, grad_out, need_dx)
        return (np.ascontiguousarray(dx) if contiguous and dx is not None else dx), dw, db
    _, cols, wmat, xshape, wshape, stride, padding, has_b = cache
    n, c, h, wd = xshape
    f, _, kh, kw = wshape
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    g = upstream(grad_out, (n, f, ho, wo), cols.dtype)
    gmat = g.transpose(0, 2, 3, 1).reshape(n * ho * wo, f)
    dw = np.ascontiguousarray((gmat.T @ cols).reshape(f, kh, kw, c).transpose(0, 3, 1, 2))
    db = g.sum(axis=(0, 2, 3)) if has_b else None
    if not need_dx:
        return None, dw, db
    # d cols = gmat @ wmat, computed per kernel offset so that col2im reads contiguous blocks.
    w_offsets = wmat.reshape(f, kh * kw, c).transpose(1, 0, 2)  # (KH*KW, F, C)
    dxp = _col2im(_offset_gemm(gmat, w_offsets, kh, kw, n, ho, wo), h + 2 * padding, wd + 2 * padding, stride)
    dx = dxp[:, padding:padding + h, padding:padding + wd, :].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(dx), dw, db


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
