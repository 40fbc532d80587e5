"""A minimal training loop for models that compute their own loss and gradients.

The view-pair :class:`refssl.train.Trainer` covers joint-embedding methods.  Masked modelling (MAE, BEiT,
VQ-KD) and the vision-language models compute a loss from one batch and return the gradients of every
parameter themselves, so all a loop needs is

    objective(params, step) -> (loss, grads)          # grads: the keys of params

and an optimiser of :mod:`refssl.optim`.  ``after_step(step, params)`` runs after each update (EMA
codebooks, logging of extra metrics); its return value is ignored.
"""

from __future__ import annotations

import math
import time

import numpy as np

__all__ = ["fit"]


def fit(objective, params: dict, optimizer, steps: int, *, lr_schedule=None, after_step=None,
        log=None, log_every: int = 50):
    """Run ``steps`` optimiser steps; returns ``(params, losses)`` (losses: one float per step).

    ``lr_schedule(step) -> lr`` overrides the optimiser's base rate; ``log(message)`` receives a progress
    line every ``log_every`` steps.  A non-finite loss stops the run with a ``FloatingPointError`` naming the
    step (a diverged run must not be reported as trained).
    """
    opt_state = optimizer.init(params)
    losses = []
    t0 = time.perf_counter()
    for step in range(int(steps)):
        loss, grads = objective(params, step)
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}")
        lr = None if lr_schedule is None else lr_schedule(step)
        params, opt_state = optimizer.step(params, grads, opt_state, lr=lr)
        losses.append(loss)
        if after_step is not None:
            after_step(step, params)
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            window = np.mean(losses[-log_every:])
            log(f"step {step + 1}/{steps} loss {window:.4f} ({time.perf_counter() - t0:.1f}s)")
    return params, losses
