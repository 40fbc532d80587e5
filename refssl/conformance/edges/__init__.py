"""Named edge cases of every op, declared per family.

Each module of this package is one family (contrastive, redundancy, teacher-student, prototypes,
layers, attention, masked modelling).  It creates a :class:`Family` and declares, for each of its
ops, edge cases with ``@family.edge(ops, name, description)`` or an explicit, documented
``family.example_only(op, reason)``.  A generator takes a ``numpy.random.Generator`` and returns
``(args, kwargs)`` like an op's example, in float64 (the float32 case is the same inputs rounded),
and must be non-degenerate by construction: tests/test_conformance.py checks every case (output not
an input, not constant, no zero or constant gradient, labels not all equal, float32 resolvable).

A new op is not silently left out: :func:`refssl.conformance.cases.build_cases` always includes
its example, and the test that every registered op belongs to a family fails until it is declared
here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ... import registry

__all__ = ["Edge", "Family", "edges_for", "family_of", "example_only_reason", "families", "example_where",
           "unit_rows", "two_views", "tight_views", "row_scales"]


@dataclass(frozen=True)
class Edge:
    """One named edge case of one op."""

    op: str
    name: str
    description: str
    make: Callable[[np.random.Generator], tuple[tuple, dict]]
    # exactly representable structure on purpose (ties, a constant column): the rounding-perturbation
    # estimate would destroy it, so only refssl's own float32 error sets the tolerance
    exact: bool = False


_EDGES: dict[str, list[Edge]] = {}
_FAMILY: dict[str, str] = {}
_EXAMPLE_ONLY: dict[str, str] = {}
_FAMILIES: dict[str, "Family"] = {}
_loaded = False


class Family:
    """A family of ops and their edge cases (one module of this package)."""

    def __init__(self, name: str, description: str):
        if name in _FAMILIES:
            raise ValueError(f"family {name!r} is declared twice")
        self.name, self.description = name, description
        _FAMILIES[name] = self

    def _member(self, op: str) -> None:
        if _FAMILY.setdefault(op, self.name) != self.name:
            raise ValueError(f"op {op!r} is declared in families {_FAMILY[op]!r} and {self.name!r}")

    def edge(self, ops, name: str, description: str, *, exact: bool = False):
        """Decorator: ``make(rng) -> (args, kwargs)`` is the edge case ``name`` of each op in ``ops``."""
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        if not name.replace("_", "").replace(".", "").isalnum() or name == "example":
            raise ValueError(f"edge case name {name!r}: letters, digits, '_' and '.' only, not 'example'")

        def register_edge(make):
            for op in ops:
                self._member(op)
                if any(e.name == name for e in _EDGES.get(op, [])):
                    raise ValueError(f"op {op!r} has two edge cases named {name!r}")
                _EDGES.setdefault(op, []).append(Edge(op, name, description, make, exact))
            return make

        return register_edge

    def example_only(self, op: str, reason: str) -> None:
        """Declare that ``op``'s suite is its example only, and why."""
        self._member(op)
        _EXAMPLE_ONLY[op] = reason

    def ops(self) -> list[str]:
        return sorted(op for op, fam in _FAMILY.items() if fam == self.name)


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def edges_for(op: str) -> list[Edge]:
    """The declared edge cases of ``op`` (empty for an example-only or undeclared op)."""
    _load_all()
    return list(_EDGES.get(op, []))


def family_of(op: str) -> str | None:
    """The family ``op`` is declared in, or None."""
    _load_all()
    return _FAMILY.get(op)


def example_only_reason(op: str) -> str | None:
    _load_all()
    return _EXAMPLE_ONLY.get(op)


def families() -> dict[str, Family]:
    _load_all()
    return dict(_FAMILIES)


def example_where(op: str, rng: np.random.Generator, accept: Callable[[tuple, dict], bool],
                  tries: int = 2000) -> tuple[tuple, dict]:
    """The op's own example generator, redrawn from ``rng`` until ``accept(args, kwargs)``.

    Reuses the validity guarantees of the example (margins between nearest neighbours, unit-norm
    queues, ...) while pinning the property an edge case is about (k = 1, a wrapped pointer, ...).
    """
    gen = registry.get(op).example
    for _ in range(tries):
        args, kwargs = gen(rng, np.float64)
        if accept(args, kwargs):
            return args, kwargs
    raise RuntimeError(f"no example of {op!r} met the edge-case condition in {tries} draws")


# Building blocks shared by the family modules -------------------------------------------------------

def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def two_views(rng, n, d, noise=0.7):
    """Two views of n random points: base + noise each (cosines spread, softmaxes unsaturated)."""
    base = rng.standard_normal((n, d))
    return base + noise * rng.standard_normal((n, d)), base + noise * rng.standard_normal((n, d))


def tight_views(rng, n, d, spread=0.15, view_noise=0.5):
    """Two views of n points clustered around one unit direction: cosines near 1 with differences of
    order spread^2, so at tau = 0.01 the logits are near 100 (overflowing exp in float32) while the
    softmax stays unsaturated (differences of a few units)."""
    b = rng.standard_normal(d)
    b /= np.linalg.norm(b)
    base = b + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    noise = spread * view_noise / np.sqrt(d)
    return base + noise * rng.standard_normal((n, d)), base + noise * rng.standard_normal((n, d))


def row_scales(rng, n, low_exp, high_exp):
    """(n, 1) per-row scales 10**U(low_exp, high_exp)."""
    return 10.0 ** rng.uniform(low_exp, high_exp, size=(n, 1))
