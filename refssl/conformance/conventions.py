"""Known scale conventions: how other implementations' values relate to refssl's, per op.

A port that differs from refssl by one of these is not "wrong" in an unknown way: it follows another
code base's convention, and the report says which.  Facts from
``shared/reference/canonical-definitions.md`` section 0 and the op docstrings.

Each :class:`Convention` says what the port's value and gradients are in terms of refssl's on a case:

* ``factor(case)``: value and gradients are ``factor * refssl`` (plus ``offset(case)`` on the value:
  an affine relation such as lightly's BYOL example, where the gradients are still one constant
  times refssl's), or
* ``variant(hyper)``: refssl with other hyperparameters reproduces the port (a convention that
  rescales one term of a sum, e.g. solo-learn's VICReg variance term).

:data:`CONVENTIONS` is the table ``(op, factor, name)`` the kit matches against; :data:`GENERIC`
holds factors worth naming for any op (x2, x1/2, xN, x1/tau, ...).  :data:`SCALE_NOTES` is the
official-scale note of each op, copied into the suite manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Convention", "CONVENTIONS", "GENERIC", "SCALE_NOTES", "conventions_for", "table"]


def _hyper(case, name, default):
    v = case.hyper.get(name, default)
    return default if v is None else float(v)


def _tau(case, default=0.1):
    return _hyper(case, "temperature", default)


def _rows(case) -> int:
    """N: rows of the first input (the per-view batch for the pairwise losses)."""
    first = next(iter(case.inputs.values()))
    return int(np.shape(first)[0]) if np.ndim(first) else 1


def _supcon_anchor_ratio(case) -> float:
    """Anchors / anchors with a positive (pytorch-metric-learning averages over the latter)."""
    z, labels = case.inputs["z"], np.asarray(case.inputs["labels"])
    views = z.shape[1] if np.ndim(z) == 3 else 1
    y = np.repeat(labels[None, :], views, axis=0).ravel()
    counts = {v: int(c) for v, c in zip(*np.unique(y, return_counts=True))}
    with_pos = sum(1 for v in y if counts[v] > 1)
    return len(y) / with_pos if with_pos else float("nan")


@dataclass(frozen=True)
class Convention:
    """One known relation ``port = factor * refssl (+ offset)`` or ``port = refssl(variant hyper)``."""

    op: str | None  # None: generic (any op)
    label: str  # the factor as people write it: "2", "0.025", "1/(2τ)", "variance x2"
    name: str  # short: whose convention it is
    detail: str  # what it computes and why it differs
    factor: Callable | None = None
    offset: Callable | None = None
    variant: Callable | None = None
    applies: Callable = lambda case: True

    def value_factor(self, case) -> float | None:
        return None if self.factor is None else float(self.factor(case))

    def value_offset(self, case) -> float:
        return 0.0 if self.offset is None else float(self.offset(case))


CONVENTIONS: tuple[Convention, ...] = (
    Convention("info_nce", "2", "official SimCLR NT-Xent scale (google-research/simclr)",
               "the TF code averages the two-direction sum over N anchors: 2x the paper's 1/(2N) mean, which "
               "refssl, lightly NTXentLoss, solo-learn and pytorch-metric-learning compute",
               factor=lambda c: 2.0),
    Convention("supcon", "τ/0.07", "SupContrast's default base_temperature 0.07",
               "the official SupConLoss is (τ/τ_base) L_out with τ_base = 0.07 by default; refssl's "
               "base_temperature=None means τ_base = τ (factor 1): pass base_temperature to match",
               factor=lambda c: _tau(c) / 0.07, applies=lambda c: c.hyper.get("base_temperature") is None),
    Convention("supcon_in", "τ/0.07", "base_temperature 0.07 (SupContrast's default)",
               "refssl's base_temperature=None means τ_base = τ (factor 1)",
               factor=lambda c: _tau(c) / 0.07, applies=lambda c: c.hyper.get("base_temperature") is None),
    Convention("supcon", "M/M_pos", "pytorch-metric-learning SupConLoss averaging",
               "it averages only over the anchors with a non-zero loss (those with a positive) and has no "
               "τ/τ_base; the official code (and refssl) counts every anchor", factor=_supcon_anchor_ratio,
               applies=lambda c: c.hyper.get("base_temperature") is None),
    Convention("barlow_twins", "0.025", "solo-learn Barlow Twins scale",
               "solo-learn's barlow_loss_func multiplies the loss by scale_loss = 0.025 (its default λ is 5e-3)",
               factor=lambda c: 0.025),
    Convention("barlow_twins", "1/32", "first facebookresearch/barlowtwins release",
               "its scale-loss flag multiplied the loss by 1/32 (with λ = 3.9e-3); later removed",
               factor=lambda c: 1 / 32),
    Convention("vicreg", "variance x2", "solo-learn VICReg variance term",
               "solo-learn's vicreg_loss_func (like the paper's equation and pytorch-metric-learning before "
               "v1.3.1) omits the official 1/2 on each view's variance term",
               variant=lambda h: {**h, "std_coeff": 2 * float(h.get("std_coeff", 25.0))}),
    Convention("byol", "1/4, -1", "lightly's BYOL example",
               "lightly's example uses NegativeCosineSimilarity, -1/2 (cos + cos): official = 4 + 4 x lightly, "
               "so its gradient is 1/4 of the official one", factor=lambda c: 0.25, offset=lambda c: -1.0),
    Convention("neg_cosine", "2, +2", "BYOL's regression loss",
               "one BYOL direction is ||p̂ - ẑ||² = 2 + 2 neg_cosine(p, z)", factor=lambda c: 2.0,
               offset=lambda c: 2.0),
    Convention("moco_v3", "1/(2τ)", "MoCo v3 without its 2τ factor",
               "the official loss is 2τ CE(q1, k2) + 2τ CE(q2, k1); the port computes the plain sum",
               factor=lambda c: 1 / (2 * _tau(c, 1.0))),
    Convention("moco_v3", "1/(4τ)", "MoCo v3 as a mean without its 2τ factor",
               "the official loss is 2τ CE(q1, k2) + 2τ CE(q2, k1); the port averages the two cross-entropies",
               factor=lambda c: 1 / (4 * _tau(c, 1.0))),
)


def _temperature_name(case) -> str | None:
    for name in ("temperature", "student_temp"):
        if case.hyper.get(name) is not None:
            return name
    return None


GENERIC: tuple[Convention, ...] = (
    Convention(None, "2", "sum instead of mean of two terms",
               "a sum of two symmetric terms where refssl averages them, or a mean over N where refssl "
               "averages over 2N", factor=lambda c: 2.0),
    Convention(None, "1/2", "mean instead of sum of two terms",
               "a mean of two symmetric terms where refssl sums them, or one direction only",
               factor=lambda c: 0.5),
    Convention(None, "-1", "sign flipped", "a similarity maximised instead of a loss minimised",
               factor=lambda c: -1.0),
    Convention(None, "N", "sum over the batch", "a sum over the batch where refssl takes the mean", factor=_rows),
    Convention(None, "1/N", "mean where refssl sums", "a mean over the batch where refssl sums",
               factor=lambda c: 1 / _rows(c)),
    Convention(None, "2N", "sum over both views' anchors", "a sum over the 2N anchors where refssl takes the mean",
               factor=lambda c: 2 * _rows(c)),
    Convention(None, "1/τ", "an extra 1/temperature", "a temperature factor refssl does not apply",
               factor=lambda c: 1 / float(c.hyper[_temperature_name(c)]),
               applies=lambda c: _temperature_name(c) is not None),
    Convention(None, "τ", "an extra temperature factor",
               "a factor τ refssl does not apply (as TF SupCon's scale_by_temperature)",
               factor=lambda c: float(c.hyper[_temperature_name(c)]),
               applies=lambda c: _temperature_name(c) is not None),
)


def conventions_for(op: str) -> list:
    """The op's own conventions first, then the generic ones."""
    return [c for c in CONVENTIONS if c.op == op] + list(GENERIC)


def table() -> list:
    """(op, factor, name) rows of the known conventions (generic rows have op '*')."""
    return [(c.op or "*", c.label, c.name) for c in CONVENTIONS + GENERIC]


SCALE_NOTES: dict[str, str] = {
    "info_nce": "refssl: paper scale, mean over the 2N anchors (= lightly NTXentLoss, solo-learn simclr_loss_func, "
                "pytorch-metric-learning NTXentLoss). Official SimCLR TF code: 2x (NT_XENT_OFFICIAL_FACTOR).",
    "debiased_info_nce": "refssl: mean over the 2N anchors, as chingyaoc/DCL main.py; tau_plus = 0 is info_nce. "
                         "lightly's DCLLoss is Decoupled Contrastive Learning, a different loss.",
    "clip": "refssl: 1/2 (CE_image->text + CE_text->image), as open_clip ClipLoss; logit_scale is log(1/τ).",
    "supcon": "refssl: L_out with base_temperature=None meaning τ_base = τ (factor 1). Official SupConLoss "
              "default τ_base = 0.07 (factor τ/0.07). pytorch-metric-learning: no τ/τ_base, averages only anchors "
              "with positives. solo-learn's 'supcon' computes L_in.",
    "supcon_in": "refssl: L_in (positives averaged inside the log), base_temperature as supcon.",
    "barlow_twins": "refssl: official facebookresearch/barlowtwins value (λ = 0.0051 default). solo-learn: x0.025 "
                    "(λ = 5e-3); first official release: x1/32 (λ = 3.9e-3).",
    "barlow_twins_hsic": "refssl: off-diagonal target -1 (Tsai et al. corr_neg_one); the authors' default target 0 "
                         "is barlow_twins. normalization='tsai' reproduces their standardisation.",
    "vicreg": "refssl: official facebookresearch/vicreg value (1/2 on each variance term). solo-learn, the paper's "
              "equation and pytorch-metric-learning < 1.3.1: variance term x2.",
    "byol": "refssl: official value (1/N) sum [(2 - 2cos) + (2 - 2cos)] in [0, 8] (= solo-learn). lightly's "
            "example: -1/2 (cos + cos), official = 4 + 4 x lightly (gradient x4).",
    "simsiam": "refssl: -1/2 (mean cos + mean cos) in [-1, 1]; lightly and solo-learn compute the same.",
    "neg_cosine": "refssl: -(1/N) sum cos(p, z) (SimSiam's D, lightly NegativeCosineSimilarity on a detached z); "
                  "one BYOL direction is 2 + 2 neg_cosine.",
    "moco_v3": "refssl: official 2τ CE_12 + 2τ CE_21 (facebookresearch/moco-v3 builder.py; = solo-learn "
               "mocov3_loss_func). Without the 2τ: factor 1/(2τ).",
    "moco_queue": "refssl: one direction, CE with the positive at label 0 (MoCo v2 / PCL instance term).",
    "nnclr": "refssl: 1/2 (CE + CE) of the paper (no official code); lightly's example uses NT-Xent instead.",
    "dino": "refssl: official DINOLoss (mean over view pairs and batch); lightly and solo-learn the same formula.",
    "mean_shift": "refssl: UMBCvision/MSF (targets enqueued before the search, mean over the k neighbours).",
    "proto_nce": "refssl: salesforce/PCL (instance term + mean over clusterings of the prototype term).",
    "mae_loss": "refssl: official masked-patch mean; norm_pix default False as the official code (solo-learn: on).",
    "alignment": "refssl: SsnL/align_uniform align_loss (mean of ||x - y||^alpha).",
    "uniformity": "refssl: SsnL/align_uniform uniform_loss (unique pairs, torch.pdist).",
}
