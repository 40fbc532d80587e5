"""SimCLR NT-Xent (``info_nce``) and the debiased contrastive loss of Chuang et al.

Both work on the 2N rows ``u = [l2n(z1); l2n(z2)]``: row ``i`` and row
``i + N`` (mod 2N) are the two views of one sample, every other row is a
negative, and an anchor never contrasts with itself.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .. import validation as V
from .._blocks import block_bounds, map_row_blocks
from ..numerics import logsumexp
from ..registry import Range, register
from ._positive_ce import positive_ce, positive_ce_from_sums
from ._tiled_contrastive import info_nce_tiled_backward, info_nce_tiled_forward
from .normalize import l2_normalize_backward, l2_normalize_forward

__all__ = [
    "info_nce_forward", "info_nce_backward",
    "debiased_info_nce_forward", "debiased_info_nce_backward",
    "NT_XENT_OFFICIAL_FACTOR",
]

# google-research/simclr reports (1/N) sum_i (l_A_i + l_B_i): twice the paper's mean over 2N anchors.
NT_XENT_OFFICIAL_FACTOR = 2.0


def _unit_views(z1, z2, min_rows=1, normalize=True):
    """Validate two (N, D) views and L2-normalise their 2N stacked rows (cache None: not normalised)."""
    V.float_array(z1, "z1", ndim=2, shape_doc="(N, D)", min_rows=min_rows)
    V.float_array(z2, "z2", ndim=2, shape_doc="(N, D)", min_rows=min_rows)
    V.same_shape([z1, z2], ["z1", "z2"])
    V.same_dtype([z1, z2], ["z1", "z2"])
    if not normalize:
        return np.concatenate([z1, z2]), None
    return l2_normalize_forward(np.concatenate([z1, z2]))


def _gram(u):
    # u @ u.T goes through BLAS syrk plus a triangle copy, which is slower than a plain GEMM on a copy.
    return u @ np.ascontiguousarray(u.T)


_ROWS = 128  # rows per block of the elementwise work on a (2N x 2N) matrix (map_row_blocks)


def _gram_panels(a):
    """The block upper triangle of a a^T as contiguous panels: panel i holds rows s:t and columns s: for the
    i-th block (s, t) of ``block_bounds(n, _ROWS)``, the blocks ``map_row_blocks`` hands out; about half the
    work and half the memory of a full GEMM.

    Panels rather than the upper part of a full matrix: numpy runs elementwise work on a contiguous array
    faster than on the strided block of a larger one (it passes a non-contiguous operand through its
    iteration buffer).  One plain GEMM per panel rather than BLAS syrk: OpenBLAS's syrk and symm run on one
    thread, its GEMM on all of them (at 2 threads and 2N = 2048, 7.6 ms for syrk against about 4 here).
    Inside each diagonal block the part below the diagonal is written too; callers treat it as unset.
    """
    n = len(a)
    at = np.ascontiguousarray(a.T)  # a contiguous right operand is packed faster than a transposed view
    bounds = block_bounds(n, _ROWS)
    buf = np.empty(sum((t - s) * (n - s) for s, t in bounds), a.dtype)  # one allocation for all panels
    panels, start = [], 0
    for s, t in bounds:
        size = (t - s) * (n - s)
        panels.append(np.matmul(a[s:t], at[:, s:], out=buf[start:start + size].reshape(t - s, n - s)))
        start += size
    return panels


def _mirror_below(m, s, t):
    """Copy rows s:t of m right of their diagonal block (m[s:t, t:]) transposed below it (m[t:, s:t]).

    By square tiles: a transposed copy of the whole strip walks the source with a stride of a full row
    per element and runs about 3x slower."""
    for c in range(t, m.shape[0], _ROWS):
        m[c:c + _ROWS, s:t] = m[s:t, c:c + _ROWS].T


@functools.lru_cache(maxsize=None)
def _on_and_below_diagonal(k):
    """(k, k) bool mask of the diagonal and the part below it (cached: one per block size; read only)."""
    return np.tri(k, dtype=bool)


def _swap_views(a, n):
    """Rows i <-> i + n: the positive partner of every stacked row."""
    return np.concatenate([a[n:], a[:n]])


def _split_grad(du, ncache, n):
    dz = du if ncache is None else l2_normalize_backward(ncache, du)[0]
    return dz[:n], dz[n:]


# --------------------------------------------------------------------------------------------- info_nce


def info_nce_forward(z1, z2, *, temperature=0.1, normalize=True, block_size=None):
    """SimCLR NT-Xent loss (paper scale).

    With ``u = [z1/||z1||; z2/||z2||]`` (2N x D), cosine similarities
    ``s_ij = u_i . u_j`` and positive ``p(i) = i + N mod 2N``::

        L = 1/(2N) sum_i [ -s_{i,p(i)}/tau + log sum_{j != i} exp(s_ij / tau) ]

    i.e. self-similarity excluded, positive in the denominator, mean over the
    2N anchors.  The official TF code (google-research/simclr tf2/objective.py,
    ``add_contrastive_loss``) reports ``NT_XENT_OFFICIAL_FACTOR * L`` (its mean is
    over N anchors of the two-direction sum).

    Shapes: z1, z2 (N, D), N >= 1 -> scalar.  Gradients to both views.

    ``normalize=False`` uses raw dot products s_ij = z_i . z_j instead of
    cosines: the un-normalised variant whose loss can be driven to 0 by
    inflating norms once the ranking is right (derivations/temperature_limit.md,
    the logit-scaling shortcut).  It is not SimCLR; it exists to show that.

    Stability: cosines are at most 1, so ``exp((s - 1)/tau) <= 1`` never
    overflows; the matrix of these values is symmetric, so only its upper
    triangle is formed (one GEMM per block of rows: about half a GEMM, half
    the exponentials); backward mirrors it into a full matrix for one GEMM.  If a row's sum would
    underflow (only for tau below about 0.02 in float32), the op falls back
    to a per-row max shift.  Precision:
    where the positive outweighs the negatives a row's term is evaluated as
    log1p(sum of negative weights / positive weight), not as log-sum-exp minus
    the positive logit, so near a zero loss the error is relative to the loss
    rather than about eps/tau absolute (ops/_positive_ce.py, tests/test_precision.py).

    ``block_size=b`` (a positive int; default None: the dense path above)
    computes the same loss and gradients without ever holding the 2N x 2N
    matrix (Inf-CL, arXiv 2410.17243): the logits of b rows at a time (their
    columns on and right of the diagonal, by symmetry), an online
    (max-shifted) log-sum-exp per row in forward, the same logits recomputed
    in backward from the stored row log-sum-exps.  Memory O(N b + N d); time
    about half a GEMM and half an exponential of the matrix more than the
    dense path.  Any b works (1, a non-divisor of 2N, b >= 2N).  The same
    cancellation-free row form is used (ops/_tiled_contrastive.py).

    Reference: Chen et al. 2020, arXiv 2002.05709; google-research/simclr
    tf2/objective.py.  Backward: derivations/contrastive_backward.md#info_nce;
    tiled: derivations/contrastive_backward.md#tiled-info_nce-and-clip.
    """
    normalize = V.flag(normalize, "normalize")
    u, ncache = _unit_views(z1, z2, normalize=normalize)
    tau = V.positive(temperature, "temperature")
    block = None if block_size is None else V.positive_int(block_size, "block_size")
    n2, dt = u.shape[0], u.dtype
    if block is not None:
        per_row, a, lse = info_nce_tiled_forward(u, tau, block, cosine=normalize)
        cache = ("tiled", a, (lse, block), u, ncache, tau, _positive_entries(per_row))
        loss = np.mean(per_row, dtype=np.float64)
        return V.finite_output(dt.type(loss), "info_nce", temperature=tau), cache
    n = n2 // 2
    pos = np.einsum("ij,ij->i", u[:n], u[n:])  # cosine of each positive pair
    pos2 = np.concatenate([pos, pos])
    partner = (np.arange(n2) + n) % n2
    inv_tau = dt.type(1.0 / tau)
    w_pos = np.zeros(n2, dtype=dt)
    row_sums = np.zeros(n2, dtype=dt)
    col_sums = np.zeros((-(-n2 // _ROWS), n2), dtype=dt)  # per row block: the blocks run concurrently

    def rows(s, t):
        # E is symmetric: only its upper triangle is formed.  Row i's sum over j != i is the sum of its
        # upper part (j > i) plus the sum of column i's upper part (j < i).
        blk = e[s // _ROWS]  # the panel of rows s:t, columns s:
        # the diagonal (self-similarity) and the part below it, which the upper triangle does not use: weight 0
        blk[:, :t - s][_on_and_below_diagonal(t - s)] = -np.inf
        blk -= inv_tau
        np.exp(blk, out=blk)
        r = np.arange(t - s)
        first = s + r < n  # rows of view 1: their positive i + N is right of the diagonal
        cols = partner[s:t][first] - s
        w_pos[s:t][first] = blk[r[first], cols]  # negatives are summed apart from the positive (_positive_ce)
        blk[r[first], cols] = 0
        row_sums[s:t] = blk.sum(axis=1)
        col_sums[s // _ROWS, s:] = blk.sum(axis=0)
        blk[r[first], cols] = w_pos[s:t][first]

    if normalize:  # the single shift 1/tau bounds the logits only for cosines
        e = _gram_panels(u * dt.type(math.sqrt(1.0 / tau)))  # logits s_ij / tau, upper block triangle
        map_row_blocks(rows, n2, block=_ROWS)
        w_pos[n:] = w_pos[:n]  # E_{i+N, i} = E_{i, i+N}
    w_neg = row_sums + col_sums.sum(axis=0)
    z = w_pos + w_neg
    finfo = np.finfo(dt)
    if normalize and z.min() >= finfo.tiny / finfo.eps:
        per_row = positive_ce_from_sums(w_pos, w_neg, np.log(z) + (1.0 - pos2) / dt.type(tau))
        cache = ("symmetric", e, (1.0 / z).astype(dt), u, ncache, tau, _positive_entries(per_row))
    else:  # raw dot products, or a row sum near underflow: shift each row by its own maximum
        logits = _gram(u) * inv_tau
        np.fill_diagonal(logits, -np.inf)
        lse = logsumexp(logits, axis=1, keepdims=True)
        p = np.exp(logits - lse)
        per_row = positive_ce(p, partner, lse[:, 0] - logits[np.arange(n2), partner])
        cache = ("rowwise", p, None, u, ncache, tau, _positive_entries(per_row))
    loss = np.mean(per_row, dtype=np.float64)
    return V.finite_output(dt.type(loss), "info_nce", temperature=tau), cache


def _positive_entries(per_row):
    """(P + P^T - 2 Pi) at each positive pair (i, p(i)): (P_ip - 1) + (P_pi - 1) = expm1(-l_i) + expm1(-l_p).

    P_{i,p(i)} = exp(-l_i) for the row loss l_i, so P - 1 is written without the cancellation of a
    probability close to 1: near a zero loss the gradient keeps the loss's relative accuracy.
    """
    q = np.expm1(-per_row)
    return q + _swap_views(q, len(q) // 2)


def info_nce_backward(cache, grad_out):
    """dL/du = (g / (2N tau)) M u with M = P + P^T - 2 Pi, then the L2-normalisation backward.

    M equals P + P^T off the positive pairs; at (i, p(i)) it holds :func:`_positive_entries`.
    """
    kind, mat, extra, u, ncache, tau, at_pos = cache
    n2, dt = u.shape[0], u.dtype
    go = float(V.grad_out(grad_out, (), dt))
    partner = (np.arange(n2) + n2 // 2) % n2
    if kind == "tiled":
        lse, block = extra
        du = info_nce_tiled_backward(u, mat, lse, at_pos, tau, block)
    elif kind == "symmetric":
        # P = diag(r) E with E symmetric, so P + P^T = M = E * (r_i + r_j) off the positives: no transpose of
        # P.  Each row block forms its part of M's upper triangle from E's, then mirrors it below the
        # diagonal, so that M u is one full GEMM (products with the triangle alone are two GEMMs per block,
        # about 1.4x slower than the mirror and one GEMM together).
        r = extra
        m = np.empty((n2, n2), dt)
        n = n2 // 2

        def rows(s, t):
            blk = m[s:t, s:]
            np.add(r[s:t, None], r[None, s:], out=blk)
            blk *= mat[s // _ROWS]  # E's panel of rows s:t, columns s:
            first = np.arange(s, min(t, n))  # the positive pairs (i, i + N), i in view 1
            m[first, first + n] = at_pos[first]
            diag = blk[:, :t - s]
            diag += diag.T  # E is zero on and below the diagonal of its block: now symmetric, zero diagonal
            _mirror_below(m, s, t)  # rows below this block: disjoint from every other block's writes

        map_row_blocks(rows, n2, block=_ROWS)
        du = m @ u
    else:
        m = mat + mat.T
        m[np.arange(n2), partner] = at_pos
        du = m @ u
    du *= dt.type(go / (n2 * tau))
    return _split_grad(du, ncache, n2 // 2)


def _views_example(rng, dtype=np.float64, min_rows=1):
    n, d = rng.integers(min_rows, 7), rng.integers(2, 9)
    z1 = rng.standard_normal((n, d))
    z2 = z1 + 0.5 * rng.standard_normal((n, d))  # correlated views, like two augmentations
    return z1.astype(dtype), z2.astype(dtype)


def _with_block_size(rng, kwargs, n_rows):
    """Half the examples take the tiled path, with a block size from 1 to past the number of rows."""
    if rng.random() < 0.5:
        kwargs["block_size"] = int(rng.integers(1, n_rows + 2))
    return kwargs


def _info_nce_example(rng, dtype=np.float64):
    z1, z2 = _views_example(rng, dtype)
    return (z1, z2), _with_block_size(rng, {"temperature": 0.1}, 2 * len(z1))


register(
    "info_nce",
    forward=info_nce_forward,
    backward=info_nce_backward,
    example=_info_nce_example,
    differentiable=(0, 1),
    reference="Chen et al. 2020 (SimCLR), arXiv 2002.05709; google-research/simclr tf2/objective.py "
              "(add_contrastive_loss)",
    derivation="derivations/contrastive_backward.md#info_nce",
    hyper_ranges={"temperature": Range(0.05, 5.0)},
)


# ------------------------------------------------------------------------------------ debiased_info_nce


def debiased_info_nce_forward(z1, z2, *, temperature=0.5, tau_plus=0.1):
    """Debiased contrastive loss (Chuang et al. 2020), computed in the log domain.

    With u, s_ij and p(i) as in ``info_nce``, t = temperature, N_n = 2N - 2
    negatives per anchor, pos_i = exp(s_{i,p(i)}/t) and
    neg_i = sum_{j not in {i, p(i)}} exp(s_ij/t)::

        Ng_i = max( (neg_i - tau_plus N_n pos_i) / (1 - tau_plus),  N_n exp(-1/t) )
        L    = 1/(2N) sum_i -log( pos_i / (pos_i + Ng_i) )

    The clamp N_n e^{-1/t} is the smallest value the negative sum can take on
    the unit sphere.  tau_plus = 0 gives ``info_nce`` exactly.  The official
    code exponentiates raw similarities; here every exponential is shifted by
    the row maximum and the clamp is compared in log space, so tiny t neither
    overflows nor takes log(0).

    Shapes: z1, z2 (N, D) with N >= 2 (the estimator needs negatives) -> scalar.
    tau_plus in [0, 1).  Gradients to both views.

    Reference: Chuang et al. 2020, arXiv 2007.00224; chingyaoc/DCL main.py.
    Backward: derivations/contrastive_backward.md#debiased_info_nce.
    """
    u, ncache = _unit_views(z1, z2, min_rows=2)
    t = V.positive(temperature, "temperature")
    tp = V.in_range(tau_plus, "tau_plus", 0.0, 1.0, high_open=True)
    n2, dt = u.shape[0], u.dtype
    n, n_neg = n2 // 2, n2 - 2
    a = _gram(u) / dt.type(t)  # logits
    np.fill_diagonal(a, -np.inf)
    idx = np.arange(n2)
    partner = (idx + n) % n2
    m = a.max(axis=1)
    a_pos = a[idx, partner] - m
    w = np.exp(a - m[:, None])  # shifted exponentials; w[i, i] = 0
    pos = w[idx, partner]
    neg = w.sum(axis=1) - pos
    est = (neg - tp * n_neg * pos) / (1.0 - tp)
    log_clamp = math.log(n_neg) - 1.0 / t - m
    with np.errstate(divide="ignore", invalid="ignore"):
        log_est = np.log(est)
    active = ~(log_est > log_clamp)  # clamp wins (also when est <= 0)
    log_ng = np.where(active, log_clamp, log_est)
    log_s = np.logaddexp(a_pos, log_ng)
    loss = np.mean(log_s - a_pos)
    cache = (w, log_s, a_pos, active, partner, u, ncache, t, tp)
    return V.finite_output(dt.type(loss), "debiased_info_nce", temperature=t, tau_plus=tp), cache


def debiased_info_nce_backward(cache, grad_out):
    """Row gradients w.r.t. the logits, symmetrised through s = u u^T; see the derivation."""
    w, log_s, a_pos, active, partner, u, ncache, t, tp = cache
    n2, dt = u.shape[0], u.dtype
    go = float(V.grad_out(grad_out, (), dt))
    n_neg = n2 - 2
    idx = np.arange(n2)
    inv_s = np.exp(-log_s)  # 1 / (pos + Ng) in the shifted units of each row
    live = (~active).astype(dt)
    # negatives: dL_i/da_ij = [clamp inactive] w_ij / ((1 - tau+) S_i)
    g = w * (live * inv_s / (1.0 - tp))[:, None]
    # positive: -1 + pos/S (1 - [inactive] tau+ N_n / (1 - tau+))
    pos_share = np.exp(a_pos - log_s)
    g[idx, partner] = -1.0 + pos_share * (1.0 - live * tp * n_neg / (1.0 - tp))
    g *= dt.type(go / (n2 * t))
    du = (g + g.T) @ u
    return _split_grad(du, ncache, n2 // 2)


register(
    "debiased_info_nce",
    forward=debiased_info_nce_forward,
    backward=debiased_info_nce_backward,
    example=lambda rng, dtype=np.float64: (_views_example(rng, dtype, min_rows=2),
                                           {"temperature": 0.5, "tau_plus": 0.1}),
    differentiable=(0, 1),
    reference="Chuang et al. 2020, arXiv 2007.00224; chingyaoc/DCL main.py",
    derivation="derivations/contrastive_backward.md#debiased_info_nce",
    hyper_ranges={"temperature": Range(0.05, 5.0), "tau_plus": Range(0.0, 0.3, log=False)},
)
