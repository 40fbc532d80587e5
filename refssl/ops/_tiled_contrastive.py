"""Memory-bounded InfoNCE and CLIP: the similarity matrix visited tile by tile (Inf-CL).

Wang et al. 2024, "Breaking the Memory Barrier", arXiv 2410.17243 (DAMO-NLP-SG/Inf-CLIP).  Neither pass
holds the (2N x 2N) or (N x N) logits: each b x b tile is formed by one small GEMM, folded into running
per-row statistics, and dropped.

* Forward: every row keeps an online log-sum-exp of its *negatives* -- a running maximum m_i and the sum
  l_i of exp(logit - m_i) -- merged tile by tile with the max-shifted update m' = max(m, tile max),
  l' = l e^(m - m') + sum exp(logits - m').  The maximum starts at the row's positive logit, so the
  positive stays out of the sums and each row's cross-entropy is evaluated without cancellation near a
  zero loss, exactly as the dense path does (ops/_positive_ce.py).  Only the per-row log-sum-exp is kept.
* Backward: each tile is recomputed and turned into its softmax entries exp(logit - lse_i) from the
  stored per-row log-sum-exp; the tile's contribution to the embedding gradients is accumulated by two
  small GEMMs.

Memory is O(N b + N d): a few b x b tiles, O(N) row statistics and the (N, d) embeddings and gradients.
InfoNCE's similarity matrix is symmetric, so only the tiles on and above the block diagonal are visited;
each serves its rows and (by transposition) its columns.  Derivation:
derivations/contrastive_backward.md#tiled-info_nce-and-clip.
"""

from __future__ import annotations

import math

import numpy as np

from .._blocks import _executor, num_threads
from ._positive_ce import positive_ce_from_sums

__all__ = ["info_nce_tiled_forward", "info_nce_tiled_backward", "clip_tiled_forward", "clip_tiled_backward"]


def _tiles(n: int, b: int, upper: bool) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) of the b x b tiles of an n x n matrix (only those on or above the diagonal if upper)."""
    edges = [(s, min(s + b, n)) for s in range(0, n, b)]
    return [(r0, r1, c0, c1) for k, (r0, r1) in enumerate(edges) for c0, c1 in edges[k if upper else 0:]]


def _in_workers(fn, tiles):
    """[fn(share) for each worker's share of ``tiles``]: the shares run concurrently on refssl's row pool.

    Each worker folds its tiles into private accumulators that the caller combines afterwards, so no
    two threads write the same array.  BLAS and numpy's ufuncs release the GIL.
    """
    workers = min(num_threads(), len(tiles))
    if workers <= 1:
        return [fn(tiles)]
    return [f.result() for f in [_executor().submit(fn, tiles[k::workers]) for k in range(workers)]]


class _Scratch:
    """Reusable b x b buffers: a tile of any shape up to b x b as a contiguous view, without a fresh
    allocation (and its page faults) per tile."""

    def __init__(self, b, dtype, count):
        self.bufs = [np.empty(b * b, dtype=dtype) for _ in range(count)]

    def get(self, k, rows, cols):
        return self.bufs[k][:rows * cols].reshape(rows, cols)


def _fold(m, l, lo, hi, s, work, axis):
    """Online log-sum-exp: fold the lines of tile ``s`` along ``axis`` (1: its rows, 0: its columns) into
    the running maxima m[lo:hi] and sums l[lo:hi] of exp(logit - m).  ``work`` is scratch of s's shape."""
    new = np.maximum(m[lo:hi], s.max(axis=axis))
    np.subtract(s, new[:, None] if axis == 1 else new[None, :], out=work)
    np.exp(work, out=work)
    l[lo:hi] *= np.exp(m[lo:hi] - new)
    l[lo:hi] += work.sum(axis=axis)
    m[lo:hi] = new


def _combine(states):
    """Merge per-worker online log-sum-exp states (m, l) of the same rows: the update is associative."""
    m = np.max([s[0] for s in states], axis=0)
    l = sum(s[1] * np.exp(s[0] - m) for s in states)
    return m, l


def _finish(pos, m, l):
    """Per-row cross-entropy and log-sum-exp from the positive logit and the negatives' running (m, l)."""
    w_pos = np.exp(pos - m)  # <= 1: m started at the positive logit
    lse = m + np.log(w_pos + l)
    return positive_ce_from_sums(w_pos, l, lse - pos), lse


def _positions(r0, r1, c0, c1, cols):
    """Tile coordinates of the entries (i, cols[i - r0]) that fall inside columns c0:c1."""
    hit = (cols >= c0) & (cols < c1)
    return np.flatnonzero(hit), cols[hit] - c0


# A tile whose log-sum-exps lie within H = |ln tiny| / 2 of each other shares one exponential (_softmax_sum):
# an entry of exp(s - c) underflows only below e^-2H, where it stands for a softmax value below e^-H (1e-19 in
# float32), which the dtype could not add to its row's sum of 1 anyway.
_SHARED_SHIFT_SPREAD = {np.dtype(np.float32): 0.5 * -math.log(np.finfo(np.float32).tiny),
                        np.dtype(np.float64): 0.5 * -math.log(np.finfo(np.float64).tiny)}


def _softmax_sum(s, lse_r, lse_c, work):
    """In place: s_ij <- exp(s_ij - lse_r[i]) + exp(s_ij - lse_c[j]), a row softmax plus a column softmax.

    Both terms are exp(s_ij - c) times exp(c - lse), with c the largest of the tile's log-sum-exps, so
    one exponential of the tile serves both (the dense path's (B3) with the tile's own shift); when the
    log-sum-exps spread too far for exp(s - c) to keep its small entries, each term gets its own shift.
    """
    c = max(lse_r.max(), lse_c.max())
    if c - min(lse_r.min(), lse_c.min()) <= _SHARED_SHIFT_SPREAD[s.dtype]:
        np.subtract(s, c, out=s)
        np.exp(s, out=s)  # <= 1: every logit is at most its row's and its column's log-sum-exp
        np.add(np.exp(c - lse_r)[:, None], np.exp(c - lse_c)[None, :], out=work)
        s *= work
    else:
        np.subtract(s, lse_r[:, None], out=work)
        np.exp(work, out=work)
        np.subtract(s, lse_c[None, :], out=s)
        np.exp(s, out=s)
        s += work


# --------------------------------------------------------------------------------------------- info_nce


def info_nce_tiled_forward(u, tau, block):
    """Per-row NT-Xent terms of the 2N stacked rows ``u`` (logits u_i . u_j / tau) in b x b tiles.

    Returns (per_row (2N,), a = u / sqrt(tau) (2N, D), lse (2N,) the log-sum-exp of each row over j != i).
    """
    n2, dt = u.shape[0], u.dtype
    n = n2 // 2
    a = u * dt.type(math.sqrt(1.0 / tau))  # a_i . a_j is the logit
    pos = np.einsum("ij,ij->i", a[:n], a[n:])
    pos = np.concatenate([pos, pos])
    partner = (np.arange(n2) + n) % n2
    b = min(block, n2)

    def fold(tiles):
        m, l = pos.copy(), np.zeros(n2, dtype=dt)  # the maximum starts at the positive, held apart
        scratch = _Scratch(b, dt, 2)
        for r0, r1, c0, c1 in tiles:
            s = scratch.get(0, r1 - r0, c1 - c0)
            np.matmul(a[r0:r1], a[c0:c1].T, out=s)
            s[_positions(r0, r1, c0, c1, partner[r0:r1])] = -np.inf  # the positive is held apart
            work = scratch.get(1, r1 - r0, c1 - c0)
            if c0 == r0:
                np.fill_diagonal(s, -np.inf)  # no self-similarity
                _fold(m, l, r0, r1, s, work, axis=1)
            else:  # S is symmetric: the tile's columns are the rows c0:c1 against r0:r1
                _fold(m, l, r0, r1, s, work, axis=1)
                _fold(m, l, c0, c1, s, work, axis=0)
        return m, l

    m, l = _combine(_in_workers(fold, _tiles(n2, b, upper=True)))
    per_row, lse = _finish(pos, m, l)
    return per_row, a, lse


def info_nce_tiled_backward(u, a, lse, at_pos, tau, block):
    """M u with M = P + P^T - 2 Pi recomputed tile by tile from the row log-sum-exps ``lse``.

    ``a`` = u / sqrt(tau) and ``lse`` (2N,) come from :func:`info_nce_tiled_forward`; ``at_pos`` (2N,)
    holds M at each positive pair (i, p(i)), written without cancellation by the caller.
    """
    n2, dt = u.shape[0], u.dtype
    partner = (np.arange(n2) + n2 // 2) % n2
    b = min(block, n2)

    def accumulate(tiles):
        du = np.zeros_like(u)
        scratch = _Scratch(b, dt, 2)
        prod = np.empty((b, u.shape[1]), dtype=dt)
        for r0, r1, c0, c1 in tiles:
            s = scratch.get(0, r1 - r0, c1 - c0)
            np.matmul(a[r0:r1], a[c0:c1].T, out=s)
            if c0 == r0:
                np.fill_diagonal(s, -np.inf)
            _softmax_sum(s, lse[r0:r1], lse[c0:c1], scratch.get(1, r1 - r0, c1 - c0))
            rows, cols = _positions(r0, r1, c0, c1, partner[r0:r1])
            s[rows, cols] = at_pos[r0 + rows]
            du[r0:r1] += np.matmul(s, u[c0:c1], out=prod[:r1 - r0])
            if c0 != r0:
                du[c0:c1] += np.matmul(s.T, u[r0:r1], out=prod[:c1 - c0])
        return du

    return sum(_in_workers(accumulate, _tiles(n2, b, upper=True)))


# ------------------------------------------------------------------------------------------------- clip


def clip_tiled_forward(ui, ut, scale, block):
    """Cross-entropies and log-sum-exps of the rows (images) and columns (texts) of scale * ui ut^T.

    Returns (ce_rows, ce_cols, lse_rows, lse_cols, pos), each (N,); pos holds the positive logits.
    """
    n, dt = ui.shape[0], ui.dtype
    pos = scale * np.einsum("ij,ij->i", ui, ut)
    b = min(block, n)
    img = ui * scale  # scale * (ui ut^T) by one GEMM per tile

    def fold(tiles):
        rows = pos.copy(), np.zeros(n, dtype=dt)  # images over texts
        cols = pos.copy(), np.zeros(n, dtype=dt)  # texts over images
        scratch = _Scratch(b, dt, 2)
        for r0, r1, c0, c1 in tiles:
            lam = scratch.get(0, r1 - r0, c1 - c0)
            np.matmul(img[r0:r1], ut[c0:c1].T, out=lam)
            if c0 == r0:
                np.fill_diagonal(lam, -np.inf)  # the positive is held apart
            work = scratch.get(1, r1 - r0, c1 - c0)
            _fold(*rows, r0, r1, lam, work, axis=1)
            _fold(*cols, c0, c1, lam, work, axis=0)
        return rows, cols

    states = _in_workers(fold, _tiles(n, b, upper=False))
    ce_rows, lse_rows = _finish(pos, *_combine([s[0] for s in states]))
    ce_cols, lse_cols = _finish(pos, *_combine([s[1] for s in states]))
    return ce_rows, ce_cols, lse_rows, lse_cols, pos


def clip_tiled_backward(ui, ut, scale, lse_rows, lse_cols, pos, block, at_diag, half):
    """dL/dui = G ut, dL/dut = G^T ui and dL/ds tile by tile, G = half e^s (P_rows + P_cols - 2 I).

    ``half`` is g / (2N) (a Python float).  The gradients are those of the normalised embeddings (the
    caller applies the L2-normalisation backward).  The diagonal of G is ``half * at_diag`` (computed
    without cancellation by the caller); dL/ds is
    half * sum_{i != j} [P_rows,ij (Lambda_ij - pos_i) + P_cols,ij (Lambda_ij - pos_j)].
    """
    n, dt = ui.shape[0], ui.dtype
    b = min(block, n)
    img = ui * scale

    def accumulate(tiles):
        d_img, d_txt = np.zeros_like(ui), np.zeros_like(ut)
        d_scale = 0.0
        scratch = _Scratch(b, dt, 3)
        for r0, r1, c0, c1 in tiles:
            lam = scratch.get(0, r1 - r0, c1 - c0)
            np.matmul(img[r0:r1], ut[c0:c1].T, out=lam)
            pr, pc = scratch.get(1, r1 - r0, c1 - c0), scratch.get(2, r1 - r0, c1 - c0)
            np.exp(np.subtract(lam, lse_rows[r0:r1, None], out=pr), out=pr)
            np.exp(np.subtract(lam, lse_cols[None, c0:c1], out=pc), out=pc)
            if c0 == r0:
                diag = np.diag_indices(r1 - r0)
                pr[diag] = pc[diag] = 0  # the positive's own terms are zero in the sum for dL/ds
            d_scale += float(np.vdot(pr, lam - pos[r0:r1, None])) + float(np.vdot(pc, lam - pos[None, c0:c1]))
            pr += pc
            if c0 == r0:
                pr[diag] = at_diag[r0:r1]
            pr *= dt.type(half) * scale
            d_img[r0:r1] += pr @ ut[c0:c1]
            d_txt[c0:c1] += pr.T @ ui[r0:r1]
        return d_img, d_txt, d_scale

    parts = _in_workers(accumulate, _tiles(n, b, upper=False))
    return sum(p[0] for p in parts), sum(p[1] for p in parts), half * sum(p[2] for p in parts)
