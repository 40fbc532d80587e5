"""The PyTorch port of every registered op (``ports/torch/losses.py``) against refssl itself.

For every op in ``OPS``, on the registered example (``op.example(rng, dtype)``) for several seeds, in
float64 and float32: the port's output and torch autograd of ``sum(out * g)`` for every differentiable
input are compared with refssl's forward and ``backward(cache, g)`` for the same random upstream ``g``.
The two are independent implementations (autograd of formulas written from the docstrings vs hand-written
chain rules), so a convention slip (scale, eps, view order, which input is stop-gradient) shows up here.

Tolerances, per compared array ``a`` (the value, or the gradient of one input), with ``ref64`` refssl's
float64 result on the same inputs (for float32, the float32 inputs cast up), ``scale = max(max|ref64|,
FLOOR * case)`` and ``case`` the largest magnitude among the inputs, the upstream and every ref64 array
of the case (FLOOR = 1e-2: an array far below the rest of its case, e.g. an exactly-zero gradient or one
that is small by cancellation, is compared at the resolution of the case, not of its own roundoff):

* float64: ``max|port - ref| <= RTOL64 * scale``, RTOL64 = 1e-9.
* float32: ``max|port - ref32| <= RTOL32 * scale + 4 * max|ref32 - ref64|``, RTOL32 = 1e-4 (about 840
  float32 ulps of the scale) plus four times refssl's own float32 error on this case: an ill-conditioned
  case (cancellation inside a normalisation layer, the logit-scale gradient of CLIP) costs any float32
  implementation that much, and the float64 comparison already pins the function itself.

Measured on seeds 0-99 (tests/test_torch_port.py runs 0-4): worst float64 error 8.5e-13 * scale (CLIP's
logit-scale gradient), worst float32 0.21 of its tolerance (l2_normalize at D = 1, a gradient that is
exactly zero).  A deliberately wrong port (x2 scale) fails on the value and on every gradient.
"""

import numpy as np
import pytest

from refssl import registry

try:
    import torch
except ImportError:  # the port is optional: refssl itself never needs torch
    torch = None

pytestmark = pytest.mark.skipif(
    torch is None, reason="torch is not importable; the PyTorch port check needs it (pip install -e .[torch])")

RTOL64 = 1e-9
RTOL32 = 1e-4
REF_ERR_FACTOR = 4.0
FLOOR = 1e-2
SEEDS = range(5)


def _ops():
    if torch is None:
        return {}
    from ports.torch.losses import OPS
    return OPS


def _tensor(a, grad):
    if not isinstance(a, np.ndarray):
        return a  # None (an absent optional array input)
    return torch.tensor(a).requires_grad_(grad)


def _maxabs(a):
    a = np.asarray(a, dtype=np.float64)
    return float(np.max(np.abs(a))) if a.size else 0.0


def _run_port(fn, op, args, kwargs, g, grad_positions):
    ts = [_tensor(a, i in grad_positions) for i, a in enumerate(args)]
    out = fn(*ts, **kwargs)
    assert isinstance(out, torch.Tensor), f"{op.name}: the port returned {type(out).__name__}, not a tensor"
    (out * torch.tensor(g)).sum().backward()
    return out, ts


def compare(name, fn, seed, dtype):
    """Run refssl and the port ``fn`` on the example of ``name``; return (rows, failures).

    rows: (label, max abs error, tolerance) for the value and every differentiable input's gradient.
    """
    op = registry.get(name)
    rng = np.random.default_rng(seed)
    args, kwargs = op.example(rng, dtype)
    out, cache = op.forward(*args, **kwargs)
    g = np.asarray(rng.standard_normal(np.shape(out)), dtype=dtype)
    grads = op.backward(cache, g)

    args64 = tuple(a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args)
    out64, cache64 = op.forward(*args64, **kwargs)
    grads64 = op.backward(cache64, g.astype(np.float64))

    pout, ts = _run_port(fn, op, args, kwargs, g, op.differentiable)
    expect_dtype = torch.float64 if dtype == np.float64 else torch.float32
    assert pout.dtype == expect_dtype, f"{name}: port output {pout.dtype} for {np.dtype(dtype).name} input"
    assert tuple(pout.shape) == np.shape(out), f"{name}: port output shape {tuple(pout.shape)} vs {np.shape(out)}"

    labels = ["value"] + [f"grad[{i}]" for i in op.differentiable]
    ours = [pout.detach().numpy()]
    for i in op.differentiable:
        assert ts[i].grad is not None, f"{name}: the port gives no gradient to differentiable input {i}"
        ours.append(ts[i].grad.numpy())
    ref = [np.asarray(out)] + [grads[i] for i in op.differentiable]
    ref64 = [np.asarray(out64)] + [grads64[i] for i in op.differentiable]
    case = max([_maxabs(r) for r in ref64] + [_maxabs(g)]
               + [_maxabs(a) for a in args64 if isinstance(a, np.ndarray) and a.dtype.kind == "f"])

    rows, failures = [], []
    for label, p, r, r64 in zip(labels, ours, ref, ref64):
        assert p.shape == np.shape(r), f"{name} {label}: shape {p.shape} vs {np.shape(r)}"
        err = _maxabs(p.astype(np.float64) - r)
        scale = max(_maxabs(r64), FLOOR * case)
        if dtype == np.float64:
            tol = RTOL64 * scale
        else:
            tol = RTOL32 * scale + REF_ERR_FACTOR * _maxabs(np.asarray(r, dtype=np.float64) - r64)
        rows.append((label, err, tol))
        if not err <= tol:  # NaN fails too
            failures.append(f"{name} seed {seed} {np.dtype(dtype).name} {label}: max abs error {err:.3e} > "
                            f"tolerance {tol:.3e} (scale {scale:.3e})")
    return rows, failures


def test_every_registered_op_is_ported_under_its_name():
    ops = _ops()
    assert sorted(ops) == registry.names()
    for name, fn in ops.items():
        assert fn.__name__ == name and (fn.__doc__ or "").strip(), name


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", registry.names())
def test_port_matches_refssl(name, dtype):
    fn = _ops()[name]
    failures = []
    for seed in SEEDS:
        failures += compare(name, fn, seed, dtype)[1]
    assert not failures, "\n".join(failures)


def test_stop_gradient_inputs_get_no_gradient():
    """Float inputs whose refssl gradient slot is None (targets, keys, queues, banks, centers, codebooks,
    buffers, constant targets) are detached inside the port: even when passed with requires_grad they
    receive no gradient, so the port never needs one."""
    checked, wrong = [], []
    for name, fn in _ops().items():
        op = registry.get(name)
        args, kwargs = op.example(np.random.default_rng(1))
        out, cache = op.forward(*args, **kwargs)
        none_slots = [i for i, gr in enumerate(op.backward(cache, np.ones(np.shape(out))))
                      if gr is None and isinstance(args[i], np.ndarray) and args[i].dtype.kind == "f"]
        if not none_slots:
            continue
        ts = [_tensor(a, i in op.differentiable or i in none_slots) for i, a in enumerate(args)]
        fn(*ts, **kwargs).sum().backward()
        checked.append(name)
        wrong += [f"{name}: input {i}" for i in none_slots if ts[i].grad is not None]
    assert not wrong, f"stop-gradient in refssl but given a gradient by the port: {wrong}"
    # the ops with such inputs: teacher-student targets, queues, banks, buffers, constant targets
    assert {"byol", "moco_queue", "dino", "mean_shift", "vector_quantize", "batch_norm_eval"} <= set(checked)


@pytest.mark.parametrize("name", ["info_nce", "clip", "supcon", "barlow_twins", "vicreg", "moco_v3", "dino",
                                  "mae_loss", "linear"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_a_port_with_twice_the_scale_fails(name, dtype):
    """The comparison can fail: the port multiplied by 2 (the official-NT-Xent kind of slip) is rejected
    on the value and on every gradient, while the port itself passes on the same case."""
    fn = _ops()[name]

    def doubled(*args, **kwargs):
        return 2 * fn(*args, **kwargs)

    rows, failures = compare(name, doubled, 0, dtype)
    assert len(failures) == len(rows), rows
    assert not compare(name, fn, 0, dtype)[1]
