"""Conformance kit (issue 12): spec suites that are complete and non-degenerate, an export readable
without refssl, and a checker that passes independent ports, names known scale conventions and
explains wrong gradients; the command line's exit codes and one-line errors.

The ports below are written independently in numpy (and torch, when installed) from the formulas in
the op docstrings; ports with a known bug are built from them by scaling or breaking one thing.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refssl import gradcheck, registry
from refssl import __main__ as cli
from refssl.conformance import UsageError, build_cases, check, conventions, degeneracies, edges, export
from refssl.conformance.cases import STOP_GRADIENT, argument_names
from refssl.conformance.suite import load_cases, load_manifest
from refssl.conformance.tolerance import KAPPA_MAX

ROOT = Path(__file__).resolve().parents[1]
OPS = registry.names()


# ------------------------------------------------------------------------------------ ports under test

def _unit(x):
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / n, n


def _unit_backward(u, n, gu):
    return (gu - u * np.sum(u * gu, axis=1, keepdims=True)) / n


def np_info_nce(z1, z2, temperature=0.1):
    """NT-Xent at the paper scale: mean over the 2N anchors of CE over the 2N - 1 other rows."""
    m = 2 * z1.shape[0]
    u, norms = _unit(np.concatenate([z1, z2]))
    s = u @ u.T / temperature
    np.fill_diagonal(s, -np.inf)
    pos = (np.arange(m) + m // 2) % m
    mx = s.max(axis=1, keepdims=True)
    e = np.exp(s - mx)
    loss = np.mean(np.log(e.sum(axis=1)) + mx[:, 0] - s[np.arange(m), pos])
    grad_s = e / e.sum(axis=1, keepdims=True)
    grad_s[np.arange(m), pos] -= 1
    grad_s /= m * temperature
    g = _unit_backward(u, norms, (grad_s + grad_s.T) @ u)
    return loss, (g[: m // 2], g[m // 2:])


def np_info_nce_official(z1, z2, temperature=0.1):
    """The SimCLR TF code's scale: the two-direction sum averaged over N anchors."""
    loss, (g1, g2) = np_info_nce(z1, z2, temperature)
    return 2 * loss, (2 * g1, 2 * g2)


def np_info_nce_one_view_grad(z1, z2, temperature=0.1):
    loss, (g1, _) = np_info_nce(z1, z2, temperature)
    return loss, (g1, None)


def np_info_nce_naive(z1, z2, temperature=0.1):
    """exp of raw logits: overflows float32 at temperature 0.01."""
    m = 2 * z1.shape[0]
    u, _ = _unit(np.concatenate([z1, z2]))
    e = np.exp(u @ u.T / temperature) * (1 - np.eye(m, dtype=z1.dtype))
    pos = (np.arange(m) + m // 2) % m
    loss = -np.mean(np.log(e[np.arange(m), pos] / e.sum(axis=1)))
    return loss, np_info_nce(z1, z2, temperature)[1]


def np_barlow_twins(z1, z2, lambd=0.0051, eps=1e-5):
    n = z1.shape[0]
    sig1 = np.sqrt(z1.var(axis=0) + eps)
    sig2 = np.sqrt(z2.var(axis=0) + eps)
    s1, s2 = (z1 - z1.mean(axis=0)) / sig1, (z2 - z2.mean(axis=0)) / sig2
    c = s1.T @ s2 / n
    off = c - np.diag(np.diag(c))
    loss = np.sum((1 - np.diag(c)) ** 2) + lambd * np.sum(off ** 2)
    g = 2 * lambd * off + np.diag(-2 * (1 - np.diag(c)))

    def bn_back(s, sig, gs):
        return (gs - gs.mean(axis=0) - s * np.mean(gs * s, axis=0)) / sig

    return loss, (bn_back(s1, sig1, s2 @ g.T / n), bn_back(s2, sig2, s1 @ g / n))


def np_barlow_solo_learn(z1, z2, lambd=0.0051):
    loss, (g1, g2) = np_barlow_twins(z1, z2, lambd)
    return 0.025 * loss, (0.025 * g1, 0.025 * g2)


def np_byol(p1, p2, t1, t2):
    """Official BYOL: mean over samples of ||p̂1 - t̂2||² + ||p̂2 - t̂1||²; targets get no gradient."""
    n = p1.shape[0]
    (a, na), (b, nb) = _unit(p1), _unit(p2)
    c, d = _unit(t1)[0], _unit(t2)[0]
    loss = np.mean(np.sum((a - d) ** 2, axis=1) + np.sum((b - c) ** 2, axis=1))
    return loss, (_unit_backward(a, na, 2 * (a - d) / n), _unit_backward(b, nb, 2 * (b - c) / n), None, None)


def np_byol_lightly(p1, p2, t1, t2):
    """lightly's example: -1/2 (mean cos(p1, t2) + mean cos(p2, t1))."""
    loss, grads = np_byol(p1, p2, t1, t2)
    return 0.25 * loss - 1.0, tuple(None if g is None else 0.25 * g for g in grads)


def np_byol_no_stop_gradient(p1, p2, t1, t2):
    """Lets the regression pull the targets too (a missing stop-gradient)."""
    n = p1.shape[0]
    loss, (g1, g2, _, _) = np_byol(p1, p2, t1, t2)
    (c, nc), (d, nd) = _unit(t1), _unit(t2)
    a, b = _unit(p1)[0], _unit(p2)[0]
    return loss, (g1, g2, _unit_backward(c, nc, 2 * (c - b) / n), _unit_backward(d, nd, 2 * (d - a) / n))


def np_byol_no_projection(p1, p2, t1, t2):
    """Forgets the L2-normalisation Jacobian: right value, wrong gradient."""
    n = p1.shape[0]
    loss, _ = np_byol(p1, p2, t1, t2)
    (a, na), (b, nb) = _unit(p1), _unit(p2)
    c, d = _unit(t1)[0], _unit(t2)[0]
    return loss, (2 * (a - d) / n / na, 2 * (b - c) / n / nb, None, None)


def np_byol_float64(p1, p2, t1, t2):
    loss, grads = np_byol(*(a.astype(np.float64) for a in (p1, p2, t1, t2)))
    return loss, grads


def np_linear(x, w, b, grad_out):
    """A layer: takes the upstream gradient."""
    flat = x.reshape(-1, x.shape[-1])
    g = grad_out.reshape(-1, w.shape[1])
    return x @ w + b, ((g @ w.T).reshape(x.shape), flat.T @ g, g.sum(axis=0))


def _refssl_port(name, factor=1.0, offset=0.0, **override):
    """A port made from refssl itself with a known change (to test the diagnosis, not refssl)."""
    op = registry.get(name)

    def port(*arrays, **hyper):
        out, cache = op.forward(*arrays, **{**hyper, **override})
        grads = op.backward(cache, 1.0)
        return factor * out + offset, tuple(None if g is None else factor * g for g in grads)

    return port


def torch_info_nce(z1, z2, temperature=0.1):
    import torch
    import torch.nn.functional as F

    n = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (u @ u.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, (torch.arange(2 * n) + n) % (2 * n))


class TorchSimSiam:
    """A loss class: constructed with the hyperparameters it accepts (none), then called."""

    def __call__(self, p1, p2, z1, z2):
        import torch.nn.functional as F

        d = F.cosine_similarity
        return -0.5 * (d(p1, z2.detach(), dim=1).mean() + d(p2, z1.detach(), dim=1).mean())


def torch_byol_without_detach(p1, p2, t1, t2):
    import torch.nn.functional as F

    def reg(p, t):
        return ((F.normalize(p, dim=1) - F.normalize(t, dim=1)) ** 2).sum(1)

    return (reg(p1, t2) + reg(p2, t1)).mean()


# ------------------------------------------------------------------------------- suites: completeness

def test_every_registered_op_has_family_edge_cases_or_an_explicit_opt_out():
    for name in OPS:
        fam = edges.family_of(name)
        assert fam is not None, f"{name}: declare it in a family of refssl/conformance/edges/"
        reason = edges.example_only_reason(name)
        assert edges.edges_for(name) or reason, f"{name}: declare edge cases or example_only(op, reason)"
        assert not (edges.edges_for(name) and reason), f"{name}: edge cases and an example-only opt-out"
    declared = {op for f in edges.families().values() for op in f.ops()}
    assert declared <= set(OPS), f"declared but not registered: {sorted(declared - set(OPS))}"


def test_stop_gradient_table_names_non_differentiable_arguments():
    for name, inputs in STOP_GRADIENT.items():
        args = argument_names(name)
        diff = {args[k] for k in registry.get(name).differentiable}
        assert set(inputs) <= set(args) - diff, name


@pytest.mark.parametrize("name", OPS)
def test_suite_cases_are_named_complete_and_non_degenerate(name):
    cases = build_cases(name)
    args = argument_names(name)
    op = registry.get(name)
    by_key = {}
    for case in cases:
        by_key.setdefault(case.name, set()).add(case.dtype)
        assert list(case.inputs) == list(args[:len(case.inputs)])
        assert case.differentiable == tuple(args[k] for k in op.differentiable)
        assert set(case.expected_grads) == set(case.differentiable)
        for a in case.inputs.values():
            if np.issubdtype(a.dtype, np.floating):
                assert a.dtype == np.dtype(case.dtype)
        assert case.expected_out.dtype == np.float64
        assert np.shape(case.upstream) == case.expected_out.shape
        problems = degeneracies(name, case.inputs, case.differentiable, case.expected_out, case.expected_grads,
                                case.upstream)
        assert not problems, f"{case.id}: {problems}"
        assert case.tolerance_basis["kappa"] <= KAPPA_MAX
        assert case.tolerance <= (1e-2 if case.dtype == "float32" else 1e-6), case.id
        json.dumps(case.hyper)  # plain JSON
    assert all(v == {"float32", "float64"} for v in by_key.values())
    expected_names = ["example"] + [e.name for e in edges.edges_for(name)]
    assert list(by_key) == expected_names


def test_degeneracy_check_rejects_the_old_golden_cases():
    """Pooling with kernel 1 is the identity; SupCon with every label equal has no negatives."""
    x = np.arange(12.0).reshape(1, 1, 3, 4)
    out, cache = registry.get("avg_pool2d").forward(x, kernel=1, stride=1)
    g = np.ones_like(out)
    (gx,) = registry.get("avg_pool2d").backward(cache, g)
    assert "output equals input x" in degeneracies("avg_pool2d", {"x": x}, ("x",), out, {"x": gx}, g)
    labels = np.zeros(4, dtype=np.int64)
    assert any("labels" in p for p in degeneracies("supcon", {"z": x[0, 0], "labels": labels}, ("z",),
                                                   np.asarray(1.0), {"z": np.ones((3, 4))}, np.asarray(1.0)))
    assert "gradient of x is (numerically) zero" in degeneracies(
        "relu", {"x": -np.ones((2, 2))}, ("x",), np.zeros((2, 2)) + [[0, 1], [2, 3]], {"x": np.zeros((2, 2))},
        np.ones((2, 2)))


def test_float32_expected_values_are_refssl_in_float64_on_the_float32_inputs():
    op = registry.get("info_nce")
    case = next(c for c in build_cases("info_nce") if c.name == "tau_0.01" and c.dtype == "float32")
    z1, z2 = (a.astype(np.float64) for a in case.inputs.values())
    out, cache = op.forward(z1, z2, **case.hyper)
    g1, g2 = op.backward(cache, float(case.upstream))
    assert out == case.expected_out and np.array_equal(g1, case.expected_grads["z1"])
    assert np.array_equal(g2, case.expected_grads["z2"])


def test_float64_expected_gradients_match_central_differences():
    """Each float64 case's gradients against finite differences in two random directions (ties excluded:
    there the gradient is the spec's choice of a subgradient)."""
    failures = []
    for name in OPS:
        op = registry.get(name)
        for case in build_cases(name, dtype="float64"):
            if case.name == "ties":
                continue
            scale = min(float(np.max(np.abs(case.inputs[k]))) for k in case.differentiable)
            rep = gradcheck.check(op, tuple(case.inputs.values()), case.hyper, grad_out=case.upstream,
                                  full_max_size=0, n_directions=2, h=1e-6 * min(1.0, scale),
                                  rng=np.random.default_rng(0))
            if not rep.ok:
                failures.append(f"{case.id}: {rep.describe()}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------- export and schema

@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "suite"
    export(out, ["info_nce", "byol", "linear", "supcon"])
    return out


def test_export_holds_exactly_the_manifest_files_with_matching_hashes(suite_dir):
    manifest = load_manifest(suite_dir)
    files = [c["file"] for op in manifest["ops"].values() for c in op["cases"]]
    assert sorted(files + ["manifest.json"]) == sorted(p.name for p in suite_dir.iterdir())
    for op in manifest["ops"].values():
        for c in op["cases"]:
            assert hashlib.sha256((suite_dir / c["file"]).read_bytes()).hexdigest() == c["sha256"]
    assert manifest["spec_version"] == 1 and manifest["refssl_version"]
    assert manifest["ops"]["info_nce"]["conventions"][0]["factor"] == "2"
    assert "2x" in manifest["ops"]["info_nce"]["scale_notes"]
    assert manifest["ops"]["byol"]["stop_gradient"] == ["t1", "t2"]


def test_loaded_cases_equal_the_built_ones(suite_dir):
    for name in ("info_nce", "supcon"):
        for got, want in zip(load_cases(suite_dir, name), build_cases(name), strict=True):
            assert (got.name, got.dtype, got.hyper, got.tolerance) == (want.name, want.dtype, want.hyper,
                                                                       want.tolerance)
            for k in want.inputs:
                assert np.array_equal(got.inputs[k], want.inputs[k]) and got.inputs[k].dtype == want.inputs[k].dtype
            assert np.array_equal(got.expected_out, want.expected_out)
            for k in want.expected_grads:
                assert np.array_equal(got.expected_grads[k], want.expected_grads[k])


def test_a_modified_case_file_is_refused(tmp_path):
    out = tmp_path / "s"
    export(out, ["relu"])
    victim = next(out.glob("relu.example.float64.npz"))
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="does not match the manifest"):
        load_cases(out, "relu")


def test_schema_is_readable_with_plain_numpy_and_json(suite_dir):
    """No refssl: the manifest and a case file hold everything a port needs (docs/conformance.md#schema)."""
    script = r"""
import sys, json, hashlib
sys.modules["refssl"] = None  # importing refssl now fails
import numpy as np
folder = sys.argv[1]
m = json.load(open(f"{folder}/manifest.json"))
assert m["format"] == "refssl-spec-suite" and m["spec_version"] == 1
op = m["ops"]["byol"]
c = next(c for c in op["cases"] if c["name"] == "example" and c["dtype"] == "float32")
raw = open(f"{folder}/{c['file']}", "rb").read()
assert hashlib.sha256(raw).hexdigest() == c["sha256"]
d = np.load(f"{folder}/{c['file']}")
inputs = [d["inputs/" + a] for a in op["arguments"]]
assert all(x.dtype == np.float32 for x in inputs)
assert sorted(k for k in d.files if k.startswith("expected/grads/")) == ["expected/grads/p1", "expected/grads/p2"]
assert d["expected/out"].shape == tuple(c["output_shape"]) and d["upstream"].shape == ()
assert c["differentiable"] == ["p1", "p2"] and c["tolerance"] > 0 and c["hyperparameters"] == {}
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", script, str(suite_dir)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_spec_command_exports_and_conformance_reads_the_export(suite_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["spec", "relu", "mse", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'manifest.json'}"
    assert sorted(load_manifest(out)["ops"]) == ["mse", "relu"]
    assert check("info_nce", np_info_nce, suite=suite_dir).ok


# --------------------------------------------------------------------------------------- numpy ports

@pytest.mark.parametrize("name, port", [("info_nce", np_info_nce), ("barlow_twins", np_barlow_twins),
                                        ("byol", np_byol), ("linear", np_linear)])
def test_independent_numpy_ports_pass(name, port):
    report = check(name, port)
    assert report.ok, str(report)
    assert len(report.results) == len(build_cases(name))
    assert all(r.value_error <= r.tolerance and r.grad_error <= r.tolerance for r in report.results)


def test_official_nt_xent_scale_is_named():
    report = check("info_nce", np_info_nce_official)
    assert not report.ok and all(not r.ok for r in report.results)
    for r in report.results:
        assert r.factor == 2.0 and "official SimCLR NT-Xent" in r.explanation, r.line()
    assert "known convention, factor 2" in report.summary()


@pytest.mark.parametrize("name, port, factor, words", [
    ("barlow_twins", np_barlow_solo_learn, 0.025, "solo-learn Barlow Twins"),
    ("byol", np_byol_lightly, 0.25, "lightly's BYOL example"),
    ("moco_v3", "moco_v3_plain", None, "without its 2τ factor"),
    ("supcon", "supcon_tau_base", None, "base_temperature 0.07"),
    ("vicreg", "vicreg_solo", None, "solo-learn VICReg variance"),
])
def test_known_conventions_are_named(name, port, factor, words):
    if port == "moco_v3_plain":
        port = _moco_v3_without_2tau()
    elif port == "supcon_tau_base":
        port = _supcon_official_default()
    elif port == "vicreg_solo":
        port = _refssl_port("vicreg", std_coeff=50.0)
    report = check(name, port, dtype="float64")
    assert len(report.failures) >= len(report.results) - 1  # a case may not exercise the difference
    for r in report.results:
        if r.ok:  # supcon: the case that passes base_temperature; vicreg: every std above the hinge
            assert r.case.name in ("base_temperature_0.07", "hinge_inactive")
            continue
        assert words in r.explanation, r.line()
        if factor is not None:
            assert r.factor == pytest.approx(factor)


def _moco_v3_without_2tau():
    ref = _refssl_port("moco_v3")

    def port(q1, q2, k1, k2, temperature=1.0):
        out, grads = ref(q1, q2, k1, k2, temperature=temperature)
        f = 1 / (2 * temperature)
        return f * out, tuple(None if g is None else f * g for g in grads)

    return port


def _supcon_official_default():
    ref = _refssl_port("supcon")

    def port(z, labels, temperature=0.1, base_temperature=0.07):
        return ref(z, labels, temperature=temperature, base_temperature=base_temperature)

    return port


def test_an_unknown_constant_factor_is_reported_as_such():
    report = check("info_nce", _refssl_port("info_nce", factor=3.7), dtype="float64")
    assert all(r.factor == pytest.approx(3.7) and "no known convention" in r.explanation for r in report.results)


def test_missing_stop_gradient_fails_with_the_reason():
    report = check("byol", np_byol_no_stop_gradient)
    assert not report.ok
    for r in report.results:
        assert r.value_error <= r.tolerance and r.grad_error <= r.tolerance  # p1, p2 are right
        assert "t1, t2 get gradients but are stop-gradient inputs" in r.explanation
        assert "missing detach" in r.explanation


def test_a_wrong_gradient_with_the_right_value_is_explained():
    report = check("byol", np_byol_no_projection, dtype="float64")
    assert not report.ok
    for r in report.results:
        assert r.value_error <= r.tolerance
        assert r.explanation.startswith("value matches but the gradient of p1 differs"), r.line()


def test_a_gradient_that_never_arrives_is_named():
    report = check("info_nce", np_info_nce_one_view_grad, dtype="float64")
    assert all("no gradient reaches z2" in r.explanation for r in report.results)


def test_overflow_at_small_temperature_is_explained():
    report = check("info_nce", np_info_nce_naive, dtype="float32")
    bad = {r.case.name: r for r in report.failures}
    assert "tau_0.01" in bad and "not finite" in bad["tau_0.01"].explanation
    assert "log-sum-exp" in bad["tau_0.01"].explanation


def test_a_port_that_changes_the_dtype_fails():
    report = check("byol", np_byol_float64)
    assert [r.ok for r in report.results] == [c.dtype == "float64" for c in build_cases("byol")]
    assert all("the dtype must be kept" in r.explanation for r in report.failures)


def test_keywords_are_renamed_and_dropped_by_the_map():
    def port(z1, z2, tau):
        return np_info_nce(z1, z2, tau)

    assert check("info_nce", port, name_map={"temperature": "tau"}).ok
    assert check("info_nce", port, name_map=["temperature=tau"]).ok

    def fixed(z1, z2):
        return np_info_nce(z1, z2, 0.5)

    report = check("info_nce", fixed, name_map={"temperature": ""})  # hard-coded: fails unless tau = 0.5
    assert [r.ok for r in report.results] == [r.case.hyper["temperature"] == 0.5 for r in report.results]


def test_conventions_table_rows_are_complete():
    rows = conventions.table()
    assert ("info_nce", "2", "official SimCLR NT-Xent scale (google-research/simclr)") in rows
    named = {op for op, _, _ in rows}
    assert {"info_nce", "barlow_twins", "vicreg", "byol", "moco_v3", "supcon", "*"} <= named


def test_docs_list_every_convention_and_stop_gradient_input():
    text = (ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2])
            for line in text.splitlines() if line.startswith("|")}
    for c in conventions.CONVENTIONS + conventions.GENERIC:
        assert (c.op or "any", c.label) in rows, (c.op, c.label)
    sg_rows = {line.strip().strip("|").split("|")[0].strip(): line.strip().strip("|").split("|")[1].strip()
               for line in text.splitlines() if line.strip().startswith("|") and line.count("|") == 3}
    for op, inputs in STOP_GRADIENT.items():
        assert sg_rows.get(op) == ", ".join(inputs), op
    for heading in ("## Check a port in three commands", "## How tolerances are chosen", "## Schema",
                    "## Known conventions", "## Sharded batches", "## Memory-bounded InfoNCE and CLIP"):
        assert heading in text
    assert "docs/conformance.md" in (ROOT / "README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------- usage

def _one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    (["--op", "bogus", "--port", "tests.test_conformance:np_info_nce"], "unknown op 'bogus'"),
    (["--op", "info_nce", "--port", "no_such_module_xyz:f"], "cannot import port module"),
    (["--op", "info_nce", "--port", "tests.test_conformance:nothing"], "has no attribute"),
    (["--op", "info_nce", "--port", "tests.test_conformance"], "MODULE:CALLABLE"),
    (["--op", "info_nce", "--port", "tests.test_conformance:np_byol"], "cannot be called as the op info_nce"),
    (["--op", "info_nce", "--port", "tests.test_conformance:np_info_nce", "--map", "temperature=tau"],
     "--map temperature="),
    (["--op", "info_nce", "--port", "tests.test_conformance:np_info_nce", "--map", "temperature"], "NAME=PORT_NAME"),
    (["--op", "info_nce", "--port", "tests.test_conformance:np_info_nce", "--suite", "/nonexistent/suite"],
     "not a spec suite"),
    (["--op", "linear", "--port", "tests.test_conformance:np_byol"], "cannot be called"),
    (["--op", "linear", "--port", "tests.test_conformance:np_info_nce"], "must accept the upstream gradient"),
])
def test_bad_usage_is_one_line_and_status_2(argv, words, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["conformance", *argv]) == 2
    err = capsys.readouterr()
    assert words in _one_line(err.err) and err.out == ""


def test_a_framework_that_is_not_installed_is_one_line(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a))
    assert cli.main(["conformance", "--op", "info_nce", "--port", "tests.test_conformance:np_info_nce",
                     "--framework", "jax"]) == 2
    assert "framework jax is not installed" in _one_line(capsys.readouterr().err)


def test_numpy_layer_port_without_grad_out_is_a_usage_error():
    def linear(x, w, b):
        return x @ w + b, (None, None, None)

    with pytest.raises(UsageError, match="grad_out"):
        check("linear", linear)


def test_exit_status_is_0_exactly_when_every_case_passes(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = ["conformance", "--op", "info_nce", "--dtype", "float32"]
    assert cli.main(base + ["--port", "tests.test_conformance:np_info_nce"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(build_cases("info_nce", dtype="float32")) + 2 and "cases pass" in out[-1]
    assert out[0].startswith("info_nce: tests.test_conformance:np_info_nce (numpy), 5 cases")
    assert all(line.split()[-1] == "pass" for line in out[1:-1])
    assert cli.main(base + ["--port", "tests.test_conformance:np_info_nce_official"]) == 1
    assert "official SimCLR NT-Xent" in capsys.readouterr().out
    assert cli.main(base + ["--port", "tests/test_conformance.py:np_info_nce_naive"]) == 1


def test_a_port_that_raises_fails_its_case_without_a_traceback(capsys, monkeypatch):
    def port(z1, z2, temperature=0.1):
        if z1.shape[0] == 2:
            raise ValueError("batch too small")
        return np_info_nce(z1, z2, temperature)

    report = check("info_nce", port)
    assert {r.case.name for r in report.failures} == {"n2"}
    assert all("the port raised ValueError: batch too small" in r.explanation for r in report.failures)


# -------------------------------------------------------------------------------------------- torch

def test_refssl_and_the_kit_import_no_framework():
    """torch and jax are imported only when a port of that framework is checked."""
    code = ("import sys, refssl.conformance, refssl.__main__; from refssl import registry; registry.names(); "
            "refssl.conformance.build_cases('info_nce'); "
            "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr


def test_torch_port_passes_through_the_command_line(capsys, monkeypatch):
    pytest.importorskip("torch", reason="torch is not installed: the torch path of the kit is not exercised")
    monkeypatch.chdir(ROOT)
    assert cli.main(["conformance", "--op", "info_nce", "--port", "tests.test_conformance:torch_info_nce",
                     "--framework", "torch"]) == 0, capsys.readouterr().out
    n = len(build_cases("info_nce"))
    assert f"{n} of {n} cases pass" in capsys.readouterr().out


def test_torch_loss_class_and_missing_detach():
    pytest.importorskip("torch", reason="torch is not installed: the torch path of the kit is not exercised")
    assert check("simsiam", TorchSimSiam, framework="torch").ok
    report = check("byol", torch_byol_without_detach, framework="torch", dtype="float64")
    assert not report.ok and all("stop-gradient" in r.explanation for r in report.results)


def test_a_port_with_the_wrong_output_shape_is_explained():
    def per_sample(z1, z2, temperature=0.1):
        loss, grads = np_info_nce(z1, z2, temperature)
        return np.full(z1.shape[0], loss), grads

    report = check("info_nce", per_sample, dtype="float64")
    assert all(r.explanation.startswith("value has shape (") for r in report.results)


@pytest.mark.parametrize("argv", [["conformance", "--op", "info_nce"],
                                  ["conformance", "--op", "info_nce", "--port", "m:f", "--framework", "tf"],
                                  ["conformance", "--op", "info_nce", "--port", "m:f", "--dtype", "float16"]])
def test_argument_errors_are_one_line_and_status_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error:" in _one_line(capsys.readouterr().err)
