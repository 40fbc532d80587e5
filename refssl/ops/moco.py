"""MoCo v3 (in-batch keys, 2τ scaling) and MoCo v2 (queue of negatives).

Keys come from the momentum encoder and are constants: their slots, and the
queue's, are ``None``.  The queue update is :func:`refssl.state.moco_queue_update`.
Derivation: derivations/teacher_student.md.
"""

from __future__ import annotations

import numpy as np

from .. import validation as V
from ..numerics import log_softmax
from ..registry import Range, register
from ._ts_common import ce_identity_grad, check_rows_like, check_views, clustered, grad_scalar, identity_ce
from ._positive_ce import positive_ce
from .normalize import l2_normalize_backward, l2_normalize_forward


# -- MoCo v3 ------------------------------------------------------------------------------


def moco_v3_forward(q1, q2, k1, k2, *, temperature=1.0):
    """MoCo v3 symmetrised contrastive loss with the official 2τ factor.

        L = 2τ CE(q̂1 k̂2ᵀ / τ, id) + 2τ CE(q̂2 k̂1ᵀ / τ, id)

    CE is the row-mean cross-entropy with labels 0..N-1 (the matching key);
    the negatives are the other keys of the batch (no queue).  Shapes: q1, q2
    (queries: predictor outputs of the online encoder) and k1, k2 (keys: momentum
    encoder outputs) all (N, D); returns a scalar.  Keys are stop-gradient
    (slots None).  Normalisation as torch F.normalize (eps 1e-12).  Because of
    the 2τ factor the gradient with respect to each cosine matrix,
    2 (softmax - I) / N, carries no 1/τ.  Single-process form: with several
    devices the keys are the all-gathered batch and the labels are offset by
    rank * N.

    Reference: Chen, Xie & He 2021, arXiv 2104.02057; facebookresearch/moco-v3
    moco/builder.py (contrastive_loss, forward).  solo-learn's mocov3_loss_func
    computes the same value.  Backward: derivations/teacher_student.md#moco_v3.
    """
    dtype = check_views([q1, q2, k1, k2], ["q1", "q2", "k1", "k2"])
    tau = V.positive(temperature, "temperature")
    q1n, c1 = l2_normalize_forward(q1)
    q2n, c2 = l2_normalize_forward(q2)
    k1n = l2_normalize_forward(k1)[0]
    k2n = l2_normalize_forward(k2)[0]
    ce12, prob12 = identity_ce((q1n @ k2n.T) / dtype.type(tau))
    ce21, prob21 = identity_ce((q2n @ k1n.T) / dtype.type(tau))
    loss = 2.0 * tau * (ce12 + ce21)
    return V.finite_output(dtype.type(loss), "moco_v3", temperature=tau), (c1, c2, k1n, k2n, prob12, prob21, dtype)


def moco_v3_backward(cache, grad_out):
    """dL/dS12 = 2 (softmax(S12/τ) - I) / N (the 2τ cancels 1/τ); dL/dq̂1 = dL/dS12 k̂2."""
    c1, c2, k1n, k2n, prob12, prob21, dtype = cache
    g = grad_scalar(grad_out, dtype) * dtype.type(2.0)
    dq1n = (g * ce_identity_grad(prob12)) @ k2n
    dq2n = (g * ce_identity_grad(prob21)) @ k1n
    return l2_normalize_backward(c1, dq1n)[0], l2_normalize_backward(c2, dq2n)[0], None, None


def _example_v3(rng, dtype=np.float64):
    n, d = int(rng.integers(1, 7)), int(rng.integers(2, 9))
    q1, q2 = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    keys = clustered(rng, 2 * n, d)
    args = tuple(a.astype(dtype) for a in (q1, q2, keys[:n], keys[n:]))
    return args, {"temperature": float(rng.choice([0.2, 1.0]))}


register(
    "moco_v3",
    forward=moco_v3_forward,
    backward=moco_v3_backward,
    example=_example_v3,
    differentiable=(0, 1),
    reference="Chen, Xie & He 2021, arXiv 2104.02057; facebookresearch/moco-v3 moco/builder.py",
    derivation="derivations/teacher_student.md#moco_v3",
    hyper_ranges={"temperature": Range(0.05, 2.0)},
)


# -- MoCo v2 queue InfoNCE -----------------------------------------------------------------


def moco_queue_forward(q, k, queue, *, temperature=0.2):
    """MoCo v2 InfoNCE with one positive key and a queue of negatives (label 0).

        logits_i = [ q̂_i . k̂_i,  q̂_i . Q_1, ..., q̂_i . Q_K ] / τ
        L = (1/N) sum_i -log softmax(logits_i)_0

    Shapes: q (queries, online encoder) and k (keys, momentum encoder) (N, D),
    queue (K, D); returns a scalar.  q and k are L2-normalised here (F.normalize,
    eps 1e-12).  The queue rows are used *as stored*: they are assumed to be
    L2-normalised already, which holds for the official queue (random unit
    columns at initialisation, then enqueued normalised keys; see
    :func:`refssl.state.moco_queue_update`).  The official buffer is (D, K),
    one key per column; here a key is a row.  k and queue are stop-gradient
    (slots None).  One direction only.  Identical embeddings everywhere give
    log(K + 1).  The queue is updated after the loss (keys of this step are not
    their own negatives).  Near a zero loss each row is evaluated without
    cancellation, log1p(negative weight / positive weight) (ops/_positive_ce.py).

    Reference: Chen et al. 2020, arXiv 2003.04297 (He et al. 2019, arXiv
    1911.05722); facebookresearch/moco moco/builder.py, salesforce/PCL
    pcl/builder.py (instance term).  Backward: derivations/teacher_student.md#moco_queue.
    """
    dtype = check_views([q, k], ["q", "k"])
    check_rows_like(queue, "queue", q, "q")
    tau = V.positive(temperature, "temperature")
    qn, cq = l2_normalize_forward(q)
    kn = l2_normalize_forward(k)[0]
    logits = np.concatenate([np.sum(qn * kn, axis=1, keepdims=True), qn @ queue.T], axis=1)
    ls = log_softmax(logits / dtype.type(tau), axis=1)
    prob = np.exp(ls)
    loss = np.mean(positive_ce(prob, np.zeros(len(ls), dtype=np.intp), -ls[:, 0]), dtype=np.float64)
    return V.finite_output(dtype.type(loss), "moco_queue", temperature=tau), (cq, kn, queue, prob, tau, dtype)


def moco_queue_backward(cache, grad_out):
    """dL/dlogits = (softmax - e_0) / (N τ); dL/dq̂ = d_0 k̂ + d_{1:} Q."""
    cq, kn, queue, prob, tau, dtype = cache
    n = prob.shape[0]
    d = prob.copy()
    d[:, 0] -= 1
    d *= grad_scalar(grad_out, dtype) * dtype.type(1.0 / (n * tau))
    dqn = d[:, :1] * kn + d[:, 1:] @ queue
    return l2_normalize_backward(cq, dqn)[0], None, None


def _example_queue(rng, dtype=np.float64):
    n, d, size = int(rng.integers(1, 7)), int(rng.integers(2, 9)), int(rng.integers(1, 10))
    keys = clustered(rng, n + size, d)  # positive and negative keys: see clustered
    queue = keys[n:] / np.linalg.norm(keys[n:], axis=1, keepdims=True)
    args = (rng.standard_normal((n, d)).astype(dtype), keys[:n].astype(dtype), queue.astype(dtype))
    return args, {"temperature": 0.2}


register(
    "moco_queue",
    forward=moco_queue_forward,
    backward=moco_queue_backward,
    example=_example_queue,
    differentiable=(0,),
    reference="Chen et al. 2020, arXiv 2003.04297; facebookresearch/moco moco/builder.py; "
              "salesforce/PCL pcl/builder.py",
    derivation="derivations/teacher_student.md#moco_queue",
    hyper_ranges={"temperature": Range(0.05, 1.0)},
)
