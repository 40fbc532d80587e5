"""Derivations and tests are tied by labels.

Every checked equation or claim in ``derivations/*.md`` carries a LaTeX
``\\tag{LABEL}``; the test that checks it is marked
``@pytest.mark.derivation("FILE.md#LABEL")``.  This test fails if a label has
no test, or a test names a label that does not exist.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
TAG = re.compile(r"\\tag\{([^}]+)\}")
MARK = re.compile(r"""derivation\(\s*["']([\w\-]+\.md)#([^"']+)["']\s*\)""")


def _labels():
    out = {}
    for md in sorted(p for p in (ROOT / "derivations").glob("*.md") if p.name != "README.md"):
        for label in TAG.findall(md.read_text(encoding="utf-8")):
            key = f"{md.name}#{label}"
            assert key not in out, f"duplicate label {key}"
            out[key] = md
    return out


def _references():
    refs = {}
    for py in sorted((ROOT / "tests").glob("test_*.py")):
        for fname, label in MARK.findall(py.read_text(encoding="utf-8")):
            refs.setdefault(f"{fname}#{label}", []).append(py.name)
    return refs


def test_every_label_is_checked_by_a_test():
    missing = sorted(set(_labels()) - set(_references()))
    assert not missing, f"derivation labels without a test: {missing}"


def test_every_referenced_label_exists():
    labels = _labels()
    dangling = {k: v for k, v in _references().items() if k not in labels and not k.startswith("FILE.md")}
    assert not dangling, f"tests reference labels that no derivation defines: {dangling}"
