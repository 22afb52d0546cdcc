"""
experiments/ab.py -- the A/B question of LongAct at a scale one CPU can run: does updating only the
salient q/k rows beat updating all of them, and beat the same number of random rows?

    python -m experiments.ab run     [--setting 2|2b] [--arms ...] [--seeds 0 1 2]  # resumable
    python -m experiments.ab summary [--setting 2|2b]              # table and figure, from files
    python -m experiments.ab pilot   [--setting 2] [--arms ...] [--grid ...] [--extra ...]
    python -m experiments.ab run --setting 3-pilot   # setting 3's pilots: 2 rates x 3 seeds
    python -m experiments.ab run --setting 3         # setting 3 proper: 3 arms x 3 (or 5) seeds

Arms (SOURCES.md §1, §2): the paper's LongAct (per-head L2 saliency, masks from each step's
batch), LongAct with the static calibration mask, random rows at the same count per head (the
control that matters most: RL updates are sparse by nature, and random sparse subsets can match
full updates), bottom-k rows, all q/k rows (uniform), 1 row of 64 per head (q/k nearly frozen),
LongAct under `--mask-semantics grad`, a ratio sweep; DAPO arms in setting 1.

Settings (SOURCES.md §9.29, §9.43, §9.46, §9.52, §9.53): 1 trains every weight (the paper's
scope; there the q/k rows hardly mattered); 2 trains only the q/k projections (`--train-scope
qk`), where the rows are the only thing that learns; 2b runs three arms each at its own best
rate; 3's pilots look for damage the uniform update does where it never trained
(experiments/damage.py), and 3 proper asks whether LongAct damages less there. Setting 2 was
pre-registered before its grid ran (ab2_preregistration.md); its summary reports the positive
control and the primary comparison against that rule. Every arm of a seed starts from the same
model and trains on the same prompts; the "before" evaluation is computed once and shared, and
arms are compared by paired per-seed differences (a 95% t interval; SOURCES.md §9.42).
The finished runs' small files are committed in experiments/runs/<setting>/ and read back by
experiments/runfiles.py; the summary table and figures go to figures/<setting>/.

Shapes: S seeds, A arms, K evaluation cells.
"""

import argparse
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments import damage, rates, runfiles
from experiments.stats import (T_80, T_975, crossed_bootstrap, difference, mean_se,
                               paired_detectable, pooled_sd, t_quantile)
from plumbing import common

ARMS = {  # name -> train.py flags (on top of the setting's)
    "grpo-longact": ["--algo", "grpo", "--mask-strategy", "topk", "--mask-schedule", "step"],
    "grpo-longact-static": ["--algo", "grpo", "--mask-strategy", "topk",
                            "--mask-schedule", "static"],
    "grpo-random": ["--algo", "grpo", "--mask-strategy", "random", "--mask-schedule", "step"],
    "grpo-bottomk": ["--algo", "grpo", "--mask-strategy", "bottomk", "--mask-schedule", "step"],
    "grpo-uniform": ["--algo", "grpo", "--mask-strategy", "all"],
    "dapo-longact": ["--algo", "dapo", "--mask-strategy", "topk", "--mask-schedule", "step"],
    "dapo-uniform": ["--algo", "dapo", "--mask-strategy", "all"],
    # q/k nearly frozen: 1 row of 64 per head (the most salient): can the choice of rows matter?
    "grpo-longact-1row": ["--algo", "grpo", "--mask-strategy", "topk", "--mask-schedule", "step",
                          "--ratio", "0.015625"],
    # the paper's formula as a gradient hook would apply it: AdamW's momentum and decay untouched
    "grpo-longact-grad": ["--algo", "grpo", "--mask-strategy", "topk", "--mask-schedule", "step",
                          "--mask-semantics", "grad"],
    # a fixed random subset (drawn once from the seed): random rows as stable as LongAct's, so
    # that saliency and a stable mask can be told apart (exploratory in setting 2)
    "grpo-random-static": ["--algo", "grpo", "--mask-strategy", "random",
                           "--mask-schedule", "static"],
}
for _ratio in ("0.2", "0.4"):  # the paper's ratio ablation (0.3 is the default arm)
    ARMS[f"grpo-longact-r{_ratio}"] = ARMS["grpo-longact"] + ["--ratio", _ratio]
    ARMS[f"grpo-random-r{_ratio}"] = ARMS["grpo-random"] + ["--ratio", _ratio]
GRPO_ARMS = ["grpo-longact", "grpo-longact-static", "grpo-random", "grpo-bottomk", "grpo-uniform"]
# Setting 1 (SOURCES.md §9.29): every weight trains. The multi-key task (a haystack of
# distractor needles) at 512 tokens, 12 steps at lr 1e-5; evaluation on held-out seeds at the
# training length and 2x, on the trained task and an untrained one, 50 samples per cell.
SETTING = ["--train-task", "niah_multikey_2", "--train-len", "512", "--steps", "12",
           "--lr", "1e-5", "--warmup-steps", "2", "--prompts-per-step", "4", "--group-size", "8",
           "--eval-tasks", "niah_multikey_2", "niah_multikey_3", "--eval-lengths", "512", "1024",
           "--eval-samples", "50", "--save-every", "1"]
# Setting 2 (SOURCES.md §9.43): only the q/k projections train, so which rows train is the whole
# question; lr from the pilots (docs/LOG.md); fp32 everywhere, so that sittings on different CPUs
# run one grid.
SETTING_2_LR = "1e-4"
SETTING_2 = (SETTING[:SETTING.index("--lr")] + ["--lr", SETTING_2_LR]
             + SETTING[SETTING.index("--lr") + 2:] + ["--train-scope", "qk", "--precision", "fp32"])
ARMS_2 = ["grpo-longact", "grpo-random", "grpo-uniform", "grpo-longact-1row", "grpo-longact-grad",
          "grpo-longact-static", "grpo-bottomk", "grpo-longact-r0.2", "grpo-longact-r0.4",
          "grpo-random-r0.2", "grpo-random-r0.4"]
# Setting 2b (SOURCES.md §9.46, ab2b_preregistration.md): setting 2 with three arms, each at x1,
# x2 and x4 of its learning rate and read at its own best rate, chosen on 25 validation samples
# per cell (evaluation seed 1) that no reported cell uses. Every run keeps per-item records.
for _arm in rates.ARMS:
    for _f in rates.FACTORS:
        ARMS[rates.rate_arm(_arm, _f)] = ARMS[_arm] + [
            "--lr", f"{float(SETTING_2_LR) * float(_f):g}"]
SETTING_2B = SETTING_2 + ["--val-samples", "25", "--val-seed", "1", "--threads", "2"]
ARMS_2B = [rates.rate_arm(a, f) for f in rates.FIRST for a in rates.ARMS]
# Setting 3's pilots (SOURCES.md §9.52, ab3_pilots.md): setting 1's training (every weight), read
# where it never trained: four other RULER families at 4x the training length, 25 samples per
# cell. The uniform update at setting 1's rate and at 10x it; damage = after - before below 0.
SETTING_3_CELLS = ["--eval-tasks", "niah_multivalue", "niah_multiquery", "niah_single_3", "fwe",
                   "--eval-lengths", "2048", "--eval-samples", "25"]
SETTING_3_PILOT = (SETTING[:SETTING.index("--eval-tasks")] + SETTING_3_CELLS
                   + SETTING[SETTING.index("--save-every"):]
                   + ["--precision", "fp32", "--threads", "2"])
ARMS["grpo-uniform-lr1e-4"] = ARMS["grpo-uniform"] + ["--lr", "1e-4"]
ARMS_3_PILOT = ["grpo-uniform", "grpo-uniform-lr1e-4"]
# Setting 3 proper (SOURCES.md §9.53, ab3_preregistration.md): the pilots' setting at the rate
# that separated (1e-4, every weight trains); the outcome is the cell the uniform update damaged.
SETTING_3_LR = "1e-4"
_lr = SETTING_3_PILOT.index("--lr")
SETTING_3 = SETTING_3_PILOT[:_lr] + ["--lr", SETTING_3_LR] + SETTING_3_PILOT[_lr + 2:]
ARMS_3 = ["grpo-longact", "grpo-uniform", "grpo-random-static"]
DAMAGED_3 = ("niah_multivalue@2048",)


@dataclass(frozen=True)
class Setting:
    flags: list  # train.py flags of every run
    arms: list  # what `run` runs by default, in the order of the tables
    grid: str  # the runs' folders (weights too; not committed)
    runs: str  # the finished runs' small files and the shared "before" (committed)
    out: str  # the summary table and the figures (committed)
    baselines: tuple  # every arm minus each of these, paired by seed
    primary: tuple | None = None  # (arm, baseline): the pre-registered comparison
    control: tuple | None = None  # (arm, baseline): the positive control
    preregistration: str | None = None  # the file that states the rule, committed before the runs
    secondary: tuple | None = None  # (arm, baseline): the pre-registered secondary comparison
    by_rate: bool = False  # arms are read at their best learning rates (experiments/rates.py)
    damage_plan: str | None = None  # read as damage against "before" (experiments/damage.py)
    damaged: tuple = ()  # setting 3 proper: the cells whose mean is the pre-registered outcome
    pairs: tuple = ()  # more (arm, other arm) differences the text reads, descriptive only
    kl_fit_without: tuple | None = None  # R^2 of outcome on log KL over every arm but these


SETTINGS = {
    "1": Setting(SETTING, GRPO_ARMS, "runs/ab", "experiments/runs/ab", "figures/ab",
                 ("grpo-uniform", "grpo-random", "dapo-uniform")),
    "2": Setting(SETTING_2, ARMS_2, "runs/ab2", "experiments/runs/ab2", "figures/ab2",
                 ("grpo-random", "grpo-uniform", "grpo-longact-1row"),
                 primary=("grpo-longact", "grpo-random"),
                 control=("grpo-uniform", "grpo-longact-1row"),
                 preregistration="experiments/ab2_preregistration.md",
                 pairs=(("grpo-longact", "grpo-uniform"), ("grpo-longact-grad", "grpo-longact"),
                        ("grpo-longact-static", "grpo-longact"), ("grpo-bottomk", "grpo-random"),
                        ("grpo-bottomk", "grpo-longact"), ("grpo-longact-r0.2", "grpo-longact"),
                        ("grpo-longact-r0.4", "grpo-longact"), ("grpo-random-r0.2", "grpo-random"),
                        ("grpo-random-r0.4", "grpo-random"),
                        ("grpo-longact-r0.2", "grpo-random-r0.4")),
                 kl_fit_without=("grpo-longact-1row",)),
    "2b": Setting(SETTING_2B, ARMS_2B, "runs/ab2b", "experiments/runs/ab2b", "figures/ab2b", (),
                  primary=("grpo-longact", "grpo-random-static"),
                  secondary=("grpo-longact", "grpo-uniform"), by_rate=True,
                  preregistration="experiments/ab2b_preregistration.md"),
    "3-pilot": Setting(SETTING_3_PILOT, ARMS_3_PILOT, "runs/ab3-pilot",
                       "experiments/runs/ab3-pilot", "figures/ab3-pilot", (),
                       damage_plan="experiments/ab3_pilots.md"),
    "3": Setting(SETTING_3, ARMS_3, "runs/ab3", "experiments/runs/ab3", "figures/ab3", (),
                 primary=("grpo-longact", "grpo-uniform"),
                 secondary=("grpo-longact", "grpo-random-static"),
                 preregistration="experiments/ab3_preregistration.md",
                 damage_plan="experiments/ab3_preregistration.md", damaged=DAMAGED_3),
}



# -----------------------------------------------------------------------------
# running

def run_dir(grid: Path, arm: str, seed: int) -> Path:
    return grid / f"{arm}-seed{seed}"


def train_argv(grid: Path, arm: str, seed: int, extra: list, flags: list = SETTING) -> list:
    folder = run_dir(grid, arm, seed)
    argv = flags + ARMS[arm] + ["--seed", str(seed), "--out-dir", str(grid), "--run-name",
                                  folder.name, "--before-eval", str(grid / "before.json"), *extra]
    if (folder / "ckpt").exists() or (folder / "ckpt.old").exists():
        argv += ["--resume", str(folder)]
    return argv


def run_grid(grid: Path, arms: list, seeds: list, extra: list, flags: list = SETTING,
             committed: Path | None = None) -> None:
    """Every unfinished (arm, seed) in turn, seed-major so that each sitting adds whole seeds.
    `committed` is the setting's folder under experiments/runs/: a run whose small files are
    committed there is finished (runs/ is not kept between sittings), and its shared "before" is
    reused from there."""
    grid.mkdir(parents=True, exist_ok=True)
    if committed and (committed / "before.json").exists() and not (grid / "before.json").exists():
        shutil.copy(committed / "before.json", grid / "before.json")
    for seed in seeds:
        for arm in arms:
            folder = run_dir(grid, arm, seed)
            kept = committed / folder.name if committed else None
            if runfiles.is_finished(folder) or (kept and runfiles.is_finished(kept)):
                print(f"{folder.name}: finished, skipped")
                continue
            argv = [sys.executable, "train.py", *train_argv(grid, arm, seed, extra, flags)]
            print(f"{folder.name}: {' '.join(argv[1:])}", flush=True)
            subprocess.run(argv, check=True)


# -----------------------------------------------------------------------------
# summary (pure functions, then files)

ALL = runfiles.ALL  # a run's mean over its task@length cells: 4x the samples of one cell


def collect(folder: Path) -> dict:
    """The finished runs of this file's arms in `folder` (experiments/runfiles.py)."""
    return runfiles.collect(folder, ARMS)


def cells_of(runs: dict) -> list:
    """Evaluation cells ("task@length") in natural order (512 before 1024), averages left out,
    then the mean of the cells."""
    return sorted({k for arm in runs.values() for r in arm.values() for k in r["after"]
                   if "@" in k and not k.startswith("ruler_avg")}, key=common.natural_key) + [ALL]


def after_scores(runs: dict, arm: str, cell: str) -> list:
    return [r["after"][cell] for r in runs[arm].values()]  # (S,) one score per seed


def detectable(runs: dict, cell: str, algo: str = "grpo") -> float:
    """Smallest difference between two arms of `algo` an unpaired comparison detects in `cell`."""
    groups = [after_scores(runs, arm, cell) for arm in runs if arm.startswith(algo + "-")]
    seeds = max(len(g) for g in groups)
    dof = 2 * (seeds - 1)
    return ((t_quantile(T_975, dof) + t_quantile(T_80, dof)) * pooled_sd(groups)
            * math.sqrt(2 / seeds))


def paired(runs: dict, arm: str, base: str, cell: str) -> list:
    """Per-seed differences arm - base in `cell`, over the seeds both have."""
    seeds = sorted(set(runs[arm]) & set(runs[base]))
    return [runs[arm][s]["after"][cell] - runs[base][s]["after"][cell] for s in seeds]  # (S,)


def detectable_paired(runs: dict, cell: str, base: str = "grpo-uniform") -> float:
    """Smallest difference the paired comparison detects in `cell` (SOURCES.md §9.42): the SD
    of the per-seed differences from `base`, pooled over every other arm of its algorithm."""
    if base not in runs:  # the baseline has not run yet
        return float("nan")
    algo = base.split("-")[0]
    diffs = [paired(runs, a, base, cell) for a in runs if a != base and a.startswith(algo + "-")]
    diffs = [d for d in diffs if len(d) > 1]
    if not diffs:
        return float("nan")
    seeds = max(len(d) for d in diffs)
    dof = seeds - 1
    return (t_quantile(T_975, dof) + t_quantile(T_80, dof)) * pooled_sd(diffs) / math.sqrt(seeds)


def summary_table(runs: dict, base: str = "grpo-uniform") -> tuple:
    """Markdown table of mean +- se per arm and cell, and the smallest detectable difference
    (paired: from the per-seed differences of every GRPO arm with `base`)."""
    cells = cells_of(runs)
    before = next(iter(next(iter(runs.values())).values()))["before"]
    lines = ["| arm | seeds | " + " | ".join(cells) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in cells) + " |",
             "| before (shared) | - | " + " | ".join(f"{before[c]:.1f}" for c in cells) + " |"]
    mde = {c: detectable_paired(runs, c, base) for c in cells}
    for arm in (a for a in ARMS if a in runs):
        row = [mean_se(after_scores(runs, arm, c)) for c in cells]
        lines.append(f"| {arm} | {len(runs[arm])} | " + " | ".join(
            f"{m:.1f}" if math.isnan(se) else f"{m:.1f} ± {se:.1f}" for m, se in row) + " |")
    unpaired = {c: detectable(runs, c) for c in cells}
    for name, values in (("smallest detectable GRPO difference, paired by seed", mde),
                         ("smallest detectable GRPO difference, unpaired", unpaired)):
        lines.append(f"| {name} | - | " + " | ".join(
            "n/a" if math.isnan(values[c]) else f"{values[c]:.1f}" for c in cells) + " |")
    return "\n".join(lines), mde


def differences_table(runs: dict,
                      baselines=("grpo-uniform", "grpo-random", "dapo-uniform")) -> str:
    """Each arm minus each baseline of the same algorithm, per cell: mean per-seed difference
    [paired 95% interval]; '*' where the interval excludes 0 (the only differences to claim)."""
    cells = cells_of(runs)
    lines = ["| arm - baseline | " + " | ".join(cells) + " |",
             "| --- | " + " | ".join("---:" for _ in cells) + " |"]
    for base in (b for b in baselines if b in runs):
        algo = base.split("-")[0]
        for arm in (a for a in ARMS if a in runs and a != base and a.startswith(algo + "-")):
            parts = []
            for c in cells:
                d, half = difference(paired(runs, arm, base, c))
                if math.isnan(half):  # one seed in an arm: no interval yet
                    parts.append(f"{d:+.1f}")
                    continue
                star = "*" if abs(d) > half else ""
                parts.append(f"{d:+.1f} [{d - half:+.1f}, {d + half:+.1f}]{star}")
            lines.append(f"| {arm} - {base} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def preregistered(runs: dict, setting: Setting) -> str:
    """The positive control and the primary comparison on the mean of cells, read by the rule
    the setting's pre-registration states (the same words, applied to the numbers)."""
    lines = [f"Pre-registered in {setting.preregistration}: mean of cells, paired by seed, "
             "95% t interval."]
    control_ok = None
    for role, (arm, base) in (("positive control", setting.control),
                              ("primary comparison", setting.primary)):
        if arm not in runs or base not in runs or len(paired(runs, arm, base, ALL)) < 2:
            lines.append(f"- {role}, {arm} - {base}: fewer than 2 paired seeds, no reading yet")
            continue
        ds = paired(runs, arm, base, ALL)  # (S,)
        d, half = difference(ds)
        lo, hi = d - half, d + half
        if role == "positive control":
            control_ok = lo > 0
            reading = ("separates: in this setting the q/k rows matter" if control_ok else
                       "does not separate: this setting cannot show which rows matter")
        elif control_ok is not True:
            reading = "not read: the positive control has not separated"
        else:
            reading = ("LongAct's rows beat random rows" if lo > 0 else
                       "random rows beat LongAct's" if hi < 0 else
                       "no difference detected (the interval includes 0)")
        mde = paired_detectable(ds)
        more = (f"; smallest detectable {mde:.1f} > 4 with 3 seeds: the rule adds seeds 3 and 4"
                if role != "positive control" and len(ds) == 3 and mde > 4  # rule 2: primary
                else f"; smallest detectable {mde:.1f}")
        lines.append(f"- {role}, {arm} - {base}: {d:+.1f} [{lo:+.1f}, {hi:+.1f}] over "
                     f"{len(ds)} seeds: {reading}{more}")
    extra = [arm for arm in ARMS if arm in runs and arm not in setting.arms]
    if extra:  # runs outside the pre-registered grid are shown, and named as such
        lines.append(f"- not pre-registered, exploratory: {', '.join(extra)}")
    return "\n".join(lines)


def ratio_table(runs: dict) -> str:
    """The ratio ablation: LongAct and random rows at each ratio, mean of cells (mean +- se), and
    their paired difference [95% interval]."""
    arms = {"0.2": ("grpo-longact-r0.2", "grpo-random-r0.2"),
            "0.3": ("grpo-longact", "grpo-random"),
            "0.4": ("grpo-longact-r0.4", "grpo-random-r0.4")}
    lines = ["| ratio | LongAct | random rows | LongAct - random |",
             "| ---: | ---: | ---: | ---: |"]
    for ratio, (la, rnd) in arms.items():
        if la not in runs or rnd not in runs:
            continue
        cells = [mean_se(after_scores(runs, a, ALL)) for a in (la, rnd)]
        d, half = difference(paired(runs, la, rnd, ALL))
        ci = f"{d:+.1f}" if math.isnan(half) else f"{d:+.1f} [{d - half:+.1f}, {d + half:+.1f}]"
        lines.append(f"| {ratio} | " + " | ".join(
            f"{m:.1f}" if math.isnan(se) else f"{m:.1f} ± {se:.1f}" for m, se in cells)
            + f" | {ci} |")
    return "\n".join(lines) if len(lines) > 3 else ""  # a sweep needs two ratios or more


def pairs_table(runs: dict, pairs: tuple) -> str:
    """More differences the write-up reads, on the mean of cells, descriptive (not
    pre-registered): arm - other arm paired by seed [95% t], and the smallest difference those
    seeds detect (80% power)."""
    lines = ["| arm - other arm (descriptive) | mean of cells | smallest detectable |",
             "| --- | ---: | ---: |"]
    for arm, base in (p for p in pairs if p[0] in runs and p[1] in runs):
        ds = paired(runs, arm, base, ALL)  # (S,)
        if len(ds) > 1:
            d, half = difference(ds)
            lines.append(f"| {arm} - {base} | {d:+.1f} [{d - half:+.1f}, {d + half:+.1f}] | "
                         f"{paired_detectable(ds):.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def kl_fit(runs: dict, without: tuple) -> str:
    """How much of the per-run mean of cells the step size explains: R^2 on the log of the mean
    KL of the last 4 steps, on the arm, and on both (experiments/rates.py), descriptive."""
    points = [(arm, math.log(r["kl_last"]), r["after"][ALL]) for arm in runs if arm not in without
              for r in runs[arm].values() if r["kl_last"] > 0]  # (arm, log KL, outcome)
    fit = rates.r_squared(points)
    if not fit:
        return ""
    runs_used = f"{len(points)} runs" + (f"; not {', '.join(without)}" if without else "")
    return (f"Step size, descriptive ({runs_used}): R^2 of the per-run mean of cells on "
            + ", ".join(f"{k} {v:.2f}" for k, v in fit.items())
            + " (step size = log KL, last 4 steps).")


def reward_trend(runs: dict, k: int = 4) -> str:
    """Mean training reward over the first and the last k steps per arm (is it still rising?)."""
    lines = [f"| arm | reward, first {k} steps | reward, last {k} steps | last {k} minus the {k} "
             "before |", "| --- | ---: | ---: | ---: |"]
    for arm in (a for a in ARMS if a in runs):
        curves = [r["reward"] for r in runs[arm].values()]  # (S, steps)
        T = min(len(c) for c in curves)
        avg = [sum(c[t] for c in curves) / len(curves) for t in range(T)]  # (steps,) over seeds
        first, last = sum(avg[:k]) / k, sum(avg[T - k:]) / k
        prev = sum(avg[T - 2 * k:T - k]) / k
        lines.append(f"| {arm} | {first:.3f} | {last:.3f} | {last - prev:+.3f} |")
    return "\n".join(lines)


def arm_styles() -> tuple:
    """{arm: colour}, {arm: line style}, {arm: bar hatch} for every arm, fixed across figures
    and settings. A variant of an arm (another ratio, another rate) keeps its parent's colour
    and differs by line and hatch, so "same rows, another ratio or step" reads at a glance."""
    bases = [arm for arm in ARMS if "-r0." not in arm and "-lr" not in arm]  # ten colours
    colour = {arm: f"C{i}" for i, arm in enumerate(bases)}
    line = {arm: "-" for arm in bases}
    hatch = {arm: None for arm in bases}
    for arm in ARMS:
        if "-lrx" in arm:  # a learning-rate arm: a line and a hatch per factor
            parent, factor = rates.split(arm)
            colour[arm] = colour[parent]
            line[arm], hatch[arm] = {"0.25": ((0, (1, 3)), "oo"), "0.5": (":", ".."),
                                     "1": ("-", None), "2": ("--", "//"), "4": ("-.", "xx"),
                                     "8": ((0, (5, 1)), "\\\\"),
                                     "16": ((0, (3, 1, 1, 1)), "++")}[factor]
        elif "-lr" in arm:  # one other rate (setting 3's pilots): its arm's colour, dashed
            colour[arm], line[arm], hatch[arm] = colour[arm.rsplit("-lr", 1)[0]], "--", "//"
        elif "-r0." in arm:
            parent, ratio = arm.rsplit("-r", 1)
            colour[arm] = colour[parent]
            line[arm], hatch[arm] = {"0.2": ("--", "//"), "0.4": (":", "..")}[ratio]
    return colour, line, hatch


def plot(runs: dict, out: Path) -> None:
    """Left: training reward per step, mean +- se over seeds per arm. Right: accuracy after
    training per arm and cell, mean +- se, with the shared 'before' as a black tick."""
    import matplotlib  # plots only: imported here so the runner works without it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = [arm for arm in ARMS if arm in runs]  # fixed order and colour per arm
    colour, line, hatch = arm_styles()
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.8))
    for arm in arms:
        curves = [r["reward"] for r in runs[arm].values()]  # (S, steps)
        T = min(len(c) for c in curves)
        stats = [mean_se([c[t] for c in curves]) for t in range(T)]  # (T,) over seeds
        m = [s[0] for s in stats]
        se = [0 if math.isnan(s[1]) else s[1] for s in stats]
        a.plot(range(T), m, label=f"{arm} ({len(curves)} seeds)", color=colour[arm],
               linestyle=line[arm])
        a.fill_between(range(T), [x - e for x, e in zip(m, se)], [x + e for x, e in zip(m, se)],
                       alpha=0.15, color=colour[arm])
    a.set(xlabel="step", ylabel="training reward", title="training reward, mean ± s.e. over seeds")
    cells = cells_of(runs)
    before = next(iter(runs[arms[0]].values()))["before"]
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        stats = [mean_se(after_scores(runs, arm, c)) for c in cells]  # (K,) over seeds
        b.bar([j + i * width for j in range(len(cells))], [s[0] for s in stats], width,
              yerr=[0 if math.isnan(s[1]) else s[1] for s in stats], label=arm, capsize=2,
              color=colour[arm], hatch=hatch[arm], edgecolor="white", linewidth=0)
    b.hlines([before[c] for c in cells], [j - width / 2 for j in range(len(cells))],
             [j + 0.8 - width / 2 for j in range(len(cells))], colors="k", label="before")
    b.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))],
                 [c.replace("@", "\n@") for c in cells], fontsize=8)  # two lines: no overlap
    b.set(ylabel="accuracy (%)", ylim=(0, 105),
          title="accuracy after training, mean ± s.e. over seeds (black: before)")
    for ax in (a, b):  # legends below the panels: nine or more arms would cover the data
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    with common.atomic_path(out / "ab.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")


def summarize(setting: Setting, grid: Path, kept: Path, out: Path) -> None:
    """Copy the finished runs' small files from `grid` into `kept` (experiments/runs/<setting>),
    then rebuild the tables and the figures in `out` (figures/<setting>) from `kept` alone, so a
    clean clone rebuilds them from committed files."""
    runfiles.copy_small_files(grid, kept)
    runs = collect(kept)
    if not runs:
        raise SystemExit(f"no finished run in {kept} or {grid}")
    out.mkdir(parents=True, exist_ok=True)
    table, _ = summary_table(runs, setting.primary[1] if setting.primary else "grpo-uniform")
    if setting.damaged:  # setting 3 proper: LongAct - uniform on the damaged cells
        parts = [damage.protection_reading(runs, setting.primary, setting.secondary,
                                           list(setting.damaged), setting.preregistration),
                 damage.damage_table(runs), table, damage.values_table(kept),
                 damage.step_table(runs, list(setting.damaged))]
    elif setting.damage_plan:  # setting 3's pilots: damage against "before"
        parts = [damage.reading(runs, setting.damage_plan), damage.damage_table(runs), table,
                 damage.values_table(kept)]
    elif setting.by_rate:  # setting 2b: each arm at its best rate (experiments/rates.py)
        parts = [rates.reading(runs, setting.primary, setting.secondary,
                               setting.preregistration), rates.rates_table(runs), table,
                 rates.same_rate(runs, [setting.primary, setting.secondary]),
                 rates.step_size(runs)]
    else:
        parts = [preregistered(runs, setting)] if setting.preregistration else []
        parts += [table, differences_table(runs, setting.baselines), ratio_table(runs),
                  pairs_table(runs, setting.pairs)]
        if setting.kl_fit_without is not None:
            parts.append(kl_fit(runs, setting.kl_fit_without))
    parts += [reward_trend(runs), runfiles.timing_table(runs, ARMS),
              runfiles.provenance(kept), runfiles.resumed_runs(kept)]
    text = "\n\n".join(p for p in parts if p)
    common.write_text_atomic(out / "ab_table.md", text + "\n")
    print(text)
    plot(runs, out)
    if setting.by_rate:
        colour = arm_styles()[0]
        rates.plot_step_size(runs, out, colour)
        rates.plot_rates(runs, out, colour)


def main(argv=None):
    p = argparse.ArgumentParser(description="LongAct A/B grid: arms x seeds, then a summary.")
    p.add_argument("command", choices=["run", "summary", "pilot"])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="1")
    p.add_argument("--grid", default=None, help="the runs' folder (default: the setting's)")
    p.add_argument("--runs", default=None,
                   help="the finished runs' small files, committed (default: the setting's, "
                        "experiments/runs/...)")
    p.add_argument("--out", default=None,
                   help="the table and figures (default: the setting's, figures/...)")
    p.add_argument("--arms", nargs="+", default=None, choices=sorted(ARMS),
                   help="default: the setting's arms (pilot: grpo-uniform)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more train.py flags for every run (e.g. --threads 2); last, they win")
    a = p.parse_args(argv)
    setting = SETTINGS[a.setting]
    kept = Path(a.runs or setting.runs)
    if a.command == "summary":
        return summarize(setting, Path(a.grid or setting.grid), kept, Path(a.out or setting.out))
    if a.command == "pilot":  # one seed, outside the grid's folder
        grid = Path(a.grid or setting.grid + "-pilot")
        return run_grid(grid, a.arms or ["grpo-uniform"], a.seeds[:1], a.extra, setting.flags)
    grid = Path(a.grid or setting.grid)
    run_grid(grid, a.arms or setting.arms, a.seeds, a.extra, setting.flags, committed=kept)
    if setting.by_rate and not a.arms:  # rules 2 and 3 of the pre-registration, then done
        run_rate_rules(setting, grid, kept, a.extra)
    if setting.damaged and not a.arms:  # setting 3's seed rule
        run_seed_rule(setting, grid, kept, a.extra)


def run_rate_rules(setting: Setting, grid: Path, kept: Path, extra: list) -> None:
    """Setting 2b's rules, in order: widen an arm whose best rate sits at an end of its range
    (until none does), then, if the primary comparison's smallest detectable difference at the
    best rates exceeds 4 with 3 seeds, seeds 3 and 4 for the three arms at their best rates."""
    while True:
        runfiles.copy_small_files(grid, kept)
        runs = collect(kept)
        more = rates.arms_to_add(runs)
        if not more:
            break
        run_grid(grid, more, list(rates.SEEDS), extra, setting.flags, committed=kept)
    best = rates.best_rates(runs)
    if len(best) == len(rates.ARMS):
        a, b = (rates.rate_arm(x, best[x]) for x in setting.primary)
        c = rates.compare(rates.first_seeds(runs), a, b)
        if rates.needs_more_seeds(c):
            chosen = [rates.rate_arm(x, f) for x, f in best.items()]
            run_grid(grid, chosen, [3, 4], extra, setting.flags, committed=kept)


def run_seed_rule(setting: Setting, grid: Path, kept: Path, extra: list) -> None:
    """Setting 3's rule: if the primary comparison's smallest detectable difference on the
    damaged cells exceeds 4 points with 3 seeds, seeds 3 and 4 for every arm."""
    runfiles.copy_small_files(grid, kept)
    runs = collect(kept)
    if any(arm not in runs for arm in setting.primary):
        return
    c = rates.compare(rates.first_seeds(runs), *setting.primary, list(setting.damaged))
    if rates.needs_more_seeds(c):
        run_grid(grid, setting.arms, [3, 4], extra, setting.flags, committed=kept)
        runfiles.copy_small_files(grid, kept)


if __name__ == "__main__":
    main()
