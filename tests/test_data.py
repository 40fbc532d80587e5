"""The colored-shapes generator, its augmentations, latent re-rendering, view families and trajectories.

Rendered content is checked against the factors with independent computations: the colour of interior
pixels, the coverage-weighted centroid, the covered area (pi r^2 for every shape by the equal-area
convention), and a point-in-polygon test of matplotlib's Path on polygon vertices computed here.
"""

import numpy as np
import pytest
from hypothesis import given
from matplotlib.path import Path

from refssl.data import (
    FAMILIES, N_COLORS, SHAPES, SIZE_RANGE, color_jitter, factor_labels, gaussian_blur,
    gaussian_noise, generate, horizontal_flip, make_dataset, make_views, position_bounds,
    random_resized_crop, random_translate, render, resample_factors, sample_factors, trajectories,
    view_pair_stream,
)
from refssl.data.color import hsv_to_rgb, rgb_to_hsv
from tests.helpers import seeds

S = 32


def _coverage(images, factors):
    """Per-pixel coverage recovered from the image: the brightest channel divided by its colour value
    (background is black)."""
    rgb = factors.rgb
    n = len(factors)
    c = np.argmax(rgb, axis=1)
    return images[np.arange(n), c] / rgb[np.arange(n), c][:, None, None]


def _centroid(cov):
    s = cov.shape[-1]
    g = (np.arange(s) + 0.5) / s
    m = cov.sum(axis=(1, 2))
    return np.stack([(cov * g[None, None, :]).sum((1, 2)) / m, (cov * g[None, :, None]).sum((1, 2)) / m], 1)


def _hue(images):
    """Hue of the most saturated-and-bright pixel of each image (a shape interior pixel)."""
    flat = np.moveaxis(images.reshape(len(images), 3, -1), 1, -1)
    k = np.argmax(flat.max(-1) - flat.min(-1), axis=1)
    return rgb_to_hsv(flat[np.arange(len(images)), k].astype(np.float64))[:, 0]


def _circ_dist(a, b):
    d = np.abs(a - b) % 1.0
    return np.minimum(d, 1 - d)


# ---------------------------------------------------------------------------------------------------
# Generator


@given(seeds)
def test_generator_is_deterministic_per_seed(seed):
    a = generate(40, np.random.default_rng(seed))
    b = generate(40, np.random.default_rng(seed))
    c = generate(40, np.random.default_rng(seed + 1))
    np.testing.assert_array_equal(a.images, b.images)
    for name, arr in a.factors.as_dict().items():
        np.testing.assert_array_equal(arr, getattr(b.factors, name))
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("size", [16, 32, 48])
def test_images_dtype_shape_range_and_factor_ranges(size):
    split = generate(300, np.random.default_rng(0), size=size)
    im, f = split.images, split.factors
    assert im.dtype == np.float32 and im.shape == (300, 3, size, size)
    assert im.min() >= 0.0 and im.max() <= 1.0
    assert set(np.unique(f.shape)) == set(range(len(SHAPES)))
    assert set(np.unique(f.color)) == set(range(N_COLORS))
    assert np.all((f.size >= SIZE_RANGE[0]) & (f.size <= SIZE_RANGE[1]))
    lo, hi = position_bounds(f.size)
    assert np.all((f.position >= lo[:, None]) & (f.position <= hi[:, None]))
    # every shape fits inside the image: the covered area is the full pi r^2 (to the rendering accuracy)
    area = _coverage(im, f).sum(axis=(1, 2)) / size**2
    np.testing.assert_allclose(area, np.pi * f.size**2, rtol=0.2 if size == 16 else 0.08)


def test_train_val_splits_are_independent_draws():
    ds = make_dataset(200, 100, np.random.default_rng(5))
    assert len(ds.train) == 200 and len(ds.val) == 100
    assert not np.allclose(ds.train.factors.position[:100], ds.val.factors.position)


def test_interior_pixels_have_the_factor_colour():
    split = generate(500, np.random.default_rng(1))
    flat = split.images.reshape(500, 3, -1)
    k = np.argmax(flat.sum(axis=1), axis=1)  # the brightest pixel is an interior (fully covered) pixel
    np.testing.assert_allclose(flat[np.arange(500), :, k], split.factors.rgb, atol=1e-6)
    # the colour is within the per-image perturbation of its class hue (1/8 apart): class recoverable
    hue = rgb_to_hsv(split.factors.rgb)[:, 0]
    assert np.all(_circ_dist(hue, split.factors.color / N_COLORS) <= 0.02 + 1e-9)


def test_centroid_matches_position_and_area_matches_size():
    split = generate(1000, np.random.default_rng(2))
    cov = _coverage(split.images, split.factors)
    np.testing.assert_allclose(_centroid(cov), split.factors.position, atol=0.15 / S)  # < 0.15 px
    area = cov.sum(axis=(1, 2)) / S**2
    np.testing.assert_allclose(area, np.pi * split.factors.size**2, rtol=0.06)


def _vertices(kind, x, y, r, theta):
    """Polygon vertices from the shape definition (equal area with the circle of radius r)."""
    if kind == "square":
        a = r * np.sqrt(np.pi) / 2  # half side
        ang = theta + np.pi / 4 + np.pi / 2 * np.arange(4)
        rad = a * np.sqrt(2)
    else:
        rad = r * np.sqrt(4 * np.pi / (3 * np.sqrt(3)))  # circumradius
        ang = theta - np.pi / 2 + 2 * np.pi / 3 * np.arange(3)  # one vertex straight up at theta = 0
    return np.stack([x + rad * np.cos(ang), y + rad * np.sin(ang)], 1)


def test_shapes_match_an_independent_point_in_polygon_rendering():
    rng = np.random.default_rng(3)
    f = sample_factors(12, rng)
    f = f.replace(shape=np.arange(12) % 3)
    k = 4
    hard = render(f, 16, supersample=k)
    grid = (np.arange(16 * k) + 0.5) / (16 * k)
    px, py = np.meshgrid(grid, grid)  # py indexes rows
    pts = np.stack([px.ravel(), py.ravel()], 1)
    for i in range(12):  # a handful of images, one independent rendering each
        x, y = f.position[i]
        if f.shape[i] == 0:
            inside = (px - x) ** 2 + (py - y) ** 2 < f.size[i] ** 2
        else:
            kind = SHAPES[f.shape[i]]
            inside = Path(_vertices(kind, x, y, f.size[i], f.rotation[i])).contains_points(pts).reshape(px.shape)
        expect = inside.reshape(16, k, 16, k).mean(axis=(1, 3))
        got = hard[i].max(axis=0) / f.rgb[i].max()
        # equal up to samples lying exactly on an edge (none in practice)
        assert np.abs(got - expect).max() <= 1.0 / k**2 + 1e-6, SHAPES[f.shape[i]]


def test_analytic_antialiasing_matches_supersampling_and_is_not_binary():
    f = sample_factors(300, np.random.default_rng(4))
    smooth = render(f)
    ref = render(f, supersample=8)
    assert np.abs(smooth - ref).mean() < 2e-3
    edge_err = np.abs(smooth - ref)[(ref > 0.05) & (ref < 0.6)]
    assert edge_err.mean() < 0.06
    cov = _coverage(smooth, f)
    partial = (cov > 0.05) & (cov < 0.95)
    assert partial.sum(axis=(1, 2)).min() >= 8  # every shape has a soft edge


def test_hsv_round_trip_and_primaries():
    rgb = np.random.default_rng(0).random((1000, 3))
    np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-12)
    np.testing.assert_allclose(hsv_to_rgb(np.array([[0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 0.5]])),
                               [[1, 0, 0], [0, 1, 0], [0, 0, 0.5]], atol=1e-12)


def test_factor_labels_bins():
    lo, hi = position_bounds(SIZE_RANGE[0])
    f = sample_factors(3, np.random.default_rng(0)).replace(
        position=np.array([[lo, lo], [hi, lo], [0.5, hi]]), size=np.array([0.10, 0.14, 0.18]))
    lab = factor_labels(f, n_bins=3)
    assert lab["position"][0].tolist() == [0, 2, 2 * 3 + 1] and lab["position"][1] == 9
    assert lab["size"][0].tolist() == [0, 1, 2]
    assert lab["color"][1] == 8 and lab["shape"][1] == 3


def test_bad_inputs():
    with pytest.raises(TypeError, match="rng"):
        sample_factors(3, 0)
    with pytest.raises(ValueError, match="size"):
        render(sample_factors(2, np.random.default_rng(0)), 2)
    with pytest.raises(ValueError, match="images"):
        horizontal_flip(np.zeros((2, 32, 32, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown factor"):
        resample_factors(sample_factors(2, np.random.default_rng(0)), np.random.default_rng(0), "hue")
    with pytest.raises(ValueError, match="family"):
        make_views("D", sample_factors(2, np.random.default_rng(0)), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------
# Pixel augmentations


@pytest.fixture(scope="module")
def batch():
    return generate(64, np.random.default_rng(7))


def test_augmentations_are_pure_and_seeded(batch):
    im = batch.images
    before = im.copy()
    fns = [random_resized_crop, random_translate, horizontal_flip, color_jitter, gaussian_noise, gaussian_blur]
    for fn in fns:
        a = fn(im, np.random.default_rng(11))
        b = fn(im, np.random.default_rng(11))
        np.testing.assert_array_equal(a, b)
        assert a.shape == im.shape and a.dtype == np.float32, fn.__name__
        assert a.min() >= -1e-6 and a.max() <= 1 + 1e-6, fn.__name__
        assert not np.array_equal(a, im), fn.__name__
    np.testing.assert_array_equal(im, before)


def test_identity_settings(batch):
    im, rng = batch.images, np.random.default_rng(0)
    np.testing.assert_allclose(random_resized_crop(im, rng, scale=(1, 1), ratio=(1, 1)), im, atol=1e-6)
    np.testing.assert_allclose(random_translate(im, rng, max_shift=0.0), im, atol=1e-6)
    np.testing.assert_array_equal(horizontal_flip(im, rng, p=0.0), im)
    np.testing.assert_array_equal(horizontal_flip(im, rng, p=1.0), im[..., ::-1])
    np.testing.assert_allclose(color_jitter(im, rng, brightness=0, saturation=0, hue=0), im, atol=1e-6)
    np.testing.assert_allclose(gaussian_noise(im, rng, sigma=0.0), im)
    const = np.full((3, 3, 16, 16), 0.3, np.float32)
    np.testing.assert_allclose(gaussian_blur(const, rng), const, atol=1e-6)


def test_crop_zooms_translate_moves_and_keeps_colour(batch):
    im, f = batch.images, batch.factors
    rng = np.random.default_rng(1)
    crop = random_resized_crop(im, rng, scale=(0.25, 0.25), ratio=(1, 1))  # 2x zoom
    # a 2x zoom multiplies the visible area by 4 unless the shape is cut by the crop
    area0, area1 = _coverage(im, f).sum((1, 2)), _coverage(crop, f).sum((1, 2))
    assert np.median(area1[area1 > 0] / area0[area1 > 0]) > 1.5
    hue_ok = area1 > 4
    assert np.all(_circ_dist(_hue(crop[hue_ok]), _hue(im[hue_ok])) < 0.02)
    shifted = random_translate(im, np.random.default_rng(2), max_shift=0.1)
    moved = np.abs(_centroid(_coverage(shifted, f)) - _centroid(_coverage(im, f)))
    assert moved.max() <= 0.1 + 0.5 / S and moved.max() > 0.02


def test_color_jitter_hue_keeps_value_and_support(batch):
    im = batch.images
    out = color_jitter(im, np.random.default_rng(3), brightness=0, saturation=0, hue=0.5)
    np.testing.assert_allclose(out.max(axis=1), im.max(axis=1), atol=1e-5)  # HSV value is untouched
    np.testing.assert_array_equal(out.max(axis=1) > 0, im.max(axis=1) > 0)
    shift = _circ_dist(_hue(out), _hue(im))
    assert shift.max() > 0.2  # hues move across colour classes
    bright = color_jitter(im, np.random.default_rng(4), brightness=0.3, saturation=0, hue=0)
    mask = im > 0.05
    ratio = np.where(mask, bright / np.where(mask, im, 1), np.nan).reshape(len(im), -1)
    unclipped = np.nanmax(bright.reshape(len(im), -1), 1) < 0.999
    spread = np.nanmax(ratio, 1) - np.nanmin(ratio, 1)
    assert np.all(spread[unclipped] < 1e-4)  # one brightness factor per image
    assert np.all((np.nanmin(ratio, 1) > 0.7 - 1e-5) & (np.nanmax(ratio, 1) < 1.3 + 1e-5))


def test_noise_statistics_and_blur_smooths():
    grey = np.full((50, 3, 32, 32), 0.5, np.float32)
    out = gaussian_noise(grey, np.random.default_rng(0), sigma=0.05)
    assert abs(float((out - grey).mean())) < 1e-3 and abs(float((out - grey).std()) - 0.05) < 1e-3
    f = sample_factors(20, np.random.default_rng(1))
    im = render(f.replace(position=np.full((20, 2), 0.5)))  # centred: far from the borders
    blurred = gaussian_blur(im, np.random.default_rng(2), sigma=(1.0, 2.0))
    assert np.abs(np.diff(blurred, axis=-1)).max() < np.abs(np.diff(im, axis=-1)).max()
    # away from the borders the normalised kernel conserves the total intensity
    np.testing.assert_allclose(blurred.sum(axis=(2, 3)), im.sum(axis=(2, 3)), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Latent re-rendering and families


@pytest.mark.parametrize("which, changed", [
    ("color", {"color", "color_jitter"}),
    ("shape", {"shape"}),
    ("position", {"position"}),
    ("location", {"position"}),
    ("size", {"size"}),
    ("rotation", {"rotation"}),
    (("shape", "position"), {"shape", "position"}),
    (("size", "position"), {"size", "position"}),
])
def test_resample_changes_exactly_the_chosen_factors(which, changed):
    f = sample_factors(200, np.random.default_rng(0))
    g = resample_factors(f, np.random.default_rng(1), which)
    for name, arr in f.as_dict().items():
        other = getattr(g, name)
        if name in changed:
            differs = np.any(np.atleast_2d(arr.T).T != np.atleast_2d(other.T).T, axis=-1)
            frac = differs.mean()
            assert frac == 1.0 if name in ("shape", "color") else frac > 0.95, name
        else:
            np.testing.assert_array_equal(arr, other, err_msg=name)
    lo, hi = position_bounds(g.size)  # the new instance still fits
    assert np.all((g.position >= lo[:, None] - 1e-12) & (g.position <= hi[:, None] + 1e-12))
    assert np.all((g.size >= SIZE_RANGE[0]) & (g.size <= SIZE_RANGE[1]))


def test_resample_without_forced_change_follows_the_prior():
    f = sample_factors(4000, np.random.default_rng(0))
    g = resample_factors(f, np.random.default_rng(1), "color", change=False)
    assert 0.08 < np.mean(g.color == f.color) < 0.17  # 1/8 by chance


def test_latent_families_change_the_intended_content():
    f = sample_factors(100, np.random.default_rng(0))
    base = render(f)
    rng = np.random.default_rng(1)
    a1, a2 = make_views("A", f, rng, images=base)
    np.testing.assert_array_equal(a1, base)
    # colour change only: same support and same coverage-derived geometry, different hue class
    np.testing.assert_array_equal(a1.max(1) > 0, a2.max(1) > 0)
    assert np.all(_circ_dist(_hue(a1), _hue(a2)) > 1 / N_COLORS - 0.05)
    b1, b2 = make_views("B", f, rng, images=base)
    np.testing.assert_allclose(_hue(b1), _hue(b2), atol=1e-5)
    mass1, mass2 = b1.sum((1, 2, 3)), b2.sum((1, 2, 3))
    np.testing.assert_allclose(mass1, mass2, rtol=0.06)  # same shape, colour and size: same mass
    c1, c2 = make_views("C", f, rng)
    np.testing.assert_array_equal(c1, base)
    assert not np.any(np.all(c1 == c2, axis=(1, 2, 3)))
    np.testing.assert_allclose(_hue(c1), _hue(c2), atol=1e-5)


def test_pixel_families_crop_keeps_colour_jitter_destroys_it():
    f = sample_factors(200, np.random.default_rng(0))
    v1, v2 = make_views("crop_only", f, np.random.default_rng(1))
    ok = (v1.max((1, 2, 3)) > 0.3) & (v2.max((1, 2, 3)) > 0.3)
    assert np.all(_circ_dist(_hue(v1[ok]), _hue(v2[ok])) < 0.02)
    j1, j2 = make_views("crop_color_jitter", f, np.random.default_rng(1))
    ok = (j1.max((1, 2, 3)) > 0.3) & (j2.max((1, 2, 3)) > 0.3)
    assert np.mean(_circ_dist(_hue(j1[ok]), _hue(j2[ok])) > 1 / 16) > 0.5
    assert set(FAMILIES) == {"A", "B", "C", "crop_only", "crop_color_jitter"}


def test_view_pair_stream():
    split = generate(50, np.random.default_rng(0))
    stream = view_pair_stream("crop_only", split.factors, np.random.default_rng(1), batch_size=16,
                              images=split.images)
    for _ in range(2):
        v1, v2 = next(stream)
        assert v1.shape == v2.shape == (16, 3, S, S)


@pytest.mark.parametrize("factor, steps", [("color", 8), ("shape", 3), ("position", 6), ("size", 5),
                                           ("rotation", 4)])
def test_trajectories_vary_one_factor(factor, steps):
    f = sample_factors(10, np.random.default_rng(0))
    tr = trajectories(f, factor, np.random.default_rng(1), n_steps=steps)
    assert tr.images.shape == (10 * steps, 3, S, S)
    np.testing.assert_array_equal(tr.traj_id, np.repeat(np.arange(10), steps))
    np.testing.assert_array_equal(tr.step, np.tile(np.arange(steps), 10))
    varying = {"color": {"color"}, "shape": {"shape"}, "position": {"position"}, "size": {"size"},
               "rotation": {"rotation"}}[factor]
    base = f.repeat(steps)
    for name, arr in base.as_dict().items():
        if name not in varying:
            np.testing.assert_array_equal(arr, getattr(tr.factors, name), err_msg=name)
    np.testing.assert_allclose(tr.images, render(tr.factors))  # frames are renders of their factors
    cov = _coverage(tr.images, tr.factors).reshape(10, steps, S, S)
    area = cov.sum((2, 3))
    if factor == "color":
        assert np.all(np.sort(tr.factors.color.reshape(10, steps), 1) == np.arange(8))
        np.testing.assert_allclose(cov, cov[:, :1].repeat(steps, 1), atol=1e-5)  # same geometry
    if factor == "position":
        np.testing.assert_allclose(area, area[:, :1].repeat(steps, 1), rtol=0.06)
        c = _centroid(cov.reshape(-1, S, S)).reshape(10, steps, 2)
        np.testing.assert_allclose(c[:, 0], f.position, atol=0.15 / S)  # starts at the instance
        d = np.diff(c, axis=1)  # equal steps along a straight segment
        np.testing.assert_allclose(d, d[:, :1].repeat(steps - 1, 1), atol=0.3 / S)
    if factor == "size":
        assert np.all(np.diff(area, axis=1) > 0)
