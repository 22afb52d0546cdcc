"""The A/B runner's bookkeeping and statistics, on fake run folders (no training).

Run: .venv/bin/python -m pytest -q tests/test_ab.py
"""

import json
import math
from pathlib import Path

import pytest

from experiments import ab, runfiles


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


def fake_grid(folder, values):
    """{arm: [mean of cells per seed]} -> finished fake runs."""
    for arm, vals in values.items():
        for seed, v in enumerate(vals):
            fake_run(folder, arm, seed, v)


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
    # unpaired: pooled sd = sqrt((8 + 8) / 2) = 2 sqrt(2); dof 2: t_.975 + t_.80 = 4.303 + 1.061
    unpaired = (4.303 + 1.061) * 2 * math.sqrt(2) * math.sqrt(2 / 2)
    assert ab.detectable(runs, "t@1024") == pytest.approx(unpaired)
    # paired by seed: both seeds differ by exactly 10, so the differences have no spread
    assert ab.paired(runs, "grpo-longact", "grpo-uniform", "t@1024") == [10.0, 10.0]
    assert mde["t@1024"] == 0.0


def test_paired_detectable_difference_by_hand(tmp_path):
    for arm, vals in (("grpo-longact", [40.0, 44.0, 45.0]), ("grpo-uniform", [30.0, 32.0, 35.0])):
        for seed, v in enumerate(vals):
            fake_run(tmp_path, arm, seed, v)
    runs = ab.collect(tmp_path)
    # differences 10, 12, 10: sd = sqrt((4/9 + 16/9 + 4/9) / 2) = sqrt(4/3); dof 2
    sd = math.sqrt(4 / 3)
    expected = (4.303 + 1.061) * sd / math.sqrt(3)
    assert ab.detectable_paired(runs, "t@1024") == pytest.approx(expected)
    d, half = ab.difference(ab.paired(runs, "grpo-longact", "grpo-uniform", "t@1024"))
    assert d == pytest.approx(32 / 3) and half == pytest.approx(4.303 * sd / math.sqrt(3))


def test_differences_flag_only_intervals_that_exclude_zero(tmp_path):
    for arm, vals in (("grpo-longact", [40.0, 41.0, 42.0]), ("grpo-uniform", [30.0, 31.0, 32.0]),
                      ("grpo-random", [35.0, 45.0, 40.0])):
        for seed, v in enumerate(vals):
            fake_run(tmp_path, arm, seed, v)
    runs = ab.collect(tmp_path)
    # longact - uniform: +10 at every seed -> a zero-width interval, flagged
    assert "| grpo-longact - grpo-uniform | +10.0 [+10.0, +10.0]* |" in ab.differences_table(runs)
    # longact - random: 5, -4, 2 -> mean 1, sd sqrt(21), half 4.303 sqrt(21 / 3): not flagged
    d, half = ab.difference(ab.paired(runs, "grpo-longact", "grpo-random", "t@1024"))
    assert d == pytest.approx(1.0) and half == pytest.approx(4.303 * math.sqrt(7))
    row = next(line for line in ab.differences_table(runs).splitlines()
               if line.startswith("| grpo-longact - grpo-ra"))
    assert "*" not in row


def test_cells_in_natural_order_and_trend_and_timing(tmp_path):
    run = fake_run(tmp_path, "grpo-uniform", 0, 50.0)
    ev = json.loads((run / "eval.json").read_text())
    for part in ("before", "after"):
        ev[part]["t@512"] = 20.0
    (run / "eval.json").write_text(json.dumps(ev))
    (run / "phases.json").write_text(json.dumps({"training": 120.0, "total": 300.0}))
    runs = ab.collect(tmp_path)
    assert ab.cells_of(runs) == ["t@512", "t@1024", ab.ALL]
    assert runs["grpo-uniform"][0]["after"][ab.ALL] == 35.0  # (20 + 50) / 2, averages left out
    trend = ab.reward_trend(runs, k=1)  # rewards 0, 0.1, 0.2: first 0, last 0.2, +0.1
    assert "| grpo-uniform | 0.000 | 0.200 | +0.100 |" in trend
    timing = runfiles.timing_table(runs, ab.ARMS)
    assert "| grpo-uniform | not recorded | 1 | 0.0 | 2.0 | 0.0 | 5.0 |" in timing
    assert timing.endswith("| 5.0 |")
    # minutes from two CPU kinds are two rows, each naming its CPU; the total counts both
    other = fake_run(tmp_path, "grpo-uniform", 1, 50.0)
    (other / "phases.json").write_text(json.dumps({"training": 60.0, "total": 120.0}))
    (other / "config.json").write_text(json.dumps({"cpu": "AMD EPYC (family 26 model 2)"}))
    timing = runfiles.timing_table(ab.collect(tmp_path), ab.ARMS)
    assert "| grpo-uniform | AMD EPYC (family 26 model 2) | 1 | 0.0 | 1.0 | 0.0 | 2.0 |" in timing
    assert "| grpo-uniform | not recorded | 1 | 0.0 | 2.0 | 0.0 | 5.0 |" in timing
    assert timing.endswith("| 7.0 |")


def test_unfinished_runs_resume_and_finished_ones_are_skipped(tmp_path):
    run = fake_run(tmp_path, "grpo-random", 1, 0.0, finished=False)
    (run / "ckpt").mkdir()
    argv = ab.train_argv(tmp_path, "grpo-random", 1, [])
    assert argv[-2:] == ["--resume", str(run)] and "--before-eval" in argv
    assert not runfiles.is_finished(run)
    assert runfiles.is_finished(fake_run(tmp_path, "grpo-uniform", 0, 1.0))


def test_arms_are_compared_within_their_algorithm(tmp_path):
    for arm in ("grpo-longact", "grpo-uniform", "dapo-longact", "dapo-uniform"):
        for seed in range(2):
            fake_run(tmp_path, arm, seed, 50.0 + seed)
    rows = [line.split(" |")[0] for line in ab.differences_table(ab.collect(tmp_path)).splitlines()]
    assert rows[2:] == ["| grpo-longact - grpo-uniform", "| dapo-longact - dapo-uniform"]


def test_setting_2_trains_only_qk_in_fp32_and_every_arm_parses():
    import train
    s = ab.SETTINGS["2"]
    assert s.flags[s.flags.index("--train-scope") + 1] == "qk"
    assert s.flags[s.flags.index("--precision") + 1] == "fp32"
    assert {"grpo-longact-grad", "grpo-longact-1row", "grpo-random-r0.4"} <= set(s.arms)
    for arm in s.arms:  # each run's command line is a valid train.py command line
        args = train.build_parser().parse_args(ab.train_argv(Path("g"), arm, 0, [], s.flags))
        assert args.train_scope == "qk" and args.seed == 0
    grad = train.build_parser().parse_args(ab.train_argv(Path("g"), "grpo-longact-grad", 0, [],
                                                         s.flags))
    assert grad.mask_semantics == "grad" and grad.mask_strategy == "topk"
    assert ab.SETTINGS["1"].flags == ab.SETTING and "--train-scope" not in ab.SETTING


def test_preregistered_reading_follows_the_rule(tmp_path):
    s = ab.SETTINGS["2"]
    values = {"grpo-uniform": [50.0, 52.0, 54.0], "grpo-longact-1row": [40.0, 41.0, 42.0],
              "grpo-longact": [47.0, 49.0, 52.0], "grpo-random": [46.0, 49.0, 50.0]}
    fake_grid(tmp_path, values)
    text = ab.preregistered(ab.collect(tmp_path), s)
    # control: differences 10, 11, 12 -> +11 [8.5, 13.5]: separates
    assert "positive control, grpo-uniform - grpo-longact-1row: +11.0 [+8.5, +13.5]" in text
    assert "separates" in text
    # primary: 1, 0, 2 -> +1, sd 1, half 4.303 / sqrt(3): includes 0; detectable (4.303 + 1.061)
    # / sqrt(3) = 3.1 < 4, so no extra seeds
    assert "no difference detected" in text and "smallest detectable 3.1" in text
    assert "adds seeds" not in text
    assert "exploratory" not in text  # every arm here is in the pre-registered grid


def test_an_arm_outside_the_preregistration_is_named_exploratory(tmp_path):
    values = {"grpo-uniform": [50.0, 52.0, 54.0], "grpo-longact-1row": [40.0, 41.0, 42.0],
              "grpo-longact": [47.0, 49.0, 52.0], "grpo-random": [46.0, 49.0, 50.0],
              "grpo-random-static": [48.0]}
    assert "grpo-random-static" not in ab.SETTINGS["2"].arms
    fake_grid(tmp_path, values)
    text = ab.preregistered(ab.collect(tmp_path), ab.SETTINGS["2"])
    assert text.splitlines()[-1] == "- not pre-registered, exploratory: grpo-random-static"
    # the rule's reading does not change with it
    assert "positive control, grpo-uniform - grpo-longact-1row: +11.0 [+8.5, +13.5]" in text


def test_primary_is_not_read_without_a_separating_control(tmp_path):
    values = {"grpo-uniform": [40.0, 45.0, 41.0], "grpo-longact-1row": [41.0, 40.0, 44.0],
              "grpo-longact": [60.0, 61.0, 62.0], "grpo-random": [40.0, 41.0, 42.0]}
    fake_grid(tmp_path, values)
    text = ab.preregistered(ab.collect(tmp_path), ab.SETTINGS["2"])
    assert "does not separate" in text and "not read: the positive control" in text


def test_rule_2_adds_seeds_for_the_primary_comparison_only(tmp_path):
    # both comparisons have a detectable difference above 4 points with 3 seeds; the rule is
    # about the primary one, so only its line asks for seeds 3 and 4
    values = {"grpo-uniform": [60.0, 70.0, 65.0], "grpo-longact-1row": [40.0, 41.0, 42.0],
              "grpo-longact": [60.0, 71.0, 62.0], "grpo-random": [50.0, 51.0, 58.0]}
    fake_grid(tmp_path, values)
    control, primary = ab.preregistered(ab.collect(tmp_path), ab.SETTINGS["2"]).splitlines()[1:]
    assert "separates" in control and "adds seeds" not in control
    assert "adds seeds 3 and 4" in primary


def test_summary_rebuilds_from_committed_files_alone(tmp_path):
    for arm in ("grpo-longact", "grpo-random", "grpo-longact-r0.2", "grpo-random-r0.2"):
        for seed in range(2):
            fake_run(tmp_path / "grid", arm, seed, 50.0 + seed + len(arm))
    kept, out = tmp_path / "kept", tmp_path / "out"
    ab.summarize(ab.SETTINGS["2"], tmp_path / "grid", kept, out)
    first = (out / "ab_table.md").read_text()
    assert (out / "ab.png").exists() and (kept / "grpo-random-seed1" / "eval.json").exists()
    assert "| 0.2 |" in first and "| 0.3 |" in first  # the ratio ablation
    assert "fewer than 2 paired seeds" in first  # no control arms yet
    ab.summarize(ab.SETTINGS["2"], tmp_path / "nothing-here", kept, out)  # from kept alone
    assert (out / "ab_table.md").read_text() == first
    # a grid that has not run its primary baseline yet still summarises (the pilots)
    fake_run(tmp_path / "pilot", "grpo-uniform", 0, 60.0)
    ab.summarize(ab.SETTINGS["2"], tmp_path / "pilot", tmp_path / "pilot-kept",
                 tmp_path / "pilot-out")
    assert "| grpo-uniform | 1 |" in (tmp_path / "pilot-out" / "ab_table.md").read_text()


def test_a_new_sitting_skips_committed_runs_and_reuses_the_before(tmp_path, monkeypatch):
    """runs/ is not kept between sittings: what is committed in experiments/runs/ counts."""
    kept, out = tmp_path / "kept", tmp_path / "out"
    fake_run(tmp_path / "old-grid", "grpo-random", 0, 55.0)
    (tmp_path / "old-grid" / "before.json").write_text('{"t@1024": 10.0}')
    ab.summarize(ab.SETTINGS["2"], tmp_path / "old-grid", kept, out)
    assert (kept / "before.json").exists() and not (out / "before.json").exists()
    assert "| not recorded | not recorded | 1 |" in (out / "ab_table.md").read_text()
    started = []
    monkeypatch.setattr(ab.subprocess, "run", lambda argv, check: started.append(argv))
    grid = tmp_path / "new-grid"
    ab.run_grid(grid, ["grpo-random", "grpo-uniform"], [0], [], ab.SETTING_2, committed=kept)
    assert (grid / "before.json").read_text() == '{"t@1024": 10.0}'
    assert len(started) == 1 and "grpo-uniform-seed0" in started[0]


def test_descriptive_pairs_and_the_step_size_fit(tmp_path):
    """The extra pairs the write-up reads come with their interval and detectable difference;
    an outcome that is a line in log KL is explained entirely by the step size."""
    fake_grid(tmp_path, {"grpo-longact": [40.0, 44.0, 42.0], "grpo-uniform": [30.0, 34.0, 35.0],
                         "grpo-longact-1row": [5.0, 5.0, 5.0]})
    for run in tmp_path.iterdir():  # KL chosen so that outcome = 10 log(KL) + 100 exactly
        kl = math.exp((json.loads((run / "eval.json").read_text())["after"]["t@1024"] - 100) / 10)
        rows = [json.dumps({"step": s, "reward": 0.0, "kl": kl}) + "\n" for s in range(4)]
        (run / "metrics.jsonl").write_text("".join(rows))
    runs = ab.collect(tmp_path)
    table = ab.pairs_table(runs, (("grpo-longact", "grpo-uniform"), ("grpo-random", "grpo-x")))
    d, half = ab.difference([10.0, 10.0, 7.0])  # mean 9, sd sqrt(3)
    assert f"| grpo-longact - grpo-uniform | +9.0 [{9 - half:+.1f}, {9 + half:+.1f}] | " in table
    assert "grpo-random" not in table  # an arm that has not run is left out
    fit = ab.kl_fit(runs, ("grpo-longact-1row",))
    assert "(6 runs; not grpo-longact-1row)" in fit and "step size 1.00" in fit


def test_the_summary_names_resumed_runs_and_the_flags_a_resume_changed(tmp_path):
    assert runfiles.KL_STOP == 1000.0  # the default every committed grid run recorded
    plain = fake_run(tmp_path, "grpo-uniform", 0, 1.0)
    assert runfiles.resumed_runs(tmp_path) == ""  # nothing resumed: no line at all
    old = fake_run(tmp_path, "grpo-uniform", 1, 1.0)  # resumed by code that kept the last step
    (old / "config.json").write_text(json.dumps({"resumed_at": 7, "kl_stop": 0.0}))
    new = fake_run(tmp_path, "grpo-uniform", 2, 1.0)
    (new / "config.json").write_text(json.dumps({"resumed_at": 7, "resumes": [
        {"at": 3, "changed": {}}, {"at": 7, "changed": {"kl_stop": [1000.0, 0.0]}}]}))
    text = runfiles.resumed_runs(tmp_path)
    assert plain.name not in text
    assert f"- {old.name}: resumed last at step 7, with kl_stop 0.0 (default 1000.0)" in text
    assert f"- {new.name}: resumed at step 3; at step 7, kl_stop 1000.0 -> 0.0" in text
