"""Captioned scenes: placement, boxes, crops, captions and the tokenizer.

Checks are independent of the code under test: objects are re-rendered alone with the single-shape
renderer over the whole image (not the windowed paste the scene builder uses), box extents are compared
with supersampled hard renders, crops with scipy's ``map_coordinates``, and captions are parsed back with a
regular expression written here and checked against the factors and the boxes.
"""

import re

import numpy as np
import pytest
from hypothesis import given
from scipy.ndimage import map_coordinates

from refssl.data.captions import (
    MAX_CAPTION_WORDS, OPENERS, VOCAB, Tokenizer, caption_scenes, prompt_captions, word_objects,
)
from refssl.data.scenes import BOX_MARGIN, SCENE_RADIUS, SIZE_NAMES, Scenes, crop_boxes, make_scenes
from refssl.data.shapes import COLOR_NAMES, N_COLORS, SHAPES, render
from tests.helpers import seeds

S = 32


def _alone(scenes: Scenes, slot: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Scenes holding an object in ``slot`` and that object rendered alone over the whole image."""
    idx, f = scenes.object_factors(slot)
    return idx, render(f, scenes.image_size, **kw)


# ---------------------------------------------------------------------------------------------------
# Scenes


@given(seeds)
def test_scenes_are_deterministic_per_seed(seed):
    a = make_scenes(30, np.random.default_rng(seed))
    b = make_scenes(30, np.random.default_rng(seed))
    for name in Scenes.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    c = make_scenes(30, np.random.default_rng(seed + 1))
    assert not np.array_equal(a.images, c.images)


def test_layout_dtypes_and_absent_slots():
    sc = make_scenes(400, np.random.default_rng(0))
    n, k = 400, 3
    assert sc.images.shape == (n, 3, S, S) and sc.images.dtype == np.float32
    assert sc.images.min() >= 0 and sc.images.max() <= 1
    expected = {"boxes": ((n, k, 4), np.float32), "n_objects": ((n,), np.int64), "valid": ((n, k), bool),
                "shape": ((n, k), np.int64), "color": ((n, k), np.int64), "size": ((n, k), np.int64),
                "radius": ((n, k), np.float32), "center": ((n, k, 2), np.float32),
                "rotation": ((n, k), np.float32), "color_jitter": ((n, k, 3), np.float32)}
    for name, (shape, dtype) in expected.items():
        a = getattr(sc, name)
        assert a.shape == shape and a.dtype == dtype, name
    assert set(np.unique(sc.n_objects)) == {1, 2, 3}
    np.testing.assert_array_equal(sc.valid, np.arange(k)[None] < sc.n_objects[:, None])
    absent = ~sc.valid
    for name in ("shape", "color", "size"):
        assert (getattr(sc, name)[absent] == -1).all()
        assert getattr(sc, name)[sc.valid].min() >= 0
    for name in ("boxes", "radius", "center", "rotation", "color_jitter"):
        assert (getattr(sc, name)[absent] == 0).all()
    assert sc.shape.max() == len(SHAPES) - 1 and sc.color.max() == N_COLORS - 1
    # The radius of each present object lies in the range of its size class.
    lo, hi = np.asarray(SCENE_RADIUS)[sc.size[sc.valid]].T * S
    r = sc.radius[sc.valid]
    assert ((r >= lo - 1e-4) & (r <= hi + 1e-4)).all()


def test_factors_are_uniform_whatever_the_count():
    """Shape, colour and size are drawn before placement, so crowded scenes are not biased to small
    objects (a rejection on the whole scene would be)."""
    sc = make_scenes(3000, np.random.default_rng(1), min_objects=3)
    v = sc.valid
    assert abs((sc.size[v] == 1).mean() - 0.5) < 0.03
    assert np.all(np.abs(np.bincount(sc.shape[v], minlength=3) / v.sum() - 1 / 3) < 0.03)
    assert np.all(np.abs(np.bincount(sc.color[v], minlength=8) / v.sum() - 1 / 8) < 0.025)


def test_min_and_max_objects():
    sc = make_scenes(50, np.random.default_rng(2), max_objects=1)
    assert sc.boxes.shape == (50, 1, 4) and (sc.n_objects == 1).all()
    sc = make_scenes(50, np.random.default_rng(2), min_objects=2)
    assert sc.n_objects.min() == 2
    sc = make_scenes(0, np.random.default_rng(2))
    assert len(sc) == 0 and sc.images.shape == (0, 3, S, S)


@pytest.mark.parametrize("size", [16, 32, 48])
def test_boxes_inside_and_separated(size):
    sc = make_scenes(300, np.random.default_rng(3), size=size)
    b, v = sc.boxes.astype(np.float64), sc.valid
    assert (b[v][:, :2] >= 0).all() and (b[v][:, 2:] <= size).all()
    assert (b[v][:, 2:] > b[v][:, :2]).all()
    for i in range(3):
        for j in range(i + 1, 3):
            both = v[:, i] & v[:, j]
            gap = np.maximum.reduce([b[:, j, 0] - b[:, i, 2], b[:, i, 0] - b[:, j, 2],
                                     b[:, j, 1] - b[:, i, 3], b[:, i, 1] - b[:, j, 3]])
            assert (gap[both] >= BOX_MARGIN - 1e-5).all()


def test_scene_is_the_sum_of_disjoint_single_renders():
    """Each object rendered alone over the whole image: supports disjoint, each inside its own box, and
    the scene equals their sum."""
    sc = make_scenes(200, np.random.default_rng(4))
    total = np.zeros_like(sc.images)
    support = np.zeros(sc.images.shape[:1] + sc.images.shape[2:], dtype=np.int64)
    centres = np.arange(S) + 0.5
    for slot in range(3):
        idx, alone = _alone(sc, slot)
        total[idx] += alone
        touched = alone.max(axis=1) > 0  # (m, S, S)
        support[idx] += touched
        b = sc.boxes[idx, slot].astype(np.float64)
        x, y = centres[None, None, :], centres[None, :, None]
        x0, y0, x1, y1 = (b[:, i, None, None] for i in range(4))
        in_box = (x > x0) & (x < x1) & (y > y0) & (y < y1)
        assert not (touched & ~in_box).any(), f"slot {slot}: a touched pixel centre lies outside the box"
    assert support.max() == 1  # no pixel touched by two objects
    np.testing.assert_allclose(sc.images, total, atol=1e-5)


def test_single_object_pixels_lie_in_a_tight_box():
    """Non-background pixels of single-object scenes have their centres inside the box, and the box is no
    more than ~1 px larger than the touched pixels on each side."""
    sc = make_scenes(300, np.random.default_rng(5), max_objects=1)
    touched = sc.images.max(axis=1) > 0
    c = np.arange(S) + 0.5
    cols = np.where(touched.any(axis=1), c, np.nan)  # (N, S) centres of touched columns
    rows = np.where(touched.any(axis=2), c, np.nan)
    b = sc.boxes[:, 0].astype(np.float64)
    lo_x, hi_x = np.nanmin(cols, 1), np.nanmax(cols, 1)
    lo_y, hi_y = np.nanmin(rows, 1), np.nanmax(rows, 1)
    assert (b[:, 0] < lo_x).all() and (b[:, 2] > hi_x).all()
    assert (b[:, 1] < lo_y).all() and (b[:, 3] > hi_y).all()
    slack = np.concatenate([lo_x - b[:, 0], b[:, 2] - hi_x, lo_y - b[:, 1], b[:, 3] - hi_y])
    assert slack.max() <= 1.5, slack.max()


def test_boxes_match_supersampled_shape_extent():
    """Box minus the 0.5 px anti-aliasing pad = the extent of the hard shape (8 x 8 samples per pixel)."""
    sc = make_scenes(60, np.random.default_rng(6), max_objects=1)
    k = 8
    idx, f = sc.object_factors(0)
    # Hard inside test on a fine grid: render with supersample=k and look at which sub-blocks are covered.
    # Supersampled coverage of a pixel is the fraction of its k*k samples inside; render at k*S with
    # supersample=1 gives the samples themselves.
    hard = render(f, S * k, supersample=1).max(axis=1) > 0  # (m, kS, kS), samples at (i + 0.5) / k px
    g = (np.arange(S * k) + 0.5) / k
    b = sc.boxes[idx, 0].astype(np.float64)
    xs = np.where(hard.any(axis=1), g, np.nan)
    ys = np.where(hard.any(axis=2), g, np.nan)
    ext = np.stack([np.nanmin(xs, 1), np.nanmin(ys, 1), np.nanmax(xs, 1), np.nanmax(ys, 1)], 1)
    inner = b + np.array([0.5, 0.5, -0.5, -0.5])
    assert (ext[:, :2] >= inner[:, :2] - 1e-4).all() and (ext[:, 2:] <= inner[:, 2:] + 1e-4).all()
    # Thin triangle tips can fall between samples: allow a few sample spacings.
    assert np.abs(ext - inner).max() < 0.35


def test_make_scenes_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="max_objects"):
        make_scenes(3, rng, max_objects=4)
    with pytest.raises(ValueError, match="min_objects"):
        make_scenes(3, rng, max_objects=2, min_objects=3)
    with pytest.raises(ValueError, match="size"):
        make_scenes(3, rng, size=8)
    with pytest.raises(TypeError, match="rng"):
        make_scenes(3, 0)
    with pytest.raises(TypeError, match="max_objects"):
        make_scenes(3, rng, max_objects=2.0)


# ---------------------------------------------------------------------------------------------------
# Crops


def _crop_reference(images, boxes, out):
    """scipy's bilinear map_coordinates at the crop's sample points (pixel-centre index units)."""
    n, c = images.shape[:2]
    res = np.zeros((n, boxes.shape[1], c, out, out))
    t = (np.arange(out) + 0.5) / out
    for i in range(n):
        for j in range(boxes.shape[1]):
            x0, y0, x1, y1 = boxes[i, j].astype(np.float64)
            if x0 == y0 == x1 == y1 == 0:
                continue
            yy, xx = np.meshgrid(y0 + t * (y1 - y0) - 0.5, x0 + t * (x1 - x0) - 0.5, indexing="ij")
            for ch in range(c):
                res[i, j, ch] = map_coordinates(images[i, ch].astype(np.float64), [yy, xx], order=1,
                                                mode="nearest")
    return res


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_crops_match_scipy_bilinear(dtype):
    sc = make_scenes(20, np.random.default_rng(7))
    images = sc.images.astype(dtype)
    for out in (5, 16):
        got = crop_boxes(images, sc.boxes, out, chunk=7)
        assert got.dtype == dtype and got.shape == (20, 3, 3, out, out)
        np.testing.assert_allclose(got, _crop_reference(images, sc.boxes, out), atol=1e-5)
    # Random boxes of any aspect, reaching the borders, on a noise image.
    rng = np.random.default_rng(8)
    img = rng.random((4, 2, 9, 13)).astype(dtype)
    xy0 = rng.uniform(0, [13, 9], size=(4, 5, 2))
    xy1 = rng.uniform(xy0, [13, 9])
    boxes = np.concatenate([xy0, xy1], -1)
    boxes[0, 0] = (0, 0, 13, 9)
    np.testing.assert_allclose(crop_boxes(img, boxes, 6), _crop_reference(img, boxes, 6), atol=1e-5)


def test_whole_image_box_at_full_size_is_the_image():
    img = np.random.default_rng(9).random((2, 3, 12, 12)).astype(np.float32)
    boxes = np.tile(np.array([0, 0, 12, 12], np.float32), (2, 1, 1))
    np.testing.assert_allclose(crop_boxes(img, boxes, 12)[:, 0], img, atol=1e-6)


def test_absent_boxes_give_zero_crops_and_crops_hold_their_object():
    sc = make_scenes(100, np.random.default_rng(10))
    crops = crop_boxes(sc.images, sc.boxes, 12)
    assert (crops[~sc.valid] == 0).all()
    # The crop's brightest pixel has the object's colour: its hue class is the nearest class hue.
    from refssl.data.color import rgb_to_hsv
    v = sc.valid
    flat = np.moveaxis(crops[v].reshape(-1, 3, 144), 1, -1)
    best = flat[np.arange(len(flat)), np.argmax(flat.sum(-1), 1)]
    hue = rgb_to_hsv(best.astype(np.float64))[:, 0]
    cls = np.round(hue * N_COLORS).astype(int) % N_COLORS
    np.testing.assert_array_equal(cls, sc.color[v])


def test_crop_errors_name_the_problem():
    img = np.zeros((2, 3, 16, 16), np.float32)
    boxes = np.zeros((2, 2, 4), np.float32)
    boxes[1, 1] = (4, 4, 17, 10)
    with pytest.raises(ValueError, match=r"boxes\[1, 1\].*outside the 16x16 image"):
        crop_boxes(img, boxes, 8)
    boxes[1, 1] = (-0.5, 4, 3, 10)
    with pytest.raises(ValueError, match=r"boxes\[1, 1\].*outside"):
        crop_boxes(img, boxes, 8)
    boxes[1, 1] = (5, 4, 3, 10)
    with pytest.raises(ValueError, match=r"boxes\[1, 1\].*x1 < x0"):
        crop_boxes(img, boxes, 8)
    boxes[1, 1] = (np.nan, 4, 3, 10)
    with pytest.raises(ValueError, match="NaN"):
        crop_boxes(img, boxes, 8)
    with pytest.raises(ValueError, match="boxes must have shape"):
        crop_boxes(img, np.zeros((3, 2, 4), np.float32), 8)
    with pytest.raises(ValueError, match="out_size"):
        crop_boxes(img, np.zeros((2, 2, 4), np.float32), 0)
    with pytest.raises(TypeError, match="images"):
        crop_boxes(img.astype(np.int64), np.zeros((2, 2, 4), np.float32), 4)


# ---------------------------------------------------------------------------------------------------
# Captions

_COLOR = "|".join(COLOR_NAMES)
_NP = re.compile(rf"\b(a|an) (?:(small|large|big) )?(?:({_COLOR}) )?(circle|square|triangle|shape)\b")


def _parse(caption):
    """Noun phrases (article, size, colour, noun) and the words between consecutive phrases."""
    found = list(_NP.finditer(caption))
    nps = [m.groups() for m in found]
    between = [caption[a.end():b.start()].strip() for a, b in zip(found, found[1:])]
    head = caption[:found[0].start()].strip() if found else caption
    return head, nps, between


@given(seeds)
def test_captions_are_true_of_their_scenes(seed):
    rng = np.random.default_rng(seed)
    sc = make_scenes(60, rng)
    caps = caption_scenes(sc, rng)
    assert len(caps) == 60
    numbers = {"one": 1, "two": 2, "three": 3}
    for i, cap in enumerate(caps):
        head, nps, between = _parse(cap)
        n = sc.n_objects[i]
        assert len(nps) == n, cap
        if head:
            words = head.split()
            if words[0] in numbers:
                assert numbers[words[0]] == n and words[-1] == "with", cap
                assert words[1] in (("shape", "object") if n == 1 else ("shapes", "objects")), cap
            else:
                assert head in OPENERS, cap
        for k, (article, size, color, noun) in enumerate(nps):
            first = (size or color or noun)
            assert article == ("an" if first[0] in "aeiou" else "a"), cap
            if size is not None:
                assert sc.size[i, k] == (0 if size == "small" else 1), cap
            assert color is not None or noun != "shape", cap  # never both attributes left unsaid
            if color is not None:
                assert COLOR_NAMES[sc.color[i, k]] == color, cap
            if noun != "shape":
                assert SHAPES[sc.shape[i, k]] == noun, cap
        if n >= 2:
            rel = between[0]
            b0, b1 = sc.boxes[i, 0].astype(np.float64), sc.boxes[i, 1].astype(np.float64)
            (x0, y0), (x1, y1) = sc.center[i, 0], sc.center[i, 1]
            if rel == "left of":
                assert b0[2] <= b1[0] and x0 < x1, cap
            elif rel == "right of":
                assert b1[2] <= b0[0] and x0 > x1, cap
            elif rel == "above":
                assert b0[3] <= b1[1] and y0 < y1, cap
            elif rel == "below":
                assert b1[3] <= b0[1] and y0 > y1, cap
            else:
                assert rel in ("next to", "and"), cap
        if n == 3:
            assert between[1] == "and", cap


def test_captions_cover_the_grammar():
    rng = np.random.default_rng(11)
    sc = make_scenes(2000, rng)
    caps = caption_scenes(sc, rng)
    text = "\n".join(caps)
    for phrase in ("left of", "right of", "above", "below", "next to", "there is", "an image with",
                   "a photo of", "two shapes with", "three objects with", "one shape with", " big ",
                   " small ", "a red shape", "an orange", "an azure"):
        assert phrase in text, phrase
    words = set(text.split())
    assert words <= set(VOCAB)
    assert words == set(VOCAB) - {"[PAD]", "[CLS]", "[SEP]", "[MASK]"}
    assert max(len(c.split()) for c in caps) <= MAX_CAPTION_WORDS
    # Relations: each direction about equally often (objects placed symmetrically).
    rel = [c for c in caps if any(r in c for r in ("left of", "right of", "above", "below"))]
    counts = np.array([sum(r in c for c in rel) for r in ("left of", "right of", "above", "below")])
    assert counts.min() > 0.15 * len(rel), counts


def test_captions_deterministic_and_checked():
    sc = make_scenes(40, np.random.default_rng(12))
    assert caption_scenes(sc, np.random.default_rng(1)) == caption_scenes(sc, np.random.default_rng(1))
    assert caption_scenes(sc, np.random.default_rng(1)) != caption_scenes(sc, np.random.default_rng(2))
    with pytest.raises(TypeError, match="scenes"):
        caption_scenes(sc.images, np.random.default_rng(1))
    with pytest.raises(TypeError, match="rng"):
        caption_scenes(sc, 1)


def test_prompts():
    col, shp = prompt_captions("color"), prompt_captions("shape")
    assert len(col) == N_COLORS and len(shp) == len(SHAPES)
    for c, p in zip(COLOR_NAMES, col):
        _, nps, _ = _parse(p)
        assert p.startswith("a photo of ") and nps == [(("an" if c[0] in "aeiou" else "a"), None, c, "shape")]
    for s, p in zip(SHAPES, shp):
        assert p == f"a photo of a {s}"
    Tokenizer().encode(col + shp, 10)  # inside the vocabulary
    with pytest.raises(ValueError, match="kind"):
        prompt_captions("size")


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_layout_and_round_trip():
    tok = Tokenizer()
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(set(VOCAB)) == len(VOCAB)
    for c, name in enumerate(COLOR_NAMES):
        assert tok.vocab[tok.color_word_ids[c]] == name
    for s, name in enumerate(SHAPES):
        assert tok.vocab[tok.shape_word_ids[s]] == name
    assert [tok.vocab[i] for i in tok.size_word_ids[0]] == ["small"]
    caps = caption_scenes(make_scenes(300, np.random.default_rng(13)), np.random.default_rng(14))
    ids, mask = tok.encode(caps, MAX_CAPTION_WORDS + 2)
    assert ids.dtype == np.int64 and mask.dtype == bool and ids.shape == (300, MAX_CAPTION_WORDS + 2)
    assert tok.decode(ids) == caps
    for i in (0, 7, 123):
        words = caps[i].split()
        n = len(words)
        assert ids[i, 0] == tok.cls_id and ids[i, n + 1] == tok.sep_id
        assert [tok.word_to_id[w] for w in words] == ids[i, 1:n + 1].tolist()
        assert (ids[i, n + 2:] == tok.pad_id).all()
        assert mask[i].tolist() == [True] * (n + 2) + [False] * (ids.shape[1] - n - 2)
    assert tok.decode(ids[0]) == caps[0]
    assert tok.decode(ids[0], skip_special=False).startswith("[CLS] ")


def test_tokenizer_mask_word_case_and_truncation():
    tok = Tokenizer()
    ids, mask = tok.encode(["A [MASK] Circle", "there is a red square"], 8)
    assert ids[0, :5].tolist() == [tok.cls_id, tok.word_to_id["a"], tok.mask_id, tok.word_to_id["circle"],
                                   tok.sep_id]
    assert tok.decode(ids[0]) == "a [MASK] circle"
    long = "three shapes with a small red circle left of a big green square and a cyan triangle"
    ids, mask = tok.encode([long], 6, truncate=True)
    assert tok.decode(ids[0]) == "three shapes with a"
    assert ids[0, -1] == tok.sep_id and mask.all()


def test_tokenizer_errors_name_the_problem():
    tok = Tokenizer()
    with pytest.raises(ValueError, match=r"unknown word 'purple' in captions\[1\]"):
        tok.encode(["a red circle", "a purple circle"], 10)
    with pytest.raises(ValueError, match=r"'\[PAD\]' in captions\[0\].*special token"):
        tok.encode(["a [PAD] circle"], 10)
    with pytest.raises(ValueError, match=r"captions\[1\] is empty"):
        tok.encode(["a red circle", "   "], 10)
    with pytest.raises(ValueError, match=r"captions\[0\] has 5 words.*truncate=True"):
        tok.encode(["a small red circle there", "a circle"], 6)
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode("a red circle", 10)
    with pytest.raises(TypeError, match=r"captions\[0\]"):
        tok.encode([3], 10)
    with pytest.raises(ValueError, match="empty"):
        tok.encode([], 10)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(["a circle"], 2)
    with pytest.raises(ValueError, match="ids must be in"):
        tok.decode(np.array([1, 99]))
    with pytest.raises(TypeError, match="integer"):
        tok.decode(np.array([1.0, 2.0]))


def test_word_objects_points_each_word_to_the_object_it_describes():
    tok = Tokenizer()
    rng = np.random.default_rng(15)
    sc = make_scenes(500, rng)
    caps = caption_scenes(sc, rng)
    ids, _ = tok.encode(caps, MAX_CAPTION_WORDS + 2)
    obj = word_objects(ids, tok)
    assert obj.shape == ids.shape and obj.dtype == np.int64
    np.testing.assert_array_equal(obj.max(axis=1) + 1, sc.n_objects)
    color_of = {v: c for c, v in tok.color_word_ids.items()}
    shape_of = {v: s for s, v in tok.shape_word_ids.items()}
    rows, cols = np.nonzero(obj >= 0)
    for i, t in zip(rows, cols):
        w, o = ids[i, t], obj[i, t]
        if w in color_of:
            assert sc.color[i, o] == color_of[w], caps[i]
        if w in shape_of:
            assert sc.shape[i, o] == shape_of[w], caps[i]
    # Every colour and shape word lies in a noun phrase; relation and opener words do not.
    is_attr = np.isin(ids, list(color_of) + list(shape_of))
    assert (obj[is_attr] >= 0).all()
    outside = np.isin(ids, [tok.word_to_id[w] for w in ("image", "photo", "left", "above", "with", "two")])
    assert (obj[outside] == -1).all()
    # A masked colour word still belongs to its phrase.
    masked = ids.copy()
    masked[np.isin(ids, list(color_of))] = tok.mask_id
    np.testing.assert_array_equal(word_objects(masked, tok), obj)
