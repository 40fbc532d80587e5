"""Masked image modelling: ops, mask generators and the VQ-KD codebook EMA.

The formulas of derivations/masked_modelling.md are evaluated as written (explicit loops and a few
numpy lines, nothing shared with refssl/ops) and compared with the code; the registry-wide tests add
finite-difference checks of every backward.  Gradient checks here use float64 central differences with
the registered tolerance (relative error 1e-6, see refssl/gradcheck.py).
"""

import math
import random

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refssl import masking, registry, state
from refssl.ops import masked_modelling as mm

from .helpers import assert_gradients, seeds

GRAD_TOL = 1e-6  # relative error of the float64 central-difference checks (gradcheck's measure)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def backward(name, *args, g=1.0, **kw):
    op = registry.get(name)
    _, cache = op.forward(*args, **kw)
    return op.backward(cache, g)


# -- patchify --------------------------------------------------------------------------------------


def _dims(seed):
    rng = np.random.default_rng(seed)
    n, c, p, h, w = (int(v) for v in rng.integers(1, 4, size=5))
    return rng, n, c, p, h, w


@pytest.mark.derivation("masked_modelling.md#MM1")
@given(seed=seeds)
def test_patchify_element_order_is_mae_order(seed):
    rng, n, c, p, h, w = _dims(seed)
    x = rng.standard_normal((n, c, h * p, w * p))
    out = mm.patchify_forward(x, patch=p)[0]
    assert out.shape == (n, h * w, p * p * c)
    for b_ in range(n):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    for a in range(p):
                        for b in range(p):
                            assert out[b_, i * w + j, (a * p + b) * c + ch] == x[b_, ch, i * p + a, j * p + b]


def test_patchify_matches_the_official_reshape_by_hand():
    # the official recipe on a 3-channel image: (N,3,h,p,w,p) -> einsum nchpwq->nhwpqc -> (N, hw, p*p*3)
    x = np.arange(2 * 3 * 4 * 6, dtype=np.float64).reshape(2, 3, 4, 6)
    p = 2
    ref = np.einsum("nchpwq->nhwpqc", x.reshape(2, 3, 2, p, 3, p)).reshape(2, 6, p * p * 3)
    np.testing.assert_array_equal(mm.patchify_forward(x, patch=p)[0], ref)


@pytest.mark.derivation("masked_modelling.md#MM2")
@given(seed=seeds)
def test_patchify_backward_is_the_inverse_permutation(seed):
    rng, n, c, p, h, w = _dims(seed)
    x = rng.standard_normal((n, c, h * p, w * p))
    # destination of every input entry, from the index map MM1
    dst = np.empty(x.size, dtype=np.int64)
    for src, (b_, ch, r, col) in enumerate(np.ndindex(x.shape)):
        i, a, j, b = r // p, r % p, col // p, col % p
        dst[src] = np.ravel_multi_index((b_, i * w + j, (a * p + b) * c + ch), (n, h * w, p * p * c))
    assert np.array_equal(np.sort(dst), np.arange(x.size))  # a permutation
    g = rng.standard_normal((n, h * w, p * p * c))
    (dx,) = backward("patchify", x, g=g, patch=p)
    np.testing.assert_array_equal(dx.reshape(-1), g.reshape(-1)[dst])  # Pi^T g: entry src <- g[dst(src)]
    np.testing.assert_array_equal(dx, mm.unpatchify(g, patch=p, channels=c, grid=(h, w)))


@given(seed=seeds)
def test_unpatchify_round_trip(seed):
    rng, n, c, p, h, w = _dims(seed)
    x = rng.standard_normal((n, c, h * p, w * p))
    y = mm.patchify_forward(x, patch=p)[0]
    np.testing.assert_array_equal(mm.unpatchify(y, patch=p, channels=c, grid=(h, w)), x)
    np.testing.assert_array_equal(mm.patchify_forward(mm.unpatchify(y, patch=p, channels=c, grid=(h, w)),
                                                      patch=p)[0], y)
    sq = rng.standard_normal((n, h * h, p * p * c))  # default square grid
    np.testing.assert_array_equal(mm.patchify_forward(mm.unpatchify(sq, patch=p, channels=c), patch=p)[0], sq)


def test_patchify_validation_and_no_aliasing():
    x = np.zeros((1, 1, 6, 4))
    with pytest.raises(ValueError, match="patch"):
        mm.patchify_forward(x, patch=4)
    with pytest.raises(TypeError, match="patch"):
        mm.patchify_forward(x, patch=2.0)
    with pytest.raises(ValueError, match="images"):
        mm.patchify_forward(np.zeros((2, 6, 4)), patch=2)
    with pytest.raises(ValueError, match="square"):
        mm.unpatchify(np.zeros((1, 6, 4)), patch=2, channels=1)
    with pytest.raises(ValueError, match="grid"):
        mm.unpatchify(np.zeros((1, 6, 4)), patch=2, channels=1, grid=(2, 2))
    with pytest.raises(ValueError, match="patch"):
        mm.unpatchify(np.zeros((1, 4, 5)), patch=2, channels=1)
    x = np.arange(4.0).reshape(1, 1, 2, 2)  # p = 1, C = 1: the reshape alone would be a view
    out = mm.patchify_forward(x, patch=1)[0]
    out[...] = -1
    np.testing.assert_array_equal(x, np.arange(4.0).reshape(1, 1, 2, 2))
    back = mm.unpatchify(out, patch=1, channels=1)
    back[...] = 7
    assert np.all(out == -1)


# -- gather_tokens -----------------------------------------------------------------------------------


@pytest.mark.derivation("masked_modelling.md#MM3")
@given(seed=seeds, repeats=st.booleans())
def test_gather_tokens_forward_and_backward_formula(seed, repeats):
    rng = np.random.default_rng(seed)
    n, length, d = int(rng.integers(1, 4)), int(rng.integers(1, 7)), int(rng.integers(1, 5))
    if repeats:
        ids = rng.integers(0, length, size=(n, int(rng.integers(1, 9))))
    else:  # a permutation prefix, as MAE's ids_keep
        ids = np.argsort(rng.random((n, length)), axis=1)[:, :int(rng.integers(1, length + 1))]
    x = rng.standard_normal((n, length, d))
    out, cache = mm.gather_tokens_forward(x, ids)
    g = rng.standard_normal(out.shape)
    dx, dids = mm.gather_tokens_backward(cache, g)
    expected_out = np.empty_like(out)
    expected_dx = np.zeros_like(x)
    for b in range(n):
        for k in range(ids.shape[1]):
            expected_out[b, k] = x[b, ids[b, k]]
        for l_ in range(length):
            for k in range(ids.shape[1]):
                if ids[b, k] == l_:
                    expected_dx[b, l_] += g[b, k]
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-14, atol=1e-14)
    assert dids is None


def test_gather_tokens_validation():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="ids"):
        mm.gather_tokens_forward(x, np.array([[0, 3], [1, 2]]))
    with pytest.raises(ValueError, match="ids"):
        mm.gather_tokens_forward(x, np.array([[0, -1], [1, 2]]))
    with pytest.raises(TypeError, match="ids"):
        mm.gather_tokens_forward(x, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="ids"):
        mm.gather_tokens_forward(x, np.zeros((3, 2), dtype=int))
    with pytest.raises(ValueError, match="grad_out"):
        mm.gather_tokens_backward(mm.gather_tokens_forward(x, np.zeros((2, 2), dtype=int))[1], np.zeros((2, 3, 4)))


# -- mae_loss ----------------------------------------------------------------------------------------


def _mae_inputs(seed, p_min=1):
    rng = np.random.default_rng(seed)
    n, length, p = int(rng.integers(1, 4)), int(rng.integers(1, 7)), int(rng.integers(p_min, 6))
    mask = (rng.random((n, length)) < 0.5).astype(np.float64)
    mask.flat[int(rng.integers(0, mask.size))] = 1.0
    return rng, rng.standard_normal((n, length, p)), rng.standard_normal((n, length, p)), mask


def _norm_pix_by_formula(t):
    p = t.shape[-1]
    mu = t.sum(axis=-1, keepdims=True) / p
    var_u = ((t - mu) ** 2).sum(axis=-1, keepdims=True) / (p - 1)
    sigma = np.sqrt(var_u + 1e-6)
    return (t - mu) / sigma, mu, sigma


@pytest.mark.derivation("masked_modelling.md#MM4")
@given(seed=seeds, g=st.floats(-3, 3), norm_pix=st.booleans())
def test_mae_loss_value_and_gradient_formula(seed, g, norm_pix):
    rng, pred, target, mask = _mae_inputs(seed, p_min=2)
    t = _norm_pix_by_formula(target)[0] if norm_pix else target
    n, length, p = pred.shape
    total, count = 0.0, 0.0
    for b in range(n):
        for l_ in range(length):
            total += mask[b, l_] * np.mean((pred[b, l_] - t[b, l_]) ** 2)
            count += mask[b, l_]
    loss, cache = mm.mae_loss_forward(pred, target, mask, norm_pix=norm_pix)
    np.testing.assert_allclose(loss, total / count, rtol=1e-13)
    dpred, dt, dm = mm.mae_loss_backward(cache, g)
    expected = g * 2 * mask[..., None] * (pred - t) / (p * mask.sum())
    np.testing.assert_allclose(dpred, expected, rtol=1e-12, atol=1e-15)
    assert dt is None and dm is None


@given(seed=seeds)
def test_mae_loss_visible_patches_carry_no_gradient(seed):
    rng, pred, target, mask = _mae_inputs(seed)
    assume(mask.min() == 0)
    (dpred, _, _) = backward("mae_loss", pred, target, mask)
    assert np.all(dpred[mask == 0] == 0)
    moved = pred.copy()
    moved[mask == 0] += rng.standard_normal(moved[mask == 0].shape)
    assert mm.mae_loss_forward(moved, target, mask)[0] == mm.mae_loss_forward(pred, target, mask)[0]


@given(seed=seeds, norm_pix=st.booleans())
def test_mae_loss_bool_and_float_masks_agree(seed, norm_pix):
    _, pred, target, mask = _mae_inputs(seed, p_min=2)
    for fmask in (mask, mask.astype(np.float32)):
        a, ca = mm.mae_loss_forward(pred, target, fmask, norm_pix=norm_pix)
        b, cb = mm.mae_loss_forward(pred, target, mask.astype(bool), norm_pix=norm_pix)
        assert a == b
        np.testing.assert_array_equal(mm.mae_loss_backward(ca, 1.0)[0], mm.mae_loss_backward(cb, 1.0)[0])


def test_mae_loss_validation():
    pred = np.zeros((2, 3, 4))
    mask = np.ones((2, 3))
    half = mask.copy()
    half[0, 1] = 0.5
    with pytest.raises(ValueError, match="0.5"):
        mm.mae_loss_forward(pred, pred, half)
    nan = mask.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="mask"):
        mm.mae_loss_forward(pred, pred, nan)
    with pytest.raises(TypeError, match="mask"):
        mm.mae_loss_forward(pred, pred, mask.astype(np.int64))
    with pytest.raises(ValueError, match="mask"):
        mm.mae_loss_forward(pred, pred, np.ones((2, 4)))
    with pytest.raises(ValueError, match="removed"):
        mm.mae_loss_forward(pred, pred, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="removed"):
        mm.mae_loss_forward(pred, pred, np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="norm_pix"):
        mm.mae_loss_forward(np.zeros((2, 3, 1)), np.zeros((2, 3, 1)), mask, norm_pix=True)
    with pytest.raises(TypeError, match="norm_pix"):
        mm.mae_loss_forward(pred, pred, mask, norm_pix=1)
    with pytest.raises(ValueError, match="target"):
        mm.mae_loss_forward(pred, np.zeros((2, 3, 5)), mask)
    with pytest.raises(TypeError, match="target"):
        mm.mae_loss_forward(pred, pred.astype(np.float32), mask)
    with pytest.raises(ValueError, match="grad_out"):
        mm.mae_loss_backward(mm.mae_loss_forward(pred, pred, mask)[1], np.ones(2))


@pytest.mark.derivation("masked_modelling.md#MM5")
@given(seed=seeds)
def test_norm_pix_target_formula_and_no_target_gradient(seed):
    rng, pred, target, mask = _mae_inputs(seed, p_min=2)
    expected, mu, sigma = _norm_pix_by_formula(target)
    t, mean, std = mm.norm_pix_target(target)
    np.testing.assert_allclose(t, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mean, mu, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(std, sigma, rtol=1e-13)
    # norm_pix is exactly the plain loss on the normalised target: no gradient term from the statistics
    a, ca = mm.mae_loss_forward(pred, target, mask, norm_pix=True)
    b, cb = mm.mae_loss_forward(pred, expected, mask)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(mm.mae_loss_backward(ca, 1.0)[0], mm.mae_loss_backward(cb, 1.0)[0],
                               rtol=1e-11, atol=1e-15)
    assert mm.mae_loss_backward(ca, 1.0)[1] is None
    with pytest.raises(ValueError, match="P >= 2"):
        mm.norm_pix_target(np.zeros((2, 3, 1)))


@pytest.mark.derivation("masked_modelling.md#MM6")
@given(seed=seeds)
def test_norm_pix_reconstruction_undo(seed):
    rng = np.random.default_rng(seed)
    n, c, p, h = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
    assume(p * p * c >= 2)
    images = rng.standard_normal((n, c, h * p, h * p)) * 3 + 1
    target = mm.patchify_forward(images, patch=p)[0]
    t_norm, mean, std = mm.norm_pix_target(target)
    _, mu, sigma = _norm_pix_by_formula(target)
    recon = t_norm * sigma + mu  # a perfect prediction in normalised units, undone with MM6
    np.testing.assert_allclose(mm.unpatchify(recon, patch=p, channels=c), images, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(t_norm * std + mean, target, rtol=1e-12, atol=1e-12)


@pytest.mark.derivation("masked_modelling.md#MM7")
@given(seed=seeds, ratio=st.floats(0.0, 0.9))
def test_batch_mean_equals_mean_of_per_image_means_for_equal_counts(seed, ratio):
    rng = np.random.default_rng(seed)
    n, length, p = int(rng.integers(1, 5)), int(rng.integers(2, 12)), int(rng.integers(1, 4))
    assume(1 <= int(length * (1 - ratio)) < length)  # at least one kept and one removed patch
    _, mask, _ = masking.random_masking(n, length, ratio, rng)
    pred, target = rng.standard_normal((2, n, length, p))
    e = np.mean((pred - target) ** 2, axis=-1)
    per_image = np.array([np.sum(mask[b] * e[b]) / np.sum(mask[b]) for b in range(n)])
    loss = mm.mae_loss_forward(pred, target, mask)[0]
    np.testing.assert_allclose(loss, per_image.mean(), rtol=1e-12)
    # unequal counts (a block mask that stopped early): the batch mean weights image n by K_n / sum K
    uneq = np.zeros((2, 4))
    uneq[0, :1] = 1
    uneq[1, :3] = 1
    pred2, target2 = rng.standard_normal((2, 2, 4, p))
    e2 = np.mean((pred2 - target2) ** 2, axis=-1)
    means = [np.sum(uneq[b] * e2[b]) / uneq[b].sum() for b in range(2)]
    loss2 = mm.mae_loss_forward(pred2, target2, uneq)[0]
    np.testing.assert_allclose(loss2, (1 * means[0] + 3 * means[1]) / 4, rtol=1e-12)
    assume(abs(means[0] - means[1]) > 1e-6)
    assert abs(loss2 - np.mean(means)) > 1e-9


# -- masked_token_ce -----------------------------------------------------------------------------


def _ce_inputs(seed):
    rng = np.random.default_rng(seed)
    n, length, vocab = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(2, 7))
    mask = rng.random((n, length)) < 0.5
    mask.flat[int(rng.integers(0, mask.size))] = True
    targets = rng.integers(0, vocab, size=(n, length))
    targets[~mask] = rng.integers(-1000, 1000, size=int((~mask).sum()))  # ignored
    return rng, 2 * rng.standard_normal((n, length, vocab)), targets, mask


@pytest.mark.derivation("masked_modelling.md#MM8")
@given(seed=seeds, g=st.floats(-3, 3))
def test_masked_token_ce_gradient_formula(seed, g):
    rng, logits, targets, mask = _ce_inputs(seed)
    (dl, dt, dm) = backward("masked_token_ce", logits, targets, mask, g=g)
    expected = np.zeros_like(logits)
    count = mask.sum()
    for b, l_ in zip(*np.nonzero(mask)):
        row = logits[b, l_]
        soft = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        onehot = np.eye(row.size)[targets[b, l_]]
        expected[b, l_] = g * (soft - onehot) / count
    np.testing.assert_allclose(dl, expected, rtol=1e-12, atol=1e-15)
    assert np.all(dl[~mask] == 0) and dt is None and dm is None


@pytest.mark.derivation("masked_modelling.md#MM9")
@given(seed=seeds)
def test_masked_token_ce_is_ce_over_gathered_masked_rows(seed):
    rng, logits, targets, mask = _ce_inputs(seed)
    rows, ys = logits[mask], targets[mask]
    ce = np.mean([math.log(np.sum(np.exp(r))) - r[y] for r, y in zip(rows, ys)])
    np.testing.assert_allclose(mm.masked_token_ce_forward(logits, targets, mask)[0], ce, rtol=1e-12)
    # the ignored targets and the unmasked logits do not matter
    other = targets.copy()
    other[~mask] = 0
    moved = logits.copy()
    moved[~mask] += 5.0
    assert mm.masked_token_ce_forward(moved, other, mask)[0] == mm.masked_token_ce_forward(logits, targets, mask)[0]


def test_masked_token_ce_is_stable_and_validates():
    logits = np.array([[[1000.0, 0.0], [0.0, -1000.0]]])
    mask = np.array([[True, True]])
    loss = mm.masked_token_ce_forward(logits, np.array([[1, 0]]), mask)[0]
    np.testing.assert_allclose(loss, (1000.0 + 0.0) / 2)
    with pytest.raises(TypeError, match="targets"):
        mm.masked_token_ce_forward(logits, np.zeros((1, 2)), mask)
    with pytest.raises(ValueError, match="targets"):
        mm.masked_token_ce_forward(logits, np.array([[2, 0]]), mask)
    with pytest.raises(TypeError, match="mask"):
        mm.masked_token_ce_forward(logits, np.array([[1, 0]]), mask.astype(np.float64))
    with pytest.raises(ValueError, match="mask"):
        mm.masked_token_ce_forward(logits, np.array([[1, 0]]), np.zeros((1, 2), dtype=bool))
    with pytest.raises(ValueError, match="targets"):
        mm.masked_token_ce_forward(logits, np.array([1, 0]), mask)
    # an out-of-range target at an unmasked position is ignored
    mm.masked_token_ce_forward(logits, np.array([[1, 99]]), np.array([[True, False]]))


# -- cosine_distill -------------------------------------------------------------------------------


@pytest.mark.derivation("masked_modelling.md#MM10")
@given(seed=seeds, g=st.floats(-3, 3), lead=st.lists(st.integers(1, 3), min_size=0, max_size=2))
def test_cosine_distill_value_and_gradient_formula(seed, g, lead):
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (int(rng.integers(1, 6)),)
    p, t = rng.standard_normal(shape), rng.standard_normal(shape)
    pr, tr = p.reshape(-1, shape[-1]), t.reshape(-1, shape[-1])
    r = pr.shape[0]
    cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(pr, tr)]
    loss, cache = mm.cosine_distill_forward(p, t)
    np.testing.assert_allclose(loss, np.mean([1 - c for c in cos]), rtol=1e-12, atol=1e-15)
    dp, dt = mm.cosine_distill_backward(cache, g)
    expected = np.stack([-(g / r) * (unit(b) - unit(a) * (unit(a) @ unit(b))) / np.linalg.norm(a)
                         for a, b in zip(pr, tr)])
    np.testing.assert_allclose(dp.reshape(-1, shape[-1]), expected, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(np.sum(dp * p, axis=-1), 0, atol=1e-12)
    assert dt is None


def test_cosine_distill_zero_rows_and_shapes():
    p = np.ones((2, 3))
    z = p.copy()
    z[1] = 0
    with pytest.raises(ValueError, match="pred"):
        mm.cosine_distill_forward(z, p)
    with pytest.raises(ValueError, match="target"):
        mm.cosine_distill_forward(p, z)
    with pytest.raises(ValueError, match="target"):
        mm.cosine_distill_forward(p, np.ones((2, 4)))
    assert mm.cosine_distill_forward(p, -p)[0] == 2.0


# -- vector_quantize -------------------------------------------------------------------------------


def _vq_inputs(seed):
    rng = np.random.default_rng(seed)
    d, k = int(rng.integers(2, 6)), int(rng.integers(1, 8))
    lead = tuple(int(v) for v in rng.integers(1, 4, size=int(rng.integers(1, 3))))
    return rng, rng.standard_normal(lead + (d,)) * rng.uniform(0.2, 3.0), rng.standard_normal((k, d))


def _brute_force_nearest(z, codebook):
    rows = z.reshape(-1, z.shape[-1])
    best = []
    for zr in rows:
        cos = [zr @ c / (np.linalg.norm(zr) * np.linalg.norm(c)) for c in codebook]
        best.append(int(np.argmax(cos)))
    return np.array(best).reshape(z.shape[:-1]), rows


@given(seed=seeds)
def test_vector_quantize_picks_the_true_nearest_code(seed):
    rng, z, codebook = _vq_inputs(seed)
    out, cache = mm.vector_quantize_forward(z, codebook)
    idx = mm.vector_quantize_indices(cache)
    expected, _ = _brute_force_nearest(z, codebook)
    sims = unit(z) @ unit(codebook).T
    top2 = np.sort(sims, axis=-1)[..., -2:] if codebook.shape[0] > 1 else None
    clear = np.ones(idx.shape, bool) if top2 is None else (top2[..., 1] - top2[..., 0] > 1e-9)
    np.testing.assert_array_equal(idx[clear], expected[clear])
    assert idx.dtype == np.int64 and idx.shape == z.shape[:-1]
    np.testing.assert_array_equal(mm.nearest_code(z, codebook), idx)
    np.testing.assert_allclose(out, unit(codebook)[idx], rtol=0, atol=0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(mm.vector_quantize_normalized_input(cache), unit(z), rtol=1e-13, atol=1e-15)


def test_vector_quantize_ties_go_to_the_lowest_index_and_blocks_agree(monkeypatch):
    codebook = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 1.0]])  # codes 0 = 2 and 1 = 3 in direction
    z = np.array([[3.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    idx = mm.nearest_code(z, codebook)
    assert list(idx[:2]) == [0, 1] and idx[2] == 0  # the (1, 1) row ties all four: lowest index
    rng = np.random.default_rng(0)
    big_z, big_c = rng.standard_normal((50, 4)), rng.standard_normal((7, 4))
    full = mm.nearest_code(big_z, big_c)
    monkeypatch.setattr(mm, "_ARGMAX_BLOCK", 7 * 3)  # blocks of 3 rows
    np.testing.assert_array_equal(mm.nearest_code(big_z, big_c), full)


@pytest.mark.derivation("masked_modelling.md#MM11")
@given(seed=seeds)
def test_cosine_argmax_equals_official_distance_argmin(seed):
    rng, z, codebook = _vq_inputs(seed)
    zf = unit(z.reshape(-1, z.shape[-1]))
    e = unit(codebook)
    dist = np.sum(zf ** 2, axis=1, keepdims=True) + np.sum(e ** 2, axis=1) - 2 * zf @ e.T
    np.testing.assert_allclose(dist, 2 - 2 * zf @ e.T, atol=1e-12)
    s = np.sort(zf @ e.T, axis=1)
    clear = (s[:, -1] - s[:, -2] > 1e-9) if e.shape[0] > 1 else np.ones(zf.shape[0], bool)
    np.testing.assert_array_equal(np.argmin(dist, axis=1)[clear], mm.nearest_code(z, codebook).reshape(-1)[clear])


def _l2n_vjp_by_central_differences(z, g, h=1e-6):
    """d/dz <g, z / ||z||> by central differences (the straight-through surrogate, evaluated directly)."""
    num = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        num[idx] = (np.sum(g * unit(zp)) - np.sum(g * unit(zm))) / (2 * h)
    return num


@pytest.mark.derivation("masked_modelling.md#MM12")
@given(seed=seeds)
def test_vector_quantize_gradient_is_the_l2_normalize_backward(seed):
    rng, z, codebook = _vq_inputs(seed)
    g = rng.standard_normal(z.shape)
    out, cache = mm.vector_quantize_forward(z, codebook)
    dz, dc = mm.vector_quantize_backward(cache, g)
    zh = unit(z)
    formula = (g - zh * np.sum(zh * g, axis=-1, keepdims=True)) / np.linalg.norm(z, axis=-1, keepdims=True)
    np.testing.assert_allclose(dz, formula, rtol=1e-12, atol=1e-14)
    num = _l2n_vjp_by_central_differences(z, g)
    scale = max(np.max(np.abs(num)), np.max(np.abs(dz)))
    assert np.max(np.abs(dz - num)) / scale < GRAD_TOL
    np.testing.assert_allclose(np.sum(dz * z, axis=-1), 0, atol=1e-12)
    assert dc is None
    # the forward value itself is locally constant (away from ties): straight-through, not its derivative
    step = 1e-7 * rng.standard_normal(z.shape)
    sims = np.sort(zh.reshape(-1, z.shape[-1]) @ unit(codebook).T, axis=1)
    assume(codebook.shape[0] == 1 or np.min(sims[:, -1] - sims[:, -2]) > 1e-4)
    np.testing.assert_array_equal(mm.vector_quantize_forward(z + step, codebook)[0], out)


@pytest.mark.derivation("masked_modelling.md#MM13")
@given(seed=seeds, beta=st.floats(0.1, 2.0))
def test_commitment_gradient_adds_before_the_normalisation_backward(seed, beta):
    rng, z, codebook = _vq_inputs(seed)
    g = rng.standard_normal(z.shape)
    zq, cache = mm.vector_quantize_forward(z, codebook)
    zh = mm.vector_quantize_normalized_input(cache)
    gc = 2 * beta * (zh - zq) / zh.size
    dz = mm.vector_quantize_backward(cache, g + gc)[0]

    def surrogate_loss(zz):  # <g, z_q> with z_q -> z^ (straight-through) plus beta MSE(sg(z_q), z^)
        return np.sum(g * unit(zz)) + beta * np.mean((unit(zz) - zq) ** 2)

    num = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += 1e-6
        zm[idx] -= 1e-6
        num[idx] = (surrogate_loss(zp) - surrogate_loss(zm)) / 2e-6
    scale = max(np.max(np.abs(num)), np.max(np.abs(dz)))
    assert np.max(np.abs(dz - num)) / scale < GRAD_TOL


def test_gradcheck_differentiates_the_straight_through_surrogate():
    import dataclasses

    from refssl import gradcheck

    op = registry.get("vector_quantize")
    args, kwargs = op.example(np.random.default_rng(2), np.float64)
    assert gradcheck.check(op, args, kwargs).ok
    # without the surrogate the forward value is locally constant and the check must fail
    bare = dataclasses.replace(op, surrogate=None)
    assert not gradcheck.check(bare, args, kwargs).ok


def test_vector_quantize_validation():
    z, c = np.ones((2, 3)), np.eye(3)
    with pytest.raises(ValueError, match="codebook"):
        mm.vector_quantize_forward(z, np.ones((4, 2)))
    with pytest.raises(ValueError, match="codebook"):
        mm.vector_quantize_forward(z, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="z"):
        mm.vector_quantize_forward(np.zeros((2, 3)), c)
    with pytest.raises(TypeError, match="codebook"):
        mm.vector_quantize_forward(z, c.astype(np.float32))
    with pytest.raises(ValueError, match="grad_out"):
        mm.vector_quantize_backward(mm.vector_quantize_forward(z, c)[1], np.ones((3, 3)))


# -- hypothesis gradient checks beyond the registry examples -----------------------------------------


@given(seed=seeds, norm_pix=st.booleans(), float_mask=st.booleans())
def test_mae_loss_gradcheck(seed, norm_pix, float_mask):
    _, pred, target, mask = _mae_inputs(seed, p_min=2)
    m = mask if float_mask else mask.astype(bool)
    assert_gradients("mae_loss", (pred, target, m), {"norm_pix": norm_pix}, tolerance=GRAD_TOL)


@given(seed=seeds)
def test_masked_token_ce_and_cosine_distill_gradcheck(seed):
    _, logits, targets, mask = _ce_inputs(seed)
    assert_gradients("masked_token_ce", (logits, targets, mask), {}, tolerance=GRAD_TOL)
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((2, 3, 4))
    assert_gradients("cosine_distill", (p, rng.standard_normal((2, 3, 4))), {}, tolerance=GRAD_TOL)


@given(seed=seeds)
def test_gather_and_patchify_gradcheck_at_mae_like_sizes(seed):
    rng = np.random.default_rng(seed)
    ids_keep, _, ids_restore = masking.random_masking(2, 16, 0.75, rng)
    x = rng.standard_normal((2, 16, 3))
    assert_gradients("gather_tokens", (x, ids_keep), {}, tolerance=GRAD_TOL)
    assert_gradients("gather_tokens", (x, ids_restore), {}, tolerance=GRAD_TOL)
    assert_gradients("patchify", (rng.standard_normal((1, 3, 4, 8)),), {"patch": 2}, tolerance=GRAD_TOL)


# -- torch cross-checks -------------------------------------------------------------------------------


def test_mae_loss_and_masked_token_ce_match_torch():
    torch = pytest.importorskip("torch", reason="torch not installed: cross-check against autograd skipped")
    rng = np.random.default_rng(11)
    n, length, p, vocab = 3, 10, 12, 7
    pred, target = rng.standard_normal((2, n, length, p))
    _, mask, _ = masking.random_masking(n, length, 0.6, rng)
    for norm_pix in (False, True):
        tp = torch.tensor(pred, requires_grad=True)
        tt = torch.tensor(target)
        tm = torch.tensor(mask)
        if norm_pix:  # the official formula: per-patch mean and unbiased variance, eps 1e-6
            mean = tt.mean(dim=-1, keepdim=True)
            var = tt.var(dim=-1, keepdim=True)
            tt = (tt - mean) / (var + 1.0e-6) ** 0.5
        loss = (((tp - tt) ** 2).mean(dim=-1) * tm).sum() / tm.sum()
        loss.backward()
        ours, cache = mm.mae_loss_forward(pred, target, mask, norm_pix=norm_pix)
        np.testing.assert_allclose(ours, loss.item(), rtol=1e-12)
        np.testing.assert_allclose(mm.mae_loss_backward(cache, 1.0)[0], tp.grad.numpy(), rtol=1e-10, atol=1e-15)
    logits = 2 * rng.standard_normal((n, length, vocab))
    targets = rng.integers(0, vocab, size=(n, length))
    bmask = mask.astype(bool)
    tl = torch.tensor(logits, requires_grad=True)
    ce = torch.nn.functional.cross_entropy(tl[torch.tensor(bmask)], torch.tensor(targets[bmask]))
    ce.backward()
    ours, cache = mm.masked_token_ce_forward(logits, targets, bmask)
    np.testing.assert_allclose(ours, ce.item(), rtol=1e-12)
    np.testing.assert_allclose(mm.masked_token_ce_backward(cache, 1.0)[0], tl.grad.numpy(), rtol=1e-10, atol=1e-15)


# -- masking: MAE ------------------------------------------------------------------------------------


@given(seed=seeds, length=st.integers(1, 40), ratio=st.floats(0.0, 0.99))
def test_random_masking_reproduces_the_official_algorithm(seed, length, ratio):
    keep = int(length * (1 - ratio))
    assume(keep >= 1)
    n = 3
    ids_keep, mask, ids_restore = masking.random_masking(n, length, ratio, np.random.default_rng(seed))
    # step by step as models_mae.py random_masking, with the same random stream
    noise = np.random.default_rng(seed).random((n, length))
    ids_shuffle = np.argsort(noise, axis=1)
    restore = np.argsort(ids_shuffle, axis=1)
    ref_mask = np.ones((n, length))
    ref_mask[:, :keep] = 0
    ref_mask = np.take_along_axis(ref_mask, restore, axis=1)
    np.testing.assert_array_equal(ids_keep, ids_shuffle[:, :keep])
    np.testing.assert_array_equal(ids_restore, restore)
    np.testing.assert_array_equal(mask, ref_mask)
    assert ids_keep.dtype == np.int64 and ids_restore.dtype == np.int64 and mask.dtype == np.float64
    # every image removes exactly length - keep patches; kept ones are exactly ids_keep
    np.testing.assert_array_equal(mask.sum(axis=1), length - keep)
    assert np.all(np.take_along_axis(mask, ids_keep, axis=1) == 0)
    # ids_restore unshuffles: [kept tokens, mask tokens] gathered with ids_restore is in patch order
    x = np.arange(n * length, dtype=np.float64).reshape(n, length, 1)
    kept = mm.gather_tokens_forward(x, ids_keep)[0]
    shuffled_rest = mm.gather_tokens_forward(x, np.argsort(restore, axis=1)[:, keep:])[0]
    full = np.concatenate([kept, shuffled_rest], axis=1)
    np.testing.assert_array_equal(mm.gather_tokens_forward(full, ids_restore)[0], x)


def test_random_masking_validation():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.random_masking(2, 10, 1.0, rng)
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.random_masking(2, 10, -0.1, rng)
    with pytest.raises(ValueError, match="at least 1"):
        masking.random_masking(2, 3, 0.75, rng)  # int(3 * 0.25) = 0
    with pytest.raises(TypeError, match="rng"):
        masking.random_masking(2, 10, 0.5, 0)
    assert masking.random_masking(2, 10, 0.5, rng, dtype=np.float32)[1].dtype == np.float32


# -- masking: BEiT blocks ------------------------------------------------------------------------------


def _official_block_mask(h, w, target, lo, rnd, cap=None, min_aspect=0.3, tries=10):
    """BEiT's block rules, one sample at a time with Python's random (written from the description)."""
    cap = target if cap is None else cap
    log_a = (math.log(min_aspect), math.log(1 / min_aspect))
    grid = [[0] * w for _ in range(h)]
    count = 0
    while count < target:
        room = min(target - count, cap)
        added = 0
        for _ in range(tries):
            area = rnd.uniform(lo, room)
            aspect = math.exp(rnd.uniform(*log_a))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if bh < h and bw < w:
                top, left = rnd.randint(0, h - bh), rnd.randint(0, w - bw)
                cells = [(i, j) for i in range(top, top + bh) for j in range(left, left + bw)]
                new = sum(1 for i, j in cells if grid[i][j] == 0)
                if 0 < new <= room:
                    for i, j in cells:
                        grid[i][j] = 1
                    added = new
                    break
        if added == 0:
            break
        count += added
    return np.array(grid).reshape(-1)


def test_block_masking_matches_the_official_rules_in_distribution():
    h = w = 7
    target, lo, samples = 19, 4, 2000
    rnd = random.Random(1)
    ref = np.stack([_official_block_mask(h, w, target, lo, rnd) for _ in range(samples)])
    ours = masking.block_masking(samples, 7, target, np.random.default_rng(1), min_num_patches=lo)
    assert ours.dtype == bool and ours.shape == (samples, h * w)
    counts, ref_counts = ours.sum(axis=1), ref.sum(axis=1)
    assert counts.max() <= target
    # the same count distribution and the same per-patch masking frequency (tolerances ~4 sigma)
    assert abs(counts.mean() - ref_counts.mean()) < 0.05
    assert abs(np.mean(counts == target) - np.mean(ref_counts == target)) < 0.04
    assert np.max(np.abs(ours.mean(axis=0) - ref.mean(axis=0))) < 0.07


@given(seed=seeds)
def test_block_masking_counts_at_beit_scale(seed):
    m = masking.block_masking(64, 14, 75, np.random.default_rng(seed), min_num_patches=16)
    counts = m.sum(axis=1)
    assert counts.max() <= 75
    assert counts.mean() > 72  # close to the target on average (official: about 74.5)


@given(seed=seeds, side=st.sampled_from([1, 2, 3]))
def test_single_block_is_a_full_rectangle_of_at_least_min_size(seed, side):
    # target = min = cap = side^2 with square blocks: the area draw is exactly side^2, so one square block
    rng = np.random.default_rng(seed)
    m = masking.block_masking(20, (5, 6), side * side, rng, min_num_patches=side * side, min_aspect=1.0)
    for row in m.reshape(20, 5, 6):
        r, c = np.nonzero(row)
        assert row.sum() == side * side
        assert r.max() - r.min() + 1 == side and c.max() - c.min() + 1 == side
        assert row[r.min():r.max() + 1, c.min():c.max() + 1].all()


def test_a_block_must_be_strictly_smaller_than_the_grid():
    # square blocks of area exactly 16 (min = target = 16, aspect 1): 4 x 4 fits a 5 x 5 grid only
    rng = np.random.default_rng(3)
    assert not masking.block_masking(10, 4, 16, rng, min_num_patches=16, min_aspect=1.0).any()
    fits = masking.block_masking(10, 5, 16, rng, min_num_patches=16, min_aspect=1.0)
    np.testing.assert_array_equal(fits.sum(axis=1), 16)


def test_block_masking_is_deterministic_and_validates():
    a = masking.block_masking(8, (6, 5), 10, np.random.default_rng(5))
    b = masking.block_masking(8, (6, 5), 10, np.random.default_rng(5))
    c = masking.block_masking(8, (6, 5), 10, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="num_masking_patches"):
        masking.block_masking(2, 4, 17, np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng"):
        masking.block_masking(2, 4, 5, None)
    with pytest.raises(ValueError, match="min_aspect"):
        masking.block_masking(2, 4, 5, np.random.default_rng(0), min_aspect=0.0)
    with pytest.raises(ValueError, match="grid"):
        masking.block_masking(2, (4, 4, 4), 5, np.random.default_rng(0))


def test_beit_counts_scale_proportionally():
    for h, w in [(14, 14), (7, 7), (8, 8), (4, 4), (2, 2), (6, 10)]:
        assert masking.beit_mask_count((h, w)) == max(1, math.floor(75 * h * w / 196 + 0.5))
        assert masking.beit_min_block((h, w)) == max(1, math.floor(16 * h * w / 196 + 0.5))
    assert masking.beit_mask_count(14) == 75 and masking.beit_min_block(14) == 16
    assert masking.beit_mask_count(7) == 19 and masking.beit_min_block(7) == 4


# -- VQ-KD codebook EMA ------------------------------------------------------------------------------


def _ema_inputs(seed, k=6, d=4, m=20):
    rng = np.random.default_rng(seed)
    codebook = unit(rng.standard_normal((k, d)))
    z = unit(rng.standard_normal((m, d)))
    idx = rng.integers(0, k - 2, size=m)  # the last two codes are never used
    size = rng.uniform(0, 3, size=k)
    return rng, codebook, size, z, idx


@pytest.mark.derivation("masked_modelling.md#MM14")
@given(seed=seeds, decay=st.floats(0.0, 1.0))
def test_vq_ema_update_equals_step_by_step_reference(seed, decay):
    rng, codebook, size, z, idx = _ema_inputs(seed)
    before = [a.copy() for a in (codebook, size, z, idx)]
    new_c, new_s, n_dead = state.vq_ema_update(codebook, size, z, idx, decay=decay)
    for a, b in zip((codebook, size, z, idx), before):
        np.testing.assert_array_equal(a, b)
    for k in range(codebook.shape[0]):
        members = [z[i] for i in range(z.shape[0]) if idx[i] == k]
        np.testing.assert_allclose(new_s[k], decay * size[k] + (1 - decay) * len(members), rtol=1e-13, atol=1e-15)
        if members:
            mean = np.sum(members, axis=0) / len(members)
            v = decay * codebook[k] + (1 - decay) * mean / np.linalg.norm(mean)
            np.testing.assert_allclose(new_c[k], v / np.linalg.norm(v), rtol=1e-12, atol=1e-14)
        else:
            np.testing.assert_array_equal(new_c[k], codebook[k])  # unused: unchanged
    np.testing.assert_allclose(np.linalg.norm(new_c, axis=1), 1.0, rtol=1e-13)
    assert n_dead == 0


def test_vq_ema_update_accepts_the_op_cache_and_keeps_dtypes():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 5, 3)).astype(np.float32)
    codebook = unit(rng.standard_normal((4, 3))).astype(np.float32)
    _, cache = mm.vector_quantize_forward(z, codebook)
    new_c, new_s, _ = state.vq_ema_update(codebook, np.zeros(4, np.float32),
                                          mm.vector_quantize_normalized_input(cache),
                                          mm.vector_quantize_indices(cache))
    assert new_c.dtype == np.float32 and new_s.dtype == np.float32
    np.testing.assert_allclose(new_s.sum(), 0.01 * 10, rtol=1e-6)
    with pytest.raises(ValueError, match="indices"):
        state.vq_ema_update(codebook, np.zeros(4), z[0], np.full(5, 4))
    with pytest.raises(ValueError, match="indices"):
        state.vq_ema_update(codebook, np.zeros(4), z, np.zeros(5, dtype=int))
    with pytest.raises(TypeError, match="indices"):
        state.vq_ema_update(codebook, np.zeros(4), z[0], np.zeros(5))
    with pytest.raises(ValueError, match="decay"):
        state.vq_ema_update(codebook, np.zeros(4), z[0], np.zeros(5, dtype=int), decay=1.5)
    with pytest.raises(ValueError, match="cluster_size"):
        state.vq_ema_update(codebook, np.zeros(3), z[0], np.zeros(5, dtype=int))


def test_vq_dead_codes_are_reseeded_only_with_an_rng():
    rng, codebook, size, z, idx = _ema_inputs(0)
    size[-2:] = [1e-4, 5.0]  # code K-2 unused and dead, code K-1 unused but alive
    size[0] = 0.0  # below the threshold but used in this batch (checked): keeps its EMA update
    assert 0 in idx
    c0, s0, n0 = state.vq_ema_update(codebook, size, z, idx, dead_threshold=1e-2)
    c1, s1, n1 = state.vq_ema_update(codebook, size, z, idx, dead_threshold=1e-2, rng=np.random.default_rng(1))
    assert n0 == 0 and n1 == 1
    np.testing.assert_array_equal(c0[-2], codebook[-2])
    assert any(np.allclose(c1[-2], row) for row in z)  # re-seeded with a batch row
    assert s1[-2] == 1e-2
    np.testing.assert_array_equal(c1[-1], codebook[-1])
    np.testing.assert_array_equal(np.delete(c1, -2, axis=0), np.delete(c0, -2, axis=0))
    np.testing.assert_array_equal(c1[0], c0[0])
    assert not np.array_equal(c1[0], codebook[0])


@pytest.mark.derivation("masked_modelling.md#MM15")
@given(seed=seeds)
def test_normalised_mean_maximises_the_spherical_objective(seed):
    rng = np.random.default_rng(seed)
    pts = unit(rng.standard_normal((int(rng.integers(1, 8)), 3)) + rng.standard_normal(3))
    s = pts.sum(axis=0)
    assume(np.linalg.norm(s) > 1e-6)
    m = s / np.linalg.norm(s)
    best = np.sum(pts @ m)
    others = unit(rng.standard_normal((500, 3)))
    assert np.all(others @ s <= best + 1e-12)
    # and it is what one EMA step with decay 0 produces
    c, _, _ = state.vq_ema_update(unit(rng.standard_normal((1, 3))), np.zeros(1), pts,
                                  np.zeros(len(pts), dtype=int), decay=0.0)
    np.testing.assert_allclose(c[0], m, rtol=1e-12, atol=1e-14)


@pytest.mark.derivation("masked_modelling.md#MM16")
@given(seed=seeds, decay=st.floats(0.05, 0.99))
def test_ema_angle_contracts_geometrically(seed, decay):
    rng = np.random.default_rng(seed)
    pts = unit(rng.standard_normal((5, 4)) * 0.3 + rng.standard_normal(4))
    m = unit(pts.sum(axis=0))
    c = unit(m + rng.standard_normal(4) * 0.8)
    assume(c @ m > 0.05)
    idx = np.zeros(5, dtype=int)
    def angle(a):  # accurate also for tiny angles, unlike acos
        return math.atan2(np.linalg.norm(a - (a @ m) * m), a @ m)

    for _ in range(6):
        theta = angle(c)
        c = state.vq_ema_update(c[None], np.zeros(1), pts, idx, decay=decay)[0][0]
        theta_next = angle(c)
        predicted = math.atan2(decay * math.sin(theta), decay * math.cos(theta) + 1 - decay)
        assert abs(theta_next - predicted) <= 1e-9 * theta + 1e-15
        assert math.tan(theta_next) <= decay * math.tan(theta) * (1 + 1e-9) + 1e-15


def _spherical_lloyd(z, c, iters=100):
    for _ in range(iters):
        idx = np.argmax(z @ c.T, axis=1)
        new = c.copy()
        for k in range(c.shape[0]):
            if np.any(idx == k):
                s = z[idx == k].sum(axis=0)
                new[k] = s / np.linalg.norm(s)
        c = new
    return c, np.argmax(z @ c.T, axis=1)


@pytest.mark.derivation("masked_modelling.md#MM17")
@given(seed=seeds)
def test_ema_on_a_fixed_dataset_converges_to_spherical_kmeans(seed):
    rng = np.random.default_rng(seed)
    centers = unit(np.eye(4)[:3] + 0.1 * rng.standard_normal((3, 4)))
    z = unit(np.repeat(centers, 15, axis=0) + 0.15 * rng.standard_normal((45, 4)))
    init = unit(centers + 0.3 * rng.standard_normal((3, 4)))
    ref, ref_idx = _spherical_lloyd(z, init)
    c, size = init.copy(), np.zeros(3)
    for _ in range(250):  # 0.9^250 ~ 4e-12: the angle bound MM16 after the assignment settles
        idx = mm.nearest_code(z, c)
        c, size, _ = state.vq_ema_update(c, size, z, idx, decay=0.9)
    np.testing.assert_array_equal(mm.nearest_code(z, c), ref_idx)
    np.testing.assert_allclose(c, ref, atol=1e-9)
    # the fixed point: every used code is the normalised sum of its own cell (MM17); an unused one
    # (an init far from all data) keeps its value in both algorithms
    for k in range(3):
        if np.any(ref_idx == k):
            np.testing.assert_allclose(c[k], unit(z[ref_idx == k].sum(axis=0)), atol=1e-9)
        else:
            np.testing.assert_array_equal(c[k], init[k])
    np.testing.assert_allclose(size, np.bincount(ref_idx, minlength=3), rtol=1e-6)


def test_vq_kmeans_init_recovers_separated_clusters():
    rng = np.random.default_rng(4)
    centers = unit(np.eye(5)[:4])
    z = unit(np.repeat(centers, 25, axis=0) + 0.1 * rng.standard_normal((100, 5)))
    c = state.vq_kmeans_init(z, 4, np.random.default_rng(0), iters=20)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-12)
    idx = mm.nearest_code(z, c)
    for k in range(4):
        np.testing.assert_allclose(c[k], unit(z[idx == k].sum(axis=0)), atol=1e-12)  # converged: a fixed point
    # each true cluster is captured by one code when the seeds hit every cluster (checked for this seed)
    assert sorted(len(set(idx[25 * j:25 * (j + 1)])) for j in range(4)) == [1, 1, 1, 1]
    np.testing.assert_array_equal(state.vq_kmeans_init(z, 4, np.random.default_rng(0), iters=20), c)
    # more codes than points: seeds drawn with replacement; iters=0 returns the seeds
    few = state.vq_kmeans_init(z[:3], 5, np.random.default_rng(1), iters=0)
    assert few.shape == (5, 5) and all(any(np.allclose(r, s) for s in z[:3]) for r in few)
    with pytest.raises(TypeError, match="rng"):
        state.vq_kmeans_init(z, 4, None)
