"""One experiment over several seeds: the per-seed results summed up in one report.

A run over seeds ``0,1,2`` writes each seed's full result to ``NAME/seed-K/`` (the same files a one-seed run
writes to ``NAME/``) and the aggregate to ``NAME/metrics.json`` and ``NAME/report.md``:

* every numeric metric as mean and sample standard deviation over the seeds (ddof = 1: n - 1 in the
  denominator; undefined for one value).  Nested metrics (dicts and lists) are aggregated leaf by leaf; a
  leaf that is not a number on every seed (a bool, a string) is listed per seed instead.  A number that is
  NaN on some seed (null in metrics.json) is left out of its mean, and ``n`` says over how many seeds it was
  taken;
* the verdict of every seed (met, not met, and which named criteria failed);
* one aggregate verdict by :data:`RULE`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from .framework import Experiment, _jsonable, _runtime_line, _verdict_word, markdown_table

__all__ = ["RULE", "seed_folder", "aggregate_metrics", "aggregate_verdict", "write_aggregate"]

RULE = ("the expectation counts as met only when it is met on every seed; when it fails on any seed it is "
        "NOT met, and the report says on how many of the seeds it was met and which criteria failed on the "
        "others. Runs at the tiny level are not judged, on any seed or in aggregate.")

METRICS_FORMAT = ("same nesting as each seed's metrics; a numeric leaf becomes {mean, std, n}: the mean and the "
                  "sample standard deviation (ddof = 1; null for a single value) over the n seeds on which it is "
                  "a finite number; any other leaf becomes {per_seed: [its value on each seed, in the order "
                  "of seeds]}")


def seed_folder(seed: int) -> str:
    """Name of a seed's sub-folder in a result over several seeds."""
    return f"seed-{seed}"


_MISSING = object()  # a key or list entry that one seed has and another has not


class _Leaf:
    """An aggregated leaf while the tree is built (so it cannot be mistaken for a metrics dict)."""

    def __init__(self, values: list):
        self.values = values  # one entry per seed, _MISSING where the seed has no such leaf
        present = [v for v in values if v is not _MISSING and v is not None]
        self.numeric = bool(present) and all(_is_number(v) for v in present)
        if self.numeric:
            finite = np.array([float(v) for v in present if math.isfinite(float(v))], dtype=np.float64)
            self.n = len(finite)
            self.mean = float(finite.mean()) if self.n else None
            self.std = float(finite.std(ddof=1)) if self.n > 1 else None

    def as_json(self) -> dict:
        if self.numeric:
            return {"mean": self.mean, "std": self.std, "n": self.n}
        return {"per_seed": [None if v is _MISSING else v for v in self.values]}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _merge(values: list):
    present = [v for v in values if v is not _MISSING]
    if present and all(isinstance(v, dict) for v in present):
        keys = list(dict.fromkeys(k for v in present for k in v))  # first seen first: the seeds' own order
        return {k: _merge([v.get(k, _MISSING) if isinstance(v, dict) else _MISSING for v in values]) for k in keys}
    if present and all(isinstance(v, list) for v in present):
        length = max(len(v) for v in present)
        return [_merge([v[i] if isinstance(v, list) and i < len(v) else _MISSING for v in values])
                for i in range(length)]
    return _Leaf(values)


def _as_json(tree):
    if isinstance(tree, dict):
        return {k: _as_json(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_as_json(v) for v in tree]
    return tree.as_json()


def _flatten(tree, path: str = ""):
    """(path, leaf) pairs in order; dict keys joined with '/', list entries as [i]."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{path}/{k}" if path else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{path}[{i}]")
    else:
        yield path, tree


def aggregate_metrics(per_seed: list) -> dict:
    """The metrics of each seed (JSON-like: dicts, lists, numbers, None for NaN, bools, strings), in seed
    order, as one tree in the format of :data:`METRICS_FORMAT`."""
    return _as_json(_merge([_jsonable(m) for m in per_seed]))


def _failed(summary: dict) -> list[str]:
    return [name for name, ok in (summary.get("criteria") or {}).items() if not ok]


def aggregate_verdict(summaries: list[dict]) -> tuple[bool | None, int, int, str]:
    """``(met, seeds_met, seeds_judged, sentence)`` for the per-seed summaries, by :data:`RULE`."""
    judged = [s for s in summaries if s["met"] is not None]
    met_on = [s for s in judged if s["met"] is True]
    if not judged:
        return None, 0, 0, f"Not judged: {len(summaries)} seeds at the tiny level."
    met = len(met_on) == len(judged) == len(summaries)
    sentence = f"Met on {len(met_on)} of {len(summaries)} seeds"
    if met:
        return True, len(met_on), len(judged), sentence + "."
    missed = []
    for s in summaries:
        if s["met"] is not True:
            why = ", ".join(_failed(s)) or ("not judged" if s["met"] is None else "see its report")
            missed.append(f"seed {s['seed']} (failed: {why})")
    return False, len(met_on), len(judged), f"{sentence}; not met on {'; '.join(missed)}."


def _common(values: list):
    """The value when every seed has the same one, else ``{"per_seed": values}``."""
    if all(v == values[0] for v in values[1:]):
        return values[0]
    return {"per_seed": values}


def _g(v) -> str:
    if v is None:
        return "nan"
    if _is_number(v):
        return format(float(v), ".4g") if isinstance(v, float) else str(v)
    return str(v)


def _report(exp: Experiment, level: str, agg: dict, summaries: list[dict], metrics_tree) -> str:
    seeds = agg["seeds"]
    settings = agg["settings"]
    if "per_seed" in settings and len(settings) == 1:
        setting = "settings differ between seeds (see each seed's report)"
    else:
        setting = ", ".join(f"{k} = {v}" for k, v in settings.items()) or "(defaults)"
    seconds = ", ".join(f"{s['seconds']:.1f}" for s in summaries)
    env = agg["environment"]
    env_line = (_runtime_line(env) if "per_seed" not in env else
                "**Environment.** The seeds ran in different environments (BLAS threads or versions); each "
                "seed's report names its own.")
    word = _verdict_word(agg["met"])
    parts = [
        f"# {exp.title} ({len(seeds)} seeds)",
        "",
        f"**Question.** {exp.question}",
        "",
        f"**Expected outcome (stated before running).** {exp.expected}",
        "",
        f"**Setting.** level `{level}`, seeds {', '.join(map(str, seeds))}; {setting}. Run time "
        f"{agg['seconds']:.1f} s summed over the seeds ({seconds} s).",
        "",
        env_line,
        "",
        f"**How the verdict is aggregated.** Over the seeds, {RULE}",
        "",
        f"**Outcome: expectation {word}.** {agg['verdict']}",
        "",
        "## Per seed",
        "",
        markdown_table([{"seed": s["seed"], "expectation": _verdict_word(s["met"]),
                         "failed criteria": ", ".join(_failed(s)) or "-", "seconds": f"{s['seconds']:.1f}",
                         "report": f"[{seed_folder(s['seed'])}/report.md]({seed_folder(s['seed'])}/report.md)"}
                        for s in summaries]),
        "",
    ]
    parts += [f"- seed {s['seed']}: {s['verdict']}" for s in summaries]
    leaves = list(_flatten(metrics_tree))
    cols = [f"seed {s}" for s in seeds]

    def seed_values(leaf):
        return {c: ("-" if v is _MISSING else _g(v)) for c, v in zip(cols, leaf.values)}

    numeric = [(p, leaf) for p, leaf in leaves if leaf.numeric]
    other = [(p, leaf) for p, leaf in leaves if not leaf.numeric]
    if numeric:
        rows = []
        for p, leaf in numeric:
            mean = _g(leaf.mean)
            spread = f"{mean} ± {_g(leaf.std)}" if leaf.std is not None else mean
            if leaf.n < len(seeds):
                spread += f" (n = {leaf.n})"
            rows.append({"metric": f"`{p}`", "mean ± std": spread, **seed_values(leaf)})
        parts += ["", "## Metrics over the seeds", "",
                  "Mean ± sample standard deviation over the seeds (ddof = 1: n − 1 in the denominator), then "
                  "each seed's value. Where a seed measured NaN (shown as nan) the mean and std are over the "
                  "other seeds, n says how many; '-' marks a seed without that metric.", "",
                  markdown_table(rows)]
    if other:
        parts += ["", "## Other values per seed", "",
                  "Values that are not numbers on every seed (criteria, labels) are not averaged; each seed's:",
                  "", markdown_table([{"metric": f"`{p}`", **seed_values(leaf)} for p, leaf in other])]
    parts += ["", "## Figures", "",
              "Each seed's figures are in its folder, shown in its report: "
              + ", ".join(f"[{seed_folder(s)}]({seed_folder(s)}/report.md)" for s in seeds) + "."]
    return "\n".join(parts) + "\n"


def write_aggregate(exp: Experiment, level: str, summaries: list[dict], folder: str | Path) -> dict:
    """Write ``metrics.json`` and ``report.md`` of the aggregate over ``summaries`` (one per seed, in seed order,
    as their metrics.json holds them) into ``folder``; returns the aggregate summary."""
    if len(summaries) < 2:
        raise ValueError(f"an aggregate needs at least 2 seeds, got {len(summaries)}")
    folder = Path(folder)
    summaries = [_jsonable(s) for s in summaries]
    met, k, judged, sentence = aggregate_verdict(summaries)
    tree = _merge([s["metrics"] for s in summaries])
    agg = {
        "name": exp.name, "title": exp.title, "level": level, "seeds": [s["seed"] for s in summaries],
        "seconds": round(sum(s["seconds"] for s in summaries), 2), "expected": exp.expected,
        "met": met, "seeds_met": k, "seeds_judged": judged, "rule": RULE, "verdict": sentence,
        "per_seed": [{"seed": s["seed"], "folder": seed_folder(s["seed"]), "met": s["met"], "failed": _failed(s),
                      "verdict": s["verdict"], "seconds": s["seconds"]} for s in summaries],
        "settings": _common([s["settings"] for s in summaries]),
        "environment": _common([s["environment"] for s in summaries]),
        "metrics_format": METRICS_FORMAT,
        "metrics": _as_json(tree),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (folder / "metrics.json").write_text(json.dumps(agg, indent=2) + "\n")
    (folder / "report.md").write_text(_report(exp, level, agg, summaries, tree))
    return agg
