"""Shared input validation: clear TypeError/ValueError naming the argument."""

import numpy as np
import pytest

from refssl import validation as V


def test_float_array_accepts_float32_and_float64():
    for dt in (np.float32, np.float64):
        x = np.ones((3, 2), dtype=dt)
        assert V.float_array(x, "z", ndim=2) is x


@pytest.mark.parametrize("bad", [np.ones((3, 2), dtype=np.int64), np.ones((3, 2), dtype=bool),
                                 np.ones((3, 2), dtype=np.float16)])
def test_float_array_rejects_non_float_dtypes(bad):
    with pytest.raises(TypeError, match="z must be a float32 or float64 array"):
        V.float_array(bad, "z")


def test_float_array_rejects_lists():
    with pytest.raises(TypeError, match="z must be a numpy array"):
        V.float_array([[1.0, 2.0]], "z")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_float_array_rejects_non_finite(value):
    x = np.ones((3, 2))
    x[1, 1] = value
    with pytest.raises(ValueError, match="z contains NaN or inf"):
        V.float_array(x, "z")


def test_float_array_shape_and_empty_batch():
    with pytest.raises(ValueError, match=r"z must have shape \(N, D\).*got shape \(3,\)"):
        V.float_array(np.ones(3), "z", ndim=2, shape_doc="(N, D)")
    with pytest.raises(ValueError, match="empty batch"):
        V.float_array(np.ones((0, 4)), "z", ndim=2)
    with pytest.raises(ValueError, match="at least 1 columns"):
        V.float_array(np.ones((3, 0)), "z", ndim=2)


def test_same_shape_and_dtype():
    with pytest.raises(ValueError, match=r"z1 and z2 must have the same shape, got \(3, 2\) and \(3, 4\)"):
        V.same_shape([np.ones((3, 2)), np.ones((3, 4))], ["z1", "z2"])
    with pytest.raises(TypeError, match="z1 and z2 must have the same dtype"):
        V.same_dtype([np.ones(2), np.ones(2, dtype=np.float32)], ["z1", "z2"])


@pytest.mark.parametrize("t", [0.0, -0.1, -np.inf])
def test_positive_rejects_non_positive(t):
    with pytest.raises(ValueError, match="temperature must be"):
        V.positive(t, "temperature")


@pytest.mark.parametrize("t", ["0.1", None, True, np.ones(2)])
def test_positive_rejects_non_numbers(t):
    with pytest.raises(TypeError, match="temperature must be a real number"):
        V.positive(t, "temperature")


def test_positive_rejects_nan():
    with pytest.raises(ValueError, match="temperature must be finite"):
        V.positive(float("nan"), "temperature")


def test_in_range_and_labels():
    assert V.in_range(0.5, "tau_plus", 0, 1, high_open=True) == 0.5
    with pytest.raises(ValueError, match=r"tau_plus must be in \[0, 1\), got 1.0"):
        V.in_range(1.0, "tau_plus", 0, 1, high_open=True)
    with pytest.raises(TypeError, match="labels must be an integer array"):
        V.labels_array(np.zeros(3), "labels", 3)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        V.labels_array(np.zeros(3, dtype=int), "labels", 4)
    with pytest.raises(ValueError, match="labels must be < 2"):
        V.labels_array(np.array([0, 2]), "labels", 2, num_classes=2)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        V.labels_array(np.array([0, -1]), "labels", 2)


def test_scalar_array():
    assert V.scalar_array(np.asarray(1.0), "logit_scale").shape == ()
    with pytest.raises(TypeError, match="logit_scale must be a 0-d numpy float array"):
        V.scalar_array(2.0, "logit_scale")
    with pytest.raises(ValueError, match=r"logit_scale must be a 0-d array"):
        V.scalar_array(np.ones(1), "logit_scale")
