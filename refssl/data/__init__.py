"""Synthetic data with known latent factors: the colored-shapes generator and its augmentations.

See :mod:`refssl.data.shapes` (generator, factors, rendering) and :mod:`refssl.data.augment`
(pixel augmentations, latent re-rendering, view-pair families, trajectories).
"""

from .shapes import (
    COLOR_NAMES, EXTENT, FACTOR_NAMES, N_COLORS, SHAPES, SIZE_RANGE, factor_labels, Factors, generate,
    make_dataset, position_bounds, render, sample_factors, ShapesDataset, Split,
)
from .augment import (
    FAMILIES, LATENT_FACTORS, color_jitter, gaussian_blur, gaussian_noise, horizontal_flip, make_views,
    random_resized_crop, random_translate, rerender, resample_factors, Trajectories, trajectories,
    view_pair_stream,
)

__all__ = [
    "SHAPES", "COLOR_NAMES", "N_COLORS", "SIZE_RANGE", "EXTENT", "FACTOR_NAMES", "Factors", "Split",
    "ShapesDataset", "sample_factors", "render", "generate", "make_dataset", "position_bounds",
    "factor_labels", "random_resized_crop", "random_translate", "horizontal_flip", "color_jitter",
    "gaussian_noise", "gaussian_blur", "resample_factors", "rerender", "FAMILIES", "make_views",
    "view_pair_stream", "Trajectories", "trajectories", "LATENT_FACTORS",
]
