"""README's commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _block_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(re.escape(marker) + r"\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no ```bash block after {marker}"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = _block_after("<!-- test-command -->")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1].strip() == command


def test_readme_main_command_is_present():
    assert _block_after("<!-- main-command -->").startswith("python -m pip install")
