"""The torch port of the sharded losses (ports/torch/distributed.py) on 2 CPU processes with the gloo
backend over loopback, checked rank by rank against refssl.distributed in float64.

Each rank's loss and the gradient of its own rows after the collectives' backward must equal
refssl.distributed's rank loss and :func:`refssl.distributed.reduce_gradients` output; the official
raw-all_reduce Barlow Twins must give refssl's 1/K variant; the DINO center the sharded update.
Bounded: 60 s for the process group to form and for each worker to finish; workers are always killed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refssl import distributed as D

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT = 60.0


def _gloo_unavailable() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install -e .[torch])"
    try:
        import torch.distributed as dist
    except Exception as e:  # pragma: no cover - broken torch install
        return f"torch.distributed cannot be imported: {e}"
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


pytestmark = pytest.mark.skipif(_gloo_unavailable() is not None, reason=str(_gloo_unavailable()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases(rng, n_g=6, d=4):
    """Global float64 inputs and hyperparameters per method (torch port names)."""
    f = lambda *s: rng.normal(size=s)  # noqa: E731
    x = f(n_g, d) * rng.uniform(0.3, 1.5, size=d)
    return {
        "info_nce": ({"z1": f(n_g, d), "z2": f(n_g, d)}, {"temperature": 0.3}),
        "clip": ({"img": f(n_g, d), "txt": f(n_g, d), "logit_scale": np.asarray(1.1)}, {}),
        "supcon": ({"z": f(n_g, 2, d), "labels": np.array([0, 1, 0, 2, 1, 1])},
                   {"temperature": 0.5, "base_temperature": 0.07}),
        "moco_v3": ({"q1": f(n_g, d), "q2": f(n_g, d), "k1": f(n_g, d), "k2": f(n_g, d)},
                    {"temperature": 0.2}),
        "barlow_twins": ({"z1": f(n_g, d), "z2": f(n_g, d)}, {"lambd": 0.05}),
        "barlow_twins_raw": ({"z1": f(n_g, d), "z2": f(n_g, d)}, {"lambd": 0.05}),
        "vicreg": ({"x": x, "y": x + 0.5 * f(n_g, d)}, {"batch_size": n_g}),
        "dino_center": ({"center": f(5), "teacher": f(2, n_g, 5)}, {"momentum": 0.9}),
    }


def _spawn_ranks(tmp_path: Path, cases: dict) -> list[dict]:
    inputs = {}
    for case, (arrays, hyper) in cases.items():
        inputs.update({f"{case}/{k}": v for k, v in arrays.items()})
        inputs[f"{case}/hyper"] = np.array(json.dumps(hyper))
    np.savez(tmp_path / "inputs.npz", **inputs)
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"   # keep gloo's pairs on loopback too
    procs = []
    try:
        for r in range(WORLD):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "ports.torch.distributed", "--rank", str(r), "--world", str(WORLD),
                 "--port", str(port), "--inputs", str(tmp_path / "inputs.npz"),
                 "--out", str(tmp_path / f"rank{r}.npz"), "--timeout", str(TIMEOUT)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for r, p in enumerate(procs):
            try:
                out, err = p.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} did not finish within {TIMEOUT} s")
            assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{err[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    results = []
    for r in range(WORLD):
        with np.load(tmp_path / f"rank{r}.npz") as f:
            results.append({k: f[k] for k in f.files})
    return results


def _refssl_runs(cases):
    runs = {}
    for case, (arrays, hyper) in cases.items():
        if case == "dino_center":
            continue
        method = "barlow_twins" if case == "barlow_twins_raw" else case
        order = {"clip": ("img", "txt", "logit_scale"), "supcon": ("z", "labels"),
                 "moco_v3": ("q1", "q2", "k1", "k2")}.get(method, tuple(arrays))
        reduce = D.reduce_gradients_raw_all_reduce if case == "barlow_twins_raw" else D.reduce_gradients
        runs[case] = D.run(method, WORLD, *[arrays[k] for k in order], reduce=reduce, **hyper)
    return runs


def test_torch_gloo_ranks_match_refssl_distributed(tmp_path):
    cases = _cases(np.random.default_rng(0))
    got = _spawn_ranks(tmp_path, cases)
    want = _refssl_runs(cases)
    for case, run in want.items():
        for r in range(WORLD):
            np.testing.assert_allclose(got[r][f"{case}/loss"], run.losses[r], rtol=1e-12, atol=1e-14,
                                       err_msg=f"{case} loss, rank {r}")
            assert {k.split("/")[-1] for k in got[r] if k.startswith(f"{case}/grad/")} == set(run.grads[r])
            for name, g in run.grads[r].items():
                np.testing.assert_allclose(got[r][f"{case}/grad/{name}"], g, rtol=1e-10,
                                           atol=1e-13 * max(1.0, np.abs(g).max()),
                                           err_msg=f"{case} gradient of {name}, rank {r}")
    # the official raw all_reduce is 1/K of the spec, measured through torch's collectives
    for r in range(WORLD):
        for name in ("z1", "z2"):
            raw = got[r][f"barlow_twins_raw/grad/{name}"]
            spec = D.run("barlow_twins", WORLD, cases["barlow_twins_raw"][0]["z1"],
                         cases["barlow_twins_raw"][0]["z2"], **cases["barlow_twins_raw"][1]).grads[r][name]
            np.testing.assert_allclose(raw, spec / WORLD, rtol=1e-10)
    center, teacher = cases["dino_center"][0]["center"], cases["dino_center"][0]["teacher"]
    want_c = D.dino_center_update_sharded(center, D.shard(teacher, WORLD, axis=1), momentum=0.9)
    for r in range(WORLD):
        np.testing.assert_allclose(got[r]["dino_center/center"].reshape(-1), want_c[r], rtol=1e-13)
