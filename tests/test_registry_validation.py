"""Walk the registry: every op rejects bad input with an error that names the argument.

Integer/boolean arrays where floats are needed -> TypeError; NaN/inf, an
empty batch, or a non-positive value of a positive hyperparameter ->
ValueError.  Shape mismatches are op-specific and tested with each op.
"""

import inspect

import numpy as np
import pytest

from refssl import registry

ALL_OPS = registry.names()


def _float_inputs(op):
    args, kwargs = op.example(np.random.default_rng(0), np.float64)
    params = list(inspect.signature(op.forward).parameters)
    out = [(k, params[k]) for k, a in enumerate(args)
           if isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.size > 0]
    return args, kwargs, out


def _cases():
    for name in ALL_OPS:
        _, _, floats = _float_inputs(registry.get(name))
        for k, pname in floats:
            yield name, k, pname


CASES = list(_cases())


@pytest.mark.parametrize("name,k,pname", CASES)
@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_integer_or_bool_input_is_a_type_error(name, k, pname, dtype):
    op = registry.get(name)
    args, kwargs, _ = _float_inputs(op)
    bad = list(args)
    bad[k] = np.ones(args[k].shape, dtype=dtype)
    with pytest.raises(TypeError, match=pname):
        op.forward(*bad, **kwargs)


@pytest.mark.parametrize("name,k,pname", CASES)
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_input_is_a_value_error(name, k, pname, value):
    op = registry.get(name)
    args, kwargs, _ = _float_inputs(op)
    bad = list(args)
    bad[k] = args[k].copy()
    bad[k].flat[0] = value
    with pytest.raises(ValueError, match=pname):
        op.forward(*bad, **kwargs)


@pytest.mark.parametrize("name,k,pname", CASES)
def test_empty_batch_is_a_value_error(name, k, pname):
    op = registry.get(name)
    args, kwargs, _ = _float_inputs(op)
    if args[k].ndim == 0:
        pytest.skip("scalar input has no batch axis")
    bad = list(args)
    bad[k] = args[k][:0]
    with pytest.raises(ValueError):
        op.forward(*bad, **kwargs)


HYPER = [(n, key) for n in ALL_OPS for key in registry.get(n).hyper_ranges
         if registry.get(n).hyper_ranges[key].low > 0]


@pytest.mark.parametrize("name,key", HYPER)
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_non_positive_hyperparameter_is_a_value_error(name, key, value):
    op = registry.get(name)
    args, kwargs = op.example(np.random.default_rng(0), np.float64)
    kwargs[key] = value
    with pytest.raises(ValueError, match=key):
        op.forward(*args, **kwargs)
