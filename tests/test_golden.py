"""Golden vectors (now the spec suites, `golden` an alias of `spec`): complete, faithful to the ops, loadable."""

import numpy as np
import pytest

from refssl import golden, registry


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    golden.export(out, seed=5)
    return out


@pytest.mark.parametrize("name", registry.names())
def test_golden_vectors_reproduce_forward_and_backward(exported, name):
    op = registry.get(name)
    args, kwargs, expected = golden.load(exported, name)
    out, cache = op.forward(*args, **kwargs)
    np.testing.assert_allclose(out, expected["out"], rtol=1e-13, atol=1e-15)
    g = expected["grad_out"]
    grads = op.backward(cache, g if g.ndim else float(g))
    for k in range(len(args)):
        if k in op.differentiable:
            np.testing.assert_allclose(grads[k], expected[f"grad{k}"], rtol=1e-12, atol=1e-14)
        else:
            assert f"grad{k}" not in expected and grads[k] is None


def test_cli_exports_named_ops(tmp_path):
    """`golden` is an alias of `spec`: one file per case of the named op, plus the manifest."""
    from refssl.__main__ import main
    from refssl.conformance import build_cases

    assert main(["golden", "info_nce", "--out", str(tmp_path)]) == 0
    expected = sorted(f"info_nce.{c.name}.{c.dtype}.npz" for c in build_cases("info_nce")) + ["manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
