"""Walk the registry: every op's backward against finite differences, on hypothesis inputs.

A newly registered op is covered here without writing a new test.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refssl import registry

from .helpers import assert_gradients, draw_hyper, seeds

ALL_OPS = registry.names()


@pytest.mark.parametrize("name", ALL_OPS)
@given(seed=seeds, data=st.data())
def test_backward_matches_central_differences(name, seed, data):
    """Full vector-Jacobian check (float64, h=1e-6) with a random upstream gradient."""
    op = registry.get(name)
    rng = np.random.default_rng(seed)
    args, kwargs = op.example(rng, np.float64)
    kwargs.update(draw_hyper(data, op))
    assert_gradients(op, args, kwargs, rng=rng)


@pytest.mark.parametrize("name", ALL_OPS)
def test_fast_mode_agrees_on_example(name):
    """The random-direction (v^T J u) mode on the same examples also passes."""
    op = registry.get(name)
    rng = np.random.default_rng(1234)
    args, kwargs = op.example(rng, np.float64)
    assert_gradients(op, args, kwargs, rng=rng, full_max_size=0, n_directions=6)


@pytest.mark.parametrize("name", ALL_OPS)
def test_registry_metadata(name):
    op = registry.get(name)
    assert op.name == name
    assert op.reference.strip()
    assert op.derivation.startswith("derivations/") and ".md" in op.derivation
    assert (op.forward.__doc__ or "").strip()
    args, kwargs = op.example(np.random.default_rng(0), np.float64)
    assert isinstance(args, tuple) and isinstance(kwargs, dict)
    assert set(op.differentiable) <= set(range(len(args)))
    for key in op.hyper_ranges:
        assert key in kwargs or key in op.forward.__code__.co_varnames, key
