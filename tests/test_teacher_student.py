"""Teacher-student family: BYOL, SimSiam, MoCo v2/v3, DINO, NNCLR, Mean Shift, and their state updates.

Values are checked against slow loop references written here independently
of the vectorised ops, known values come from math, and every numeric claim of
derivations/teacher_student.md has a test marked with its label.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
from hypothesis import given

from refssl import registry, state
from refssl.ops.nearest_neighbour import mean_shift_neighbours, nnclr_neighbours

from .helpers import assert_gradients, seeds

OPS = ["byol", "neg_cosine", "simsiam", "moco_v3", "moco_queue", "dino", "nnclr", "mean_shift"]


def op(name):
    return registry.get(name)


def value(name, *args, **kw):
    return float(op(name).forward(*args, **kw)[0])


def grads(name, *args, **kw):
    out, cache = op(name).forward(*args, **kw)
    return op(name).backward(cache, 1.0)


# -- slow references: explicit loops over samples and pairs --------------------------------------


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _unit(a):
    return a / np.linalg.norm(a)


def _ce_row(logits, label):
    m = max(logits)
    return -(logits[label] - m - math.log(math.fsum(math.exp(x - m) for x in logits)))


def ref_byol(p1, p2, t1, t2):
    n = len(p1)
    return sum((2 - 2 * _cos(p1[i], t2[i])) + (2 - 2 * _cos(p2[i], t1[i])) for i in range(n)) / n


def ref_neg_cosine(p, z):
    return -sum(_cos(p[i], z[i]) for i in range(len(p))) / len(p)


def ref_simsiam(p1, p2, z1, z2):
    return 0.5 * ref_neg_cosine(p1, z2) + 0.5 * ref_neg_cosine(p2, z1)


def _ce_identity_loop(rows, cols, tau):
    """Mean over i of -log softmax([rows_i . cols_j / tau]_j)_i (rows, cols already unit)."""
    n = len(rows)
    return sum(_ce_row([float(rows[i] @ cols[j]) / tau for j in range(n)], i) for i in range(n)) / n


def ref_moco_v3(q1, q2, k1, k2, temperature=1.0):
    u = lambda x: [_unit(r) for r in x]  # noqa: E731
    return 2 * temperature * (_ce_identity_loop(u(q1), u(k2), temperature)
                              + _ce_identity_loop(u(q2), u(k1), temperature))


def ref_moco_queue(q, k, queue, temperature=0.2):
    total = 0.0
    for i in range(len(q)):
        qi = _unit(q[i])
        logits = [float(qi @ _unit(k[i])) / temperature] + [float(qi @ r) / temperature for r in queue]
        total += _ce_row(logits, 0)
    return total / len(q)


def ref_dino(student, teacher, center, student_temp=0.1, teacher_temp=0.04):
    """The official double loop over (teacher crop, student crop), skipping equal indices."""
    c = np.reshape(center, -1)
    total, terms = 0.0, 0
    for iq in range(len(teacher)):
        for v in range(len(student)):
            if v == iq:
                continue
            per_sample = []
            for b in range(student.shape[1]):
                t = (teacher[iq, b] - c) / teacher_temp
                p = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
                s = student[v, b] / student_temp
                logq = s - s.max() - math.log(np.exp(s - s.max()).sum())
                per_sample.append(-float(np.sum(p * logq)))
            total += sum(per_sample) / len(per_sample)
            terms += 1
    return total / terms


def ref_nnclr(p1, p2, z1, z2, support, temperature=0.1):
    def nn(z):
        best = max(range(len(support)), key=lambda j: _cos(z, support[j]))
        return _unit(support[best])

    n = len(p1)
    nn1 = [nn(z1[i]) for i in range(n)]
    nn2 = [nn(z2[i]) for i in range(n)]
    return 0.5 * _ce_identity_loop(nn1, [_unit(r) for r in p2], temperature) + \
        0.5 * _ce_identity_loop(nn2, [_unit(r) for r in p1], temperature)


def ref_mean_shift(query, target, bank, k=5, ptr=0):
    mem = [row.copy() for row in bank]
    for i in range(len(target)):  # official order: enqueue first
        mem[(ptr + i) % len(mem)] = _unit(target[i])
    total = 0.0
    for i in range(len(query)):
        t = _unit(target[i])
        order = sorted(range(len(mem)), key=lambda j: 2 - 2 * float(t @ mem[j]))[:k]
        total += sum(2 - 2 * float(_unit(query[i]) @ mem[j]) for j in order) / k
    return total / len(query)


REFS = {"byol": ref_byol, "neg_cosine": ref_neg_cosine, "simsiam": ref_simsiam, "moco_v3": ref_moco_v3,
        "moco_queue": ref_moco_queue, "dino": ref_dino, "nnclr": ref_nnclr, "mean_shift": ref_mean_shift}


@pytest.mark.parametrize("name", OPS)
@given(seed=seeds)
def test_value_matches_loop_reference(name, seed):
    args, kwargs = op(name).example(np.random.default_rng(seed), np.float64)
    np.testing.assert_allclose(value(name, *args, **kwargs), REFS[name](*args, **kwargs),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", OPS)
def test_float32_value_matches_loop_reference(name):
    args, kwargs = op(name).example(np.random.default_rng(11), np.float32)
    out = op(name).forward(*args, **kwargs)[0]
    assert out.dtype == np.float32
    ref = REFS[name](*[a.astype(np.float64) for a in args], **kwargs)
    np.testing.assert_allclose(float(out), ref, rtol=1e-4, atol=1e-5)


# -- stop-gradient semantics ------------------------------------------------------------------------

STOP_GRADIENT = [(n, k) for n in OPS for k in range(len(op(n).example(np.random.default_rng(0))[0]))
                 if k not in op(n).differentiable]


def _perturb(name, k, args, kwargs, rng):
    """A change of stop-gradient input k that must change the loss."""
    args, kwargs = list(args), dict(kwargs)
    if name == "nnclr" and k in (2, 3):
        # The lookup is piecewise constant in z: move every z onto a different support row.
        _, idx = nnclr_neighbours(args[k], args[4])
        args[k] = args[4][(idx + 1) % len(args[4])] * 3.0
    elif name == "mean_shift" and k == 2:
        kwargs["k"] = args[2].shape[0]  # all rows are neighbours, incl. those not overwritten
        args[k] = args[k] + 0.5 * rng.standard_normal(args[k].shape)
    else:
        args[k] = args[k] + 0.5 * rng.standard_normal(args[k].shape)
    return tuple(args), kwargs


@pytest.mark.parametrize("name,k", STOP_GRADIENT)
def test_stop_gradient_input_changes_value_but_gets_none(name, k):
    rng = np.random.default_rng(5)
    args, kwargs = op(name).example(rng, np.float64)
    if name == "mean_shift" and k == 2:
        kwargs["k"] = args[2].shape[0]
    new_args, new_kwargs = _perturb(name, k, args, kwargs, rng)
    assert abs(value(name, *new_args, **new_kwargs) - value(name, *args, **new_kwargs)) > 1e-6
    g = grads(name, *new_args, **new_kwargs)
    assert g[k] is None
    for j in op(name).differentiable:
        assert g[j] is not None and g[j].shape == args[j].shape
    # The finite-difference check runs on the inputs that carry gradients only.
    rep = assert_gradients(op(name), new_args, new_kwargs, rng=rng)
    assert sorted(r.position for r in rep.inputs) == sorted(op(name).differentiable)


CONTINUOUS_STOP = [(n, k) for n, k in STOP_GRADIENT if not (n == "nnclr" and k in (2, 3))]


@pytest.mark.parametrize("name,k", CONTINUOUS_STOP)
def test_stop_gradient_is_not_a_zero_derivative(name, k):
    """None means 'treated as a constant', not 'the loss does not depend on it'."""
    rng = np.random.default_rng(8)
    args, kwargs = op(name).example(rng, np.float64)
    if name == "mean_shift" and k == 2:
        kwargs["k"] = args[2].shape[0]
    u = rng.standard_normal(args[k].shape)
    h = 1e-5

    def f(s):
        trial = list(args)
        trial[k] = args[k] + s * u
        return value(name, *trial, **kwargs)

    assert abs(f(h) - f(-h)) / (2 * h) > 1e-4


# -- known values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_byol_identical_online_and_target_is_zero(dtype):
    rng = np.random.default_rng(0)
    t1, t2 = rng.standard_normal((5, 7)).astype(dtype), rng.standard_normal((5, 7)).astype(dtype)
    assert value("byol", t2, t1, t1, t2) == 0.0
    # Positive rescaling of a prediction does not change its direction.
    assert abs(value("byol", 3 * t2, 0.5 * t1, t1, t2)) < (1e-6 if dtype == np.float32 else 1e-14)
    # Opposite directions give the maximum 8.
    np.testing.assert_allclose(value("byol", -t2, -t1, t1, t2), 8.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_simsiam_identical_is_minus_one(dtype):
    rng = np.random.default_rng(1)
    z1, z2 = rng.standard_normal((4, 6)).astype(dtype), rng.standard_normal((4, 6)).astype(dtype)
    np.testing.assert_allclose(value("simsiam", z2, z1, z1, z2), -1.0, rtol=1e-6)
    np.testing.assert_allclose(value("simsiam", -z2, -z1, z1, z2), 1.0, rtol=1e-6)
    np.testing.assert_allclose(value("neg_cosine", 2 * z1, z1), -1.0, rtol=1e-6)


def test_moco_v3_orthonormal_keys_known_value():
    """q = k = orthonormal rows: each CE is log(1 + (N-1) e^{-1/τ}), so L = 4τ log(1 + (N-1) e^{-1/τ})."""
    n = 5
    eye = np.eye(n)
    for tau in (0.2, 1.0, 3.0):
        expected = 4 * tau * math.log(1 + (n - 1) * math.exp(-1 / tau))
        np.testing.assert_allclose(value("moco_v3", eye, 2 * eye, eye, eye, temperature=tau), expected,
                                   rtol=1e-12)


def test_dino_ignores_center_and_teacher_when_student_is_uniform():
    """A uniform student gives log K whatever the teacher (each row of P sums to 1)."""
    rng = np.random.default_rng(2)
    k = 7
    student = np.full((4, 3, k), 0.3) + rng.standard_normal((4, 3, 1))  # constant along K
    teacher, center = rng.standard_normal((2, 3, k)), rng.standard_normal(k)
    np.testing.assert_allclose(value("dino", student, teacher, center), math.log(k), rtol=1e-12)


def test_mean_shift_k_equal_bank_averages_all_rows():
    rng = np.random.default_rng(3)
    q, t = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    bank = rng.standard_normal((5, 4))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    mem = bank.copy()
    mem[[3, 4]] = t / np.linalg.norm(t, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    expected = 2 - 2 * np.mean(qn @ mem.mean(axis=0))
    np.testing.assert_allclose(value("mean_shift", q, t, bank, k=5, ptr=3), expected, rtol=1e-12)


def test_normalisation_conventions_of_stored_vectors():
    """nnclr normalises the support (raw or unit rows give one loss); moco_queue uses queue rows as stored."""
    rng = np.random.default_rng(31)
    p1, p2, z1, z2 = (rng.standard_normal((3, 4)) for _ in range(4))
    support = _unit_rows(rng.standard_normal((6, 4)))
    scaled = support * rng.uniform(0.2, 5.0, (6, 1))  # lightly stores raw z
    np.testing.assert_allclose(value("nnclr", p1, p2, z1, z2, scaled), value("nnclr", p1, p2, z1, z2, support),
                               rtol=1e-12)
    queue = _unit_rows(rng.standard_normal((5, 4)))
    base = value("moco_queue", p1, z1, queue)
    np.testing.assert_allclose(base, ref_moco_queue(p1, z1, queue), rtol=1e-12)
    assert abs(value("moco_queue", p1, z1, 3.0 * queue) - base) > 1e-3  # not renormalised
    np.testing.assert_allclose(value("moco_queue", 4.0 * p1, 0.5 * z1, queue), base, rtol=1e-12)  # q, k normalised


# -- update order -----------------------------------------------------------------------------------


def test_dino_loss_uses_the_old_center_and_the_update_uses_raw_teacher_outputs():
    rng = np.random.default_rng(4)
    student, teacher = rng.standard_normal((4, 3, 5)), rng.standard_normal((2, 3, 5))
    c_old = rng.standard_normal((1, 5))
    before = c_old.copy()
    loss = value("dino", student, teacher, c_old)
    c_new = state.dino_center_update(c_old, teacher)
    np.testing.assert_array_equal(c_old, before)  # pure
    # Raw teacher mean over both crops and the batch, momentum 0.9, shape kept.
    mean = sum(teacher[t, b] for t in range(2) for b in range(3)) / 6
    np.testing.assert_allclose(c_new, 0.9 * c_old + 0.1 * mean[None, :], rtol=1e-12)
    assert c_new.shape == (1, 5) and state.dino_center_update(c_old[0], teacher).shape == (5,)
    np.testing.assert_allclose(loss, ref_dino(student, teacher, c_old), rtol=1e-12)
    assert abs(loss - ref_dino(student, teacher, c_new)) > 1e-6


def test_moco_queue_loss_uses_the_queue_before_the_keys_are_enqueued():
    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    queue = rng.standard_normal((8, 3))
    queue /= np.linalg.norm(queue, axis=1, keepdims=True)
    loss = value("moco_queue", q, k, queue)
    new_queue, ptr = state.moco_queue_update(queue, 2, k)
    assert ptr == 6
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    np.testing.assert_allclose(new_queue[2:6], kn, rtol=1e-14)
    np.testing.assert_array_equal(new_queue[[0, 1, 6, 7]], queue[[0, 1, 6, 7]])
    np.testing.assert_allclose(loss, ref_moco_queue(q, k, queue), rtol=1e-12)
    # With the updated queue each positive would also appear among its own negatives.
    assert abs(value("moco_queue", q, k, new_queue) - loss) > 1e-6


def test_nnclr_support_is_updated_after_the_lookup():
    rng = np.random.default_rng(6)
    p1, p2, z1, z2 = (rng.standard_normal((4, 5)) for _ in range(4))
    support = rng.standard_normal((8, 5))
    loss1 = value("nnclr", p1, p2, z1, z2, support)
    np.testing.assert_allclose(loss1, ref_nnclr(p1, p2, z1, z2, support), rtol=1e-12)
    _, idx = nnclr_neighbours(z1, support)
    z1n = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
    assert np.max(np.abs(support[idx] / np.linalg.norm(support[idx], axis=1, keepdims=True) - z1n)) > 1e-3
    new_support, ptr = state.nnclr_support_update(support, 4, z1)
    assert ptr == 0  # 4 + 4 wraps at 8
    np.testing.assert_allclose(new_support[4:], z1n, rtol=1e-14)
    # Next step with the same z1: each z1 now finds itself (cosine 1) in the support.
    nn1, _ = nnclr_neighbours(z1, new_support)
    np.testing.assert_allclose(nn1, z1n, rtol=1e-12)
    loss2 = value("nnclr", p1, p2, z1, z2, new_support)
    np.testing.assert_allclose(loss2, ref_nnclr(p1, p2, z1, z2, new_support), rtol=1e-12)
    assert abs(loss2 - loss1) > 1e-6


@pytest.mark.derivation("teacher_student.md#TS16")
def test_mean_shift_target_is_its_own_nearest_neighbour():
    rng = np.random.default_rng(7)
    q, t = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    bank = rng.standard_normal((9, 6))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    ptr = 7
    searched, idx = mean_shift_neighbours(t, bank, k=3, ptr=ptr)
    rows = [(ptr + i) % 9 for i in range(3)]
    for i in range(3):
        assert rows[i] in idx[i]
        assert abs(2 - 2 * float(_unit(t[i]) @ searched[rows[i]])) < 1e-14  # distance 0
    # k = 1 is BYOL-style regression onto the target itself.
    cos = [_cos(q[i], t[i]) for i in range(3)]
    np.testing.assert_allclose(value("mean_shift", q, t, bank, k=1, ptr=ptr), np.mean([2 - 2 * c for c in cos]),
                               rtol=1e-12)
    # The op's enqueue is the one of mean_shift_bank_update, so the state stays consistent.
    new_bank, new_ptr = state.mean_shift_bank_update(bank, ptr, t)
    np.testing.assert_array_equal(new_bank, searched)
    assert new_ptr == 1
    # Searching the bank *before* the enqueue (a common porting mistake) gives another value.
    loss = value("mean_shift", q, t, bank, k=3, ptr=ptr)
    old_order = np.mean([np.mean(sorted(2 - 2 * _unit(q[i]) @ bank[j] for j in
                                        np.argsort(-(bank @ _unit(t[i])))[:3])) for i in range(3)])
    assert abs(loss - old_order) > 1e-3


# -- documented scale factors versus peer libraries -------------------------------------------------


def _fd_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for j in range(x.size):
        e = np.zeros_like(x)
        e.flat[j] = h
        g.flat[j] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@pytest.mark.derivation("teacher_student.md#TS2")
def test_byol_is_four_plus_four_times_lightly_with_four_times_the_gradient():
    """lightly's BYOL example: -1/2 (mean cos(p1, t2) + mean cos(p2, t1))."""
    rng = np.random.default_rng(9)
    p1, p2, t1, t2 = (rng.standard_normal((4, 5)) for _ in range(4))

    def lightly(a, b):
        return -0.5 * (np.mean([_cos(a[i], t2[i]) for i in range(4)])
                       + np.mean([_cos(b[i], t1[i]) for i in range(4)]))

    np.testing.assert_allclose(value("byol", p1, p2, t1, t2), 4 + 4 * lightly(p1, p2), rtol=1e-12)
    g1, g2, _, _ = grads("byol", p1, p2, t1, t2)
    np.testing.assert_allclose(g1, 4 * _fd_grad(lambda x: lightly(x, p2), p1), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g2, 4 * _fd_grad(lambda x: lightly(p1, x), p2), rtol=1e-6, atol=1e-8)


@pytest.mark.derivation("teacher_student.md#TS6")
@pytest.mark.parametrize("tau", [0.05, 0.2, 1.0, 10.0])
def test_moco_v3_gradient_wrt_cosines_has_no_inverse_temperature(tau):
    """dL/dS12 = 2 (softmax(S12/τ) - I)/N: 2τ times the plain CE gradient (which carries 1/τ)."""
    rng = np.random.default_rng(10)
    n, d = 4, 6
    q1, q2, k1, k2 = (_unit_rows(rng.standard_normal((n, d))) for _ in range(4))
    s12 = q1 @ k2.T
    plain_ce = np.zeros((n, n))  # gradient of the plain row-mean CE(S/τ) by loops
    for i in range(n):
        e = np.exp((s12[i] - s12[i].max()) / tau)
        for j in range(n):
            plain_ce[i, j] = (e[j] / e.sum() - (i == j)) / (n * tau)
    d_s = 2 * tau * plain_ce
    assert np.max(np.abs(d_s)) <= 2.0 / n + 1e-12  # bounded independently of τ
    g1 = grads("moco_v3", q1, q2, k1, k2, temperature=tau)[0]
    expected = d_s @ k2
    expected -= q1 * np.sum(q1 * expected, axis=1, keepdims=True)  # ||q1|| = 1: tangent projection
    np.testing.assert_allclose(g1, expected, rtol=1e-10, atol=1e-12)


def test_dino_teacher_temperature_official_vs_lightly_defaults():
    """Official: 0 warm-up epochs (0.04 throughout); lightly: 30 (the same values while both temps are 0.04)."""
    official = [state.dino_teacher_temperature(e) for e in range(40)]
    assert official == [0.04] * 40
    # The README recipe 0.04 -> 0.07 over 30 epochs, against the official array construction.
    arr = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(70, 0.07)])
    ours = [state.dino_teacher_temperature(e, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                           warmup_teacher_temp_epochs=30) for e in range(100)]
    np.testing.assert_allclose(ours, arr, rtol=1e-14)
    assert state.dino_teacher_temperature(0, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=1) == 0.02


def _unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- derivation claims ------------------------------------------------------------------------------


@pytest.mark.derivation("teacher_student.md#TS1")
def test_byol_gradient_formula():
    rng = np.random.default_rng(12)
    p1, p2, t1, t2 = (rng.standard_normal((3, 4)) for _ in range(4))
    g1, g2, _, _ = grads("byol", p1, p2, t1, t2)
    for g, p, t in ((g1, p1, t2), (g2, p2, t1)):
        for i in range(3):
            c = _cos(p[i], t[i])
            expected = -(2 / 3) * (_unit(t[i]) - c * _unit(p[i])) / np.linalg.norm(p[i])
            np.testing.assert_allclose(g[i], expected, rtol=1e-10, atol=1e-14)
            assert abs(g[i] @ p[i]) < 1e-12  # radial component vanishes


@pytest.mark.derivation("teacher_student.md#TS3")
def test_simsiam_gradient_formula():
    rng = np.random.default_rng(13)
    p1, p2, z1, z2 = (rng.standard_normal((3, 4)) for _ in range(4))
    g1, g2, _, _ = grads("simsiam", p1, p2, z1, z2)
    for g, p, z in ((g1, p1, z2), (g2, p2, z1)):
        for i in range(3):
            c = _cos(p[i], z[i])
            expected = -(1 / 6) * (_unit(z[i]) - c * _unit(p[i])) / np.linalg.norm(p[i])
            np.testing.assert_allclose(g[i], expected, rtol=1e-10, atol=1e-14)
    # BYOL's gradient is 4x SimSiam's when the targets coincide (same cosines, 2/N vs 1/(2N)).
    gb1 = grads("byol", p1, p2, z1, z2)[0]
    np.testing.assert_allclose(gb1, 4 * g1, rtol=1e-8)


@pytest.mark.derivation("teacher_student.md#TS4")
def test_without_predictor_stop_gradient_only_halves_the_gradient():
    """p = z (no predictor): the full derivative of simsiam(z1, z2, z1, z2) is 2x the stop-gradient one."""
    rng = np.random.default_rng(14)
    z1, z2 = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    g_sg = grads("simsiam", z1, z2, z1, z2)[0]
    full = _fd_grad(lambda x: value("simsiam", x, z2, x, z2), z1)
    np.testing.assert_allclose(full, 2 * g_sg, rtol=1e-6, atol=1e-9)


@pytest.mark.derivation("teacher_student.md#TS5")
def test_collapsed_solution_is_a_stationary_global_minimum():
    rng = np.random.default_rng(15)
    c = rng.standard_normal(6)
    collapsed = np.tile(c, (5, 1)) * rng.uniform(0.5, 2.0, (5, 1))  # every output on one ray
    b = op("byol").forward(collapsed, collapsed, collapsed, collapsed)
    s = op("simsiam").forward(collapsed, collapsed, collapsed, collapsed)
    assert abs(float(b[0])) < 1e-14 and abs(float(s[0]) + 1) < 1e-14
    for name, (out, cache) in (("byol", b), ("simsiam", s)):
        for gk in op(name).backward(cache, 1.0)[:2]:
            assert np.max(np.abs(gk)) < 1e-14
    # Any other constant direction is an equally good (and equally uninformative) minimiser.
    other = np.tile(rng.standard_normal(6), (5, 1))
    assert value("byol", other, other, other, other) == 0.0
    assert abs(value("simsiam", other, other, other, other) + 1) < 1e-14


@pytest.mark.derivation("teacher_student.md#TS7")
@pytest.mark.parametrize("size", [1, 7, 64])
def test_moco_queue_identical_embeddings_give_log_k_plus_one(size):
    rng = np.random.default_rng(size)
    v = _unit(rng.standard_normal(8))
    q = np.tile(v, (3, 1)) * 2.5
    queue = np.tile(v, (size, 1))
    for tau in (0.07, 0.2, 1.0):
        np.testing.assert_allclose(value("moco_queue", q, q, queue, temperature=tau), math.log(size + 1),
                                   rtol=1e-12)


@pytest.mark.derivation("teacher_student.md#TS8")
def test_moco_queue_gradient_formula():
    rng = np.random.default_rng(16)
    n, d, size, tau = 3, 4, 6, 0.2
    q, k = _unit_rows(rng.standard_normal((n, d))), rng.standard_normal((n, d))
    queue = _unit_rows(rng.standard_normal((size, d)))
    g = grads("moco_queue", q, k, queue, temperature=tau)[0]
    for i in range(n):
        keys = [_unit(k[i])] + list(queue)
        logits = np.array([q[i] @ r for r in keys]) / tau
        p = np.exp(logits - logits.max())
        p /= p.sum()
        dq = ((p[0] - 1) * keys[0] + sum(p[j] * keys[j] for j in range(1, size + 1))) / (n * tau)
        np.testing.assert_allclose(g[i], dq - q[i] * (q[i] @ dq), rtol=1e-10, atol=1e-13)


@pytest.mark.derivation("teacher_student.md#TS9")
def test_dino_gradient_formula():
    rng = np.random.default_rng(17)
    v_s, v_t, n, k, ts, tt = 4, 2, 3, 5, 0.1, 0.04
    student, teacher, center = rng.standard_normal((v_s, n, k)), rng.standard_normal((v_t, n, k)), \
        rng.standard_normal(k)
    g = grads("dino", student, teacher, center, student_temp=ts, teacher_temp=tt)[0]
    pairs = 2 * v_s - 2
    for v in range(v_s):
        for b in range(n):
            s = np.exp(student[v, b] / ts - np.max(student[v, b] / ts))
            s /= s.sum()
            expected = np.zeros(k)
            for t in range(v_t):
                if t == v:
                    continue
                pt = np.exp((teacher[t, b] - center) / tt - np.max((teacher[t, b] - center) / tt))
                expected += s - pt / pt.sum()
            np.testing.assert_allclose(g[v, b], expected / (ts * n * pairs), rtol=1e-10, atol=1e-13)


@pytest.mark.derivation("teacher_student.md#TS10")
def test_dino_loss_is_entropy_plus_kl_and_log_k_for_uniform_student():
    rng = np.random.default_rng(18)
    k = 6
    teacher, center = 0.3 * rng.standard_normal((2, 1, k)), 0.3 * rng.standard_normal(k)
    student = rng.standard_normal((2, 1, k))
    p = [np.exp((teacher[t, 0] - center) / 0.04) / np.exp((teacher[t, 0] - center) / 0.04).sum()
         for t in range(2)]
    s = [np.exp(student[v, 0] / 0.1) / np.exp(student[v, 0] / 0.1).sum() for v in range(2)]
    ent = lambda a: -np.sum(a * np.log(a))  # noqa: E731
    kl = lambda a, b: np.sum(a * np.log(a / b))  # noqa: E731
    expected = 0.5 * ((ent(p[0]) + kl(p[0], s[1])) + (ent(p[1]) + kl(p[1], s[0])))
    np.testing.assert_allclose(value("dino", student, teacher, center), expected, rtol=1e-9)
    flat = np.zeros((2, 1, k))
    np.testing.assert_allclose(value("dino", flat, teacher, center), math.log(k), rtol=1e-12)


@pytest.mark.derivation("teacher_student.md#TS11")
def test_centering_turns_a_collapsed_teacher_into_the_uniform_target():
    rng = np.random.default_rng(19)
    k = 5
    row = rng.standard_normal(k) * 10
    teacher = np.tile(row, (2, 4, 1))  # input-independent (collapsed) teacher
    center = teacher.reshape(-1, k).mean(axis=0)  # the converged center
    student = rng.standard_normal((3, 4, k))
    for tt in (0.01, 0.04, 0.5):
        # Target uniform => loss = mean cross-entropy of the uniform distribution to the student.
        logq = student / 0.1 - np.log(np.exp(student / 0.1).sum(-1, keepdims=True))
        ce_uniform = -logq.mean(axis=-1)  # (V_s, N)
        expected = (ce_uniform[1:].sum() + ce_uniform[[0, 2]].sum()) / (4 * 4)
        np.testing.assert_allclose(value("dino", student, teacher, center, teacher_temp=tt), expected,
                                   rtol=1e-10)


@pytest.mark.derivation("teacher_student.md#TS12")
def test_center_recursion_closed_form():
    rng = np.random.default_rng(20)
    teacher, c0 = rng.standard_normal((2, 3, 4)), rng.standard_normal(4)
    mean = teacher.reshape(-1, 4).mean(axis=0)
    c = c0
    for n in range(1, 31):
        c = state.dino_center_update(c, teacher, momentum=0.9)
        np.testing.assert_allclose(c - mean, 0.9 ** n * (c0 - mean), rtol=1e-9, atol=1e-15)


@pytest.mark.derivation("teacher_student.md#TS13")
@pytest.mark.parametrize("tt,ts", [(0.04, 0.1), (0.2, 0.1)])
def test_sharpening_makes_the_uniform_solution_unstable(tt, ts):
    """Student = teacher = εu (center 0): grad ≈ ε (1/τ_s - 1/τ_t) u / (2 N K τ_s) per view."""
    rng = np.random.default_rng(21)
    k, eps = 6, 1e-7
    u = rng.standard_normal(k)
    u -= u.mean()
    x = np.tile(eps * u, (2, 1, 1))
    g = grads("dino", x, x, np.zeros(k), student_temp=ts, teacher_temp=tt)[0]
    coef = eps * (1 / ts - 1 / tt) / (2 * 1 * k * ts)
    # First order in ε: the neglected terms are O(ε |u| / τ_t) relative.
    np.testing.assert_allclose(g[0, 0], coef * u, rtol=0, atol=1e-4 * np.max(np.abs(coef * u)))
    # Gradient descent x <- x - lr g moves along +u (away from uniform) iff τ_t < τ_s.
    assert (np.dot(-g[0, 0], u) > 0) == (tt < ts)
    # Entropy of softmax(x/τ) grows with τ: the sharpened teacher has lower entropy than the student.
    z = rng.standard_normal(k)
    ents = []
    for tau in (0.02, 0.04, 0.1, 0.5, 2.0):
        p = np.exp(z / tau - np.max(z / tau))
        p /= p.sum()
        ents.append(-np.sum(p * np.log(np.maximum(p, 1e-300))))
    assert all(a < b for a, b in zip(ents, ents[1:]))


@pytest.mark.derivation("teacher_student.md#TS14")
def test_centering_removes_an_input_independent_dominant_logit():
    rng = np.random.default_rng(22)
    k, n, j = 5, 6, 2
    r = rng.standard_normal((2, n, k))
    student = rng.standard_normal((3, n, k))
    base = value("dino", student, r, r.reshape(-1, k).mean(0))
    for a in (5.0, 50.0):
        shifted = r.copy()
        shifted[..., j] += a  # the same dominant dimension for every input
        # Without centering the target collapses to one-hot on j ...
        p = np.exp(shifted / 0.04 - shifted.max(-1, keepdims=True) / 0.04)
        p /= p.sum(-1, keepdims=True)
        if a == 50.0:
            assert p[..., j].min() > 1 - 1e-12
        # ... with the batch-mean center the loss does not see the shift at all.
        np.testing.assert_allclose(value("dino", student, shifted, shifted.reshape(-1, k).mean(0)), base,
                                   rtol=1e-10)


@pytest.mark.derivation("teacher_student.md#TS15")
def test_nnclr_gradient_formula():
    rng = np.random.default_rng(23)
    n, d, tau = 3, 4, 0.1
    p1, p2 = _unit_rows(rng.standard_normal((n, d))), _unit_rows(rng.standard_normal((n, d)))
    z1, z2, support = rng.standard_normal((n, d)), rng.standard_normal((n, d)), rng.standard_normal((7, d))
    g1, g2 = grads("nnclr", p1, p2, z1, z2, support, temperature=tau)[:2]
    for g, p, z in ((g2, p2, z1), (g1, p1, z2)):
        nn = np.array([_unit(support[max(range(7), key=lambda j: _cos(z[i], support[j]))]) for i in range(n)])
        logits = nn @ p.T / tau
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        dp = (prob - np.eye(n)).T @ nn / (2 * tau * n)
        np.testing.assert_allclose(g, dp - p * np.sum(p * dp, 1, keepdims=True), rtol=1e-10, atol=1e-13)


@pytest.mark.derivation("teacher_student.md#TS17")
def test_mean_shift_gradient_formula():
    rng = np.random.default_rng(24)
    q, t = _unit_rows(rng.standard_normal((3, 5))), rng.standard_normal((3, 5))
    bank = _unit_rows(rng.standard_normal((8, 5)))
    g = grads("mean_shift", q, t, bank, k=4, ptr=6)[0]
    searched, idx = mean_shift_neighbours(t, bank, k=4, ptr=6)
    for i in range(3):
        mbar = searched[idx[i]].mean(axis=0)
        expected = -(2 / 3) * (mbar - q[i] * (q[i] @ mbar))
        np.testing.assert_allclose(g[i], expected, rtol=1e-10, atol=1e-13)


@pytest.mark.derivation("teacher_student.md#TS18")
def test_byol_jax_eps_equals_norm_floor():
    """x / sqrt(max(||x||^2, 1e-12)) = x / max(||x||, 1e-6): tiny rows are scaled, not normalised."""
    tiny = np.array([[3e-7, 4e-7]])  # norm 5e-7 < 1e-6
    t = np.array([[1.0, 0.0]])
    jax_hat = tiny / np.sqrt(max(float(np.sum(tiny ** 2)), 1e-12))
    expected = np.sum((jax_hat - t) ** 2)
    np.testing.assert_allclose(value("byol", tiny, tiny, t, t), 2 * expected, rtol=1e-12)
    assert abs(value("byol", tiny, tiny, t, t) - 2 * (2 - 2 * 0.6)) > 0.1  # differs from 2 - 2cos


# -- state updates ----------------------------------------------------------------------------------


def test_fifo_matches_a_deque_simulation_and_official_slices():
    rng = np.random.default_rng(25)
    size, d = 6, 2
    queue = rng.standard_normal((size, d))
    ptr = 0
    dq = collections.deque([tuple(r) for r in queue], maxlen=size)  # oldest on the left
    for step, n in enumerate([2, 3, 1, 4, 6, 2]):
        rows = rng.standard_normal((n, d))
        old, snapshot = queue, queue.copy()
        queue, new_ptr = state.fifo_enqueue(old, ptr, rows)
        np.testing.assert_array_equal(old, snapshot)  # pure: the input queue is untouched
        assert new_ptr == (ptr + n) % size
        for r in rows:
            dq.append(tuple(r))
        ptr = new_ptr
        # Reading from ptr (the oldest) around the ring gives the deque order.
        ring = np.concatenate([queue[ptr:], queue[:ptr]])
        np.testing.assert_array_equal(ring, np.array(dq))
    # Official code (K % n == 0): queue[ptr:ptr+n] = rows; ptr = (ptr + n) % K.
    q0 = rng.standard_normal((8, 3))
    rows = rng.standard_normal((4, 3))
    official = q0.copy()
    official[4:8] = rows
    out, p = state.fifo_enqueue(q0, 4, rows)
    np.testing.assert_array_equal(out, official)
    assert p == 0 and not np.array_equal(q0, official)  # pure


def test_fifo_errors():
    q = np.zeros((4, 3))
    with pytest.raises(ValueError, match="cannot enqueue 5 rows"):
        state.fifo_enqueue(q, 0, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"ptr must be in \[0, 4\)"):
        state.fifo_enqueue(q, 4, np.zeros((1, 3)))
    with pytest.raises(TypeError, match="ptr must be an integer"):
        state.fifo_enqueue(q, 1.0, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"k must have shape \(n, 3\)"):
        state.moco_queue_update(q, 0, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="z1 contains NaN"):
        state.nnclr_support_update(q, 0, np.full((1, 3), np.nan))


def test_ema_update_on_dicts():
    rng = np.random.default_rng(26)
    target = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2).astype(np.float32)}
    online = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2).astype(np.float32)}
    snapshot = {k: v.copy() for k, v in target.items()}
    out = state.ema_update(target, online, momentum=0.99)
    for key in target:
        np.testing.assert_array_equal(target[key], snapshot[key])
        np.testing.assert_allclose(out[key], 0.99 * target[key] + 0.01 * online[key], rtol=1e-6)
        assert out[key].dtype == target[key].dtype
    np.testing.assert_array_equal(state.ema_update(target, online, momentum=1.0)["w"], target["w"])
    np.testing.assert_array_equal(state.ema_update(target, online, momentum=0.0)["w"], online["w"])
    # BYOL's form xi + (1 - tau)(theta - xi) is the same map.
    xi = target["w"]
    np.testing.assert_allclose(xi + (1 - 0.97) * (online["w"] - xi),
                               state.ema_update(target, online, momentum=0.97)["w"], rtol=1e-12)
    # Fixed online weights: target - online shrinks by m per step.
    t = target
    for n in range(1, 6):
        t = state.ema_update(t, online, momentum=0.9)
        np.testing.assert_allclose(t["w"] - online["w"], 0.9 ** n * (target["w"] - online["w"]), rtol=1e-10)
    with pytest.raises(ValueError, match="same keys"):
        state.ema_update({"w": xi}, {"v": xi}, momentum=0.9)
    with pytest.raises(ValueError, match="same shape"):
        state.ema_update({"w": xi}, {"w": xi[:2]}, momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        state.ema_update(target, online, momentum=1.5)


@pytest.mark.derivation("teacher_student.md#TS19")
@pytest.mark.parametrize("fn,kw", [(state.byol_momentum, "total_steps"), (state.moco_v3_momentum, "total_epochs"),
                                   (state.dino_momentum, "total_steps")])
def test_momentum_schedules_endpoints_and_midpoint(fn, kw):
    total = 100
    assert fn(0, **{kw: total}, base=0.99) == pytest.approx(0.99, abs=1e-15)
    assert fn(50, **{kw: total}, base=0.99) == pytest.approx((1 + 0.99) / 2, abs=1e-15)
    values = [fn(k, **{kw: total}, base=0.99) for k in range(total)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] < 1.0


def test_momentum_schedules_against_official_formulas():
    # BYOL: 1 - cosine_decay(min(k, K), K, 1 - base), stays 1 after K.
    K = 40
    for k in (0, 7, 40, 41, 1000):
        decay = (1 - 0.996) * 0.5 * (1 + math.cos(math.pi * min(k, K) / K))
        assert state.byol_momentum(k, total_steps=K) == pytest.approx(1 - decay, abs=1e-15)
    assert state.byol_momentum(K, total_steps=K) == 1.0
    # MoCo v3: fractional epochs.
    for e in (0.0, 0.25, 3.5, 10.0):
        m = 1.0 - 0.5 * (1.0 + math.cos(math.pi * e / 10)) * (1.0 - 0.99)
        assert state.moco_v3_momentum(e, total_epochs=10) == pytest.approx(m, abs=1e-15)
    # DINO: the cosine_scheduler array from base to 1 over epochs * iterations.
    iters = np.arange(3 * 5)
    sched = 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * iters / len(iters)))
    np.testing.assert_allclose([state.dino_momentum(i, total_steps=15) for i in iters], sched, rtol=1e-15)
    with pytest.raises(ValueError, match="step must be in"):
        state.dino_momentum(15, total_steps=15)


# -- op-specific shape and argument errors ------------------------------------------------------------


def _m(*shape, dtype=np.float64):
    return np.ones(shape, dtype=dtype)


@pytest.mark.parametrize("call,err,match", [
    (lambda: op("byol").forward(_m(3, 4), _m(3, 4), _m(3, 4), _m(3, 5)),
     ValueError, r"p1 and t2 must have the same shape"),
    (lambda: op("byol").forward(_m(3, 4), _m(2, 4), _m(3, 4), _m(3, 4)), ValueError, r"p1 and p2"),
    (lambda: op("byol").forward(_m(3, 4), _m(3, 4), _m(3, 4), _m(3, 4, dtype=np.float32)),
     TypeError, "same dtype"),
    (lambda: op("byol").forward(_m(4), _m(4), _m(4), _m(4)), ValueError, r"p1 must have shape \(N, D\)"),
    (lambda: op("neg_cosine").forward(_m(3, 4), _m(4, 3)), ValueError, "p and z must have the same shape"),
    (lambda: op("simsiam").forward(_m(3, 4), _m(3, 4), _m(3, 2), _m(3, 4)), ValueError, "p1 and z1"),
    (lambda: op("moco_v3").forward(_m(3, 4), _m(3, 4), _m(5, 4), _m(3, 4)), ValueError, "q1 and k1"),
    (lambda: op("moco_queue").forward(_m(3, 4), _m(3, 4), _m(8, 5)),
     ValueError, r"queue must have shape \(K, 4\)"),
    (lambda: op("moco_queue").forward(_m(3, 4), _m(2, 4), _m(8, 4)), ValueError, "q and k"),
    (lambda: op("dino").forward(_m(3, 4, 5), _m(2, 3, 5), _m(5)),
     ValueError, r"teacher must have shape \(V_t, 4, 5\)"),
    (lambda: op("dino").forward(_m(3, 4, 5), _m(2, 4, 5), _m(6)),
     ValueError, r"center must have shape \(5,\) or \(1, 5\)"),
    (lambda: op("dino").forward(_m(3, 4, 5), _m(2, 4, 5), _m(2, 5)), ValueError, "center must have shape"),
    (lambda: op("dino").forward(_m(4, 5), _m(2, 4, 5), _m(5)),
     ValueError, r"student must have shape \(V_s, N, K\)"),
    (lambda: op("dino").forward(_m(1, 4, 5), _m(1, 4, 5), _m(5)), ValueError, "no pair of different views"),
    (lambda: op("nnclr").forward(_m(3, 4), _m(3, 4), _m(3, 4), _m(3, 4), _m(6, 3)),
     ValueError, r"support must have shape \(Q, 4\)"),
    (lambda: op("nnclr").forward(_m(3, 4), _m(3, 4), _m(2, 4), _m(3, 4), _m(6, 4)), ValueError, "p1 and z1"),
    (lambda: op("mean_shift").forward(_m(3, 4), _m(3, 4), _m(2, 4)),
     ValueError, "bank must have at least N = 3 rows"),
    (lambda: op("mean_shift").forward(_m(3, 4), _m(3, 4), _m(6, 5)),
     ValueError, r"bank must have shape \(M, 4\)"),
    (lambda: op("mean_shift").forward(_m(3, 4), _m(3, 4), _m(6, 4), k=7), ValueError, "k must be <= 6"),
    (lambda: op("mean_shift").forward(_m(3, 4), _m(3, 4), _m(6, 4), k=0), ValueError, "k must be >= 1"),
    (lambda: op("mean_shift").forward(_m(3, 4), _m(3, 4), _m(6, 4), k=2.0),
     TypeError, "k must be an integer"),
    (lambda: op("mean_shift").forward(_m(3, 4), _m(3, 4), _m(6, 4), ptr=6),
     ValueError, r"ptr must be in \[0, 6\)"),
    (lambda: op("mean_shift").forward(_m(3, 4), _m(2, 4), _m(6, 4)), ValueError, "query and target"),
    (lambda: state.dino_center_update(_m(5), _m(2, 3, 4)),
     ValueError, r"teacher must have shape \(V_t, N, 5\)"),
    (lambda: state.dino_teacher_temperature(-1), ValueError, "epoch must be >= 0"),
])
def test_shape_and_argument_errors(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("name", OPS)
def test_backward_accepts_python_float_and_0d_array(name):
    args, kwargs = op(name).example(np.random.default_rng(30), np.float32)
    out, cache = op(name).forward(*args, **kwargs)
    a = op(name).backward(cache, 2.0)
    b = op(name).backward(cache, np.asarray(2.0, dtype=np.float32))
    for x, y in zip(a, b):
        if x is not None:
            assert x.dtype == np.float32
            np.testing.assert_array_equal(x, y)
