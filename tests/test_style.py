"""House rules that a linter would check: lines of at most 100 characters in every Python file,
a repository that refers to nothing outside itself, and the layout: the seven design cards alone
at the top, importing nothing from experiments/ or bench/, and tasks/ importing none of them.

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


def test_design_cards_cite_sources_once_a_paragraph():
    # the seven files at the top are read first: one pointer per paragraph, the list is SOURCES §9
    cards = ("saliency", "masking", "grpo", "dapo", "rollout", "evaluate", "train")
    dense = []
    for name in cards:
        doc = ast.get_docstring(ast.parse((ROOT / f"{name}.py").read_text()), clean=False)
        for n, para in enumerate(re.split(r"\n\s*\n", doc)):
            # "SOURCES.md §x" and a bare "§9.N" (a choice: only SOURCES.md has a §9); a paper's
            # own sections ("DAPO §3.1") are not pointers into SOURCES.md
            if len(re.findall(r"SOURCES(?:\.md)? §|(?<!SOURCES\.md )(?<!SOURCES )§9\.", para)) > 1:
                dense.append(f"{name}.py: paragraph {n + 1}")
    assert not dense, f"more than one SOURCES reference in a paragraph: {dense}"


def test_only_the_design_cards_are_python_files_at_the_top():
    top = sorted(p.name for p in tracked("*.py") if p.parent == ROOT)
    assert top == sorted(f"{n}.py" for n in ("saliency", "masking", "grpo", "dapo", "rollout",
                                             "evaluate", "train"))


def test_design_cards_import_nothing_from_experiments_or_bench():
    cards = ("saliency", "masking", "grpo", "dapo", "rollout", "evaluate", "train")
    found = []
    for name in cards:
        for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{name}.py: {m}" for m in mods
                      if m.split(".")[0] in ("experiments", "bench")]
    assert not found, f"design cards importing experiments/ or bench/: {found}"


def test_tasks_import_nothing_above_them():
    # tasks/ is the data: evaluate.py and train.py import it, never the other way round
    above = ("evaluate", "rollout", "train", "saliency", "masking", "grpo", "dapo", "experiments")
    found = []
    for p in tracked("tasks/*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{p.relative_to(ROOT)}: {m}" for m in mods if m.split(".")[0] in above]
    assert not found, f"tasks/ importing what imports it: {found}"
