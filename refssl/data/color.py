"""Vectorised RGB <-> HSV conversion on arrays whose last axis is (R, G, B) / (H, S, V).

All channels are in [0, 1]; hue is a fraction of the full circle (0 = red, 1/3 = green, 2/3 = blue).
"""

from __future__ import annotations

import numpy as np

__all__ = ["hsv_to_rgb", "rgb_to_hsv"]


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV (..., 3) -> RGB (..., 3), same float dtype.

    Uses the closed form  c_n = v - v s clip(min(k, 4 - k), 0, 1),  k = (n + 6h) mod 6  with
    n = 5, 3, 1 for R, G, B, which avoids branching on the hue sector.
    """
    hsv = np.asarray(hsv)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    n = np.array([5.0, 3.0, 1.0], dtype=hsv.dtype)
    k = np.mod(n + 6.0 * h[..., None], 6.0)
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (v[..., None] - (v * s)[..., None] * ramp).astype(hsv.dtype, copy=False)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """RGB (..., 3) -> HSV (..., 3), same float dtype.  Grey pixels get hue 0 and saturation 0."""
    rgb = np.asarray(rgb)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    c = v - rgb.min(axis=-1)
    safe_c = np.where(c > 0, c, 1.0)
    # Sector formulas; np.select picks the one of the channel holding the maximum.
    h = np.select(
        [c == 0, v == r, v == g],
        [0.0, np.mod((g - b) / safe_c, 6.0), (b - r) / safe_c + 2.0],
        default=(r - g) / safe_c + 4.0,
    ) / 6.0
    s = np.where(v > 0, c / np.where(v > 0, v, 1.0), 0.0)
    return np.stack([h, s, v], axis=-1).astype(rgb.dtype, copy=False)
