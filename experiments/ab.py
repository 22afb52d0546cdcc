"""
experiments/ab.py -- the A/B question of LongAct at a scale one CPU can run: does updating only the
salient q/k rows beat updating all of them, and beat the same number of random rows?

    python -m experiments.ab run     [--arms ...] [--seeds 0 1 2] [--grid runs/ab]   # resumable
    python -m experiments.ab summary [--grid runs/ab] [--out figures/ab]           # table, figures
    python -m experiments.ab pilot   [--grid runs/ab-pilot]                         # one short run

Arms (SOURCES.md §1, §2): the paper's LongAct (per-head L2 saliency, masks from each step's
batch), LongAct with the static calibration mask, random rows at the same count per head (the
control that matters most: RL updates are sparse by nature, and random sparse subsets can match
full updates),
bottom-k rows, and all q/k rows (uniform). All under GRPO; LongAct and uniform also under DAPO.
Every arm starts from the same model and the same evaluation samples, so the "before" evaluation is
computed once (train.py --before-eval) and shared.

Choices (this project's; SOURCES.md §9):
  1. choice: each run is a separate `train.py` process with its own folder; a finished run has
     eval.json with "after"; an unfinished one is resumed from its last checkpoint. The grid can be
     finished over several sittings.
  2. choice: seeds are blocks. Within a seed every arm trains on the same prompts and starts from
     the same model, so the comparison of two arms uses their per-seed differences (a paired t
     interval, 95%, Student's t at seeds - 1 degrees of freedom); only an interval that excludes 0
     counts as a difference. The smallest difference the grid can detect is (t_0.975 + t_0.80) x
     the standard deviation of those differences (pooled over the arms' pairings with uniform) /
     sqrt(seeds): a two-sided test at 5% with 80% power. The unpaired version (pooled seed-to-seed
     standard deviation x sqrt(2 / seeds), 2 (seeds - 1) degrees of freedom) is printed too. A
     cell's evaluation samples are the same for every run: the spread is the training's noise plus
     which borderline samples flip.
  3. choice: the small outputs of each finished run (config, metrics, eval, the first samples) are
     copied to --out/runs/ for committing; weights stay in the run folder.

Shapes: S seeds, A arms, K evaluation cells.
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import common

ARMS = {  # name -> train.py flags (on top of SETTING)
    "grpo-longact": ["--algo", "grpo", "--mask-strategy", "topk", "--mask-schedule", "step"],
    "grpo-longact-static": ["--algo", "grpo", "--mask-strategy", "topk",
                            "--mask-schedule", "static"],
    "grpo-random": ["--algo", "grpo", "--mask-strategy", "random", "--mask-schedule", "step"],
    "grpo-bottomk": ["--algo", "grpo", "--mask-strategy", "bottomk", "--mask-schedule", "step"],
    "grpo-uniform": ["--algo", "grpo", "--mask-strategy", "all"],
    "dapo-longact": ["--algo", "dapo", "--mask-strategy", "topk", "--mask-schedule", "step"],
    "dapo-uniform": ["--algo", "dapo", "--mask-strategy", "all"],
}
GRPO_ARMS = [a for a in ARMS if a.startswith("grpo")]  # `make ab`'s default arms
CONTROLS = {  # run on request (--arms), summarised with the rest
    # q/k nearly frozen: 1 row of 64 per head (the most salient): can the choice of rows matter?
    "grpo-longact-1row": ["--algo", "grpo", "--mask-strategy", "topk", "--mask-schedule", "step",
                          "--ratio", "0.015625"],
}
ARMS |= CONTROLS
# The setting, chosen with pilots so that the uniform arm still improves at the end and no cell
# sits at 0 or 100 (README, "A/B"; SOURCES.md §9): the multi-key task (a haystack of distractor
# needles) at 512 tokens, where a run takes minutes, not a quarter of an hour; 12 steps at lr 1e-5,
# because 16 steps took the trained task to 98% at both lengths. Evaluation on held-out seeds at
# the training length and 2x, on the trained task and an untrained one, 50 samples per cell.
SETTING = ["--train-task", "niah_multikey_2", "--train-len", "512", "--steps", "12",
           "--lr", "1e-5", "--warmup-steps", "2", "--prompts-per-step", "4", "--group-size", "8",
           "--eval-tasks", "niah_multikey_2", "niah_multikey_3", "--eval-lengths", "512", "1024",
           "--eval-samples", "50", "--save-every", "1"]
SMALL_FILES = ("config.json", "metrics.jsonl", "eval.json", "phases.json")


# -----------------------------------------------------------------------------
# running

def run_dir(grid: Path, arm: str, seed: int) -> Path:
    return grid / f"{arm}-seed{seed}"


def is_finished(folder: Path) -> bool:
    f = folder / "eval.json"
    return f.exists() and "after" in common.read_json(f)


def train_argv(grid: Path, arm: str, seed: int, extra: list) -> list:
    folder = run_dir(grid, arm, seed)
    argv = SETTING + ARMS[arm] + ["--seed", str(seed), "--out-dir", str(grid), "--run-name",
                                  folder.name, "--before-eval", str(grid / "before.json"), *extra]
    if (folder / "ckpt").exists() or (folder / "ckpt.old").exists():
        argv += ["--resume", str(folder)]
    return argv


def run_grid(grid: Path, arms: list, seeds: list, extra: list) -> None:
    """Every unfinished (arm, seed) in turn, seed-major so that each sitting adds whole seeds."""
    grid.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for arm in arms:
            folder = run_dir(grid, arm, seed)
            if is_finished(folder):
                print(f"{folder.name}: finished, skipped")
                continue
            argv = [sys.executable, "train.py", *train_argv(grid, arm, seed, extra)]
            print(f"{folder.name}: {' '.join(argv[1:])}", flush=True)
            subprocess.run(argv, check=True)


# -----------------------------------------------------------------------------
# summary (pure functions, then files)

def mean_se(xs: list) -> tuple:
    """(mean, standard error of the mean); se is nan for a single value."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)  # Bessel-corrected
    return m, math.sqrt(var / n)


# Student's t quantiles by degrees of freedom (two-sided 95% = 0.975, power 80% = 0.80), from any
# statistics table; a df between entries takes the next smaller df (the wider interval).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}
T_80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889,
        9: 0.883, 10: 0.879, 12: 0.873, 15: 0.866, 20: 0.860, 30: 0.854, 60: 0.848}


def t_quantile(table: dict, dof: int) -> float:
    if dof < 1:
        return float("nan")
    return table[max(k for k in table if k <= dof)]


def pooled_sd(groups: list) -> float:
    """Pooled within-arm standard deviation over arms with >= 2 seeds."""
    num = sum(sum((x - sum(g) / len(g)) ** 2 for x in g) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(num / dof) if dof else float("nan")


def collect(folder: Path) -> dict:
    """{arm: {seed: {"after", "before", "reward": [per step], "minutes": {phase: min}}}} of the
    finished runs in `folder`."""
    out = {}
    for run in sorted(p for p in folder.iterdir() if (p / "eval.json").exists()):
        arm, _, seed = run.name.rpartition("-seed")
        ev = common.read_json(run / "eval.json")
        if arm not in ARMS or "after" not in ev:
            continue
        rewards = [r["reward"] for r in common.read_jsonl(run / "metrics.jsonl")]
        phases = common.read_json(run / "phases.json") if (run / "phases.json").exists() else {}
        out.setdefault(arm, {})[int(seed)] = {"after": with_mean(ev["after"]),
                                              "before": with_mean(ev["before"]),
                                              "reward": rewards,
                                              "minutes": {k: v / 60 for k, v in phases.items()}}
    return out


ALL = "mean of cells"  # a run's mean over its task@length cells: 4x the samples of one cell


def with_mean(scores: dict) -> dict:
    cells = [k for k in scores if "@" in k and not k.startswith("ruler_avg")]
    return scores | {ALL: sum(scores[k] for k in cells) / len(cells)}


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
    """Smallest difference the paired comparison detects in `cell` (choice 2): the SD of the
    per-seed differences from `base`, pooled over every other arm of its algorithm."""
    algo = base.split("-")[0]
    diffs = [paired(runs, a, base, cell) for a in runs if a != base and a.startswith(algo + "-")]
    diffs = [d for d in diffs if len(d) > 1]
    if base not in runs or not diffs:
        return float("nan")
    seeds = max(len(d) for d in diffs)
    dof = seeds - 1
    return (t_quantile(T_975, dof) + t_quantile(T_80, dof)) * pooled_sd(diffs) / math.sqrt(seeds)


def difference(ds: list) -> tuple:
    """Mean of per-seed differences and the half-width of its paired 95% t interval."""
    d, se = mean_se(ds)
    return d, t_quantile(T_975, len(ds) - 1) * se


def summary_table(runs: dict) -> tuple:
    """Markdown table of mean +- se per arm and cell, and the smallest detectable difference."""
    cells = cells_of(runs)
    before = next(iter(next(iter(runs.values())).values()))["before"]
    lines = ["| arm | seeds | " + " | ".join(cells) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in cells) + " |",
             "| before (shared) | - | " + " | ".join(f"{before[c]:.1f}" for c in cells) + " |"]
    mde = {c: detectable_paired(runs, c) for c in cells}
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


def timing_table(runs: dict) -> str:
    """Wall minutes per run (mean over seeds) by phase, and the grid's total."""
    phases = ["statistics", "training", "eval after", "total"]
    lines = ["| arm | runs | " + " | ".join(phases) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in phases) + " |"]
    total = 0.0
    for arm in (a for a in ARMS if a in runs):
        mins = [r["minutes"] for r in runs[arm].values() if r["minutes"]]
        if not mins:
            continue
        total += sum(m.get("total", 0.0) for m in mins)
        lines.append(f"| {arm} | {len(mins)} | " + " | ".join(
            f"{sum(m.get(p, 0.0) for m in mins) / len(mins):.1f}" for p in phases) + " |")
    lines.append(f"| grid (sum of run totals) | - | " + " | ".join("" for _ in phases[:-1]) +
                 f" | {total:.1f} |")
    return "\n".join(lines)


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


def plot(runs: dict, out: Path) -> None:
    """Left: training reward per step, mean +- se over seeds per arm. Right: accuracy after
    training per arm and cell, mean +- se, with the shared 'before' as a black tick."""
    import matplotlib  # plots only: imported here so the runner works without it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = [arm for arm in ARMS if arm in runs]  # fixed order and colour per arm
    colour = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.8))
    for arm in arms:
        curves = [r["reward"] for r in runs[arm].values()]  # (S, steps)
        T = min(len(c) for c in curves)
        stats = [mean_se([c[t] for c in curves]) for t in range(T)]  # (T,) over seeds
        m = [s[0] for s in stats]
        se = [0 if math.isnan(s[1]) else s[1] for s in stats]
        a.plot(range(T), m, label=f"{arm} ({len(curves)} seeds)", color=colour[arm])
        a.fill_between(range(T), [x - e for x, e in zip(m, se)], [x + e for x, e in zip(m, se)],
                       alpha=0.15, color=colour[arm])
    a.set(xlabel="step", ylabel="training reward", title="training reward, mean ± s.e. over seeds")
    a.legend(fontsize=7)
    cells = cells_of(runs)
    before = next(iter(runs[arms[0]].values()))["before"]
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        stats = [mean_se(after_scores(runs, arm, c)) for c in cells]  # (K,) over seeds
        b.bar([j + i * width for j in range(len(cells))], [s[0] for s in stats], width,
              yerr=[0 if math.isnan(s[1]) else s[1] for s in stats], label=arm, capsize=2,
              color=colour[arm])
    b.hlines([before[c] for c in cells], [j - width / 2 for j in range(len(cells))],
             [j + 0.8 - width / 2 for j in range(len(cells))], colors="k", label="before")
    b.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))], cells, fontsize=8)
    b.set(ylabel="accuracy (%)", ylim=(0, 105),
          title="accuracy after training, mean ± s.e. over seeds (black: before)")
    b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with common.atomic_path(out / "ab.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def summarize(grid: Path, out: Path) -> None:
    """Copy each finished run's small files into out/runs (for committing), rebuild the table and
    figures from out/runs alone."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if grid.exists():
        for run in grid.iterdir():
            if run.is_dir() and is_finished(run):
                dst = out / "runs" / run.name
                dst.mkdir(exist_ok=True)
                for name in SMALL_FILES:
                    if (run / name).exists():
                        shutil.copy(run / name, dst / name)
                samples = (run / "samples.jsonl").read_text().splitlines()[:8]
                common.write_text_atomic(dst / "samples.jsonl", "".join(s + "\n" for s in samples))
    runs = collect(out / "runs")
    if not runs:
        raise SystemExit(f"no finished run in {out / 'runs'} or {grid}")
    table, _ = summary_table(runs)
    text = "\n\n".join([table, differences_table(runs), reward_trend(runs), timing_table(runs)])
    common.write_text_atomic(out / "ab_table.md", text + "\n")
    print(text)
    plot(runs, out)


def main(argv=None):
    p = argparse.ArgumentParser(description="LongAct A/B grid: arms x seeds, then a summary.")
    p.add_argument("command", choices=["run", "summary", "pilot"])
    p.add_argument("--grid", default="runs/ab", help="folder of the grid's runs (weights too)")
    p.add_argument("--out", default="figures/ab", help="summary table, figures, small run files")
    p.add_argument("--arms", nargs="+", default=GRPO_ARMS, choices=sorted(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more train.py flags for every run (e.g. --threads 2)")
    a = p.parse_args(argv)
    if a.command == "run":
        run_grid(Path(a.grid), a.arms, a.seeds, a.extra)
    elif a.command == "pilot":
        run_grid(Path(a.grid), ["grpo-uniform"], [0], a.extra)
    else:
        summarize(Path(a.grid), Path(a.out))


if __name__ == "__main__":
    main()
