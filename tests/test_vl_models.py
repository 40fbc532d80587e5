"""Vision-language models: the text encoder, CLIP and VisualBERT gradient-checked end to end (float64,
every parameter, random directions vᵀJu, relative tolerance 1e-6), the attention masks (padding, absent
regions), BERT's masking proportions, and the claims of derivations/vision_language.md."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refssl import gradcheck
from refssl.fit import fit
from refssl.nn.clip_model import CLIPModel, no_decay
from refssl.nn.models import cnn_encoder, mlp
from refssl.nn.text import TextEncoder
from refssl.nn.transformer import ViT
from refssl.nn.visualbert import VisualBERT, bert_mask, box_geometry
from refssl.ops import clip as clip_op
from refssl.optim import SGD

TOL = 1e-6
seeds = st.integers(0, 2**32 - 1)
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)


# -- helpers -----------------------------------------------------------------------------------------

class _ParamsOp:
    """A model's scalar loss as an op of its parameter arrays (sorted keys), for gradcheck.check."""

    def __init__(self, params, loss_fn, backward_fn):
        self.keys = sorted(params)
        self.loss_fn, self.backward_fn = loss_fn, backward_fn
        self.differentiable = tuple(range(len(self.keys)))

    def forward(self, *arrays):
        out, cache = self.loss_fn(dict(zip(self.keys, arrays)))
        return np.asarray(out), cache

    def backward(self, cache, g):
        grads = self.backward_fn(cache)
        assert set(grads) == set(self.keys), set(grads) ^ set(self.keys)
        return tuple(np.asarray(grads[k] * g) for k in self.keys)


def _check(params, loss_fn, backward_fn, rng, name):
    op = _ParamsOp(params, loss_fn, backward_fn)
    rep = gradcheck.check(op, tuple(params[k] for k in op.keys), {}, rng=rng, full_max_size=0,
                          n_directions=2, tolerance=TOL, name=name)
    assert rep.ok, rep.describe()


def _jitter(params, rng, scale=0.05):
    """Move every parameter off its initial value (LayerNorm gains 1, biases 0) so that no term vanishes."""
    return {k: np.asarray(v + scale * rng.standard_normal(np.shape(v))) for k, v in params.items()}


def _captions(rng, b, t, vocab, *, min_len=3):
    """[CLS] w ... [SEP] [PAD] ... with random lengths; row 0 is always padded when t > min_len."""
    lens = rng.integers(min_len, t + 1, size=b)
    lens[0] = min_len
    mask = np.arange(t)[None, :] < lens[:, None]
    ids = rng.integers(len(SPECIAL), vocab, size=(b, t))
    ids[:, 0] = CLS
    ids[np.arange(b), lens - 1] = SEP
    ids[~mask] = PAD
    return ids, mask


def _regions(rng, b, k, crop, *, image_size=32):
    crops = rng.random((b, k, 3, crop, crop))
    x0 = rng.uniform(0, image_size / 2, size=(b, k))
    y0 = rng.uniform(0, image_size / 2, size=(b, k))
    boxes = np.stack([x0, y0, x0 + rng.uniform(3, 12, (b, k)), y0 + rng.uniform(3, 12, (b, k))], axis=-1)
    valid = rng.random((b, k)) < 0.7
    valid[:, 0] = True
    return crops, boxes, valid


def _small_vb(vocab=9, t=7, k=3, crop=4, encoder="mlp"):
    enc = None if encoder == "cnn" else mlp([3 * crop * crop, 6, 5], act="gelu", flatten=True)
    return VisualBERT(vocab, t, k, dim=8, depth=2, n_heads=2, region_encoder=enc, crop_size=crop, mlp_ratio=2)


# -- whole-model gradients ---------------------------------------------------------------------------

@settings(max_examples=3)
@given(seed=seeds, read=st.sampled_from(["cls", "tokens"]))
def test_text_encoder_gradients_with_padding(seed, read):
    """[CLS] feature (forward/backward) or every real token (tokens_with_cache/backward_tokens)."""
    rng = np.random.default_rng(seed)
    enc = TextEncoder(vocab_size=9, max_len=8, dim=8, depth=2, n_heads=2, mlp_ratio=2)
    params = _jitter(enc.init(rng, np.float64)[0], rng)
    ids, am = _captions(rng, 3, 6, 9)
    g = rng.standard_normal((3, 8) if read == "cls" else (3, 6, 8)) * (am[..., None] if read == "tokens" else 1)

    def loss(p):
        if read == "cls":
            out, cache, _ = enc.forward(p, {}, ids, attn_mask=am)
        else:
            out, cache = enc.tokens_with_cache(p, ids, am)
        return np.sum(out * g), cache

    def backward(cache):
        return enc.backward(cache, g)[1] if read == "cls" else enc.backward_tokens(cache, g)

    _check(params, loss, backward, rng, f"TextEncoder {read}")


@settings(max_examples=3)
@given(seed=seeds, image=st.sampled_from(["vit", "cnn"]))
def test_clip_model_gradients_including_logit_scale(seed, image):
    rng = np.random.default_rng(seed)
    img_enc = (ViT(image_size=8, patch=4, dim=8, depth=1, n_heads=2, mlp_ratio=2) if image == "vit"
               else cnn_encoder(image_size=8, channels=(4,), out_dim=6))
    txt = TextEncoder(vocab_size=9, max_len=6, dim=8, depth=1, n_heads=2, mlp_ratio=2)
    model = CLIPModel(img_enc, txt, embed_dim=5)
    params = _jitter(model.init(rng, np.float64), rng)
    params["logit_scale"] = np.asarray(rng.uniform(0.5, 2.5))  # unsaturated softmaxes
    images = rng.random((4, 3, 8, 8))
    ids, am = _captions(rng, 4, 6, 9)
    _check(params, lambda p: model.loss(p, images, ids, am), model.backward, rng, f"CLIP {image}")

    # and the logit-scale gradient alone, against a central difference along s
    grads = model.backward(model.loss(params, images, ids, am)[1])
    h = 1e-6

    def at(s):
        return float(model.loss({**params, "logit_scale": np.asarray(s)}, images, ids, am)[0])

    s0 = float(params["logit_scale"])
    assert grads["logit_scale"].shape == () and grads["logit_scale"].dtype == np.float64
    assert float(grads["logit_scale"]) == pytest.approx((at(s0 + h) - at(s0 - h)) / (2 * h), rel=1e-6, abs=1e-9)


@settings(max_examples=4)
@given(seed=seeds, variant=st.sampled_from(["mlm+itm", "mlm", "itm", "text_only"]))
def test_visualbert_end_to_end_gradients(seed, variant):
    """MLM (tied decoder) + ITM through the transformer, embeddings, box projection and region encoder;
    some regions absent, one row with none present."""
    rng = np.random.default_rng(seed)
    model = _small_vb()
    params = _jitter(model.init(rng, np.float64), rng)
    ids, am = _captions(rng, 3, 7, 9)
    crops, boxes, valid = _regions(rng, 3, 3, 4)
    valid[2] = False
    mlm = bert_mask(ids, am, rng, MASK, 9, SPECIAL, prob=0.4) if variant != "itm" else None
    itm = rng.integers(0, 2, size=3) if variant != "mlm" else None
    text_only = variant == "text_only"

    def loss(p):
        return model.loss(p, ids, am, crops, boxes, valid, mlm, itm, text_only=text_only)

    _check(params, loss, model.backward, rng, f"VisualBERT {variant}")


def test_visualbert_gradients_with_the_default_cnn_region_encoder():
    rng = np.random.default_rng(7)
    model = _small_vb(crop=8, encoder="cnn")
    params = _jitter(model.init(rng, np.float64), rng)
    ids, am = _captions(rng, 2, 7, 9)
    crops, boxes, valid = _regions(rng, 2, 3, 8)
    mlm = bert_mask(ids, am, rng, MASK, 9, SPECIAL, prob=0.5)
    itm = np.array([1, 0])
    _check(params, lambda p: model.loss(p, ids, am, crops, boxes, valid, mlm, itm), model.backward, rng,
           "VisualBERT cnn regions")


# -- masks -------------------------------------------------------------------------------------------

@pytest.mark.derivation("vision_language.md#VL14")
def test_padding_changes_neither_the_cls_output_nor_the_clip_text_embedding():
    """Other ids at the padding positions, and the trailing padding cut off, give the same [CLS] output."""
    rng = np.random.default_rng(0)
    enc = TextEncoder(vocab_size=12, max_len=10, dim=8, depth=2, n_heads=2)
    params = _jitter(enc.init(rng, np.float64)[0], rng, 0.5)
    ids, am = _captions(rng, 5, 9, 12)
    ids[0, 5:] = PAD
    am[0, 5:] = False
    base = enc.forward(params, {}, ids, attn_mask=am)[0]
    other = ids.copy()
    other[~am] = rng.integers(0, 12, size=int((~am).sum()))
    np.testing.assert_allclose(enc.forward(params, {}, other, attn_mask=am)[0], base, rtol=0, atol=1e-12)
    # a mask that lets the padding in does change it: the check above can fail
    assert not np.allclose(enc.forward(params, {}, other, attn_mask=np.ones_like(am))[0][0], base[0])
    # row 0 alone, cut to its 5 real tokens
    short = enc.forward(params, {}, ids[:1, :5], attn_mask=am[:1, :5])[0]
    np.testing.assert_allclose(short, base[:1], rtol=0, atol=1e-12)
    # the same holds for CLIP's caption embedding
    model = CLIPModel(cnn_encoder(image_size=8, channels=(4,), out_dim=6), enc, embed_dim=4)
    p = model.init(rng, np.float64)
    np.testing.assert_allclose(model.encode_texts(p, other, am), model.encode_texts(p, ids, am), atol=1e-12)


@pytest.mark.derivation("vision_language.md#VL14")
def test_absent_regions_get_no_attention_and_no_influence():
    rng = np.random.default_rng(1)
    model = _small_vb()
    params = _jitter(model.init(rng, np.float64), rng, 0.5)
    ids, am = _captions(rng, 4, 7, 9)
    crops, boxes, valid = _regions(rng, 4, 3, 4)
    valid[1, 1:] = False
    valid[3, 2] = False
    att = model.attention_to_regions(params, ids, am, crops, boxes, valid, 2)
    assert att.shape == (4, 2, 3)
    assert np.all(att[np.broadcast_to(~valid[:, None, :], att.shape)] == 0.0)
    assert np.all(att[np.broadcast_to(valid[:, None, :], att.shape)] > 0.0)
    # per-row positions, and text-only: every region weight is 0
    att_rows = model.attention_to_regions(params, ids, am, crops, boxes, valid, np.array([1, 2, 1, 2]))
    np.testing.assert_array_equal(att_rows[1], att[1])
    assert np.all(model.attention_to_regions(params, ids, am, crops, boxes, valid, 1, text_only=True) == 0.0)

    # other crops and boxes in the absent slots change nothing; in a present slot they do
    crops2, boxes2 = crops.copy(), boxes.copy()
    crops2[~valid] = rng.random(crops2[~valid].shape)
    boxes2[~valid] += 5.0
    at = np.array([2, 1, 2, 1])
    for fn in (lambda c, b: model.itm_logits(params, ids, am, c, b, valid),
               lambda c, b: model.predict_masked(params, ids, am, c, b, valid, at)):
        np.testing.assert_allclose(fn(crops2, boxes2), fn(crops, boxes), rtol=0, atol=1e-12)
        crops3 = crops.copy()
        crops3[0, 0] = rng.random(crops3[0, 0].shape)
        assert not np.allclose(fn(crops3, boxes)[0], fn(crops, boxes)[0])
    # text-only ignores every region, and equals passing no present region
    none = np.zeros_like(valid)
    np.testing.assert_allclose(model.itm_logits(params, ids, am, crops2, boxes2, valid, text_only=True),
                               model.itm_logits(params, ids, am, crops, boxes, none), rtol=0, atol=1e-12)


# -- BERT masking ------------------------------------------------------------------------------------

def _big_batch(rng, b=6000, t=12, vocab=20):
    return _captions(rng, b, t, vocab, min_len=4)


@pytest.mark.derivation("vision_language.md#VL7")
def test_bert_mask_proportions_and_specials():
    rng = np.random.default_rng(0)
    vocab = 20
    ids, am = _big_batch(rng, vocab=vocab)
    inp, chosen = bert_mask(ids, am, rng, MASK, vocab, SPECIAL)
    eligible = am & ~np.isin(ids, SPECIAL)
    n = int(eligible.sum())
    assert not (chosen & ~eligible).any()  # never a special token or padding
    np.testing.assert_array_equal(inp[~chosen], ids[~chosen])  # unchosen positions untouched
    shown_mask = chosen & (inp == MASK)
    randomised = chosen & (inp != MASK) & (inp != ids)
    # (VL7): fractions of the eligible tokens shown as [MASK], as a random draw, unchanged while chosen;
    # a random draw equal to the original word counts as unchanged, so split the 0.015 by 1/W
    w = vocab - len(SPECIAL)
    p = 0.15
    expected = {"chosen": p, "mask": p * 0.8, "random (differs)": p * 0.1 * (1 - 1 / w),
                "unchanged": p * (0.1 + 0.1 / w)}
    observed = {"chosen": chosen.sum() / n, "mask": shown_mask.sum() / n, "random (differs)": randomised.sum() / n,
                "unchanged": (chosen & (inp == ids)).sum() / n}
    for key, q in expected.items():
        assert abs(observed[key] - q) <= 5 * math.sqrt(q * (1 - q) / n), (key, observed[key], q)
    assert not np.isin(inp[randomised], SPECIAL).any()  # random words are words


@pytest.mark.derivation("vision_language.md#VL8")
def test_bert_mask_chosen_input_equals_target_probabilities():
    rng = np.random.default_rng(1)
    for vocab in (6, 20):
        ids, am = _big_batch(rng, vocab=vocab)
        inp, chosen = bert_mask(ids, am, rng, MASK, vocab, SPECIAL)
        w = vocab - len(SPECIAL)
        same = inp[chosen] == ids[chosen]
        q = 0.1 + 0.1 / w
        assert abs(same.mean() - q) <= 5 * math.sqrt(q * (1 - q) / same.size)
        visible = inp[chosen] != MASK
        q2 = 0.5 * (1 + 1 / w)
        frac = same[visible].mean()
        assert abs(frac - q2) <= 5 * math.sqrt(q2 * (1 - q2) / visible.sum()), (vocab, frac, q2)


def test_bert_mask_chooses_one_token_when_the_draw_chooses_none():
    rng = np.random.default_rng(2)
    ids, am = _captions(rng, 3, 6, 9)
    inp, chosen = bert_mask(ids, am, rng, MASK, 9, SPECIAL, prob=1e-12)
    assert chosen.sum() == 1 and not np.isin(ids[chosen], SPECIAL).any()
    with pytest.raises(ValueError, match="mask_id"):
        bert_mask(ids, am, rng, MASK, 9, (PAD, CLS, SEP))


# -- CLIP logit scale (derivation) -------------------------------------------------------------------

def _clip_setup(seed, scale=1.5):
    rng = np.random.default_rng(seed)
    model = CLIPModel(ViT(image_size=8, patch=4, dim=8, depth=1, n_heads=2, mlp_ratio=2),
                      TextEncoder(vocab_size=9, max_len=6, dim=8, depth=1, n_heads=2, mlp_ratio=2), embed_dim=5)
    params = _jitter(model.init(rng, np.float64), rng, 0.3)
    params["logit_scale"] = np.asarray(scale)
    images = rng.random((5, 3, 8, 8))
    ids, am = _captions(rng, 5, 6, 9)
    return model, params, images, ids, am


def _softmaxes(lam):
    pr = np.exp(lam - lam.max(axis=1, keepdims=True))
    pr /= pr.sum(axis=1, keepdims=True)
    pc = np.exp(lam - lam.max(axis=0, keepdims=True))
    pc /= pc.sum(axis=0, keepdims=True)
    return pr, pc


@pytest.mark.derivation("vision_language.md#VL1")
@pytest.mark.derivation("vision_language.md#VL2")
@settings(max_examples=5)
@given(seed=seeds, scale=st.floats(0.0, clip_op.LOGIT_SCALE_MAX))
def test_clip_logit_scale_gradient_formulas(seed, scale):
    model, params, images, ids, am = _clip_setup(seed, scale)
    _, cache = model.loss(params, images, ids, am)
    ds = float(model.backward(cache)["logit_scale"])
    c = model.encode_images(params, images) @ model.encode_texts(params, ids, am).T  # cosines
    n, es = len(c), math.exp(scale)
    pr, pc = _softmaxes(es * c)
    vl1 = es / (2 * n) * np.sum((pr + pc - 2 * np.eye(n)) * c)
    vl2 = es / (2 * n) * np.sum((pr * c).sum(axis=1) - np.diag(c) + (pc * c).sum(axis=0) - np.diag(c))
    assert ds == pytest.approx(vl1, rel=1e-10, abs=1e-13)
    assert ds == pytest.approx(vl2, rel=1e-10, abs=1e-13)


def _ranked(c, sign):
    """Every matching pair strictly the largest (sign=+1) or smallest (sign=-1) of its row and column."""
    off = ~np.eye(len(c), dtype=bool)
    d = sign * np.diag(c)
    other = np.where(off, sign * c, -np.inf)
    return bool(np.all(d[:, None] > other) and np.all(d[None, :] > other))


@pytest.mark.derivation("vision_language.md#VL3")
@settings(max_examples=15)
@given(seed=seeds, scale=st.floats(0.0, 3.0), noise=st.floats(0.0, 0.3))
def test_clip_scale_gradient_sign_on_a_ranked_batch(seed, scale, noise):
    """(scale <= 3: the off-diagonal softmax weights stay above e^-21, so the sign is resolvable in float64;
    near the cap a perfectly ranked batch has |dL/ds| below the rounding of 1 - P_ii.)"""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    img = np.linalg.qr(rng.standard_normal((n + 2, n)))[0].T * rng.uniform(0.5, 2, size=(n, 1))
    txt = img + noise * rng.standard_normal(img.shape) / math.sqrt(n + 2)
    ui = img / np.linalg.norm(img, axis=1, keepdims=True)
    for t, sign in ((txt, 1), (-txt, -1)):  # correctly ranked, then every match the worst
        ut = t / np.linalg.norm(t, axis=1, keepdims=True)
        assume(_ranked(ui @ ut.T, sign))
        ds = float(clip_op.clip_backward(clip_op.clip_forward(img, t, np.asarray(scale))[1], 1.0)[2])
        assert sign * ds < 0, (sign, ds)


@pytest.mark.derivation("vision_language.md#VL4")
@settings(max_examples=5)
@given(seed=seeds, scale=st.floats(0.2, 4.0))
def test_clip_scale_second_derivative(seed, scale):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(2, 6)), 4
    img, txt = rng.standard_normal((n, d)), rng.standard_normal((n, d))

    def ds(s):
        return float(clip_op.clip_backward(clip_op.clip_forward(img, txt, np.asarray(s))[1], 1.0)[2])

    h = 1e-5
    fd = (ds(scale + h) - ds(scale - h)) / (2 * h)
    ui = img / np.linalg.norm(img, axis=1, keepdims=True)
    ut = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    lam = math.exp(scale) * ui @ ut.T
    pr, pc = _softmaxes(lam)
    var_r = (pr * lam**2).sum(1) - (pr * lam).sum(1) ** 2
    var_c = (pc * lam**2).sum(0) - (pc * lam).sum(0) ** 2
    vl4 = ds(scale) + (var_r.sum() + var_c.sum()) / (2 * n)
    assert fd == pytest.approx(vl4, rel=1e-6, abs=1e-8)


@pytest.mark.derivation("vision_language.md#VL5")
@pytest.mark.parametrize("scale", [0.0, 1.0, clip_op.LOGIT_SCALE_INIT, clip_op.LOGIT_SCALE_MAX])
def test_clip_collapsed_embeddings_give_log_n_and_no_scale_gradient(scale):
    rng = np.random.default_rng(3)
    n = 6
    img = np.tile(rng.standard_normal(4), (n, 1))
    txt = np.tile(rng.standard_normal(4), (n, 1)) * rng.uniform(0.5, 2, size=(n, 1))  # same direction
    value, cache = clip_op.clip_forward(img, txt, np.asarray(scale))
    assert float(value) == pytest.approx(math.log(n), rel=1e-12)
    assert abs(float(clip_op.clip_backward(cache, 1.0)[2])) < 1e-12


@pytest.mark.derivation("vision_language.md#VL6")
def test_clip_clamp_is_a_projection_after_each_step():
    model, params, images, ids, am = _clip_setup(4)
    ln100 = math.log(100.0)
    for s, want in [(-0.5, 0.0), (2.0, 2.0), (5.0, ln100)]:
        out = model.after_step({**params, "logit_scale": np.asarray(s)})
        assert float(out["logit_scale"]) == want and out["logit_scale"].shape == ()
        assert out["img_proj.w"] is params["img_proj.w"]  # only the scale is replaced
    # one SGD step then the projection: s' = min(max(s - lr ds, 0), ln 100)
    lr = 3.0
    opt = SGD(lr=lr, momentum=0.0)
    for s in (0.05, 2.0, ln100 - 0.01):
        p = {**params, "logit_scale": np.asarray(s)}
        grads = model.backward(model.loss(p, images, ids, am)[1])
        stepped, _ = opt.step(p, grads, opt.init(p))
        got = float(model.after_step(stepped)["logit_scale"])
        assert got == pytest.approx(min(max(s - lr * float(grads["logit_scale"]), 0.0), ln100), abs=1e-12)
    # the fit hook: a large learning rate on the scale alone drives it into the cap, where it stays
    p0 = {**params, "logit_scale": np.asarray(ln100)}
    seen = []

    def objective(p, step):
        v, g = model.loss_and_grads(p, images, ids, am)
        g = {k: (x if k == "logit_scale" else np.zeros_like(x)) for k, x in g.items()}
        seen.append((float(p["logit_scale"]), float(g["logit_scale"])))
        return v, g

    out, _ = fit(objective, p0, SGD(lr=50.0, momentum=0.0), 4, after_step=model.fit_after_step)
    assert all(0.0 <= s <= ln100 for s, _ in seen) and 0.0 <= float(out["logit_scale"]) <= ln100
    for (s, g), (s_next, _) in zip(seen, seen[1:]):  # projected gradient descent, step by step
        assert s_next == pytest.approx(min(max(s - 50.0 * g, 0.0), ln100), abs=1e-12)
    assert no_decay("logit_scale") and not no_decay("img_proj.w")


# -- MLM loss levels (derivation) --------------------------------------------------------------------

@pytest.mark.derivation("vision_language.md#VL9")
def test_mlm_loss_of_constant_logits_is_log_vocab():
    rng = np.random.default_rng(6)
    vocab = 11
    model = _small_vb(vocab=vocab)
    params = _jitter(model.init(rng, np.float64), rng, 0.3)
    params["mlm.norm.gamma"] = np.zeros_like(params["mlm.norm.gamma"])
    params["mlm.norm.beta"] = np.zeros_like(params["mlm.norm.beta"])
    params["mlm.decoder.b"] = np.full(vocab, 0.7)  # constant logits, whatever the constant
    ids, am = _captions(rng, 5, 7, vocab)
    crops, boxes, valid = _regions(rng, 5, 3, 4)
    mlm = bert_mask(ids, am, rng, MASK, vocab, SPECIAL, prob=0.5)
    value, cache = model.loss(params, ids, am, crops, boxes, valid, mlm, None)
    assert float(value) == pytest.approx(math.log(vocab), rel=1e-12)
    assert model.loss_terms(cache) == {"mlm": pytest.approx(math.log(vocab), rel=1e-12)}


@pytest.mark.derivation("vision_language.md#VL10")
@settings(max_examples=5)
@given(seed=seeds)
def test_text_only_prediction_of_an_unimplied_colour_is_bounded_by_chance(seed):
    """C captions identical except the colour word, which is masked: without regions the model sees the same
    input for every target, so mean CE over the C targets >= log C and accuracy <= 1/C."""
    rng = np.random.default_rng(seed)
    vocab, n_col = 12, 4
    colours = np.arange(4, 4 + n_col)
    model = _small_vb(vocab=vocab)
    params = _jitter(model.init(rng, np.float64), rng, 1.0)
    base = np.array([CLS, 9, 0, 10, SEP, PAD, PAD])
    ids = np.tile(base, (n_col, 1))
    ids[:, 2] = colours
    am = np.tile(base != PAD, (n_col, 1))
    am[:, 2] = True
    inp = ids.copy()
    inp[:, 2] = MASK
    crops, boxes, valid = _regions(rng, n_col, 3, 4)
    logits = model.predict_masked(params, inp, am, crops, boxes, valid, np.full(n_col, 2), text_only=True)
    logq = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(
        1, keepdims=True)
    ce = -logq[np.arange(n_col), colours].mean()
    acc = np.mean(np.argmax(logits, axis=1) == colours)
    assert ce >= math.log(n_col) - 1e-12
    assert acc <= 1 / n_col
    # with the regions visible the input differs per row, and the bound need not hold: the rows differ
    vis = model.predict_masked(params, inp, am, crops, boxes, valid, np.full(n_col, 2))
    assert not np.allclose(vis[0], vis[1])


# -- sentence-image prediction (derivation) ----------------------------------------------------------

@pytest.mark.derivation("vision_language.md#VL11")
@pytest.mark.derivation("vision_language.md#VL12")
@pytest.mark.derivation("vision_language.md#VL13")
@settings(max_examples=5)
@given(seed=seeds)
def test_itm_is_a_logistic_loss_of_the_logit_difference(seed):
    rng = np.random.default_rng(seed)
    model = _small_vb()
    params = _jitter(model.init(rng, np.float64), rng, 0.5)
    b = 6
    ids, am = _captions(rng, b, 7, 9)
    crops, boxes, valid = _regions(rng, b, 3, 4)
    y = rng.integers(0, 2, size=b)
    value, cache = model.loss(params, ids, am, crops, boxes, valid, None, y)
    grads = model.backward(cache)
    z = model.itm_logits(params, ids, am, crops, boxes, valid)
    delta = z[:, 1] - z[:, 0]
    sig = 1 / (1 + np.exp(-delta))
    bce = -(y * np.log(sig) + (1 - y) * np.log(1 - sig))
    assert float(value) == pytest.approx(bce.mean(), rel=1e-12)  # VL11, first form
    assert float(value) == pytest.approx(np.mean(np.log1p(np.exp(delta)) - y * delta), rel=1e-12)  # second
    # VL12 through the head's bias: dL/db = mean_i (sig - y) * (-1, +1)
    np.testing.assert_allclose(grads["itm.b"], np.mean(sig - y) * np.array([-1.0, 1.0]), rtol=1e-10, atol=1e-14)
    # VL13: the two columns move in opposite directions
    np.testing.assert_allclose(grads["itm.w"].sum(axis=1), 0.0, atol=1e-14)
    assert abs(grads["itm.b"].sum()) < 1e-15
    # chance: delta = 0 gives log 2
    p0 = {**params, "itm.w": np.zeros_like(params["itm.w"]), "itm.b": np.zeros(2)}
    assert float(model.loss(p0, ids, am, crops, boxes, valid, None, y)[0]) == pytest.approx(math.log(2), rel=1e-12)


# -- conventions and input checks --------------------------------------------------------------------

def test_box_geometry_and_total_loss():
    boxes = np.array([[[4.0, 8.0, 12.0, 24.0]]])
    np.testing.assert_allclose(box_geometry(boxes, 32), [[[0.125, 0.25, 0.375, 0.75, 8 * 16 / 1024]]])
    rng = np.random.default_rng(8)
    model = _small_vb()
    params = model.init(rng, np.float64)
    ids, am = _captions(rng, 3, 7, 9)
    crops, boxes, valid = _regions(rng, 3, 3, 4)
    mlm = bert_mask(ids, am, rng, MASK, 9, SPECIAL)
    y = np.array([1, 0, 1])
    value, cache = model.loss(params, ids, am, crops, boxes, valid, mlm, y)
    t = model.loss_terms(cache)
    assert float(value) == pytest.approx(t["mlm"] + t["itm"], rel=1e-12)
    assert t["mlm"] == pytest.approx(float(model.loss(params, ids, am, crops, boxes, valid, mlm, None)[0]))


def test_clip_model_initialisation_and_dtype():
    rng = np.random.default_rng(9)
    model = CLIPModel(cnn_encoder(image_size=8, channels=(4,), out_dim=6),
                      TextEncoder(vocab_size=9, max_len=6, dim=8, depth=1, n_heads=2), embed_dim=5)
    p = model.init(rng)
    assert float(p["logit_scale"]) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert model.scale(p) == pytest.approx(1 / 0.07, rel=1e-6)
    images = rng.random((4, 3, 8, 8)).astype(np.float32)
    ids, am = _captions(rng, 4, 6, 9)
    value, cache = model.loss(p, images, ids, am)
    grads = model.backward(cache)
    assert value.dtype == np.float32 and all(grads[k].dtype == np.float32 for k in grads)
    assert model.encode_images(p, images).shape == (4, 5) and model.logits(p, images, ids, am).shape == (4, 4)
    with pytest.raises(ValueError, match="batch norm"):
        CLIPModel(cnn_encoder(image_size=8, channels=(4,), out_dim=6, norm="batch"),
                  TextEncoder(vocab_size=9, max_len=6, dim=8, depth=1, n_heads=2), embed_dim=5).init(rng)


def test_input_errors_name_the_argument():
    rng = np.random.default_rng(10)
    model = _small_vb()
    params = model.init(rng, np.float64)
    ids, am = _captions(rng, 2, 7, 9)
    crops, boxes, valid = _regions(rng, 2, 3, 4)
    y = np.array([0, 1])
    with pytest.raises(ValueError, match="region_inputs"):
        model.loss(params, ids, am, crops[:, :2], boxes, valid, None, y)
    with pytest.raises(ValueError, match="boxes"):
        model.loss(params, ids, am, crops, boxes[..., :3], valid, None, y)
    with pytest.raises(ValueError, match="valid"):
        model.loss(params, ids, am, crops, boxes, valid.astype(int), None, y)
    with pytest.raises(TypeError, match="attn_mask"):
        model.loss(params, ids, am.astype(int), crops, boxes, valid, None, y)
    with pytest.raises(ValueError, match="max_len"):
        TextEncoder(9, 4, 8, 1, 2).forward(TextEncoder(9, 4, 8, 1, 2).init(rng)[0], {}, ids, attn_mask=am)
    with pytest.raises(ValueError, match="chosen"):
        model.loss(params, ids, am, crops, boxes, valid, (ids, np.zeros_like(am)), y)
    with pytest.raises(TypeError, match="text_only"):
        model.itm_logits(params, ids, am, crops, boxes, valid, text_only=1)
