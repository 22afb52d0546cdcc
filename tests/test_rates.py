"""Setting 2b's bookkeeping (experiments/rates.py), the crossed interval, and the per-item records
a run writes; fake run folders except for one tiny training run.

Run: .venv/bin/python -m pytest -q tests/test_rates.py
"""

import json
import math

import pytest

import train
from experiments import ab, rates
from experiments.stats import crossed_bootstrap

ITEMS = [f"t@1024/s0/{i}" for i in range(10)]


def fake_rate_run(folder, arm, factor, seed, after, val, correct=None, kl=0.01, qk=0.001):
    """A finished run with validation scores, per-item records, KL and q/k change."""
    run = folder / f"{rates.rate_arm(arm, factor)}-seed{seed}"
    (run / "items").mkdir(parents=True)
    ev = {"before": {"t@1024": 10.0}, "after": {"t@1024": after},
          "after_val": {"t@1024": val}}
    (run / "eval.json").write_text(json.dumps(ev))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward": 0.1, "kl": kl}) + "\n" for s in range(5)))
    (run / "samples.jsonl").write_text("")
    (run / "qk_change.json").write_text(json.dumps({"qk_rel_change": qk}))
    correct = correct if correct is not None else [after / 100] * len(ITEMS)
    (run / "items" / "after.jsonl").write_text("".join(
        json.dumps({"id": i, "prompt_sha": "p" + i[-1], "answer": "", "references": [],
                    "correct": c}) + "\n" for i, c in zip(ITEMS, correct)))


def grid(folder, vals):
    """{(arm, factor): [(after, val) per seed]} -> finished fake runs."""
    for (arm, f), per_seed in vals.items():
        for seed, (after, val) in enumerate(per_seed):
            fake_rate_run(folder, arm, f, seed, after, val, kl=0.01 * float(f),
                          qk=0.001 * float(f))


def test_crossed_bootstrap_by_hand():
    same = [[5.0] * 20 for _ in range(3)]  # (S, I) every difference 5: no spread at all
    assert crossed_bootstrap(same) == (5.0, 5.0, 5.0)
    spread = [[float(i % 2) * 10 for i in range(40)] for _ in range(3)]  # half 0, half 10
    mean, lo, hi = crossed_bootstrap(spread)
    assert mean == 5.0 and lo < 5.0 < hi and hi - lo < 5  # items vary, seeds do not
    seeds_differ = [[x] * 40 for x in (0.0, 10.0, 20.0)]
    mean, lo, hi = crossed_bootstrap(seeds_differ)
    assert mean == 10.0 and lo <= 3.4 and hi >= 16.6  # the seed draw widens it


def test_best_rate_is_chosen_on_validation_items_only(tmp_path):
    grid(tmp_path, {("grpo-longact", "1"): [(90, 40)] * 3, ("grpo-longact", "2"): [(10, 50)] * 3,
                    ("grpo-longact", "4"): [(50, 45)] * 3,
                    ("grpo-uniform", "1"): [(50, 60)] * 3, ("grpo-uniform", "2"): [(50, 60)] * 3,
                    ("grpo-uniform", "4"): [(50, 61)] * 2})  # x4: only 2 seeds, not chosen yet
    runs = ab.collect(tmp_path)
    assert rates.best_rates(runs) == {"grpo-longact": "2", "grpo-uniform": "1"}  # tie: smaller
    # uniform's best is the smallest factor run: rule 2 adds x0.5; LongAct's is inside its range
    assert rates.arms_to_add(runs) == ["grpo-uniform-lrx0.5"]


def test_a_best_rate_at_the_top_adds_the_next_factor(tmp_path):
    grid(tmp_path, {("grpo-random-static", f): [(40, 30 + float(f))] * 3
                    for f in ("1", "2", "4")})
    assert rates.arms_to_add(ab.collect(tmp_path)) == ["grpo-random-static-lrx8"]


def test_reading_at_best_rates_claims_only_where_both_intervals_agree(tmp_path):
    vals = {("grpo-longact", f): [(60 + s, 50 - abs(float(f) - 2)) for s in range(3)]
            for f in ("1", "2", "4")}
    vals.update({("grpo-random-static", f): [(50 + s, 40 - abs(float(f) - 2)) for s in range(3)]
                 for f in ("1", "2", "4")})
    vals.update({("grpo-uniform", f): [(59 + 2 * s, 45 - abs(float(f) - 2)) for s in range(3)]
                 for f in ("1", "2", "4")})
    grid(tmp_path, vals)
    runs = ab.collect(tmp_path)
    text = rates.reading(runs, ("grpo-longact", "grpo-random-static"),
                         ("grpo-longact", "grpo-uniform"), "prereg.md")
    assert "best rates: grpo-longact x2, grpo-random-static x2, grpo-uniform x2" in text
    primary, secondary = text.splitlines()[2:]
    assert "+10.0, t [+10.0, +10.0], crossed [+10.0, +10.0]" in primary
    assert "grpo-longact is better" in primary
    assert "no difference detected" in secondary  # -1 +- the seed spread


def test_no_comparison_is_read_while_the_rules_still_run(tmp_path):
    # the pre-registered factors, seed 2 of x2 and x4 still running: x1 alone has seeds 0-2,
    # so it would be "best" and compared; nothing may be read until every rate has them
    primary = ("grpo-longact", "grpo-random-static")
    vals = {(a, f): [(60 + 10 * (a == "grpo-longact"), 50 + float(f))] * (3 if f == "1" else 2)
            for a in rates.ARMS for f in rates.FIRST}
    grid(tmp_path, vals)
    runs = ab.collect(tmp_path)
    assert rates.pending(runs, primary) == [f"{a}-lrx{f} seeds 2" for a in rates.ARMS
                                            for f in ("2", "4")]
    text = rates.reading(runs, primary, ("grpo-longact", "grpo-uniform"), "prereg.md")
    assert "not read yet" in text and "better" not in text and "t [" not in text
    assert "best rates" not in text and "(best)" not in rates.rates_table(runs)
    # every seed in, best at the top: rule 2 is pending
    for a in rates.ARMS:
        for f in ("2", "4"):
            fake_rate_run(tmp_path, a, f, 2, 60 + 10 * (a == "grpo-longact"), 50 + float(f))
    runs = ab.collect(tmp_path)
    assert rates.pending(runs, primary) == [f"{a}-lrx8 seeds 0 1 2 (rule 2)" for a in rates.ARMS]
    assert "best rates so far: grpo-longact x4" in rates.reading(runs, primary, primary, "p.md")
    # LongAct's x8 under way: its missing seeds, and the other arms' rule 2 runs still listed
    fake_rate_run(tmp_path, "grpo-longact", "8", 0, 70, 58)
    assert rates.pending(ab.collect(tmp_path), primary) == [
        "grpo-longact-lrx8 seeds 1 2", "grpo-random-static-lrx8 seeds 0 1 2 (rule 2)",
        "grpo-uniform-lrx8 seeds 0 1 2 (rule 2)"]


def test_rule_3_is_pending_until_seeds_3_and_4_are_in(tmp_path):
    # best x2 inside the range; LongAct's outcomes spread by 5 points a seed: rule 3 adds seeds
    primary = ("grpo-longact", "grpo-random-static")
    grid(tmp_path, {(a, f): [(50 + 5 * s * (a == "grpo-longact"), 40 + float(f) * (f != "4"))
                             for s in range(3)] for a in rates.ARMS for f in rates.FIRST})
    assert rates.pending(ab.collect(tmp_path), primary) == [
        f"{a}-lrx2 seeds 3 4 (rule 3)" for a in rates.ARMS]
    fake_rate_run(tmp_path, "grpo-longact", "2", 3, 50, 0)  # one of them in: seed 4 left
    assert rates.pending(ab.collect(tmp_path), primary)[0] == "grpo-longact-lrx2 seeds 4 (rule 3)"
    for a in rates.ARMS:
        for seed in (3, 4):
            if (a, seed) != ("grpo-longact", 3):
                fake_rate_run(tmp_path, a, "2", seed, 50, 0)
    runs = ab.collect(tmp_path)
    assert rates.pending(runs, primary) == []
    text = rates.reading(runs, primary, ("grpo-longact", "grpo-uniform"), "prereg.md")
    assert "over 5 seeds" in text


def test_items_of_another_prompt_are_refused(tmp_path):
    grid(tmp_path, {("grpo-longact", "1"): [(60, 50)], ("grpo-uniform", "1"): [(50, 50)]})
    path = tmp_path / "grpo-uniform-lrx1-seed0" / "items" / "after.jsonl"
    path.write_text(path.read_text().replace('"prompt_sha": "p3"', '"prompt_sha": "zz"'))
    runs = ab.collect(tmp_path)
    with pytest.raises(ValueError, match="another prompt"):
        rates.items_matrix(runs, "grpo-longact-lrx1", "grpo-uniform-lrx1", [0])


def test_r_squared_by_hand():
    line = [("a", x, 2 * x + 1) for x in range(5)]
    assert rates.r_squared(line)["step size"] == pytest.approx(1.0)
    # two arms on parallel lines: the step size alone explains part, with the arm all of it
    two = [("a", x, x) for x in range(4)] + [("b", x, x + 10) for x in range(4)]
    r2 = rates.r_squared(two)
    assert r2["step size and arm"] == pytest.approx(1.0) and r2["step size"] < 0.2
    assert r2["arm"] == pytest.approx(1 - 10 / 210) and r2["step size"] == pytest.approx(
        1 - 200 / 210)


def test_summary_of_setting_2b_rebuilds_tables_and_figures(tmp_path):
    # every arm best at x4 after a widening to x8 (inside its range): the rules are done
    vals = {(a, f): [(50 + 10 * i + s, 40 - abs(float(f) - 4)) for s in range(3)]
            for i, a in enumerate(rates.ARMS) for f in ("1", "2", "4", "8")}
    grid(tmp_path / "grid", vals)
    kept, out = tmp_path / "kept", tmp_path / "out"
    ab.summarize(ab.SETTINGS["2b"], tmp_path / "grid", kept, out)
    text = (out / "ab_table.md").read_text()
    assert "x4 (best)" in text and "crossed [" in text and "not read yet" not in text
    assert "| outcome explained by (R^2) |" in text
    assert "| grpo-longact - grpo-random-static | x8 | 3 |" in text  # the same-rate table
    assert all((out / f).exists() for f in ("step_size.png", "rates.png", "ab.png"))
    assert (kept / "grpo-uniform-lrx8-seed2" / "items" / "after.jsonl").exists()


def test_the_2b_runner_adds_seeds_when_the_primary_detects_too_little(tmp_path, monkeypatch):
    # every arm's best validation rate is x2 (inside the range: no widening); LongAct's per-seed
    # outcomes spread by 5 points, so the primary detects only ~15 with 3 seeds: rule 3
    kept = tmp_path / "kept"
    grid(kept, {(a, f): [(50 + 5 * s * (a == "grpo-longact"), 40 + float(f) * (f != "4"))
                         for s in range(3)] for a in rates.ARMS for f in rates.FIRST})
    started = []
    monkeypatch.setattr(ab.subprocess, "run",
                        lambda argv, check: started.append(argv[argv.index("--run-name") + 1]))
    ab.run_rate_rules(ab.SETTINGS["2b"], tmp_path / "grid", kept, [])
    assert started == [f"{a}-lrx2-seed{s}" for s in (3, 4) for a in rates.ARMS]
    # stopped after two seed-3 runs had finished: started again, the rule still adds the rest
    primary = ab.SETTINGS["2b"].primary
    for arm in primary:
        fake_rate_run(kept, arm, "2", 3, 0, 0, kl=0.02, qk=0.002)
    started.clear()
    ab.run_rate_rules(ab.SETTINGS["2b"], tmp_path / "grid", kept, [])
    assert started == [f"{a}-lrx2-seed{s}" for s in (3, 4) for a in rates.ARMS
                       if not (s == 3 and a in primary)]


def test_a_run_writes_items_validation_and_qk_change(tiny_dir, qa_file, tmp_path):
    run = train.main(["--model", tiny_dir, "--train-data", qa_file, "--train-len", "128",
                      "--calib-len", "32", "--calib-samples", "2", "--prompts-per-step", "2",
                      "--group-size", "2", "--max-new-tokens", "4", "--steps", "1",
                      "--precision", "fp32", "--eval-tasks", "niah_single_1", "--eval-lengths",
                      "512", "--eval-samples", "2", "--val-samples", "1", "--lr", "1e-3",
                      "--out-dir", str(tmp_path), "--run-name", "items"])
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev) == {"before", "after_val", "after"}
    after = [json.loads(x) for x in (run / "items" / "after.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (run / "items" / "after_val.jsonl").read_text().splitlines()]
    assert [r["id"] for r in after] == ["niah_single_1@512/s0/0", "niah_single_1@512/s0/1"]
    assert [r["id"] for r in val] == ["niah_single_1@512/s1/0"]  # other items than the cells
    assert set(after[0]) == {"id", "prompt_sha", "answer", "references", "correct"}
    assert 100 * sum(r["correct"] for r in after) / 2 == ev["after"]["niah_single_1@512"]
    before = [json.loads(x) for x in (run / "items" / "before.jsonl").read_text().splitlines()]
    assert [r["prompt_sha"] for r in before] == [r["prompt_sha"] for r in after]
    qk = json.loads((run / "qk_change.json").read_text())
    assert qk["qk_change_l2"] > 0 and math.isclose(
        qk["qk_rel_change"], qk["qk_change_l2"] / qk["qk_weight_l2"], rel_tol=1e-6)


def test_same_rate_pairs_arms_at_each_rate_both_ran(tmp_path):
    # LongAct 10 points above fixed random rows at x1, level at x2; x4 has one seed of each only
    grid(tmp_path, {("grpo-longact", "1"): [(60, 0), (62, 0), (64, 0)],
                    ("grpo-random-static", "1"): [(50, 0), (52, 0), (54, 0)],
                    ("grpo-longact", "2"): [(70, 0), (60, 0)],
                    ("grpo-random-static", "2"): [(70, 0), (60, 0), (65, 0)],
                    ("grpo-longact", "4"): [(70, 0)], ("grpo-random-static", "4"): [(70, 0)]})
    text = rates.same_rate(ab.collect(tmp_path), [("grpo-longact", "grpo-random-static"),
                                                 ("grpo-longact", "grpo-uniform")])
    assert "| grpo-longact - grpo-random-static | x1 | 3 | +10.0 | [+10.0, +10.0] |" in text
    assert "| grpo-longact - grpo-random-static | x2 | 2 | +0.0 |" in text  # seeds both have
    assert "| x4 |" not in text and "grpo-uniform |" not in text  # one seed; no uniform runs
    assert rates.same_rate(ab.collect(tmp_path), [("grpo-longact", "grpo-uniform")]) == ""
