"""Spec cases: an op's inputs by argument name, hyperparameters, upstream gradient, expected values.

A suite of an op is its example plus the named edge cases of its family
(:mod:`refssl.conformance.edges`), each in float64 and float32:

* float64 case: the generator's float64 inputs; expected value and gradients from refssl in float64.
* float32 case: the same inputs rounded to float32 (and the upstream gradient rounded); expected
  value and gradients from refssl in float64 on exactly those float32 values (the exact answer the
  port should approach), stored in float64.

Both carry the tolerance of :mod:`refssl.conformance.tolerance`.  The example is drawn from the op's
own example generator, starting at the suite seed and moving to the next seed while the draw is
degenerate (:func:`degeneracies`) or unresolvable in float32; edge cases are non-degenerate by
construction (a test checks).
"""

from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .. import registry
from . import edges as E
from .tolerance import EPS32, KAPPA_MAX, rel_error, tolerances

__all__ = ["Case", "STOP_GRADIENT", "build_cases", "degeneracies", "argument_names", "hyper_defaults", "evaluate",
           "DTYPES"]

DTYPES = ("float64", "float32")
EXAMPLE = "example"
_EXAMPLE_TRIES = 64
_ROUNDING_DRAWS = 2


# Inputs that come out of a network branch during training and that the method blocks with a
# stop-gradient (a detach in the loss, or a no-grad target/momentum encoder).  A port gets them tracked
# (requires_grad / differentiated by jax.grad) and must let no gradient reach them.  Every other input
# without a gradient is a constant by nature (data targets, labels, masks, queues, banks, supports,
# prototypes, centers, running statistics, probabilities) and is passed untracked.
STOP_GRADIENT: dict = {
    "byol": ("t1", "t2"),  # target-network projections
    "simsiam": ("z1", "z2"),  # the online projections themselves: the stop-gradient is the method
    "neg_cosine": ("z",),
    "moco_v3": ("k1", "k2"),  # momentum-encoder keys
    "moco_queue": ("k",),
    "nnclr": ("z1", "z2"),  # the lookups' queries
    "mean_shift": ("target",),  # momentum-encoder targets
    "dino": ("teacher",),  # teacher outputs (the center is a buffer)
    "cosine_distill": ("target",),  # teacher features
    "proto_nce": ("k",),  # momentum-encoder keys
}


@dataclass
class Case:
    """One conformance case of one op in one dtype (the unit a port is checked on).

    ``inputs`` maps argument names to arrays in the op's positional order (floats in ``dtype``,
    integer and bool arrays as they are); ``expected_grads`` holds the gradient of
    ``sum(out * upstream)`` for every name in ``differentiable``, in float64.
    """

    op: str
    name: str
    dtype: str
    description: str
    inputs: dict
    hyper: dict
    differentiable: tuple
    upstream: np.ndarray
    expected_out: np.ndarray
    expected_grads: dict
    tolerance: float
    tolerance_basis: dict = field(default_factory=dict)
    seed: int | None = None

    @property
    def id(self) -> str:
        return f"{self.op}.{self.name}.{self.dtype}"

    @property
    def stop_gradient(self) -> tuple:
        """Inputs the method blocks with a stop-gradient (see :data:`STOP_GRADIENT`)."""
        return tuple(k for k in STOP_GRADIENT.get(self.op, ()) if k in self.inputs)


@lru_cache(maxsize=None)
def argument_names(op_name: str) -> tuple:
    """Names of the positional (array) parameters of the op's forward, in order."""
    sig = inspect.signature(registry.get(op_name).forward)
    return tuple(p.name for p in sig.parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def hyper_defaults(op_name: str) -> dict:
    """Keyword-only hyperparameters of the op's forward with their defaults (None if required)."""
    sig = inspect.signature(registry.get(op_name).forward)
    return {p.name: (None if p.default is p.empty else _jsonable(p.default))
            for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY}


def _jsonable(v):
    """Hyperparameters as plain JSON values (numpy scalars and arrays become Python numbers and lists)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    return v


def _is_float(a) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def _cast(args, dtype):
    return tuple(np.asarray(a, dtype=dtype) if _is_float(a) else np.asarray(a) for a in args)


def evaluate(op, args, hyper, upstream):
    """refssl's value and gradients (tuple, None where no gradient) of ``sum(out * upstream)``."""
    out, cache = op.forward(*args, **hyper)
    u = np.asarray(upstream)
    grads = op.backward(cache, u if u.ndim else u.dtype.type(u))
    return np.asarray(out), grads


def _errors(op, got, want) -> float:
    """Worst rel_error over the value and the differentiable gradients."""
    (o1, g1), (o2, g2) = got, want
    return max([rel_error(o1, o2)] + [rel_error(g1[k], g2[k]) for k in op.differentiable])


def _upstream(rng, shape):
    if shape == ():
        # a random scalar away from 0 and 1: a port must scale its gradients by it, not return dL
        return np.asarray(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0))
    return rng.standard_normal(shape)


def _rounding_sensitivity(op, args32, hyper, u32, truth, rng) -> float:
    """Worst change of the float64 answer under relative input perturbations of one float32 ulp."""
    worst = 0.0
    base = _cast(args32, np.float64)
    for _ in range(_ROUNDING_DRAWS):
        pert = tuple(a * (1 + EPS32 * rng.uniform(-1, 1, a.shape)) if _is_float(a) else a for a in base)
        u = np.asarray(u32, np.float64) * (1 + EPS32 * rng.uniform(-1, 1, np.shape(u32)))
        try:
            worst = max(worst, _errors(op, evaluate(op, pert, hyper, u), truth))
        except ValueError:  # a perturbation left the op's domain (e.g. a probability row sum)
            pass
    return worst


def degeneracies(op_name, inputs: dict, differentiable, out, grads: dict, upstream) -> list:
    """Why a case would be trivial (an identity, a constant, a zero gradient, all labels equal...)."""
    problems = []
    out = np.asarray(out)
    if not np.all(np.isfinite(out)):
        problems.append("output is not finite")
    for name, a in inputs.items():
        a = np.asarray(a)
        if _is_float(a) and a.shape == out.shape and np.allclose(out, a, rtol=1e-12, atol=0):
            problems.append(f"output equals input {name}")
        if np.issubdtype(a.dtype, np.integer) and a.size > 1 and np.all(a == a.flat[0]):
            problems.append(f"integer input {name} is constant (all labels/ids equal)")
        if a.dtype == bool and not a.any():
            problems.append(f"bool input {name} selects nothing")
    if out.size > 1 and np.all(out == out.flat[0]):
        problems.append("output is constant")
    gscale = max(1.0, float(np.max(np.abs(upstream))))
    for name in differentiable:
        g = np.asarray(grads[name])
        if not np.all(np.isfinite(g)):
            problems.append(f"gradient of {name} is not finite")
        elif float(np.max(np.abs(g), initial=0.0)) <= 1e-10 * gscale:
            problems.append(f"gradient of {name} is (numerically) zero")
        elif g.size > 1 and np.all(g == g.flat[0]):
            problems.append(f"gradient of {name} is constant")
    return problems


def _case_rng(seed: int, op: str, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{op}/{name}".encode())])


def _pair(op, name, description, args, hyper, rng, seed, exact):
    """The float64 and float32 cases of one construction, or (None, why) when it is not usable."""
    names = argument_names(op.name)
    if len(args) > len(names):
        raise ValueError(f"{op.name}: the generator returned {len(args)} arrays for {len(names)} parameters")
    names = names[:len(args)]
    diff = tuple(names[k] for k in op.differentiable)
    args64 = _cast(args, np.float64)
    out64, _ = op.forward(*args64, **hyper)
    upstream = _upstream(rng, np.shape(out64))
    out64, g64 = evaluate(op, args64, hyper, upstream)
    grads64 = {n: np.asarray(g64[k]) for k, n in enumerate(names) if n in diff}
    problems = degeneracies(op.name, dict(zip(names, args64)), diff, out64, grads64, upstream)
    if problems:
        return None, "; ".join(problems)
    args32, u32 = _cast(args, np.float32), np.asarray(upstream, dtype=np.float32)
    truth = evaluate(op, _cast(args32, np.float64), hyper, u32.astype(np.float64))
    d32 = _errors(op, evaluate(op, args32, hyper, u32), truth)
    sens = 0.0 if exact else _rounding_sensitivity(op, args32, hyper, u32, truth, rng)
    tol = tolerances(d32, sens)
    basis = {"refssl_float32_error": d32, "rounding_sensitivity": sens, "kappa": tol["kappa"]}
    if tol["kappa"] > KAPPA_MAX:
        return None, f"float32 cannot resolve it (kappa {tol['kappa']:.3g} > {KAPPA_MAX:g})"
    hyper = _jsonable(hyper)
    cases = []
    for dtype in DTYPES:
        if dtype == "float64":
            inputs, u, (out, g) = args64, upstream, (out64, g64)
        else:
            inputs, u, (out, g) = args32, u32, truth
        cases.append(Case(
            op=op.name, name=name, dtype=dtype, description=description,
            inputs=dict(zip(names, inputs)), hyper=hyper, differentiable=diff, upstream=np.asarray(u),
            expected_out=np.asarray(out, np.float64),
            expected_grads={n: np.asarray(g[k], np.float64) for k, n in enumerate(names) if n in diff},
            tolerance=float(tol[dtype]), tolerance_basis=dict(basis), seed=seed))
    return cases, None


def _example_cases(op, seed):
    why = None
    for s in range(seed, seed + _EXAMPLE_TRIES):
        rng = np.random.default_rng(s)
        args, hyper = op.example(rng, np.float64)
        cases, why = _pair(op, EXAMPLE, "the op's registered example (first non-degenerate draw from the seed)",
                           args, hyper, rng, s, exact=False)
        if cases:
            return cases
    raise RuntimeError(f"{op.name}: no non-degenerate example in seeds {seed}..{seed + _EXAMPLE_TRIES - 1} "
                       f"(last: {why})")


@lru_cache(maxsize=None)
def _build(op_name: str, seed: int) -> tuple:
    op = registry.get(op_name)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        cases = list(_example_cases(op, seed))
        for edge in E.edges_for(op_name):
            rng = _case_rng(seed, op_name, edge.name)
            args, hyper = edge.make(rng)
            pair, why = _pair(op, edge.name, edge.description, args, hyper, rng, seed, edge.exact)
            if pair is None:
                raise RuntimeError(f"edge case {op_name}.{edge.name} is degenerate: {why}")
            cases.extend(pair)
    return tuple(cases)


def build_cases(op_name: str, seed: int = 0, dtype: str = "all") -> list:
    """The suite of one op: its example and edge cases, float64 and float32 (or one ``dtype``).

    Deterministic in (refssl revision, seed); cached per process (the cases are shared: do not
    modify their arrays).
    """
    registry.get(op_name)  # KeyError naming an unknown op
    cases = _build(op_name, int(seed))
    return [c for c in cases if dtype in ("all", c.dtype)]
