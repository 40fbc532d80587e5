"""Non-learned representations to compare learned ones against: raw pixels, and BRIEF binary descriptors
(Calonder et al., ECCV 2010, "BRIEF: Binary Robust Independent Elementary Features").

BRIEF smooths the image with a Gaussian, then sets bit j to 1[I(p_j) < I(q_j)] for n_bits fixed random
pixel pairs; descriptors are compared with the Hamming distance.  The pairs follow the paper's best
sampling strategy (G II): both points i.i.d. isotropic Gaussian around the image centre with variance
S^2 / 25.  The paper smooths 48 x 48 patches with sigma = 2; ``sigma = 1`` is the same relative width at
32 x 32 (rounded).  ``color=True`` (not in the paper) draws a colour channel per test instead of comparing
grey levels, so that hue differences can flip bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data.augment import _check_images, gaussian_blur

__all__ = ["raw_pixels", "BriefPairs", "brief_pairs", "brief", "evaluate_baselines"]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def raw_pixels(images) -> np.ndarray:
    """(N, 3 S S) float32: the flattened images."""
    images = _check_images(images)
    return images.reshape(len(images), -1).astype(np.float32, copy=False)


@dataclass(frozen=True)
class BriefPairs:
    """The fixed test pairs: rows/columns of the first and second point, and the channel (-1 = grey)."""

    p_row: np.ndarray
    p_col: np.ndarray
    q_row: np.ndarray
    q_col: np.ndarray
    channel: np.ndarray
    size: int


def brief_pairs(size: int, rng: np.random.Generator, *, n_bits: int = 256, color: bool = False) -> BriefPairs:
    """Draw ``n_bits`` point pairs for images of side ``size`` (G II sampling, clipped to the image).

    Pairs whose two points coincide after rounding are redrawn, since such a test is always 0."""
    if not isinstance(n_bits, (int, np.integer)) or n_bits < 1:
        raise ValueError(f"n_bits must be an integer >= 1, got {n_bits!r}")
    centre, sd = (size - 1) / 2.0, size / 5.0
    pts = np.empty((0, 4), dtype=np.int64)
    while len(pts) < n_bits:  # rejection of degenerate pairs; one or two rounds in practice
        cand = np.clip(np.rint(rng.normal(centre, sd, size=(2 * n_bits, 4))), 0, size - 1).astype(np.int64)
        cand = cand[np.any(cand[:, :2] != cand[:, 2:], axis=1)]
        pts = np.concatenate([pts, cand])
    pts = pts[:n_bits]
    channel = rng.integers(0, 3, n_bits) if color else np.full(n_bits, -1)
    return BriefPairs(pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3], channel, int(size))


def brief(images, pairs: BriefPairs, *, sigma: float = 1.0) -> np.ndarray:
    """BRIEF descriptors (N, n_bits) bool of ``images`` (N, 3, S, S) with the given test pairs."""
    images = _check_images(images)
    if images.shape[-1] != pairs.size:
        raise ValueError(f"pairs were drawn for {pairs.size}-pixel images, got images of side {images.shape[-1]}")
    smooth = gaussian_blur(images.astype(np.float32, copy=False), sigma=float(sigma))
    grey = np.tensordot(_LUMA, smooth, axes=([0], [1]))  # (N, S, S)
    # stack grey as channel 3, so channel index -1 (grey) and 0..2 (R, G, B) index one array
    planes = np.concatenate([smooth, grey[:, None]], axis=1)
    ch = np.where(pairs.channel < 0, 3, pairs.channel)
    a = planes[:, ch, pairs.p_row, pairs.p_col]
    b = planes[:, ch, pairs.q_row, pairs.q_col]
    return a < b


def evaluate_baselines(dataset, rng, *, n_bits=256, sigma=1.0, color=False, k=1, n_bins=3, l2=1e-3,
                       max_iter=100):
    """Factor tables of the raw-pixel and BRIEF representations of a :class:`refssl.data.ShapesDataset`.

    Raw pixels use Euclidean k-NN; BRIEF uses Hamming k-NN on the bits and the linear probe on the bits
    as 0/1 floats.  Returns ``{"pixels": (results, markdown), "brief": (results, markdown)}``.
    """
    from .eval.probes import factor_table

    tr, va = dataset.train, dataset.val
    out = {"pixels": factor_table(raw_pixels(tr.images), tr.factors, raw_pixels(va.images), va.factors,
                                  name="raw pixels", k=k, n_bins=n_bins, l2=l2, max_iter=max_iter)}
    pairs = brief_pairs(tr.images.shape[-1], rng, n_bits=n_bits, color=color)
    bt, bv = brief(tr.images, pairs, sigma=sigma), brief(va.images, pairs, sigma=sigma)
    out["brief"] = factor_table(bt, tr.factors, bv, va.factors, name=f"BRIEF-{n_bits}", k=k, n_bins=n_bins,
                                metric="hamming", l2=l2, max_iter=max_iter,
                                linear_features=(bt.astype(np.float32), bv.astype(np.float32)))
    return out
