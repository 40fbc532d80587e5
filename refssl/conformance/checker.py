"""Checking a port against the spec suite of an op: per-case errors, a verdict, and an explanation.

:func:`check` runs the port on every case (see :mod:`refssl.conformance.ports` for the calling
convention), measures the value error and the worst gradient error with
:func:`refssl.conformance.tolerance.rel_error`, and passes a case when both are within the case's
tolerance, no gradient reaches a stop-gradient input, and the port keeps the input dtype.

A failing case is explained: a known convention (:mod:`refssl.conformance.conventions`: the port's
value and gradients are refssl's times a named factor, an affine relation, or refssl with another
hyperparameter), an unexplained constant factor, a gradient that is wrong while the value is right
(named input, and whether it is missing, zero or scaled), a missing stop-gradient, a non-finite
value (overflow), or a plain mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import registry
from . import cases as C
from .conventions import conventions_for
from .ports import UsageError, adapter, resolve_port
from .tolerance import rel_error

__all__ = ["check", "Report", "CaseResult", "DTYPE_CHOICES"]

DTYPE_CHOICES = ("float32", "float64", "all")


@dataclass
class CaseResult:
    """The outcome of one case."""

    case: C.Case
    value_error: float
    grad_error: float  # worst over the differentiable inputs (0 when the op has none)
    worst_grad: str | None
    ok: bool
    explanation: str = ""
    convention: object = None  # the matched conventions.Convention
    factor: float | None = None  # the constant the port's value and gradients are refssl's times
    notes: list = field(default_factory=list)

    @property
    def tolerance(self) -> float:
        return self.case.tolerance

    def line(self, width: int = 0) -> str:
        grad = f"{self.grad_error:8.1e} ({self.worst_grad})" if self.worst_grad else f"{'-':>8}"
        status = "pass" if self.ok else "FAIL"
        text = (f"{self.case.name:<{width}}  {self.case.dtype:<7}  value {self.value_error:8.1e}  "
                f"grad {grad:<16}  tol {self.tolerance:7.1e}  {status}")
        extra = [self.explanation] if self.explanation else []
        extra += self.notes
        return text + ("  " + "; ".join(extra) if extra else "")


@dataclass
class Report:
    """Results of :func:`check`: one :class:`CaseResult` per case, a verdict and a summary."""

    op: str
    port: str
    framework: str
    results: list

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.ok]

    def lines(self) -> list:
        width = max((len(r.case.name) for r in self.results), default=0)
        return [r.line(width) for r in self.results]

    def summary(self) -> str:
        n, bad = len(self.results), self.failures
        head = (f"{self.op}: {self.port} ({self.framework}): {n - len(bad)} of {n} cases pass"
                + ("" if not bad else f", {len(bad)} fail"))
        if not bad:
            return head + " -- the port conforms to refssl on this suite"
        conventions = {id(r.convention) for r in bad}
        conv = bad[0].convention
        if len(conventions) == 1 and conv is not None:
            return (head + f"; every failing case matches a known convention, factor {conv.label}: {conv.name} "
                    f"({conv.detail})")
        factors = {round(r.factor, 9) for r in bad if r.factor is not None}
        if len(factors) == 1 and all(r.factor is not None for r in bad):
            return head + f"; every failing case is refssl times {bad[0].factor:.6g}"
        reasons = {r.explanation for r in bad}
        if len(reasons) == 1 and bad[0].explanation:
            return head + f"; every failing case: {bad[0].explanation}"
        return head

    def header(self) -> str:
        return (f"{self.op}: {self.port} ({self.framework}), {len(self.results)} cases; errors are "
                "max|port - refssl| / max|refssl| of the value and of the worst gradient")

    def __str__(self) -> str:
        return "\n".join([self.header()] + self.lines() + [self.summary()])


def _finite(a) -> bool:
    return a is not None and bool(np.all(np.isfinite(a)))


def _fits(port_value, port_grads, want_value, want_grads, names, tol) -> bool:
    if rel_error(port_value, want_value) > tol:
        return False
    return all(rel_error(port_grads[n], want_grads[n]) <= tol for n in names)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _match_convention(op, case, value, grads) -> tuple[str, str, float] | None:
    """(explanation, convention label, factor) of the first known convention the port matches."""
    names = case.differentiable
    for conv in conventions_for(op.name):
        try:
            if not conv.applies(case):
                continue
            if conv.variant is not None:
                inputs = C._cast(tuple(case.inputs.values()), np.float64)
                out, g = C.evaluate(op, inputs, conv.variant(dict(case.hyper)),
                                    np.asarray(case.upstream, dtype=np.float64))
                want_g = {n: np.asarray(g[k]) for k, n in enumerate(case.inputs) if n in names}
                if _fits(value, grads, out, want_g, names, case.tolerance):
                    return (f"value and gradients = refssl's with the {conv.label}: {conv.name}", conv, None)
                continue
            f, b = conv.value_factor(case), conv.value_offset(case)
        except (KeyError, ValueError, TypeError, ZeroDivisionError):
            continue
        if f is None or not np.isfinite(f) or (f == 1.0 and b == 0.0):
            continue
        want_v = f * case.expected_out + b
        want_g = {n: f * case.expected_grads[n] for n in names}
        if _fits(value, grads, want_v, want_g, names, case.tolerance):
            rel = f"value and gradients = {_fmt(f)} x refssl" if b == 0 else (
                f"value = {_fmt(f)} x refssl {'+' if b > 0 else '-'} {_fmt(abs(b))}, gradients = {_fmt(f)} x refssl")
            return f"{rel}: {conv.name}", conv, f
    return None


def _ls_factor(pairs) -> float | None:
    num = sum(float(np.sum(p * r)) for p, r in pairs)
    den = sum(float(np.sum(r * r)) for _, r in pairs)
    return num / den if den > 0 else None


def _diagnose(op, case, res, value_error, grad_errors, result: CaseResult) -> str:
    names = case.differentiable
    value, grads = res.value, res.grads
    if not _finite(value):
        return (f"value is not finite while refssl's is {float(np.max(np.abs(case.expected_out))):.4g}: an overflow "
                "or log(0) (exp of unshifted logits? use a max-shifted log-sum-exp)")
    missing = [n for n in names if grads.get(n) is None]
    bad_shape = [n for n in names if grads.get(n) is not None and np.shape(grads[n]) != case.expected_grads[n].shape]
    if bad_shape:
        n = bad_shape[0]
        return f"gradient of {n} has shape {np.shape(grads[n])}, refssl's {case.expected_grads[n].shape}"
    nonfinite = [n for n in names if n not in missing and not _finite(grads[n])]
    if nonfinite:
        return f"gradient of {nonfinite[0]} is not finite (refssl's is finite): an overflow or a division by zero"
    if not missing:
        hit = _match_convention(op, case, value, grads)
        if hit:
            result.convention, result.factor = hit[1], hit[2]
            return hit[0]
        pairs = [(value, case.expected_out)] + [(grads[n], case.expected_grads[n]) for n in names]
        c = _ls_factor(pairs)
        if c is not None and np.isfinite(c) and c != 0 and _fits(
                value, grads, c * case.expected_out, {n: c * case.expected_grads[n] for n in names}, names,
                case.tolerance):
            result.factor = c
            return f"value and gradients = {_fmt(c)} x refssl: a constant factor that is no known convention"
        if names and np.ndim(case.expected_out) == 0:
            a = _ls_factor([(grads[n], case.expected_grads[n]) for n in names])
            if a is not None and np.isfinite(a) and a != 0 and all(
                    rel_error(grads[n], a * case.expected_grads[n]) <= case.tolerance for n in names):
                b = float(value) - a * float(case.expected_out)
                if abs(a - 1) <= case.tolerance:
                    return (f"gradients match but the value is refssl {'+' if b > 0 else '-'} {_fmt(abs(b))}: "
                            "a constant term without gradient")
                return (f"value = {_fmt(a)} x refssl {'+' if b > 0 else '-'} {_fmt(abs(b))}, gradients = {_fmt(a)} x "
                        "refssl: an affine relation that is no known convention")
    tol = case.tolerance
    if value_error <= tol:
        parts = []
        for n in names:
            g = grads.get(n)
            if g is None:
                parts.append(f"no gradient reaches {n} (detached, or computed outside autograd)")
            elif grad_errors[n] <= tol:
                continue
            elif not np.any(g):
                parts.append(f"the gradient of {n} is zero")
            else:
                c = _ls_factor([(g, case.expected_grads[n])])
                if c is not None and c != 0 and rel_error(g, c * case.expected_grads[n]) <= tol:
                    parts.append(f"the gradient of {n} is {_fmt(c)} x refssl's")
                else:
                    parts.append(f"the gradient of {n} differs (error {grad_errors[n]:.2g})")
        return "value matches but " + "; ".join(parts) if parts else ""
    worst = max(names, key=lambda n: grad_errors[n]) if names else None
    text = f"value differs from refssl's (error {value_error:.2g})"
    if worst and grad_errors[worst] > tol:
        text += f" and so do the gradients (worst {worst}: {grad_errors[worst]:.2g})"
    elif worst:
        text += " while the gradients match"
    return text


def _compare(op, case, res) -> CaseResult:
    names = case.differentiable
    if res.error is not None:
        return CaseResult(case, float("inf"), float("inf") if names else 0.0, names[0] if names else None, False,
                          f"the port raised {res.error}")
    value_error = rel_error(res.value, case.expected_out)
    grad_errors = {}
    for n in names:
        g = res.grads.get(n)
        grad_errors[n] = float("inf") if g is None else rel_error(g, case.expected_grads[n])
    worst = max(names, key=lambda n: grad_errors[n]) if names else None
    grad_error = grad_errors[worst] if worst else 0.0
    result = CaseResult(case, value_error, grad_error, worst, False, notes=list(res.notes))
    if np.shape(res.value) != case.expected_out.shape:
        result.explanation = f"value has shape {np.shape(res.value)}, refssl's {case.expected_out.shape}"
        return result
    problems = []
    scale = max((float(np.max(np.abs(g))) for g in case.expected_grads.values() if g.size), default=1.0)
    leaked = [n for n in case.stop_gradient if res.grads.get(n) is not None
              and float(np.max(np.abs(res.grads[n]), initial=0)) > case.tolerance * scale]
    if leaked:
        what = ("gets a gradient but is a stop-gradient input" if len(leaked) == 1
                else "get gradients but are stop-gradient inputs")
        problems.append(f"{', '.join(leaked)} {what} in refssl (missing detach / stop_gradient)")
    wrong_dtype = [f"value is {res.value_dtype}"] if res.value_dtype not in (None, case.dtype) else []
    wrong_dtype += [f"gradient of {n} is {d}" for n, d in res.grad_dtypes.items()
                    if n in names and d not in (None, case.dtype)]
    if wrong_dtype:
        problems.append(f"{', '.join(wrong_dtype)} for {case.dtype} inputs (the dtype must be kept)")
    within = value_error <= case.tolerance and grad_error <= case.tolerance
    result.ok = within and not problems
    explanation = "" if within else _diagnose(op, case, res, value_error, grad_errors, result)
    result.explanation = "; ".join(([explanation] if explanation else []) + problems)
    return result


def _parse_map(name_map) -> dict:
    if name_map is None:
        return {}
    if isinstance(name_map, dict):
        return {str(k): ("" if v is None else str(v)) for k, v in name_map.items()}
    out = {}
    for item in name_map:
        if "=" not in item:
            raise UsageError(f"--map takes NAME=PORT_NAME (or NAME= to drop the keyword), got {item!r}")
        k, _, v = item.partition("=")
        if not k.strip():
            raise UsageError(f"--map takes NAME=PORT_NAME, got {item!r}")
        out[k.strip()] = v.strip()
    return out


def check(op, port, *, framework: str = "numpy", dtype: str = "all", suite=None, name_map=None,
          seed: int = 0) -> Report:
    """Check ``port`` against the spec suite of ``op``; returns a :class:`Report` (``report.ok``).

    op : registered op name.
    port : a callable (function or class) or ``"module:attr"`` / ``"path/file.py:attr"``.
    framework : "numpy", "torch" or "jax" (how arrays are passed and gradients obtained).
    dtype : "float32", "float64" or "all".
    suite : folder of an exported suite (``python -m refssl spec``); None builds it in memory.
    name_map : ``{refssl_hyperparameter: port_keyword}`` (or ``["NAME=PORT_NAME", ...]``); an empty
        port keyword drops that hyperparameter.
    seed : suite seed when building in memory.

    Raises :class:`UsageError` (a ValueError) for an unknown op, dtype or framework, a port that
    cannot be imported or called with the op's arity and keywords, or a framework not installed.
    """
    if not isinstance(op, str):
        raise UsageError(f"op must be a registered op name, got {type(op).__name__}")
    if op not in registry.names():
        raise UsageError(f"unknown op {op!r}; see `python -m refssl list`")
    if dtype not in DTYPE_CHOICES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    label = port if isinstance(port, str) else getattr(port, "__qualname__", repr(port))
    run = adapter(framework, resolve_port(port), _parse_map(name_map), label)
    if suite is None:
        selected = C.build_cases(op, seed=seed, dtype=dtype)
    else:
        from .suite import load_cases

        selected = [c for c in load_cases(suite, op) if dtype in ("all", c.dtype)]
    if not selected:
        raise UsageError(f"the suite has no {dtype} case of {op}")
    for case in selected:
        run.check_binding(case)
    the_op = registry.get(op)
    results = []
    with np.errstate(all="ignore"):  # a port's overflow shows as a non-finite value, reported per case
        for case in selected:
            results.append(_compare(the_op, case, run.run(case)))
    return Report(op, label, framework, results)
