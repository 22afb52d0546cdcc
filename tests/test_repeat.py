"""experiments/repeat.py: two runs of one configuration are compared exactly, clocks aside; the
committed cross-CPU repeat of setting 2b's grpo-longact-lrx8-seed0 is equal to its grid run, and
one changed metric, one changed item record or a missing step each makes a run not repeat.

Run: .venv/bin/python -m pytest -q tests/test_repeat.py
"""

import json
import shutil
from pathlib import Path

import pytest

from experiments import repeat

RUNS = Path(__file__).resolve().parents[1] / "experiments" / "runs"
GRID_RUN = RUNS / "ab2b" / "grpo-longact-lrx8-seed0"
REPEATED = RUNS / "ab2b-repeat" / "grpo-longact-lrx8-seed0"


def rewrite_jsonl(path: Path, change) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in change(rows)))


def rows_kl(run: Path) -> float:
    """Step 7's KL as the run wrote it."""
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[7])["kl"]


def test_the_committed_repeat_on_another_cpu_is_equal_to_the_grid_run(capsys):
    assert repeat.main([str(GRID_RUN), str(REPEATED)]) == 0
    out = capsys.readouterr().out
    assert "family 25 model 1" in out and "family 26 model 2" in out  # two CPU kinds
    c = repeat.compare(GRID_RUN, REPEATED)
    assert c["steps"] == 12 and c["differences"] == [] and all(c["files"].values())
    assert "items/after.jsonl" in c["files"]


def test_the_demo_repeats_across_the_move_of_the_files():
    # `python train.py --algo grpo` at aec01c4 (before plumbing/, experiments/runs/, the config
    # table and plumbing/runner.py) and after: every per-step value, evaluation and item equal
    moved = RUNS / "move-repeat"
    c = repeat.compare(moved / "before-demo", moved / "after-demo")
    assert c["steps"] == 6 and c["differences"] == [] and all(c["files"].values())
    before, after = (json.loads((moved / r / "config.json").read_text())["code_version"]
                     for r in ("before-demo", "after-demo"))
    assert before.startswith("aec01c4") and not after.startswith("aec01c4")


def test_clocks_differ_freely_but_one_metric_or_one_item_does_not(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(GRID_RUN, a)
    shutil.copytree(GRID_RUN, b)

    def slower(rows):
        return [{**r, "elapsed": r["elapsed"] * 2, "t_update": 0.0} for r in rows]
    rewrite_jsonl(b / "metrics.jsonl", slower)
    assert repeat.verdict(repeat.compare(a, b)).startswith("repeats exactly")

    def last_bit(rows):
        rows[7]["kl"] = rows[7]["kl"] + 1e-15
        return rows
    rewrite_jsonl(b / "metrics.jsonl", last_bit)
    c = repeat.compare(a, b)
    assert c["differences"] == [f"step 7 kl: {rows_kl(a)!r} vs {rows_kl(b)!r}"]
    assert repeat.main([str(a), str(b)]) == 1

    shutil.copy(a / "metrics.jsonl", b / "metrics.jsonl")
    rewrite_jsonl(b / "items" / "after.jsonl", lambda rows: rows[::-1])
    c = repeat.compare(a, b)
    assert c["differences"] == [] and c["files"]["items/after.jsonl"] is False
    assert "items/after.jsonl" in repeat.verdict(c)


def test_a_run_cut_short_does_not_repeat(tmp_path):
    b = tmp_path / "b"
    shutil.copytree(GRID_RUN, b)
    rewrite_jsonl(b / "metrics.jsonl", lambda rows: rows[:5])
    c = repeat.compare(GRID_RUN, b)
    assert c["steps"] == 5 and c["differences"] == ["steps: 12 vs 5"]


def test_a_folder_without_metrics_says_so(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl: no such file"):
        repeat.compare(GRID_RUN, tmp_path)
