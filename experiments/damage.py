"""
experiments/damage.py -- setting 3's positive control: did an update damage something a cell can
measure? (experiments/ab3_pilots.md, SOURCES.md §9.52)

The paper's story (arXiv 2604.14922, §1 and §3) is that updating every q/k row harms long-context
ability that a sparse, salient update protects. That story can only be tested where the uniform
update visibly damages something. Setting 1 trained every weight and damaged nothing it measured,
but it measured only the trained task family. Setting 3 measures what the training never touched:
other RULER families at 4x the training length. A run's damage in a cell is after - before, with
the shared "before" of the untrained model; it is read two ways, as in setting 2b:

    per seed:         d_s = after_s - before        a 95% t interval over the seeds
    per seed and item d_si = after_si - before_i    the crossed bootstrap (seeds and items redrawn)

and a cell is damaged only where both intervals lie below 0.

    damage(runs, arm, cell)      {"seeds", "d", "t", "crossed"}
    damaged(runs)                [(arm, cell)] that the rule calls damaged
    damage_table(runs)           markdown: one row per arm, one column per cell
    seeds_to_read(...)           3, or 5 once the seed rule adds seeds
    protection_reading(...)      setting 3 proper's reading: the control again, then LongAct -
                                 uniform on the mean over the damaged cells (rates.compare)
    step_table(runs, cells)      per run: damage on those cells, KL, q/k change, completion
                                 length and share cut at the limit (descriptive)
    values_table(folder)         multi-value answers: how many values they name (descriptive)

Shapes: S seeds, I evaluation items (of one cell, or of every cell for the mean of cells).
Test: .venv/bin/python -m pytest -q tests/test_damage.py
"""

import json
import math
import re
from pathlib import Path

from experiments import rates
from experiments.stats import crossed_bootstrap, difference

ALL = rates.ALL


def cell_items(items: dict, cell: str) -> list:
    """The item ids of one cell ("task@length"; every item for the mean of cells), sorted."""
    return rates.in_cells(items, None if cell == ALL else [cell])


def items_damage(run: dict, cell: str) -> list:
    """(I,) after - before per item of one run, x100 (the scale of a cell's score). The before
    items are the shared evaluation's: the same prompts, checked by their hashes."""
    after, before = run["items"], run["before_items"]
    ids = cell_items(after, cell)
    if ids != cell_items(before, cell):
        raise ValueError(f"{cell}: the run's items are not the 'before' evaluation's")
    bad = [i for i in ids if after[i][1] != before[i][1]]
    if bad:
        raise ValueError(f"{cell}: item {bad[0]} has another prompt than in 'before'")
    return [100 * (after[i][0] - before[i][0]) for i in ids]  # (I,)


def damage(runs: dict, arm: str, cell: str) -> dict:
    """after - before of `arm` in `cell`: the mean, the per-seed t interval and (when every run
    has item records) the crossed seed-and-item bootstrap interval."""
    per_seed = runs[arm]
    seeds = sorted(per_seed)
    ds = [per_seed[s]["after"][cell] - per_seed[s]["before"][cell] for s in seeds]  # (S,)
    d, half = difference(ds)
    out = {"seeds": len(seeds), "d": d, "t": (d - half, d + half)}
    if all(per_seed[s]["items"] and per_seed[s]["before_items"] for s in seeds):
        matrix = [items_damage(per_seed[s], cell) for s in seeds]  # (S, I)
        out["crossed"] = crossed_bootstrap(matrix)[1:]
    return out


def is_damaged(c: dict) -> bool:
    """The rule: 3 seeds or more, and every interval below 0 (the t one and the crossed one)."""
    highs = [c["t"][1]] + ([c["crossed"][1]] if "crossed" in c else [])
    return c["seeds"] >= 3 and not math.isnan(c["t"][1]) and max(highs) < 0


def cells(runs: dict) -> list:
    """The reported cells of the runs ("task@length", averages left out), then the mean."""
    found = {k for arm in runs.values() for r in arm.values() for k in r["after"]
             if "@" in k and not k.startswith("ruler_avg")}
    return sorted(found) + [ALL]


def damaged(runs: dict) -> list:
    """[(arm, cell)] that the rule calls damaged."""
    return [(arm, c) for arm in runs for c in cells(runs) if is_damaged(damage(runs, arm, c))]


def damage_table(runs: dict) -> str:
    """after - before per arm and cell: mean, t interval, crossed interval; '*' where damaged."""
    cs = cells(runs)
    lines = ["| arm | seeds | " + " | ".join(cs) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in cs) + " |"]
    for arm in runs:
        parts = []
        for c in cs:
            r = damage(runs, arm, c)
            text = f"{r['d']:+.1f}"
            if not math.isnan(r["t"][1]):
                text += f" t [{r['t'][0]:+.1f}, {r['t'][1]:+.1f}]"
            if "crossed" in r:
                text += f" x [{r['crossed'][0]:+.1f}, {r['crossed'][1]:+.1f}]"
            parts.append(text + ("*" if is_damaged(r) else ""))
        lines.append(f"| {arm} | {len(runs[arm])} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def reading(runs: dict, plan: str) -> str:
    """The pilots' answer in words, by the rule stated in `plan` before they ran."""
    hits = damaged(runs)
    head = (f"Damage rule ({plan}): after - before below 0 in both the per-seed t interval and "
            "the crossed seed-and-item interval, 3 seeds.")
    if hits:
        where = ", ".join(f"{arm} in {cell}" for arm, cell in hits)
        return f"{head}\n- damaged: {where}. The positive control separates there."
    done = all(len(per_seed) >= 3 for per_seed in runs.values())
    return (f"{head}\n- nothing damaged" + ("" if done else " yet (some arms have fewer than 3 "
                                                            "seeds)") + ".")


# -----------------------------------------------------------------------------
# setting 3 proper: does LongAct damage less than the uniform update, on the damaged cells?

def seeds_to_read(runs: dict, primary: tuple, cells: list) -> int:
    """Rule 5: rules 2-4 are read over 3 seeds, or over 5 once the primary's smallest detectable
    difference over 3 seeds exceeds 4 (then seeds 3 and 4 run for every arm)."""
    if any(s >= 3 for per_seed in runs.values() for s in per_seed):
        return 5
    if all(a in runs for a in primary) and rates.needs_more_seeds(
            rates.compare(runs, *primary, cells)):
        return 5
    return 3


def protection_reading(runs: dict, primary: tuple, secondary: tuple, cells: list,
                       plan: str) -> str:
    """Setting 3's pre-registered reading: the control replicates (the uniform update damages the
    cells again), then the primary and secondary comparisons on the mean over those cells."""
    lines = [f"Pre-registered in {plan}: outcome = mean of {', '.join(cells)}; paired by seed "
             "(95% t) and by seed and item (crossed bootstrap)."]
    enough, base = seeds_to_read(runs, primary, cells), primary[1]
    if base in runs:
        per_cell = {c: damage(runs, base, c) for c in cells}
        hit = [c for c, r in per_cell.items() if is_damaged(r)]
        seeds = min(r["seeds"] for r in per_cell.values())
        lines.append(f"- control, {base} after - before: " + "; ".join(
            f"{c} {r['d']:+.1f}" for c, r in per_cell.items())
            + (f"; not read with {seeds} seed(s) (the rule reads {enough})" if seeds < enough
               else f"; damaged again: {', '.join(hit)}" if hit else
               "; not damaged again, so the comparisons below are not evidence on the claim"))
    for role, (a, b) in (("primary", primary), ("secondary", secondary)):
        if a not in runs or b not in runs:
            lines.append(f"- {role}, {a} - {b}: an arm has not run yet")
            continue
        c = rates.compare(runs, a, b, cells)
        if c["seeds"] < 2:
            lines.append(f"- {role}, {a} - {b}: fewer than 2 paired seeds")
            continue
        crossed = (f", crossed [{c['crossed'][0]:+.1f}, {c['crossed'][1]:+.1f}]"
                   if "crossed" in c else "")
        more = (" > 4 with 3 seeds: the rule adds seeds 3 and 4" if role == "primary"
                and rates.needs_more_seeds(c) else "")
        said = (rates.verdict(c, a, b, better="damages less") if c["seeds"] >= enough else
                f"not read with {c['seeds']} seeds (the rule reads {enough})")
        lines.append(f"- {role}, {a} - {b}: {c['d']:+.1f}, t [{c['t'][0]:+.1f}, "
                     f"{c['t'][1]:+.1f}]{crossed} over {c['seeds']} seeds: {said}; "
                     f"smallest detectable {c['detectable']:.1f}{more}")
    fresh = {arm: {s: r for s, r in per_seed.items() if s >= 3} for arm, per_seed in runs.items()}
    if all(len(fresh.get(arm, {})) >= 2 for arm in primary):  # seeds that did not pick the cell
        c = rates.compare(fresh, *primary, cells)
        lines.append(f"- descriptive, the primary on seeds 3+ only (the pilots picked the cell "
                     f"on seeds 0-2): {c['d']:+.1f}, t [{c['t'][0]:+.1f}, {c['t'][1]:+.1f}] "
                     f"over {c['seeds']} seeds")
    return "\n".join(lines)


def step_table(runs: dict, cells: list) -> str:
    """Per run: after - before on the outcome (the mean over `cells`), the mean KL to the
    reference over the last 4 steps and the relative q/k change (how far each run moved), and
    the training completions' length and share cut at the token limit over the last 4 steps
    (what it learned to write). Descriptive."""
    lines = ["| run | after - before, " + ", ".join(cells) + " | KL, last 4 steps | q/k change "
             "| completion tokens, last 4 steps | cut at the limit, last 4 steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    fmt = lambda v, f: "n/a" if v is None or math.isnan(v) else format(v, f)  # noqa: E731
    for arm in runs:
        for seed, r in sorted(runs[arm].items()):
            d = rates.outcome(r["after"], cells) - rates.outcome(r["before"], cells)
            lines.append(f"| {arm}-seed{seed} | {d:+.1f} | {r['kl_last']:.4f} | "
                         f"{fmt(r.get('qk', {}).get('qk_rel_change'), '.4f')} | "
                         f"{fmt(r.get('len_last'), '.1f')} | {fmt(r.get('trunc_last'), '.2f')} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# descriptive: what a damaged multi-value answer looks like

MULTIVALUE = "niah_multivalue@"


def values_named(row: dict) -> int:
    """How many distinct numbers with the references' digit count one answer names (an item
    row of items/<name>.jsonl: RULER's multi-value references are numbers of one length)."""
    if not row["references"]:
        return 0
    digits = len(row["references"][0])
    return len(set(re.findall(rf"(?<!\d)\d{{{digits}}}(?!\d)", row["answer"])))


def values_table(folder: Path) -> str:
    """Per run: the multi-value answers (before and after training) that name exactly one value,
    and the mean number named, where four are asked. Read from the committed item files."""
    lines = ["| run | evaluation | answers naming one value | values named, mean |",
             "| --- | --- | ---: | ---: |"]
    for run in sorted(p for p in folder.iterdir() if (p / "items" / "after.jsonl").exists()):
        for name in ("before", "after"):
            if name == "before" and lines[2:]:
                continue  # the shared "before": once, from the first run
            path = run / "items" / f"{name}.jsonl"
            rows = [json.loads(x) for x in path.read_text().splitlines()]
            counts = [values_named(r) for r in rows if r["id"].startswith(MULTIVALUE)]  # (I,)
            if counts:
                label = "(shared)" if name == "before" else run.name
                lines.append(f"| {label} | {name} | {sum(c == 1 for c in counts)} of "
                             f"{len(counts)} | {sum(counts) / len(counts):.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""
