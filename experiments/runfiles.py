"""
experiments/runfiles.py -- what a grid's finished runs recorded, read back from their folders:
the small files each run keeps (config, metrics, evaluation, phases, q/k change, per-item
records), which are committed under experiments/runs/<setting>/, so that every summary table and
figure (figures/<setting>/) rebuilds from a clean clone. The A/B summaries (experiments/ab.py)
read runs only through this file.

    collect(folder, arms)   {arm: {seed: outcome, reward curve, KL, items, minutes, ...}}
    copy_small_files(g, k)  each finished run's small files from the grid into experiments/runs/
    timing_table, provenance, resumed_runs
                            what each run cost, which commit, CPU and lock it came from, and
                            which runs were resumed with which flags (SOURCES.md §9.42, §9.54)

Shapes: S seeds, steps the RL steps of a run.
Test: .venv/bin/python -m pytest -q tests/test_ab.py tests/test_install.py
"""

import shutil
from pathlib import Path

from experiments import rates
from plumbing import common

SMALL_FILES = ("config.json", "metrics.jsonl", "eval.json", "phases.json", "qk_change.json")
ALL = rates.ALL  # a run's mean over its task@length cells: 4x the samples of one cell


def is_finished(folder: Path) -> bool:
    f = folder / "eval.json"
    return f.exists() and "after" in common.read_json(f)


def collect(folder: Path, arms) -> dict:
    """{arm: {seed: {"after", "before", "val" (validation, when run), "items" ({item id:
    (correctness, prompt hash)} after training; {} for runs made before item records),
    "before_items" (the same for the shared "before" evaluation),
    "reward": [per step], "kl_last" (mean KL of the last 4 steps), "len_last" and "trunc_last"
    (mean completion tokens and share cut at the token limit, last 4 steps; nan where not
    logged), "qk" (qk_change.json), "minutes": {phase: min}, "cpu" (config.json's, or "not
    recorded")}}} of the finished runs in `folder` whose arm is one of `arms`."""
    out = {}
    for run in sorted(p for p in folder.iterdir() if (p / "eval.json").exists()):
        arm, _, seed = run.name.rpartition("-seed")
        ev = common.read_json(run / "eval.json")
        if arm not in arms or "after" not in ev:
            continue
        metrics = common.read_jsonl(run / "metrics.jsonl")
        phases = common.read_json(run / "phases.json") if (run / "phases.json").exists() else {}
        qk = run / "qk_change.json"
        cfg = common.read_json(run / "config.json") if (run / "config.json").exists() else {}
        out.setdefault(arm, {})[int(seed)] = {
            "after": with_mean(ev["after"]), "before": with_mean(ev["before"]),
            "val": with_mean(ev["after_val"]) if "after_val" in ev else None,
            "items": read_items(run / "items" / "after.jsonl"),
            "before_items": read_items(run / "items" / "before.jsonl"),
            "reward": [r["reward"] for r in metrics],
            "kl_last": last_mean(metrics, "kl", missing=0.0),
            "len_last": last_mean(metrics, "len"),
            "trunc_last": last_mean(metrics, "frac_truncated"),
            "qk": common.read_json(qk) if qk.exists() else {},
            "minutes": {k: v / 60 for k, v in phases.items()},
            "cpu": cfg.get("cpu") or "not recorded"}
    return out


def last_mean(metrics: list, key: str, k: int = 4, missing: float = float("nan")) -> float:
    """Mean of `key` over the last k steps' rows (`missing` where a row lacks it)."""
    values = [r.get(key, missing) for r in metrics[-k:]]  # (k,) or fewer
    return sum(values) / len(values)


def read_items(path: Path) -> dict:
    """{item id: (correctness, prompt hash)} of one evaluation's items file ({} if none)."""
    if not path.exists():
        return {}
    return {r["id"]: (r["correct"], r["prompt_sha"]) for r in common.read_jsonl(path)}


def with_mean(scores: dict) -> dict:
    cells = [k for k in scores if "@" in k and not k.startswith("ruler_avg")]
    return scores | {ALL: sum(scores[k] for k in cells) / len(cells)}


def copy_small_files(grid: Path, kept: Path) -> None:
    """Each finished run's small files (and its first samples) into kept/<run>, and the shared
    "before" into kept/before.json, for committing (kept: experiments/runs/<setting>)."""
    kept.mkdir(parents=True, exist_ok=True)
    if (grid / "before.json").exists():  # the shared "before", for the next sitting
        shutil.copy(grid / "before.json", kept / "before.json")
    for run in (grid.iterdir() if grid.exists() else []):
        if run.is_dir() and is_finished(run):
            dst = kept / run.name
            dst.mkdir(exist_ok=True)
            for name in SMALL_FILES:
                if (run / name).exists():
                    shutil.copy(run / name, dst / name)
            if (run / "items").exists():  # per-item records: a few hundred KB per run
                shutil.copytree(run / "items", dst / "items", dirs_exist_ok=True)
            samples = (run / "samples.jsonl").read_text().splitlines()[:8]
            common.write_text_atomic(dst / "samples.jsonl", "".join(s + "\n" for s in samples))


def timing_table(runs: dict, arms) -> str:
    """Wall minutes per run (mean over seeds) by phase and the CPU that ran them (a row per arm
    and CPU kind: minutes from two CPUs are not one sample), and the grid's total; arms in the
    order of `arms`."""
    phases = ["statistics", "training", "eval after", "eval validation", "total"]
    if not any("eval validation" in r["minutes"] for arm in runs.values() for r in arm.values()):
        phases.remove("eval validation")  # grids made before validation sets
    lines = ["| arm | CPU | runs | " + " | ".join(phases) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in phases) + " |"]
    total = 0.0
    for arm in (a for a in arms if a in runs):
        for cpu in sorted({r["cpu"] for r in runs[arm].values()}):
            mins = [r["minutes"] for r in runs[arm].values() if r["minutes"] and r["cpu"] == cpu]
            if not mins:
                continue
            total += sum(m.get("total", 0.0) for m in mins)
            lines.append(f"| {arm} | {cpu} | {len(mins)} | " + " | ".join(
                f"{sum(m.get(p, 0.0) for m in mins) / len(mins):.1f}" for p in phases) + " |")
    lines.append("| grid (sum of run totals) | - | - | " + " | ".join("" for _ in phases[:-1]) +
                 f" | {total:.1f} |")
    return "\n".join(lines)


def versions_label(v: dict | None) -> str:
    """The versions a run recorded (common.versions), short; runs made before: "not recorded"."""
    if not v:
        return "not recorded"
    names = ("python", "torch", "transformers", "datasets")
    return ", ".join(f"{k} {v.get(k, '?')}" for k in names) + f", lock {v.get('lock', '?')}"


def provenance(folder: Path) -> str:
    """Which commits, CPUs and package versions the finished runs in `folder` came from (their
    config.json): a grid's runs should share one commit and one environment (SOURCES.md §9.42)."""
    seen = {}
    for run in sorted(p for p in folder.iterdir() if is_finished(p)):
        cfg = common.read_json(run / "config.json") if (run / "config.json").exists() else {}
        key = (cfg.get("code_version") or "not recorded", cfg.get("cpu") or "not recorded",
               versions_label(cfg.get("versions")))
        seen[key] = seen.get(key, 0) + 1
    lines = ["| commit | CPU | versions | runs |", "| --- | --- | --- | ---: |"]
    lines += [f"| {c} | {cpu} | {v} | {n} |" for (c, cpu, v), n in sorted(seen.items())]
    return "\n".join(lines)


KL_STOP = 1000.0  # --kl-stop's default while the grids ran: a token's KL (SOURCES.md §9.56)


def resumed_runs(folder: Path) -> str:
    """The finished runs that were resumed: at which steps, and which flags a resume changed
    (config.json "resumes"; code before it kept only the last step, so for those runs a
    --kl-stop other than the default is named, the one flag our grids change on a resume)."""
    lines = []
    for run in sorted(p for p in folder.iterdir() if is_finished(p)):
        cfg = common.read_json(run / "config.json") if (run / "config.json").exists() else {}
        if "resumed_at" not in cfg:
            continue
        parts = [f"at step {r['at']}" + "".join(f", {k} {old} -> {new}" for k, (old, new) in
                                                  r["changed"].items())
                 for r in cfg.get("resumes", [])]
        if not parts:
            kl = cfg.get("kl_stop", KL_STOP)
            parts = [f"last at step {cfg['resumed_at']}" + (
                f", with kl_stop {kl} (default {KL_STOP})" if kl != KL_STOP else "")]
        lines.append(f"- {run.name}: resumed " + "; ".join(parts))
    return "Resumed runs:\n" + "\n".join(lines) if lines else ""
