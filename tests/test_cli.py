"""Command-line messages (issue 15): one line and a non-zero status for every user error, Ctrl-C
included; a top-level --help that explains the commands by itself."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refssl import __main__ as cli
from refssl import gradcheck

ROOT = Path(__file__).resolve().parents[1]


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("seeds", ["0", "-3"])
def test_gradcheck_needs_at_least_one_seed(capsys, seeds):
    assert cli.main(["gradcheck", "relu", "--seeds", seeds]) == 2
    err = capsys.readouterr()
    assert "--seeds must be >= 1" in _one_line(err.err) and err.out == ""


def test_unknown_op_writes_nothing(tmp_path, capsys):
    out = tmp_path / "g"
    assert cli.main(["golden", "--out", str(out), "bogus"]) == 2
    assert "unknown op(s): bogus" in _one_line(capsys.readouterr().err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_unwritable_golden_out_is_one_line(tmp_path, capsys, where):
    if where == "under_a_file":
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "g"
    else:
        out = Path("/proc/refssl-golden-test")
        if not Path("/proc").is_dir():
            pytest.skip("no /proc")
    assert cli.main(["golden", "--out", str(out), "relu"]) == 1
    assert "cannot write the spec suite" in _one_line(capsys.readouterr().err)


def test_golden_out_with_foreign_files_is_refused(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    assert cli.main(["golden", "--out", str(tmp_path), "relu"]) == 2
    assert "thesis.tex" in _one_line(capsys.readouterr().err)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradcheck, "check_registered", interrupted)
    assert cli.main(["gradcheck", "relu"]) == 130
    assert "interrupted" in _one_line(capsys.readouterr().err)


def test_toy_suite_ctrl_c_and_unwritable_out(capsys, monkeypatch, tmp_path):
    from toy_experiments import __main__ as toy_cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_cli, "run_experiment", interrupted)
    assert toy_cli.main(["run", "collapse", "--tiny"]) == 130
    assert "interrupted" in _one_line(capsys.readouterr().err)
    monkeypatch.undo()
    (tmp_path / "f").write_text("")
    assert toy_cli.main(["run", "collapse", "--tiny", "--out", str(tmp_path / "f" / "x")]) == 1
    assert "error" in _one_line(capsys.readouterr().err)


def test_sigint_in_a_real_process_gives_no_traceback():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "refssl", "gradcheck", "--seeds", "1000"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("op")  # the table header: the run has started
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    assert "interrupted" in _one_line(err)


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for command in ("list", "gradcheck", "spec", "golden", "conformance"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(command + " "))
        assert len(line.split()) > 3, line  # the command and a description on one line
    assert "docstring" not in text and "examples:" in text
