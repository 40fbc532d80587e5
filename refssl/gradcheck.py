"""Finite-difference checks of hand-written backward passes.

For an op ``out, cache = forward(*args, **kw)`` and an upstream gradient ``g``
(random, same shape as ``out``), backward must return the gradient of the
scalar ``f(args) = <g, out(args)>``.  We compare it with central differences
in float64:

* **full** mode (inputs with at most ``full_max_size`` entries): every entry
  ``(f(x + h e_j) - f(x - h e_j)) / 2h``, i.e. the whole vector-Jacobian
  product ``g^T J``;
* **fast** mode (larger inputs): random unit directions ``u``, comparing
  ``(f(x + h u) - f(x - h u)) / 2h`` with ``<grad, u>`` -- the ``v^T J u``
  check of torch's fast gradcheck.

The error measure is relative to the size of the gradient being checked:
``|analytic_j - numeric_j| / max(||analytic||_inf, ||numeric||_inf, floor)``
in full mode and ``|<grad,u> - fd| / max(||grad||_2, |fd|, floor)`` in fast
mode.  ``floor = noise / tolerance``, where ``noise = 100 eps64 max(1, |f|) / h``
bounds the rounding error of a central difference: gradients smaller than
what finite differences can resolve (e.g. a saturated loss) are compared
against that resolution instead of against themselves.  Central differences
with ``h = 1e-6`` on O(1) inputs are accurate to about 1e-9 relative, so the
default tolerance of 1e-6 leaves margin for rounding while still catching any
wrong factor or sign.

The checker also enforces the op contract: one gradient slot per positional
input, ``None`` exactly at the non-differentiable positions, gradients with the
input's shape and dtype, and inputs left unmodified by forward and backward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GradcheckReport", "check", "check_registered"]

_NOISE_ULPS = 1e2  # rounding of f(x +- h) in ulps of max(1, |f|), generous for sums of many terms


@dataclass
class InputReport:
    position: int
    mode: str  # "full" or "fast"
    rel_error: float
    where: str  # worst entry / direction
    analytic: float
    numeric: float


@dataclass
class GradcheckReport:
    op: str
    tolerance: float
    inputs: list[InputReport] = field(default_factory=list)
    contract_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def worst(self) -> InputReport | None:
        return max(self.inputs, key=lambda r: r.rel_error, default=None)

    @property
    def rel_error(self) -> float:
        w = self.worst
        return w.rel_error if w is not None else 0.0

    @property
    def ok(self) -> bool:
        return not self.contract_errors and self.rel_error <= self.tolerance

    def describe(self) -> str:
        lines = [f"gradcheck {self.op}: {'PASS' if self.ok else 'FAIL'} "
                 f"(worst relative error {self.rel_error:.3e}, tolerance {self.tolerance:.1e})"]
        lines += [f"  contract: {e}" for e in self.contract_errors]
        for r in self.inputs:
            lines.append(f"  input {r.position} [{r.mode}] rel err {r.rel_error:.3e} at {r.where}: "
                         f"analytic {r.analytic:.10g} vs numeric {r.numeric:.10g}")
        return "\n".join(lines)


def _to64(a):
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return a.astype(np.float64)
    return a


def _pairing(out, g) -> float:
    return float(np.sum(np.asarray(out, dtype=np.float64) * g))


def check(op, args, kwargs=None, *, rng=None, grad_out=None, h=1e-6, full_max_size=400,
          n_directions=4, tolerance=None, name=None) -> GradcheckReport:
    """Check ``op.backward`` against central differences at ``(args, kwargs)``.

    ``op`` is anything with ``forward``, ``backward`` and ``differentiable``
    (a registered :class:`refssl.registry.Op` or a test double).  Float inputs
    are promoted to float64.  If ``op.surrogate`` is set (straight-through
    estimators), the central differences are taken of it instead of forward.
    Returns a :class:`GradcheckReport`.
    """
    kwargs = dict(kwargs or {})
    rng = np.random.default_rng(0) if rng is None else rng
    tol = tolerance if tolerance is not None else getattr(op, "tolerance", 1e-6)
    report = GradcheckReport(op=name or getattr(op, "name", "op"), tolerance=tol)
    t0 = time.perf_counter()
    args = [_to64(a) for a in args]
    originals = [a.copy() if isinstance(a, np.ndarray) else a for a in args]

    out, cache = op.forward(*args, **kwargs)
    out = np.asarray(out)
    g = rng.standard_normal(out.shape) if grad_out is None else np.asarray(grad_out, dtype=np.float64)
    grads = op.backward(cache, g if g.ndim else float(g))

    # -- contract -------------------------------------------------------------
    diff = set(op.differentiable)
    if not isinstance(grads, tuple) or len(grads) != len(args):
        report.contract_errors.append(
            f"backward must return a tuple with one entry per positional input ({len(args)}), "
            f"got {type(grads).__name__} of length {len(grads) if hasattr(grads, '__len__') else '?'}")
        report.seconds = time.perf_counter() - t0
        return report
    for k, (a, gk) in enumerate(zip(args, grads)):
        if k not in diff:
            if gk is not None:
                report.contract_errors.append(f"input {k} is not differentiable but got a gradient")
            continue
        if gk is None:
            report.contract_errors.append(f"input {k} is differentiable but its gradient is None")
        elif not isinstance(gk, np.ndarray) or gk.shape != a.shape or gk.dtype != a.dtype:
            report.contract_errors.append(
                f"gradient {k} must match input shape {a.shape} / dtype {a.dtype}, got "
                f"{getattr(gk, 'shape', None)} / {getattr(gk, 'dtype', type(gk).__name__)}")
    for k, (a, o) in enumerate(zip(args, originals)):
        if isinstance(a, np.ndarray) and not np.array_equal(a, o):
            report.contract_errors.append(f"input {k} was modified in place")
    if report.contract_errors:
        report.seconds = time.perf_counter() - t0
        return report

    # -- numerics -------------------------------------------------------------
    # A straight-through op declares the function its backward differentiates (see registry.Op).
    surrogate = getattr(op, "surrogate", None)
    value = surrogate if surrogate is not None else (lambda *a, **kw: op.forward(*a, **kw)[0])

    def f(k, xk):
        trial = list(args)
        trial[k] = xk
        return _pairing(value(*trial, **kwargs), g)

    f0 = _pairing(out, g) if surrogate is None else _pairing(value(*args, **kwargs), g)

    for k in sorted(diff):
        x = args[k]
        gk = np.asarray(grads[k], dtype=np.float64)
        step = h * max(1.0, float(np.max(np.abs(x))) if x.size else 1.0)
        floor = _NOISE_ULPS * np.finfo(np.float64).eps * max(1.0, abs(f0)) / step / tol
        if x.size <= full_max_size:
            num = np.empty(x.size)
            flat = x.reshape(-1)
            for j in range(x.size):
                xp = flat.copy(); xp[j] += step
                xm = flat.copy(); xm[j] -= step
                num[j] = (f(k, xp.reshape(x.shape)) - f(k, xm.reshape(x.shape))) / (2 * step)
            ana = gk.reshape(-1)
            scale = max(np.max(np.abs(ana), initial=0.0), np.max(np.abs(num), initial=0.0), floor)
            err = np.abs(ana - num) / scale
            j = int(np.argmax(err)) if err.size else 0
            report.inputs.append(InputReport(
                k, "full", float(err[j]) if err.size else 0.0,
                f"index {np.unravel_index(j, x.shape) if x.size else ()}",
                float(ana[j]) if err.size else 0.0, float(num[j]) if err.size else 0.0))
        else:
            worst = None
            for d in range(n_directions):
                u = rng.standard_normal(x.shape)
                u /= np.linalg.norm(u)
                fd = (f(k, np.asarray(x + step * u)) - f(k, np.asarray(x - step * u))) / (2 * step)
                an = float(np.sum(gk * u))
                scale = max(float(np.linalg.norm(gk)), abs(fd), floor)
                r = InputReport(k, "fast", abs(an - fd) / scale, f"random direction {d}", an, fd)
                if worst is None or r.rel_error > worst.rel_error:
                    worst = r
            report.inputs.append(worst)
    report.seconds = time.perf_counter() - t0
    return report


def check_registered(name: str, seed: int = 0, **overrides) -> GradcheckReport:
    """Gradcheck a registered op on its example input for ``seed``.

    ``overrides`` replace hyperparameters of the example (e.g. temperature).
    """
    from . import registry

    op = registry.get(name)
    rng = np.random.default_rng(seed)
    args, kwargs = op.example(rng, np.float64)
    kwargs.update(overrides)
    return check(op, args, kwargs, rng=rng)
