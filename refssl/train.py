"""One trainer for joint-embedding self-supervised learning on view pairs.

    trainer = Trainer(nn.mlp([3072, 256, 64], norm="batch", flatten=True), "info_nce",
                      optim.Adam(lr=1e-3), projector=nn.projector(64, 64, 32), seed=0,
                      loss_kwargs={"temperature": 0.2})
    trainer.fit(pairs, steps=300)          # pairs: any iterable of (x1, x2) image batches
    z = trainer.encode(images)             # evaluation-mode encoder outputs

Computation of one step (``x1``, ``x2`` two views of the same N images):

* without a predictor: ``z_v = proj(enc(x_v))`` (``proj`` optional) and ``L = loss(z_1, z_2)``;
* with a predictor (SimSiam, Chen & He 2020, arXiv 2011.10566, Algorithm 1):
  ``p_v = pred(z_v)`` and ``L = (loss(p_1, sg(z_2)) + loss(p_2, sg(z_1))) / 2``, where ``sg`` stops the
  gradient (the target branch gets none).  There is no momentum (EMA) target network.

The two views go through the networks separately (batch-norm statistics per view, running statistics
updated by view 1 then view 2, as in the official SimCLR/SimSiam code); gradients of the two passes are
summed.  ``loss`` is a registered op name or any object with the op interface whose ``forward(z1, z2,
**loss_kwargs)`` returns a scalar and whose ``backward(cache, 1.0)`` returns the gradients of its first two
inputs first.

Determinism: parameters are initialised from ``np.random.default_rng(seed)``; a step is a deterministic
function of (parameters, buffers, optimiser state, batch), so a run is reproducible given the data.
Checkpoints (atomic ``.npz``: parameters, buffers, optimiser state, step) resume a run exactly when the
data stream is a function of the step: pass ``data`` as a callable ``data(start_step) -> iterable``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable

import numpy as np

from . import registry
from .nn import io as nnio

__all__ = ["Trainer"]


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Trainer:
    """Train ``encoder`` (+ ``projector``, + ``predictor``) with a two-view ``loss`` and an optimiser.

    Parameters
    ----------
    encoder, projector, predictor : :mod:`refssl.nn` modules (the last two optional).  Parameter names
        are prefixed ``enc.``, ``proj.``, ``pred.``.
    loss : registered op name (e.g. ``"info_nce"``) or an op-like object.
    optimizer : an optimiser of :mod:`refssl.optim`.
    schedule : optional ``schedule(step) -> lr`` (e.g. :class:`refssl.optim.CosineSchedule`); default:
        the optimiser's constant ``lr``.
    loss_kwargs : hyperparameters passed to the loss forward.
    seed, dtype : initialisation seed and parameter dtype (inputs are cast to it).
    log_every, stream : a progress line every ``log_every`` steps (and at the last one) to ``stream``;
        ``log_every=0`` disables it.
    checkpoint_path, checkpoint_every : save a checkpoint every ``checkpoint_every`` steps and at the end of
        :meth:`fit`.
    """

    def __init__(self, encoder, loss, optimizer, *, projector=None, predictor=None, schedule=None,
                 loss_kwargs=None, seed=0, dtype=np.float32, log_every=50, stream=None,
                 checkpoint_path=None, checkpoint_every=0):
        self.loss = registry.get(loss) if isinstance(loss, str) else loss
        if not (hasattr(self.loss, "forward") and hasattr(self.loss, "backward")):
            raise TypeError(f"loss must be a registered op name or have forward/backward, got {loss!r}")
        self.loss_kwargs = dict(loss_kwargs or {})
        self.optimizer, self.schedule = optimizer, schedule
        self.dtype = np.dtype(dtype)
        self.nets = {"enc": encoder}
        if projector is not None:
            self.nets["proj"] = projector
        if predictor is not None:
            self.nets["pred"] = predictor
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        self.params, self.buffers = {}, {}
        for prefix, net in self.nets.items():
            p, s = net.init(rng, self.dtype)
            self.params.update(nnio.prefixed(p, prefix))
            self.buffers.update(nnio.prefixed(s, prefix))
        self.opt_state = optimizer.init(self.params)
        self.step = 0
        self.history: list[float] = []
        self.log_every, self.stream = int(log_every), stream if stream is not None else sys.stderr
        self.checkpoint_path, self.checkpoint_every = checkpoint_path, int(checkpoint_every)

    # -- forward / backward through the chain of networks ---------------------------------------------
    def _chain_forward(self, x, names, buffers, train):
        caches = []
        for name in names:
            x, c, s = self.nets[name].forward(nnio.subdict(self.params, name), nnio.subdict(buffers, name),
                                              x, train=train)
            caches.append(c)
            buffers = {**buffers, **nnio.prefixed(s, name)}
        return x, caches, buffers

    def _chain_backward(self, caches, names, dout, grads, need_dx=True):
        """Reverse chain; returns (gradient w.r.t. the chain input or None, grads summed into a new dict)."""
        for name, c in zip(reversed(names), reversed(caches)):
            dout, g = self.nets[name].backward(c, dout, need_dx=need_dx or name != names[0])
            grads = nnio.add_into(grads, nnio.prefixed(g, name))
        return dout, grads

    def loss_and_grads(self, x1, x2):
        """(loss, gradient dict, new buffers) for one batch of view pairs; nothing is modified."""
        x1 = np.asarray(x1, dtype=self.dtype)
        x2 = np.asarray(x2, dtype=self.dtype)
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have the same shape, got {x1.shape} and {x2.shape}")
        trunk = [n for n in ("enc", "proj") if n in self.nets]
        z1, c1, buffers = self._chain_forward(x1, trunk, self.buffers, True)
        z2, c2, buffers = self._chain_forward(x2, trunk, buffers, True)
        kw, grads = self.loss_kwargs, {}
        if "pred" not in self.nets:
            loss, lc = self.loss.forward(z1, z2, **kw)
            dz1, dz2 = self.loss.backward(lc, 1.0)[:2]
        else:
            p1, pc1, buffers = self._chain_forward(z1, ["pred"], buffers, True)
            p2, pc2, buffers = self._chain_forward(z2, ["pred"], buffers, True)
            la, ca = self.loss.forward(p1, z2, **kw)  # z2 and z1 are stop-gradient targets here
            lb, cb = self.loss.forward(p2, z1, **kw)
            loss = 0.5 * (la + lb)
            half = self.dtype.type(0.5)
            dz1, grads = self._chain_backward(pc1, ["pred"], half * self.loss.backward(ca, 1.0)[0], grads)
            dz2, grads = self._chain_backward(pc2, ["pred"], half * self.loss.backward(cb, 1.0)[0], grads)
        # The images need no gradient: the encoder's first layer skips it.
        _, grads = self._chain_backward(c1, trunk, np.asarray(dz1, dtype=self.dtype), grads, need_dx=False)
        _, grads = self._chain_backward(c2, trunk, np.asarray(dz2, dtype=self.dtype), grads, need_dx=False)
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step}")
        return loss, grads, buffers

    def train_step(self, x1, x2) -> float:
        """One optimisation step on a batch of view pairs; returns the loss before the update."""
        loss, grads, buffers = self.loss_and_grads(x1, x2)
        lr = self.schedule(self.step) if self.schedule is not None else None
        self.params, self.opt_state = self.optimizer.step(self.params, grads, self.opt_state, lr=lr)
        self.buffers = buffers
        self.step += 1
        self.history.append(loss)
        return loss

    def fit(self, data, steps: int) -> list[float]:
        """Train until ``self.step == steps`` (the total, so a resumed run continues where it stopped).

        ``data``: an iterable of ``(x1, x2)`` pairs, or a callable ``data(start_step)`` returning one
        (needed for an exact resume).  Returns the losses of the steps run by this call.
        """
        steps = int(steps)
        start = self.step
        it = iter(data(start) if callable(data) else data)
        losses, t0, seen = [], time.perf_counter(), 0
        while self.step < steps:
            try:
                x1, x2 = next(it)
            except StopIteration:
                raise ValueError(f"data ran out after {self.step} of {steps} steps") from None
            losses.append(self.train_step(x1, x2))
            seen += len(x1)
            done = self.step - start
            if self.log_every and (self.step % self.log_every == 0 or self.step == steps):
                el = time.perf_counter() - t0
                eta = el / done * (steps - self.step)
                print(f"step {self.step}/{steps}  loss {losses[-1]:.4f}  {seen / el:.1f} pairs/s  "
                      f"ETA {_fmt_duration(eta)}", file=self.stream, flush=True)
            if self.checkpoint_path and self.checkpoint_every and self.step % self.checkpoint_every == 0:
                self.save_checkpoint(self.checkpoint_path)
        if self.checkpoint_path:
            self.save_checkpoint(self.checkpoint_path)
        return losses

    # -- evaluation -----------------------------------------------------------------------------------
    def encode(self, x, *, head=False, batch_size=1024) -> np.ndarray:
        """Evaluation-mode representations of ``x``: encoder output (``head=True``: after the projector)."""
        names = [n for n in (("enc", "proj") if head else ("enc",)) if n in self.nets]
        x = np.asarray(x, dtype=self.dtype)
        outs = [self._chain_forward(x[i:i + batch_size], names, self.buffers, False)[0]
                for i in range(0, len(x), batch_size)]
        return np.concatenate(outs, axis=0)

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, path) -> None:
        """Parameters, buffers, optimiser state and step to ``path`` (atomic ``.npz``)."""
        arrays = {"step": np.asarray(self.step, dtype=np.int64), "seed": np.asarray(self.seed)}
        arrays.update({f"params/{k}": v for k, v in self.params.items()})
        arrays.update({f"buffers/{k}": v for k, v in self.buffers.items()})
        arrays.update({f"opt/{k}": v for k, v in self.opt_state.items()})
        nnio.save_npz(path, arrays)

    def load_checkpoint(self, path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` for the same networks and optimiser."""
        z = nnio.load_npz(path)
        params = {k[7:]: v for k, v in z.items() if k.startswith("params/")}
        buffers = {k[8:]: v for k, v in z.items() if k.startswith("buffers/")}
        opt = {k[4:]: v for k, v in z.items() if k.startswith("opt/")}
        for what, new, old in (("params", params, self.params), ("buffers", buffers, self.buffers),
                               ("optimizer state", opt, self.opt_state)):
            if set(new) != set(old) or any(new[k].shape != np.shape(old[k]) for k in old):
                raise ValueError(f"checkpoint {path}: {what} do not match this trainer's networks "
                                 f"and optimiser")
        self.params, self.buffers, self.opt_state = params, buffers, opt
        self.step = int(z["step"])
