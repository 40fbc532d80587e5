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


# -- issue 15: every form of a hyperparameter, flags, grad_out, ndarray subclasses -----------------------


@pytest.mark.parametrize("form", [float, np.float64, np.float32, np.asarray, lambda v: np.asarray(v, np.float32)])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_positive_checks_numpy_and_0d_forms_for_finiteness(form, value):
    with pytest.raises(ValueError, match="temperature must be finite"):
        V.positive(form(value), "temperature")


@pytest.mark.parametrize("form", [int, np.int64, np.float32, np.asarray])
def test_positive_checks_numpy_and_0d_forms_for_range(form):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        V.positive(form(0), "temperature")
    assert V.positive(form(2), "temperature") == 2.0


@pytest.mark.parametrize("bad", ["1.0", np.asarray(True), np.asarray([0.5]), np.asarray(1j),
                                 np.ma.masked_array(0.5), None])
def test_real_rejects_non_numbers(bad):
    with pytest.raises(TypeError, match="temperature must be"):
        V.positive(bad, "temperature")


def test_real_rejects_integers_beyond_float():
    with pytest.raises(ValueError, match="sim_coeff must be finite"):
        V.in_range(10**400, "sim_coeff", 0.0, np.inf)


def test_positive_int_accepts_0d_integer_arrays():
    assert V.positive_int(np.asarray(3), "k") == 3
    with pytest.raises(TypeError, match="k must be an integer"):
        V.positive_int(np.asarray(3.0), "k")


@pytest.mark.parametrize("ok", [True, False, np.bool_(True)])
def test_flag_accepts_bools(ok):
    assert V.flag(ok, "mask_diagonal") is bool(ok)


@pytest.mark.parametrize("bad", ["False", "yes", None, 0, 1, np.asarray(True)])
def test_flag_rejects_everything_else(bad):
    with pytest.raises(TypeError, match="mask_diagonal must be a bool"):
        V.flag(bad, "mask_diagonal")


def test_grad_out_policy_for_scalar_losses():
    for ok in (2.0, 2, np.float64(2.0), np.float32(2.0), np.asarray(2.0), np.asarray(2.0, np.float16)):
        g = V.grad_out(ok, (), np.float32)
        assert g.dtype == np.float32 and g.shape == () and float(g) == 2.0
    for bad, err in ((None, TypeError), ("1.0", TypeError), (True, TypeError), (np.int64(1), TypeError),
                     (np.asarray(1), TypeError), (np.ones(1), ValueError), (np.nan, ValueError),
                     (1e300, ValueError), (10**400, ValueError)):
        with pytest.raises(err, match="grad_out"):
            V.grad_out(bad, (), np.float32)


def test_grad_out_policy_for_arrays():
    g = np.ones((3, 2))
    assert V.grad_out(g, (3, 2), np.float64) is g  # no copy when nothing changes
    assert V.grad_out(g, (3, 2), np.float64, copy=True) is not g
    assert V.grad_out(g, (3, 2), np.float32).dtype == np.float32
    for bad, err, match in ((1.0, ValueError, r"shape \(3, 2\)"), (np.ones(2), ValueError, r"got shape \(2,\)"),
                            (np.ones((1, 3, 2)), ValueError, "got shape"), (g.tolist(), TypeError, "list"),
                            (np.ones((3, 2), int), TypeError, "floating"), (np.ma.masked_array(g), TypeError,
                                                                           "MaskedArray")):
        with pytest.raises(err, match=match):
            V.grad_out(bad, (3, 2), np.float64)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_float_array_rejects_ndarray_subclasses_but_not_memmap(tmp_path):
    x = np.ones((3, 2))
    with pytest.raises(TypeError, match="z must be a plain numpy.ndarray, got the subclass MaskedArray"):
        V.float_array(np.ma.masked_array(x), "z")
    with pytest.raises(TypeError, match="subclass matrix"):
        V.float_array(np.asmatrix(x), "z")
    m = np.memmap(tmp_path / "m.dat", dtype=np.float64, mode="w+", shape=(3, 2))
    assert V.float_array(m, "z") is m
    with pytest.raises(ValueError, match=r"at least 1 axes"):
        V.float_array(np.asarray(1.0), "x", min_ndim=1, shape_doc="(N, ...)")


def test_finite_output_names_the_hyperparameters():
    assert V.finite_output(np.float32(1.0), "op", t=2.0) == 1.0
    with pytest.raises(ValueError, match="op: the output overflows float32 with t=1e-300"):
        V.finite_output(np.float32(np.inf), "op", t=1e-300)


@pytest.mark.parametrize("view", ["transpose", "channels_last", "strided"])
def test_finiteness_scan_of_large_non_contiguous_views(view):
    from refssl.validation import _all_finite

    base = np.random.default_rng(0).random((4, 16, 16, 64)).astype(np.float32)  # above the dot-scan size
    make = {"transpose": lambda a: a.T, "channels_last": lambda a: a.transpose(0, 3, 1, 2),
            "strided": lambda a: a[:, ::2]}[view]
    assert _all_finite(make(base))
    base[3, 14, 2, 60] = np.inf
    assert not _all_finite(make(base))
