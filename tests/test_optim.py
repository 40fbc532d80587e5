"""Optimiser updates against steps computed by hand; schedule values from the formula's fixed points."""

import math

import numpy as np
import pytest

from refssl import optim


def _one(value, name="l.w", dtype=np.float64):
    return {name: np.array(value, dtype=dtype)}


def test_sgd_momentum_weight_decay_two_steps():
    opt = optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.1)
    p, g = _one([1.0]), _one([0.5])
    s = opt.init(p)
    p, s = opt.step(p, g, s)
    # g' = 0.5 + 0.1*1 = 0.6; v = 0.6; w = 1 - 0.1*0.6
    np.testing.assert_allclose(p["l.w"], [0.94], rtol=1e-14)
    p, s = opt.step(p, g, s)
    # g' = 0.5 + 0.1*0.94 = 0.594; v = 0.9*0.6 + 0.594 = 1.134; w = 0.94 - 0.1134
    np.testing.assert_allclose(p["l.w"], [0.8266], rtol=1e-14)
    np.testing.assert_allclose(s["momentum/l.w"], [1.134], rtol=1e-14)
    assert int(s["step"]) == 2


def test_sgd_nesterov_first_step():
    opt = optim.SGD(lr=0.1, momentum=0.9, nesterov=True)
    p, s = opt.step(_one([1.0]), _one([0.6]), opt.init(_one([1.0])))
    # v = 0.6; update = g + mu v = 0.6 + 0.54 = 1.14
    np.testing.assert_allclose(p["l.w"], [1.0 - 0.114], rtol=1e-14)


def test_adam_two_steps_with_bias_correction():
    opt = optim.Adam(lr=0.01, betas=(0.9, 0.999), eps=0.0)
    p = _one([1.0])
    s = opt.init(p)
    p, s = opt.step(p, _one([1.0]), s)
    # first step: mhat = g, vhat = g^2 -> update lr * sign(g)
    np.testing.assert_allclose(p["l.w"], [0.99], rtol=1e-14)
    p, s = opt.step(p, _one([-1.0]), s)
    # m = 0.9*0.1 - 0.1 = -0.01, mhat = -0.01 / 0.19; v = 0.999*0.001 + 0.001 = 0.001999, vhat = 1
    np.testing.assert_allclose(p["l.w"], [0.99 + 0.01 * 0.01 / 0.19], rtol=1e-13)


def test_adam_coupled_vs_adamw_decoupled_weight_decay():
    p, g = _one([2.0]), _one([0.5])
    adam = optim.Adam(lr=0.01, weight_decay=0.1, eps=0.0)
    adamw = optim.AdamW(lr=0.01, weight_decay=0.1, eps=0.0)
    pa, _ = adam.step(p, g, adam.init(p))
    pw, _ = adamw.step(p, g, adamw.init(p))
    # Adam: g' = 0.5 + 0.2 > 0, first step moves by lr: 1.99.
    np.testing.assert_allclose(pa["l.w"], [1.99], rtol=1e-14)
    # AdamW: w <- 2 (1 - 0.01*0.1) = 1.998, then the Adam step on g: 1.988.
    np.testing.assert_allclose(pw["l.w"], [1.988], rtol=1e-14)


def test_lars_trust_ratio_and_exclusion():
    w = np.array([3.0, 4.0])        # ||w|| = 5
    g = np.array([0.8, -0.6])       # ||g|| = 1, orthogonal to w
    params = {"enc.0.w": w, "enc.0.b": w.copy(), "enc.1.gamma": w.copy(), "enc.1.beta": w.copy()}
    grads = {k: g.copy() for k in params}
    opt = optim.LARS(lr=1.0, momentum=0.9, weight_decay=0.0, eta=1e-3)
    p, s = opt.step(params, grads, opt.init(params))
    np.testing.assert_allclose(p["enc.0.w"], w - 0.005 * g, rtol=1e-14)   # trust = 1e-3 * 5 / 1
    for k in ("enc.0.b", "enc.1.gamma", "enc.1.beta"):                      # excluded: plain momentum SGD
        np.testing.assert_allclose(p[k], w - g, rtol=1e-14)
    # With weight decay 0.1: g' = g + 0.1 w = [1.1, -0.2], ||g'|| = sqrt(1.25); trust = 0.005 / sqrt(1.25)
    opt = optim.LARS(lr=1.0, momentum=0.9, weight_decay=0.1, eta=1e-3)
    p, s = opt.step(params, grads, opt.init(params))
    np.testing.assert_allclose(p["enc.0.w"], w - 0.005 / math.sqrt(1.25) * np.array([1.1, -0.2]), rtol=1e-13)
    np.testing.assert_allclose(p["enc.0.b"], w - g, rtol=1e-14)            # no decay on the bias either
    # Second step: momentum accumulates the scaled update.
    p2, _ = opt.step(p, grads, s)
    w1 = p["enc.0.w"]
    gd = g + 0.1 * w1
    v = 0.9 * s["momentum/enc.0.w"] + 1e-3 * np.linalg.norm(w1) / np.linalg.norm(gd) * gd
    np.testing.assert_allclose(p2["enc.0.w"], w1 - v, rtol=1e-13)


def test_lars_zero_norm_falls_back_to_trust_one():
    opt = optim.LARS(lr=0.5, weight_decay=0.0)
    p = {"l.w": np.zeros(2)}
    out, _ = opt.step(p, {"l.w": np.array([1.0, 2.0])}, opt.init(p))
    np.testing.assert_allclose(out["l.w"], [-0.5, -1.0])


def test_bias_or_norm_rule():
    assert optim.bias_or_norm("enc.0.b") and optim.bias_or_norm("proj.1.gamma")
    assert optim.bias_or_norm("proj.1.beta") and optim.bias_or_norm("head.bias")
    assert not optim.bias_or_norm("enc.0.w") and not optim.bias_or_norm("enc.beta_logit.w")
    opt = optim.SGD(lr=1.0, momentum=0.0, weight_decay=0.5, exclude=optim.bias_or_norm)
    p = {"a.w": np.ones(1), "a.b": np.ones(1)}
    out, _ = opt.step(p, {k: np.zeros(1) for k in p}, opt.init(p))
    np.testing.assert_allclose(out["a.w"], [0.5])
    np.testing.assert_allclose(out["a.b"], [1.0])


@pytest.mark.parametrize("opt", [optim.SGD(lr=0.1, weight_decay=0.1), optim.Adam(weight_decay=0.1),
                                 optim.AdamW(), optim.LARS(weight_decay=0.1)], ids=repr)
def test_step_is_pure_and_keeps_dtype(opt):
    rng = np.random.default_rng(0)
    params = {"a.w": rng.standard_normal((3, 2)).astype(np.float32), "a.b": rng.standard_normal(2).astype(np.float32)}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    state = opt.init(params)
    copies = [{k: v.copy() for k, v in d.items()} for d in (params, grads, state)]
    p1, s1 = opt.step(params, grads, state)
    p2, s2 = opt.step(p1, grads, s1)
    for d, c in zip((params, grads, state), copies):
        assert d.keys() == c.keys() and all(np.array_equal(d[k], c[k]) for k in d)
    assert all(p2[k].dtype == np.float32 for k in p2)
    assert all(v.dtype == np.float32 for k, v in s2.items() if k != "step")
    assert not np.allclose(p2["a.w"], params["a.w"])


def test_step_rejects_mismatched_or_nonfinite_grads():
    opt = optim.SGD()
    p = {"a.w": np.ones(2)}
    s = opt.init(p)
    with pytest.raises(ValueError, match="missing"):
        opt.step(p, {}, s)
    with pytest.raises(ValueError, match="shape"):
        opt.step(p, {"a.w": np.ones(3)}, s)
    with pytest.raises(ValueError, match="NaN"):
        opt.step(p, {"a.w": np.array([1.0, np.nan])}, s)
    with pytest.raises(ValueError, match="lr"):
        optim.SGD(lr=0.0)


def test_cosine_schedule_fixed_points():
    sch = optim.CosineSchedule(base_lr=2.0, total_steps=110, warmup_steps=10, final_lr=0.2)
    assert sch(0) == pytest.approx(0.2)           # 2 * 1/10
    assert sch(4) == pytest.approx(1.0)           # 2 * 5/10
    assert sch(9) == pytest.approx(2.0)           # end of warm-up
    assert sch(10) == pytest.approx(2.0)          # start of the cosine
    assert sch(60) == pytest.approx(1.1)          # half-way: (2 + 0.2) / 2
    assert sch(110) == pytest.approx(0.2)         # end
    assert sch(500) == pytest.approx(0.2)
    values = [sch(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up
    nowarm = optim.CosineSchedule(1.0, 100)
    assert nowarm(0) == 1.0 and nowarm(100) == 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.CosineSchedule(1.0, 10, warmup_steps=10)


@pytest.mark.parametrize("cls,wd", [("Adam", 0.0), ("Adam", 0.1), ("AdamW", 0.05)])
def test_adam_matches_torch_over_several_steps(cls, wd):
    torch = pytest.importorskip("torch", reason="torch not installed: the cross-check against torch.optim skips")
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(5)]
    opt = getattr(optim, cls)(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    params, state = {"w": w0.copy()}, None
    state = opt.init(params)
    tw = torch.tensor(w0.copy(), requires_grad=True)
    topt = getattr(torch.optim, cls)([tw], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    for g in grads:
        params, state = opt.step(params, {"w": g}, state)
        tw.grad = torch.tensor(g)
        topt.step()
        np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_adam_on_a_zero_dim_parameter_keeps_arrays():
    opt = optim.Adam(lr=0.1)
    p = {"scale": np.array(2.0, np.float32)}
    s = opt.init(p)
    for _ in range(2):
        p, s = opt.step(p, {"scale": np.array(0.5, np.float32)}, s)
    assert isinstance(p["scale"], np.ndarray) and p["scale"].dtype == np.float32
    np.testing.assert_allclose(p["scale"], 1.8, rtol=1e-6)  # two steps of lr against a constant gradient
