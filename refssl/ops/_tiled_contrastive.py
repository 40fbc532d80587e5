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

from ._positive_ce import positive_ce_from_sums

__all__ = ["info_nce_tiled_forward", "info_nce_tiled_backward", "clip_tiled_forward", "clip_tiled_backward"]


def _blocks(n: int, b: int) -> list[tuple[int, int]]:
    return [(s, min(s + b, n)) for s in range(0, n, b)]


def _merge(m, l, s, t, logits):
    """Fold a tile's logits (rows s:t of the running state, one row of ``logits`` each) into (m, l)."""
    new = np.maximum(m[s:t], logits.max(axis=1))
    l[s:t] = l[s:t] * np.exp(m[s:t] - new) + np.exp(logits - new[:, None]).sum(axis=1)
    m[s:t] = new


def _finish(pos, m, l):
    """Per-row cross-entropy and log-sum-exp from the positive logit and the negatives' running (m, l)."""
    w_pos = np.exp(pos - m)  # <= 1: m started at the positive logit
    lse = m + np.log(w_pos + l)
    return positive_ce_from_sums(w_pos, l, lse - pos), lse


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
    m, l = pos.copy(), np.zeros(n2, dtype=dt)
    blocks = _blocks(n2, block)
    for k, (r0, r1) in enumerate(blocks):
        rows = np.arange(r0, r1)
        cols = partner[r0:r1]
        for c0, c1 in blocks[k:]:
            s = a[r0:r1] @ a[c0:c1].T
            hit = (cols >= c0) & (cols < c1)
            s[rows[hit] - r0, cols[hit] - c0] = -np.inf  # the positive is held apart
            if c0 == r0:
                np.fill_diagonal(s, -np.inf)  # no self-similarity
                _merge(m, l, r0, r1, s)
            else:  # S is symmetric: the tile's transpose is the tile of rows c0:c1
                _merge(m, l, r0, r1, s)
                _merge(m, l, c0, c1, s.T)
    per_row, lse = _finish(pos, m, l)
    return per_row, a, lse


def info_nce_tiled_backward(u, a, lse, at_pos, tau, block):
    """M u with M = P + P^T - 2 Pi recomputed tile by tile from the row log-sum-exps ``lse``.

    ``a`` = u / sqrt(tau) and ``lse`` (2N,) come from :func:`info_nce_tiled_forward`; ``at_pos`` (2N,)
    holds M at each positive pair (i, p(i)), written without cancellation by the caller.
    """
    n2 = u.shape[0]
    partner = (np.arange(n2) + n2 // 2) % n2
    du = np.zeros_like(u)
    blocks = _blocks(n2, block)
    for k, (r0, r1) in enumerate(blocks):
        rows = np.arange(r0, r1)
        cols = partner[r0:r1]
        for c0, c1 in blocks[k:]:
            s = a[r0:r1] @ a[c0:c1].T
            if c0 == r0:
                np.fill_diagonal(s, -np.inf)
                m = np.exp(s - lse[r0:r1, None])
                m += m.T
            else:  # row r's softmax plus column c's softmax, both read off S_rc = S_cr
                m = np.exp(s - lse[r0:r1, None])
                m += np.exp(s - lse[None, c0:c1])
            hit = (cols >= c0) & (cols < c1)
            m[rows[hit] - r0, cols[hit] - c0] = at_pos[r0:r1][hit]
            du[r0:r1] += m @ u[c0:c1]
            if c0 != r0:
                du[c0:c1] += m.T @ u[r0:r1]
    return du


# ------------------------------------------------------------------------------------------------- clip


def clip_tiled_forward(ui, ut, scale, block):
    """Cross-entropies and log-sum-exps of the rows (images) and columns (texts) of scale * ui ut^T.

    Returns (ce_rows, ce_cols, lse_rows, lse_cols, pos), each (N,); pos holds the positive logits.
    """
    n, dt = ui.shape[0], ui.dtype
    pos = scale * np.einsum("ij,ij->i", ui, ut)
    mr, lr = pos.copy(), np.zeros(n, dtype=dt)  # images over texts
    mc, lc = pos.copy(), np.zeros(n, dtype=dt)  # texts over images
    blocks = _blocks(n, block)
    for r0, r1 in blocks:
        for c0, c1 in blocks:
            lam = scale * (ui[r0:r1] @ ut[c0:c1].T)
            if c0 == r0:
                np.fill_diagonal(lam, -np.inf)  # the positive is held apart
            _merge(mr, lr, r0, r1, lam)
            _merge(mc, lc, c0, c1, lam.T)
    ce_rows, lse_rows = _finish(pos, mr, lr)
    ce_cols, lse_cols = _finish(pos, mc, lc)
    return ce_rows, ce_cols, lse_rows, lse_cols, pos


def clip_tiled_backward(ui, ut, scale, lse_rows, lse_cols, pos, block, at_diag, half):
    """dL/dui = G ut, dL/dut = G^T ui and dL/ds tile by tile, G = half e^s (P_rows + P_cols - 2 I).

    ``half`` is g / (2N) (a Python float).  The gradients are those of the normalised embeddings (the
    caller applies the L2-normalisation backward).  The diagonal of G is ``half * at_diag`` (computed without cancellation by the caller); dL/ds is
    half * sum_{i != j} [P_rows,ij (Lambda_ij - pos_i) + P_cols,ij (Lambda_ij - pos_j)].
    """
    n = ui.shape[0]
    d_img, d_txt = np.zeros_like(ui), np.zeros_like(ut)
    d_scale = 0.0
    blocks = _blocks(n, block)
    for r0, r1 in blocks:
        for c0, c1 in blocks:
            lam = scale * (ui[r0:r1] @ ut[c0:c1].T)
            g = np.exp(lam - lse_rows[r0:r1, None])
            pc = np.exp(lam - lse_cols[None, c0:c1])
            if c0 == r0:
                diag = np.diag_indices(r1 - r0)
                g[diag] = pc[diag] = 0  # the positive's own terms are zero in the sum for dL/ds
            d_scale += float(np.sum(g * (lam - pos[r0:r1, None]))) + float(np.sum(pc * (lam - pos[None, c0:c1])))
            g += pc
            if c0 == r0:
                g[diag] = at_diag[r0:r1]
            g *= g.dtype.type(half) * scale
            d_img[r0:r1] += g @ ut[c0:c1]
            d_txt[c0:c1] += g.T @ ui[r0:r1]
    return d_img, d_txt, half * d_scale
