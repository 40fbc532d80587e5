"""Tiled info_nce and clip (``block_size``): equal to the dense path, memory-bounded, and the formulas of
derivations/contrastive_backward.md#tiled-info_nce-and-clip evaluated as written.

Agreement with the dense path is asserted to 1e-12 relative in float64: the loss relative to itself, each
gradient relative to its largest entry (entries that are zero by symmetry carry only rounding of that size).
"""

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import logsumexp as sp_lse

from refssl import registry
from refssl.ops import _tiled_contrastive as tiled

from .helpers import seeds

INFO = registry.get("info_nce")
CLIP = registry.get("clip")


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def views(seed, n, d, noise=0.5, dtype=np.float64):
    rng = np.random.default_rng(seed)
    z1 = rng.standard_normal((n, d))
    z2 = z1 + noise * rng.standard_normal((n, d))
    return z1.astype(dtype), z2.astype(dtype)


def run(op, args, g=1.0, **kw):
    out, cache = op.forward(*args, **kw)
    return out, op.backward(cache, g)


def assert_same(got, want, rtol):
    (out, grads), (ref, ref_grads) = got, want
    assert out.dtype == ref.dtype
    assert abs(float(out) - float(ref)) <= rtol * abs(float(ref)), (out, ref)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        scale = float(np.max(np.abs(r)))
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * scale)


def block_sizes(rows):
    """1, a non-divisor of ``rows`` (when one exists), the row count itself and beyond it."""
    return st.one_of(st.just(1), st.integers(1, rows), st.integers(rows, rows + 5),
                     st.sampled_from([b for b in range(2, rows) if rows % b] or [1]))


# ----------------------------------------------------------------------------------- equal to dense


@given(seed=seeds, data=st.data())
def test_info_nce_tiled_equals_dense_float64(seed, data):
    n, d = data.draw(st.integers(1, 12), label="N"), data.draw(st.integers(2, 8), label="d")
    tau = math.exp(data.draw(st.floats(math.log(0.02), math.log(5.0)), label="log tau"))
    normalize = data.draw(st.booleans(), label="normalize")
    b = data.draw(block_sizes(2 * n), label="block_size")
    g = data.draw(st.floats(-3, 3).filter(lambda v: abs(v) > 1e-3), label="g")
    args = views(seed, n, d, noise=data.draw(st.floats(0.05, 2.0), label="noise"))
    kw = dict(temperature=tau, normalize=normalize)
    assert_same(run(INFO, args, g, block_size=b, **kw), run(INFO, args, g, **kw), rtol=1e-12)


@given(seed=seeds, data=st.data())
def test_clip_tiled_equals_dense_float64(seed, data):
    n, d = data.draw(st.integers(1, 12), label="N"), data.draw(st.integers(2, 8), label="d")
    # beyond ln 100 as well: scales above H/2 (177 in float64) take the fold's general, max-shifted branch
    s = np.asarray(data.draw(st.floats(0.0, 7.0), label="logit_scale"))
    b = data.draw(block_sizes(n), label="block_size")
    g = data.draw(st.floats(-3, 3).filter(lambda v: abs(v) > 1e-3), label="g")
    img, txt = views(seed, n, d, noise=data.draw(st.floats(0.05, 2.0), label="noise"))
    assert_same(run(CLIP, (img, txt, s), g, block_size=b), run(CLIP, (img, txt, s), g), rtol=1e-12)


@pytest.mark.parametrize("b", [1, 3, 7, 16, 40])
def test_tiled_float32_agrees_with_dense_float32_and_float64(b):
    z1, z2 = views(0, 16, 8)
    s = np.asarray(2.7)
    for op, args, kw in [(INFO, (z1, z2), {"temperature": 0.1}), (CLIP, (z1, z2, s), {})]:
        args32 = tuple(a.astype(np.float32) for a in args)
        got = run(op, args32, block_size=b, **kw)
        assert got[0].dtype == np.float32 and all(g.dtype == np.float32 for g in got[1])
        assert_same(got, run(op, args32, **kw), rtol=2e-5)
        out64, grads64 = run(op, args, **kw)
        assert_same(got, (np.float32(out64), [g.astype(np.float32) for g in grads64]), rtol=2e-5)


def test_thread_pool_gives_the_single_thread_result(monkeypatch):
    """Panels wider than 512 columns spread their elementwise work over the thread pool in column chunks."""
    z1, z2 = views(1, 300, 6)
    s = np.asarray(3.0)
    img, txt = np.concatenate([z1, z2]), np.concatenate([z2, z1])  # N = 600 for clip
    cases = [(INFO, (z1, z2), {"temperature": 0.2, "block_size": 70}), (CLIP, (img, txt, s), {"block_size": 90})]
    monkeypatch.setenv("REFSSL_NUM_THREADS", "1")
    single = [run(op, args, **kw) for op, args, kw in cases]
    monkeypatch.setenv("REFSSL_NUM_THREADS", "3")
    for (op, args, kw), ref in zip(cases, single):
        assert_same(run(op, args, **kw), ref, rtol=1e-13)
        dense = {k: v for k, v in kw.items() if k != "block_size"}
        assert_same(run(op, args, **kw), run(op, args, **dense), rtol=1e-12)


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_dense_path_over_many_row_blocks_matches_the_definition(tau, threads, monkeypatch):
    """The dense path forms only the upper triangle of its 2N x 2N matrix, in blocks of rows (possibly on
    several threads), and reads the positives of view 2 from view 1's rows: check it against explicit
    matrices at 2N = 600, where blocks, positives and the diagonal fall everywhere."""
    monkeypatch.setenv("REFSSL_NUM_THREADS", threads)
    z1, z2 = views(5, 300, 7)
    loss, (d1, d2) = run(INFO, (z1, z2), 0.7, temperature=tau)
    u = unit(np.concatenate([z1, z2]))
    n2 = len(u)
    partner = (np.arange(n2) + n2 // 2) % n2
    s = u @ u.T / tau
    np.fill_diagonal(s, -np.inf)
    lse = sp_lse(s, axis=1)
    assert float(loss) == pytest.approx(np.mean(lse - s[np.arange(n2), partner]), rel=1e-12)
    p = np.exp(s - lse[:, None])
    du = 0.7 / (n2 * tau) * ((p + p.T) @ u - 2 * u[partner])
    expected = (du - u * np.sum(u * du, axis=1, keepdims=True)) / np.linalg.norm(np.concatenate([z1, z2]), axis=1,
                                                                                  keepdims=True)
    np.testing.assert_allclose(np.concatenate([d1, d2]), expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_with_widely_spread_log_sum_exps_uses_two_shifts(dtype):
    """Rows of very different norms (normalize=False): the tile's log-sum-exps spread beyond the shared-shift
    range of (BT4), so the tile takes one shift per row and per column, and still equals the dense path."""
    rng = np.random.default_rng(3)
    norms = np.geomspace(0.1, 40.0 if dtype == np.float64 else 6.0, 12)[:, None]
    z1 = norms * unit(rng.standard_normal((12, 5)))
    z2 = z1 + 0.1 * norms * rng.standard_normal((12, 5))
    tau = 0.05
    u = np.concatenate([z1, z2])
    lg = u @ u.T / tau
    np.fill_diagonal(lg, -np.inf)
    lse = sp_lse(lg, axis=1)
    assert np.ptp(lse) > tiled._SHARED_SHIFT_SPREAD[np.dtype(dtype)]  # the fallback is exercised
    args = (z1.astype(dtype), z2.astype(dtype))
    kw = dict(temperature=tau, normalize=False)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    assert_same(run(INFO, args, block_size=24, **kw), run(INFO, args, **kw), rtol=rtol)
    assert_same(run(INFO, args, block_size=5, **kw), run(INFO, args, **kw), rtol=rtol)


def test_small_temperature_float32_stays_finite_and_matches_float64():
    """tau = 0.01 in float32: the dense path falls back to a per-row shift; the tiled one needs none."""
    z1, z2 = views(4, 10, 6, noise=0.3)
    ref = run(INFO, (z1, z2), temperature=0.01)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        got = run(INFO, (z1.astype(np.float32), z2.astype(np.float32)), temperature=0.01, block_size=3)
    assert_same(got, (np.float32(ref[0]), [g.astype(np.float32) for g in ref[1]]), rtol=1e-4)


# ---------------------------------------------------------------------------- precision near zero loss


def _well_separated(n, d, dtype):
    """Rows sqrt(2) c + e_i: pairwise cosines 2/3, so at tau = 0.01 the loss is about 1e-14."""
    c = np.zeros(d + 1)
    c[-1] = 1.0
    return (np.sqrt(2.0) * c + np.eye(d + 1)[:n]).astype(dtype)


def _row_ce_terms(logits, pos_col):
    """float64 per-row -log softmax at pos_col, as log1p(sum exp(l_j - l_pos)), and the neg-share
    1 - softmax_pos = sum_j exp(l_j - l_pos) / (1 + sum ...), both free of cancellation."""
    rows = np.arange(logits.shape[0])
    dlt = logits - logits[rows, pos_col][:, None]
    dlt[rows, pos_col] = -np.inf
    x = np.sum(np.exp(dlt), axis=1)
    return np.log1p(x), x / (1 + x)


@pytest.mark.parametrize("block", [None, 1, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_info_nce_near_zero_loss_value_and_gradient_are_relatively_accurate(dtype, block):
    rng = np.random.default_rng(0)
    z1 = _well_separated(6, 8, np.float64)
    z2 = z1 + 1e-3 * rng.standard_normal(z1.shape)
    tau = 0.01
    (loss, (d1, d2)) = run(INFO, (z1.astype(dtype), z2.astype(dtype)), temperature=tau, block_size=block)
    # reference: the definition in float64 from the same (rounded) inputs, cancellation-free
    u = unit(np.concatenate([z1.astype(dtype), z2.astype(dtype)]).astype(np.float64))
    n2 = len(u)
    partner = (np.arange(n2) + n2 // 2) % n2
    s = u @ u.T / tau
    np.fill_diagonal(s, -np.inf)
    ce, q = _row_ce_terms(s, partner)
    assert 1e-16 < ce.mean() < 1e-10
    assert abs(float(loss) - ce.mean()) <= 1e-3 * ce.mean(), (loss, ce.mean())
    p = np.exp(s - sp_lse(s, axis=1, keepdims=True))
    m = p + p.T
    m[np.arange(n2), partner] = -(q + q[partner])  # P - 1 = -(neg share), no cancellation
    du = m @ u / (n2 * tau)
    z = np.concatenate([z1.astype(dtype), z2.astype(dtype)]).astype(np.float64)
    ref = (du - u * np.sum(u * du, axis=1, keepdims=True)) / np.linalg.norm(z, axis=1, keepdims=True)
    got = np.concatenate([d1, d2]).astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3 * np.max(np.abs(ref)))


@pytest.mark.parametrize("block", [None, 1, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_near_zero_loss_value_and_gradients_are_relatively_accurate(dtype, block):
    rng = np.random.default_rng(1)
    img = _well_separated(5, 8, np.float64)
    txt = img + 1e-3 * rng.standard_normal(img.shape)
    s = np.asarray(math.log(100.0), dtype=dtype)
    loss, (di, dt, ds) = run(CLIP, (img.astype(dtype), txt.astype(dtype), s), block_size=block)
    i64, t64 = (unit(x.astype(dtype).astype(np.float64)) for x in (img, txt))
    c = float(np.exp(np.float64(s)))
    lam = c * i64 @ t64.T
    ids = np.arange(len(img))
    ce_r, q_r = _row_ce_terms(lam, ids)
    ce_c, q_c = _row_ce_terms(lam.T, ids)
    ref = 0.5 * (ce_r.mean() + ce_c.mean())
    assert 1e-16 < ref < 1e-10
    assert abs(float(loss) - ref) <= 1e-3 * ref
    n = len(img)
    pr = np.exp(lam - sp_lse(lam, axis=1, keepdims=True))
    pc = np.exp(lam - sp_lse(lam, axis=0, keepdims=True))
    off = ~np.eye(n, dtype=bool)
    ds_ref = np.sum((pr * (lam - np.diag(lam)[:, None]) + pc * (lam - np.diag(lam)[None, :]))[off]) / (2 * n)
    G = (pr + pc) / (2 * n)
    G[ids, ids] = -(q_r + q_c) / (2 * n)
    assert abs(float(ds) - ds_ref) <= 1e-3 * abs(ds_ref), (ds, ds_ref)
    for got, x, other in ((di, img, t64), (dt, txt, i64)):
        g = c * (G if got is di else G.T) @ other
        y = unit(x.astype(dtype).astype(np.float64))
        ref_g = (g - y * np.sum(y * g, axis=1, keepdims=True)) / np.linalg.norm(x.astype(dtype), axis=1,
                                                                                 keepdims=True)
        np.testing.assert_allclose(got.astype(np.float64), ref_g, rtol=0, atol=1e-3 * np.max(np.abs(ref_g)))


# ---------------------------------------------------------------------------------------- memory bound


@pytest.mark.parametrize("name", ["info_nce", "clip"])
def test_tiled_path_never_holds_the_similarity_matrix(name, monkeypatch):
    """Peak traced memory of forward + backward with 2048 x 2048 logits stays far below that matrix."""
    monkeypatch.setenv("REFSSL_NUM_THREADS", "1")
    n, d, b = 1024, 8, 64
    rows = 2 * n  # the side of the similarity matrix: 2N for info_nce, N for clip
    z1, z2 = views(2, n if name == "info_nce" else rows, d)
    op, args = (INFO, (z1, z2)) if name == "info_nce" else (CLIP, (z1, z2, np.asarray(2.0)))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out, cache = op.forward(*args, block_size=b)
        op.backward(cache, 1.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    matrix = rows * rows * 8
    assert peak < matrix / 8, (peak, matrix)  # O(N b + N d): about 1.5 MB here, against 32 MB


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("name", ["info_nce", "clip"])
def test_block_size_is_validated_like_every_hyperparameter(name):
    op = registry.get(name)
    args, kwargs = op.example(np.random.default_rng(0), np.float64)
    kwargs.pop("block_size", None)
    for bad in (0, -1, np.int64(0), np.asarray(-2)):
        with pytest.raises(ValueError, match="block_size"):
            op.forward(*args, **kwargs, block_size=bad)
    for bad in (1.5, 2.0, np.float64(2.0), "3", True, np.bool_(True), np.ones(2, dtype=int),
                np.asarray(2.0), np.ma.masked_array(2)):
        with pytest.raises(TypeError, match="block_size"):
            op.forward(*args, **kwargs, block_size=bad)
    ref = op(*args, **kwargs, block_size=2)
    for same in (np.int64(2), np.int32(2), np.asarray(2)):
        assert op(*args, **kwargs, block_size=same) == ref


@pytest.mark.parametrize("name", ["info_nce", "clip"])
def test_tiled_backward_validates_grad_out(name):
    op = registry.get(name)
    args, kwargs = op.example(np.random.default_rng(0), np.float32)
    out, cache = op.forward(*args, **{**kwargs, "block_size": 2})
    for bad in (None, "1", True, np.ones(1), np.full((), np.nan), np.ones((), dtype=int)):
        with pytest.raises((TypeError, ValueError), match="grad_out"):
            op.backward(cache, bad)
    grads = op.backward(cache, 1)
    assert all(g.dtype == np.float32 for g in grads)


def test_registered_examples_exercise_both_paths():
    for name in ("info_nce", "clip"):
        kws = [registry.example(name, seed)[1] for seed in range(20)]
        assert any("block_size" in k for k in kws) and any("block_size" not in k for k in kws), name


# ------------------------------------------------------------------------------------- the derivation


@pytest.mark.derivation("contrastive_backward.md#BT1")
@given(seed=seeds, scale=st.floats(0.1, 1000.0))
def test_online_log_sum_exp_update(seed, scale):
    """(BT1) applied chunk by chunk, started at a 'positive' logit, gives the log-sum-exp of everything."""
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal(int(rng.integers(1, 40)))
    pos = scale * rng.standard_normal()
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=min(len(x) - 1, int(rng.integers(0, 5))), replace=False))
    m, ell = pos, 0.0
    for chunk in np.split(x, cuts):
        m_new = max(m, chunk.max())
        ell = ell * math.exp(m - m_new) + np.sum(np.exp(chunk - m_new))
        m = m_new
    w = math.exp(pos - m)
    assert w <= 1 and m + math.log(w + ell) == pytest.approx(sp_lse(np.append(x, pos)), rel=1e-13, abs=1e-13)
    # the op's fold of a panel, applied to two column pieces in turn, keeps the same invariant for every
    # row, and folds the panel's columns into the column states at the same time
    panel = scale * rng.standard_normal((3, len(x) + 2))
    m_r, l_r = np.full(3, pos), np.zeros(3)
    m_c, l_c = np.full(panel.shape[1], pos), np.zeros(panel.shape[1])
    cut = int(rng.integers(0, panel.shape[1] + 1))
    for lo, hi in ((0, cut), (cut, panel.shape[1])):
        if hi > lo:
            tiled._fold(panel[:, lo:hi].copy(), m_r, l_r, m_c[lo:hi], l_c[lo:hi])
    np.testing.assert_allclose(m_r + np.log(np.exp(pos - m_r) + l_r), sp_lse(np.c_[panel, np.full(3, pos)], axis=1),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(m_c + np.log(np.exp(pos - m_c) + l_c), sp_lse(np.r_[panel, [np.full(panel.shape[1],
                               pos)]], axis=0), rtol=1e-13, atol=1e-13)


@pytest.mark.derivation("contrastive_backward.md#BT2")
@given(seed=seeds, tau=st.floats(0.01, 5.0))
def test_finishing_a_row_gives_its_cross_entropy(seed, tau):
    """(BT2) from (m, l) of the negatives equals -log softmax at the positive; near zero it is log1p."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, int(rng.integers(0, 12))) / tau  # negatives' logits
    pos = rng.uniform(-1, 1) / tau
    m = max(pos, x.max()) if len(x) else pos
    ell = float(np.sum(np.exp(x - m)))
    w = math.exp(pos - m)
    lse = m + math.log(w + ell)
    term = math.log1p(ell / w) if w >= ell else lse - pos
    assert term == pytest.approx(sp_lse(np.append(x, pos)) - pos, rel=1e-12, abs=1e-12 / tau)
    assert lse == pytest.approx(sp_lse(np.append(x, pos)), rel=1e-13, abs=1e-13)
    ce, _ = tiled._finish(np.asarray([pos]), np.asarray([m]), np.asarray([ell]))
    assert float(ce[0]) == pytest.approx(term, rel=1e-14, abs=1e-300)


@pytest.mark.derivation("contrastive_backward.md#BT3")
@given(seed=seeds, tau=st.floats(0.05, 5.0), data=st.data())
def test_recomputed_tile_backward_formula(seed, tau, data):
    """(BT3): accumulate M_RC U_C and M_RC^T U_R over the tiles R <= C, M from the stored lse only."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 7)), int(rng.integers(2, 6))
    b = data.draw(block_sizes(2 * n), label="block_size")
    z1, z2 = rng.standard_normal((2, n, d))
    u = unit(np.concatenate([z1, z2]))
    n2 = 2 * n
    partner = (np.arange(n2) + n) % n2
    full = u @ u.T / tau
    np.fill_diagonal(full, -np.inf)
    lse = sp_lse(full, axis=1)
    ell = lse - full[np.arange(n2), partner]
    du = np.zeros_like(u)
    edges = list(range(0, n2, b)) + [n2]
    for i, (r0, r1) in enumerate(zip(edges, edges[1:])):
        for c0, c1 in list(zip(edges, edges[1:]))[i:]:
            s = u[r0:r1] @ u[c0:c1].T / tau
            rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
            s[rr == cc] = -np.inf
            m = np.exp(s - lse[r0:r1, None]) + np.exp(s - lse[None, c0:c1])
            at_pos = partner[rr] == cc
            m[at_pos] = (np.expm1(-ell) + np.expm1(-ell[partner]))[rr[at_pos]]
            du[r0:r1] += m @ u[c0:c1]
            if c0 != r0:
                du[c0:c1] += m.T @ u[r0:r1]
    du /= n2 * tau
    d1, d2 = run(INFO, (z1, z2), temperature=tau, block_size=b)[1]
    expected = du - u * np.sum(u * du, axis=1, keepdims=True)
    expected /= np.linalg.norm(np.concatenate([z1, z2]), axis=1, keepdims=True)
    np.testing.assert_allclose(np.concatenate([d1, d2]), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.derivation("contrastive_backward.md#BT4")
@given(seed=seeds, tau=st.floats(0.01, 5.0))
def test_one_exponential_per_tile_entry(seed, tau):
    """(BT4): one shared shift c = max lse reproduces the two softmaxes, with e^(x - c) <= 1."""
    rng = np.random.default_rng(seed)
    u = unit(rng.standard_normal((int(rng.integers(3, 10)), 4)))
    s = u @ u.T / tau
    np.fill_diagonal(s, -np.inf)
    lse = sp_lse(s, axis=1)
    r, cidx = rng.choice(len(u), 2), rng.choice(len(u), 3)
    x = s[np.ix_(r, cidx)]
    c = max(lse[r].max(), lse[cidx].max())
    shared = np.exp(x - c)
    assert np.all(shared <= 1)
    two = np.exp(x - lse[r][:, None]) + np.exp(x - lse[cidx][None, :])
    if c - min(lse[r].min(), lse[cidx].min()) <= tiled._SHARED_SHIFT_SPREAD[np.dtype(np.float64)]:
        np.testing.assert_allclose(shared * (np.exp(c - lse[r])[:, None] + np.exp(c - lse[cidx])[None, :]), two,
                                   rtol=1e-12, atol=1e-300)
    got = x.copy()
    tiled._softmax_sum(got, lse[r], lse[cidx])
    np.testing.assert_allclose(got, two, rtol=1e-12, atol=1e-300)


@pytest.mark.derivation("contrastive_backward.md#BT5")
@given(seed=seeds, tau=st.floats(0.005, 0.05))
def test_positive_entry_without_cancellation(seed, tau):
    """(BT5): P - 1 = expm1(-l) to relative accuracy even where P rounds to 1 (a float64 reference
    from the definition in longdouble)."""
    rng = np.random.default_rng(seed)
    neg = rng.uniform(-1, 0.6, int(rng.integers(1, 6)))  # cosines of the negatives, the positive at 1
    ell = math.log1p(float(np.sum(np.exp((neg - 1) / tau))))  # the row's loss, cancellation-free
    neg_ld = np.asarray(neg, dtype=np.longdouble)
    share = np.sum(np.exp((neg_ld - 1) / np.longdouble(tau)))
    exact = -share / (1 + share)  # P_pos - 1 written without subtracting from 1
    assert math.expm1(-ell) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.derivation("contrastive_backward.md#BT6")
@given(seed=seeds, s=st.floats(0.0, 4.6), data=st.data())
def test_clip_logit_scale_gradient_from_differences(seed, s, data):
    """(BT6) equals (B4)'s sum(G Lambda) and the op's dL/ds on both paths."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    img, txt = unit(rng.standard_normal((n, 5))), unit(rng.standard_normal((n, 5)))
    c = math.exp(s)
    lam = c * img @ txt.T
    pr = np.exp(lam - sp_lse(lam, axis=1, keepdims=True))
    pc = np.exp(lam - sp_lse(lam, axis=0, keepdims=True))
    off = ~np.eye(n, dtype=bool)
    bt6 = np.sum((pr * (lam - np.diag(lam)[:, None]) + pc * (lam - np.diag(lam)[None, :]))[off]) / (2 * n)
    G = (pr + pc - 2 * np.eye(n)) / (2 * n)
    assert bt6 == pytest.approx(np.sum(G * lam), rel=1e-9, abs=1e-12)
    b = data.draw(block_sizes(n), label="block_size")
    for kw in ({}, {"block_size": b}):
        ds = run(CLIP, (img, txt, np.asarray(s)), **kw)[1][2]
        assert float(ds) == pytest.approx(bt6, rel=1e-12, abs=1e-15)
