"""Colored shapes with known latent factors (the dataset of Torralba, Isola & Freeman, *Foundations of
Computer Vision*, ch. 30 "Representation Learning").

Each image holds one shape -- circle, square or triangle -- of one of 8 colour classes (plus a small
per-image perturbation of hue, saturation and value) at a random position, size and rotation, on a uniform
background.  Everything is drawn from an ``np.random.Generator``, so a seed fixes the data exactly, and the
factors are returned next to the images so that a representation can be probed for what it encodes.

Conventions
-----------
- Images are float32, channels first, ``(N, 3, S, S)``, values in [0, 1].  ``S = 32`` by default.
- Coordinates are fractions of the image side: ``position[:, 0]`` is x (column), ``position[:, 1]`` is y
  (row, downwards); pixel ``(row i, column j)`` has its centre at ``((j + 0.5) / S, (i + 0.5) / S)``.
- ``size`` is the radius of the circle of equal area, so the three shapes of one size cover the same area.
  The centre is kept at least ``EXTENT * size`` from every border, where ``EXTENT`` is the circumradius of
  the triangle of that area, so any shape at any rotation fits: factors can be re-rendered with a different
  shape, size or rotation and the shape never leaves the image.
- Anti-aliasing is analytic: each pixel's coverage is a one-pixel-wide linear ramp of the signed distance to
  the boundary, ``clip(0.5 - S * d, 0, 1)``, which is the exact box-filtered area for a straight edge along a
  pixel axis and within a few per cent of it at other angles (``render(..., supersample=k)`` renders k x k
  hard samples per pixel instead, for checking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from .color import hsv_to_rgb

__all__ = [
    "SHAPES", "COLOR_NAMES", "N_COLORS", "SIZE_RANGE", "EXTENT", "FACTOR_NAMES",
    "Factors", "Split", "ShapesDataset",
    "sample_factors", "render", "generate", "make_dataset", "position_bounds", "factor_labels",
]

SHAPES = ("circle", "square", "triangle")
COLOR_NAMES = ("red", "orange", "chartreuse", "green", "cyan", "azure", "violet", "magenta")
N_COLORS = len(COLOR_NAMES)
# The colour classes: hues evenly spaced around the circle (45 degrees apart), one saturation and value.
CLASS_HUES = np.arange(N_COLORS) / N_COLORS
CLASS_SATURATION = 0.8
CLASS_VALUE = 0.85
# Per-image perturbation, uniform in +-these (hue as a fraction of the circle): small against the class
# spacing of 1/8, so the class stays identifiable by eye.
COLOR_JITTER = (0.02, 0.1, 0.1)

SIZE_RANGE = (0.10, 0.18)
# Equal-area scale of each shape relative to the circle radius r:
# square half-side a = r sqrt(pi) / 2;  triangle circumradius R = r sqrt(4 pi / (3 sqrt 3)).
_SQUARE_HALF = math.sqrt(math.pi) / 2
_TRIANGLE_CIRCUM = math.sqrt(4 * math.pi / (3 * math.sqrt(3)))
EXTENT = _TRIANGLE_CIRCUM  # the largest circumradius of the three shapes, in units of r

FACTOR_NAMES = ("shape", "color", "position", "size", "rotation")


@dataclass(frozen=True)
class Factors:
    """The latent factors of N images (all arrays have first axis N).

    shape : (N,) int64, index into ``SHAPES``.
    color : (N,) int64, colour class, index into ``COLOR_NAMES``.
    color_jitter : (N, 3) float64, the per-image (hue, saturation, value) offsets from the class colour.
    position : (N, 2) float64, centre (x, y) as fractions of the image side.
    size : (N,) float64, radius of the equal-area circle as a fraction of the image side.
    rotation : (N,) float64, radians (circles are invariant; squares repeat every pi/2, triangles 2 pi/3).
    """

    shape: np.ndarray
    color: np.ndarray
    color_jitter: np.ndarray
    position: np.ndarray
    size: np.ndarray
    rotation: np.ndarray

    def __post_init__(self):
        n = len(self.shape)
        for f in fields(self):
            a = getattr(self, f.name)
            if not isinstance(a, np.ndarray) or a.shape[:1] != (n,):
                raise ValueError(f"Factors.{f.name} must be an array with first axis {n}, got "
                                 f"{getattr(a, 'shape', type(a).__name__)}")

    def __len__(self) -> int:
        return len(self.shape)

    @property
    def hsv(self) -> np.ndarray:
        """(N, 3) the actual (hue, saturation, value) of each shape."""
        base = np.stack([CLASS_HUES[self.color], np.full(len(self), CLASS_SATURATION),
                         np.full(len(self), CLASS_VALUE)], axis=-1)
        hsv = base + self.color_jitter
        hsv[:, 0] = np.mod(hsv[:, 0], 1.0)
        hsv[:, 1:] = np.clip(hsv[:, 1:], 0.0, 1.0)
        return hsv

    @property
    def rgb(self) -> np.ndarray:
        """(N, 3) float64 RGB colour of each shape."""
        return hsv_to_rgb(self.hsv)

    def take(self, idx) -> "Factors":
        """The factors of the images ``idx`` (any numpy index)."""
        return Factors(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def replace(self, **changes) -> "Factors":
        """A copy with some factor arrays replaced (arrays are copied, never shared)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown factor(s) {sorted(unknown)}; factors are "
                             f"{[f.name for f in fields(self)]}")
        return Factors(**{f.name: np.array(changes.get(f.name, getattr(self, f.name)))
                          for f in fields(self)})

    def repeat(self, times: int) -> "Factors":
        """Each instance repeated ``times`` times consecutively (for trajectories)."""
        return Factors(**{f.name: np.repeat(getattr(self, f.name), times, axis=0) for f in fields(self)})

    @staticmethod
    def concat(parts) -> "Factors":
        return Factors(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Factors)})

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Split:
    """Images (N, 3, S, S) float32 and their factors."""

    images: np.ndarray
    factors: Factors

    def __len__(self) -> int:
        return len(self.factors)


@dataclass(frozen=True)
class ShapesDataset:
    train: Split
    val: Split


def position_bounds(size) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest allowed centre coordinate for shapes of ``size`` (both axes)."""
    m = EXTENT * np.asarray(size, dtype=np.float64)
    return m, 1.0 - m


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return rng


def _check_count(n, name):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return int(n)


def _check_size(size):
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"size must be an integer number of pixels, got {type(size).__name__}")
    if size < 4:
        raise ValueError(f"size must be >= 4 pixels, got {size}")
    return int(size)


def sample_color_jitter(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) per-image (hue, saturation, value) offsets, uniform in +-COLOR_JITTER."""
    return rng.uniform(-1.0, 1.0, size=(n, 3)) * np.asarray(COLOR_JITTER)


def sample_positions(size: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) centres uniform over the region where shapes of ``size`` fit."""
    lo, hi = position_bounds(size)
    return lo[:, None] + (hi - lo)[:, None] * rng.random((len(size), 2))


def sample_factors(n: int, rng: np.random.Generator) -> Factors:
    """Draw the factors of ``n`` images: shape and colour class uniform, size uniform in SIZE_RANGE,
    position uniform where the shape fits, rotation uniform in [0, 2 pi)."""
    n = _check_count(n, "n")
    _check_rng(rng)
    shape = rng.integers(0, len(SHAPES), size=n)
    color = rng.integers(0, N_COLORS, size=n)
    jitter = sample_color_jitter(n, rng)
    size = rng.uniform(*SIZE_RANGE, size=n)
    position = sample_positions(size, rng)
    rotation = rng.uniform(0.0, 2 * np.pi, size=n)
    return Factors(shape=shape.astype(np.int64), color=color.astype(np.int64), color_jitter=jitter,
                   position=position, size=size, rotation=rotation)


def _signed_distance(f: Factors, grid: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from each grid point to each shape's boundary, (n, G, G) float32.

    ``grid`` holds the G sample coordinates along one axis (fractions of the side).
    """
    n, g = len(f), len(grid)
    out = np.empty((n, g, g), dtype=np.float32)
    grid = grid.astype(np.float32)
    dx = grid[None, None, :] - f.position[:, 0, None, None].astype(np.float32)  # (n, 1, G)
    dy = grid[None, :, None] - f.position[:, 1, None, None].astype(np.float32)  # (n, G, 1)
    r = f.size.astype(np.float32)
    for s, name in enumerate(SHAPES):  # a loop over the 3 shape kinds, each vectorised over its images
        idx = np.flatnonzero(f.shape == s)
        if idx.size == 0:
            continue
        x, y, rr = dx[idx], dy[idx], r[idx, None, None]
        if name == "circle":
            out[idx] = np.sqrt(x * x + y * y) - rr
            continue
        n_edges, inradius = (4, _SQUARE_HALF) if name == "square" else (3, _TRIANGLE_CIRCUM / 2)
        # Edge normals at rotation + phi0 + 2 pi k / n_edges.  phi0 = 0 gives an axis-aligned square;
        # phi0 = pi / 2 points one triangle normal down (+y), i.e. the opposite vertex up, at rotation 0.
        phi0 = np.pi / 2 if name == "triangle" else 0.0
        theta = f.rotation[idx, None] + phi0 + 2 * np.pi * np.arange(n_edges)[None, :] / n_edges
        cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
        rho = inradius * rr  # (m, 1, 1)
        half_edge = rho * np.float32(np.tan(np.pi / n_edges))
        inside = None
        dist2 = None
        for k in range(n_edges):
            c, s_ = cos[:, k, None, None], sin[:, k, None, None]
            # a: signed distance to the edge's line; e: how far past the edge's end the point projects.
            # The distance to the edge (a segment) is sqrt(a^2 + max(e, 0)^2).
            a = x * c + y * s_ - rho
            e = np.maximum(np.abs(y * c - x * s_) - half_edge, 0.0)
            d2 = a * a + e * e
            if k == 0:
                inside, dist2 = a, d2
            else:
                np.maximum(inside, a, out=inside)
                np.minimum(dist2, d2, out=dist2)
        # Exact signed distance of a convex polygon: inside, minus the distance to the nearest edge line
        # (= max of the signed line distances); outside, the distance to the nearest edge segment, which
        # rounds the ramp around corners so that coverage never reaches more than half a pixel outside.
        out[idx] = np.where(inside > 0, np.sqrt(dist2), inside)
    return out


def _coverage(f: Factors, size: int, supersample: int | None) -> np.ndarray:
    if supersample is None:
        grid = (np.arange(size) + 0.5) / size
        return np.clip(0.5 - size * _signed_distance(f, grid), 0.0, 1.0)
    k = supersample
    grid = (np.arange(size * k) + 0.5) / (size * k)
    inside = (_signed_distance(f, grid) < 0).astype(np.float32)
    return inside.reshape(len(f), size, k, size, k).mean(axis=(2, 4))


def render(factors: Factors, size: int = 32, *, background=0.0, supersample: int | None = None,
           chunk: int = 2048) -> np.ndarray:
    """Render ``factors`` to float32 images of shape (N, 3, size, size) with values in [0, 1].

    background : grey level (scalar) or RGB triple of the background.
    supersample : None for analytic anti-aliasing (default); an integer k averages k x k hard samples per
        pixel instead.
    chunk : images rendered per vectorised block (bounds the temporary memory).
    """
    if not isinstance(factors, Factors):
        raise TypeError(f"factors must be a Factors instance, got {type(factors).__name__}")
    size = _check_size(size)
    if supersample is not None and (not isinstance(supersample, (int, np.integer)) or supersample < 1):
        raise ValueError(f"supersample must be None or an integer >= 1, got {supersample!r}")
    bg = np.broadcast_to(np.asarray(background, dtype=np.float32), (3,))
    if not np.all((bg >= 0) & (bg <= 1)):
        raise ValueError(f"background must be in [0, 1], got {background!r}")
    n = len(factors)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    rgb = factors.rgb.astype(np.float32)
    for start in range(0, n, chunk):  # blocks of images, each fully vectorised
        sl = slice(start, min(start + chunk, n))
        cov = _coverage(factors.take(sl), size, supersample)
        out[sl] = bg[None, :, None, None] + (rgb[sl] - bg)[:, :, None, None] * cov[:, None]
    return out


def generate(n: int, rng: np.random.Generator, *, size: int = 32, background=0.0) -> Split:
    """Draw ``n`` factor sets from ``rng`` and render them: a :class:`Split` (images, factors)."""
    factors = sample_factors(n, rng)
    return Split(render(factors, size, background=background), factors)


def make_dataset(n_train: int, n_val: int, rng: np.random.Generator, *, size: int = 32,
                 background=0.0) -> ShapesDataset:
    """Independent train and validation splits drawn from ``rng`` (train first, then validation)."""
    n_train, n_val = _check_count(n_train, "n_train"), _check_count(n_val, "n_val")
    train = generate(n_train, rng, size=size, background=background)
    val = generate(n_val, rng, size=size, background=background)
    return ShapesDataset(train, val)


def factor_labels(factors: Factors, *, n_bins: int = 3) -> dict[str, tuple[np.ndarray, int]]:
    """Discrete labels of each probed factor: ``{name: (labels (N,) int64, n_classes)}``.

    shape (3 classes) and color (8) are the classes themselves; position is an ``n_bins x n_bins`` grid of
    equal-width bins over the range of allowed centres (label = row bin * n_bins + column bin); size is
    ``n_bins`` equal-width bins over SIZE_RANGE.  Bin edges are fixed, not data-dependent, so train and
    validation labels agree.
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    lo, hi = position_bounds(SIZE_RANGE[0])
    pb = np.clip(((factors.position - lo) / (hi - lo) * n_bins).astype(np.int64), 0, n_bins - 1)
    sb = np.clip(((factors.size - SIZE_RANGE[0]) / (SIZE_RANGE[1] - SIZE_RANGE[0]) * n_bins)
                 .astype(np.int64), 0, n_bins - 1)
    return {
        "shape": (factors.shape.astype(np.int64), len(SHAPES)),
        "color": (factors.color.astype(np.int64), N_COLORS),
        "position": (pb[:, 1] * n_bins + pb[:, 0], n_bins * n_bins),
        "size": (sb, n_bins),
    }
