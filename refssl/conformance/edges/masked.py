"""Masked modelling and its pieces: MAE loss, masked-token cross-entropy, token gathering, patchify, vector
quantisation, cross-entropy, MSE.

Where ports go wrong: averaging over all patches instead of the masked ones, norm_pix statistics, a
single masked position, large logits (exp without a max shift), the patch layout (row-major grid,
(row, column, channel) inside a patch), repeated gather indices (gradients accumulate), the
straight-through gradient of the quantiser, duplicate codebook rows.
"""

from __future__ import annotations

import numpy as np

from . import Family

F = Family("masked", "masked image / token modelling and plain reconstruction and classification losses")


def _mask(rng, n, length, frac=0.6):
    m = rng.random((n, length)) < frac
    m[0, 0], m[-1, -1] = True, False
    return m


@F.edge("mae_loss", "pixel_loss", "norm_pix=False (the official default): raw pixel targets")
def _mae_pix(rng):
    return (rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 5, 6)), _mask(rng, 2, 5)), {"norm_pix": False}


@F.edge("mae_loss", "norm_pix", "norm_pix=True: per-patch normalised targets (unbiased std + 1e-6)")
def _mae_norm(rng):
    target = 3.0 * rng.standard_normal((2, 5, 6)) + 2.0
    return (rng.standard_normal((2, 5, 6)), target, _mask(rng, 2, 5)), {"norm_pix": True}


@F.edge("mae_loss", "single_masked_patch", "one removed patch in the batch: the mean runs over one patch")
def _mae_one(rng):
    mask = np.zeros((2, 4), dtype=bool)
    mask[1, 2] = True
    return (rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 4, 5)), mask), {"norm_pix": False}


def _ce_targets(rng, mask, vocab):
    t = rng.integers(0, vocab, size=mask.shape)
    t[~mask] = -100
    return t


@F.edge("masked_token_ce", "large_logits", "logits ~30: exp overflows float32 without a max shift")
def _mtce_large(rng):
    mask = _mask(rng, 2, 5, 0.5)
    return (30.0 * rng.standard_normal((2, 5, 6)), _ce_targets(rng, mask, 6), mask), {}


@F.edge("masked_token_ce", "single_masked", "one masked position in the batch")
def _mtce_one(rng):
    mask = np.zeros((2, 3), dtype=bool)
    mask[0, 1] = True
    return (rng.standard_normal((2, 3, 5)), _ce_targets(rng, mask, 5), mask), {}


@F.edge("gather_tokens", "duplicate_ids", "every sample gathers one token three times: gradients accumulate")
def _gather_dup(rng):
    ids = np.array([[1, 1, 3, 1], [0, 2, 2, 2]], dtype=np.int64)
    return (rng.standard_normal((2, 5, 3)), ids), {}


@F.edge("patchify", "rgb_rectangular", "3 channels, a 2x3 grid of 2x2 patches: the (row, column, channel) layout")
def _patch_rgb(rng):
    return (rng.standard_normal((2, 3, 4, 6)),), {"patch": 2}


@F.edge("patchify", "patch3", "patch 3 on a 6x3 single-channel image")
def _patch3(rng):
    return (rng.standard_normal((1, 1, 6, 3)),), {"patch": 3}


def _codebook(rng, k, d):
    """Codes with pairwise cosine <= 0.8 (clear winners)."""
    while True:
        c = rng.standard_normal((k, d))
        c_hat = c / np.linalg.norm(c, axis=1, keepdims=True)
        gram = c_hat @ c_hat.T
        if np.max(gram[~np.eye(k, dtype=bool)]) <= 0.8:
            return c, c_hat


@F.edge("vector_quantize", "many_codes", "8 codes, tokens (2, 3, D) near random codes")
def _vq_many(rng):
    c, c_hat = _codebook(rng, 8, 6)
    j = rng.integers(0, 8, size=(2, 3))
    z = c_hat[j] + 0.1 * rng.standard_normal((2, 3, 6))
    return (z * rng.uniform(0.5, 2.0, size=(2, 3, 1)), c), {}


@F.edge("vector_quantize", "duplicate_codes", "codebook rows 0 and 1 coincide (ties go to the lower index; the "
        "output is the same code either way)")
def _vq_dup(rng):
    c, c_hat = _codebook(rng, 4, 5)
    c[1] = c[0]
    z = c_hat[[0, 2, 3, 0]] + 0.1 * rng.standard_normal((4, 5))
    return (z, c), {}


@F.edge("cross_entropy", "large_logits", "logits ~50: exp overflows float32 without a max shift")
def _ce_large(rng):
    return (50.0 * rng.standard_normal((5, 4)), rng.integers(0, 4, size=5)), {}


@F.edge("cross_entropy", "n1", "a single row")
def _ce_n1(rng):
    return (2.0 * rng.standard_normal((1, 5)), np.array([3])), {}


@F.edge("cross_entropy", "two_classes", "K = 2 classes (a logistic loss)")
def _ce_two(rng):
    return (2.0 * rng.standard_normal((6, 2)), np.array([0, 1, 1, 0, 1, 0])), {}


@F.edge("mse", "large_values", "values ~1e3: the squared error ~1e6")
def _mse_large(rng):
    x = 1e3 * rng.standard_normal((3, 4))
    return (x, x + 10.0 * rng.standard_normal((3, 4))), {}


@F.edge("mse", "n1", "a single element per sample (N, 1)")
def _mse_n1(rng):
    return (rng.standard_normal((4, 1)), rng.standard_normal((4, 1))), {}
