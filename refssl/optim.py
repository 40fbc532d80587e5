"""Optimisers and learning-rate schedules, pure numpy and purely functional.

Parameters, gradients and optimiser state are flat dicts of arrays (``{"enc.0.w": ..., ...}``).  Every
optimiser has

    state = opt.init(params)
    new_params, new_state = opt.step(params, grads, state, lr=None)

``step`` returns new dicts and new arrays; it never modifies ``params``, ``grads`` or ``state``
(so a caller may keep the old values, e.g. for a checkpoint).  ``lr`` overrides the optimiser's base
learning rate for this step (pass the value of a schedule).  The state is a flat dict too --
``"step"`` (0-d int64) plus ``"<slot>/<param name>"`` buffers -- so it saves to ``.npz`` as is.

Weight decay and LARS adaptation exclusion
------------------------------------------
The SSL papers exclude biases and normalisation parameters from weight decay and from the LARS trust
ratio (SimCLR, arXiv 2002.05709, google-research/simclr lars_optimizer.py: names containing "bias" or
"batch_normalization"; BYOL, arXiv 2006.07733, Appendix C).  Here the rule is by parameter name:
:func:`bias_or_norm` matches names whose last dotted component is ``b``/``bias`` (biases) or
``gamma``/``beta`` (batch/layer-norm affine parameters) -- the names :mod:`refssl.nn` gives them.
:class:`LARS` applies that rule by default; :class:`SGD`, :class:`Adam` and :class:`AdamW` decay every
parameter by default (as ``torch.optim`` does) and take the same ``exclude=`` predicate.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from . import validation as V

__all__ = ["bias_or_norm", "SGD", "Adam", "AdamW", "LARS", "cosine_schedule", "CosineSchedule"]

_EXCLUDED_LEAVES = frozenset({"b", "bias", "gamma", "beta"})


def bias_or_norm(name: str) -> bool:
    """True for biases and norm affine parameters (``"enc.0.b"``, ``"proj.1.gamma"``, ``"x.beta"``)."""
    return name.rsplit(".", 1)[-1] in _EXCLUDED_LEAVES


def _never(name: str) -> bool:
    return False


def _check_grads(params, grads):
    missing = set(params) - set(grads)
    extra = set(grads) - set(params)
    if missing or extra:
        raise ValueError(f"grads must have the keys of params; missing {sorted(missing)}, "
                         f"unknown {sorted(extra)}")
    for k, p in params.items():
        g = grads[k]
        if not isinstance(g, np.ndarray) or g.shape != p.shape:
            raise ValueError(f"grads[{k!r}] must have shape {p.shape}, got {getattr(g, 'shape', type(g))}")
        if not V.all_finite(g):
            raise ValueError(f"grads[{k!r}] contains NaN or inf")


class _Optimizer:
    slots: tuple[str, ...] = ()

    def __init__(self, lr, weight_decay, exclude):
        self.lr = V.positive(lr, "lr")
        self.weight_decay = V.in_range(weight_decay, "weight_decay", 0.0, math.inf)
        self.exclude: Callable[[str], bool] = exclude or _never

    def init(self, params: dict) -> dict:
        state = {"step": np.asarray(0, dtype=np.int64)}
        for slot in self.slots:
            state.update({f"{slot}/{k}": np.zeros_like(v) for k, v in params.items()})
        return state

    def step(self, params: dict, grads: dict, state: dict, lr: float | None = None):
        _check_grads(params, grads)
        lr = self.lr if lr is None else V.in_range(lr, "lr", 0.0, math.inf)
        t = int(state["step"]) + 1
        new_params, new_state = {}, {"step": np.asarray(t, dtype=np.int64)}
        for k, w in params.items():
            bufs = {s: state[f"{s}/{k}"] for s in self.slots}
            w_new, bufs_new = self._update(k, w, grads[k], bufs, lr, t)
            new_params[k] = w_new.astype(w.dtype, copy=False)
            new_state.update({f"{s}/{k}": b.astype(w.dtype, copy=False) for s, b in bufs_new.items()})
        return new_params, new_state

    def _decay(self, name):
        return self.weight_decay if (self.weight_decay and not self.exclude(name)) else 0.0

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "exclude")
        return f"{type(self).__name__}({fields})"


class SGD(_Optimizer):
    """SGD with momentum and (coupled, L2) weight decay; ``torch.optim.SGD`` semantics (dampening 0).

        g <- grad + wd * w;  v <- mu * v + g;  w <- w - lr * (g + mu * v if nesterov else v)
    """

    slots = ("momentum",)

    def __init__(self, lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False, exclude=None):
        super().__init__(lr, weight_decay, exclude)
        self.momentum = V.in_range(momentum, "momentum", 0.0, 1.0, high_open=True)
        self.nesterov = bool(nesterov)

    def _update(self, name, w, grad, bufs, lr, t):
        g = grad + self._decay(name) * w
        v = self.momentum * bufs["momentum"] + g
        upd = g + self.momentum * v if self.nesterov else v
        return w - lr * upd, {"momentum": v}


class Adam(_Optimizer):
    """Adam with bias correction; weight decay is coupled (added to the gradient), as ``torch.optim.Adam``.

        g <- grad + wd * w;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
        w <- w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Reference: Kingma & Ba 2014, arXiv 1412.6980 (Algorithm 1; eps outside the square root as in PyTorch).
    """

    slots = ("m", "v")
    _decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, exclude=None):
        super().__init__(lr, weight_decay, exclude)
        self.beta1 = V.in_range(betas[0], "betas[0]", 0.0, 1.0, high_open=True)
        self.beta2 = V.in_range(betas[1], "betas[1]", 0.0, 1.0, high_open=True)
        self.eps = V.in_range(eps, "eps", 0.0, math.inf)

    def _update(self, name, w, grad, bufs, lr, t):
        wd = self._decay(name)
        if self._decoupled:
            g = grad
            w = w * (1.0 - lr * wd)
        else:
            g = grad + wd * w
        # In PyTorch's order (torch/optim/adam.py, single-tensor path): m and v by linear interpolation,
        # denom = sqrt(v) / sqrt(1 - b2^t) + eps, w - (lr / (1 - b1^t)) m / denom.  Four new arrays
        # (m, v, the step, w); the other passes run in place on them.
        m0, v0, dt = bufs["m"], bufs["v"], w.dtype.type
        m, v, step = np.empty_like(w), np.empty_like(w), np.empty_like(w)  # arrays even for 0-d parameters
        np.subtract(g, m0, out=m)
        m *= dt(1.0 - self.beta1)
        m += m0
        np.multiply(g, g, out=v)
        v -= v0
        v *= dt(1.0 - self.beta2)
        v += v0
        np.sqrt(v, out=step)
        step /= dt(math.sqrt(1.0 - self.beta2 ** t))
        step += dt(self.eps)
        np.divide(m, step, out=step)
        step *= dt(lr / (1.0 - self.beta1 ** t))
        return np.subtract(w, step, out=step), {"m": m, "v": v}


class AdamW(Adam):
    """Adam with decoupled weight decay: ``w <- w (1 - lr wd)`` before the Adam step (``torch.optim.AdamW``).

    Reference: Loshchilov & Hutter 2017, arXiv 1711.05101 (Algorithm 2, with the schedule multiplier
    folded into lr as PyTorch does).
    """

    _decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, exclude=None):
        super().__init__(lr, betas, eps, weight_decay, exclude)


class LARS(_Optimizer):
    """Layer-wise adaptive rate scaling with heavy-ball momentum (SimCLR's "classic momentum" variant).

    For a parameter w that is not excluded:

        g <- grad + wd * w
        trust = eta * ||w|| / ||g||   (1 when either norm is 0)
        v <- mu * v + lr * trust * g;   w <- w - v        (nesterov: w <- w - (mu * v + lr * trust * g))

    Excluded parameters (``exclude``, default :func:`bias_or_norm`) get neither the weight decay nor the
    trust ratio: ``v <- mu v + lr grad``.

    Reference: You, Gitman & Ginsburg 2017, arXiv 1708.03888; google-research/simclr lars_optimizer.py
    (trust coefficient ``eeta`` = 0.001, momentum 0.9, exclusion of bias and batch-norm variables).
    """

    slots = ("momentum",)

    def __init__(self, lr=0.1, momentum=0.9, weight_decay=1e-6, eta=1e-3, nesterov=False,
                 exclude=bias_or_norm):
        super().__init__(lr, weight_decay, exclude)
        self.momentum = V.in_range(momentum, "momentum", 0.0, 1.0, high_open=True)
        self.eta = V.positive(eta, "eta")
        self.nesterov = bool(nesterov)

    def _update(self, name, w, grad, bufs, lr, t):
        if self.exclude(name):
            g, scaled = grad, lr
        else:
            g = grad + self.weight_decay * w
            w_norm = float(np.linalg.norm(w))
            g_norm = float(np.linalg.norm(g))
            trust = self.eta * w_norm / g_norm if (w_norm > 0 and g_norm > 0) else 1.0
            scaled = lr * trust
        v = self.momentum * bufs["momentum"] + scaled * g
        upd = self.momentum * v + scaled * g if self.nesterov else v
        return w - upd, {"momentum": v}


def cosine_schedule(step, *, base_lr, total_steps, warmup_steps=0, final_lr=0.0) -> float:
    """Learning rate of update number ``step`` (0-based): linear warm-up, then half-cosine decay.

        step <  warmup:           base_lr * (step + 1) / warmup
        warmup <= step <= total:  final + (base - final) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2
        step >  total:            final_lr

    so the rate reaches ``base_lr`` at the last warm-up update (step = warmup - 1) and at step = warmup,
    and ``final_lr`` at step = total_steps.  (The SimCLR/BYOL code ramps as step / warmup, whose first
    update has rate 0; the +1 avoids that wasted step.)  Reference: Loshchilov & Hutter 2016,
    arXiv 1608.03983 (SGDR, without restarts); Goyal et al. 2017, arXiv 1706.02677 (warm-up).
    """
    total = V.positive_int(total_steps, "total_steps")
    warm = V.positive_int(warmup_steps, "warmup_steps", minimum=0)
    if warm >= total:
        raise ValueError(f"warmup_steps must be < total_steps ({total}), got {warm}")
    step = V.positive_int(step, "step", minimum=0)
    if step < warm:
        return base_lr * (step + 1) / warm
    if step >= total:
        return float(final_lr)
    frac = (step - warm) / (total - warm)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


class CosineSchedule:
    """Callable form of :func:`cosine_schedule`: ``CosineSchedule(0.3, 1000, warmup_steps=100)(step)``."""

    def __init__(self, base_lr, total_steps, warmup_steps=0, final_lr=0.0):
        self.base_lr = V.positive(base_lr, "base_lr")
        self.final_lr = V.in_range(final_lr, "final_lr", 0.0, math.inf)
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        cosine_schedule(0, base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps)

    def __call__(self, step) -> float:
        return cosine_schedule(step, base_lr=self.base_lr, total_steps=self.total_steps,
                               warmup_steps=self.warmup_steps, final_lr=self.final_lr)

    def __repr__(self):
        return (f"CosineSchedule(base_lr={self.base_lr}, total_steps={self.total_steps}, "
                f"warmup_steps={self.warmup_steps}, final_lr={self.final_lr})")
