"""Derivations and tests are tied by labels, and links into the derivations resolve.

Every checked equation or claim in ``derivations/*.md`` carries a LaTeX ``\\tag{LABEL}``; the test that checks
it is marked ``@pytest.mark.derivation("FILE.md#LABEL")``.  The tests below fail if a label has no test, or a
test names a label that does not exist.

"Has a test" means a test that pytest really collects and would run: the markers are read from the items of an
in-process ``pytest --collect-only`` of the tests directory (not from the file text), and items whose skip or
skipif marks apply, or that are ``xfail(run=False)``, do not count.  So a marker inside a comment or a docstring,
or on a skipped test, does not satisfy a label (``test_collection_ignores_comments_and_skipped_tests`` checks
exactly that on a temporary tests directory).  A test that calls ``pytest.skip()`` at run time cannot be seen at
collection and still counts.

Links ``derivations/FILE.md#anchor`` in ``refssl/`` (docstrings, the registry's ``derivation=``) and markdown or
backticked links between derivation files must name a heading of the file, with GitHub's anchor rule: lower
case, punctuation other than ``-`` and ``_`` removed, spaces to ``-`` (``## The EM loop`` -> ``#the-em-loop``,
``## barlow_twins`` -> ``#barlow_twins``).  Equation tags are not anchors.
"""

from __future__ import annotations

import pathlib
import re
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TAG = re.compile(r"\\tag\{([^}]+)\}")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
PY_LINK = re.compile(r"derivations/([\w\-]+\.md)#([\w\-]+)")
MD_LINK = re.compile(r"\]\(([\w\-]*\.md)?#([\w\-]+)\)|`([\w\-]+\.md)#([\w\-]+)`")


# ------------------------------------------------------------------------------------------------ helpers

def derivation_labels(derivations_dir):
    """{"FILE.md#LABEL": path} for every \\tag in the derivation files (README excluded); labels are unique."""
    out = {}
    for md in sorted(p for p in pathlib.Path(derivations_dir).glob("*.md") if p.name != "README.md"):
        for label in TAG.findall(md.read_text(encoding="utf-8")):
            key = f"{md.name}#{label}"
            assert key not in out, f"duplicate label {key}"
            out[key] = md
    return out


class _Recorder:
    """A pytest plugin that keeps the collected items of the session it is passed to."""

    def __init__(self):
        self.items = []

    def pytest_collection_finish(self, session):
        self.items = list(session.items)


def collect_items(tests_dir, *extra_args):
    """The items of ``pytest --collect-only`` on tests_dir, collected in this process (no output)."""
    recorder = _Recorder()
    # no terminal output; no cache; no unraisable/thread-exception hooks (their cleanup runs gc.collect
    # several times, seconds on a loaded machine, for a session that runs no test)
    quiet = ["-o", "addopts=", "-p", "no:terminal", "-p", "no:cacheprovider", "-p", "no:unraisableexception",
             "-p", "no:threadexception"]
    code = pytest.main(["--collect-only", *quiet, *extra_args, str(tests_dir)], plugins=[recorder])
    assert code == pytest.ExitCode.OK, f"collecting {tests_dir} failed with exit code {code!r}"
    return recorder.items


def is_skipped(item):
    """True if a skip / skipif mark applies to the item or it is xfail(run=False): it would not run."""
    from _pytest.skipping import evaluate_skip_marks, evaluate_xfail_marks

    if evaluate_skip_marks(item) is not None:
        return True
    xfail = evaluate_xfail_marks(item)
    return xfail is not None and not xfail.run


def derivation_references(items):
    """{"FILE.md#LABEL": [node ids]} over the items that carry a derivation marker and would run."""
    refs = {}
    for item in items:
        if is_skipped(item):
            continue
        for mark in item.iter_markers("derivation"):
            for label in mark.args:
                refs.setdefault(label, []).append(item.nodeid)
    return refs


def unchecked(labels, refs):
    return sorted(set(labels) - set(refs))


def dangling(labels, refs):
    return {k: v for k, v in refs.items() if k not in labels}


def slug(heading):
    """GitHub's anchor of a markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md_text):
    """The anchors of all headings outside code fences (repeated headings get -1, -2, ... as on GitHub)."""
    seen, out = {}, set()
    for heading in HEADING.findall(FENCE.sub("", md_text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# ------------------------------------------------------------------------------------------------ the checks

@pytest.fixture(scope="module")
def references():
    return derivation_references(collect_items(ROOT / "tests"))


def test_every_label_is_checked_by_a_collected_test(references):
    missing = unchecked(derivation_labels(ROOT / "derivations"), references)
    assert not missing, f"derivation labels without a collected, non-skipped test: {missing}"


def test_every_referenced_label_exists(references):
    bad = dangling(derivation_labels(ROOT / "derivations"), references)
    assert not bad, f"tests reference labels that no derivation defines: {bad}"


def test_links_into_the_derivations_name_headings():
    files = {p.name: anchors(p.read_text(encoding="utf-8")) for p in (ROOT / "derivations").glob("*.md")}
    broken = []
    for py in sorted((ROOT / "refssl").rglob("*.py")):
        for name, anchor in PY_LINK.findall(py.read_text(encoding="utf-8")):
            if name == "FILE.md":  # the placeholder in the registry's docstring
                continue
            if anchor not in files.get(name, ()):
                broken.append(f"{py.relative_to(ROOT)}: derivations/{name}#{anchor}")
    for md in sorted((ROOT / "derivations").glob("*.md")):
        for a_name, a_anchor, b_name, b_anchor in MD_LINK.findall(FENCE.sub("", md.read_text(encoding="utf-8"))):
            name, anchor = (a_name or md.name, a_anchor) if a_anchor else (b_name, b_anchor)
            if anchor not in files.get(name, ()):
                broken.append(f"{md.relative_to(ROOT)}: {name}#{anchor}")
    assert not broken, f"links to anchors that are not headings: {broken}"


def test_derivation_files_are_plain_text():
    """No control characters (a form feed where \\f of \\frac was meant, a stray escape); tabs and newlines only."""
    bad = {}
    for md in sorted((ROOT / "derivations").glob("*.md")):
        text = md.read_text(encoding="utf-8")
        lines = sorted({text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"[\x00-\x08\x0b-\x1f\x7f]", text)})
        if lines:
            bad[md.name] = lines
    assert not bad, f"control characters on lines: {bad}"


# ------------------------------------------------------------------------------------------------ the failure modes

PROBE_MD = "# probe\n\n" + "\n\n".join(f"$$x_{k}=0 \\tag{{{k}}}$$" for k in "ABCDEFG") + "\n"

PROBE_TESTS = '''import pytest

# @pytest.mark.derivation("probe.md#A")  -- a comment is not a test


def helper():
    """@pytest.mark.derivation("probe.md#A") -- nor is a docstring."""


@pytest.mark.skip(reason="skipped")
@pytest.mark.derivation("probe.md#B")
def test_b():
    pass


@pytest.mark.skipif(True, reason="skipped by condition")
@pytest.mark.derivation("probe.md#C")
def test_c():
    pass


@pytest.mark.derivation("probe.md#D")
def test_d():
    pass


@pytest.mark.xfail(run=False, reason="never run")
@pytest.mark.derivation("probe.md#E")
def test_e():
    pass


@pytest.mark.skipif(False, reason="condition false: runs")
@pytest.mark.derivation("probe.md#F")
@pytest.mark.parametrize("k", [1, 2])
def test_f(k):
    pass


@pytest.mark.derivation("probe.md#Z")
def test_z():
    pass
'''


def test_collection_ignores_comments_and_skipped_tests(tmp_path):
    (tmp_path / "derivations").mkdir()
    (tmp_path / "derivations" / "probe.md").write_text(PROBE_MD, encoding="utf-8")
    tag = uuid.uuid4().hex  # unique module and package names: nothing clashes with modules already imported
    tests = tmp_path / f"probe_{tag}"
    tests.mkdir()
    (tests / f"test_probe_{tag}.py").write_text(PROBE_TESTS, encoding="utf-8")
    items = collect_items(tests, "--import-mode=importlib", "--rootdir", str(tmp_path),
                          "-W", "ignore::pytest.PytestUnknownMarkWarning")
    assert len(items) == 7  # test_b, test_c, test_d, test_e, test_f[1], test_f[2], test_z
    labels = derivation_labels(tmp_path / "derivations")
    refs = derivation_references(items)
    assert set(refs) == {"probe.md#D", "probe.md#F", "probe.md#Z"}
    assert len(refs["probe.md#F"]) == 2
    # A: comment and docstring only; B: skip; C: skipif(True); E: xfail(run=False); G: never mentioned
    assert unchecked(labels, refs) == ["probe.md#A", "probe.md#B", "probe.md#C", "probe.md#E", "probe.md#G"]
    assert list(dangling(labels, refs)) == ["probe.md#Z"]


def test_anchor_rule_and_heading_extraction():
    text = "# Title\n\n## The EM loop\n\n### barlow_twins\n\n## E-step\n\n## E-step\n\n```\n## not a heading\n```\n"
    assert anchors(text) == {"title", "the-em-loop", "barlow_twins", "e-step", "e-step-1"}
    assert slug("Debiased InfoNCE Clustering") == "debiased-infonce-clustering"
    assert slug("The concentration estimator and its $\\alpha$") == "the-concentration-estimator-and-its-alpha"
