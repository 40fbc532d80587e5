"""Calling a port: resolving ``MODULE:CALLABLE``, the framework adapters, keyword mapping, arity.

Calling convention (the same for every framework):

* the op's array inputs positionally, in the op's order, as the framework's arrays (float inputs in
  the case's dtype; integer and bool inputs as integer and bool arrays);
* the case's hyperparameters as keywords, renamed by ``name_map`` (``{"temperature": "tau"}``; an
  empty name drops the keyword, for a port that hard-codes it);
* a class is instantiated with the hyperparameters its constructor accepts and then called with the
  arrays (and any remaining hyperparameters);
* gradients: torch autograd of ``sum(out * upstream)``, ``jax.grad`` of the same; a numpy port returns
  ``(value, grads)`` with one gradient per array input (``None`` where none flows) or one per
  differentiable input, or a dict by argument name.  A numpy port of an op with a non-scalar output
  takes the upstream gradient as a keyword ``grad_out`` (and may for scalar outputs; otherwise the
  kit multiplies its scalar-loss gradients by the upstream value).

Inputs the method blocks with a stop-gradient (:data:`refssl.conformance.cases.STOP_GRADIENT`:
target projections, momentum keys, teacher outputs) are tracked as well, so that a port which lets a
gradient reach them is caught (missing ``detach``/``stop_gradient``); a torch port that modifies
such an input in place is retried with only the differentiable inputs tracked.  Other inputs without
a gradient (data, labels, masks, queues, running statistics) are passed untracked.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

__all__ = ["UsageError", "PortOutput", "resolve_port", "Adapter", "adapter", "FRAMEWORKS"]

FRAMEWORKS = ("numpy", "torch", "jax")


class UsageError(ValueError):
    """A problem with how the kit was called (unknown op, unimportable port, wrong arity...)."""


@dataclass
class PortOutput:
    """What a port produced on one case (numpy arrays, float64 copies plus the port's dtypes)."""

    value: np.ndarray | None = None
    value_dtype: str | None = None
    grads: dict = field(default_factory=dict)  # name -> array or None (no gradient reached it)
    grad_dtypes: dict = field(default_factory=dict)
    error: str | None = None  # the port raised: "ValueError: ..."
    notes: list = field(default_factory=list)


def resolve_port(spec):
    """A callable from ``"module:attr"`` (``attr`` may be dotted), ``"path/file.py:attr"`` or a callable."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise UsageError(f"port must be MODULE:CALLABLE (e.g. myports.losses:info_nce), got {spec!r}")
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"port must be MODULE:CALLABLE, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise UsageError(f"cannot import port {spec}: no file {module_name}")
            mod_id = "_refssl_port_" + os.path.splitext(os.path.basename(module_name))[0]
            loader_spec = importlib.util.spec_from_file_location(mod_id, module_name)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_id] = module
            loader_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # a port module in the current folder, as `python -m` finds it
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as e:  # ImportError, SyntaxError, an error at the port's import time
        raise UsageError(f"cannot import port module {module_name!r}: {type(e).__name__}: {_one_line(e)}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"port module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise UsageError(f"port {spec} is not callable (it is a {type(obj).__name__})")
    return obj


def _one_line(e) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""


def _map_hyper(hyper: dict, name_map: dict) -> dict:
    out = {}
    for k, v in hyper.items():
        new = name_map.get(k, k)
        if new:
            out[new] = v
    return out


def _accepts(sig: inspect.Signature | None, name: str) -> bool:
    if sig is None:
        return True
    params = sig.parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return True
    p = params.get(name)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _signature(obj):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _call_signature(obj):
    """The signature a call of ``obj`` binds against (a torch Module's forward, else its own)."""
    if _is_torch_module(obj):
        return _signature(obj.forward)
    return _signature(obj)


def _is_torch_module(obj) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


class Adapter:
    """Runs a port on a case in one framework; subclasses convert arrays and compute gradients."""

    framework = "numpy"

    def __init__(self, port, name_map=None, port_label=None):
        self.port = port
        self.name_map = dict(name_map or {})
        self.label = port_label or getattr(port, "__qualname__", None) or repr(port)
        self.is_class = inspect.isclass(port)

    # -- binding ------------------------------------------------------------------------------------
    def split_hyper(self, hyper: dict) -> tuple[dict, dict]:
        """(constructor keywords, call keywords) after renaming."""
        mapped = _map_hyper(copy.deepcopy(hyper), self.name_map)  # a port may not alter the suite's lists
        if not self.is_class:
            return {}, mapped
        sig = _signature(self.port)
        init = {k: v for k, v in mapped.items() if _accepts(sig, k)}
        return init, {k: v for k, v in mapped.items() if k not in init}

    def extra_call_keywords(self, case) -> dict:
        return {}

    def check_binding(self, case) -> None:
        """UsageError when the port cannot take this case's arrays and keywords (checked before running)."""
        init_kw, call_kw = self.split_hyper(case.hyper)
        call_kw = {**call_kw, **self.extra_call_keywords(case)}
        n = len(case.inputs)
        if self.is_class:
            sig = _signature(self.port)
            if sig is not None:
                try:
                    sig.bind(**init_kw)
                except TypeError as e:
                    raise UsageError(f"port class {self.label} cannot be constructed with {_kw(init_kw)}: "
                                     f"{e}") from None
            try:
                instance = self.port(**init_kw)
            except Exception:  # e.g. it rejects a value: reported as that case's failure when it runs
                return
            target_sig = _call_signature(instance)
        else:
            target_sig = _call_signature(self.port)
        if target_sig is None:
            return
        try:
            target_sig.bind(*range(n), **call_kw)
        except TypeError as e:
            self._binding_error(case, call_kw, e)

    def _binding_error(self, case, call_kw, e):
        names = ", ".join(case.inputs)
        hint = ""
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if m:
            original = next((k for k in case.hyper if self.name_map.get(k, k) == m.group(1)), m.group(1))
            hint = (f"; rename it with --map {original}=PORT_NAME, or drop it with --map {original}= if the port "
                    "hard-codes it")
        raise UsageError(f"port {self.label} cannot be called as the op {case.op} is called: {len(case.inputs)} "
                         f"arrays ({names}) and keywords {_kw(call_kw)}: {e}{hint}") from None

    # -- running ------------------------------------------------------------------------------------
    def run(self, case) -> PortOutput:
        res = PortOutput()
        try:
            self._run(case, res)
        except _Binding as b:
            self._binding_error(case, b.call_kw, b.error)
        except (KeyboardInterrupt, SystemExit, UsageError):
            raise
        except Exception as e:  # the port itself failed on this case: a case failure, not a usage error
            res.error = f"{type(e).__name__}: {_one_line(e)}"
        return res

    def _callable(self, case):
        init_kw, call_kw = self.split_hyper(case.hyper)
        if not self.is_class:
            return self.port, call_kw
        return self.port(**init_kw), call_kw

    def _invoke(self, fn, args, call_kw):
        """Call; a TypeError raised by the binding of this very call (wrong arity) is a usage error."""
        try:
            return fn(*args, **call_kw)
        except TypeError as e:
            if _raised_by_binding(e, fn, len(args), call_kw):
                raise _Binding(call_kw, e) from None
            raise

    def _run(self, case, res):
        raise NotImplementedError


class _Binding(Exception):
    def __init__(self, call_kw, error):
        super().__init__(str(error))
        self.call_kw, self.error = call_kw, error


def _raised_by_binding(e: TypeError, fn, n_args, call_kw) -> bool:
    """Whether ``fn(*args, **call_kw)`` cannot bind (as opposed to a TypeError inside the port)."""
    sig = _call_signature(fn)
    if sig is not None:
        try:
            sig.bind(*range(n_args), **call_kw)
            return False
        except TypeError:
            return True
    tb = e.__traceback__
    return tb is not None and tb.tb_next is None  # raised at the call site itself


def _kw(d: dict) -> str:
    def show(v):
        return f"<array {np.shape(v)}>" if isinstance(v, np.ndarray) else repr(v)

    return "{" + ", ".join(f"{k}={show(v)}" for k, v in d.items()) + "}" if d else "(none)"


# ------------------------------------------------------------------------------------------------ numpy

class NumpyAdapter(Adapter):
    framework = "numpy"

    def _wants_grad_out(self, fn) -> bool:
        sig = _call_signature(fn)
        if sig is None:
            return False
        p = sig.parameters.get("grad_out")
        return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)

    def extra_call_keywords(self, case) -> dict:
        target = self.port if not self.is_class else None
        if target is not None and self._wants_grad_out(target):
            return {"grad_out": case.upstream}
        return {}

    def check_binding(self, case) -> None:
        super().check_binding(case)
        if not self.is_class and np.ndim(case.expected_out) and not self._wants_grad_out(self.port):
            raise UsageError(f"a numpy port of {case.op} (non-scalar output) must accept the upstream gradient as "
                             f"a keyword grad_out and return the gradients of sum(out * grad_out)")

    def _run(self, case, res):
        fn, call_kw = self._callable(case)
        args = [np.array(a, copy=True) for a in case.inputs.values()]  # a port may not modify the suite
        wants = self._wants_grad_out(fn)
        if wants:
            call_kw = {**call_kw, "grad_out": np.array(case.upstream, copy=True)}
        elif np.ndim(case.expected_out):
            raise UsageError(f"a numpy port of {case.op} (non-scalar output) must accept grad_out")
        out = self._invoke(fn, args, call_kw)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("a numpy port must return (value, grads)")
        value, grads = out
        res.value_dtype = _dtype_name(value)
        res.value = np.asarray(value, dtype=np.float64)
        names = list(case.inputs)
        if isinstance(grads, dict):
            by_name = dict(grads)
        else:
            grads = list(grads) if isinstance(grads, (tuple, list)) else [grads]
            if len(grads) == len(names):
                by_name = dict(zip(names, grads))
            elif len(grads) == len(case.differentiable):
                by_name = dict(zip(case.differentiable, grads))
            else:
                raise TypeError(f"the port returned {len(grads)} gradients; expected {len(names)} (one per array "
                                f"input) or {len(case.differentiable)} (one per differentiable input)")
        scale = None if wants else float(np.asarray(case.upstream, dtype=np.float64))
        for name in names:
            g = by_name.get(name)
            if g is None:
                res.grads[name] = None
                continue
            res.grad_dtypes[name] = _dtype_name(g)
            g = np.asarray(g, dtype=np.float64)
            res.grads[name] = g * scale if scale is not None else g


def _dtype_name(x) -> str | None:
    dt = getattr(x, "dtype", None)
    if dt is None:
        return None
    name = str(dt)
    return name.replace("torch.", "")


# ------------------------------------------------------------------------------------------------ torch
# The frameworks are loaded at run time, by name, only when a port of that framework is checked (as
# the port's own module is): refssl itself depends on neither.

class TorchAdapter(Adapter):
    framework = "torch"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.torch = importlib.import_module("torch")

    def _tensors(self, case, track):
        tensors = []
        for name, a in case.inputs.items():
            t = self.torch.from_numpy(np.array(a, copy=True))
            if name in track:
                t.requires_grad_(True)
            tensors.append(t)
        return tensors

    def _forward_backward(self, case, track):
        torch = self.torch
        fn, call_kw = self._callable(case)
        tensors = self._tensors(case, track)
        out = self._invoke(fn, tensors, call_kw)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        tracked = [(n, t) for n, t in zip(case.inputs, tensors) if n in track]
        grads = {}
        if out.requires_grad and tracked:
            up = torch.as_tensor(np.asarray(case.upstream), dtype=out.dtype)
            if up.shape != out.shape:
                raise ValueError(f"output shape {tuple(out.shape)} differs from the op's {tuple(up.shape)}")
            gs = torch.autograd.grad((out * up).sum(), [t for _, t in tracked], allow_unused=True)
            grads = {n: g for (n, _), g in zip(tracked, gs)}
        return out, grads

    def _run(self, case, res):
        track = set(case.differentiable) | set(case.stop_gradient)
        try:
            out, grads = self._forward_backward(case, track)
        except RuntimeError as e:
            if not case.stop_gradient or "grad" not in str(e).lower():
                raise
            # e.g. an in-place update of an input the port does not expect to be tracked: retry as the
            # calling convention has it, with only the differentiable inputs tracked
            out, grads = self._forward_backward(case, set(case.differentiable))
            res.notes.append("stop-gradient inputs could not be tracked (in-place use); not checked")
        res.value_dtype = _dtype_name(out)
        res.value = out.detach().to(self.torch.float64).cpu().numpy()
        for name in case.inputs:
            g = grads.get(name)
            if g is None:
                res.grads[name] = None
            else:
                res.grad_dtypes[name] = _dtype_name(g)
                res.grads[name] = g.detach().to(self.torch.float64).cpu().numpy()


# -------------------------------------------------------------------------------------------------- jax

class JaxAdapter(Adapter):
    framework = "jax"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.jax = importlib.import_module("jax")
        self.jnp = importlib.import_module("jax.numpy")
        self.jax.config.update("jax_enable_x64", True)  # float64 cases stay float64

    def _run(self, case, res):
        jax, jnp = self.jax, self.jnp
        fn, call_kw = self._callable(case)
        names = list(case.inputs)
        arrays = [jnp.asarray(a) for a in case.inputs.values()]
        track = [k for k, n in enumerate(names) if n in case.differentiable or n in case.stop_gradient]
        up = jnp.asarray(np.asarray(case.upstream))
        self._invoke(fn, arrays, call_kw)  # binding errors surface here, outside of tracing

        def weighted(*tracked):
            full = list(arrays)
            for k, t in zip(track, tracked):
                full[k] = t
            out = fn(*full, **call_kw)
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = jnp.asarray(out)
            return jnp.sum(out * up.astype(out.dtype)), out

        (_, out), gs = jax.value_and_grad(weighted, argnums=tuple(range(len(track))), has_aux=True)(
            *[arrays[k] for k in track])
        res.value_dtype = str(out.dtype)
        res.value = np.asarray(out, dtype=np.float64)
        grads = {names[k]: g for k, g in zip(track, gs)}
        for name in names:
            g = grads.get(name)
            if g is None:
                res.grads[name] = None
            else:
                res.grad_dtypes[name] = str(g.dtype)
                res.grads[name] = np.asarray(g, dtype=np.float64)


_ADAPTERS = {"numpy": NumpyAdapter, "torch": TorchAdapter, "jax": JaxAdapter}


def adapter(framework: str, port, name_map=None, port_label=None) -> Adapter:
    """The adapter for ``framework``; UsageError when it is unknown or not installed."""
    if framework not in _ADAPTERS:
        raise UsageError(f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}")
    if framework != "numpy" and importlib.util.find_spec(framework) is None:
        raise UsageError(f"framework {framework} is not installed (pip install {framework})")
    try:
        return _ADAPTERS[framework](port, name_map, port_label)
    except ImportError as e:
        raise UsageError(f"framework {framework} cannot be imported: {_one_line(e)}") from None
