"""Mask generators of masked image modelling: MAE random masking and BEiT block-wise masking.

Plain functions of an explicit ``numpy.random.Generator``, vectorised over samples (the loops run
over tries and rounds, never over samples).  Patch indices are row-major over the (h, w) patch grid,
the order of :func:`refssl.ops.masked_modelling.patchify_forward`.

* MAE: ``ids_keep, mask, ids_restore = random_masking(N, L, 0.75, rng)``; the encoder sees
  ``gather_tokens(x, ids_keep)``, the decoder unshuffles with ``gather_tokens(tokens, ids_restore)``
  and the loss is ``mae_loss(pred, target, mask)``.
* BEiT / BEiT v2: ``mask = block_masking(N, 14, 75, rng, min_num_patches=16)`` (bool, True = masked)
  feeds ``masked_token_ce``; :func:`beit_mask_count` and :func:`beit_min_block` scale 75 / 16 to a
  smaller grid.
"""

from __future__ import annotations

import math

import numpy as np

from . import validation as V

__all__ = ["random_masking", "block_masking", "beit_mask_count", "beit_min_block"]

BEIT_GRID_PATCHES = 196  # 14 x 14 patches of 16 px on a 224 px image
BEIT_MASK_COUNT = 75  # masked patches per image in BEiT and BEiT v2 pretraining
BEIT_MIN_BLOCK = 16  # min_mask_patches_per_block of the BEiT pretraining scripts


def _rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got "
                        f"{type(rng).__name__}")
    return rng


def _grid(grid) -> tuple[int, int]:
    if isinstance(grid, (tuple, list)):
        if len(grid) != 2:
            raise ValueError(f"grid must be an int or a pair (h, w), got {grid!r}")
        return V.positive_int(grid[0], "grid"), V.positive_int(grid[1], "grid")
    g = V.positive_int(grid, "grid")
    return g, g


def random_masking(n, length, mask_ratio, rng, *, dtype=np.float64):
    """MAE per-sample random masking: ``(ids_keep, mask, ids_restore)``.

    For each sample: noise ~ U(0, 1)^L (``rng.random((n, length))``), ids_shuffle =
    argsort(noise), ids_restore = argsort(ids_shuffle) (the rank of each patch), keep the first
    K = floor(L (1 - mask_ratio)) of ids_shuffle.  The mask (1 = removed) is ones with the first K
    entries zeroed, unshuffled with ids_restore, i.e. ``mask[n, l] = ids_restore[n, l] >= K``.
    Every image removes the same count L - K, so the batch mean of ``mae_loss`` is also the mean
    of the per-image means (derivations/masked_modelling.md#mae_loss).

    Shapes: ids_keep (n, K) int64, mask (n, length) of ``dtype`` (0/1), ids_restore (n, length) int64.
    mask_ratio in [0, 1) and K >= 1, else ValueError.

    Reference: He et al. 2021, arXiv 2111.06377; facebookresearch/mae models_mae.py (random_masking).
    """
    n = V.positive_int(n, "n")
    length = V.positive_int(length, "length")
    ratio = V.in_range(mask_ratio, "mask_ratio", 0.0, 1.0, high_open=True)
    rng = _rng(rng)
    dtype = np.dtype(dtype)
    if dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    keep = int(length * (1 - ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio={ratio} keeps int({length} * (1 - mask_ratio)) = {keep} patches; "
                         "at least 1 must stay visible")
    noise = rng.random((n, length))
    ids_shuffle = np.argsort(noise, axis=1).astype(np.int64, copy=False)
    # argsort of a permutation is its inverse: scatter the positions instead of sorting again
    ids_restore = np.empty_like(ids_shuffle)
    np.put_along_axis(ids_restore, ids_shuffle, np.arange(length, dtype=np.int64)[None, :], axis=1)
    mask = (ids_restore >= keep).astype(dtype)
    return ids_shuffle[:, :keep].copy(), mask, ids_restore


def block_masking(n, grid, num_masking_patches, rng, *, min_num_patches=4, max_num_patches=None,
                  min_aspect=0.3, max_aspect=None, max_tries=10):
    """BEiT block-wise masking: bool (n, h*w), True = masked, row-major over the patch grid.

    Per sample, the rules of BEiT's MaskingGenerator: while fewer than ``num_masking_patches`` are
    masked, place one block.  A block is tried up to ``max_tries`` times: area A ~ U(min_num_patches,
    r) with r = min(remaining, max_num_patches) (max_num_patches defaults to num_masking_patches),
    aspect ratio a log-uniform in [min_aspect, max_aspect] (default 1 / min_aspect), block height
    round(sqrt(A a)) and width round(sqrt(A / a)) (round half to even, Python's ``round``), kept only
    if strictly smaller than the grid, top-left corner uniform over the positions where it fits.  A
    try is accepted when it masks between 1 and r new patches; the first accepted try ends the
    block.  If all tries of a block fail, the sample stops.  So the count never exceeds the
    target and usually meets it.  Because the sides are rounded, a block's area can be slightly
    below ``min_num_patches`` for non-square aspect ratios (as in the official code).

    Vectorised across samples: each round draws ``max_tries`` candidates for every unfinished
    sample at once and counts the already-masked patches in each candidate from an integral image.
    The random stream differs from the official (Python ``random``) one; the distribution is the same.

    ``grid``: int (square) or (h, w).  BEiT: 14 x 14, 75 patches, min_num_patches=16
    (:func:`beit_mask_count`, :func:`beit_min_block` for smaller grids).

    Reference: Bao et al. 2021, arXiv 2106.08254; microsoft/unilm beit/masking_generator.py.
    """
    n = V.positive_int(n, "n")
    h, w = _grid(grid)
    target = V.positive_int(num_masking_patches, "num_masking_patches")
    if target > h * w:
        raise ValueError(f"num_masking_patches must be <= h*w = {h * w}, got {target}")
    lo = V.positive_int(min_num_patches, "min_num_patches")
    cap = target if max_num_patches is None else V.positive_int(max_num_patches, "max_num_patches")
    a_lo = V.positive(min_aspect, "min_aspect")
    a_hi = 1.0 / a_lo if max_aspect is None else V.positive(max_aspect, "max_aspect")
    tries = V.positive_int(max_tries, "max_tries")
    rng = _rng(rng)
    log_lo, log_hi = math.log(a_lo), math.log(a_hi)

    mask = np.zeros((n, h, w), dtype=bool)
    count = np.zeros(n, dtype=np.int64)
    active = np.arange(n)
    rows, cols = np.arange(h), np.arange(w)
    while active.size:
        m = active.size
        room = np.minimum(target - count[active], cap)[:, None]  # (m, 1): most new patches allowed
        # a + (b - a) U, Python's random.uniform, also valid when room < min_num_patches
        area = lo + (room - lo) * rng.random((m, tries))
        aspect = np.exp(log_lo + (log_hi - log_lo) * rng.random((m, tries)))
        bh = np.rint(np.sqrt(area * aspect)).astype(np.int64)
        bw = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        fits = (bh < h) & (bw < w)
        bh, bw = np.where(fits, bh, 0), np.where(fits, bw, 0)
        top = rng.integers(0, h - bh + 1)
        left = rng.integers(0, w - bw + 1)
        integral = np.zeros((m, h + 1, w + 1), dtype=np.int64)
        integral[:, 1:, 1:] = mask[active].cumsum(axis=1).cumsum(axis=2)
        s = np.arange(m)[:, None]
        already = (integral[s, top + bh, left + bw] - integral[s, top, left + bw]
                   - integral[s, top + bh, left] + integral[s, top, left])
        new = bh * bw - already
        ok = fits & (new > 0) & (new <= room)
        placed = ok.any(axis=1)
        first = np.argmax(ok, axis=1)[placed]
        sel = np.flatnonzero(placed)
        t, l_ = top[sel, first], left[sel, first]
        hh, ww = bh[sel, first], bw[sel, first]
        rect = (((rows >= t[:, None]) & (rows < (t + hh)[:, None]))[:, :, None]
                & ((cols >= l_[:, None]) & (cols < (l_ + ww)[:, None]))[:, None, :])
        mask[active[sel]] |= rect
        count[active[sel]] += new[sel, first]
        active = active[sel][count[active[sel]] < target]
    return mask.reshape(n, h * w)


def _scaled(grid, count: int) -> int:
    h, w = _grid(grid)
    return int(math.floor(count * h * w / BEIT_GRID_PATCHES + 0.5))


def beit_mask_count(grid) -> int:
    """BEiT's 75 masked patches of 196 (14 x 14) scaled to ``grid``: floor(75 h w / 196 + 1/2).

    Proportional, rounded half up, so the masked fraction stays 75/196 (about 38%): 75 on 14 x 14,
    19 on 7 x 7, 24 on 8 x 8, 6 on 4 x 4; at least 1.
    """
    return max(1, _scaled(grid, BEIT_MASK_COUNT))


def beit_min_block(grid) -> int:
    """BEiT's minimum block of 16 patches (of 196) scaled to ``grid``: max(1, floor(16 h w / 196 + 1/2)).

    The same proportional rule as :func:`beit_mask_count`, so a block keeps covering the same
    fraction of the image: 16 on 14 x 14, 4 on 7 x 7, 5 on 8 x 8, 1 on 4 x 4.
    """
    return max(1, _scaled(grid, BEIT_MIN_BLOCK))
