"""House rules that a linter would check: lines of at most 100 characters in every Python file,
and a repository that refers to nothing outside itself.

Run: .venv/bin/python -m pytest -q tests/test_style.py
"""

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINE = 100
MAX_DOCSTRING = 30  # lines of a module docstring: about one screen


def tracked(*patterns) -> list:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                          *patterns], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.split() if (ROOT / p).is_file()]


def test_python_lines_fit_in_100_characters():
    long = [f"{p.relative_to(ROOT)}:{n}" for p in tracked("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, f"lines over {MAX_LINE} characters: {long}"


def test_nothing_refers_outside_the_repository():
    # notes that live outside the repository, issue trackers, and task wording
    pattern = re.compile("|".join(["facts" + r"\.md", "style" + r"\.md", "shared" + "/",
                                   "issue" + r" [0-9]", "deliver" + "able"]), re.IGNORECASE)
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in tracked("*.py", "*.md", "*.txt")
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"references outside the repository: {hits}"


def test_module_docstrings_fit_on_a_first_screen():
    # the idea, the paper section, how to run, the shape legend; choices live in SOURCES.md §9
    long = []
    for p in tracked("*.py"):
        doc = ast.get_docstring(ast.parse(p.read_text()), clean=False)
        if doc is not None and doc.count("\n") + 1 > MAX_DOCSTRING:
            long.append(f"{p.relative_to(ROOT)}: {doc.count(chr(10)) + 1} lines")
    assert not long, f"module docstrings over {MAX_DOCSTRING} lines: {long}"


def test_cited_choices_exist_in_sources():
    # "§9.N" in code and documents must name an item of SOURCES.md §9
    section = (ROOT / "docs" / "SOURCES.md").read_text().split("## §9", 1)[1]
    items = {int(m) for m in re.findall(r"^(\d+)\. ", section, re.MULTILINE)}
    cited = {(f"{p.relative_to(ROOT)}", int(n)) for p in tracked("*.py", "*.md")
             for n in re.findall(r"§9\.(\d+)", p.read_text())}
    missing = sorted(c for c in cited if c[1] not in items)
    assert cited and not missing, f"citations of missing §9 items: {missing}"
