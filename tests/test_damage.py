"""Setting 3's pilots: damage against the shared "before" (experiments/damage.py), on fake run
folders with per-item records.

Run: .venv/bin/python -m pytest -q tests/test_damage.py
"""

import json

import pytest

from experiments import ab, damage, rates

CELLS = ("fwe@2048", "niah_multivalue@2048")
ITEMS = [f"{c}/s0/{i}" for c in CELLS for i in range(20)]


def fake_run(folder, arm, seed, after, before, sha="p"):
    """A finished run: per-item correctness `after` and `before` ({item id: 0 or 1}); the cell
    scores are the items' means, as evaluate.py computes them."""
    run = folder / f"{arm}-seed{seed}"
    (run / "items").mkdir(parents=True)

    def scores(items):
        return {c: 100 * sum(v for i, v in items.items() if i.startswith(c + "/"))
                / sum(1 for i in items if i.startswith(c + "/")) for c in CELLS}

    (run / "eval.json").write_text(json.dumps({"before": scores(before), "after": scores(after)}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward": 0.1, "kl": 0.0}) + "\n")
    (run / "samples.jsonl").write_text("")
    for name, items in (("after", after), ("before", before)):
        (run / "items" / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": i, "prompt_sha": sha + i, "answer": "", "references": [],
                        "correct": c}) + "\n" for i, c in items.items()))


BEFORE = {i: 1.0 if int(i.rsplit("/", 1)[1]) < 14 else 0.0 for i in ITEMS}  # 70% right


def forget(n_lost: int, cell: str) -> dict:
    """BEFORE with the first n_lost right items of `cell` now wrong."""
    out = dict(BEFORE)
    for i in ITEMS:
        if i.startswith(cell + "/") and int(i.rsplit("/", 1)[1]) < n_lost:
            out[i] = 0.0
    return out


def test_a_clear_drop_in_one_cell_is_damage_and_no_change_is_not(tmp_path):
    for s, lost in enumerate((6, 7, 8)):  # fwe loses 30-40 points in every seed
        fake_run(tmp_path, "grpo-uniform-lr1e-4", s, forget(lost, "fwe@2048"), BEFORE)
        fake_run(tmp_path, "grpo-uniform", s, dict(BEFORE), BEFORE)
    runs = ab.collect(tmp_path)
    hit = damage.damage(runs, "grpo-uniform-lr1e-4", "fwe@2048")
    assert hit["d"] == pytest.approx(-35.0) and hit["t"][1] < 0 and hit["crossed"][1] < 0
    assert damage.damaged(runs) == [("grpo-uniform-lr1e-4", "fwe@2048"),
                                    ("grpo-uniform-lr1e-4", damage.ALL)]
    none = damage.damage(runs, "grpo-uniform", "niah_multivalue@2048")
    assert none["d"] == 0.0 and not damage.is_damaged(none)
    text = damage.reading(runs, "plan.md")
    assert "damaged: grpo-uniform-lr1e-4 in fwe@2048" in text and "separates" in text


def test_a_drop_in_one_seed_only_is_not_damage(tmp_path):
    for s, lost in enumerate((10, 0, 0)):  # one seed forgets half the cell, two do not
        fake_run(tmp_path, "grpo-uniform", s, forget(lost, "fwe@2048"), BEFORE)
    runs = ab.collect(tmp_path)
    c = damage.damage(runs, "grpo-uniform", "fwe@2048")
    assert c["d"] < 0 and c["t"][1] > 0 and not damage.is_damaged(c)
    assert damage.damaged(runs) == []
    assert "nothing damaged." in damage.reading(runs, "plan.md")


def test_two_seeds_never_call_damage(tmp_path):
    for s in range(2):
        fake_run(tmp_path, "grpo-uniform", s, forget(8 + s, "fwe@2048"), BEFORE)
    runs = ab.collect(tmp_path)
    assert damage.damaged(runs) == []
    assert "fewer than 3 seeds" in damage.reading(runs, "plan.md")


def test_items_must_be_the_before_evaluations(tmp_path):
    fake_run(tmp_path, "grpo-uniform", 0, dict(BEFORE), BEFORE)
    runs = ab.collect(tmp_path)
    runs["grpo-uniform"][0]["before_items"] = {
        k: (v[0], "other") for k, v in runs["grpo-uniform"][0]["before_items"].items()}
    with pytest.raises(ValueError, match="another prompt"):
        damage.items_damage(runs["grpo-uniform"][0], "fwe@2048")


def test_summary_of_the_pilots_from_committed_files(tmp_path):
    grid, kept, out = tmp_path / "grid", tmp_path / "kept", tmp_path / "out"
    for s, lost in enumerate((6, 7, 8)):
        fake_run(grid, "grpo-uniform-lr1e-4", s, forget(lost, "fwe@2048"), BEFORE)
        fake_run(grid, "grpo-uniform", s, dict(BEFORE), BEFORE)
    ab.summarize(ab.SETTINGS["3-pilot"], grid, kept, out)
    text = (out / "ab_table.md").read_text()
    assert text.startswith("Damage rule (experiments/ab3_pilots.md)")
    assert "fwe@2048" in text and (out / "ab.png").exists()
    assert (kept / "grpo-uniform-seed0" / "items" / "before.jsonl").exists()


def test_pilot_setting_reads_untrained_families_at_four_times_the_training_length():
    flags = ab.SETTING_3_PILOT

    def values(name):
        i = flags.index(name) + 1
        out = []
        while i < len(flags) and not flags[i].startswith("--"):
            out.append(flags[i])
            i += 1
        return out

    assert values("--eval-lengths") == [str(4 * int(values("--train-len")[0]))]
    trained = values("--train-task")[0]
    assert trained not in values("--eval-tasks") and len(values("--eval-tasks")) == 4
    assert "--train-scope" not in flags  # every weight trains, as in setting 1
    assert values("--lr") == ["1e-5"] and ab.ARMS["grpo-uniform-lr1e-4"][-2:] == ["--lr", "1e-4"]


def test_values_named_counts_distinct_numbers_of_the_references_length(tmp_path):
    refs = ["2036476", "3930693", "8189431", "7811903"]
    assert damage.values_named({"answer": " 3930693.", "references": refs}) == 1
    assert damage.values_named({"answer": ": 3930693, 2036476 and 3930693; 12345678",
                                "references": refs}) == 2  # a repeat and an 8-digit number
    run = tmp_path / "grpo-uniform-seed0" / "items"
    run.mkdir(parents=True)
    for name, answer in (("before", "2036476, 3930693, 8189431, 7811903"), ("after", "3930693")):
        (run / f"{name}.jsonl").write_text(json.dumps(
            {"id": "niah_multivalue@2048/s0/0", "prompt_sha": "p", "answer": answer,
             "references": refs, "correct": 1.0}) + "\n")
    text = damage.values_table(tmp_path)
    assert "| (shared) | before | 0 of 1 | 4.00 |" in text
    assert "| grpo-uniform-seed0 | after | 1 of 1 | 1.00 |" in text


def test_protection_reading_on_the_damaged_cells(tmp_path):
    """Setting 3 proper: uniform forgets fwe in every seed, LongAct keeps it, random rows forget
    half as much; the outcome is the mean over the damaged cells only."""
    for s in range(3):
        fake_run(tmp_path, "grpo-uniform", s, forget(8 + s, "fwe@2048"), BEFORE)
        fake_run(tmp_path, "grpo-longact", s, forget(s, "fwe@2048"), BEFORE)
        fake_run(tmp_path, "grpo-random-static", s, forget(4 + s, "fwe@2048"), BEFORE)
    runs = ab.collect(tmp_path)
    c = rates.compare(runs, "grpo-longact", "grpo-uniform", ["fwe@2048"])
    assert c["seeds"] == 3 and c["d"] == pytest.approx(40.0) and c["crossed"][0] > 0
    both = rates.compare(runs, "grpo-longact", "grpo-uniform", list(CELLS))
    assert both["d"] == pytest.approx(20.0)  # the undamaged cell halves the difference
    text = damage.protection_reading(runs, ("grpo-longact", "grpo-uniform"),
                                     ("grpo-longact", "grpo-random-static"), ["fwe@2048"],
                                     "prereg.md")
    assert "damaged again: fwe@2048" in text
    assert "primary, grpo-longact - grpo-uniform: +40.0" in text
    assert "grpo-longact damages less" in text
    assert "secondary, grpo-longact - grpo-random-static: +20.0" in text


def test_setting_3_is_the_pilots_at_the_rate_that_separated():
    """Setting 3 proper changes only the rate, and its uniform arm is the pilots' 1e-4 arm."""
    import train
    s3, pilot = ab.SETTINGS["3"], ab.SETTINGS["3-pilot"]
    i = s3.flags.index("--lr")
    assert s3.flags[i + 1] == "1e-4" and s3.flags[:i] + s3.flags[i + 2:] == \
        pilot.flags[:i] + pilot.flags[i + 2:]
    grid = ab.Path("g")

    def args(flags, arm):  # the folder's name aside (it names the arm; nothing seeds from it)
        return vars(train.parse_args(ab.train_argv(grid, arm, 0, [], flags))) | {"run_name": 0}

    assert args(s3.flags, "grpo-uniform") == args(pilot.flags, "grpo-uniform-lr1e-4")
    assert {args(s3.flags, a)["lr"] for a in s3.arms} == {1e-4}
    assert {args(s3.flags, a)["train_scope"] for a in s3.arms} == {
        args(pilot.flags, "grpo-uniform")["train_scope"]}  # every weight trains in every arm
    before = json.loads((ab.Path(s3.runs) / "before.json").read_text())
    assert before == json.loads((ab.Path(pilot.runs) / "before.json").read_text())


def test_setting_3_summary_and_seed_rule(tmp_path, monkeypatch):
    """The summary reads the pre-registered rule on the damaged cell; with a noisy primary the
    runner adds seeds 3 and 4 for every arm, and the seeds 3+ line appears once they exist."""
    grid, kept, out = tmp_path / "grid", tmp_path / "kept", tmp_path / "out"
    setting = ab.Setting(ab.SETTING_3, ab.ARMS_3, str(grid), str(kept), str(out), (),
                         primary=("grpo-longact", "grpo-uniform"),
                         secondary=("grpo-longact", "grpo-random-static"),
                         preregistration="p.md", damage_plan="p.md",
                         damaged=("niah_multivalue@2048",))
    cell = "niah_multivalue@2048"
    for s, (lo, un) in enumerate(((2, 9), (8, 7), (1, 12))):  # LongAct - uniform varies a lot
        fake_run(grid, "grpo-longact", s, forget(lo, cell), BEFORE)
        fake_run(grid, "grpo-uniform", s, forget(un, cell), BEFORE)
        fake_run(grid, "grpo-random-static", s, forget(un, cell), BEFORE)
    called = []
    monkeypatch.setattr(ab, "run_grid", lambda g, arms, seeds, *a, **k: called.append(
        (arms, seeds)))
    first = {a: {0: r[0]} for a, r in ab.collect(grid).items()}
    assert "not read with 1 seed(s) (the rule reads 3)" in damage.protection_reading(
        first, setting.primary, setting.secondary, [cell], "p.md")
    two = {a: {s: r[s] for s in (0, 1)} for a, r in ab.collect(grid).items()}
    text = damage.protection_reading(two, setting.primary, setting.secondary, [cell], "p.md")
    assert text.count("not read with 2 seeds (the rule reads 3)") == 2
    text = damage.protection_reading(ab.collect(grid), setting.primary, setting.secondary,
                                     [cell], "p.md")  # detectable > 4: read over 5 seeds
    assert "not read with 3 seeds (the rule reads 5); smallest detectable" in text
    assert "control, grpo-uniform after - before: niah_multivalue@2048 -" in text and \
        "; not read with 3 seed(s) (the rule reads 5)" in text
    ab.run_seed_rule(setting, grid, kept, [])
    assert called == [(ab.ARMS_3, [3, 4])]
    ab.summarize(setting, grid, kept, out)
    text = (out / "ab_table.md").read_text()
    assert text.startswith("Pre-registered in p.md: outcome = mean of niah_multivalue@2048")
    assert "not read with 3 seed(s) (the rule reads 5)" in text and "adds seeds 3 and 4" in text
    assert "seeds 3+ only" not in text
    assert "| grpo-uniform-seed2 | -60.0 | 0.0000 | n/a | n/a | n/a |" in text  # 12 of 20 lost
    for s in (3, 4):
        fake_run(grid, "grpo-longact", s, forget(3, cell), BEFORE)
        fake_run(grid, "grpo-uniform", s, forget(9, cell), BEFORE)
    ab.run_seed_rule(setting, grid, kept, [])  # started again after some of seeds 3-4: goes on
    assert called == [(ab.ARMS_3, [3, 4])] * 2
    ab.summarize(setting, grid, kept, out)
    text = (out / "ab_table.md").read_text()
    assert "seeds 3+ only (the pilots picked the cell on seeds 0-2): +30.0" in text
    assert "damaged again: niah_multivalue@2048" in text  # the control, over 5 seeds
    assert "over 5 seeds: grpo-longact damages less" in text  # primary: read over 5 seeds
    assert "secondary, grpo-longact - grpo-random-static: " in text and \
        "not read with 3 seeds (the rule reads 5)" in text  # random rows still have 3


def test_step_table_shows_how_far_each_run_moved_and_what_it_wrote():
    runs = {"grpo-longact": {0: {"after": {"c@1": 40.0}, "before": {"c@1": 70.0},
                                 "kl_last": 0.25, "qk": {"qk_rel_change": 0.001},
                                 "len_last": 31.5, "trunc_last": 0.875}}}
    text = damage.step_table(runs, ["c@1"])
    assert "| grpo-longact-seed0 | -30.0 | 0.2500 | 0.0010 | 31.5 | 0.88 |" in text
