"""NaN/inf checks at a composite module's boundary (refssl.validation.inputs_scanned_by_caller).

A transformer stack scans its input, parameters and outputs once instead of letting each of its ops scan
every intermediate array; these tests show that nothing non-finite passes silently either way, and that
the skipped scan is confined to the block that asks for it."""

import threading

import numpy as np
import pytest

from refssl import validation as V
from refssl.nn.transformer import TransformerStack
from refssl.ops import linear


def _stack(dtype=np.float64):
    rng = np.random.default_rng(0)
    stack = TransformerStack(dim=8, depth=2, n_heads=2, mlp_ratio=2.0)
    params = stack.init(rng, dtype)[0]
    x = rng.standard_normal((2, 5, 8)).astype(dtype)
    return stack, params, x


def test_op_still_rejects_nan_outside_the_block():
    x = np.ones((2, 3))
    x[0, 1] = np.nan
    w = np.ones((3, 2))
    with V.inputs_scanned_by_caller():
        linear.linear_forward(x, w, None)  # the caller has taken over the scan
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        linear.linear_forward(x, w, None)


def test_skipped_scan_does_not_leak_into_other_threads():
    x = np.full((2, 3), np.inf)
    seen = []

    def other():
        try:
            linear.linear_forward(x, np.ones((3, 2)), None)
        except ValueError as e:
            seen.append(str(e))

    with V.inputs_scanned_by_caller():
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen and "x contains NaN or inf" in seen[0]


def test_shape_checks_still_run_inside_the_block():
    with V.inputs_scanned_by_caller(), pytest.raises(ValueError, match="w must have shape"):
        linear.linear_forward(np.ones((2, 3)), np.ones((4, 2)), None)


def test_stack_rejects_nan_input_and_names_it():
    stack, params, x = _stack()
    x[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        stack.forward_outputs(params, x)


def test_stack_rejects_nan_parameter_and_names_it():
    stack, params, x = _stack()
    params["1.fc2.w"][0, 0] = np.inf
    with pytest.raises(ValueError, match=r"params\['1.fc2.w'\] contains NaN or inf"):
        stack.forward_outputs(params, x)


def test_stack_reports_an_overflow_inside_at_its_boundary():
    stack, params, x = _stack(np.float32)
    params["0.fc2.w"][...] = np.float32(3e38)  # finite, but the MLP branch overflows float32
    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(ValueError, match="the output of block 1 contains NaN or inf"):
            stack.forward_outputs(params, x)


def test_stack_backward_checks_its_upstream_gradient():
    stack, params, x = _stack()
    outs, cache = stack.forward_outputs(params, x)
    g = np.ones_like(outs[-1])
    dx, grads = stack.backward(cache, g)
    assert np.isfinite(dx).all() and set(grads) == set(params)
    g[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="dout contains NaN or inf"):
        stack.backward(cache, g)
    with pytest.raises(ValueError, match="dout must have shape"):
        stack.backward(cache, g[:, :1])
