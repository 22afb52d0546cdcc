"""experiments/curves.py draws a run from its metrics.jsonl: the committed demo run
(experiments/runs/demo) gives an image, a folder without metrics a clear error.

Run: .venv/bin/python -m pytest -q tests/test_curves.py
"""

import shutil
from pathlib import Path

import pytest

import experiments
from experiments import curves

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "runs" / "demo"


def test_the_demo_run_draws_with_ruler_in_the_title(tmp_path):
    run = tmp_path / "demo"
    shutil.copytree(DEMO, run)
    out = curves.main([str(run)])
    assert out == run / "curves.png" and out.stat().st_size > 10_000
    rows, evals = curves.read_run(run)
    assert "RULER 1024:" in curves.title_of(run, evals) and len(rows) >= 2


def test_a_committed_run_draws_into_figures_and_any_other_run_into_its_folder(tmp_path):
    assert experiments.figures_twin(DEMO).resolve() == experiments.FIGURES / "demo"
    assert (experiments.figures_twin(DEMO) / "curves.png").exists()  # the committed picture
    assert experiments.figures_twin(tmp_path) is None  # -> RUN/curves.png, as before


def test_a_folder_without_metrics_says_so(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl: no such file"):
        curves.main([str(tmp_path)])
