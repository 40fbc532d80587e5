"""Memory-bounded InfoNCE and CLIP: the similarity matrix visited block by block (Inf-CL).

Wang et al. 2024, "Breaking the Memory Barrier", arXiv 2410.17243 (DAMO-NLP-SG/Inf-CLIP).  Neither pass
holds the (2N x 2N) or (N x N) logits.  They are formed b rows at a time -- a (b x width) panel from one
GEMM -- folded into running per-row (and per-column) statistics, and dropped.

* Forward: every row keeps an online log-sum-exp of its *negatives* -- a running maximum m_i and the sum
  l_i of exp(logit - m_i) -- merged chunk by chunk with the max-shifted update m' = max(m, new max),
  l' = l e^(m - m') + sum exp(logits - m').  The maximum starts at the row's positive logit, so the
  positive stays out of the sums and each row's cross-entropy is evaluated without cancellation near a
  zero loss, as the dense path does (ops/_positive_ce.py).  Only the per-row log-sum-exp is kept.  A chunk
  of a panel takes one exponential for its rows and columns whenever one shift keeps every sum from
  underflowing (see _fold).
* Backward: each panel is recomputed and turned into softmax entries exp(logit - lse) from the stored
  log-sum-exps; two GEMMs per panel accumulate its contribution to the embedding gradients.

InfoNCE's logits are symmetric, so the panel of rows r0:r1 holds only the columns r0:2N (on and right of
the diagonal block): it serves its rows along its rows and the later rows along its columns, and every
pair of rows is formed once.  CLIP's panels hold all N columns; they fold into the image (row) and the
text (column) statistics.  Memory is O(N b + N d): one panel, O(N) statistics, the embeddings and their
gradients.  The elementwise work on a panel runs in column chunks on refssl's thread pool
(``_blocks.map_row_blocks``), like the dense path's row blocks; the GEMMs use the BLAS threads.
Derivation: derivations/contrastive_backward.md#tiled-info_nce-and-clip.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .._blocks import map_row_blocks
from ._positive_ce import positive_ce_from_sums

__all__ = ["info_nce_tiled_forward", "info_nce_tiled_backward", "clip_tiled_forward", "clip_tiled_backward"]

# Columns per unit of elementwise work: a (b x 256) slab of a panel is one task for the thread pool.
_CHUNK = 256

# A chunk whose log-sum-exps lie within H = |ln tiny| / 2 of each other shares one exponential
# (_softmax_sum): an entry of exp(s - c) underflows only below e^-2H, where it stands for a softmax value
# below e^-H (1e-19 in float32), which the dtype could not add to its row's sum of 1 anyway.
_SHARED_SHIFT_SPREAD = {np.dtype(np.float32): 0.5 * -math.log(np.finfo(np.float32).tiny),
                        np.dtype(np.float64): 0.5 * -math.log(np.finfo(np.float64).tiny)}

_local = threading.local()


def _scratch(shape, dtype):
    """A per-thread reusable buffer viewed as a contiguous array of ``shape`` (no allocation per chunk)."""
    size = int(np.prod(shape))
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = _local.buf = np.empty(max(size, 1), dtype=dtype)
    return buf[:size].reshape(shape)


def _chunks(fn, width):
    """fn(c0, c1) over column chunks of a panel of ``width`` columns, spread over the thread pool."""
    map_row_blocks(fn, width, block=_CHUNK)


def _fold(s, m, l, cm=None, cl=None, col_from=0, bound=None):
    """Online log-sum-exp fold of the panel ``s`` (b x w), in place of the running states.

    Rows: s's rows into (m, l) (arrays of length b).  Columns (if ``cm`` is given): s's columns from
    ``col_from`` on into (cm, cl) (length w - col_from).  Destroys ``s``.  ``bound``: a shift that no logit
    exceeds and that none lies more than H below (cosines over tau: 1/tau when 2/tau <= H); every chunk is
    then shifted by it and no maxima are taken.  m may then hold that bound rather than the true maximum:
    (BT1) needs only that no logit exceeds m, and the sums cannot underflow.

    Each chunk of columns is one task: it folds its columns into their states (no other chunk has them)
    and leaves, for every row, a partial sum and the shift it is relative to; the rows merge those after
    the tasks, by (BT1).  A chunk takes one exponential, shifted by its largest logit, when every row and
    column maximum in it lies within H of that logit (as in (BT4)); otherwise its rows and its columns
    get an exponential each, shifted by their own maxima.
    """
    b, w = s.shape
    starts = range(0, w, _CHUNK)
    row_max = np.empty((len(starts), b), dtype=s.dtype)
    shift = np.empty((len(starts), b), dtype=s.dtype)  # what each chunk's row sums are relative to
    part = np.empty((len(starts), b), dtype=s.dtype)
    spread = _SHARED_SHIFT_SPREAD[s.dtype]

    def fold_chunk(c0, c1):
        k = c0 // _CHUNK
        blk = s[:, c0:c1]
        rmax = row_max[k]
        lo = max(c0, col_from)
        cols = slice(lo - col_from, c1 - col_from) if cm is not None and lo < c1 else None
        if bound is not None:
            rmax[...] = shift[k] = bound
            np.subtract(blk, bound, out=blk)
            np.exp(blk, out=blk)
            if cols is not None:
                cnew = np.maximum(cm[cols], bound)
                cl[cols] *= np.exp(cm[cols] - cnew)
                cl[cols] += blk[:, lo - c0:].sum(axis=0) * np.exp(bound - cnew)
                cm[cols] = cnew
            blk.sum(axis=1, out=part[k])
            return
        blk.max(axis=1, out=rmax)
        maxima = rmax
        if cols is not None:
            cmax = blk[:, lo - c0:].max(axis=0)
            cnew = np.maximum(cm[cols], cmax)
            cl[cols] *= np.exp(cm[cols] - cnew)
            maxima = np.concatenate([rmax, cmax])
        top = maxima.max()
        if np.isfinite(top) and top - maxima[maxima > -np.inf].min() <= spread:
            np.subtract(blk, top, out=blk)
            np.exp(blk, out=blk)  # one exponential for the rows and the columns
            shift[k] = top
            if cols is not None:  # the factor is at most e^H wherever the column sum is not zero
                cl[cols] += blk[:, lo - c0:].sum(axis=0) * np.exp(np.minimum(top - cnew, spread))
        else:
            if cols is not None:
                t = _scratch((b, c1 - lo), s.dtype)
                np.exp(np.subtract(blk[:, lo - c0:], cnew[None, :], out=t), out=t)
                cl[cols] += t.sum(axis=0)
            np.copyto(shift[k], np.where(rmax > -np.inf, rmax, 0))  # a row with no logit here sums to 0
            np.subtract(blk, shift[k][:, None], out=blk)
            np.exp(blk, out=blk)
        blk.sum(axis=1, out=part[k])
        if cols is not None:
            cm[cols] = cnew

    _chunks(fold_chunk, w)
    new = np.maximum(m, row_max.max(axis=0))
    l *= np.exp(m - new)  # then each chunk's sums, moved from its shift to the new maximum (BT1)
    l += np.sum(part * np.exp(np.minimum(shift - new, spread)), axis=0)
    m[...] = new


def _finish(pos, m, l):
    """Per-row cross-entropy and log-sum-exp from the positive logit and the negatives' running (m, l)."""
    w_pos = np.exp(pos - m)  # <= 1: m started at the positive logit
    lse = m + np.log(w_pos + l)
    return positive_ce_from_sums(w_pos, l, lse - pos), lse


def _softmax_sum(s, lse_r, lse_c):
    """In place: s_ij <- exp(s_ij - lse_r[i]) + exp(s_ij - lse_c[j]), a row softmax plus a column softmax.

    Both terms are exp(s_ij - c) times exp(c - lse), with c the largest of the log-sum-exps, so one
    exponential serves both (the dense path's (B3) with a local shift); when the log-sum-exps spread too far
    for exp(s - c) to keep its small entries, each term gets its own shift.
    """
    c = max(lse_r.max(), lse_c.max())
    work = _scratch(s.shape, s.dtype)
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


def _panels(n, b):
    return [(r0, min(r0 + b, n)) for r0 in range(0, n, b)]


# --------------------------------------------------------------------------------------------- info_nce


def _info_nce_panel(a, r0, r1, partner, out):
    """Logits of rows r0:r1 against columns r0:2N into ``out``; returns it and the positives' positions."""
    s = out[:(r1 - r0) * (len(a) - r0)].reshape(r1 - r0, len(a) - r0)
    np.matmul(a[r0:r1], a[r0:].T, out=s)
    rows = np.arange(r1 - r0)
    s[rows, rows] = -np.inf  # no self-similarity
    cols = partner[r0:r1] - r0
    keep = cols >= 0  # positives left of column r0 were met in an earlier panel
    return s, (rows[keep], cols[keep])


def info_nce_tiled_forward(u, tau, block, cosine):
    """Per-row NT-Xent terms of the 2N stacked rows ``u`` (logits u_i . u_j / tau), b rows at a time.

    ``cosine``: the rows of u are unit vectors (at most unit: L2-normalised), so the logits are bounded.

    Returns (per_row (2N,), a = u / sqrt(tau) (2N, D), lse (2N,) the log-sum-exp of each row over j != i).
    """
    n2, dt = u.shape[0], u.dtype
    n = n2 // 2
    a = u * dt.type(math.sqrt(1.0 / tau))  # a_i . a_j is the logit
    pos = np.einsum("ij,ij->i", a[:n], a[n:])
    pos = np.concatenate([pos, pos])
    partner = (np.arange(n2) + n) % n2
    b = min(block, n2)
    m, l = pos.copy(), np.zeros(n2, dtype=dt)  # the maximum starts at the positive, held apart
    buf = np.empty(b * n2, dtype=dt)
    # cosine logits lie in [-1/tau, 1/tau]: when that range is narrow enough, 1/tau is every chunk's shift
    bound = dt.type(1.0 / tau) if cosine and 2.0 / tau <= _SHARED_SHIFT_SPREAD[dt] else None
    for r0, r1 in _panels(n2, b):
        s, positives = _info_nce_panel(a, r0, r1, partner, buf)
        s[positives] = -np.inf  # the positive is held apart
        # rows r0:r1 along the panel's rows; the later rows r1:2N along its columns (S is symmetric)
        _fold(s, m[r0:r1], l[r0:r1], m[r1:], l[r1:], col_from=r1 - r0, bound=bound)
    per_row, lse = _finish(pos, m, l)
    return per_row, a, lse


def info_nce_tiled_backward(u, a, lse, at_pos, tau, block):
    """M u with M = P + P^T - 2 Pi recomputed b rows at a time from the row log-sum-exps ``lse``.

    ``a`` = u / sqrt(tau) and ``lse`` (2N,) come from :func:`info_nce_tiled_forward`; ``at_pos`` (2N,)
    holds M at each positive pair (i, p(i)), written without cancellation by the caller.
    """
    n2, dt = u.shape[0], u.dtype
    partner = (np.arange(n2) + n2 // 2) % n2
    b = min(block, n2)
    du = np.zeros_like(u)
    buf = np.empty(b * n2, dtype=dt)
    for r0, r1 in _panels(n2, b):
        s, (rows, cols) = _info_nce_panel(a, r0, r1, partner, buf)

        def to_m(c0, c1, s=s, r0=r0, r1=r1):
            _softmax_sum(s[:, c0:c1], lse[r0:r1], lse[r0 + c0:r0 + c1])

        _chunks(to_m, s.shape[1])
        s[rows, cols] = at_pos[r0 + rows]
        # M is symmetric: the panel's rows give rows r0:r1 everything; its columns beyond the diagonal block
        # give the later rows their share (inside the block each pair is already counted along its rows)
        du[r0:r1] += s @ u[r0:]
        du[r1:] += s[:, r1 - r0:].T @ u[r0:r1]
    return du


# ------------------------------------------------------------------------------------------------- clip


def clip_tiled_forward(ui, ut, scale, block):
    """Cross-entropies and log-sum-exps of the rows (images) and columns (texts) of scale * ui ut^T.

    Returns (ce_rows, ce_cols, lse_rows, lse_cols, pos), each (N,); pos holds the positive logits.
    """
    n, dt = ui.shape[0], ui.dtype
    pos = scale * np.einsum("ij,ij->i", ui, ut)
    img = ui * scale  # scale * (ui ut^T) by one GEMM per panel
    b = min(block, n)
    mr, lr = pos.copy(), np.zeros(n, dtype=dt)  # images over texts
    mc, lc = pos.copy(), np.zeros(n, dtype=dt)  # texts over images
    buf = np.empty(b * n, dtype=dt)
    # the logits lie in [-e^s, e^s]: when that range is narrow enough, e^s is every chunk's shift
    bound = dt.type(scale) if 2.0 * float(scale) <= _SHARED_SHIFT_SPREAD[dt] else None
    for r0, r1 in _panels(n, b):
        lam = buf[:(r1 - r0) * n].reshape(r1 - r0, n)
        np.matmul(img[r0:r1], ut.T, out=lam)
        lam[np.arange(r1 - r0), np.arange(r0, r1)] = -np.inf  # the positive is held apart
        _fold(lam, mr[r0:r1], lr[r0:r1], mc, lc, bound=bound)
    ce_rows, lse_rows = _finish(pos, mr, lr)
    ce_cols, lse_cols = _finish(pos, mc, lc)
    return ce_rows, ce_cols, lse_rows, lse_cols, pos


def clip_tiled_backward(ui, ut, scale, lse_rows, lse_cols, pos, block, at_diag, half):
    """dL/dui = G ut, dL/dut = G^T ui and dL/ds, b rows at a time, G = half e^s (P_rows + P_cols - 2 I).

    ``half`` is g / (2N) (a Python float).  The gradients are those of the normalised embeddings (the
    caller applies the L2-normalisation backward).  The diagonal of G is ``half * at_diag`` (computed
    without cancellation by the caller); dL/ds is
    half * sum_{i != j} [P_rows,ij (Lambda_ij - pos_i) + P_cols,ij (Lambda_ij - pos_j)].
    """
    n, dt = ui.shape[0], ui.dtype
    img = ui * scale
    b = min(block, n)
    d_img, d_txt = np.zeros_like(ui), np.zeros_like(ut)
    d_scale = 0.0
    buf = np.empty(b * n, dtype=dt)
    factor = dt.type(half) * scale
    for r0, r1 in _panels(n, b):
        lam = buf[:(r1 - r0) * n].reshape(r1 - r0, n)
        np.matmul(img[r0:r1], ut.T, out=lam)
        rows = np.arange(r1 - r0)
        part = np.zeros(len(range(0, n, _CHUNK)))

        def to_g(c0, c1, lam=lam, r0=r0, r1=r1):
            blk = lam[:, c0:c1]
            pr = np.exp(blk - lse_rows[r0:r1, None])
            pc = np.exp(blk - lse_cols[None, c0:c1])
            own = (rows + r0 >= c0) & (rows + r0 < c1)  # the diagonal entries inside this chunk
            diag = (rows[own], rows[own] + r0 - c0)
            pr[diag] = pc[diag] = 0  # the positive's own terms are zero in the sum for dL/ds
            part[c0 // _CHUNK] = (np.vdot(pr, blk - pos[r0:r1, None]) + np.vdot(pc, blk - pos[None, c0:c1]))
            np.add(pr, pc, out=blk)
            blk[diag] = at_diag[r0:r1][own]
            blk *= factor

        _chunks(to_g, n)
        d_scale += float(part.sum())
        d_img[r0:r1] += lam @ ut
        d_txt += lam.T @ ui[r0:r1]
    return d_img, d_txt, half * d_scale
