"""House rules that a linter would check: lines of at most 100 characters in every Python file,
and a repository that refers to nothing outside itself.

Run: .venv/bin/python -m pytest -q tests/test_style.py
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINE = 100


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
