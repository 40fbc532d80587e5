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

Measured on the examples of seeds 0-99 (the test runs 0-4, and 0-2 of each variant): worst float64
error 8.5e-13 * scale (CLIP's logit-scale gradient); worst float32 |port - ref32| 1.1e-4 * scale
(layer_norm's input gradient, where refssl's own float32 error is 8.3e-4 * scale), at most 0.21 of the
float32 tolerance (l2_normalize at D = 1, a gradient that is exactly zero).  A deliberately wrong port
(x2 scale) fails on the value and on every gradient.

When the conformance kit (``refssl.conformance``) is in the checkout, the port also runs through every
op's spec suite with the kit's own tolerances, and the kit must name the official SimCLR scale of a
doubled NT-Xent port; without the kit those two tests skip with that reason.
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


def compare(name, fn, seed, dtype, update=None, transform=None, extra_grads=()):
    """Run refssl and the port ``fn`` on the example of ``name``; return (rows, failures).

    ``update`` overrides hyperparameters of the example, ``transform(args)`` changes its arrays,
    ``extra_grads`` adds input positions to compare beyond ``op.differentiable`` (icon's learn_p).
    rows: (label, max abs error, tolerance) for the value and every differentiable input's gradient.
    """
    op = registry.get(name)
    rng = np.random.default_rng(seed)
    args, kwargs = op.example(rng, dtype)
    kwargs = {**kwargs, **(update or {})}
    if transform is not None:
        args = tuple(transform(list(args)))
    # an optional input set to None (a bias, a key mask) has no gradient slot to compare
    positions = tuple(i for i in tuple(op.differentiable) + tuple(extra_grads) if args[i] is not None)
    out, cache = op.forward(*args, **kwargs)
    g = np.asarray(rng.standard_normal(np.shape(out)), dtype=dtype)
    grads = op.backward(cache, g)

    args64 = tuple(a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args)
    out64, cache64 = op.forward(*args64, **kwargs)
    grads64 = op.backward(cache64, g.astype(np.float64))

    pout, ts = _run_port(fn, op, args, kwargs, g, positions)
    expect_dtype = torch.float64 if dtype == np.float64 else torch.float32
    assert pout.dtype == expect_dtype, f"{name}: port output {pout.dtype} for {np.dtype(dtype).name} input"
    assert tuple(pout.shape) == np.shape(out), f"{name}: port output shape {tuple(pout.shape)} vs {np.shape(out)}"

    labels = ["value"] + [f"grad[{i}]" for i in positions]
    ours = [pout.detach().numpy()]
    for i in positions:
        assert ts[i].grad is not None, f"{name}: the port gives no gradient to differentiable input {i}"
        ours.append(ts[i].grad.numpy())
    ref = [np.asarray(out)] + [grads[i] for i in positions]
    ref64 = [np.asarray(out64)] + [grads64[i] for i in positions]
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


def _set(i, value):
    def transform(args):
        args[i] = value(args[i]) if callable(value) else value
        return args
    return transform


def _supcon_rows(args):
    # the (M, D) form with per-row labels: view 0 of each sample, labels with repeats kept
    return [args[0][:, 0, :], args[1]]


# hyperparameters and input forms that the registered examples do not (always) draw
VARIANTS = [
    ("info_nce", {"normalize": False, "temperature": 0.5}, None),
    ("info_nce", {"temperature": 0.05}, None),
    ("debiased_info_nce", {"tau_plus": 0.0}, None),
    ("debiased_info_nce", {"tau_plus": 0.3, "temperature": 0.2}, None),
    ("supcon", {"base_temperature": 0.07}, None),
    ("supcon", {}, _supcon_rows),
    ("supcon_in", {"base_temperature": 0.07, "temperature": 0.2}, None),
    ("supcon_in", {}, _supcon_rows),
    ("icon", {"alpha_q": 0.2}, None),
    ("icon", {"alpha": 0.0}, None),
    ("hsic", {"kernel": "linear", "sigma": None}, None),
    ("hsic", {"kernel": "gaussian", "sigma": None}, None),
    ("vicreg", {"batch_size": 32, "sim_coeff": 10.0, "std_coeff": 5.0, "cov_coeff": 2.0}, None),
    ("barlow_twins", {"lambd": 0.5, "eps": 1e-3}, None),
    ("barlow_twins_hsic", {"normalization": "tsai"}, None),
    ("barlow_twins_hsic", {"normalization": "batchnorm"}, None),
    ("gaussian_ib", {"beta": 4.0, "eps": 1e-3, "standardize_views": False}, None),
    ("student_t_kernel", {"gamma": 2.0, "nu": 0.5}, None),
    ("gaussian_kernel", {"sigma": 0.5, "metric": "cosine"}, None),
    ("alignment", {"alpha": 1}, None),
    ("alignment", {"alpha": 3}, None),
    ("uniformity", {"t": 0.5}, None),
    ("moco_v3", {"temperature": 0.2}, None),
    ("moco_queue", {"temperature": 0.07}, None),
    ("nnclr", {"temperature": 0.5}, None),
    ("dino", {"student_temp": 0.2, "teacher_temp": 0.07}, _set(2, lambda c: c.reshape(-1))),
    ("mean_shift", {"k": 1}, None),
    ("sne", {"kernel": "gaussian"}, None),
    ("sne", {"kernel": "cauchy"}, None),
    ("mae_loss", {"norm_pix": False}, _set(2, lambda m: m.astype(np.float64))),
    ("mae_loss", {"norm_pix": True}, None),
    ("linear", {}, _set(2, None)),
    ("layer_norm", {}, _set(1, None)),
    ("layer_norm", {}, _set(2, None)),
    ("layer_norm", {}, lambda args: _set(2, None)(_set(1, None)(args))),
    ("conv2d", {}, _set(2, None)),
    ("conv_transpose2d", {}, _set(2, None)),
    ("scaled_dot_product_attention", {}, _set(3, None)),
    ("multi_head_attention", {}, _set(5, None)),
    ("multi_head_attention", {}, _set(2, None)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name, update, transform", VARIANTS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(VARIANTS)])
def test_port_matches_refssl_on_variants(name, update, transform, dtype):
    fn = _ops()[name]

    def cast(args):  # keep float inputs in the dtype under test after a transform
        args = transform(args) if transform is not None else args
        return [a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args]

    failures = []
    for seed in range(3):
        failures += compare(name, fn, seed, dtype, update, cast)[1]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_icon_learned_p_gets_refssls_gradient(dtype):
    """With learn_p=True the supervisory p is a parameter: the port's autograd gradient for it matches refssl's."""
    failures = []
    for seed in range(3):
        failures += compare("icon", _ops()["icon"], seed, dtype, {"learn_p": True}, extra_grads=(0,))[1]
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


def _kit_check():
    try:
        from refssl.conformance import check
    except ImportError:
        return None
    return check


needs_kit = pytest.mark.skipif(
    _kit_check() is None, reason="refssl.conformance (the conformance kit) is not in this checkout")


@needs_kit
def test_port_passes_the_conformance_kit():
    """Every op's spec suite (example + its family's edge cases, float64 and float32, the kit's own
    tolerances) through ``refssl.conformance.check`` with ``framework="torch"``."""
    check = _kit_check()
    failing = []
    for name, fn in _ops().items():
        report = check(name, fn, framework="torch")
        if not report.ok:
            failing.append(str(report))
    assert not failing, "\n\n".join(failing)


@needs_kit
def test_kit_names_the_official_simclr_scale_of_a_doubled_port():
    fn = _ops()["info_nce"]

    def nt_xent_official(z1, z2, temperature=0.1):
        return 2 * fn(z1, z2, temperature=temperature)

    report = _kit_check()("info_nce", nt_xent_official, framework="torch")
    assert not report.ok
    assert "official SimCLR NT-Xent scale" in str(report)
