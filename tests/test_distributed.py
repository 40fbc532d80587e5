"""refssl.distributed: K ranks reproduce the single-process loss and gradient; the port bugs do not.

The single-process reference is the registered op on the global batch (independent code); the rank
gradients are also checked by central differences of the rank losses.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from refssl import distributed as D
from refssl import registry
from refssl.state import dino_center_update

METHOD_NAMES = sorted(D.METHODS)
ARG_NAMES = {"moco_v3": ("q1", "q2", "k1", "k2"), "clip": ("img", "txt", "logit_scale"),
             "supcon": ("z", "labels")}


def _inputs(method, rng, n_g, d):
    """Global arrays and hyperparameters, away from saturated softmaxes."""
    f = lambda *s: rng.normal(size=s)  # noqa: E731
    if method == "info_nce":
        return (f(n_g, d), f(n_g, d)), {"temperature": float(rng.uniform(0.2, 1.0))}
    if method == "clip":
        return (f(n_g, d), f(n_g, d), np.asarray(rng.uniform(0.0, 1.5))), {}
    if method == "supcon":
        labels = rng.integers(0, max(2, n_g // 2), size=n_g)
        return (f(n_g, 2, d), labels), {"temperature": float(rng.uniform(0.2, 1.0))}
    if method == "moco_v3":
        return (f(n_g, d), f(n_g, d), f(n_g, d), f(n_g, d)), {"temperature": float(rng.uniform(0.2, 1.0))}
    if method == "barlow_twins":
        return (f(n_g, d), f(n_g, d) + 0.5 * f(n_g, d)), {"lambd": float(rng.uniform(0.01, 0.2))}
    if method == "vicreg":
        # some std below 1 so the hinge is active, covariances non-zero
        x = f(n_g, d) * rng.uniform(0.3, 1.5, size=d)
        return (x, x + 0.5 * f(n_g, d)), {}
    raise AssertionError(method)


def _single(method, arrays, hyper):
    op = registry.get(method)
    out, cache = op.forward(*arrays, **hyper)
    return float(out), op.backward(cache, np.asarray(1.0))


def _names(method):
    return ARG_NAMES.get(method, D.METHODS[method].sharded)


@pytest.mark.parametrize("method", METHOD_NAMES)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 4), n=st.integers(2, 4))
def test_ranks_reproduce_single_process(method, seed, k, n):
    rng = np.random.default_rng(seed)
    arrays, hyper = _inputs(method, rng, k * n, int(rng.integers(2, 6)))
    res = D.run(method, k, *arrays, **hyper)
    loss, grads = _single(method, arrays, hyper)
    # 1. the mean of the rank losses is the single-process loss
    assert np.mean(res.losses) == pytest.approx(loss, rel=1e-12, abs=1e-13)
    # 2. own rows: K x the single-process slice; a replicated input: its DDP mean is the single one
    for name, g in zip(_names(method), grads):
        if g is None:
            assert all(name not in gr for gr in res.grads)
            continue
        if name in D.METHODS[method].replicated:
            np.testing.assert_allclose(np.mean([gr[name] for gr in res.grads]), g, rtol=1e-11, atol=1e-13)
            continue
        scale = np.abs(g).max()
        for r in range(k):
            np.testing.assert_allclose(res.grads[r][name], k * g[r * n:(r + 1) * n], rtol=1e-10,
                                       atol=1e-12 * k * scale)


def _rank_args(method, arrays, k, r):
    m = D.METHODS[method]
    glob = dict(zip(_names(method), arrays))
    return ([D.shard(glob[nm], k)[r] for nm in m.sharded] + [glob[nm] for nm in m.gathered]
            + [glob[nm] for nm in m.replicated])


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_rank_backward_matches_central_differences(method):
    """Every positional gradient of one rank (local, gathered, replicated) by central differences."""
    rng = np.random.default_rng(7)
    k, n = 3, 2
    arrays, hyper = _inputs(method, rng, k * n, 3)
    m = D.METHODS[method]
    args = _rank_args(method, arrays, k, 1)
    _, cache = m.forward(*args, rank=1, **hyper)
    grads = m.backward(cache, 0.7)
    for i, (a, g) in enumerate(zip(args, grads)):
        if g is None:
            continue
        num = np.zeros_like(a, dtype=np.float64)
        h = 1e-6
        for idx in np.ndindex(a.shape):
            plus, minus = [x.copy() for x in args], [x.copy() for x in args]
            plus[i][idx] += h
            minus[i][idx] -= h
            num[idx] = 0.7 * (float(m.forward(*plus, rank=1, **hyper)[0])
                              - float(m.forward(*minus, rank=1, **hyper)[0])) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8, err_msg=f"{method} argument {i}")


def test_dino_center_update_sharded_equals_single_process():
    rng = np.random.default_rng(3)
    center, teacher = rng.normal(size=5), rng.normal(size=(2, 8, 5))
    want = dino_center_update(center, teacher, momentum=0.9)
    for k in (1, 2, 4):
        for c in D.dino_center_update_sharded(center, D.shard(teacher, k, axis=1), momentum=0.9):
            np.testing.assert_allclose(c, want, rtol=1e-14)


def test_rank_checks_reject_bad_shards():
    z = np.zeros((6, 3)) + np.arange(3)
    with pytest.raises(ValueError, match="rank"):
        D.info_nce_rank(z[:2], z[:2], z, z, rank=3)
    with pytest.raises(ValueError, match="z1_all"):
        D.info_nce_rank(z[:4], z[:4], z, z, rank=0)
    with pytest.raises(ValueError, match="divisible"):
        D.shard(z, 4)


# ------------------------------------------------------------------------------------ port bugs
K, N, DIM = 3, 4, 5


def _spec_and(method, seed=11, **kw):
    arrays, hyper = _inputs(method, np.random.default_rng(seed), K * N, DIM)
    return arrays, hyper, D.run(method, K, *arrays, **hyper), D.run(method, K, *arrays, **hyper, **kw)


@pytest.mark.parametrize("method", ["info_nce", "clip", "supcon", "vicreg"])
def test_gather_without_gradient_loses_the_other_ranks_terms(method):
    """torch.distributed.all_gather: same losses, different gradients (not a constant factor)."""
    for splice in (False, True):
        def reduce(lg, gg, splice=splice):
            return D.reduce_gradients_no_grad_gather(lg, gg, splice_local=splice)
        arrays, hyper, spec, bug = _spec_and(method, reduce=reduce)
        assert bug.losses == spec.losses
        name = _names(method)[0]
        for r in range(K):
            ratio = bug.grads[r][name] / spec.grads[r][name]
            assert np.abs(bug.grads[r][name] - spec.grads[r][name]).max() > 1e-3 * np.abs(
                spec.grads[r][name]).max()
            assert np.ptp(ratio) > 1e-2, "not a constant factor either"


def test_gather_without_gradient_spliced_is_exact_for_its_own_terms():
    """splice_local=True keeps exactly the rank's own terms: spec - bug = the other ranks' gathered
    gradients of these rows."""
    arrays, hyper = _inputs("info_nce", np.random.default_rng(5), K * N, DIM)
    args = [_rank_args("info_nce", arrays, K, r) for r in range(K)]
    gs = [D.info_nce_rank_backward(D.info_nce_rank(*a, rank=r, **hyper)[1]) for r, a in enumerate(args)]
    local, gathered = [g[0] for g in gs], [g[2] for g in gs]   # z1: local path, gathered path
    bug = D.reduce_gradients_no_grad_gather(local, gathered, splice_local=True)
    spec = D.reduce_gradients(local, gathered)
    plain = D.reduce_gradients_no_grad_gather(local, gathered)
    for r in range(K):
        others = sum(gs[s][2][r * N:(r + 1) * N] for s in range(K) if s != r)
        np.testing.assert_allclose(spec[r] - bug[r], others, atol=1e-14)
        np.testing.assert_array_equal(plain[r], local[r])


def test_local_negatives_only_changes_the_loss():
    arrays, hyper = _inputs("info_nce", np.random.default_rng(2), K * N, DIM)
    spec = D.run("info_nce", K, *arrays, **hyper)
    z1s, z2s = D.shard(arrays[0], K), D.shard(arrays[1], K)
    bug = [float(D.info_nce_rank_local_negatives(a, b, **hyper)[0]) for a, b in zip(z1s, z2s)]
    single, _ = _single("info_nce", arrays, hyper)
    assert np.mean(spec.losses) == pytest.approx(single, rel=1e-12)
    # fewer negatives in each denominator: every rank's loss is lower
    assert all(b < s - 1e-3 for b, s in zip(bug, spec.losses))
    # and it is the single-process loss of a K-times smaller batch, nothing else
    assert bug[1] == pytest.approx(_single("info_nce", (z1s[1], z2s[1]), hyper)[0], rel=1e-12)


@pytest.mark.parametrize("method,variant", [("info_nce", D.info_nce_rank_labels_not_offset),
                                            ("moco_v3", D.moco_v3_rank_labels_not_offset)])
def test_labels_not_offset_by_rank(method, variant):
    """Rank 0's loss is unaffected, every rank > 0's loss differs.  Gradients: with gathered
    columns (info_nce) the wrong targets of ranks > 0 reach rank 0's rows through the gather's
    backward too; moco_v3's keys carry no gradient, so its rank 0 gradient stays right."""
    arrays, hyper, spec, bug = _spec_and(method, forward=variant)
    name = _names(method)[0]
    assert bug.losses[0] == spec.losses[0]
    if method == "moco_v3":
        np.testing.assert_array_equal(bug.grads[0][name], spec.grads[0][name])
    else:
        assert not np.allclose(bug.grads[0][name], spec.grads[0][name], rtol=1e-3)
    for r in range(1, K):
        assert abs(bug.losses[r] - spec.losses[r]) > 1e-2
        assert not np.allclose(bug.grads[r][name], spec.grads[r][name], rtol=1e-3)
    assert abs(np.mean(bug.losses) - _single(method, arrays, hyper)[0]) > 1e-2


def test_barlow_twins_per_rank_batch_norm():
    arrays, hyper, spec, bug = _spec_and("barlow_twins", forward=D.barlow_twins_rank_per_rank_bn)
    single = _single("barlow_twins", arrays, hyper)[0]
    assert spec.losses == [pytest.approx(single, rel=1e-12)] * K
    assert abs(bug.losses[0] - single) > 1e-2 * single
    # equal when every shard has the global statistics: shards are row permutations of one block
    rng = np.random.default_rng(4)
    z1, z2 = rng.normal(size=(N, DIM)), rng.normal(size=(N, DIM))
    perms = [rng.permutation(N) for _ in range(K)]
    g1, g2 = np.concatenate([z1[p] for p in perms]), np.concatenate([z2[p] for p in perms])
    spec = D.run("barlow_twins", K, g1, g2, **hyper)
    bug = D.run("barlow_twins", K, g1, g2, forward=D.barlow_twins_rank_per_rank_bn, **hyper)
    np.testing.assert_allclose(bug.losses, spec.losses, rtol=1e-12)
    for r in range(K):
        np.testing.assert_allclose(bug.grads[r]["z1"], spec.grads[r]["z1"], rtol=1e-9, atol=1e-12)


def test_barlow_twins_per_rank_batch_norm_backward():
    """The variant's own backward, by central differences of its loss."""
    arrays, hyper = _inputs("barlow_twins", np.random.default_rng(8), 2 * 3, 3)
    args = _rank_args("barlow_twins", arrays, 2, 0)
    _, cache = D.barlow_twins_rank_per_rank_bn(*args, rank=0, **hyper)
    g = D.barlow_twins_rank_backward(cache)[2]
    num = np.zeros_like(args[2])
    for idx in np.ndindex(num.shape):
        p, m = [a.copy() for a in args], [a.copy() for a in args]
        p[2][idx] += 1e-6
        m[2][idx] -= 1e-6
        num[idx] = (float(D.barlow_twins_rank_per_rank_bn(*p, rank=0, **hyper)[0])
                    - float(D.barlow_twins_rank_per_rank_bn(*m, rank=0, **hyper)[0])) / 2e-6
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_raw_all_reduce_gives_one_over_k(k):
    """Barlow Twins with a raw all_reduce: the rank gradients are exactly 1/K of the spec (so the
    single-process slice, and 1/K of the single-process update after DDP's mean)."""
    arrays, hyper = _inputs("barlow_twins", np.random.default_rng(k), k * N, DIM)
    spec = D.run("barlow_twins", k, *arrays, **hyper)
    bug = D.run("barlow_twins", k, *arrays, reduce=D.reduce_gradients_raw_all_reduce, **hyper)
    _, single = _single("barlow_twins", arrays, hyper)
    assert bug.losses == spec.losses
    for r in range(k):
        for i, nm in enumerate(("z1", "z2")):
            np.testing.assert_allclose(bug.grads[r][nm], spec.grads[r][nm] / k, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(bug.grads[r][nm], single[i][r * N:(r + 1) * N], rtol=1e-10,
                                       atol=1e-14)


def test_dino_center_without_all_reduce_drifts_per_rank():
    rng = np.random.default_rng(9)
    center, teacher = rng.normal(size=6), rng.normal(size=(2, 3 * K, 6))
    spec = D.dino_center_update_sharded(center, D.shard(teacher, K, axis=1), momentum=0.9)
    bug = D.dino_center_update_local(center, D.shard(teacher, K, axis=1), momentum=0.9)
    for c in bug:
        assert np.abs(c - spec[0]).max() > 1e-3
    np.testing.assert_allclose(np.mean(bug, axis=0), spec[0], rtol=1e-12)  # linear: the mean agrees
