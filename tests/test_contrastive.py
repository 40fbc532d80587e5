"""Values, conventions and errors of the contrastive family, against independent slow references.

The references below are written with explicit loops over anchors, the way
the papers state the losses, so they share no code with refssl/ops.
"""

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from refssl import registry
from refssl.ops.clip import LOGIT_SCALE_MAX, clamp_logit_scale
from refssl.ops.contrastive import NT_XENT_OFFICIAL_FACTOR

from .helpers import assert_gradients, seeds


def fwd(name, *args, **kw):
    return float(registry.get(name).forward(*args, **kw)[0])


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def views(seed, n=None, d=None, noise=0.5):
    rng = np.random.default_rng(seed)
    n = n or int(rng.integers(1, 9))
    d = d or int(rng.integers(2, 9))
    z1 = rng.standard_normal((n, d))
    return z1, z1 + noise * rng.standard_normal((n, d))


# ------------------------------------------------------------------------------------------ references


def ref_nt_xent(z1, z2, tau):
    """Paper NT-Xent: mean over the 2N anchors, self excluded, positive in the denominator."""
    u = unit(np.concatenate([z1, z2]))
    n2 = len(u)
    total = 0.0
    for i in range(n2):
        p = (i + n2 // 2) % n2
        denom = sum(math.exp(u[i] @ u[j] / tau) for j in range(n2) if j != i)
        total += -math.log(math.exp(u[i] @ u[p] / tau) / denom)
    return total / n2


def ref_simclr_tf(z1, z2, tau):
    """Official TF layout: logits [ab | aa] with aa's diagonal at -1e9; mean over N of (l_A + l_B)."""
    a, b = unit(z1), unit(z2)
    n = len(a)
    big = 1e9

    def ce(rows_pos, rows_self):
        logits = np.concatenate([rows_pos, rows_self - big * np.eye(n)], axis=1) / 1.0
        out = []
        for i in range(n):
            row = logits[i]
            m = row.max()
            out.append(m + math.log(np.exp(row - m).sum()) - row[i])
        return np.array(out)

    la = ce(a @ b.T / tau, a @ a.T / tau)
    lb = ce(b @ a.T / tau, b @ b.T / tau)
    return float(np.mean(la + lb))


def ref_supcon(zn, labels, tau, base_tau, inside=False):
    """SupContrast losses.py on already-normalised (B, V, D) features, contrast_mode 'all'."""
    b, v, _ = zn.shape
    rows = np.concatenate([zn[:, k] for k in range(v)])
    y = np.tile(labels, v)
    m = len(rows)
    total = 0.0
    for i in range(m):
        logits = np.array([rows[i] @ rows[j] / tau for j in range(m)])
        others = [j for j in range(m) if j != i]
        pos = [j for j in others if y[j] == y[i]]
        if not pos:
            continue
        mx = max(logits[j] for j in others)
        log_denom = mx + math.log(sum(math.exp(logits[j] - mx) for j in others))
        if inside:
            total += -math.log(sum(math.exp(logits[p] - log_denom) for p in pos) / len(pos))
        else:
            total += -sum(logits[p] - log_denom for p in pos) / len(pos)
    return (tau / base_tau) * total / m


def ref_clip(img, txt, s):
    i, t = unit(img), unit(txt)
    logits = math.exp(s) * i @ t.T
    n = len(i)

    def ce(mat):
        return np.mean([np.log(np.exp(mat[r] - mat[r].max()).sum()) + mat[r].max() - mat[r, r] for r in range(n)])

    return 0.5 * (ce(logits) + ce(logits.T))


def ref_dcl_official(z1, z2, t, tau_plus):
    """chingyaoc/DCL main.py with raw exponentials (fine at moderate t)."""
    u = unit(np.concatenate([z1, z2]))
    n2 = len(u)
    n_neg = n2 - 2
    total = 0.0
    for i in range(n2):
        p = (i + n2 // 2) % n2
        pos = math.exp(u[i] @ u[p] / t)
        neg = sum(math.exp(u[i] @ u[j] / t) for j in range(n2) if j not in (i, p))
        ng = max((-n_neg * tau_plus * pos + neg) / (1 - tau_plus), n_neg * math.exp(-1 / t))
        total += -math.log(pos / (pos + ng))
    return total / n2


# ------------------------------------------------------------------------------------------- info_nce


@given(seed=seeds, tau=st.floats(0.05, 5.0))
def test_info_nce_matches_loop_reference(seed, tau):
    z1, z2 = views(seed)
    assert fwd("info_nce", z1, z2, temperature=tau) == pytest.approx(ref_nt_xent(z1, z2, tau), rel=1e-10)


@given(seed=seeds, tau=st.floats(0.05, 1.0))
def test_official_tf_value_is_twice_the_paper_value(seed, tau):
    z1, z2 = views(seed)
    paper = fwd("info_nce", z1, z2, temperature=tau)
    assert ref_simclr_tf(z1, z2, tau) == pytest.approx(NT_XENT_OFFICIAL_FACTOR * paper, rel=1e-9)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_identical_embeddings_give_log_2n_minus_1(n):
    z = np.tile(np.array([[0.3, -1.2, 2.0]]), (n, 1))
    assert fwd("info_nce", z, z.copy(), temperature=0.1) == pytest.approx(math.log(2 * n - 1), abs=1e-12)


def test_info_nce_small_temperature_float32_uses_rowwise_shift_and_stays_finite():
    # tau = 0.005: exp((s - 1)/tau) underflows in float32 for most entries, so the row-max fallback must run
    z1, z2 = views(11, n=16, d=32, noise=2.0)
    out32, cache32 = registry.get("info_nce").forward(z1.astype(np.float32), z2.astype(np.float32),
                                                      temperature=0.005)
    assert cache32[0] == "rowwise"
    with np.errstate(all="raise", under="ignore"):
        grads = registry.get("info_nce").backward(cache32, 1.0)
    assert all(np.isfinite(g).all() for g in grads)
    assert float(out32) == pytest.approx(ref_nt_xent(z1, z2, 0.005), rel=1e-4)


def test_info_nce_rowwise_fallback_gradient_float64():
    z1, z2 = views(5, n=4, d=48, noise=3.0)
    out, cache = registry.get("info_nce").forward(z1, z2, temperature=0.0008)
    assert cache[0] == "rowwise"
    assert float(out) == pytest.approx(ref_nt_xent(z1, z2, 0.0008), rel=1e-10)
    assert_gradients("info_nce", (z1, z2), {"temperature": 0.0008}, rng=np.random.default_rng(0))


def test_info_nce_shape_and_dtype_errors():
    f = registry.get("info_nce").forward
    with pytest.raises(ValueError, match=r"z1 and z2 must have the same shape"):
        f(np.ones((4, 3)), np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"z1 and z2 must have the same shape"):
        f(np.ones((4, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"z1 must have shape \(N, D\)"):
        f(np.ones(4), np.ones(4))
    with pytest.raises(TypeError, match="z1 and z2 must have the same dtype"):
        f(np.ones((4, 3)), np.ones((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        f(np.ones((4, 3)), np.ones((4, 3)), temperature=0)


# --------------------------------------------------------------------------------------------- supcon


def supcon_inputs(seed, b=None, v=2, n_classes=None):
    rng = np.random.default_rng(seed)
    b = b or int(rng.integers(2, 7))
    n_classes = n_classes or int(rng.integers(1, b + 1))
    z = rng.standard_normal((b, v, 5))
    return z, rng.integers(0, n_classes, size=b)


@given(seed=seeds, tau=st.floats(0.05, 2.0), v=st.integers(1, 3))
def test_supcon_matches_official_on_normalised_input(seed, tau, v):
    z, y = supcon_inputs(seed, v=v)
    zn = unit(z)
    for inside, name in ((False, "supcon"), (True, "supcon_in")):
        got = fwd(name, zn, y, temperature=tau, base_temperature=0.07)
        assert got == pytest.approx(ref_supcon(zn, y, tau, 0.07, inside=inside), rel=1e-10, abs=1e-12)


@given(seed=seeds)
def test_supcon_normalises_inside(seed):
    z, y = supcon_inputs(seed)
    assert fwd("supcon", 3.0 * z, y) == pytest.approx(fwd("supcon", unit(z), y), rel=1e-12)


@given(seed=seeds, tau=st.floats(0.05, 2.0))
def test_supcon_with_instance_labels_is_info_nce(seed, tau):
    z1, z2 = views(seed)
    z = np.stack([z1, z2], axis=1)
    labels = np.arange(len(z1))
    expected = fwd("info_nce", z1, z2, temperature=tau)
    assert fwd("supcon", z, labels, temperature=tau) == pytest.approx(expected, rel=1e-10)
    assert fwd("supcon_in", z, labels, temperature=tau) == pytest.approx(expected, rel=1e-10)


@given(seed=seeds)
def test_supcon_in_is_below_supcon_out(seed):
    z, y = supcon_inputs(seed, v=2, n_classes=2)
    assert fwd("supcon_in", z, y) <= fwd("supcon", z, y) + 1e-12


def test_base_temperature_only_rescales():
    z, y = supcon_inputs(3, b=6)
    plain = fwd("supcon", z, y, temperature=0.1)
    assert fwd("supcon", z, y, temperature=0.1, base_temperature=0.07) == pytest.approx(plain * 0.1 / 0.07)


def test_anchor_without_positive_contributes_zero_but_counts():
    # V = 1, labels 0, 0, 1: anchor 2 has no positive; mean is over all 3 anchors
    rng = np.random.default_rng(0)
    z = unit(rng.standard_normal((3, 1, 4)))
    y = np.array([0, 0, 1])
    got = fwd("supcon", z, y, temperature=0.5)
    rows = z[:, 0]
    per = []
    for i in (0, 1):
        j = 1 - i
        logits = rows[i] @ rows.T / 0.5
        others = [k for k in range(3) if k != i]
        per.append(-(logits[j] - math.log(sum(math.exp(logits[k]) for k in others))))
    assert got == pytest.approx(sum(per) / 3, rel=1e-12)
    _, cache = registry.get("supcon").forward(z, y, temperature=0.5)
    assert np.all(np.isfinite(registry.get("supcon").backward(cache, 1.0)[0]))


def test_supcon_all_anchors_without_positives_is_zero():
    z = np.random.default_rng(1).standard_normal((4, 1, 3))
    out, cache = registry.get("supcon").forward(z, np.arange(4))
    assert float(out) == 0.0
    assert np.all(registry.get("supcon").backward(cache, 1.0)[0] == 0)


def test_supcon_errors():
    f = registry.get("supcon").forward
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        f(np.ones((3, 2, 4)), np.zeros(4, dtype=int))
    with pytest.raises(TypeError, match="labels must be an integer array"):
        f(np.ones((3, 2, 4)), np.zeros(3))
    with pytest.raises(ValueError, match=r"z must have shape \(B, V, D\) or \(M, D\)"):
        f(np.ones((3, 2, 4, 1)), np.zeros(3, dtype=int))


# ----------------------------------------------------------------------------------------------- clip


@given(seed=seeds, s=st.floats(0.0, LOGIT_SCALE_MAX))
def test_clip_matches_loop_reference(seed, s):
    img, txt = views(seed, noise=1.0)
    got = fwd("clip", img, txt, np.asarray(s))
    assert got == pytest.approx(ref_clip(img, txt, s), rel=1e-10)


def test_clip_logit_scale_gradient_is_sum_of_g_times_logits():
    img, txt = views(4, n=5)
    s = np.asarray(1.3)
    op = registry.get("clip")
    _, cache = op.forward(img, txt, s)
    ds = op.backward(cache, 1.0)[2]
    h = 1e-6
    numeric = (float(op.forward(img, txt, s + h)[0]) - float(op.forward(img, txt, s - h)[0])) / (2 * h)
    assert ds.shape == () and float(ds) == pytest.approx(numeric, rel=1e-7)


def test_clamp_logit_scale_projects_to_0_ln100():
    assert float(clamp_logit_scale(np.asarray(7.0))) == pytest.approx(math.log(100))
    assert float(clamp_logit_scale(np.asarray(-2.0))) == 0.0
    s = np.asarray(3.0, dtype=np.float32)
    out = clamp_logit_scale(s)
    assert float(out) == 3.0 and out.dtype == np.float32 and out is not s
    assert isinstance(out, np.ndarray) and out.shape == ()
    # the clamped parameter feeds straight back into the loss (update-then-clamp loop)
    img, txt = views(0, n=3)
    registry.get("clip").forward(img.astype(np.float32), txt.astype(np.float32), clamp_logit_scale(s + 9))


def test_clip_errors():
    f = registry.get("clip").forward
    img = np.ones((3, 4))
    with pytest.raises(TypeError, match="logit_scale must be a 0-d numpy float array"):
        f(img, img, 2.0)
    with pytest.raises(ValueError, match="img and txt must have the same shape"):
        f(img, np.ones((4, 4)), np.asarray(1.0))
    with pytest.raises(ValueError, match="exp\\(logit_scale\\) is finite"):
        f(img, img, np.asarray(1000.0))
    with pytest.raises(TypeError, match="must have the same dtype"):
        f(img, img, np.asarray(1.0, dtype=np.float32))


# -------------------------------------------------------------------------------------- cross_entropy


@given(seed=seeds)
def test_cross_entropy_is_dual_encoder_contrastive_with_one_hot_class_encoder(seed):
    """Seed homework: CE(f(x), y) equals the contrastive loss f(x_i) . g(y_j) over a batch holding each class once,
    when the class encoder g is the one-hot embedding."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    f = rng.standard_normal((k, k)) * 2
    y = rng.permutation(k)  # the batch holds each class once, in random order
    g = np.eye(k)[y]  # one-hot class embeddings of the batch labels
    dual_logits = f @ g.T  # image i vs class embedding of sample j
    contrastive = fwd("cross_entropy", dual_logits, np.arange(k))  # target: its own pair
    assert contrastive == pytest.approx(fwd("cross_entropy", f, y), rel=1e-12)


def test_cross_entropy_known_value_and_errors():
    logits = np.zeros((3, 4))
    assert fwd("cross_entropy", logits, np.array([0, 1, 3])) == pytest.approx(math.log(4))
    f = registry.get("cross_entropy").forward
    with pytest.raises(ValueError, match="labels must be < 4"):
        f(logits, np.array([0, 1, 4]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        f(logits, np.array([0, 1]))


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)
    with np.errstate(all="raise", under="ignore"):
        out, cache = registry.get("cross_entropy").forward(logits, np.array([1]))
        g = registry.get("cross_entropy").backward(cache, 1.0)[0]
    assert float(out) == pytest.approx(1e4, rel=1e-6)
    np.testing.assert_allclose(g, [[1.0, -1.0, 0.0]], atol=1e-6)


# --------------------------------------------------------------------------------- debiased_info_nce


@given(seed=seeds, t=st.floats(0.1, 2.0), tau_plus=st.floats(0.0, 0.3))
def test_debiased_matches_official_formula(seed, t, tau_plus):
    z1, z2 = views(seed)
    if len(z1) < 2:
        z1, z2 = np.concatenate([z1, z2]), np.concatenate([z2, z1])
    got = fwd("debiased_info_nce", z1, z2, temperature=t, tau_plus=tau_plus)
    assert got == pytest.approx(ref_dcl_official(z1, z2, t, tau_plus), rel=1e-10)


@given(seed=seeds, t=st.floats(0.05, 2.0))
def test_debiased_without_debiasing_is_info_nce(seed, t):
    z1, z2 = views(seed, n=4)
    assert fwd("debiased_info_nce", z1, z2, temperature=t, tau_plus=0.0) == pytest.approx(
        fwd("info_nce", z1, z2, temperature=t), rel=1e-10)


def test_debiased_clamp_active_and_tiny_temperature_is_finite():
    z1, z2 = views(2, n=6, d=3, noise=0.05)
    # large tau_plus makes the corrected negative sum negative -> the clamp is active for every anchor
    out, cache = registry.get("debiased_info_nce").forward(z1, z2, temperature=0.5, tau_plus=0.9)
    assert cache[3].all()
    assert float(out) == pytest.approx(ref_dcl_official(z1, z2, 0.5, 0.9), rel=1e-10)
    assert_gradients("debiased_info_nce", (z1, z2), {"temperature": 0.5, "tau_plus": 0.9})
    with np.errstate(all="raise", under="ignore"):
        out32, cache32 = registry.get("debiased_info_nce").forward(
            z1.astype(np.float32), z2.astype(np.float32), temperature=0.002, tau_plus=0.1)
        grads = registry.get("debiased_info_nce").backward(cache32, 1.0)
    assert np.isfinite(out32) and all(np.isfinite(g).all() for g in grads)


def test_debiased_errors():
    f = registry.get("debiased_info_nce").forward
    with pytest.raises(ValueError, match="tau_plus must be in"):
        f(np.ones((3, 2)), np.ones((3, 2)), tau_plus=1.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        f(np.ones((1, 2)), np.ones((1, 2)))


# ---------------------------------------------------------------------------------- alignment/uniformity


@given(seed=seeds, alpha=st.floats(0.5, 4.0))
def test_alignment_matches_definition(seed, alpha):
    x, y = (unit(v) for v in views(seed))
    expected = np.mean([np.linalg.norm(a - b) ** alpha for a, b in zip(x, y)])
    assert fwd("alignment", x, y, alpha=alpha) == pytest.approx(expected, rel=1e-12)


@given(seed=seeds, t=st.floats(0.1, 10.0))
def test_uniformity_matches_unique_pair_definition(seed, t):
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((int(rng.integers(2, 8)), 3)))
    n = len(x)
    pairs = [math.exp(-t * np.sum((x[i] - x[j]) ** 2)) for i in range(n) for j in range(i + 1, n)]
    assert fwd("uniformity", x, t=t) == pytest.approx(math.log(np.mean(pairs)), rel=1e-10, abs=1e-12)


def test_uniformity_of_identical_points_is_zero_and_large_t_is_finite():
    x = np.tile(unit(np.array([[1.0, 2.0, 2.0]])), (4, 1))
    assert fwd("uniformity", x, t=2) == pytest.approx(0.0, abs=1e-15)
    antipodal = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert fwd("uniformity", antipodal, t=500.0) == pytest.approx(-2000.0)


def test_alignment_uniformity_errors():
    with pytest.raises(ValueError, match="x and y must have the same shape"):
        registry.get("alignment").forward(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        registry.get("uniformity").forward(np.ones((1, 2)))


def ref_dot_nce(z1, z2, tau):
    u = np.concatenate([z1, z2])
    n2 = len(u)
    total = 0.0
    for i in range(n2):
        p = (i + n2 // 2) % n2
        logits = np.array([u[i] @ u[j] / tau for j in range(n2) if j != i])
        m = logits.max()
        total += m + math.log(np.exp(logits - m).sum()) - u[i] @ u[p] / tau
    return total / n2


@given(seed=seeds, tau=st.floats(0.05, 5.0))
@example(seed=1821, tau=0.07)  # a loss that rounds to 0 in the reference
def test_info_nce_unnormalised_variant(seed, tau):
    z1, z2 = views(seed)
    got = fwd("info_nce", z1, z2, temperature=tau, normalize=False)
    # The loop reference forms each row's term as log-sum-exp minus the positive logit: near a zero loss that
    # difference cancels to about eps times the largest logit (seed 1821, tau 0.07: the reference gives 0.0,
    # the op's cancellation-free form 1.2e-15), so the absolute part of the tolerance is a few such eps.
    u = np.concatenate([z1, z2])
    cancellation = 8 * np.finfo(np.float64).eps * np.abs(u @ u.T).max() / tau
    assert got == pytest.approx(ref_dot_nce(z1, z2, tau), rel=1e-10, abs=cancellation)
    assert_gradients("info_nce", (z1, z2), {"temperature": tau, "normalize": False},
                     rng=np.random.default_rng(seed))


def test_unnormalised_loss_vanishes_with_scale_normalised_does_not():
    z1, z2 = (unit(v) for v in views(8, n=6, d=8, noise=0.05))  # unit rows: each positive ranks first
    raw = [fwd("info_nce", a * z1, a * z2, temperature=0.5, normalize=False) for a in (1, 3, 10)]
    assert raw[0] > raw[1] > raw[2] and raw[2] < 1e-6
    cos = [fwd("info_nce", a * z1, a * z2, temperature=0.5) for a in (1, 3, 10)]
    assert max(cos) - min(cos) < 1e-12
    with pytest.raises(TypeError, match="normalize must be a bool"):
        fwd("info_nce", z1, z2, normalize="no")
