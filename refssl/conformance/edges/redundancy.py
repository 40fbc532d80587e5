"""Redundancy reduction: Barlow Twins (and the HSIC variant), VICReg, Gaussian IB, HSIC, batch standardisation.

Where ports go wrong: batch statistics on the smallest batches, collapsed (constant) columns where the
standardisation divides by sqrt(eps), normalising the concatenated views instead of each view, the
biased vs unbiased variance, the configured batch size in VICReg's covariance, large offsets where
x - mean cancels.
"""

from __future__ import annotations

import numpy as np

from . import Family

F = Family("redundancy", "losses on batch statistics of two views (cross-correlation, covariance, kernels)")


def _correlated(rng, n, d, scale2=2.0, shift2=1.0):
    base = rng.standard_normal((n, d))
    z1 = base + 0.5 * rng.standard_normal((n, d))
    z2 = scale2 * base + 0.5 * rng.standard_normal((n, d)) + shift2
    return z1, z2


# ----------------------------------------------------------------------------------------- Barlow Twins

BT = ("barlow_twins", "barlow_twins_hsic")


@F.edge(BT, "n3", "N = 3, the smallest batch with a gradient (N = 2 standardises every column to +-1)")
def _bt_n3(rng):
    return _correlated(rng, 3, 4), {"lambd": 0.05}


@F.edge(("barlow_twins", "barlow_twins_hsic"), "collapsed_column",
        "column 0 of view 1 is constant: it standardises to 0 (divided by sqrt(eps)), C_00 = 0", exact=True)
def _bt_collapsed(rng):
    z1, z2 = _correlated(rng, 8, 5)
    z1[:, 0] = 1.0
    return (z1, z2), {"lambd": 0.05}


@F.edge("barlow_twins", "identical_views",
        "z2 = z1: C_ii = Var/(Var + eps) just below 1, the loss is the off-diagonal term (barlowtwins #16)")
def _bt_same(rng):
    z = rng.standard_normal((8, 5))
    return (z, z.copy()), {"lambd": 0.05}


@F.edge("barlow_twins", "official_lambda", "the official lambd = 0.0051 with D = 16 (240 off-diagonal terms)")
def _bt_official(rng):
    return _correlated(rng, 12, 16), {"lambd": 0.0051}


@F.edge("barlow_twins", "large_offsets",
        "column means +-10 and scales 0.3..3: per-view standardisation must remove both")
def _bt_offsets(rng):
    z1, z2 = _correlated(rng, 8, 5)
    scale = 10.0 ** rng.uniform(-0.5, 0.5, size=5)
    return (z1 * scale + 10.0, z2 * scale[::-1] - 10.0), {"lambd": 0.05}


@F.edge("barlow_twins_hsic", "tsai", "normalization='tsai': row L2 norm, unbiased std, no eps (the authors' code)")
def _bth_tsai(rng):
    return _correlated(rng, 8, 5), {"lambd": 0.05, "normalization": "tsai"}


@F.edge("barlow_twins_hsic", "batchnorm", "normalization='batchnorm' (the default)")
def _bth_bn(rng):
    return _correlated(rng, 8, 5), {"lambd": 0.05, "normalization": "batchnorm"}


# ---------------------------------------------------------------------------------------------- VICReg

def _vicreg_views(rng, n, d, stds):
    """Columns with exact unbiased stds ``stds`` (kept away from the hinge at 1) and random means."""
    out = []
    for _ in range(2):
        z = rng.standard_normal((n, d))
        zc = z - z.mean(axis=0)
        zc /= zc.std(axis=0, ddof=1)
        out.append(zc * stds + rng.standard_normal(d))
    x, y = out
    return x, 0.6 * x + 0.4 * y  # correlated views


@F.edge("vicreg", "collapsed_column",
        "column 0 of x is constant: std = sqrt(eps) = 0.01, the variance hinge at its largest", exact=True)
def _vr_collapsed(rng):
    x, y = _vicreg_views(rng, 7, 5, np.array([0.5, 1.5, 0.7, 1.8, 0.4]))
    x[:, 0] = 0.25
    return (x, y), {}


@F.edge("vicreg", "configured_batch_size",
        "batch_size = 4N: the covariance divides by the configured global batch minus 1, not the rows")
def _vr_batch(rng):
    x, y = _vicreg_views(rng, 6, 4, np.array([0.5, 1.5, 0.6, 1.4]))
    return (x, y), {"batch_size": 24}


@F.edge("vicreg", "n2", "N = 2, the smallest batch of the unbiased variance (stds kept away from 1)")
def _vr_n2(rng):
    x, y = _vicreg_views(rng, 2, 4, np.array([0.4, 1.6, 0.6, 1.3]))
    return (x, y), {}


@F.edge("vicreg", "hinge_inactive", "every std above 1: no variance term, gradient from invariance and covariance")
def _vr_inactive(rng):
    x, y = _vicreg_views(rng, 8, 4, np.array([1.5, 2.0, 1.3, 1.8]))
    return (x, 0.5 * x + 0.5 * y * 2.0), {}


# ------------------------------------------------------------------------------ Gaussian IB, HSIC, BN

@F.edge("gaussian_ib", "raw_views", "standardize_views=False: the covariances of the raw views")
def _gib_raw(rng):
    z1, z2 = _correlated(rng, 10, 3, scale2=1.5, shift2=-0.5)
    return (z1, z2), {"standardize_views": False}


@F.edge("gaussian_ib", "beta_4", "beta = 4 with D = 4 and N = 12")
def _gib_beta(rng):
    z1, z2 = _correlated(rng, 12, 4, scale2=1.5, shift2=-0.5)
    return (z1, z2), {"beta": 4.0}


@F.edge("hsic", "linear", "kernel='linear'")
def _hsic_linear(rng):
    x = rng.standard_normal((7, 3))
    return (x, np.tanh(x @ rng.standard_normal((3, 2))) + 0.5 * rng.standard_normal((7, 2))), {"kernel": "linear"}


@F.edge("hsic", "gaussian_sigma", "kernel='gaussian' with a given bandwidth sigma = 1.5")
def _hsic_sigma(rng):
    x = rng.standard_normal((7, 3))
    y = np.tanh(x @ rng.standard_normal((3, 2))) + 0.5 * rng.standard_normal((7, 2))
    return (x, y), {"kernel": "gaussian", "sigma": 1.5}


@F.edge("hsic", "gaussian_median", "kernel='gaussian' with the median-heuristic bandwidth (sigma=None)")
def _hsic_median(rng):
    x = rng.standard_normal((8, 3))
    y = np.tanh(x @ rng.standard_normal((3, 2))) + 0.5 * rng.standard_normal((8, 2))
    return (x, y), {"kernel": "gaussian"}


@F.edge("hsic", "n3", "N = 3 samples, linear kernel")
def _hsic_n3(rng):
    x = rng.standard_normal((3, 2))
    return (x, x @ rng.standard_normal((2, 2)) + 0.5 * rng.standard_normal((3, 2))), {"kernel": "linear"}


@F.edge("batch_standardize", "collapsed_column", "column 0 constant: it standardises to 0 through sqrt(eps)",
        exact=True)
def _bs_collapsed(rng):
    x = rng.standard_normal((6, 4)) * 2 + 1
    x[:, 0] = 0.5
    return (x,), {}


@F.edge("batch_standardize", "n3", "N = 3, the smallest batch with a gradient")
def _bs_n3(rng):
    return (rng.standard_normal((3, 4)) * 2 + 1,), {}


@F.edge("batch_standardize", "large_offsets", "column means around 10, scales 0.3..3: x - mean per column")
def _bs_offsets(rng):
    return (rng.standard_normal((6, 3)) * 10.0 ** rng.uniform(-0.5, 0.5, size=3) + 10.0,), {}
