"""Augmentations of colored-shapes images, latent re-rendering, view-pair families and trajectories.

Every augmentation is a pure function ``f(images or factors, rng, **params)``: it reads the batch, draws
its random parameters (one set per image) from ``rng`` and returns a new array; inputs are never modified.
Images are float32 ``(N, 3, S, S)`` in [0, 1] (see :mod:`refssl.data.shapes`).

Geometric resampling (crop, translate, blur) is separable: each image is mapped as ``W_y @ X @ W_x^T`` with
per-image ``(S, S)`` matrices, so a whole batch is two batched matrix products and no loop over images.

Named view-pair families (:func:`make_views`):

- ``"A"``: colour changes -- the second view re-renders the instance with a new colour class.
- ``"B"``: location changes -- a new position.
- ``"C"``: shape and location changes.
- ``"crop_only"``: a random resized crop of each view (pixel level).
- ``"crop_color_jitter"``: random resized crop followed by hue/brightness/saturation jitter.

The last two are the pair of Torralba, Isola & Freeman, *Foundations of Computer Vision* ch. 30: crops
leave colour intact, so contrastive learning codes colour; adding colour jitter makes colour useless for
matching views and shape gets coded instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import (
    EXTENT, N_COLORS, SHAPES, SIZE_RANGE, Factors, _check_rng, render,
    sample_color_jitter, sample_positions,
)

__all__ = [
    "random_resized_crop", "random_translate", "horizontal_flip", "color_jitter", "gaussian_noise",
    "gaussian_blur", "resample_factors", "rerender", "FAMILIES", "make_views", "view_pair_stream",
    "Trajectories", "trajectories", "LATENT_FACTORS",
]

LATENT_FACTORS = ("color", "shape", "position", "size", "rotation")
_ALIASES = {"location": "position", "colour": "color"}


def _check_images(images, name="images"):
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of shape (N, 3, S, S), got {type(images).__name__}")
    if images.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array (values in [0, 1]), got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"{name} must have shape (N, 3, S, S), got shape {images.shape}")
    return images


def _check_pair(value, name, low, high):
    lo, hi = (float(v) for v in value)
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must be a pair (lo, hi) with {low} <= lo <= hi <= {high}, got {value!r}")
    return lo, hi


def _check_nonneg(value, name, high=np.inf):
    v = float(value)
    if not (0.0 <= v <= high):
        raise ValueError(f"{name} must be in [0, {high}], got {value!r}")
    return v


# ----------------------------------------------------------------------------------------------------
# Separable resampling


def _tent_matrix(src: np.ndarray, size_in: int) -> np.ndarray:
    """Bilinear interpolation matrices (n, S_out, S_in) from source coordinates ``src`` (n, S_out) in pixel
    units; coordinates beyond the image are clamped (edge replication)."""
    src = np.clip(src, 0.0, size_in - 1.0)
    w = 1.0 - np.abs(src[:, :, None] - np.arange(size_in)[None, None, :])
    return np.maximum(w, 0.0).astype(np.float32)


def _apply_separable(images: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """out[n, c] = wy[n] @ images[n, c] @ wx[n]^T, for the whole batch at once."""
    out = np.matmul(wy[:, None].astype(images.dtype), images)
    return np.matmul(out, np.swapaxes(wx, 1, 2)[:, None].astype(images.dtype))


def _box_resample(images, x0, y0, w, h):
    """Resample the boxes [x0, x0 + w] x [y0, y0 + h] (fractions of the side, per image) to full size."""
    s = images.shape[-1]
    j = (np.arange(s) + 0.5) / s
    src_x = (x0[:, None] + w[:, None] * j[None, :]) * s - 0.5
    src_y = (y0[:, None] + h[:, None] * j[None, :]) * s - 0.5
    return _apply_separable(images, _tent_matrix(src_y, s), _tent_matrix(src_x, s))


def random_resized_crop(images, rng, *, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crop a random box of each image and resize it back to S x S (bilinear).

    The box area is a fraction ``U(scale)`` of the image and its aspect ratio is log-uniform in ``ratio``
    (as torchvision's RandomResizedCrop); sides longer than the image are clipped to it.
    """
    images = _check_images(images)
    _check_rng(rng)
    lo, hi = _check_pair(scale, "scale", 1e-6, 1.0)
    rlo, rhi = _check_pair(ratio, "ratio", 1e-6, np.inf)
    n = len(images)
    area = rng.uniform(lo, hi, n)
    aspect = np.exp(rng.uniform(np.log(rlo), np.log(rhi), n))
    w = np.minimum(np.sqrt(area * aspect), 1.0)
    h = np.minimum(np.sqrt(area / aspect), 1.0)
    x0 = rng.random(n) * (1.0 - w)
    y0 = rng.random(n) * (1.0 - h)
    return _box_resample(images, x0, y0, w, h)


def random_translate(images, rng, *, max_shift=0.25):
    """Shift each image by a random (dx, dy), each uniform in +-max_shift of the side (sub-pixel, bilinear,
    edges replicated)."""
    images = _check_images(images)
    _check_rng(rng)
    m = _check_nonneg(max_shift, "max_shift", 1.0)
    n = len(images)
    shift = rng.uniform(-m, m, (n, 2))
    one = np.ones(n)
    return _box_resample(images, -shift[:, 0], -shift[:, 1], one, one)


def horizontal_flip(images, rng, *, p=0.5):
    """Mirror each image left-right with probability ``p``."""
    images = _check_images(images)
    _check_rng(rng)
    p = _check_nonneg(p, "p", 1.0)
    flip = rng.random(len(images)) < p
    return np.where(flip[:, None, None, None], images[..., ::-1], images)


def color_jitter(images, rng, *, brightness=0.4, contrast=0.0, saturation=0.4, hue=0.1):
    """Random brightness, contrast, saturation and hue changes, applied in that order.

    Factors follow torchvision's ColorJitter: brightness/contrast/saturation factors are uniform in
    ``[max(0, 1 - b), 1 + b]``; brightness scales the image, contrast blends with the image's mean grey,
    saturation blends with the per-pixel grey (ITU-R 601 luma); hue shifts the HSV hue by ``U(-hue, hue)``
    of the full circle (``hue = 0.5`` gives a uniformly random hue).  Results are clipped to [0, 1].
    (torchvision draws a random order per call; the fixed order here keeps the function simple.)
    """
    images = _check_images(images)
    _check_rng(rng)
    b = _check_nonneg(brightness, "brightness")
    c = _check_nonneg(contrast, "contrast")
    s = _check_nonneg(saturation, "saturation")
    h = _check_nonneg(hue, "hue", 0.5)
    n = len(images)
    dt = images.dtype
    luma = np.array([0.299, 0.587, 0.114], dtype=dt)[None, :, None, None]

    def factor(strength):
        return rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, n).astype(dt)[:, None, None, None]

    out = np.clip(images * factor(b), 0.0, 1.0)
    if c > 0:
        mean_grey = np.sum(out * luma, axis=1, keepdims=True).mean(axis=(2, 3), keepdims=True)
        out = np.clip(mean_grey + factor(c) * (out - mean_grey), 0.0, 1.0)
    grey = np.sum(out * luma, axis=1, keepdims=True)
    out = np.clip(grey + factor(s) * (out - grey), 0.0, 1.0)
    if h > 0:
        out = _shift_hue(out, rng.uniform(-h, h, n).astype(dt))
    return np.ascontiguousarray(out, dtype=dt)


def _shift_hue(images, shift):
    """Add ``shift`` (N,) to the HSV hue of every pixel, keeping saturation and value.

    Works on the channel planes directly (no transposes): with v = max, c = max - min (chroma) and the
    hue sextant h6 in [0, 6), the result is  channel_n = v - c clip(min(k, 4 - k), 0, 1),
    k = (n + h6) mod 6, n = 5, 3, 1 -- the closed form of :func:`refssl.data.color.hsv_to_rgb` with
    v s = c.
    """
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    v = np.maximum(np.maximum(r, g), b)
    c = v - np.minimum(np.minimum(r, g), b)
    safe = np.where(c > 0, c, 1.0)
    h6 = np.where(v == r, (g - b) / safe, np.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h6 = h6 + 6.0 * shift[:, None, None]
    out = np.empty_like(images)
    for ch, n in enumerate((5.0, 3.0, 1.0)):  # the three channels
        k = n + h6
        k -= 6.0 * np.floor(k / 6.0)  # k mod 6; np.mod on floats is ~10x slower
        out[:, ch] = v - c * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return out


def gaussian_noise(images, rng, *, sigma=0.05):
    """Add i.i.d. N(0, sigma^2) noise to every pixel and clip to [0, 1]."""
    images = _check_images(images)
    _check_rng(rng)
    sigma = _check_nonneg(sigma, "sigma")
    noise = rng.standard_normal(images.shape, dtype=np.float32).astype(images.dtype, copy=False)
    return np.clip(images + sigma * noise, 0.0, 1.0)


def gaussian_blur(images, rng=None, *, sigma=(0.1, 2.0)):
    """Gaussian blur with a per-image standard deviation (pixels) uniform in ``sigma`` (a pair), or the
    fixed ``sigma`` (a number; then ``rng`` may be None).  The kernel is renormalised at the borders, so a
    constant image stays constant."""
    images = _check_images(images)
    n, s = len(images), images.shape[-1]
    if np.ndim(sigma) == 0:
        sig = np.full(n, float(sigma))
        if not sig[0] > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
    else:
        lo, hi = _check_pair(sigma, "sigma", 1e-6, np.inf)
        sig = _check_rng(rng).uniform(lo, hi, n)
    d = np.arange(s)[:, None] - np.arange(s)[None, :]
    w = np.exp(-0.5 * (d[None] / sig[:, None, None]) ** 2)
    w /= w.sum(axis=2, keepdims=True)
    return _apply_separable(images, w, w)


# ----------------------------------------------------------------------------------------------------
# Latent re-rendering


def _normalise_which(which):
    if isinstance(which, str):
        which = (which,)
    out = []
    for w in which:
        w = _ALIASES.get(w, w)
        if w not in LATENT_FACTORS:
            raise ValueError(f"unknown factor {w!r}; choose from {LATENT_FACTORS} (or 'location')")
        out.append(w)
    return tuple(out)


def _other_class(current, n_classes, rng):
    """A class drawn uniformly from the n_classes - 1 classes different from ``current``."""
    return (current + rng.integers(1, n_classes, size=current.shape)) % n_classes


def resample_factors(factors: Factors, rng, which, *, change: bool = True) -> Factors:
    """The same instances with the factors ``which`` redrawn and every other factor kept.

    which : names among ``"color"``, ``"shape"``, ``"position"`` (alias ``"location"``), ``"size"``,
        ``"rotation"``.
    change : if True, discrete factors (colour class, shape) move to a *different* class, drawn uniformly
        among the others; if False they are redrawn from the prior (and may stay the same).

    A new colour gets a new per-image perturbation too.  A new size is drawn from the part of SIZE_RANGE
    that still fits at the current position (unless the position is redrawn as well, in which case the
    size is drawn first from the full range).  Factor distributions are the generator's.
    """
    if not isinstance(factors, Factors):
        raise TypeError(f"factors must be a Factors instance, got {type(factors).__name__}")
    _check_rng(rng)
    which = _normalise_which(which)
    n = len(factors)
    new = {}
    if "shape" in which:
        new["shape"] = (_other_class(factors.shape, len(SHAPES), rng) if change
                        else rng.integers(0, len(SHAPES), n))
    if "color" in which:
        new["color"] = (_other_class(factors.color, N_COLORS, rng) if change
                        else rng.integers(0, N_COLORS, n))
        new["color_jitter"] = sample_color_jitter(n, rng)
    size = factors.size
    if "size" in which:
        if "position" in which:
            size = rng.uniform(*SIZE_RANGE, n)
        else:
            p = factors.position
            room = np.minimum(np.minimum(p[:, 0], 1 - p[:, 0]), np.minimum(p[:, 1], 1 - p[:, 1])) / EXTENT
            hi = np.maximum(np.minimum(SIZE_RANGE[1], room), SIZE_RANGE[0])
            size = SIZE_RANGE[0] + (hi - SIZE_RANGE[0]) * rng.random(n)
        new["size"] = size
    if "position" in which:
        new["position"] = sample_positions(size, rng)
    if "rotation" in which:
        new["rotation"] = rng.uniform(0.0, 2 * np.pi, n)
    return factors.replace(**new)


def rerender(factors: Factors, rng, which, *, size: int = 32, change: bool = True, background=0.0):
    """Resample the factors ``which`` of each instance and render: returns ``(images, new_factors)``."""
    new = resample_factors(factors, rng, which, change=change)
    return render(new, size, background=background), new


# ----------------------------------------------------------------------------------------------------
# View-pair families


def _crop_only(images, rng):
    return random_resized_crop(images, rng)


def _crop_color_jitter(images, rng):
    return color_jitter(random_resized_crop(images, rng), rng, brightness=0.4, saturation=0.4, hue=0.5)


# name -> ("latent", factors re-rendered) or ("pixel", augmentation applied to each view independently)
FAMILIES = {
    "A": ("latent", ("color",)),
    "B": ("latent", ("position",)),
    "C": ("latent", ("shape", "position")),
    "crop_only": ("pixel", _crop_only),
    "crop_color_jitter": ("pixel", _crop_color_jitter),
}


def make_views(family: str, factors: Factors, rng, *, images=None, size: int = 32, background=0.0):
    """Two views ``(v1, v2)`` of each instance under the named family (see the module docstring).

    Latent families (A, B, C): ``v1`` is the instance as rendered, ``v2`` re-renders it with the family's
    factors resampled (discrete factors always change).  Pixel families: each view is an independent
    augmentation of the rendered instance.  ``images`` (the renders of ``factors``) may be passed to avoid
    re-rendering; both views are float32 ``(N, 3, size, size)``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    _check_rng(rng)
    if images is None:
        images = render(factors, size, background=background)
    else:
        _check_images(images)
        if len(images) != len(factors):
            raise ValueError(f"images has {len(images)} rows but factors has {len(factors)}")
        size = images.shape[-1]
    kind, spec = FAMILIES[family]
    if kind == "latent":
        v2, _ = rerender(factors, rng, spec, size=size, background=background)
        return images.copy(), v2  # a copy, so that editing a view never edits the dataset
    return spec(images, rng), spec(images, rng)


def view_pair_stream(family: str, factors: Factors, rng, *, batch_size: int, images=None,
                     size: int = 32, background=0.0):
    """An endless iterator of view-pair batches ``(v1, v2)``: each batch draws ``batch_size`` instances
    uniformly (without replacement within a batch) and applies :func:`make_views`."""
    if images is not None and len(images) != len(factors):
        raise ValueError(f"images has {len(images)} rows but factors has {len(factors)}")
    if batch_size > len(factors):
        raise ValueError(f"batch_size must be <= the number of instances {len(factors)}, got {batch_size}")
    while True:
        idx = np.sort(rng.choice(len(factors), size=batch_size, replace=False))
        yield make_views(family, factors.take(idx), rng, images=None if images is None else images[idx],
                         size=size, background=background)


# ----------------------------------------------------------------------------------------------------
# Trajectories


@dataclass(frozen=True)
class Trajectories:
    """Instances re-rendered while one factor varies.

    images : (n * T, 3, S, S) float32, instance-major (the T frames of instance 0 first).
    factors : Factors of every frame.
    traj_id : (n * T,) int64, the instance (trajectory) of each frame.
    step : (n * T,) int64, the frame index within its trajectory.
    factor : the factor that varies.
    """

    images: np.ndarray
    factors: Factors
    traj_id: np.ndarray
    step: np.ndarray
    factor: str


def trajectories(factors: Factors, factor: str, rng=None, *, n_steps: int = 8, size: int = 32,
                 background=0.0) -> Trajectories:
    """Re-render each instance of ``factors`` along a path of the single factor ``factor``.

    - ``"color"``: every colour class (T = 8), the instance's own perturbation kept.
    - ``"shape"``: every shape (T = 3).
    - ``"position"``: T evenly spaced points on the segment from the instance's position to a random
      position where it fits (needs ``rng``).
    - ``"size"``: T sizes evenly spaced from SIZE_RANGE[0] to the largest size that fits at the position.
    - ``"rotation"``: T rotations evenly spaced over [0, 2 pi) starting at the instance's rotation.

    Every other factor stays the instance's own.
    """
    if not isinstance(factors, Factors):
        raise TypeError(f"factors must be a Factors instance, got {type(factors).__name__}")
    (factor,) = _normalise_which(factor)
    if factor in ("color", "shape"):
        t = N_COLORS if factor == "color" else len(SHAPES)
    else:
        if not isinstance(n_steps, (int, np.integer)) or n_steps < 2:
            raise ValueError(f"n_steps must be an integer >= 2, got {n_steps!r}")
        t = int(n_steps)
    n = len(factors)
    frames = factors.repeat(t)
    step = np.tile(np.arange(t), n)
    frac = step / (t - 1) if t > 1 else np.zeros_like(step, dtype=float)
    if factor == "color":
        frames = frames.replace(color=step.copy())
    elif factor == "shape":
        frames = frames.replace(shape=step.copy())
    elif factor == "rotation":
        frames = frames.replace(rotation=np.mod(frames.rotation + 2 * np.pi * step / t, 2 * np.pi))
    elif factor == "size":
        p = frames.position
        room = np.minimum(np.minimum(p[:, 0], 1 - p[:, 0]), np.minimum(p[:, 1], 1 - p[:, 1])) / EXTENT
        hi = np.clip(room, SIZE_RANGE[0], SIZE_RANGE[1])
        frames = frames.replace(size=SIZE_RANGE[0] + (hi - SIZE_RANGE[0]) * frac)
    else:  # position: the allowed region is a box, so the segment between two allowed points stays in it
        end = np.repeat(sample_positions(factors.size, _check_rng(rng)), t, axis=0)
        start = frames.position
        frames = frames.replace(position=start + (end - start) * frac[:, None])
    images = render(frames, size, background=background)
    return Trajectories(images, frames, np.repeat(np.arange(n), t), step, factor)
