"""I-Con: one KL divergence between a supervisory and a learned neighbourhood distribution.

Every row ``i`` of ``p`` is a supervisory distribution ``p(.|i)`` over the
columns ``j`` (other samples, other-modality samples, or class prototypes);
every row of ``logits`` defines the learned distribution
``q(.|i) = softmax(logits_i)``.  The op is the row-mean of
``KL(p~(.|i) || q(.|i))`` with the debiased target ``p~ = (1-a) p + a u``.
Kernels that turn embeddings into logits live in :mod:`refssl.ops.icon_kernels`.
"""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..numerics import log_softmax
from ..registry import Range, register

__all__ = ["icon_forward", "icon_backward", "debias"]


def _nonnegative(p, name):
    if (p < 0).any():
        raise ValueError(f"{name} must be non-negative (a row-stochastic neighbourhood matrix), "
                         f"got minimum {p.min()}")


def debias(p, alpha, *, mask_diagonal=True):
    """The debiased target p~ = (1 - alpha) p + alpha u, row by row.

    ``u`` is uniform over the support of q: over all M columns when the
    diagonal is kept, and over the M - 1 non-self columns when it is masked.
    The paper writes ``alpha / N``; with a masked diagonal that would put mass
    ``alpha / N`` on the self entry, where ``log q = -inf`` (an infinite KL),
    so we spread the uniform mass over the ``N - 1`` admissible columns
    instead.  Rows that summed to 1 still sum to 1 and the diagonal stays 0.
    """
    n, m = p.shape
    if mask_diagonal:
        u = alpha / (m - 1)
        out = (1.0 - alpha) * p + u
        out[np.diag_indices(n)] = 0
    else:
        out = (1.0 - alpha) * p + alpha / m
    return out.astype(p.dtype, copy=False)


def icon_forward(p, logits, *, alpha=0.0, alpha_q=0.0, mask_diagonal=True, learn_p=False):
    """I-Con loss: mean over rows of KL(p~(.|i) || q~(.|i)), q = softmax(logits_i).

        p~_ij = (1 - alpha) p_ij + alpha u_j          (debiasing, see :func:`debias`)
        log q_ij = logits_ij - logsumexp_{k in S(i)} logits_ik
        q~_ij = (1 - alpha_q) q_ij + alpha_q u_j      (optional debiasing of q; alpha_q = 0: q~ = q)
        L = (1/N) sum_i sum_{j in S(i)} p~_ij (log p~_ij - log q~_ij)      (0 log 0 = 0)

    where S(i) is all M columns, or all j != i when ``mask_diagonal`` (then
    p and logits are square and p must have a zero diagonal; the diagonal of
    ``logits`` is ignored).  This is a true KL: the cross-entropy that the
    official playground code returns is ``L + mean_i H(p~_i)``, with the same
    gradient w.r.t. the logits.

    Shapes: p (N, M) >= 0, rows summing to 1 (the sum is not enforced, so a
    learned p may be checked by finite differences); logits (N, M) -> scalar.

    The paper debiases p (text) or both sides (Table 1 puts the mixture on q
    for Debiased InfoNCE Clustering); ``alpha`` and ``alpha_q`` cover all three
    readings.  ``alpha_q`` < 1 (at 1, q~ no longer depends on the logits).

    Gradients: d/dlogits = (q * rowsum(p~ w) - p~ w) / N with
    w = (1 - alpha_q) q / q~ (w = 1 without alpha_q: (q - p~)/N for
    row-stochastic p).  ``p`` is a constant target (slot ``None``) unless
    ``learn_p=True``, when d/dp = (1-alpha)(log p~ + 1 - log q~)/N on the
    support of p~ (the derivative of p log p at p~ = 0 is -inf; a learned p
    from a softmax never reaches it).

    Reference: Alshammari et al., ICLR 2025, arXiv 2504.16929 (the I-Con objective);
    ShadeAlsha/ICon model/losses.py, playground/divergences.py.
    Backward: derivations/icon.md#objective (equations IC2, IC3, IC17).
    """
    V.float_array(p, "p", ndim=2, shape_doc="(N, M)")
    V.float_array(logits, "logits", ndim=2, shape_doc="(N, M)")
    V.same_shape([p, logits], ["p", "logits"])
    V.same_dtype([p, logits], ["p", "logits"])
    alpha = V.in_range(alpha, "alpha", 0.0, 1.0)
    alpha_q = V.in_range(alpha_q, "alpha_q", 0.0, 1.0, high_open=True)
    mask_diagonal = V.flag(mask_diagonal, "mask_diagonal")
    learn_p = V.flag(learn_p, "learn_p")
    _nonnegative(p, "p")
    n, m = p.shape
    diag = None
    if mask_diagonal:
        if n != m or n < 2:
            raise ValueError(f"mask_diagonal=True needs square p and logits of shape (N, N) with N >= 2, "
                             f"got shape {p.shape}")
        diag = np.eye(n, dtype=bool)
        if (p[diag] != 0).any():
            raise ValueError("p must have a zero diagonal when mask_diagonal=True (self is excluded from q)")
        logits = np.where(diag, -np.inf, logits).astype(p.dtype, copy=False)
    pt = debias(p, alpha, mask_diagonal=mask_diagonal) if alpha > 0 else p
    logq = log_softmax(logits, axis=1)
    if diag is not None:
        logq = np.where(diag, 0, logq).astype(p.dtype, copy=False)  # p~_ii = 0: the term is absent
    logqt, w = logq, None
    if alpha_q > 0:
        # log((1 - a) q + a u) without forming q where it may underflow
        log_u = np.log(alpha_q) - np.log(m - 1 if diag is not None else m)  # log(alpha_q / |S(i)|)
        logqt = np.logaddexp(np.log1p(-alpha_q) + logq, log_u).astype(p.dtype, copy=False)
        w = np.exp(np.log1p(-alpha_q) + logq - logqt)  # (1 - a) q / q~, in (0, 1)
        if diag is not None:
            logqt[diag] = 0
            w[diag] = 0
    support = pt > 0
    logpt = np.log(np.where(support, pt, 1))  # 0 log 0 = 0
    kl = np.sum(pt * (logpt - logqt), axis=1)
    loss = kl.mean(dtype=p.dtype)
    return p.dtype.type(loss), (pt, logq, logqt, w, logpt, diag, alpha, learn_p)


def icon_backward(cache, grad_out):
    """(q rowsum(p~ w) - p~ w)/N for logits; (1-alpha)(log p~ + 1 - log q~)/N for p if learned."""
    pt, logq, logqt, w, logpt, diag, alpha, learn_p = cache
    n = pt.shape[0]
    g = float(V.grad_out(grad_out, (), pt.dtype)) / n
    q = np.exp(logq)
    if diag is not None:
        q[diag] = 0
    ptw = pt if w is None else pt * w
    dlogits = (g * (q * ptw.sum(axis=1, keepdims=True) - ptw)).astype(pt.dtype, copy=False)
    dp = None
    if learn_p:
        dp = np.where(pt > 0, (g * (1.0 - alpha)) * (logpt + 1 - logqt), 0).astype(pt.dtype, copy=False)
        if diag is not None:
            dp[diag] = 0
    return dp, dlogits


def _example(rng, dtype=np.float64):
    n = int(rng.integers(2, 7))
    mask = bool(rng.integers(0, 2))
    m = n if mask else int(rng.integers(2, 7))
    p = rng.random((n, m)) + 0.05
    if mask:
        p[np.diag_indices(n)] = 0
    p /= p.sum(axis=1, keepdims=True)
    logits = 2.0 * rng.standard_normal((n, m))
    return (p.astype(dtype), logits.astype(dtype)), {"alpha": 0.3, "alpha_q": 0.0, "mask_diagonal": mask}


register(
    "icon",
    forward=icon_forward,
    backward=icon_backward,
    example=_example,
    differentiable=(1,),
    reference="Alshammari et al. 2025, arXiv 2504.16929; ShadeAlsha/ICon model/losses.py, "
              "playground/divergences.py",
    derivation="derivations/icon.md#objective",
    hyper_ranges={"alpha": Range(0.0, 0.9, log=False), "alpha_q": Range(0.0, 0.9, log=False)},
)
