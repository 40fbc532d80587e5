"""Toy experiments on synthetic colored-shapes images, run on a CPU with refssl.

    python -m toy_experiments list
    python -m toy_experiments run NAME [--quick] [--seed S] [--out DIR]
    python -m toy_experiments all [--quick]

Each experiment lives in a module ``exp_*.py`` of this package and registers
itself with :func:`toy_experiments.framework.experiment`.
"""

import importlib
import pkgutil

from .framework import EXPERIMENTS, experiment, run_experiment  # noqa: F401


def load_all() -> dict:
    """Import every experiment module; returns the registry (name -> Experiment)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("exp_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return EXPERIMENTS
