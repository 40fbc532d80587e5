"""Whole-model checks of the transformer modules: a ViT block, the ViT encoder, MAE, BEiT, BEiT v2 and
the VQ-KD tokenizer, each gradient-checked end to end against float64 central differences (every
parameter, random directions ``vᵀJu``, relative tolerance 1e-6), plus the conventions they follow."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refssl import gradcheck, masking
from refssl.nn.beit import VQKD, BEiT, BEiTv2, PatchKMeansTokenizer
from refssl.nn.mae import MAE
from refssl.nn.transformer import TransformerBlock, ViT, sincos_pos_embed_2d

TOL = 1e-6
seeds = st.integers(0, 2**32 - 1)


class _ParamsOp:
    """A model's loss seen as an op of its parameter arrays (positional, in sorted key order), so that
    :func:`refssl.gradcheck.check` walks every parameter."""

    def __init__(self, params, loss_fn, backward_fn, extra=()):
        self.keys = sorted(params)
        self.extra = tuple(extra)  # fixed non-parameter inputs appended after the parameters
        self.loss_fn, self.backward_fn = loss_fn, backward_fn
        self.differentiable = tuple(range(len(self.keys)))

    def args(self, params):
        return tuple(params[k] for k in self.keys) + self.extra

    def forward(self, *arrays):
        params = dict(zip(self.keys, arrays[:len(self.keys)]))
        out, cache = self.loss_fn(params)
        return np.asarray(out), cache

    def backward(self, cache, g):
        grads = self.backward_fn(cache, g)
        assert set(grads) == set(self.keys), set(grads) ^ set(self.keys)
        return tuple(grads[k] for k in self.keys) + (None,) * len(self.extra)


def _check(params, loss_fn, backward_fn, rng, name):
    op = _ParamsOp(params, loss_fn, backward_fn)
    rep = gradcheck.check(op, op.args(params), {}, rng=rng, full_max_size=0, n_directions=2,
                          tolerance=TOL, name=name)
    assert rep.ok, rep.describe()
    return rep


def _images(rng, n, size=8, c=3):
    return rng.random((n, c, size, size))


def _block_case(rng, masked, spread):
    """A float64 block (D = 8, 2 heads, MLP 16) with every parameter moved off its initial value by
    ``spread`` N(0, 1) (so gamma != 1 and beta != 0), input x (2, L, 8), a padding mask or None, upstream g."""
    b, length, d = 2, int(rng.integers(2, 6)), 8
    blk = TransformerBlock(d, n_heads=2, mlp_ratio=2)
    params = {k: v + spread * rng.standard_normal(v.shape) for k, v in blk.init(rng, np.float64)[0].items()}
    x = rng.standard_normal((b, length, d))
    key_mask = None
    if masked:
        key_mask = rng.random((b, length)) < 0.7
        key_mask[:, 0] = True
    return blk, params, x, key_mask, rng.standard_normal((b, length, d))


@settings(max_examples=4)
@given(seed=seeds, masked=st.booleans())
def test_transformer_block_gradients(seed, masked):
    """One pre-norm block, inputs and every parameter, with and without a padding mask."""
    rng = np.random.default_rng(seed)
    blk, params, x, key_mask, g = _block_case(rng, masked, spread=0.1)

    def loss(p):
        out, cache, _ = blk.forward(p, {}, x, key_mask=key_mask)
        return np.sum(out * g), cache

    def backward(cache, go):
        return {k: v * go for k, v in blk.backward(cache, np.asarray(g))[1].items()}

    _check(params, loss, backward, rng, "TransformerBlock")

    # and the input gradient
    out, cache, _ = blk.forward(params, {}, x, key_mask=key_mask)
    dx, _ = blk.backward(cache, g)
    u = rng.standard_normal(x.shape)
    h = 1e-6
    fd = (np.sum(blk.forward(params, {}, x + h * u, key_mask=key_mask)[0] * g)
          - np.sum(blk.forward(params, {}, x - h * u, key_mask=key_mask)[0] * g)) / (2 * h)
    assert abs(fd - np.sum(dx * u)) <= TOL * max(1.0, np.linalg.norm(dx))


@pytest.mark.derivation("attention_backward.md#AT9")
@settings(max_examples=4)
@given(seed=seeds, masked=st.booleans())
def test_block_with_norms_folded_equals_the_ops_composed_as_written(seed, masked):
    """The block applies each layer norm's gamma and beta through the linear map after it (AT9); its output
    and every gradient equal those of layer_norm (with gamma, beta) -> multi_head_attention -> + x ->
    layer_norm -> linear -> gelu -> linear -> + h, the registered ops composed as the model is written."""
    from refssl.ops import activations, attention, linear, norm_layers

    rng = np.random.default_rng(seed)
    blk, p, x, key_mask, g = _block_case(rng, masked, spread=0.3)
    heads = blk.n_heads

    a_in, c1 = norm_layers.layer_norm_forward(x, p["norm1.gamma"], p["norm1.beta"], eps=1e-6)
    a, ca = attention.multi_head_attention_forward(a_in, p["attn.qkv.w"], p["attn.qkv.b"], p["attn.proj.w"],
                                                   p["attn.proj.b"], key_mask, n_heads=heads)
    h = x + a
    m_in, c2 = norm_layers.layer_norm_forward(h, p["norm2.gamma"], p["norm2.beta"], eps=1e-6)
    u, cf1 = linear.linear_forward(m_in, p["fc1.w"], p["fc1.b"])
    v, cg = activations.gelu_forward(u)
    m, cf2 = linear.linear_forward(v, p["fc2.w"], p["fc2.b"])
    want = {}
    dv, want["fc2.w"], want["fc2.b"] = linear.linear_backward(cf2, g)
    dm_in, want["fc1.w"], want["fc1.b"] = linear.linear_backward(cf1, activations.gelu_backward(cg, dv)[0])
    dh, want["norm2.gamma"], want["norm2.beta"] = norm_layers.layer_norm_backward(c2, dm_in)
    dh = dh + g
    da_in, *dattn = attention.multi_head_attention_backward(ca, dh)
    for key, val in zip(["attn.qkv.w", "attn.qkv.b", "attn.proj.w", "attn.proj.b"], dattn):
        want[key] = val
    dx_want, want["norm1.gamma"], want["norm1.beta"] = norm_layers.layer_norm_backward(c1, da_in)
    dx_want = dx_want + dh

    out, cache, _ = blk.forward(p, {}, x, key_mask=key_mask)
    dx, grads = blk.backward(cache, g)
    np.testing.assert_allclose(out, h + m, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, dx_want, rtol=1e-9, atol=1e-11)
    assert set(grads) == set(want)
    for key in want:
        np.testing.assert_allclose(grads[key], want[key], rtol=1e-9, atol=1e-11, err_msg=key)


@settings(max_examples=3)
@given(seed=seeds, pool=st.sampled_from(["cls", "mean"]), pos=st.sampled_from(["sincos", "learned"]))
def test_vit_encoder_gradients(seed, pool, pos):
    rng = np.random.default_rng(seed)
    vit = ViT(image_size=8, patch=4, dim=8, depth=2, n_heads=2, mlp_ratio=2, pos=pos, pool=pool)
    params = vit.init(rng, np.float64)[0]
    x = _images(rng, 2)
    g = rng.standard_normal((2, 8))

    def loss(p):
        out, cache, _ = vit.forward(p, {}, x)
        return np.sum(out * g), cache

    def backward(cache, go):
        return {k: v * go for k, v in vit.backward(cache, g)[1].items()}

    _check(params, loss, backward, rng, f"ViT pool={pool} pos={pos}")


@settings(max_examples=3)
@given(seed=seeds, norm_pix=st.booleans(), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_mae_end_to_end_gradients(seed, norm_pix, ratio):
    """MAE forward + backward (encoder on visible tokens, mask tokens, unshuffle, decoder, masked loss)."""
    rng = np.random.default_rng(seed)
    model = MAE(image_size=8, patch=2, dim=8, depth=1, n_heads=2, dec_dim=8, dec_depth=1, dec_heads=2,
                mlp_ratio=2, mask_ratio=ratio, norm_pix=norm_pix)
    params = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in model.init(rng, np.float64).items()}
    x = _images(rng, 2)
    masks = model.draw_masking(2, rng)

    def loss(p):
        return model.loss(p, x, masks=masks)

    def backward(cache, go):
        return {k: v * go for k, v in model.backward(cache).items()}

    _check(params, loss, backward, rng, "MAE")


@settings(max_examples=3)
@given(seed=seeds, v2=st.booleans())
def test_beit_end_to_end_gradients(seed, v2):
    rng = np.random.default_rng(seed)
    kw = dict(image_size=8, patch=2, dim=8, depth=2, n_heads=2, mlp_ratio=2, vocab_size=5)
    model = BEiTv2(early_layers=1, head_layers=1, **kw) if v2 else BEiT(**kw)
    params = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in model.init(rng, np.float64).items()}
    x = _images(rng, 2)
    mask = rng.random((2, 16)) < 0.4
    mask[:, 0] = True
    targets = rng.integers(0, 5, size=(2, 16))

    def loss(p):
        return model.loss(p, x, targets, mask)

    def backward(cache, go):
        return {k: v * go for k, v in model.backward(cache).items()}

    _check(params, loss, backward, rng, "BEiTv2" if v2 else "BEiT")


@settings(max_examples=3)
@given(seed=seeds)
def test_vqkd_end_to_end_gradients(seed):
    """VQ-KD: straight-through through the normalisation + commitment term, codebook held fixed.

    The quantiser's value is piecewise constant, so the function whose derivative the backward returns is
    the straight-through surrogate z_q = z_hat + sg(z_q - z_hat): central differences are taken of the
    model with the quantiser replaced by that surrogate (offset frozen at the base point)."""
    from refssl.nn import beit as beit_module

    rng = np.random.default_rng(seed)
    model = VQKD(image_size=8, patch=4, dim=8, depth=1, n_heads=2, code_dim=4, n_codes=6, dec_depth=1,
                 teacher_dim=5, mlp_ratio=2)
    params, state = model.init(rng, np.float64)
    x = _images(rng, 3)
    teacher = rng.standard_normal((3, 4, 5))
    real = beit_module.mm.vector_quantize_forward
    frozen = {}

    def surrogate(z, codebook):
        out, cache = real(z, codebook)
        zhat = beit_module.mm.vector_quantize_normalized_input(cache)
        frozen.setdefault("offset", out - zhat)
        frozen.setdefault("indices", beit_module.mm.vector_quantize_indices(cache))
        # the codes must not change inside a central difference, or the check is meaningless
        np.testing.assert_array_equal(beit_module.mm.vector_quantize_indices(cache), frozen["indices"])
        return zhat + frozen["offset"], cache

    def loss(p):
        return model.loss(p, state, x, teacher)

    def backward(cache, go):
        return {k: v * go for k, v in model.backward(cache).items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(beit_module.mm, "vector_quantize_forward", surrogate)
        _check(params, loss, backward, rng, "VQKD")


def test_sincos_positions_follow_mae_layout():
    """Column index in the first D/2 channels, row in the last; sin then cos; CLS row zero (§21)."""
    d, h, w = 16, 3, 5
    emb = sincos_pos_embed_2d(d, h, w)
    assert emb.shape == (1 + h * w, d)
    np.testing.assert_array_equal(emb[0], 0)
    q = d // 4
    for r in range(h):
        for c in range(w):
            row = emb[1 + r * w + c]
            for k in range(q):
                om = 10000.0 ** (-k / q)
                assert row[k] == pytest.approx(np.sin(c * om))
                assert row[q + k] == pytest.approx(np.cos(c * om))
                assert row[2 * q + k] == pytest.approx(np.sin(r * om))
                assert row[3 * q + k] == pytest.approx(np.cos(r * om))


def test_mae_loss_is_the_masked_mean_of_its_prediction():
    """The encoder keeps floor(L (1 - r)) tokens and the loss is the per-patch squared error averaged over
    the removed patches only (§18), recomputed here from the model's prediction."""
    from refssl.ops.masked_modelling import patchify_forward

    rng = np.random.default_rng(0)
    model = MAE(image_size=8, patch=2, dim=8, depth=1, n_heads=2, dec_dim=8, dec_depth=1, dec_heads=2,
                mask_ratio=0.75)
    params = model.init(rng, np.float64)
    x = _images(rng, 3)
    masks = model.draw_masking(3, rng)
    assert masks[0].shape == (3, 4)  # floor(16 * 0.25) kept
    value, cache = model.loss(params, x, masks=masks)
    pred = cache[-1]
    t = patchify_forward(x, patch=2)[0]
    e = ((pred - t) ** 2).mean(-1)
    assert float(value) == pytest.approx(float((e * masks[1]).sum() / masks[1].sum()), rel=1e-12)


def test_beit_loss_ignores_targets_at_visible_positions():
    rng = np.random.default_rng(1)
    model = BEiT(image_size=8, patch=2, dim=8, depth=1, n_heads=2, vocab_size=7)
    params = model.init(rng, np.float64)
    x = _images(rng, 2)
    mask = masking.block_masking(2, (4, 4), 6, rng, min_num_patches=2)
    t = rng.integers(0, 7, size=(2, 16))
    t2 = t.copy()
    t2[~mask] = (t2[~mask] + 1) % 7
    assert model.loss(params, x, t, mask)[0] == model.loss(params, x, t2, mask)[0]
    t3 = t.copy()
    t3[mask] = (t3[mask] + 1) % 7
    assert model.loss(params, x, t3, mask)[0] != model.loss(params, x, t, mask)[0]


def test_kmeans_tokenizer_separates_colours():
    from refssl import data
    ds = data.make_dataset(200, 10, np.random.default_rng(0), size=16)
    tok = PatchKMeansTokenizer(patch=4, vocab_size=16).fit(ds.train.images, np.random.default_rng(0))
    codes = tok.encode(ds.train.images)
    assert codes.shape == (200, 16) and codes.min() >= 0 and codes.max() < 16
    assert len(np.unique(codes)) >= 8  # the codebook is used, not collapsed on the background
