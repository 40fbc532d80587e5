"""Evaluation of frozen representations: probes per latent factor, retrieval grids, invariance measures,
collapse and clustering diagnostics.  See :mod:`refssl.eval.probes`, :mod:`refssl.eval.retrieval`,
:mod:`refssl.eval.invariance`, :mod:`refssl.eval.metrics`.
"""

from .invariance import InvarianceResult, firing_thresholds, invariance_scores, invariance_table  # noqa: F401
from .metrics import (  # noqa: F401
    alignment_metric, cluster_accuracy, clustering_accuracy, effective_rank, kmeans, uniformity_metric,
)
from .probes import (  # noqa: F401
    factor_table, knn_accuracy, knn_predict, linear_probe, nearest_neighbors, standardize, table_markdown,
)
from .retrieval import retrieval_grids, retrieval_mosaic, save_retrieval_grid  # noqa: F401
