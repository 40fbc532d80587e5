"""Debiased InfoNCE Clustering (I-Con): a linear + softmax soft-clustering head on fixed features.

The supervisory distribution p of a batch joins augmentation pairs and k
nearest neighbours (optionally propagated by random-walk steps) and is debiased
by alpha inside :func:`refssl.ops.icon.icon_forward`; the learned distribution
q is the soft cluster kernel of the head's assignments phi = softmax(x W + b):

    q(j|i) = sum_c phi_ic phi_jc / sum_k phi_kc
    L = mean_i KL(p~(.|i) || q(.|i)),   p~ = (1 - alpha) p + alpha / (2B)

(optionally also q~ = (1 - alpha_q) q + alpha_q / (2B), the placement of Table 1 of the paper)

The gradient flows icon -> cluster_kernel -> softmax -> (W, b), every step the
hand-written backward of its op.  Trained with Adam on two noisy views of each
sample; evaluated by the Hungarian clustering accuracy of argmax phi.

Reference: Alshammari et al., ICLR 2025, arXiv 2504.16929 (Sec. 5, Table 1,
"Debiased InfoNCE Clustering"); ShadeAlsha/ICon model/kernel_model.py.
Derivation (p, the loss, the gradient chain and why the route through icon's
logits gives the same gradient): derivations/icon.md#debiased-infonce-clustering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import validation as V
from .clustering import clustering_accuracy
from .numerics import softmax
from .ops.icon import icon_backward, icon_forward
from .ops.icon_kernels import (augmentation_kernel, cluster_kernel_backward, cluster_kernel_forward, knn_kernel,
                               propagate)

__all__ = ["ClusteringHead", "supervisory_distribution", "head_loss_and_gradients", "fit_clustering_head"]


@dataclass
class ClusteringHead:
    """phi = softmax(x W + b): W (D, C), b (C,)."""

    W: np.ndarray
    b: np.ndarray

    def assignments(self, x):
        return softmax(x @ self.W + self.b, axis=1)

    def predict(self, x):
        return np.argmax(x @ self.W + self.b, axis=1)


def supervisory_distribution(views, *, k=3, walk_steps=1):
    """p for a batch of two views stacked view-major (2B, D): augmentation pairs + kNN, averaged.

    p_aug is uniform over the other views of the same sample; p_knn uniform over
    the k nearest neighbours by cosine similarity (self excluded), propagated
    by ``walk_steps`` random-walk steps (P + ... + P^steps, 1 = no propagation),
    with the diagonal set to 0 and rows renormalised; p = (p_aug + p_knn) / 2
    (derivations/icon.md#debiased-infonce-clustering, equation IC21).

    The paper's ImageNet recipe is "kNN (k = 3) + 1-step walks".  With walks of
    length 1 counted as P itself, that is the default ``walk_steps=1``; if the
    recipe means one step added to the kNN graph, it is ``walk_steps=2``
    (P + P^2).  The paper text does not settle which, and the official code has
    no propagation step, so the default keeps the first reading.
    """
    n_rows = views.shape[0]
    if n_rows % 2:
        raise ValueError(f"views must stack two views of B samples, (2B, D), got {views.shape}")
    p_knn = knn_kernel(views, k, metric="cosine").astype(np.float64)
    if walk_steps > 1:
        p_knn = propagate(p_knn, walk_steps)
        p_knn[np.diag_indices(n_rows)] = 0
        p_knn /= p_knn.sum(axis=1, keepdims=True)
    return 0.5 * (augmentation_kernel(n_rows // 2, 2) + p_knn)


def head_loss_and_gradients(head, x, p, *, alpha=0.6, alpha_q=0.0):
    """I-Con loss of the head on rows x (R, D) against p (R, R); returns (loss, dW, db).

    ``alpha`` debiases p, ``alpha_q`` the cluster kernel q (see :func:`refssl.ops.icon.icon_forward`).
    The gradient goes icon (logits log q) -> cluster_kernel -> softmax; the row
    constant that icon's softmax adds is removed by the softmax of the head, so
    it equals the direct chain (derivations/icon.md#debiased-infonce-clustering,
    equations IC18, IC19).
    """
    z = x @ head.W + head.b
    phi = softmax(z, axis=1)
    logq, c_kernel = cluster_kernel_forward(phi)
    loss, c_icon = icon_forward(p, logq, alpha=alpha, alpha_q=alpha_q, mask_diagonal=False)
    dlogq = icon_backward(c_icon, 1.0)[1]
    dphi = cluster_kernel_backward(c_kernel, dlogq)[0]
    dz = phi * (dphi - np.sum(dphi * phi, axis=1, keepdims=True))  # softmax backward
    return float(loss), x.T @ dz, dz.sum(axis=0)


@dataclass
class FitHistory:
    loss: list = field(default_factory=list)      # mean batch loss per epoch
    accuracy: list = field(default_factory=list)  # Hungarian accuracy on the clean features per epoch


def fit_clustering_head(x, num_clusters, rng, *, labels=None, alpha=0.6, alpha_q=0.0, k=3, walk_steps=1,
                        epochs=20, batch_size=64, lr=1e-2, noise=0.1):
    """Train a linear + softmax clustering head on fixed features x (n, D) with Adam.

    Each step draws a batch of B samples, makes two views x + noise N(0, 1)
    (stacked view-major, 2B rows), builds p with :func:`supervisory_distribution`
    (``k`` neighbours, ``walk_steps`` as documented there) and descends the
    I-Con loss.  Adam (beta = 0.9, 0.999), constant ``lr``.
    Returns (head, history); with ``labels`` the history holds the Hungarian
    accuracy of argmax phi on the clean features after every epoch.
    """
    V.float_array(x, "x", ndim=2, shape_doc="(n, D)")
    num_clusters = V.positive_int(num_clusters, "num_clusters", minimum=2)
    alpha = V.in_range(alpha, "alpha", 0.0, 1.0)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    n, d = x.shape
    head = ClusteringHead(rng.standard_normal((d, num_clusters)) * 0.1 / np.sqrt(d), np.zeros(num_clusters))
    params = [head.W, head.b]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    t = 0
    hist = FitHistory()
    for _ in range(epochs):
        order = rng.permutation(n)
        losses = []
        for start in range(0, n - batch_size + 1, batch_size):
            xb = x[order[start:start + batch_size]]
            views = np.concatenate([xb + noise * rng.standard_normal(xb.shape),
                                    xb + noise * rng.standard_normal(xb.shape)])
            p = supervisory_distribution(views, k=k, walk_steps=walk_steps)
            loss, dW, db = head_loss_and_gradients(head, views, p, alpha=alpha, alpha_q=alpha_q)
            t += 1
            for j, (prm, g) in enumerate(zip(params, (dW, db))):
                m1[j] = 0.9 * m1[j] + 0.1 * g
                m2[j] = 0.999 * m2[j] + 0.001 * g * g
                prm -= lr * (m1[j] / (1 - 0.9 ** t)) / (np.sqrt(m2[j] / (1 - 0.999 ** t)) + 1e-8)
            losses.append(loss)
        hist.loss.append(float(np.mean(losses)))
        if labels is not None:
            hist.accuracy.append(clustering_accuracy(labels, head.predict(x)))
    return head, hist
