"""CLIP's symmetric contrastive loss with a learnable logit scale."""

from __future__ import annotations

import math

import numpy as np

from .. import validation as V
from ..numerics import logsumexp
from ..registry import register
from ._positive_ce import positive_ce
from ._tiled_contrastive import clip_tiled_backward, clip_tiled_forward
from .normalize import l2_normalize_backward, l2_normalize_forward

__all__ = ["clip_forward", "clip_backward", "clamp_logit_scale", "LOGIT_SCALE_INIT", "LOGIT_SCALE_MAX"]

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # ~2.6593: the scale starts at ~14.29
LOGIT_SCALE_MAX = math.log(100.0)  # ~4.6052: logits are never scaled by more than 100


def clip_forward(img, txt, logit_scale, *, block_size=None):
    """Symmetric CLIP loss.

    With row-normalised embeddings I = img/||img||, T = txt/||txt|| and the
    learnable scalar s = ``logit_scale`` (the log of the multiplier, i.e.
    log(1/tau))::

        Lambda = exp(s) I T^T                           (N x N)
        L = 1/2 [ CE(Lambda, id) + CE(Lambda^T, id) ]

    with CE the row-mean softmax cross-entropy and id = (0, ..., N-1).
    Shapes: img, txt (N, D); logit_scale a 0-d array of the same dtype ->
    scalar.  All three inputs get gradients; dL/ds = sum(G * Lambda) with
    G = dL/dLambda.  After an optimiser step apply :func:`clamp_logit_scale`
    (a projection outside the graph, as open_clip does).  logit_scale must be
    at most log(max_float / 4N) (about 88 - log 4N in float32), beyond which
    the logits' sums overflow.  Each cross-entropy row is evaluated without
    cancellation near a zero loss (ops/_positive_ce.py).

    ``block_size=b`` (a positive int; default None: the dense path) computes
    the same loss and gradients without ever holding the N x N logits
    (Inf-CL, arXiv 2410.17243): the logits of b images at a time against all
    texts, online (max-shifted) log-sum-exps of every row and column in
    forward, the same logits recomputed from them in backward.  Memory
    O(N b + N d); any b works (1, a non-divisor of N, b >= N).  Same
    cancellation-free form (ops/_tiled_contrastive.py).

    Reference: Radford et al. 2021, arXiv 2103.00020; mlfoundations/open_clip
    src/open_clip/loss.py (ClipLoss) and src/open_clip_train/train.py (clamp).
    Backward: derivations/contrastive_backward.md#clip; tiled:
    derivations/contrastive_backward.md#tiled-info_nce-and-clip.
    """
    V.float_array(img, "img", ndim=2, shape_doc="(N, D)")
    V.float_array(txt, "txt", ndim=2, shape_doc="(N, D)")
    V.same_shape([img, txt], ["img", "txt"])
    logit_scale = V.scalar_array(logit_scale, "logit_scale")
    V.same_dtype([img, txt, logit_scale], ["img", "txt", "logit_scale"])
    block = None if block_size is None else V.positive_int(block_size, "block_size")
    dt = img.dtype
    n = img.shape[0]
    # |logits| <= exp(s); the loss sums 2N row terms each below 2 exp(s) + log N, which stays finite when
    # exp(s) <= max / (4N).  (exp(s) itself being finite is not enough: s = 88 in float32 gave NaN.)
    limit = math.log(float(np.finfo(dt).max) / (4 * n))
    if not float(logit_scale) <= limit:
        raise ValueError(f"logit_scale must be <= log(max_{dt} / (4N)) = {limit:.4g} for N = {n} rows (stricter "
                         f"than 'exp(logit_scale) is finite': the sums of the logits must be finite too), "
                         f"got {float(logit_scale)}")
    scale = np.exp(logit_scale)
    ui, ci = l2_normalize_forward(img)
    ut, ct = l2_normalize_forward(txt)
    if block is not None:
        ce_rows, ce_cols, lse_rows, lse_cols, pos = clip_tiled_forward(ui, ut, scale, block)
        rest = (lse_rows, lse_cols, pos, block)
    else:
        logits = scale * (ui @ ut.T)
        lse_rows = logsumexp(logits, axis=1, keepdims=True)
        lse_cols = logsumexp(logits, axis=0, keepdims=True)
        diag = np.diagonal(logits)
        p_rows = np.exp(logits - lse_rows)  # softmax over texts for each image
        p_cols = np.exp(logits - lse_cols)  # softmax over images for each text
        ids = np.arange(n)
        ce_rows = positive_ce(p_rows, ids, lse_rows[:, 0] - diag)  # cancellation-free: ops/_positive_ce.py
        ce_cols = positive_ce(p_cols.T, ids, lse_cols[0] - diag)
        rest = (logits, p_rows, p_cols)
    loss = 0.5 * (np.mean(ce_rows, dtype=np.float64) + np.mean(ce_cols, dtype=np.float64))
    # G_ii = (P_rows,ii - 1) + (P_cols,ii - 1) with P_ii = exp(-ce_i): no cancellation near a zero loss
    at_diag = np.expm1(-ce_rows) + np.expm1(-ce_cols)
    kind = "dense" if block is None else "tiled"
    return dt.type(loss), (kind, ui, ut, ci, ct, scale, at_diag, rest)


def clip_backward(cache, grad_out):
    """G = g (P_rows + P_cols - 2 I) / (2N); dI = e^s G T, dT = e^s G^T I, ds = sum(G * Lambda).

    The diagonal of G comes from the cache (written without cancellation), and ds is summed as
    g/(2N) sum_{i != j} [P_rows,ij (Lambda_ij - Lambda_ii) + P_cols,ij (Lambda_ij - Lambda_jj)] (equal,
    since the rows of P_rows and the columns of P_cols sum to 1), whose terms share a sign near a zero loss.
    """
    kind, ui, ut, ci, ct, scale, at_diag, rest = cache
    n, dt = ui.shape[0], ui.dtype
    go = float(V.grad_out(grad_out, (), dt))
    half = 0.5 * go / n
    if kind == "tiled":
        g_img, g_txt, d_scale = clip_tiled_backward(ui, ut, scale, *rest, at_diag, half)
    else:
        logits, p_rows, p_cols = rest
        diag = np.diagonal(logits)
        d_scale = half * (float(np.sum(p_rows * (logits - diag[:, None])))
                          + float(np.sum(p_cols * (logits - diag[None, :]))))
        g = p_rows + p_cols
        g[np.diag_indices(n)] = at_diag
        g *= dt.type(half) * scale
        g_img, g_txt = g @ ut, g.T @ ui
    return (l2_normalize_backward(ci, g_img)[0], l2_normalize_backward(ct, g_txt)[0],
            np.asarray(d_scale, dtype=dt))


def clamp_logit_scale(logit_scale, *, min_value=0.0, max_value=LOGIT_SCALE_MAX):
    """Projection applied after each optimiser step: s <- min(max(s, 0), ln 100).

    Returns a new 0-d array (the input is not modified).  It is not part of the
    differentiable graph: the clamp acts on the parameter, as in open_clip's
    training loop, so the multiplier exp(s) stays in [1, 100].
    """
    logit_scale = V.scalar_array(logit_scale, "logit_scale")
    lo, hi = float(min_value), float(max_value)
    if lo > hi:
        raise ValueError(f"min_value must be <= max_value, got {lo} > {hi}")
    return np.asarray(np.clip(logit_scale, lo, hi), dtype=logit_scale.dtype)  # np.clip of 0-d gives a scalar


def _example(rng, dtype=np.float64):
    n, d = rng.integers(1, 7), rng.integers(2, 9)
    img = rng.standard_normal((n, d))
    txt = img + rng.standard_normal((n, d))
    s = np.asarray(rng.uniform(0.0, LOGIT_SCALE_MAX))
    kwargs = {"block_size": int(rng.integers(1, n + 2))} if rng.random() < 0.5 else {}  # half tiled
    return (img.astype(dtype), txt.astype(dtype), s.astype(dtype)), kwargs


register(
    "clip",
    forward=clip_forward,
    backward=clip_backward,
    example=_example,
    differentiable=(0, 1, 2),
    reference="Radford et al. 2021, arXiv 2103.00020; mlfoundations/open_clip src/open_clip/loss.py (ClipLoss)",
    derivation="derivations/contrastive_backward.md#clip",
)
