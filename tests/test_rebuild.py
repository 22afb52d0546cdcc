"""Every committed summary rebuilds from the committed runs alone: each setting's table from
experiments/runs/<setting>/ equals figures/<setting>/ab_table.md byte for byte, its figures are
drawn, and the causal test's table equals figures/causal/causal_table.md. A summary that changes
without its runs changing, or runs that no longer give their table, fail here.

Run: .venv/bin/python -m pytest -q tests/test_rebuild.py   (seconds; no model, no training)
"""

import shutil
import subprocess
from pathlib import Path

import pytest

import experiments
from experiments import ab, causal

RUNS, FIGURES = experiments.RUNS, experiments.FIGURES
# (setting of experiments/ab.py, folder name under experiments/runs/ and figures/)
SUMMARIES = [("1", "ab"), ("2", "ab2"), ("2b", "ab2b"), ("3-pilot", "ab3-pilot"), ("3", "ab3"),
             ("2", "ab2-pilot")]
# ab2-pilot's table was written before the timing table had its CPU column and before the
# provenance table existed; every other section is compared byte for byte
OLDER_TIMING = {"ab2-pilot"}


def sections(text: str) -> list:
    return text.rstrip("\n").split("\n\n")


def without_cpu_column(table: str) -> str:
    """A timing table as it was written before its CPU column (the second column)."""
    return "\n".join("|".join(c for i, c in enumerate(line.split("|")) if i != 2)
                     for line in table.splitlines())


@pytest.mark.parametrize("setting, name", SUMMARIES, ids=[n for _, n in SUMMARIES])
def test_a_setting_summary_rebuilds_from_its_committed_runs(setting, name, tmp_path, capsys):
    kept, out = tmp_path / "runs" / name, tmp_path / "figures" / name
    shutil.copytree(RUNS / name, kept)  # a copy: the summary never writes into the committed runs
    ab.summarize(ab.SETTINGS[setting], tmp_path / "no-grid", kept, out)
    capsys.readouterr()
    committed = (FIGURES / name / "ab_table.md").read_text()
    rebuilt = (out / "ab_table.md").read_text()
    if name not in OLDER_TIMING:
        assert rebuilt == committed
    else:
        old, new = sections(committed), sections(rebuilt)
        timing = next(i for i, s in enumerate(new) if s.startswith("| arm | CPU | runs |"))
        assert new[:timing] == old[:timing]
        assert without_cpu_column(new[timing]) == old[timing]
        assert len(old) == timing + 1 and new[timing + 1].startswith("| commit | CPU |")
    figures = ["ab.png"] + (["rates.png", "step_size.png"] if ab.SETTINGS[setting].by_rate else [])
    for f in figures:
        assert (out / f).stat().st_size > 10_000 and (FIGURES / name / f).exists()
    assert sorted(p.name for p in kept.iterdir()) == sorted(p.name for p in (RUNS / name).iterdir())


def test_the_causal_table_rebuilds_from_its_committed_results(tmp_path, capsys):
    causal.main(["--summary", "--out", str(RUNS / "causal" / "causal.jsonl"),
                 "--figure", str(tmp_path / "causal.png")])
    printed = capsys.readouterr().out.splitlines()
    committed = (FIGURES / "causal" / "causal_table.md").read_text().splitlines()
    assert printed[:-1] == committed[:-1]  # the last line names where the figure was written
    assert committed[-1] == "wrote figures/causal/causal.png"
    assert printed[-1] == f"wrote {tmp_path / 'causal.png'}"
    assert (tmp_path / "causal.png").stat().st_size > 10_000
    assert experiments.figures_twin(RUNS / "causal").resolve() == FIGURES / "causal"


def test_run_data_and_pictures_live_apart():
    # figures/ holds pictures and small tables only; every run's files are under experiments/runs
    files = subprocess.run(["git", "ls-files", "figures"], cwd=experiments.ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    assert files and {Path(f).suffix for f in files} <= {".png", ".md", ".txt"}
    assert not [f for f in files if {"runs", "repeat"} & set(Path(f).parts)]
    assert (RUNS / "demo" / "metrics.jsonl").exists() and (FIGURES / "demo" / "curves.png").exists()
