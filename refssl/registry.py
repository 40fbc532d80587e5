"""The op registry: every differentiable op of refssl, registered once.

An op is a pair of plain functions

    forward(*arrays, **hyper) -> (out, cache)
    backward(cache, grad_out) -> tuple of gradients, one per array input

plus the metadata that lets tests, golden vectors and benchmarks walk all ops
without listing them by hand: a generator of a small valid example, the
positions of the inputs that receive a gradient, the reference (paper and
official code) and the derivation file of its backward.

Ops live in the modules of :mod:`refssl.ops`; each module calls
:func:`register` at import time.  :func:`names` and :func:`get` import every
module of that package on first use, so adding a file there is all it takes
to put a new op under the registry-wide tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["Op", "Range", "register", "names", "get"]


@dataclass(frozen=True)
class Range:
    """A range of a float hyperparameter that the gradient tests sample from."""

    low: float
    high: float
    log: bool = True  # sample log-uniformly (temperatures, scales)

    def __post_init__(self):
        if not (self.low <= self.high) or (self.log and self.low <= 0):
            raise ValueError(f"invalid Range({self.low}, {self.high}, log={self.log})")


@dataclass(frozen=True)
class Op:
    """A registered differentiable op.

    Attributes
    ----------
    name : registered name (``refssl.registry.get(name)``).
    forward, backward : the op pair; see the module docstring.
    example : ``example(rng, dtype=np.float64) -> (args, kwargs)``, a small
        valid input drawn from ``rng`` (sizes included, so different seeds give
        different batch sizes and widths).
    differentiable : positions of the array inputs that receive a gradient;
        every other position gets ``None`` from ``backward``.
    reference : paper and official source file that define the op.
    derivation : ``derivations/FILE.md#anchor`` deriving the backward.
    hyper_ranges : float hyperparameters the gradient tests vary, with ranges.
    tolerance : gradient-check tolerance on the relative error (float64).
    surrogate : only for straight-through estimators, whose forward value is
        piecewise constant while backward returns a designed gradient:
        ``surrogate(*args, **hyper) -> array`` of the output's shape whose
        derivative backward returns; the finite-difference checks
        differentiate it instead of ``forward``.  ``None`` for every other op.
    """

    name: str
    forward: Callable[..., tuple[Any, Any]]
    backward: Callable[[Any, Any], tuple]
    example: Callable[..., tuple[tuple, dict]]
    differentiable: tuple[int, ...]
    reference: str
    derivation: str
    hyper_ranges: Mapping[str, Range] = field(default_factory=dict)
    tolerance: float = 1e-6
    surrogate: Callable[..., Any] | None = None

    def __call__(self, *args, **kwargs):
        """Forward value only (drops the cache)."""
        return self.forward(*args, **kwargs)[0]


_OPS: dict[str, Op] = {}
_OP_PACKAGES = ("refssl.ops",)
_loaded = False


def register(
    name: str,
    *,
    forward: Callable,
    backward: Callable,
    example: Callable,
    differentiable: tuple[int, ...],
    reference: str,
    derivation: str,
    hyper_ranges: Mapping[str, Range] | None = None,
    tolerance: float = 1e-6,
    surrogate: Callable | None = None,
) -> Op:
    """Register an op under ``name`` and return it.  Names are unique."""
    if name in _OPS:
        raise ValueError(f"op {name!r} is already registered")
    if not reference or not derivation:
        raise ValueError(f"op {name!r}: reference and derivation are required")
    if not (forward.__doc__ or "").strip():
        raise ValueError(f"op {name!r}: forward needs a docstring (formula, shapes, reference)")
    op = Op(
        name=name,
        forward=forward,
        backward=backward,
        example=example,
        differentiable=tuple(differentiable),
        reference=reference,
        derivation=derivation,
        hyper_ranges=dict(hyper_ranges or {}),
        tolerance=tolerance,
        surrogate=surrogate,
    )
    _OPS[name] = op
    return op


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for pkg_name in _OP_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            importlib.import_module(info.name)
    _loaded = True


def names() -> list[str]:
    """Sorted names of all registered ops."""
    _load_all()
    return sorted(_OPS)


def get(name: str) -> Op:
    """The registered op called ``name``."""
    _load_all()
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; registered ops: {', '.join(sorted(_OPS))}") from None


def example(name: str, seed: int = 0, dtype=np.float64) -> tuple[tuple, dict]:
    """Convenience: the example input of op ``name`` for a given seed."""
    return get(name).example(np.random.default_rng(seed), dtype)
