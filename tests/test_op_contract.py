"""Walk the registry: dtype preservation, no input mutation, float32 ~ float64, derivation files exist."""

import pathlib

import numpy as np
import pytest

from refssl import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALL_OPS = registry.names()


def _cast(args, dtype):
    return tuple(a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args)


def _upstream(out, rng):
    return rng.standard_normal(np.shape(out)).astype(np.asarray(out).dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ALL_OPS)
def test_dtype_kept_and_inputs_untouched(name, dtype):
    op = registry.get(name)
    rng = np.random.default_rng(7)
    args, kwargs = op.example(rng, dtype)
    before = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out, cache = op.forward(*args, **kwargs)
        grads = op.backward(cache, _upstream(out, rng))
    assert np.asarray(out).dtype == dtype
    assert np.all(np.isfinite(out))
    for k, (a, g) in enumerate(zip(args, grads)):
        if k in op.differentiable:
            assert g.dtype == a.dtype and g.shape == a.shape, (k, g.dtype, g.shape)
            assert np.all(np.isfinite(g))
        else:
            assert g is None
    for a, b in zip(args, before):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ALL_OPS)
def test_float32_matches_float64(name):
    op = registry.get(name)
    args, kwargs = op.example(np.random.default_rng(3), np.float64)
    out64, c64 = op.forward(*args, **kwargs)
    out32, c32 = op.forward(*_cast(args, np.float32), **kwargs)
    np.testing.assert_allclose(np.asarray(out32, dtype=np.float64), out64, rtol=2e-4, atol=2e-5)
    g = _upstream(out64, np.random.default_rng(4))
    for g64, g32 in zip(op.backward(c64, g), op.backward(c32, g.astype(np.float32))):
        if g64 is not None:
            scale = max(1.0, float(np.max(np.abs(g64))))
            np.testing.assert_allclose(g32.astype(np.float64) / scale, g64 / scale, atol=5e-4)


@pytest.mark.parametrize("name", ALL_OPS)
def test_derivation_file_exists(name):
    path = registry.get(name).derivation.split("#")[0]
    assert (ROOT / path).is_file(), path
