"""Toy experiments on synthetic colored-shapes images, run on a CPU with refssl.

    python -m toy_experiments list
    python -m toy_experiments run NAME [--quick] [--seed S] [--out DIR]
    python -m toy_experiments all [--quick]

Each experiment lives in a module ``exp_*.py`` of this package and registers
itself with :func:`toy_experiments.framework.experiment`.
"""

import importlib
import os
import pkgutil

# The networks here are small: multi-threaded BLAS gains little on their matrices and loses several times
# over when other processes share the cores.  One thread unless the caller chose otherwise.  This must run
# before anything imports numpy: ``python -m toy_experiments`` imports this package before ``__main__``.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# With more threads chosen: idle OpenBLAS threads sleep at once instead of spinning for ~0.1 s against
# refssl's own thread pool (refssl/runtime.py).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .framework import EXPERIMENTS, experiment, run_experiment  # noqa: F401,E402


def load_all() -> dict:
    """Import every experiment module; returns the registry (name -> Experiment)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("exp_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return EXPERIMENTS
