"""One trainer for joint-embedding self-supervised learning on view pairs.

    trainer = Trainer(nn.mlp([3072, 256, 64], norm="batch", flatten=True), "info_nce",
                      optim.Adam(lr=1e-3), projector=nn.projector(64, 64, 32), seed=0,
                      loss_kwargs={"temperature": 0.2})
    trainer.fit(pairs, steps=300)          # pairs: any iterable of (x1, x2) image batches
    z = trainer.encode(images)             # evaluation-mode encoder outputs

Computation of one step (``x1``, ``x2`` two views of the same N images; ``z_v = proj(enc(x_v))``, the
projector being optional):

* **symmetric** (no predictor, no target network, two-input loss; SimCLR, Barlow Twins, VICReg ...):
  ``L = loss(z_1, z_2)``, gradients to both views;
* **predictor / target** (a predictor, a target network, or a four-input loss): online outputs
  ``p_v = pred(z_v)`` (``p_v = z_v`` without a predictor) regress onto stop-gradient targets ``t_v``:

  - ``t_v = sg(z_v)`` without a target network (SimSiam, Chen & He 2020, arXiv 2011.10566, Algorithm 1);
  - ``t_v = proj'(enc'(x_v))`` with ``target_momentum``: an EMA copy of encoder and projector updated
    after each optimiser step, ``xi <- m xi + (1 - m) theta`` (BYOL, Grill et al. 2020, arXiv 2006.07733;
    :func:`refssl.state.ema_update`).  The target runs in training mode (batch statistics) and keeps its
    own batch-norm running statistics.

  A four-input loss (the registered ``simsiam``, ``byol``) is called once as ``loss(p_1, p_2, t_1, t_2)``;
  a two-input loss (``neg_cosine``, ...) is symmetrised, ``L = (loss(p_1, t_2) + loss(p_2, t_1)) / 2``.
* **autoencoder** (a ``decoder``): the pair is (input, target) and ``L = loss(dec(enc(x_1)), x_2)``, e.g.
  with the registered ``mse``; a stream of ``(x, x)`` trains a plain autoencoder, ``(noisy(x), x)`` a
  denoising one.

The two views go through the networks separately (batch-norm statistics per view, running statistics
updated by view 1 then view 2, as in the official SimCLR/SimSiam code); gradients of the two passes are
summed.  ``loss`` is a registered op name or any object with the op interface: ``forward(a, b[, c, d],
**loss_kwargs)`` returns a scalar and ``backward(cache, 1.0)`` returns the gradients of its inputs, the
first two being those that the trainer uses.

Determinism: parameters are initialised from ``np.random.default_rng(seed)``; a step is a deterministic
function of (parameters, buffers, optimiser state, batch), so a run is reproducible given the data.
Checkpoints (atomic ``.npz``: parameters, target network, buffers, optimiser state, step) resume a run
exactly when the data stream is a function of the step: pass ``data`` as a callable
``data(start_step) -> iterable``.
"""

from __future__ import annotations

import inspect
import math
import sys
import time

import numpy as np

from . import registry
from .nn import io as nnio
from .state import ema_update

__all__ = ["Trainer"]


def _n_array_inputs(forward) -> int:
    """Number of positional parameters of a loss forward (its array inputs)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in inspect.signature(forward).parameters.values())


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
    decoder : a module mapping encoder outputs back to inputs (autoencoder mode, prefix ``dec.``); not
        combined with a projector, predictor or target network.
    loss : registered op name (e.g. ``"info_nce"``) or an op-like object.
    optimizer : an optimiser of :mod:`refssl.optim`.
    schedule : optional ``schedule(step) -> lr`` (e.g. :class:`refssl.optim.CosineSchedule`); default:
        the optimiser's constant ``lr``.
    loss_kwargs : hyperparameters passed to the loss forward.
    seed, dtype : initialisation seed and parameter dtype (inputs are cast to it).
    log_every, stream : a progress line every ``log_every`` steps (and at the last one) to ``stream``
        (default stderr): step, loss of the last step, its learning rate, throughput since the start of
        :meth:`fit` and the remaining time at that rate; ``log_every=0`` disables it.
    checkpoint_path, checkpoint_every : save a checkpoint every ``checkpoint_every`` steps and at the end of
        :meth:`fit`.
    target_momentum : None (no target network), a float m in [0, 1], or ``m(step)`` (e.g.
        ``lambda k: refssl.state.byol_momentum(k, total_steps=K)``): the EMA rate of the target network.
    """

    def __init__(self, encoder, loss, optimizer, *, projector=None, predictor=None, schedule=None,
                 loss_kwargs=None, seed=0, dtype=np.float32, log_every=50, stream=None,
                 checkpoint_path=None, checkpoint_every=0, target_momentum=None, decoder=None):
        self.loss = registry.get(loss) if isinstance(loss, str) else loss
        if not (hasattr(self.loss, "forward") and hasattr(self.loss, "backward")):
            raise TypeError(f"loss must be a registered op name or have forward/backward, got {loss!r}")
        self.loss_arity = _n_array_inputs(self.loss.forward)
        if self.loss_arity not in (2, 4):
            raise ValueError(f"loss must take 2 (z1, z2) or 4 (p1, p2, t1, t2) array inputs, "
                             f"its forward takes {self.loss_arity}")
        self.loss_kwargs = dict(loss_kwargs or {})
        self.target_momentum = target_momentum
        self.optimizer, self.schedule = optimizer, schedule
        self.dtype = np.dtype(dtype)
        self.nets = {"enc": encoder}
        if projector is not None:
            self.nets["proj"] = projector
        if predictor is not None:
            self.nets["pred"] = predictor
        if decoder is not None:
            if projector is not None or predictor is not None or target_momentum is not None:
                raise ValueError("decoder (autoencoder mode) cannot be combined with a projector, a predictor "
                                 "or a target network")
            if self.loss_arity != 2:
                raise ValueError("the autoencoder loss must take 2 inputs (reconstruction, target)")
            self.nets["dec"] = decoder
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        self.params, self.buffers = {}, {}
        for prefix, net in self.nets.items():
            p, s = net.init(rng, self.dtype)
            self.params.update(nnio.prefixed(p, prefix))
            self.buffers.update(nnio.prefixed(s, prefix))
        self.trunk = [n for n in ("enc", "proj", "dec") if n in self.nets]
        # Target network (EMA of encoder + projector): same names as the online parameters.
        self.target_params = None
        if target_momentum is not None:
            self.target_params = {k: v.copy() for k, v in self.params.items() if not k.startswith("pred.")}
            self.buffers.update({f"target.{k}": v.copy() for k, v in self.buffers.items()
                                 if not k.startswith("pred.")})
        self.opt_state = optimizer.init(self.params)
        self.step = 0
        self.history: list[float] = []
        self.log_every, self.stream = int(log_every), stream if stream is not None else sys.stderr
        self.checkpoint_path, self.checkpoint_every = checkpoint_path, int(checkpoint_every)

    # -- forward / backward through the chain of networks ---------------------------------------------
    def _chain_forward(self, x, names, buffers, train, params=None, buffer_prefix=""):
        """Run ``x`` through the named networks; returns (output, caches, buffers with updates)."""
        params = self.params if params is None else params
        caches = []
        for name in names:
            key = buffer_prefix + name
            x, c, s = self.nets[name].forward(nnio.subdict(params, name), nnio.subdict(buffers, key),
                                              x, train=train)
            caches.append(c)
            buffers = {**buffers, **nnio.prefixed(s, key)}
        return x, caches, buffers

    def _chain_backward(self, caches, names, dout, grads, need_dx=True):
        """Reverse chain; returns (gradient w.r.t. the chain input or None, grads summed into a new dict)."""
        for name, c in zip(reversed(names), reversed(caches)):
            dout, g = self.nets[name].backward(c, dout, need_dx=need_dx or name != names[0])
            grads = nnio.add_into(grads, nnio.prefixed(g, name))
        return dout, grads

    @property
    def uses_targets(self) -> bool:
        """True for the predictor / target form of the objective (see the module docstring)."""
        return "pred" in self.nets or self.target_params is not None or self.loss_arity == 4

    def loss_and_grads(self, x1, x2):
        """(loss, gradient dict, new buffers) for one batch of view pairs; nothing is modified."""
        x1 = np.asarray(x1, dtype=self.dtype)
        x2 = np.asarray(x2, dtype=self.dtype)
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have the same shape, got {x1.shape} and {x2.shape}")
        trunk, kw, grads = self.trunk, self.loss_kwargs, {}
        if "dec" in self.nets:  # autoencoder: x2 is the target and gets no gradient
            out, c, buffers = self._chain_forward(x1, trunk, self.buffers, True)
            loss, lc = self.loss.forward(out, x2, **kw)
            dout = np.asarray(self.loss.backward(lc, 1.0)[0], dtype=self.dtype)
            _, grads = self._chain_backward(c, trunk, dout, grads, need_dx=False)
            return self._checked(loss), grads, buffers
        z1, c1, buffers = self._chain_forward(x1, trunk, self.buffers, True)
        z2, c2, buffers = self._chain_forward(x2, trunk, buffers, True)
        if not self.uses_targets:
            loss, lc = self.loss.forward(z1, z2, **kw)
            dz1, dz2 = self.loss.backward(lc, 1.0)[:2]
        else:
            if "pred" in self.nets:
                p1, pc1, buffers = self._chain_forward(z1, ["pred"], buffers, True)
                p2, pc2, buffers = self._chain_forward(z2, ["pred"], buffers, True)
            else:
                p1, p2 = z1, z2
            if self.target_params is not None:
                t1, _, buffers = self._chain_forward(x1, trunk, buffers, True, self.target_params, "target.")
                t2, _, buffers = self._chain_forward(x2, trunk, buffers, True, self.target_params, "target.")
            else:
                t1, t2 = z1, z2  # stop-gradient: no gradient is taken through these
            if self.loss_arity == 4:
                loss, lc = self.loss.forward(p1, p2, t1, t2, **kw)
                dp1, dp2 = self.loss.backward(lc, 1.0)[:2]
            else:
                la, ca = self.loss.forward(p1, t2, **kw)
                lb, cb = self.loss.forward(p2, t1, **kw)
                loss, half = 0.5 * (la + lb), self.dtype.type(0.5)
                dp1, dp2 = half * self.loss.backward(ca, 1.0)[0], half * self.loss.backward(cb, 1.0)[0]
            if "pred" in self.nets:
                dz1, grads = self._chain_backward(pc1, ["pred"], dp1, grads)
                dz2, grads = self._chain_backward(pc2, ["pred"], dp2, grads)
            else:
                dz1, dz2 = dp1, dp2
        # The images need no gradient: the encoder's first layer skips it.
        _, grads = self._chain_backward(c1, trunk, np.asarray(dz1, dtype=self.dtype), grads, need_dx=False)
        _, grads = self._chain_backward(c2, trunk, np.asarray(dz2, dtype=self.dtype), grads, need_dx=False)
        return self._checked(loss), grads, buffers

    def _checked(self, loss) -> float:
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step}")
        return loss

    def train_step(self, x1, x2) -> float:
        """One optimisation step on a batch of view pairs; returns the loss before the update."""
        loss, grads, buffers = self.loss_and_grads(x1, x2)
        lr = self.schedule(self.step) if self.schedule is not None else None
        self.params, self.opt_state = self.optimizer.step(self.params, grads, self.opt_state, lr=lr)
        self.buffers = buffers
        if self.target_params is not None:  # the EMA follows the online optimiser step (BYOL)
            m = self.target_momentum(self.step) if callable(self.target_momentum) else self.target_momentum
            online = {k: self.params[k] for k in self.target_params}
            self.target_params = ema_update(self.target_params, online, momentum=m)
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
                lr = self.schedule(self.step - 1) if self.schedule is not None else self.optimizer.lr
                print(f"step {self.step}/{steps}  loss {losses[-1]:.4f}  lr {lr:.3g}  {seen / el:.1f} pairs/s  "
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

    def reconstruct(self, x, *, batch_size=1024) -> np.ndarray:
        """Evaluation-mode reconstructions dec(enc(x)) (autoencoder mode)."""
        if "dec" not in self.nets:
            raise ValueError("reconstruct needs a decoder (autoencoder mode)")
        x = np.asarray(x, dtype=self.dtype)
        outs = [self._chain_forward(x[i:i + batch_size], ["enc", "dec"], self.buffers, False)[0]
                for i in range(0, len(x), batch_size)]
        return np.concatenate(outs, axis=0)

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, path) -> None:
        """Parameters, target network, buffers, optimiser state and step to ``path`` (atomic ``.npz``)."""
        arrays = {"step": np.asarray(self.step, dtype=np.int64), "seed": np.asarray(self.seed)}
        arrays.update({f"params/{k}": v for k, v in self.params.items()})
        arrays.update({f"buffers/{k}": v for k, v in self.buffers.items()})
        arrays.update({f"opt/{k}": v for k, v in self.opt_state.items()})
        arrays.update({f"target/{k}": v for k, v in (self.target_params or {}).items()})
        nnio.save_npz(path, arrays)

    def load_checkpoint(self, path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` for the same networks and optimiser.

        Every array must match this trainer's in name, shape and dtype (a float64 checkpoint does not
        load into a float32 trainer: construct the trainer with the checkpoint's ``dtype``), and the
        file must hold the step counter; otherwise a ValueError names the mismatch and nothing changes.
        """
        z = nnio.load_npz(path)
        if "step" not in z:
            raise ValueError(f"checkpoint {path} has no 'step' entry: not written by Trainer.save_checkpoint "
                             f"(keys: {', '.join(sorted(z)[:5])}{', ...' if len(z) > 5 else ''})")
        step = z["step"]
        if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
            raise ValueError(f"checkpoint {path}: 'step' must be a non-negative integer scalar, got dtype "
                             f"{step.dtype} and shape {step.shape}")
        params = {k[7:]: v for k, v in z.items() if k.startswith("params/")}
        buffers = {k[8:]: v for k, v in z.items() if k.startswith("buffers/")}
        opt = {k[4:]: v for k, v in z.items() if k.startswith("opt/")}
        target = {k[7:]: v for k, v in z.items() if k.startswith("target/")}
        for what, new, old in (("params", params, self.params), ("buffers", buffers, self.buffers),
                               ("optimizer state", opt, self.opt_state),
                               ("target network", target, self.target_params or {})):
            if set(new) != set(old) or any(new[k].shape != np.shape(old[k]) for k in old):
                raise ValueError(f"checkpoint {path}: {what} do not match this trainer's networks "
                                 f"and optimiser")
            for k in sorted(old):
                want = np.asarray(old[k]).dtype
                if new[k].dtype != want:
                    raise ValueError(f"checkpoint {path}: {what} entry {k!r} has dtype {new[k].dtype}, this "
                                     f"trainer uses {want} (construct the Trainer with dtype={new[k].dtype})")
        self.params, self.buffers, self.opt_state = params, buffers, opt
        if self.target_params is not None:
            self.target_params = target
        self.step = int(step)
