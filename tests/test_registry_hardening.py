"""Walk the registry: every form of bad input is rejected with an error that names the argument.

Complements tests/test_registry_validation.py (integer/bool arrays, NaN/inf entries, empty batch,
non-positive Python-float hyperparameters) with the forms an adversarial caller uses:

* hyperparameters as numpy scalars and 0-d arrays (NaN, inf, out of range), strings, bools, 1-d arrays;
  the hyperparameters are the op's ``hyper_ranges`` plus every float keyword default of its forward;
* ``grad_out`` that is None, a string, a bool, non-finite, of the wrong shape, with an extra leading
  axis, a scalar or a row where an array is due, an integer/bool array, an ndarray subclass;
* ndarray subclasses (masked arrays, matrices) and 0-d arrays for the array inputs;
* an empty axis anywhere, and extreme hyperparameter values: either a clear error or a finite result.

New ops are covered automatically: the cases are generated from ``registry.names()``.
"""

import inspect
import math
import warnings

import numpy as np
import pytest

from refssl import registry

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")

ALL_OPS = registry.names()
BAD = (TypeError, ValueError)


def _example(op, seed=0, dtype=np.float64):
    return op.example(np.random.default_rng(seed), dtype)


def _float_inputs(op):
    """(position, parameter name) of the non-empty float array inputs of the op's example."""
    args, _ = _example(op)
    params = list(inspect.signature(op.forward).parameters)
    return [(k, params[k]) for k, a in enumerate(args)
            if isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.size > 0]


# ------------------------------------------------------------------------------------ hyperparameters


def _hypers(op):
    """{name: lowest admissible value or None}: hyper_ranges, plus float keyword defaults of forward."""
    out = {key: r.low for key, r in op.hyper_ranges.items()}
    for key, p in inspect.signature(op.forward).parameters.items():
        if (p.kind is p.KEYWORD_ONLY and key not in out and isinstance(p.default, float)
                and not isinstance(p.default, bool)):
            # a float default without a registered range: assumed positive when the default is
            # (register a Range with low <= 0 for a hyperparameter that may be zero or negative)
            out[key] = math.ulp(0.0) if p.default > 0 else None
    return out


HYPERS = [(name, key, low) for name in ALL_OPS for key, low in _hypers(registry.get(name)).items()]

FORMS = {
    "np.float64": np.float64,
    "np.float32": np.float32,
    "0-d float64": lambda v: np.asarray(v, dtype=np.float64),
    "0-d float32": lambda v: np.asarray(v, dtype=np.float32),
}


def test_every_op_with_hyperparameters_is_covered():
    assert {"info_nce", "vicreg", "icon", "l2_normalize", "student_t_kernel"} <= {n for n, _, _ in HYPERS}


def _bad_values(low):
    vals = [np.nan, np.inf, -np.inf]
    if low is not None:
        vals.append(-1.0)
        if low > 0:
            vals.append(0.0)
    return vals


HYPER_VALUE_CASES = [(name, key, v) for name, key, low in HYPERS for v in _bad_values(low)]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name,key,value", HYPER_VALUE_CASES)
def test_bad_hyperparameter_in_numpy_form_is_a_value_error(name, key, value, form):
    op = registry.get(name)
    args, kwargs = _example(op)
    kwargs[key] = FORMS[form](value)
    with pytest.raises(ValueError, match=key):
        op.forward(*args, **kwargs)


@pytest.mark.parametrize("name,key,value", [(n, k, v) for n, k, v in HYPER_VALUE_CASES if v in (0.0, -1.0)])
def test_bad_hyperparameter_as_integer_forms_is_a_value_error(name, key, value):
    op = registry.get(name)
    args, kwargs = _example(op)
    for bad in (int(value), np.int64(value), np.asarray(int(value))):
        kwargs[key] = bad
        with pytest.raises(ValueError, match=key):
            op.forward(*args, **kwargs)


@pytest.mark.parametrize("bad", ["1.0", True, np.bool_(False), np.ones(2), np.asarray(1.0 + 0j),
                                 np.ma.masked_array(0.5)], ids=repr)
@pytest.mark.parametrize("name,key", [(n, k) for n, k, _ in HYPERS])
def test_non_number_hyperparameter_is_a_type_error(name, key, bad):
    op = registry.get(name)
    args, kwargs = _example(op)
    kwargs[key] = bad
    with pytest.raises(TypeError, match=key):
        op.forward(*args, **kwargs)


@pytest.mark.parametrize("name,key,low", HYPERS)
def test_valid_hyperparameter_in_every_form_gives_the_same_result(name, key, low):
    op = registry.get(name)
    args, kwargs = _example(op)
    value = float(kwargs.get(key, op.hyper_ranges[key].high if key in op.hyper_ranges else 0.5))
    if key in op.hyper_ranges:
        value = min(max(value, op.hyper_ranges[key].low), op.hyper_ranges[key].high)
    ref = op(*args, **{**kwargs, key: value})
    for form in (np.float64, lambda v: np.asarray(v)):
        np.testing.assert_array_equal(op(*args, **{**kwargs, key: form(value)}), ref)


BOOL_FLAGS = [(name, key) for name in ALL_OPS
              for key, p in inspect.signature(registry.get(name).forward).parameters.items()
              if isinstance(p.default, bool)]


def test_bool_flags_are_discovered():
    assert {("icon", "mask_diagonal"), ("icon", "learn_p"), ("info_nce", "normalize")} <= set(BOOL_FLAGS)


@pytest.mark.parametrize("bad", ["False", "yes", None, 0, 1, np.asarray(True), np.ones(1, dtype=bool)], ids=repr)
@pytest.mark.parametrize("name,key", BOOL_FLAGS)
def test_bool_flag_rejects_anything_but_a_bool(name, key, bad):
    op = registry.get(name)
    args, kwargs = _example(op)
    kwargs[key] = bad
    with pytest.raises(TypeError, match=key):
        op.forward(*args, **kwargs)


@pytest.mark.parametrize("name,key", BOOL_FLAGS)
def test_bool_flag_accepts_numpy_bool(name, key):
    op = registry.get(name)
    args, kwargs = _example(op)
    value = kwargs.get(key, inspect.signature(op.forward).parameters[key].default)
    np.testing.assert_array_equal(op(*args, **{**kwargs, key: np.bool_(value)}),
                                  op(*args, **{**kwargs, key: bool(value)}))


# ------------------------------------------------------------------------------------------- grad_out


def _bad_grad_outs(out):
    """(label, value) pairs that every backward must reject for an output like ``out``."""
    shape = np.shape(out)
    g = np.ones(shape)
    cases = [("None", None), ("string", "1.0"), ("bool", True), ("numpy bool", np.bool_(True)),
             ("nan", np.full(shape, np.nan)), ("inf", np.full(shape, np.inf)),
             ("too big for float32", np.full(shape, 1e300)),
             ("extra leading axis", g[None]), ("int array", np.ones(shape, dtype=np.int64)),
             ("bool array", np.ones(shape, dtype=bool)), ("complex", np.ones(shape, dtype=complex)),
             ("object", np.full(shape, 1.0, dtype=object)), ("list", np.ones(shape or 1).tolist()),
             ("masked", np.ma.masked_array(g))]
    if shape == ():
        cases += [("shape (1,)", np.ones(1)), ("shape (2,)", np.ones(2)), ("numpy int", np.int64(1))]
    else:
        cases += [("Python float for an array", 1.0), ("0-d array for an array", np.asarray(1.0)),
                  ("one entry more", np.ones(shape[:-1] + (shape[-1] + 1,))),
                  ("flattened", np.ones(g.size + (g.ndim == 1)))]
        if len(shape) >= 2:
            with warnings.catch_warnings():  # np.matrix is pending deprecation: exactly why it is rejected
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                matrix = np.asmatrix(np.ones(shape[:2])) if len(shape) == 2 else np.ones(1)
            cases += [("a row to broadcast", np.ones(shape[-1])), ("transposed", np.ones(shape[::-1])
                                                                    if shape[0] != shape[-1] else g[:, :1]),
                      ("matrix", matrix)]
    return cases


def _grad_cases():
    for name in ALL_OPS:
        op = registry.get(name)
        args, kwargs = _example(op, dtype=np.float32)
        out, _ = op.forward(*args, **kwargs)
        for label, _value in _bad_grad_outs(out):
            yield name, label


@pytest.mark.parametrize("name,label", list(_grad_cases()))
def test_bad_grad_out_is_rejected_naming_it(name, label):
    op = registry.get(name)
    args, kwargs = _example(op, dtype=np.float32)
    out, cache = op.forward(*args, **kwargs)
    bad = dict(_bad_grad_outs(out))[label]
    with pytest.raises(BAD, match="grad_out"):
        op.backward(cache, bad)


@pytest.mark.parametrize("name", ALL_OPS)
def test_grad_out_forms_accepted(name):
    """Scalar losses take a Python float or int, a numpy float scalar or a 0-d array; every op takes a
    float array of the output's shape in either float dtype (cast to the op's dtype)."""
    op = registry.get(name)
    args, kwargs = _example(op, dtype=np.float32)
    out, cache = op.forward(*args, **kwargs)
    g = np.random.default_rng(1).standard_normal(np.shape(out)).astype(np.float32)
    ref = op.backward(cache, g)
    if np.ndim(out) == 0:
        forms = [float(g), g[()], np.float64(g), np.asarray(g, dtype=np.float64)]
        assert all(np.array_equal(a, b) for a, b in zip(op.backward(cache, 1), op.backward(cache, 1.0))
                   if a is not None)
    else:
        read_only = g.copy()
        read_only.setflags(write=False)
        forms = [g.astype(np.float64), np.asfortranarray(g), read_only]
    for form in forms:
        for a, b in zip(op.backward(cache, form), ref):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == np.float32
                np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------- array inputs


INPUT_CASES = [(name, k, pname) for name in ALL_OPS for k, pname in _float_inputs(registry.get(name))]


@pytest.mark.parametrize("kind", ["masked", "masked nan", "matrix", "subclass"])
@pytest.mark.parametrize("name,k,pname", INPUT_CASES)
def test_ndarray_subclass_input_is_a_type_error(name, k, pname, kind):
    op = registry.get(name)
    args, kwargs = _example(op)
    a = args[k]
    if kind == "masked":
        bad = np.ma.masked_array(a)
    elif kind == "masked nan":
        data = a.copy()
        data.flat[0] = np.nan
        mask = np.zeros(a.shape, dtype=bool)
        mask.flat[0] = True
        bad = np.ma.masked_array(data, mask=mask)  # the NaN hides behind the mask
    elif kind == "matrix":
        if a.ndim != 2:
            pytest.skip("np.matrix is 2-d only")
        bad = np.asmatrix(a)
    else:
        class Sub(np.ndarray):
            pass

        bad = a.view(Sub)
    args = list(args)
    args[k] = bad
    with pytest.raises(TypeError, match=pname):
        op.forward(*args, **kwargs)


@pytest.mark.parametrize("name,k,pname", [c for c in INPUT_CASES])
def test_zero_dimensional_input_where_an_array_is_due(name, k, pname):
    op = registry.get(name)
    args, kwargs = _example(op)
    if args[k].ndim == 0:
        pytest.skip("the input is a scalar by definition")
    args = list(args)
    args[k] = np.asarray(args[k].flat[0])
    with pytest.raises(BAD, match=pname):
        op.forward(*args, **kwargs)


def _empty_axis_cases():
    for name, k, pname in INPUT_CASES:
        a = _example(registry.get(name))[0][k]
        for axis in range(a.ndim):
            yield name, k, pname, axis


@pytest.mark.parametrize("name,k,pname,axis", list(_empty_axis_cases()))
def test_empty_axis_is_an_error_or_a_finite_result(name, k, pname, axis):
    """An empty axis anywhere: a clear error, or a finite output with finite, well-shaped gradients."""
    op = registry.get(name)
    args, kwargs = _example(op)
    args = list(args)
    args[k] = np.take(args[k], [], axis=axis)
    try:
        with np.errstate(all="raise"):
            out, cache = op.forward(*args, **kwargs)
    except BAD:
        return
    assert np.all(np.isfinite(out)), out
    with np.errstate(all="raise"):
        grads = op.backward(cache, np.ones(np.shape(out)) if np.ndim(out) else 1.0)
    for a, g in zip(args, grads):
        if g is not None:
            assert g.shape == a.shape and np.all(np.isfinite(g))


@pytest.mark.parametrize("value", [1e300, 1e-300])
@pytest.mark.parametrize("name,key,low", HYPERS)
def test_extreme_hyperparameter_is_an_error_or_a_finite_result(name, key, low, value):
    """Huge or tiny (but valid) hyperparameters: a ValueError naming it, or a finite loss and gradients."""
    op = registry.get(name)
    args, kwargs = _example(op)
    kwargs[key] = value
    for dtype in (np.float64, np.float32):
        cast = [a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args]
        try:
            with np.errstate(all="ignore"):  # intermediate overflow is expected; the result must say so
                out, cache = op.forward(*cast, **kwargs)
        except ValueError as e:
            assert key in str(e)
            continue
        assert np.all(np.isfinite(out)), (dtype, out)
        with np.errstate(all="ignore"):
            grads = op.backward(cache, np.ones(np.shape(out), dtype=dtype) if np.ndim(out) else 1.0)
        for g in grads:
            assert g is None or np.all(np.isfinite(g)), dtype


def _shared_size_cases():
    for name in ALL_OPS:
        args, _ = _example(registry.get(name))
        first = next(a for a in args if isinstance(a, np.ndarray) and a.ndim > 0)
        for size in sorted(set(first.shape)):
            yield name, size


@pytest.mark.parametrize("name,size", list(_shared_size_cases()))
def test_emptying_an_axis_in_every_input_at_once(name, size):
    """Every axis of length ``size`` in every array input emptied together (a consistent empty batch,
    e.g. DINO's student (V, 0, K) with teacher (V_t, 0, K)): a clear error or a finite result."""
    op = registry.get(name)
    args, kwargs = _example(op)
    emptied = []
    for a in args:
        if isinstance(a, np.ndarray):
            a = a[tuple(slice(0, 0) if n == size else slice(None) for n in a.shape)]
        emptied.append(a)
    try:
        with np.errstate(all="raise"):
            out, cache = op.forward(*emptied, **kwargs)
    except BAD:
        return
    assert np.all(np.isfinite(out)), out
    with np.errstate(all="raise"):
        grads = op.backward(cache, np.ones(np.shape(out)) if np.ndim(out) else 1.0)
    for a, g in zip(emptied, grads):
        if g is not None:
            assert g.shape == a.shape and np.all(np.isfinite(g))


def test_dino_with_an_empty_batch_is_a_value_error():
    op = registry.get("dino")
    with pytest.raises(ValueError, match=r"student must have shape \(V_s, N, K\) with N >= 1"):
        op.forward(np.zeros((4, 0, 4)), np.zeros((2, 0, 4)), np.zeros(4))


@pytest.mark.parametrize("name", ["relu", "gelu", "sigmoid", "mse"])
def test_pointwise_ops_reject_0d_input(name):
    op = registry.get(name)
    args = (np.asarray(0.5),) * (2 if name == "mse" else 1)
    with pytest.raises(ValueError, match=r"x must have shape \(N, ...\)"):
        op.forward(*args)
