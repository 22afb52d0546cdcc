"""plumbing/engine.py is the fast path, not a dependency: in a copy of the repository without it,
train.py with `--engine hf` (transformers' own generate) still runs a whole step, evaluation
included, and `--engine fast` says what is missing.

Run: .venv/bin/python -m pytest -q tests/test_engine_optional.py
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_project_runs_without_engine_py(tiny_dir, qa_file, tmp_path):
    copy = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f != "plumbing/engine.py" and (ROOT / f).is_file() and f.endswith(".py"):
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, copy / f)
    assert not (copy / "plumbing" / "engine.py").exists() and (copy / "rollout.py").exists()
    argv = [sys.executable, "train.py", "--model", tiny_dir, "--train-data", qa_file,
            "--train-len", "128", "--calib-len", "32", "--calib-samples", "2",
            "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6",
            "--steps", "1", "--eval-tasks", "niah_single_1", "--eval-lengths", "512",
            "--eval-samples", "1", "--precision", "fp32", "--out-dir", str(tmp_path / "runs"),
            "--run-name", "hf", "--threads", "2"]
    ran = subprocess.run(argv + ["--engine", "hf"], cwd=copy, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "runs" / "hf" / "metrics.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 1 and rows[0]["drift_outside_mask"] == 0.0
    assert "after" in json.loads((tmp_path / "runs" / "hf" / "eval.json").read_text())
    fast = subprocess.run(argv + ["--run-name", "fast"], cwd=copy, capture_output=True,
                          text=True)
    assert fast.returncode == 2
    assert "plumbing/engine.py is missing; pass --engine hf" in fast.stderr
