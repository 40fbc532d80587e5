"""Synthetic data with known latent factors: the colored-shapes generator and its augmentations.

See :mod:`refssl.data.shapes` (generator, factors, rendering) and :mod:`refssl.data.augment`
(pixel augmentations, latent re-rendering, view-pair families, trajectories).
"""

from .shapes import (  # noqa: F401
    COLOR_NAMES, EXTENT, FACTOR_NAMES, N_COLORS, SHAPES, SIZE_RANGE,
    Factors, ShapesDataset, Split, factor_labels, generate, make_dataset, position_bounds, render,
    sample_factors,
)
from .augment import (  # noqa: F401
    FAMILIES, LATENT_FACTORS, Trajectories, color_jitter, gaussian_blur, gaussian_noise, horizontal_flip,
    make_views, random_resized_crop, random_translate, rerender, resample_factors, trajectories,
    view_pair_stream,
)
