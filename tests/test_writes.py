"""Writes that must not lie (issue 15): .npz files, checkpoints, golden folders, toy result folders.

Killed writers are simulated with real child processes that die mid-write (``os._exit``), so the
process ids in the leftover names belong to processes that no longer run.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from refssl import golden
from refssl.nn import io as nnio

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    """The id of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------------------------- save_npz


@pytest.mark.parametrize("key", ["allow_pickle", "file"])
def test_save_npz_rejects_names_that_np_savez_consumes(tmp_path, key):
    with pytest.raises(ValueError, match=key):
        nnio.save_npz(tmp_path / "a.npz", {"w": np.ones(2), key: np.zeros(3)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value,match", [(None, "is None"), ([[1.0], [1.0, 2.0]], "rectangular"),
                                         (np.array([{}, 1], dtype=object), "dtype object")])
def test_save_npz_rejects_what_cannot_be_loaded(tmp_path, value, match):
    with pytest.raises(ValueError, match=match):
        nnio.save_npz(tmp_path / "a.npz", {"w": np.ones(2), "bad": value})
    assert list(tmp_path.iterdir()) == []


def test_save_npz_rejects_non_string_names(tmp_path):
    with pytest.raises(TypeError, match="non-empty strings"):
        nnio.save_npz(tmp_path / "a.npz", {1: np.ones(2)})


def test_save_npz_roundtrip_of_every_kind(tmp_path):
    arrays = {"params/enc.0.w": np.ones((2, 3), dtype=np.float32), "step": 7, "flag": np.bool_(True),
              "name": np.asarray("info_nce"), "x.npy": np.arange(3)}
    nnio.save_npz(tmp_path / "a.npz", arrays)
    back = nnio.load_npz(tmp_path / "a.npz")
    assert sorted(back) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)


def test_killed_writers_temp_files_are_removed_by_the_next_save(tmp_path):
    dest = tmp_path / "ckpt.npz"
    child = _run_child(
        "import os, numpy as np\n"
        "from refssl.nn import io\n"
        "def die(f, **kw):\n"
        "    f.write(b'partial')\n"
        "    os._exit(9)\n"
        "np.savez = die\n"
        f"io.save_npz({str(dest)!r}, {{'w': np.ones(3)}})\n")
    assert child.returncode == 9, child.stderr
    orphans = [p.name for p in tmp_path.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(".tmp-") and not dest.exists()

    # a live writer's file (the parent of this process), a fresh file of unknown origin, an old one
    live = tmp_path / f".tmp-{nnio._HOST}-{os.getppid()}-live1234.npz"
    fresh = tmp_path / ".tmp-abcd1234.npz"
    stale = tmp_path / ".tmp-efgh5678.npz"
    other = tmp_path / "notes.npz"
    for p in (live, fresh, stale, other):
        p.write_bytes(b"x")
    old = time.time() - 2 * nnio.STALE_SECONDS
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    nnio.save_npz(dest, {"w": np.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, live.name, fresh.name, other.name])
    np.testing.assert_array_equal(nnio.load_npz(dest)["w"], np.ones(3))


def test_load_npz_of_a_truncated_file_names_the_path(tmp_path):
    path = tmp_path / "ckpt.npz"
    nnio.save_npz(path, {"w": np.arange(1000.0), "step": 3})
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 5):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="ckpt.npz.*truncated or corrupt"):
            nnio.load_npz(path)
    corrupt = bytearray(data)
    corrupt[len(data) // 2:len(data) // 2 + 8] = b"\xff" * 8  # a flipped block inside the array data
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="ckpt.npz.*truncated or corrupt"):
        nnio.load_npz(path)
    np.save(tmp_path / "one.npy", np.ones(2))
    with pytest.raises(ValueError, match="one.npy"):
        nnio.load_npz(tmp_path / "one.npy")
    with pytest.raises(FileNotFoundError):
        nnio.load_npz(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_with_another_dtype_is_rejected(tmp_path):
    from tests.test_train import make_trainer

    ckpt = tmp_path / "a.npz"
    make_trainer(dtype=np.float64).save_checkpoint(ckpt)
    tr = make_trainer(dtype=np.float32)
    before = {k: v.copy() for k, v in tr.params.items()}
    with pytest.raises(ValueError, match=r"a.npz.*dtype float64.*float32"):
        tr.load_checkpoint(ckpt)
    assert all(np.array_equal(before[k], tr.params[k]) and tr.params[k].dtype == np.float32 for k in before)


def test_checkpoint_without_step_is_rejected(tmp_path):
    from tests.test_train import make_trainer

    ckpt = tmp_path / "a.npz"
    tr = make_trainer()
    tr.save_checkpoint(ckpt)
    arrays = nnio.load_npz(ckpt)
    del arrays["step"]
    nnio.save_npz(ckpt, arrays)
    with pytest.raises(ValueError, match="no 'step' entry"):
        make_trainer().load_checkpoint(ckpt)
    arrays["step"] = np.asarray(2.5)
    nnio.save_npz(ckpt, arrays)
    with pytest.raises(ValueError, match="'step' must be a non-negative integer"):
        make_trainer().load_checkpoint(ckpt)


# ---------------------------------------------------------------------------------------------- golden


def _listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def _ops_in(folder):
    return sorted({name.split(".")[0] for name in _listing(folder) if name.endswith(".npz")})


def test_golden_subset_export_leaves_exactly_the_subset(tmp_path):
    out = tmp_path / "g"
    golden.export(out, ["info_nce", "mse", "relu"])
    golden.export(out, ["mse"])
    assert _ops_in(out) == ["mse"] and "manifest.json" in _listing(out)
    assert list(json.loads((out / "manifest.json").read_text())["ops"]) == ["mse"]
    assert _listing(tmp_path) == ["g"]  # no staging or old folder left


def test_interrupted_golden_export_leaves_the_previous_folder(tmp_path, monkeypatch):
    from refssl.conformance import cases, suite

    out = tmp_path / "g"
    golden.export(out, ["info_nce", "mse"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = cases.build_cases
    calls = []

    def build(name, seed=0, dtype="all"):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(name, seed + 1, dtype)

    monkeypatch.setattr(suite.C, "build_cases", build)
    with pytest.raises(KeyboardInterrupt):
        golden.export(out, ["info_nce", "mse"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _listing(tmp_path) == ["g"]


def test_golden_export_never_replaces_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        golden.export(tmp_path, ["mse"])
    assert _listing(tmp_path) == ["notes.txt"]


def test_golden_swap_interrupted_between_renames_is_restored(tmp_path):
    out = tmp_path / "g"
    golden.export(out, ["mse"])
    # the state a kill between the two renames of replace_dir leaves: no g, the old result hidden
    hidden = tmp_path / f".g.old-{_dead_pid()}"
    os.replace(out, hidden)
    staging = tmp_path / f".g.staging-{_dead_pid()}-abcd"
    staging.mkdir()
    nnio.recover_dir(out, ".g.staging-")
    assert _listing(tmp_path) == ["g"] and _ops_in(out) == ["mse"] and "manifest.json" in _listing(out)
    # a concurrent writer's folders (a live pid) are left alone
    live = tmp_path / f".g.old-{os.getppid()}"
    live.mkdir()
    nnio.recover_dir(out, ".g.staging-")
    assert _listing(tmp_path) == [live.name, "g"]


# ------------------------------------------------------------------------------------ toy result folders


@pytest.fixture
def toy_exp():
    from toy_experiments import framework as fw

    state = {"explode": False}

    def run(ctx):
        if state["explode"]:
            raise RuntimeError("boom")
        return fw.Outcome(metrics={"n": 1}, table="", met=None, verdict="ok")

    fw.experiment("swap_test_exp", title="T", question="Q?", expected="E")(run)
    yield fw, state
    fw.EXPERIMENTS.pop("swap_test_exp")


def test_toy_swap_interrupted_between_renames_is_recovered_by_the_next_run(tmp_path, toy_exp):
    fw, state = toy_exp
    fw.run_experiment("swap_test_exp", level="tiny", results_root=tmp_path)
    dest = tmp_path / "swap_test_exp"
    before = (dest / "metrics.json").read_text()
    os.replace(dest, tmp_path / f".swap_test_exp.old-{_dead_pid()}")  # killed between the renames
    (tmp_path / f".swap_test_exp.tmp-{_dead_pid()}-x1y2").mkdir()      # and its staging folder
    state["explode"] = True
    with pytest.raises(RuntimeError, match="boom"):
        fw.run_experiment("swap_test_exp", level="tiny", results_root=tmp_path)
    assert _listing(tmp_path) == ["swap_test_exp"]
    assert (dest / "metrics.json").read_text() == before
    # a leftover old folder next to a complete result is removed by the next run
    (tmp_path / f".swap_test_exp.old-{_dead_pid()}").mkdir()
    state["explode"] = False
    fw.run_experiment("swap_test_exp", level="tiny", results_root=tmp_path)
    assert _listing(tmp_path) == ["swap_test_exp"]
