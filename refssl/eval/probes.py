"""Probes of what a frozen representation encodes: a linear probe (multinomial logistic regression) and
k-nearest-neighbour classification, per latent factor, and the table "which factors does this
representation encode".

Both probes are trained on the train embeddings and report accuracy on the train set and on the
validation set.  The k-NN train accuracy is leave-one-out (a point is not its own neighbour).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

__all__ = ["lbfgs", "standardize", "linear_probe", "nearest_neighbors", "knn_predict", "knn_accuracy",
           "factor_table", "table_markdown"]


def _features(x, name):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of shape (N, D), got {type(x).__name__}")
    if x.dtype.kind not in "fbiu":
        raise TypeError(f"{name} must be a numeric array, got dtype {x.dtype}")
    x = x.reshape(len(x), -1) if x.ndim > 2 else x
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, D) with N, D >= 1, got shape {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _labels(y, name, n):
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer numpy array of shape ({n},)")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got shape {y.shape}")
    if n and y.min() < 0:
        raise ValueError(f"{name} must be >= 0")
    return y.astype(np.int64)


def _dot(a, b):
    # an elementwise product and sum rather than BLAS: on a busy machine a multi-threaded BLAS dot of a
    # long vector can cost milliseconds, which dominates the optimiser's bookkeeping
    return float(np.sum(a * b))


def lbfgs(fun, x0, *, max_iter=100, memory=10, gtol=1e-6):
    """Minimise a smooth function with L-BFGS (Nocedal & Wright, Algorithm 7.4/7.5) and a backtracking
    Armijo line search.  ``fun(x) -> (value, gradient)``.  Returns ``(x, value, n_iter)``.

    A small self-contained implementation: scipy's L-BFGS-B spends far longer in its own bookkeeping than in
    the probe's gradient once there are tens of thousands of parameters (raw-pixel probes).
    """
    x = np.array(x0, dtype=np.float64)
    f, g = fun(x)
    s_hist, y_hist = [], []
    it = 0
    for it in range(1, int(max_iter) + 1):
        if np.max(np.abs(g)) < gtol:
            break
        # two-loop recursion: d = -H g with the implicit inverse-Hessian approximation
        q = g.copy()
        alphas = []
        for s_, y_ in zip(reversed(s_hist), reversed(y_hist)):
            a = _dot(s_, q) / _dot(y_, s_)
            alphas.append(a)
            q -= a * y_
        if s_hist:
            q *= _dot(s_hist[-1], y_hist[-1]) / _dot(y_hist[-1], y_hist[-1])
        else:
            q /= max(np.linalg.norm(g), 1e-12)  # first step of unit length
        for (s_, y_), a in zip(zip(s_hist, y_hist), reversed(alphas)):
            q += (a - _dot(y_, q) / _dot(y_, s_)) * s_
        d = -q
        slope = _dot(g, d)
        if slope >= 0:  # not a descent direction (numerical trouble): restart from steepest descent
            s_hist, y_hist = [], []
            d, slope = -g, -_dot(g, g)
        step = 1.0
        for _ in range(40):
            f_new, g_new = fun(x + step * d)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no decrease found: at the optimum up to rounding
        s_vec, y_vec = step * d, g_new - g
        if _dot(s_vec, y_vec) > 1e-12:  # keep the pair only if curvature is positive
            s_hist.append(s_vec)
            y_hist.append(y_vec)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        x, f, g = x + s_vec, f_new, g_new
    return x, f, it


def standardize(train, *others, eps=1e-8):
    """Standardise features with the train mean and standard deviation (constant features stay 0).

    Returns the standardised train array followed by the others (float64)."""
    train = np.asarray(train, dtype=np.float64)
    mu = train.mean(axis=0)
    sd = train.std(axis=0)
    sd = np.where(sd > eps, sd, 1.0)
    out = [(train - mu) / sd] + [(np.asarray(o, dtype=np.float64) - mu) / sd for o in others]
    return out[0] if not others else tuple(out)


def linear_probe(train_x, train_y, val_x=None, val_y=None, *, n_classes=None, l2=1e-3,
                 max_iter=100, return_model=False):
    """Multinomial logistic regression on standardised features, fitted with L-BFGS.

    Minimises  mean_i CE(softmax(W x_i + b), y_i) + (l2 / 2) ||W||_F^2  (the bias is not penalised) with
    :func:`lbfgs` and the exact gradient  dW = X^T (P - Y) / N + l2 W,  db = 1^T (P - Y) / N.
    The two products with X run in float32 (X is standardised, so float32 is ample for a probe and
    halves the time on wide inputs such as raw pixels); the objective is accumulated in float64.

    Returns ``{"train": accuracy, "val": accuracy or None}`` (plus ``"W"``, ``"b"``, ``"mean"``,
    ``"scale"`` when ``return_model``).
    """
    train_x = _features(train_x, "train_x")
    n, d = train_x.shape
    train_y = _labels(train_y, "train_y", n)
    k = int(n_classes if n_classes is not None else train_y.max() + 1)
    if k < 2:
        raise ValueError(f"the probe needs at least 2 classes, got {k}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if val_x is not None:
        val_x = _features(val_x, "val_x")
        if val_x.shape[1] != d:
            raise ValueError(f"val_x must have {d} columns like train_x, got {val_x.shape[1]}")
        val_y = _labels(val_y, "val_y", len(val_x))
        xs, vs = standardize(train_x, val_x)
    else:
        xs, vs = standardize(train_x), None
    onehot = np.zeros((n, k))
    onehot[np.arange(n), train_y] = 1.0
    xs32 = xs.astype(np.float32)

    def loss_grad(theta):
        w = theta[: d * k].reshape(d, k)
        b = theta[d * k:]
        logp = log_softmax((xs32 @ w.astype(np.float32)).astype(np.float64) + b, axis=1)
        loss = -np.sum(logp * onehot) / n + 0.5 * l2 * np.sum(w * w)
        resid = (np.exp(logp) - onehot) / n  # d(mean CE)/d(logits)
        gw = (xs32.T @ resid.astype(np.float32)).astype(np.float64) + l2 * w
        return loss, np.concatenate([gw.ravel(), resid.sum(axis=0)])

    theta, _, _ = lbfgs(loss_grad, np.zeros(d * k + k), max_iter=max_iter)
    w = theta[: d * k].reshape(d, k)
    b = theta[d * k:]
    out = {"train": float(np.mean(np.argmax(xs @ w + b, axis=1) == train_y)),
           "val": None if vs is None else float(np.mean(np.argmax(vs @ w + b, axis=1) == val_y))}
    if return_model:
        mu = np.asarray(train_x, dtype=np.float64).mean(axis=0)
        sd = np.asarray(train_x, dtype=np.float64).std(axis=0)
        out.update(W=w, b=b, mean=mu, scale=np.where(sd > 1e-8, sd, 1.0))
    return out


def _distances(q, bank, metric):
    """(nq, nb) distances; for cosine, 1 - cos; for hamming, the number of differing bits of 0/1 arrays."""
    if metric == "euclidean":
        d = (q * q).sum(1)[:, None] + (bank * bank).sum(1)[None, :] - 2.0 * q @ bank.T
        return np.maximum(d, 0.0)  # squared distances rank the same as distances
    if metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        bn = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
        return 1.0 - qn @ bn.T
    if metric == "hamming":
        # For 0/1 vectors, |a xor b| = |a| + |b| - 2 a.b
        return q.sum(1)[:, None] + bank.sum(1)[None, :] - 2.0 * q @ bank.T
    raise ValueError(f"metric must be 'euclidean', 'cosine' or 'hamming', got {metric!r}")


def nearest_neighbors(query, bank, k, *, metric="euclidean", exclude_self=False, chunk=1024):
    """Indices (nq, k) of the k nearest rows of ``bank`` for every query row, nearest first.

    exclude_self : query i is bank row i (the same set) and must not be its own neighbour.
    Neighbours at equal distance are ordered by bank index.
    """
    query, bank = _features(query, "query"), _features(bank, "bank")
    # float64 inputs are compared in float64; float32 and 0/1 (bool, integer) inputs in float32, which is
    # exact for Hamming counts and twice as fast
    dt = np.float64 if np.float64 in (query.dtype, bank.dtype) else np.float32
    q, b = query.astype(dt), bank.astype(dt)
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"query and bank must have the same width, got {q.shape[1]} and {b.shape[1]}")
    nb = len(b) - (1 if exclude_self else 0)
    if not 1 <= k <= nb:
        raise ValueError(f"k must be in [1, {nb}], got {k}")
    out = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):  # blocks of queries bound the (chunk, N) distance matrix
        d = _distances(q[s:s + chunk], b, metric)
        if exclude_self:
            rows = np.arange(len(d))
            d[rows, s + rows] = np.inf
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        cand_d = np.take_along_axis(d, part, axis=1)
        # sort the k candidates by (distance, index).  argpartition may pick any of several candidates
        # tied at the k-th place; that is deterministic for given data and harmless for the accuracy.
        order = np.lexsort((part, cand_d), axis=1)
        out[s:s + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def knn_predict(train_x, train_y, query_x, *, k=1, metric="euclidean", exclude_self=False, n_classes=None):
    """Majority vote of the k nearest train points (ties between classes go to the class of the nearest
    point among the tied ones)."""
    train_y = np.asarray(train_y, dtype=np.int64)
    nn = nearest_neighbors(query_x, train_x, k, metric=metric, exclude_self=exclude_self)
    c = int(n_classes if n_classes is not None else train_y.max() + 1)
    rows = np.arange(len(nn))
    neighbour_labels = train_y[nn]
    counts = np.zeros((len(nn), c), dtype=np.int64)
    first = np.full((len(nn), c), k, dtype=np.int64)  # rank of each class's nearest neighbour
    for j in reversed(range(k)):  # k is small; within one rank each query adds one vote to one class
        counts[rows, neighbour_labels[:, j]] += 1
        first[rows, neighbour_labels[:, j]] = j
    # most votes first; among tied classes, the one with the nearest neighbour
    return np.argmax(counts * (k + 1) + (k - first), axis=1)


def knn_accuracy(train_x, train_y, val_x=None, val_y=None, *, k=1, metric="euclidean", n_classes=None):
    """k-NN accuracy: ``{"train": leave-one-out accuracy on the train set, "val": accuracy of validation
    points classified by their neighbours in the train set}``."""
    train_x = _features(train_x, "train_x")
    train_y = _labels(train_y, "train_y", len(train_x))
    pred = knn_predict(train_x, train_y, train_x, k=k, metric=metric, exclude_self=True, n_classes=n_classes)
    out = {"train": float(np.mean(pred == train_y)), "val": None}
    if val_x is not None:
        val_x = _features(val_x, "val_x")
        val_y = _labels(val_y, "val_y", len(val_x))
        pv = knn_predict(train_x, train_y, val_x, k=k, metric=metric, n_classes=n_classes)
        out["val"] = float(np.mean(pv == val_y))
    return out


def factor_table(train_emb, train_factors, val_emb, val_factors, *, name="representation", n_bins=3,
                 k=1, metric="euclidean", l2=1e-3, max_iter=100, probes=("linear", "knn"),
                 linear_features=None):
    """Which latent factors does a representation encode?

    Fits each probe on the train embeddings for every factor of :func:`refssl.data.factor_labels`
    (shape, colour, position bins, size bins) and evaluates it on train and validation.

    linear_features : optional (train, val) pair used by the linear probe instead of the embeddings (e.g.
        binary descriptors as floats while k-NN uses Hamming distance on the same bits).

    Returns ``(results, markdown)``: ``results[factor]`` is a dict with ``"chance"`` (accuracy of always
    predicting the most frequent validation class), ``"n_classes"`` and ``"<probe>_train"``,
    ``"<probe>_val"`` for each probe; ``markdown`` is the table as a string.
    """
    from ..data.shapes import factor_labels

    for p in probes:
        if p not in ("linear", "knn"):
            raise ValueError(f"probes must be among ('linear', 'knn'), got {p!r}")
    train_emb = _features(train_emb, "train_emb")
    val_emb = _features(val_emb, "val_emb")
    lab_t = factor_labels(train_factors, n_bins=n_bins)
    lab_v = factor_labels(val_factors, n_bins=n_bins)
    lin_t, lin_v = linear_features if linear_features is not None else (train_emb, val_emb)
    results = {}
    for factor, (yt, nc) in lab_t.items():
        yv = lab_v[factor][0]
        row = {"n_classes": nc, "chance": float(np.bincount(yv, minlength=nc).max() / len(yv))}
        if "linear" in probes:
            r = linear_probe(lin_t, yt, lin_v, yv, n_classes=nc, l2=l2, max_iter=max_iter)
            row["linear_train"], row["linear_val"] = r["train"], r["val"]
        if "knn" in probes:
            r = knn_accuracy(train_emb, yt, val_emb, yv, k=k, metric=metric, n_classes=nc)
            row["knn_train"], row["knn_val"] = r["train"], r["val"]
        results[factor] = row
    return results, table_markdown(results, name=name, k=k)


def table_markdown(results, *, name="representation", k=1):
    """A markdown table of :func:`factor_table` results (accuracies in percent)."""
    cols = [c for c in ("linear_train", "linear_val", "knn_train", "knn_val")
            if any(c in r for r in results.values())]
    head = {"linear_train": "linear (train)", "linear_val": "linear (val)",
            "knn_train": f"{k}-NN (train, LOO)", "knn_val": f"{k}-NN (val)"}
    lines = [f"| {name}: factor | classes | chance | " + " | ".join(head[c] for c in cols) + " |",
             "|---|---:|---:|" + "---:|" * len(cols)]
    for factor, r in results.items():
        cells = " | ".join(f"{100 * r[c]:.1f}" for c in cols)
        lines.append(f"| {factor} | {r['n_classes']} | {100 * r['chance']:.1f} | {cells} |")
    return "\n".join(lines)
