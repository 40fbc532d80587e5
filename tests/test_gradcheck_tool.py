"""The gradient checker itself must catch wrong backward passes (otherwise every gradient test is moot)."""

import types

import numpy as np
import pytest

from refssl import gradcheck


def _quadratic_op(backward_scale=1.0, transpose=False, wrong_slot=False, mutate=False):
    """f(A, x) = sum((A x)^2) / 2 with optionally planted bugs in backward."""

    def forward(A, x):
        """y = A x; out = ||y||^2 / 2."""
        if mutate:
            x[...] = x  # no-op write is fine; real mutation below
            x += 0.0
            A[0, 0] += 1.0
        y = A @ x
        return 0.5 * float(y @ y), (A, x, y)

    def backward(cache, g):
        A, x, y = cache
        dA = g * np.outer(y, x) * backward_scale
        dx = g * (A.T @ y) * backward_scale
        if transpose:
            dA = dA.T.copy()
        if wrong_slot:
            return (dA, None)
        return (dA, dx)

    return types.SimpleNamespace(name="quad", forward=forward, backward=backward, differentiable=(0, 1),
                                 tolerance=1e-6)


def _inputs(n=4):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, n)), rng.standard_normal(n))


@pytest.mark.parametrize("full_max_size", [400, 0])
def test_correct_backward_passes(full_max_size):
    rep = gradcheck.check(_quadratic_op(), _inputs(), full_max_size=full_max_size)
    assert rep.ok, rep.describe()
    assert rep.rel_error < 1e-8


@pytest.mark.parametrize("full_max_size", [400, 0])
@pytest.mark.parametrize("scale", [1.0 + 1e-4, -1.0, 0.5])
def test_wrong_factor_is_caught(full_max_size, scale):
    rep = gradcheck.check(_quadratic_op(backward_scale=scale), _inputs(), full_max_size=full_max_size)
    assert not rep.ok
    assert rep.rel_error > 1e-5
    assert "FAIL" in rep.describe()


def test_transposed_gradient_is_caught():
    rep = gradcheck.check(_quadratic_op(transpose=True), _inputs())
    assert not rep.ok
    assert rep.worst.position == 0


def test_missing_gradient_slot_is_a_contract_error():
    rep = gradcheck.check(_quadratic_op(wrong_slot=True), _inputs())
    assert not rep.ok
    assert any("gradient is None" in e for e in rep.contract_errors)


def test_input_mutation_is_a_contract_error():
    rep = gradcheck.check(_quadratic_op(mutate=True), _inputs())
    assert not rep.ok
    assert any("modified in place" in e for e in rep.contract_errors)
