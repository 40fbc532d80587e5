"""Precision near a zero loss and far from the origin (issue 15).

* ``info_nce``, ``clip`` and ``moco_queue`` near a zero loss: a loss written as mean(log-sum-exp) minus
  mean(positive logit) subtracts two numbers of size 1/tau and keeps an absolute error of about
  eps/tau (3e-6 in float32 at tau = 0.01, for a true loss of 5e-15).  The ops compute each row as
  log1p(sum of the negatives' weights / the positive's weight) where the positive dominates, so the
  error is relative to the loss.  The reference below evaluates the definition in float64 from the
  same (float32) inputs, in the same cancellation-free form, written here independently.
* t-SNE / SNE: a translation does not change distances; the value must not change either beyond the
  rounding of the shifted input.
"""

import numpy as np
import pytest
from scipy.special import logsumexp as sp_lse

from refssl import registry

TAU = 0.01


def _row_ce(logits, pos_col):
    """Per-row -log softmax(logits)[pos], float64, as log1p(sum_{j != pos} exp(l_j - l_pos)) when
    the positive is the largest logit of its row (the only case tested here)."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(logits.shape[0])
    d = logits - logits[rows, pos_col][:, None]
    d[rows, pos_col] = -np.inf
    assert np.all(d < 0)
    return np.log1p(np.sum(np.exp(d), axis=1))


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _well_separated(rng, n, d, dtype):
    """Rows sqrt(2) c + e_i (c a shared unit direction): pairwise cosines 2/3, so at tau = 0.01 every
    negative weighs about e^-33 against its positive and the loss is about 1e-14."""
    c = np.zeros(d + 1)
    c[-1] = 1.0
    z = np.sqrt(2.0) * c + np.eye(d + 1)[:n]
    return z.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_info_nce_near_zero_loss_has_relative_accuracy(dtype):
    rng = np.random.default_rng(0)
    z1 = _well_separated(rng, 6, 8, dtype)
    z2 = (z1 + 1e-3 * rng.standard_normal(z1.shape)).astype(dtype)
    loss = float(registry.get("info_nce")(z1, z2, temperature=TAU))
    u = _unit(np.concatenate([z1, z2]))
    s = u @ u.T / TAU
    np.fill_diagonal(s, -np.inf)
    n2 = len(u)
    ref = np.mean(_row_ce(s, (np.arange(n2) + n2 // 2) % n2))
    assert 1e-16 < ref < 1e-10
    assert abs(loss - ref) <= 1e-3 * ref, (loss, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_near_zero_loss_has_relative_accuracy(dtype):
    rng = np.random.default_rng(1)
    img = _well_separated(rng, 5, 8, dtype)
    txt = (img + 1e-3 * rng.standard_normal(img.shape)).astype(dtype)
    s = np.asarray(np.log(1 / TAU), dtype=dtype)
    loss = float(registry.get("clip")(img, txt, s))
    logits = _unit(img) @ _unit(txt).T * np.exp(np.float64(s))
    diag = np.arange(len(img))
    ref = 0.5 * (np.mean(_row_ce(logits, diag)) + np.mean(_row_ce(logits.T, diag)))
    assert 1e-16 < ref < 1e-10
    assert abs(loss - ref) <= 1e-3 * ref, (loss, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moco_queue_near_zero_loss_has_relative_accuracy(dtype):
    rng = np.random.default_rng(2)
    keys = _well_separated(rng, 8, 8, np.float64)
    q = (keys[:4] + 1e-3 * rng.standard_normal((4, 9))).astype(dtype)
    k = keys[:4].astype(dtype)
    queue = _unit(keys[4:]).astype(dtype)
    loss = float(registry.get("moco_queue")(q, k, queue, temperature=TAU))
    qn, kn = _unit(q), _unit(k)
    logits = np.concatenate([np.sum(qn * kn, axis=1, keepdims=True), qn @ queue.astype(np.float64).T], 1) / TAU
    ref = np.mean(_row_ce(logits, np.zeros(4, dtype=int)))
    assert 1e-16 < ref < 1e-10
    assert abs(loss - ref) <= 1e-3 * ref, (loss, ref)


@pytest.mark.parametrize("name", ["info_nce", "clip", "moco_queue"])
def test_far_from_zero_the_loss_matches_the_log_sum_exp_form(name):
    """Where negatives outweigh the positive the op uses lse - positive: both forms agree."""
    op = registry.get(name)
    for seed in range(5):
        args, kwargs = op.example(np.random.default_rng(seed), np.float64)
        loss = float(op(*args, **kwargs))
        if name == "info_nce":
            u = _unit(np.concatenate(args))
            s = u @ u.T / kwargs["temperature"]
            np.fill_diagonal(s, -np.inf)
            n2 = len(u)
            ref = np.mean(sp_lse(s, axis=1) - s[np.arange(n2), (np.arange(n2) + n2 // 2) % n2])
        elif name == "clip":
            img, txt, s = args
            lg = _unit(img) @ _unit(txt).T * np.exp(s)
            ref = 0.5 * (np.mean(sp_lse(lg, axis=1) - np.diag(lg)) + np.mean(sp_lse(lg, axis=0) - np.diag(lg)))
        else:
            q, k, queue = args
            qn = _unit(q)
            lg = np.concatenate([np.sum(qn * _unit(k), 1, keepdims=True), qn @ queue.T], 1) / kwargs["temperature"]
            ref = np.mean(sp_lse(lg, axis=1) - lg[:, 0])
        np.testing.assert_allclose(loss, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["tsne", "sne"])
def test_tsne_value_and_gradient_do_not_depend_on_a_shift(name):
    op = registry.get(name)
    args, kwargs = op.example(np.random.default_rng(4), np.float64)
    y, P = args
    out, cache = op.forward(y, P, **kwargs)
    shifted = y + 1e5
    y_back = shifted - 1e5  # the shifted input, rounded: what the op can at best see
    out_s, cache_s = op.forward(shifted, P, **kwargs)
    out_b, cache_b = op.forward(y_back, P, **kwargs)
    assert abs(float(out_s) - float(out_b)) <= 1e-12 * max(1.0, abs(float(out))), (out_s, out_b, out)
    np.testing.assert_allclose(op.backward(cache_s, 1.0)[0], op.backward(cache_b, 1.0)[0], rtol=1e-9, atol=1e-12)


def test_clip_rejects_a_logit_scale_that_overflows():
    rng = np.random.default_rng(0)
    for dtype, bad in ((np.float32, 88.0), (np.float64, 709.0)):
        img, txt = rng.standard_normal((2, 4, 3)).astype(dtype)
        with pytest.raises(ValueError, match="logit_scale"):
            registry.get("clip").forward(img, txt, np.asarray(bad, dtype=dtype))
    # just inside the bound the loss and its gradients are finite
    img, txt = rng.standard_normal((2, 4, 3)).astype(np.float32)
    out, cache = registry.get("clip").forward(img, txt, np.asarray(80.0, dtype=np.float32))
    assert np.isfinite(out) and all(np.all(np.isfinite(g)) for g in registry.get("clip").backward(cache, 1.0))


def test_kernel_hyperparameter_edges():
    x = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(ValueError, match="sigma"):
        registry.get("gaussian_kernel").forward(x, x, sigma=1e-300)
    out = registry.get("student_t_kernel")(x, x, nu=1e300)  # finite logits or a ValueError naming nu
    assert np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="alpha"):
        registry.get("alignment").forward(x, x + 1.0, alpha=1e300)
