"""Evaluation of frozen representations: probes per latent factor, retrieval grids, invariance measures,
collapse and clustering diagnostics.  See :mod:`refssl.eval.probes`, :mod:`refssl.eval.retrieval`,
:mod:`refssl.eval.invariance`, :mod:`refssl.eval.metrics`.
"""

from .invariance import (
    firing_thresholds, invariance_scores, invariance_table, InvarianceResult,
)
from .metrics import (
    alignment_metric, effective_rank, kmeans_accuracy, uniformity_metric,
)
from .probes import (
    factor_table, knn_accuracy, knn_predict, lbfgs, linear_probe, nearest_neighbors, standardize,
    table_markdown,
)
from .retrieval import (
    retrieval_grids, retrieval_mosaic, save_retrieval_grid,
)

__all__ = [
    "firing_thresholds", "InvarianceResult", "invariance_scores", "invariance_table", "effective_rank",
    "kmeans_accuracy", "alignment_metric", "uniformity_metric", "lbfgs",
    "standardize", "linear_probe", "nearest_neighbors", "knn_predict", "knn_accuracy", "factor_table",
    "table_markdown", "retrieval_mosaic", "save_retrieval_grid", "retrieval_grids",
]
