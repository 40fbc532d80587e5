"""Masked image modelling: MAE, BEiT and BEiT v2 (VQ-KD).

Ops (registered): ``patchify``, ``gather_tokens``, ``mae_loss``, ``masked_token_ce``,
``cosine_distill``, ``vector_quantize``.  Plain helpers: :func:`unpatchify`,
:func:`norm_pix_target`, :func:`nearest_code`, and the cache accessors
:func:`vector_quantize_indices` and :func:`vector_quantize_normalized_input`.

The masks come from :mod:`refssl.masking` (MAE random masking, BEiT block
masking) and the VQ-KD codebook is updated by :func:`refssl.state.vq_ema_update`.
Derivations: derivations/masked_modelling.md.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .. import validation as V
from ..numerics import logsumexp, row_normalize_backward
from ..registry import register
from ._layer_checks import upstream

__all__ = [
    "patchify_forward", "patchify_backward", "unpatchify",
    "gather_tokens_forward", "gather_tokens_backward",
    "mae_loss_forward", "mae_loss_backward", "norm_pix_target", "NORM_PIX_EPS",
    "masked_token_ce_forward", "masked_token_ce_backward",
    "cosine_distill_forward", "cosine_distill_backward",
    "vector_quantize_forward", "vector_quantize_backward", "vector_quantize_indices",
    "vector_quantize_normalized_input", "nearest_code", "scatter_add_rows",
]

NORM_PIX_EPS = 1e-6  # added to the unbiased per-patch variance (facebookresearch/mae models_mae.py)


# -- small private helpers ---------------------------------------------------------------------


def _fresh(a: np.ndarray, src: np.ndarray) -> np.ndarray:
    """``a`` itself unless it is a view into ``src`` (reshapes of a transpose are views for unit axes)."""
    return a.copy() if np.may_share_memory(a, src) else a


def _int_array(a, name: str, shape: tuple, shape_doc: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy integer array, got {type(a).__name__}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_doc} = {tuple(shape)}, got shape {a.shape}")
    return a


def _bool_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def scatter_add_rows(index: np.ndarray, rows: np.ndarray, n_out: int) -> np.ndarray:
    """out[index[i]] += rows[i] for a flat index (duplicates accumulate); out has n_out rows.

    A sparse (n_out x len(index)) 0/1 matrix times ``rows``: about as fast as a plain
    assignment and 5-10x faster than ``np.add.at`` at ViT sizes (benchmarks/bench_masked_modelling.py).
    """
    s = sp.csr_matrix((np.ones(index.size, dtype=rows.dtype), (index, np.arange(index.size))),
                      shape=(n_out, index.size))
    return np.asarray(s @ rows)


def _row_norms(x: np.ndarray, name: str) -> np.ndarray:
    """||x|| along the last axis (keepdims); a zero row is an error (its direction is undefined)."""
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    if not np.all(norm > 0):
        bad = np.unravel_index(int(np.argmin(norm[..., 0])), norm.shape[:-1]) if norm.ndim > 1 else ()
        raise ValueError(f"{name} has a row of zero norm at index {bad}: its direction (and the cosine) "
                         "is undefined")
    return norm


# -- patchify -------------------------------------------------------------------------------------


def patchify_forward(images, *, patch):
    """Cut images into non-overlapping patches, flattened in the MAE order.

        (N, C, H, W) -> (N, C, h, p, w, p) -> (N, h, w, p, p, C) -> (N, h*w, p*p*C),   h = H/p, w = W/p

    out[n, i*w + j, (a*p + b)*C + c] = images[n, c, i*p + a, j*p + b]: patches row-major over the
    grid, inside a patch (row a, column b, channel c).  A permutation of the entries, so the backward is
    the inverse permutation (:func:`unpatchify` of the upstream gradient).  H and W must be divisible
    by ``patch`` (positive int).  Note that a conv patch embedding flattens its kernel as (c, a, b),
    not in this order.

    Reference: He et al. 2021, arXiv 2111.06377; facebookresearch/mae models_mae.py (patchify).
    Backward: derivations/masked_modelling.md#patchify.
    """
    V.float_array(images, "images", ndim=4, shape_doc="(N, C, H, W)")
    p = V.positive_int(patch, "patch")
    n, c, hh, ww = images.shape
    if hh % p or ww % p:
        raise ValueError(f"patch={p} must divide the image height and width, got H={hh}, W={ww}")
    h, w = hh // p, ww // p
    out = images.reshape(n, c, h, p, w, p).transpose(0, 2, 4, 3, 5, 1).reshape(n, h * w, p * p * c)
    return _fresh(out, images), (images.shape, p, images.dtype)


def patchify_backward(cache, grad_out):
    """dimages = unpatchify(grad_out): the inverse permutation."""
    (n, c, hh, ww), p, dtype = cache
    h, w = hh // p, ww // p
    g = upstream(grad_out, (n, h * w, p * p * c), dtype)
    return (g.reshape(n, h, w, p, p, c).transpose(0, 5, 1, 3, 2, 4).reshape(n, c, hh, ww),)


def unpatchify(x, *, patch, channels, grid=None):
    """Inverse of :func:`patchify_forward`: (N, L, p*p*C) -> (N, C, h*p, w*p).

    ``grid = (h, w)`` with h*w = L; default a square grid (ValueError if L is not a square).
    Used to show MAE reconstructions (undo ``norm_pix`` first: :func:`norm_pix_target`).
    Reference: facebookresearch/mae models_mae.py (unpatchify).
    """
    V.float_array(x, "x", ndim=3, shape_doc="(N, L, patch**2 * channels)")
    p = V.positive_int(patch, "patch")
    c = V.positive_int(channels, "channels")
    n, length, width = x.shape
    if width != p * p * c:
        raise ValueError(f"x must have shape (N, L, patch**2 * channels) = (N, L, {p * p * c}) for "
                         f"patch={p}, channels={c}, got shape {x.shape}")
    if grid is None:
        h = int(np.sqrt(length) + 0.5)
        if h * h != length:
            raise ValueError(f"x has L={length} patches, not a square number: pass grid=(h, w)")
        w = h
    else:
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise TypeError(f"grid must be a pair (h, w) of positive ints, got {grid!r}")
        h, w = (V.positive_int(v, "grid") for v in grid)
        if h * w != length:
            raise ValueError(f"grid={tuple(grid)} must have h*w equal to the number of patches L={length}")
    out = x.reshape(n, h, w, p, p, c).transpose(0, 5, 1, 3, 2, 4).reshape(n, c, h * p, w * p)
    return _fresh(out, x)


def _patchify_example(rng, dtype=np.float64):
    n, c, p = (int(v) for v in rng.integers(1, 4, size=3))
    h, w = (int(v) for v in rng.integers(1, 4, size=2))
    return (rng.standard_normal((n, c, h * p, w * p)).astype(dtype),), {"patch": p}


register(
    "patchify",
    forward=patchify_forward,
    backward=patchify_backward,
    example=_patchify_example,
    differentiable=(0,),
    reference="He et al. 2021, arXiv 2111.06377; facebookresearch/mae models_mae.py (patchify)",
    derivation="derivations/masked_modelling.md#patchify",
)


# -- gather_tokens ------------------------------------------------------------------------------


def gather_tokens_forward(x, ids):
    """Pick tokens per sample by index.

        out[n, k] = x[n, ids[n, k]]

    Shapes: x (N, L, D) float, ids (N, K) integers in [0, L) -> out (N, K, D).  ids may repeat
    (their gradients accumulate) and gets no gradient.  MAE uses it to keep the visible tokens
    (ids_keep) and to unshuffle the decoder tokens (ids_restore); it is ``torch.gather(x, 1,
    ids[..., None].expand(-1, -1, D))``.

    Reference: He et al. 2021, arXiv 2111.06377; facebookresearch/mae models_mae.py
    (random_masking, forward_decoder).  Backward: derivations/masked_modelling.md#gather_tokens.
    """
    V.float_array(x, "x", ndim=3, shape_doc="(N, L, D)")
    n, length, d = x.shape
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"ids must be a numpy integer array, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be an integer array, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.shape[0] != n:
        raise ValueError(f"ids must have shape (N, K) with N = x.shape[0] = {n}, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= length):
        raise ValueError(f"ids must be in [0, L) = [0, {length}), got values in [{ids.min()}, {ids.max()}]")
    flat = (ids.astype(np.intp) + length * np.arange(n, dtype=np.intp)[:, None]).ravel()
    out = x.reshape(n * length, d)[flat].reshape(n, ids.shape[1], d)
    # a permutation-like index (MAE's ids_keep / ids_restore) scatters with a plain assignment
    unique = flat.size == 0 or int(np.bincount(flat, minlength=n * length).max()) <= 1
    return out, (flat, x.shape, x.dtype, unique)


def gather_tokens_backward(cache, grad_out):
    """dx[n, l] = sum_{k: ids[n, k] = l} g[n, k]; ids gets None."""
    flat, (n, length, d), dtype, unique = cache
    g = upstream(grad_out, (n, flat.size // n, d), dtype).reshape(-1, d)
    if unique:
        dx = np.zeros((n * length, d), dtype=dtype)
        dx[flat] = g
    else:
        dx = scatter_add_rows(flat, g, n * length)
    return dx.reshape(n, length, d), None


def _gather_example(rng, dtype=np.float64):
    n, length, k, d = int(rng.integers(1, 4)), int(rng.integers(1, 7)), int(rng.integers(1, 9)), \
        int(rng.integers(1, 5))
    ids = rng.integers(0, length, size=(n, k))  # with replacement: duplicates must accumulate
    return (rng.standard_normal((n, length, d)).astype(dtype), ids), {}


register(
    "gather_tokens",
    forward=gather_tokens_forward,
    backward=gather_tokens_backward,
    example=_gather_example,
    differentiable=(0,),
    reference="He et al. 2021, arXiv 2111.06377; facebookresearch/mae models_mae.py (torch.gather of tokens)",
    derivation="derivations/masked_modelling.md#gather_tokens",
)


# -- mae_loss ---------------------------------------------------------------------------------------


def norm_pix_target(target):
    """MAE's per-patch normalised target: ``(normalised, mean, std)``.

        mean = mean_k t_k,   std = sqrt(Var_u(t) + 1e-6)   (unbiased variance over the last axis),
        normalised = (t - mean) / std

    Shapes: target (..., P) with P >= 2 -> normalised (..., P), mean and std (..., 1).  The target is
    data, so these are constants of the loss.  To show a reconstruction in pixel space undo the
    normalisation: ``pred * std + mean`` (mae issue #190: skipping this makes norm_pix reconstructions
    look wrong).  Reference: facebookresearch/mae models_mae.py (forward_loss, norm_pix_loss).
    """
    V.float_array(target, "target", shape_doc="(..., P)")
    if target.ndim < 1 or target.shape[-1] < 2:
        raise ValueError(f"target must have shape (..., P) with P >= 2 values per patch for the "
                         f"unbiased variance of norm_pix, got shape {target.shape}")
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    std = np.sqrt(var + target.dtype.type(NORM_PIX_EPS))
    return (target - mean) / std, mean, std


def _mae_mask(mask, shape) -> np.ndarray:
    """The MAE mask as bool (True = removed): bool, or float with values exactly 0 and 1."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy bool or float 0/1 array, got {type(mask).__name__}")
    if mask.dtype != np.bool_ and mask.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"mask must be a bool array or a float array of 0/1 (1 = removed), got dtype {mask.dtype}")
    if mask.shape != tuple(shape):
        raise ValueError(f"mask must have shape (N, L) = {tuple(shape)}, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    on = mask == 1
    if not np.all(on | (mask == 0)):
        bad = mask[~(on | (mask == 0))].flat[0]
        raise ValueError(f"a float mask must contain only 0 (visible) and 1 (removed), found {bad}")
    return on


def mae_loss_forward(pred, target, mask, *, norm_pix=False):
    """MAE reconstruction loss: mean squared error per patch, averaged over the removed patches.

        e_nl = 1/P sum_k (pred_nlk - t_nlk)^2,     L = sum_nl m_nl e_nl / sum_nl m_nl

    Shapes: pred, target (N, L, P) (target = ``patchify(images)``), mask (N, L) with 1/True =
    removed (bool, or float 0/1 as in the official code; other values are a ValueError) -> scalar.
    With ``norm_pix=True`` the target is ``norm_pix_target(target)[0]`` (per-patch mean 0,
    std sqrt(Var_u + 1e-6); needs P >= 2).  target and mask get no gradient (slots None): the target
    is data, also its normalisation statistics.  Visible patches carry no loss and no gradient;
    at least one removed patch is required.  Official default norm_pix_loss=False (the pretraining
    recipe turns it on; solo-learn defaults it on).

    Reference: He et al. 2021, arXiv 2111.06377; facebookresearch/mae models_mae.py (forward_loss).
    Backward: derivations/masked_modelling.md#mae_loss.
    """
    V.float_array(pred, "pred", ndim=3, shape_doc="(N, L, P)")
    V.float_array(target, "target", ndim=3, shape_doc="(N, L, P)")
    V.same_shape([pred, target], ["pred", "target"])
    V.same_dtype([pred, target], ["pred", "target"])
    removed = _mae_mask(mask, pred.shape[:2])
    norm_pix = _bool_flag(norm_pix, "norm_pix")
    count = int(np.count_nonzero(removed))
    if count == 0:
        raise ValueError("mask must mark at least one removed patch (1/True); the loss is a mean over "
                         "removed patches")
    if norm_pix:
        if pred.shape[2] < 2:
            raise ValueError(f"norm_pix=True needs P >= 2 values per patch (unbiased variance), got "
                             f"P={pred.shape[2]}")
        target = norm_pix_target(target)[0]
    m = removed.astype(pred.dtype)
    d = pred - target
    e = np.mean(d * d, axis=-1)
    loss = pred.dtype.type(np.sum(e * m) / count)
    return loss, (d, m, count)


def mae_loss_backward(cache, grad_out):
    """dpred = g * 2 m (pred - t) / (P sum m); target and mask get None."""
    d, m, count = cache
    g = upstream(grad_out, (), d.dtype)
    scale = m[..., None] * (g * d.dtype.type(2.0 / (d.shape[2] * count)))
    return d * scale, None, None


def _mae_example(rng, dtype=np.float64):
    n, length, p = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(2, 6))
    mask = rng.random((n, length)) < 0.6
    mask.flat[int(rng.integers(0, mask.size))] = True
    pred = rng.standard_normal((n, length, p)).astype(dtype)
    target = rng.standard_normal((n, length, p)).astype(dtype)
    return (pred, target, mask), {"norm_pix": bool(rng.integers(0, 2))}


register(
    "mae_loss",
    forward=mae_loss_forward,
    backward=mae_loss_backward,
    example=_mae_example,
    differentiable=(0,),
    reference="He et al. 2021, arXiv 2111.06377; facebookresearch/mae models_mae.py (forward_loss)",
    derivation="derivations/masked_modelling.md#mae_loss",
)


# -- masked_token_ce ----------------------------------------------------------------------------


def masked_token_ce_forward(logits, targets, mask):
    """BEiT masked-token prediction: cross-entropy averaged over the masked positions of the batch.

        L = 1/|M| sum_{(n,l) in M} [ logsumexp_v logits_nlv - logits_{n,l,targets_nl} ],   M = {mask = True}

    Shapes: logits (N, L, V) float, targets (N, L) integers (in [0, V) at masked positions; any
    integer elsewhere, ignored), mask (N, L) bool -> scalar.  targets and mask get no gradient.
    At least one masked position is required.  Equals ``F.cross_entropy(logits[mask],
    targets[mask])``; BEiT v2's loss is a plain sum of two such terms (final-layer and
    patch-aggregation heads).

    Reference: Bao et al. 2021, arXiv 2106.08254; Peng et al. 2022, arXiv 2208.06366;
    microsoft/unilm beit/engine_for_pretraining.py, beit2/engine_for_pretraining.py.
    Backward: derivations/masked_modelling.md#masked_token_ce.
    """
    V.float_array(logits, "logits", ndim=3, shape_doc="(N, L, V)")
    n, length, vocab = logits.shape
    _int_array(targets, "targets", (n, length), "(N, L)")
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy bool array, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be a bool array (True = masked), got dtype {mask.dtype}")
    if mask.shape != (n, length):
        raise ValueError(f"mask must have shape (N, L) = {(n, length)}, got shape {mask.shape}")
    count = int(np.count_nonzero(mask))
    if count == 0:
        raise ValueError("mask must mark at least one masked position; the loss is a mean over them")
    t = targets[mask]
    if t.min() < 0 or t.max() >= vocab:
        raise ValueError(f"targets at masked positions must be in [0, V) = [0, {vocab}), got values in "
                         f"[{t.min()}, {t.max()}]")
    rows = logits[mask]  # (|M|, V): only the masked rows are ever exponentiated
    lse = logsumexp(rows, axis=1, keepdims=True)
    loss = np.mean(lse[:, 0] - rows[np.arange(count), t])
    return logits.dtype.type(loss), (rows, lse, t, mask, logits.shape)


def masked_token_ce_backward(cache, grad_out):
    """dlogits = g (softmax - onehot) / |M| on masked rows, 0 on unmasked rows."""
    rows, lse, t, mask, shape = cache
    g = upstream(grad_out, (), rows.dtype)
    d = np.exp(rows - lse)
    d[np.arange(t.size), t] -= 1
    d *= g * rows.dtype.type(1.0 / t.size)
    out = np.zeros(shape, dtype=rows.dtype)
    out[mask] = d
    return out, None, None


def _ce_example(rng, dtype=np.float64):
    n, length, vocab = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(2, 7))
    mask = rng.random((n, length)) < 0.5
    mask.flat[int(rng.integers(0, mask.size))] = True
    targets = rng.integers(0, vocab, size=(n, length))
    targets[~mask] = -100  # ignored (any int), as an ignore_index would be
    return (rng.standard_normal((n, length, vocab)).astype(dtype), targets, mask), {}


register(
    "masked_token_ce",
    forward=masked_token_ce_forward,
    backward=masked_token_ce_backward,
    example=_ce_example,
    differentiable=(0,),
    reference="Bao et al. 2021, arXiv 2106.08254; Peng et al. 2022, arXiv 2208.06366; microsoft/unilm "
              "beit/engine_for_pretraining.py, beit2/engine_for_pretraining.py",
    derivation="derivations/masked_modelling.md#masked_token_ce",
)


# -- cosine_distill -------------------------------------------------------------------------------


def cosine_distill_forward(pred, target):
    """Mean cosine distance to a stop-gradient target (BEiT v2 VQ-KD decoder loss).

        L = 1/R sum_r (1 - cos(pred_r, target_r)),   cos(a, b) = a.b / (||a|| ||b||)

    Shapes: pred, target (..., D), same shape and dtype -> scalar; r runs over all leading positions
    (R = pred.size / D).  target (the teacher feature, CLIP or DINO) gets no gradient.  A zero row in
    pred or target is a ValueError rather than an eps clamp: the official code divides by the plain
    norm, so a zero row would be NaN there.

    Reference: Peng et al. 2022, arXiv 2208.06366; microsoft/unilm beit2/modeling_vqkd.py
    (calculate_rec_loss).  Backward: derivations/masked_modelling.md#cosine_distill.
    """
    V.float_array(pred, "pred", shape_doc="(..., D)")
    V.float_array(target, "target", shape_doc="(..., D) like pred")
    if pred.ndim < 1:
        raise ValueError("pred must have shape (..., D), got a 0-d array")
    V.same_shape([pred, target], ["pred", "target"])
    V.same_dtype([pred, target], ["pred", "target"])
    if pred.shape[-1] < 1:
        raise ValueError(f"pred must have shape (..., D) with D >= 1, got shape {pred.shape}")
    pn = _row_norms(pred, "pred")
    tn = _row_norms(target, "target")
    p, t = pred / pn, target / tn
    cos = np.sum(p * t, axis=-1, keepdims=True)
    loss = pred.dtype.type(np.mean(1.0 - cos))
    return loss, (p, t, cos, pn)


def cosine_distill_backward(cache, grad_out):
    """dpred_r = -(g/R) (t^_r - p^_r cos_r) / ||pred_r||; target gets None."""
    p, t, cos, pn = cache
    g = upstream(grad_out, (), p.dtype)
    scale = -g * p.dtype.type(1.0 / cos.size)
    return (t - p * cos) * (scale / pn), None


def _cos_example(rng, dtype=np.float64):
    lead = tuple(int(v) for v in rng.integers(1, 4, size=int(rng.integers(0, 3))))
    shape = lead + (int(rng.integers(2, 6)),)
    pred = rng.standard_normal(shape)
    target = pred + rng.standard_normal(shape)  # moderately aligned, as a trained decoder would be
    return (pred.astype(dtype), target.astype(dtype)), {}


register(
    "cosine_distill",
    forward=cosine_distill_forward,
    backward=cosine_distill_backward,
    example=_cos_example,
    differentiable=(0,),
    reference="Peng et al. 2022, arXiv 2208.06366; microsoft/unilm beit2/modeling_vqkd.py (calculate_rec_loss)",
    derivation="derivations/masked_modelling.md#cosine_distill",
)


# -- vector_quantize ----------------------------------------------------------------------------

_ARGMAX_BLOCK = 1 << 22  # entries of one block of the (rows x codes) similarity matrix


def _vq_inputs(z, codebook):
    """Validate; return (z_hat, ||z||, c_hat)."""
    V.float_array(z, "z", shape_doc="(..., D)")
    if z.ndim < 1:
        raise ValueError("z must have shape (..., D), got a 0-d array")
    V.float_array(codebook, "codebook", ndim=2, shape_doc="(K, D)")
    if codebook.shape[1] != z.shape[-1]:
        raise ValueError(f"codebook must have shape (K, D) with D = z.shape[-1] = {z.shape[-1]}, got "
                         f"shape {codebook.shape}")
    V.same_dtype([z, codebook], ["z", "codebook"])
    zn = _row_norms(z, "z")
    cn = _row_norms(codebook, "codebook")
    return z / zn, zn, codebook / cn


def _nearest(z_hat, c_hat) -> np.ndarray:
    """argmax_k <z_hat, c_hat_k> per row (first index on ties), in row blocks to bound memory."""
    rows = z_hat.reshape(-1, z_hat.shape[-1])
    step = max(1, _ARGMAX_BLOCK // c_hat.shape[0])
    ct = c_hat.T
    idx = np.empty(rows.shape[0], dtype=np.int64)
    for s in range(0, rows.shape[0], step):
        idx[s:s + step] = np.argmax(rows[s:s + step] @ ct, axis=1)
    return idx.reshape(z_hat.shape[:-1])


def nearest_code(z, codebook):
    """Index of the nearest code by cosine: argmax_k cos(z, codebook_k), shape z.shape[:-1], int64.

    For unit vectors ||z^ - c^||^2 = 2 - 2 cos, so this is the official argmin of the distance
    (beit2/norm_ema_quantizer.py); ties go to the lowest index.  No cache, no gradient.
    """
    z_hat, _, c_hat = _vq_inputs(z, codebook)
    return _nearest(z_hat, c_hat)


def vector_quantize_forward(z, codebook):
    """VQ-KD quantiser with the straight-through gradient through the L2 normalisation.

        z^ = z / ||z||,  c^_k = c_k / ||c_k||,  idx = argmax_k <z^, c^_k>  (ties: lowest k)
        out = z^ + sg(c^_idx - z^)          value c^_idx,   d out / d z^ = I

    Shapes: z (..., D), codebook (K, D) same dtype -> out (..., D) (the normalised codes).
    Backward (straight-through to z^, then the L2-normalise backward):
    dz = (g - z^ <z^, g>) / ||z||.  The codebook gets None: it is updated by
    :func:`refssl.state.vq_ema_update`.  Zero rows of z or the codebook are a ValueError.
    From the cache: :func:`vector_quantize_indices` (int64, shape z.shape[:-1]) and
    :func:`vector_quantize_normalized_input` (z^, for the commitment term beta MSE(sg(out), z^)).
    The forward value is piecewise constant in z, so the registry's finite-difference checks
    differentiate the surrogate z -> z^ (:func:`_vq_surrogate`), whose derivative the
    straight-through estimator uses by definition.

    Reference: Peng et al. 2022, arXiv 2208.06366; microsoft/unilm beit2/norm_ema_quantizer.py
    (NormEMAVectorQuantizer.forward); straight-through: van den Oord et al. 2017, arXiv 1711.00937.
    Backward: derivations/masked_modelling.md#vector_quantize.
    """
    z_hat, zn, c_hat = _vq_inputs(z, codebook)
    idx = _nearest(z_hat, c_hat)
    return c_hat[idx], (z_hat, zn, idx)


def vector_quantize_backward(cache, grad_out):
    """dz = (g - z^ <z^, g>) / ||z|| (straight-through, then L2-normalise backward); codebook None."""
    z_hat, zn, _ = cache
    g = upstream(grad_out, z_hat.shape, z_hat.dtype)
    return row_normalize_backward(z_hat, zn, g), None


def vector_quantize_indices(cache) -> np.ndarray:
    """The chosen code of every row of z, int64 of shape z.shape[:-1]."""
    return cache[2]


def vector_quantize_normalized_input(cache) -> np.ndarray:
    """z^ = z / ||z|| (shape of z), the input of the commitment term and of the codebook EMA."""
    return cache[0]


def _vq_surrogate(z, codebook):
    """z -> z^: the function whose derivative the straight-through backward returns (gradcheck only)."""
    return _vq_inputs(z, codebook)[0]


def _vq_example(rng, dtype=np.float64):
    d = int(rng.integers(2, 6))
    k = int(rng.integers(1, 6))
    for _ in range(1000):  # well separated codes (pairwise cos <= 0.8), so every row has a clear winner
        c = rng.standard_normal((k, d))
        c_hat = c / np.linalg.norm(c, axis=1, keepdims=True)
        gram = c_hat @ c_hat.T
        if k == 1 or np.max(gram[~np.eye(k, dtype=bool)]) <= 0.8:
            break
    else:  # pragma: no cover - practically unreachable; fall back to a single code
        c, c_hat, k = c[:1], c_hat[:1], 1
    lead = tuple(int(v) for v in rng.integers(1, 4, size=int(rng.integers(1, 3))))
    j = rng.integers(0, k, size=lead)
    z_hat = c_hat[j] + 0.3 * rng.standard_normal(lead + (d,))
    z_hat /= np.linalg.norm(z_hat, axis=-1, keepdims=True)
    sims = np.sort(z_hat @ c_hat.T, axis=-1)
    near_tie = sims[..., -1] - (sims[..., -2] if k > 1 else -np.inf) < 0.05
    z_hat[near_tie] = c_hat[j[near_tie]]  # margin >= 1 - 0.8 there
    z = z_hat * rng.uniform(0.5, 2.0, size=lead + (1,))
    return (z.astype(dtype), c.astype(dtype)), {}


register(
    "vector_quantize",
    forward=vector_quantize_forward,
    backward=vector_quantize_backward,
    example=_vq_example,
    differentiable=(0,),
    reference="Peng et al. 2022, arXiv 2208.06366; microsoft/unilm beit2/norm_ema_quantizer.py; "
              "van den Oord et al. 2017, arXiv 1711.00937 (straight-through)",
    derivation="derivations/masked_modelling.md#vector_quantize",
    surrogate=_vq_surrogate,
)
