"""The A/B runner's bookkeeping and statistics, on fake run folders (no training).

Run: .venv/bin/python -m pytest -q tests/test_ab.py
"""

import json
import math

import pytest

from experiments import ab


def fake_run(folder, arm, seed, after, finished=True):
    run = folder / f"{arm}-seed{seed}"
    run.mkdir(parents=True)
    ev = {"before": {"t@1024": 10.0, "ruler_avg@1024": 10.0}}
    if finished:
        ev["after"] = {"t@1024": after, "ruler_avg@1024": after}
    (run / "eval.json").write_text(json.dumps(ev))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.1 * s}) + "\n"
                                               for s in range(3)))
    (run / "samples.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    return run


def test_mean_and_standard_error_by_hand():
    m, se = ab.mean_se([1.0, 2.0, 3.0])  # sd 1 -> se 1/sqrt(3)
    assert m == 2.0 and se == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(ab.mean_se([5.0])[1])
    assert ab.pooled_sd([[1.0, 3.0], [2.0, 4.0], [7.0]]) == pytest.approx(math.sqrt(2))


def test_summary_table_and_detectable_difference(tmp_path):
    for arm, vals in (("grpo-longact", [40.0, 44.0]), ("grpo-uniform", [30.0, 34.0])):
        for seed, v in enumerate(vals):
            fake_run(tmp_path, arm, seed, v)
    fake_run(tmp_path, "grpo-random", 0, 99.0, finished=False)  # unfinished: not counted
    runs = ab.collect(tmp_path)
    assert sorted(runs) == ["grpo-longact", "grpo-uniform"]
    table, mde = ab.summary_table(runs)
    assert "| grpo-longact | 2 | 42.0 ± 2.0 |" in table
    assert "| before (shared) | - | 10.0 |" in table
    # pooled sd = sqrt((8 + 8) / 2) = 2 sqrt(2); 2.8 * 2 sqrt(2) * sqrt(2 / 2) = 7.92
    assert mde["t@1024"] == pytest.approx(2.8 * 2 * math.sqrt(2))


def test_unfinished_runs_resume_and_finished_ones_are_skipped(tmp_path):
    run = fake_run(tmp_path, "grpo-random", 1, 0.0, finished=False)
    (run / "ckpt").mkdir()
    argv = ab.train_argv(tmp_path, "grpo-random", 1, [])
    assert argv[-2:] == ["--resume", str(run)] and "--before-eval" in argv
    assert not ab.is_finished(run)
    assert ab.is_finished(fake_run(tmp_path, "grpo-uniform", 0, 1.0))
