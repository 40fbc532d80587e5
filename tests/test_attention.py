"""Attention ops: the formulas of derivations/attention_backward.md evaluated as written, per-head loop
references, the timm weight layout, masks, input errors, and the layers on (B, L, D) tokens.

The references here are explicit loops over (batch, head) in plain numpy, sharing no code with
refssl/ops/attention.py; the registry-wide tests add finite-difference checks of every op.
"""

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refssl import gradcheck, registry
from refssl.ops import activations, attention, linear, norm_layers

from .helpers import assert_gradients, seeds

SDPA = registry.get("scaled_dot_product_attention")
MHA = registry.get("multi_head_attention")
EMB = registry.get("embedding")


# -- independent references (loops over (batch, head), the written formulas) ----------------------------------
def softmax_rows(s):
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def head_forward(q, k, v, keep, c):
    """One slice: S = c q k^T with masked keys at -inf, P = row softmax, O = P v."""
    s = c * q @ k.T
    s[:, ~keep] = -np.inf
    p = softmax_rows(s)
    return p @ v, p


def head_backward(q, k, v, p, g, c):
    """(AT2), (AT3) as written, with rowsum(dP * P) (not the shortcut)."""
    dp = g @ v.T
    ds = p * (dp - np.sum(dp * p, axis=1, keepdims=True))
    return c * ds @ k, c * ds.T @ q, p.T @ g, ds


def sdpa_reference(q, k, v, key_mask, g):
    """out, P, dq, dk, dv, dS by a loop over (batch, head)."""
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    keep = np.ones((b, lk), bool) if key_mask is None else key_mask
    c = 1 / np.sqrt(dh)
    out, dq, dk, dv = (np.zeros_like(a) for a in (q, q, k, v))
    p_all, ds_all = np.zeros((b, h, lq, lk)), np.zeros((b, h, lq, lk))
    for i in range(b):
        for j in range(h):
            out[i, j], p_all[i, j] = head_forward(q[i, j], k[i, j], v[i, j], keep[i], c)
            dq[i, j], dk[i, j], dv[i, j], ds_all[i, j] = head_backward(q[i, j], k[i, j], v[i, j], p_all[i, j],
                                                                       g[i, j], c)
    return out, p_all, dq, dk, dv, ds_all


def mha_reference(x, w_qkv, b_qkv, w_out, b_out, n_heads, key_mask, g):
    """Forward and all gradients of multi-head attention, one head at a time, columns placed by index (AT7)."""
    b, n_tok, d = x.shape
    dh = d // n_heads
    c = 1 / np.sqrt(dh)
    keep = np.ones((b, n_tok), bool) if key_mask is None else key_mask
    a = np.einsum("bld,df->blf", x, w_qkv) + b_qkv
    y = np.zeros((b, n_tok, d))
    probs = np.zeros((b, n_heads, n_tok, n_tok))
    cols = [[t * d + h * dh + np.arange(dh) for h in range(n_heads)] for t in range(3)]  # f = tD + h dh + e
    for i in range(b):
        for h in range(n_heads):
            q, k, v = (a[i][:, cols[t][h]] for t in range(3))
            y[i][:, h * dh:(h + 1) * dh], probs[i, h] = head_forward(q, k, v, keep[i], c)
    out = np.einsum("blf,fg->blg", y, w_out) + b_out
    dy = np.einsum("blg,fg->blf", g, w_out)
    grads = {"w_out": np.einsum("blf,blg->fg", y, g), "b_out": g.sum(axis=(0, 1))}
    da = np.zeros_like(a)
    for i in range(b):
        for h in range(n_heads):
            q, k, v = (a[i][:, cols[t][h]] for t in range(3))
            dq, dk, dv, _ = head_backward(q, k, v, probs[i, h], dy[i][:, h * dh:(h + 1) * dh], c)
            for t, dt in enumerate((dq, dk, dv)):
                da[i][:, cols[t][h]] = dt
    grads.update(x=np.einsum("blf,df->bld", da, w_qkv), w_qkv=np.einsum("bld,blf->df", x, da),
                 b_qkv=da.sum(axis=(0, 1)))
    return out, probs, grads


def random_mask(rng, b, n_keys):
    mask = rng.random((b, n_keys)) < 0.5
    mask[np.arange(b), rng.integers(0, n_keys, size=b)] = True
    return mask


def qkvg(rng, b, h, lq, lk, dh):
    return (rng.standard_normal((b, h, lq, dh)), rng.standard_normal((b, h, lk, dh)),
            rng.standard_normal((b, h, lk, dh)), rng.standard_normal((b, h, lq, dh)))


def mha_inputs(rng, b, n_tok, d):
    return (rng.standard_normal((b, n_tok, d)), rng.standard_normal((d, 3 * d)) / np.sqrt(d),
            0.5 * rng.standard_normal(3 * d), rng.standard_normal((d, d)) / np.sqrt(d),
            0.5 * rng.standard_normal(d))


def run(op, args, g, **kw):
    out, cache = op.forward(*args, **kw)
    return out, cache, op.backward(cache, g)


# -- embedding --------------------------------------------------------------------------------------------------
@pytest.mark.derivation("attention_backward.md#AT1")
@given(seed=seeds)
def test_embedding_backward_is_a_scatter_add(seed):
    rng = np.random.default_rng(seed)
    n_rows, d = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    ids = rng.integers(0, n_rows, size=(int(rng.integers(1, 4)), int(rng.integers(1, 6))))
    table = rng.standard_normal((n_rows, d))
    g = rng.standard_normal(ids.shape + (d,))
    out, _, (dids, dtable) = run(EMB, (ids, table), g)
    assert dids is None
    np.testing.assert_array_equal(out, np.stack([table[i] for i in ids.ravel()]).reshape(out.shape))
    # dT[v] = sum of g_n over the positions n with ids_n = v
    expected = np.stack([g[ids == v].sum(axis=0) for v in range(n_rows)])
    np.testing.assert_allclose(dtable, expected, rtol=1e-12, atol=1e-12)
    onehot = (ids.reshape(-1, 1) == np.arange(n_rows)).astype(float)  # E
    np.testing.assert_allclose(dtable, onehot.T @ g.reshape(-1, d), rtol=1e-12, atol=1e-12)
    unused = ~np.isin(np.arange(n_rows), ids)
    assert np.all(dtable[unused] == 0)


def test_embedding_repeated_ids_accumulate():
    table = np.arange(12.0).reshape(4, 3)
    ids = np.array([[2, 2, 2], [0, 2, 1]], dtype=np.uint8)
    g = np.random.default_rng(0).standard_normal((2, 3, 3))
    _, _, (_, dtable) = run(EMB, (ids, table), g)
    np.testing.assert_allclose(dtable[2], g[0, 0] + g[0, 1] + g[0, 2] + g[1, 1], rtol=1e-14)
    np.testing.assert_allclose(dtable[0], g[1, 0], rtol=1e-14)
    np.testing.assert_allclose(dtable[1], g[1, 2], rtol=1e-14)
    assert np.all(dtable[3] == 0)


def test_embedding_any_id_shape_and_float32():
    table = np.random.default_rng(1).standard_normal((5, 2)).astype(np.float32)
    out, cache = EMB.forward(np.array(3), table)
    assert out.shape == (2,) and out.dtype == np.float32
    np.testing.assert_array_equal(out, table[3])
    _, dtable = EMB.backward(cache, np.ones(2, np.float32))
    assert dtable.dtype == np.float32 and dtable[3].tolist() == [1.0, 1.0] and dtable.sum() == 2.0


def test_embedding_input_errors():
    table = np.zeros((4, 2))
    for bad in (np.array([0, 4]), np.array([-1, 0])):
        with pytest.raises(ValueError, match="ids"):
            EMB.forward(bad, table)
    for bad in (np.array([0.0, 1.0]), np.array([True, False]), [0, 1]):
        with pytest.raises(TypeError, match="ids"):
            EMB.forward(bad, table)
    with pytest.raises(ValueError, match="ids"):
        EMB.forward(np.zeros(0, int), table)
    with pytest.raises(ValueError, match="table"):
        EMB.forward(np.array([0]), np.zeros(4))
    _, cache = EMB.forward(np.array([[0, 1]]), table)
    with pytest.raises(ValueError, match="grad_out"):
        EMB.backward(cache, np.zeros((2, 2)))


# -- scaled_dot_product_attention -------------------------------------------------------------------------------
shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(1, 4))


@pytest.mark.derivation("attention_backward.md#AT2")
@given(seed=seeds, shape=shapes, masked=st.booleans())
def test_softmax_attention_dS_formula(seed, shape, masked):
    rng = np.random.default_rng(seed)
    b, h, lq, lk, dh = shape
    q, k, v, g = qkvg(rng, b, h, lq, lk, dh)
    mask = random_mask(rng, b, lk) if masked else None
    _, p, _, _, _, ds = sdpa_reference(q, k, v, mask, g)
    _, _, (dq, _, _, _) = run(SDPA, (q, k, v, mask), g)
    for i in range(b):
        for j in range(h):
            dp = g[i, j] @ v[i, j].T
            for r in range(lq):  # dS_r = J_r dP_r, J_r = diag(P_r) - P_r P_r^T (the softmax Jacobian)
                jac = np.diag(p[i, j, r]) - np.outer(p[i, j, r], p[i, j, r])
                np.testing.assert_allclose(ds[i, j, r], jac @ dp[r], rtol=1e-10, atol=1e-12)
    # the op's dq is c dS k with this dS
    np.testing.assert_allclose(dq, np.einsum("bhij,bhjd->bhid", ds, k) / np.sqrt(dh), rtol=1e-9, atol=1e-12)


@pytest.mark.derivation("attention_backward.md#AT3")
@given(seed=seeds, shape=shapes, masked=st.booleans())
def test_sdpa_matches_per_head_loops(seed, shape, masked):
    rng = np.random.default_rng(seed)
    q, k, v, g = qkvg(rng, *shape)
    mask = random_mask(rng, shape[0], shape[3]) if masked else None
    out_ref, p_ref, dq_ref, dk_ref, dv_ref, _ = sdpa_reference(q, k, v, mask, g)
    out, cache, (dq, dk, dv, dmask) = run(SDPA, (q, k, v, mask), g)
    assert dmask is None
    np.testing.assert_allclose(out, out_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(attention.attention_probs(cache), p_ref, rtol=1e-10, atol=1e-14)
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.derivation("attention_backward.md#AT4")
@given(seed=seeds, shape=shapes, masked=st.booleans())
def test_rowsum_shortcut(seed, shape, masked):
    rng = np.random.default_rng(seed)
    q, k, v, g = qkvg(rng, *shape)
    mask = random_mask(rng, shape[0], shape[3]) if masked else None
    _, p, _, _, _, _ = sdpa_reference(q, k, v, mask, g)
    out = SDPA.forward(q, k, v, mask)[0]
    dp = np.einsum("bhid,bhjd->bhij", g, v)
    np.testing.assert_allclose(np.sum(dp * p, axis=-1), np.sum(g * out, axis=-1), rtol=1e-9, atol=1e-12)


@pytest.mark.derivation("attention_backward.md#AT5")
@pytest.mark.derivation("attention_backward.md#AT8")
@given(seed=seeds, shape=shapes)
def test_scale_is_a_prescaled_query(seed, shape):
    rng = np.random.default_rng(seed)
    q, k, v, g = qkvg(rng, *shape)
    c = 1 / np.sqrt(shape[4])
    out, _, (dq, dk, dv, _) = run(SDPA, (q, k, v, None), g)
    # the unscaled attention A_1 at Q' = cQ: S = Q' K^T, gradients dS K, dS^T Q', P^T g
    s = np.einsum("bhid,bhjd->bhij", c * q, k)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dp = np.einsum("bhid,bhjd->bhij", g, v)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    np.testing.assert_allclose(out, p @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dq, c * (ds @ k), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dk, np.swapaxes(ds, -1, -2) @ (c * q), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dv, np.swapaxes(p, -1, -2) @ g, rtol=1e-9, atol=1e-12)
    # AT8: c dS from the scaled upstream and the scaled row sums (rowsum(g * O), AT4), then the two products
    # with no further factor
    cds = p * (np.einsum("bhie,bhje->bhij", c * g, v) - c * np.sum(g * (p @ v), axis=-1, keepdims=True))
    np.testing.assert_allclose(cds, c * ds, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dq, cds @ k, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dk, np.swapaxes(cds, -1, -2) @ q, rtol=1e-9, atol=1e-12)


@pytest.mark.derivation("attention_backward.md#AT6")
@given(seed=seeds, shape=shapes)
def test_masked_keys_get_zero_probability_and_zero_gradient(seed, shape):
    rng = np.random.default_rng(seed)
    b, h, lq, lk, dh = shape
    q, k, v, g = qkvg(rng, *shape)
    mask = random_mask(rng, b, lk)
    out, cache, (dq, dk, dv, _) = run(SDPA, (q, k, v, mask), g)
    p = attention.attention_probs(cache)
    for i in range(b):
        off = ~mask[i]
        assert np.all(p[i][..., off] == 0)
        assert np.all(dk[i][:, off] == 0) and np.all(dv[i][:, off] == 0)
        # the same as attention over the attendable keys alone
        sub = (q[i:i + 1], k[i:i + 1][:, :, mask[i]], v[i:i + 1][:, :, mask[i]], None)
        out_s, _, (dq_s, dk_s, dv_s, _) = run(SDPA, sub, g[i:i + 1])
        np.testing.assert_allclose(out[i:i + 1], out_s, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dq[i:i + 1], dq_s, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(dk[i:i + 1][:, :, mask[i]], dk_s, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(dv[i:i + 1][:, :, mask[i]], dv_s, rtol=1e-10, atol=1e-13)


@given(seed=seeds, shape=shapes, masked=st.booleans())
def test_sdpa_gradients_with_and_without_mask(seed, shape, masked):
    rng = np.random.default_rng(seed)
    q, k, v, _ = qkvg(rng, *shape)
    mask = random_mask(rng, shape[0], shape[3]) if masked else None
    assert_gradients(SDPA, (q, k, v, mask), {}, rng=rng)


def test_sdpa_probs_rows_sum_to_one_and_are_a_copy():
    rng = np.random.default_rng(2)
    q, k, v, g = qkvg(rng, 2, 3, 4, 5, 2)
    _, cache = SDPA.forward(q, k, v)
    p = attention.attention_probs(cache)
    assert p.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-14)
    grads = SDPA.backward(cache, g)
    p[...] = 0
    for a, b in zip(grads[:3], SDPA.backward(cache, g)[:3]):
        np.testing.assert_array_equal(a, b)


def test_sdpa_all_masked_row_is_a_value_error():
    rng = np.random.default_rng(0)
    q, k, v, _ = qkvg(rng, 2, 1, 3, 4, 2)
    mask = np.ones((2, 4), bool)
    mask[1] = False
    with pytest.raises(ValueError, match="key_mask"):
        SDPA.forward(q, k, v, mask)


def test_sdpa_input_errors():
    rng = np.random.default_rng(0)
    q, k, v, _ = qkvg(rng, 2, 1, 3, 4, 2)
    for bad in (np.ones((2, 4), int), np.ones((2, 4)), [[True] * 4] * 2):
        with pytest.raises(TypeError, match="key_mask"):
            SDPA.forward(q, k, v, bad)
    for bad in (np.ones((2, 3), bool), np.ones((4,), bool), np.ones((1, 4), bool)):
        with pytest.raises(ValueError, match="key_mask"):
            SDPA.forward(q, k, v, bad)
    with pytest.raises(ValueError, match="k must have shape"):
        SDPA.forward(q, k[..., :1], v)
    with pytest.raises(ValueError, match="k must have shape"):
        SDPA.forward(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="v must have"):
        SDPA.forward(q, k, v[:, :, :2])
    with pytest.raises(ValueError, match="q must have shape"):
        SDPA.forward(q[0], k, v)
    with pytest.raises(TypeError, match="v"):
        SDPA.forward(q, k, v.astype(np.float32))
    _, cache = SDPA.forward(q, k, v)
    with pytest.raises(ValueError, match="grad_out"):
        SDPA.backward(cache, np.zeros((2, 1, 3, 3)))


@pytest.mark.parametrize("lq,lk,dh", [(40, 30, 8), (64, 64, 64)])  # threaded blocks; one-at-a-time blocks
def test_sdpa_blocked_paths_match_reference(monkeypatch, lq, lk, dh):
    monkeypatch.setenv("REFSSL_NUM_THREADS", "2")
    rng = np.random.default_rng(5)
    b, h = 3, 7  # several blocks, the last one partial
    monkeypatch.setattr(attention, "_BLOCK_SCORES", 2 * lq * lk)
    q, k, v, g = qkvg(rng, b, h, lq, lk, dh)
    mask = random_mask(rng, b, lk)
    out_ref, _, dq_ref, dk_ref, dv_ref, _ = sdpa_reference(q, k, v, mask, g)
    out, _, (dq, dk, dv, _) = run(SDPA, (q, k, v, mask), g)
    for got, want in ((out, out_ref), (dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


# -- multi_head_attention ---------------------------------------------------------------------------------------
@pytest.mark.derivation("attention_backward.md#AT7")
@given(seed=seeds, n_heads=st.integers(1, 4), dh=st.integers(1, 3), masked=st.booleans())
def test_mha_matches_per_head_loop_reference(seed, n_heads, dh, masked):
    rng = np.random.default_rng(seed)
    b, n_tok = int(rng.integers(1, 4)), int(rng.integers(1, 6))
    args = mha_inputs(rng, b, n_tok, n_heads * dh)
    mask = random_mask(rng, b, n_tok) if masked else None
    g = rng.standard_normal((b, n_tok, n_heads * dh))
    out_ref, probs_ref, ref = mha_reference(*args, n_heads, mask, g)
    out, cache, grads = run(MHA, args + (mask,), g, n_heads=n_heads)
    np.testing.assert_allclose(out, out_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(attention.multi_head_attention_probs(cache), probs_ref, rtol=1e-10, atol=1e-14)
    assert grads[5] is None
    for got, key in zip(grads, ("x", "w_qkv", "b_qkv", "w_out", "b_out")):
        np.testing.assert_allclose(got, ref[key], rtol=1e-9, atol=1e-12, err_msg=key)


@given(seed=seeds, n_heads=st.sampled_from([1, 2, 3, 4]), masked=st.booleans())
def test_mha_gradients_with_and_without_mask(seed, n_heads, masked):
    rng = np.random.default_rng(seed)
    b, n_tok, d = int(rng.integers(1, 3)), int(rng.integers(1, 5)), n_heads * int(rng.integers(1, 3))
    mask = random_mask(rng, b, n_tok) if masked else None
    assert_gradients(MHA, mha_inputs(rng, b, n_tok, d) + (mask,), {"n_heads": n_heads}, rng=rng)


def test_mha_without_biases():
    rng = np.random.default_rng(3)
    x, w_qkv, _, w_out, _ = mha_inputs(rng, 2, 3, 4)
    g = rng.standard_normal((2, 3, 4))
    out, _, grads = run(MHA, (x, w_qkv, None, w_out, None), g, n_heads=2)
    out_ref, _, ref = mha_reference(x, w_qkv, 0.0, w_out, 0.0, 2, None, g)
    np.testing.assert_allclose(out, out_ref, rtol=1e-10, atol=1e-12)
    assert grads[2] is None and grads[4] is None and grads[5] is None
    np.testing.assert_allclose(grads[0], ref["x"], rtol=1e-9, atol=1e-12)
    no_bias = SimpleNamespace(forward=MHA.forward, backward=MHA.backward, differentiable=(0, 1, 3))
    rep = gradcheck.check(no_bias, (x, w_qkv, None, w_out, None, None), {"n_heads": 2}, rng=rng)
    assert rep.ok, rep.describe()


def test_timm_qkv_layout():
    """timm's qkv.weight W (3D, D) is output-major: w_qkv = W^T, and rows t*D + h*dh + e feed head h of q/k/v."""
    rng = np.random.default_rng(11)
    b, n_tok, d, n_heads = 2, 5, 6, 3
    dh = d // n_heads
    x = rng.standard_normal((b, n_tok, d))
    w_timm, b_timm = rng.standard_normal((3 * d, d)) / np.sqrt(d), rng.standard_normal(3 * d)
    proj_w, proj_b = rng.standard_normal((d, d)) / np.sqrt(d), rng.standard_normal(d)  # timm proj (out, in)
    out, cache = MHA.forward(x, w_timm.T, b_timm, proj_w.T, proj_b, n_heads=n_heads)
    q = x @ w_timm[:d].T + b_timm[:d]
    k = x @ w_timm[d:2 * d].T + b_timm[d:2 * d]
    v = x @ w_timm[2 * d:].T + b_timm[2 * d:]
    heads = []
    for h in range(n_heads):
        sl = slice(h * dh, (h + 1) * dh)
        s = q[:, :, sl] @ np.swapaxes(k[:, :, sl], 1, 2) / np.sqrt(dh)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        np.testing.assert_allclose(attention.multi_head_attention_probs(cache)[:, h], p, rtol=1e-10)
        heads.append(p @ v[:, :, sl])
    np.testing.assert_allclose(out, np.concatenate(heads, axis=-1) @ proj_w.T + proj_b, rtol=1e-10, atol=1e-12)


def test_mha_all_masked_row_and_input_errors():
    rng = np.random.default_rng(0)
    args = mha_inputs(rng, 2, 3, 4)
    mask = np.array([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="key_mask"):
        MHA.forward(*args, mask, n_heads=2)
    with pytest.raises(TypeError, match="key_mask"):
        MHA.forward(*args, mask.astype(np.int8), n_heads=2)
    with pytest.raises(ValueError, match="key_mask"):
        MHA.forward(*args, mask[:, :2] | True, n_heads=2)
    with pytest.raises(ValueError, match="n_heads"):
        MHA.forward(*args, n_heads=3)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="n_heads"):
            MHA.forward(*args, n_heads=bad)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="n_heads"):
            MHA.forward(*args, n_heads=bad)
    x, w_qkv, b_qkv, w_out, b_out = args
    with pytest.raises(ValueError, match="w_qkv"):
        MHA.forward(x, w_qkv.T, b_qkv, w_out, b_out, n_heads=2)
    with pytest.raises(ValueError, match="b_qkv"):
        MHA.forward(x, w_qkv, b_qkv[:4], w_out, b_out, n_heads=2)
    with pytest.raises(ValueError, match="x must have shape"):
        MHA.forward(x[0], w_qkv, b_qkv, w_out, b_out, n_heads=2)
    with pytest.raises(TypeError, match="w_out"):
        MHA.forward(x, w_qkv, b_qkv, w_out.astype(np.float32), b_out, n_heads=2)
    _, cache = MHA.forward(*args, n_heads=2)
    with pytest.raises(ValueError, match="grad_out"):
        MHA.backward(cache, np.zeros((2, 3, 3)))


def test_mha_against_torch_float64():
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch cross-check is skipped")
    F = torch.nn.functional
    rng = np.random.default_rng(21)
    b, n_tok, d, n_heads = 3, 6, 8, 2
    dh = d // n_heads
    args = mha_inputs(rng, b, n_tok, d)
    mask = random_mask(rng, b, n_tok)
    g = rng.standard_normal((b, n_tok, d))
    out, _, grads = run(MHA, args + (mask,), g, n_heads=n_heads)

    tx, tw_qkv, tb_qkv, tw_out, tb_out = (torch.tensor(a, requires_grad=True) for a in args)
    qkv = F.linear(tx, tw_qkv.T, tb_qkv).reshape(b, n_tok, 3, n_heads, dh).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=torch.tensor(mask)[:, None, None, :])
    tout = F.linear(o.transpose(1, 2).reshape(b, n_tok, d), tw_out.T, tb_out)
    tout.backward(torch.tensor(g))
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    for got, t in zip(grads, (tx, tw_qkv, tb_qkv, tw_out, tb_out)):
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-9, atol=1e-12)


# -- the other layers on (B, L, D) tokens -----------------------------------------------------------------------
@given(seed=seeds)
def test_linear_on_tokens(seed):
    rng = np.random.default_rng(seed)
    b, n_tok, d_in, d_out = (int(s) for s in rng.integers(1, 5, size=4))
    x, w, bias = rng.standard_normal((b, n_tok, d_in)), rng.standard_normal((d_in, d_out)), rng.standard_normal(d_out)
    out, cache = linear.linear_forward(x, w, bias)
    np.testing.assert_allclose(out, np.einsum("bld,dm->blm", x, w) + bias, rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(out.shape)
    dx, dw, db = linear.linear_backward(cache, g)
    np.testing.assert_allclose(dx, np.einsum("blm,dm->bld", g, w), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, np.einsum("bld,blm->dm", x, g), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, g.sum(axis=(0, 1)), rtol=1e-12, atol=1e-12)
    assert_gradients("linear", (x, w, bias), {}, rng=rng)


def test_linear_token_shape_errors():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="w"):
        linear.linear_forward(x, np.zeros((3, 2)), None)
    with pytest.raises(ValueError, match="x must have shape"):
        linear.linear_forward(np.zeros(4), np.zeros((4, 2)), None)
    with pytest.raises(ValueError, match="x must not be empty"):
        linear.linear_forward(np.zeros((2, 0, 4)), np.zeros((4, 2)), None)
    _, cache = linear.linear_forward(x, np.zeros((4, 2)), None)
    with pytest.raises(ValueError, match="grad_out"):
        linear.linear_backward(cache, np.zeros((6, 2)))


@given(seed=seeds)
def test_layer_norm_and_gelu_on_tokens(seed):
    rng = np.random.default_rng(seed)
    b, n_tok, d = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(2, 6))
    x = 2 * rng.standard_normal((b, n_tok, d)) + 0.5
    gamma, beta = rng.uniform(0.5, 1.5, d), rng.standard_normal(d)
    out, _ = norm_layers.layer_norm_forward(x, gamma, beta, eps=1e-6)
    for i in range(b):  # each token normalised on its own
        for t in range(n_tok):
            row = x[i, t]
            want = gamma * (row - row.mean()) / np.sqrt(row.var() + 1e-6) + beta
            np.testing.assert_allclose(out[i, t], want, rtol=1e-12, atol=1e-12)
    assert_gradients("layer_norm", (x, gamma, beta), {"eps": 1e-6}, rng=rng)
    y, _ = activations.gelu_forward(x)
    assert y.shape == x.shape
    np.testing.assert_allclose(y.reshape(-1, d), activations.gelu_forward(x.reshape(-1, d))[0], rtol=1e-15)
    assert_gradients("gelu", (x,), {}, rng=rng)
