"""Verdicts over whole sweeps: a monotone trend, or an optimum at a stated position.

An experiment that sweeps a setting (a temperature, a weight, a depth) and judges the outcome only at the end
points can pass while the curve between them says otherwise (a U shape whose ends happen to be ordered).
The two helpers here look at every point of the sweep, and each returns a :class:`SweepVerdict` that carries
the sentence saying what was checked, so an experiment's report can print the criterion next to its result.

* :func:`monotone_trend` -- ``values`` rise (or fall) along the sweep: Spearman's rank correlation with the
  sweep position is at least ``min_spearman`` in the stated direction, and no successive step goes the wrong
  way by more than ``tol`` (absolute, or relative to the earlier value with ``relative=True``).
* :func:`stated_optimum` -- the best value (``"min"`` or ``"max"``) sits at the stated position: the value
  there is within ``tol`` of the best one.  The report also says where the best value actually is and
  whether it is interior (a U / inverted-U shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["SweepVerdict", "spearman", "monotone_trend", "stated_optimum"]


@dataclass(frozen=True)
class SweepVerdict:
    """Outcome of a sweep criterion: ``holds`` and two sentences, what was checked and what was seen."""

    holds: bool
    criterion: str  # what the check asks, with its thresholds
    detail: str  # the measured quantities behind the answer
    stats: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.holds)

    def __str__(self) -> str:
        return f"{self.criterion}: {'holds' if self.holds else 'does NOT hold'} ({self.detail})"


def _as_1d(values, name):
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 2:
        raise ValueError(f"{name} must be a 1-d sequence of at least 2 numbers, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {values!r}")
    return v


def _ranks(v):
    """Ranks 0..n-1 with ties given their average rank."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=np.float64)
    for u in np.unique(v):  # average the ranks of tied values
        tie = v == u
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equal-length sequences (Pearson correlation of their ranks, ties
    averaged); 0 when either sequence is constant."""
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den > 0 else 0.0


def _fmt(v):
    return f"{v:.4g}"


def monotone_trend(xs, values, direction: str, *, tol: float = 0.0, relative: bool = False,
                   min_spearman: float = 1.0, what: str = "value", along: str = "x") -> SweepVerdict:
    """Do ``values`` (measured at sweep positions ``xs``, in sweep order) rise or fall over the whole sweep?

    ``direction``: ``"increasing"`` or ``"decreasing"`` in ``xs``.  Holds when (a) Spearman's correlation of
    ``values`` with ``xs`` is >= ``min_spearman`` (increasing) or <= ``-min_spearman`` (decreasing), and
    (b) every successive difference (points sorted by ``xs``) goes the stated way or against it by at most
    ``tol`` -- an absolute tolerance, or a fraction of the earlier value's magnitude with ``relative=True``.
    """
    if direction not in ("increasing", "decreasing"):
        raise ValueError(f"direction must be 'increasing' or 'decreasing', got {direction!r}")
    if tol < 0 or not np.isfinite(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if not -1.0 <= min_spearman <= 1.0:
        raise ValueError(f"min_spearman must be in [-1, 1], got {min_spearman!r}")
    x, v = _as_1d(xs, "xs"), _as_1d(values, "values")
    if len(x) != len(v):
        raise ValueError(f"xs and values must have the same length, got {len(x)} and {len(v)}")
    order = np.argsort(x, kind="mergesort")
    x, v = x[order], v[order]
    sign = 1.0 if direction == "increasing" else -1.0
    rho = spearman(x, v)
    steps = np.diff(v)
    allowed = tol * np.abs(v[:-1]) if relative else np.full(len(steps), tol)
    against = -sign * steps  # > 0: a step the wrong way
    bad = [(x[i], x[i + 1], float(steps[i])) for i in range(len(steps)) if against[i] > allowed[i]]
    holds = bool(sign * rho >= min_spearman and not bad)
    tol_text = (f"{tol:.0%} of the earlier value" if relative else _fmt(tol)) if tol else "0"
    criterion = (f"{what} {direction} in {along} over the whole sweep (Spearman "
                 f"{'>=' if sign > 0 else '<='} {sign * min_spearman:+.2f}, no step against the trend larger "
                 f"than {tol_text})")
    detail = (f"{what} at {along} = " + ", ".join(f"{_fmt(a)}: {_fmt(b)}" for a, b in zip(x, v))
              + f"; Spearman {rho:+.2f}")
    if bad:
        detail += "; against the trend: " + ", ".join(f"{_fmt(a)} -> {_fmt(b)} ({d:+.3g})" for a, b, d in bad)
    return SweepVerdict(holds, criterion, detail,
                        {"spearman": rho, "violations": [[a, b, d] for a, b, d in bad], "direction": direction})


def stated_optimum(xs, values, at, *, kind: str = "min", tol: float = 0.0, what: str = "value",
                   along: str = "x") -> SweepVerdict:
    """Is the best (``kind="min"`` or ``"max"``) of ``values`` over the sweep at the stated position ``at``?

    Holds when ``values`` at ``at`` is within ``tol`` (absolute) of the best value of the sweep.  The stats
    give the actual best position and whether it is interior (neither end of the sweep).
    """
    if kind not in ("min", "max"):
        raise ValueError(f"kind must be 'min' or 'max', got {kind!r}")
    if tol < 0 or not np.isfinite(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    x, v = _as_1d(xs, "xs"), _as_1d(values, "values")
    if len(x) != len(v):
        raise ValueError(f"xs and values must have the same length, got {len(x)} and {len(v)}")
    hits = np.flatnonzero(np.isclose(x, float(at), rtol=1e-9, atol=0.0))
    if hits.size != 1:
        raise ValueError(f"at={at!r} must be exactly one of the sweep positions {list(x)}")
    order = np.argsort(x, kind="mergesort")
    x, v = x[order], v[order]
    i_at = int(np.flatnonzero(np.isclose(x, float(at), rtol=1e-9, atol=0.0))[0])
    i_best = int(np.argmin(v) if kind == "min" else np.argmax(v))
    gap = float(v[i_at] - v[i_best]) if kind == "min" else float(v[i_best] - v[i_at])
    holds = bool(gap <= tol)
    interior = 0 < i_best < len(v) - 1
    criterion = (f"{what} is {'lowest' if kind == 'min' else 'highest'} at {along} = {_fmt(at)} over the sweep "
                 f"(within {_fmt(tol)} of the best value)")
    detail = (f"{what} at {along} = " + ", ".join(f"{_fmt(a)}: {_fmt(b)}" for a, b in zip(x, v))
              + f"; best at {along} = {_fmt(x[i_best])} ({'interior' if interior else 'an end'} of the sweep)")
    return SweepVerdict(holds, criterion, detail,
                        {"best_at": float(x[i_best]), "best": float(v[i_best]), "gap": gap, "interior": interior})
