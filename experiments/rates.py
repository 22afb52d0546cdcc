"""
experiments/rates.py -- setting 2b: each arm at its own best learning rate, so that "which rows"
is read apart from "how big a step" (experiments/ab2b_preregistration.md, SOURCES.md §9.46).

In setting 2 the arms ranked almost exactly by how far the policy moved. A random row redrawn
every step trains in about 30% of the steps; a fixed random subset trains every step but may still
move the attention logits less than LongAct's rows at one learning rate. So each arm (LongAct, a
fixed random 30%, all q/k rows) runs at x1, x2 and x4 of setting 2's rate; its best rate is chosen
on validation items that no reported cell uses; the comparisons are read at the best rates.

    best_rates(runs)       {arm: factor}: the highest validation mean of cells over seeds
    arms_to_add(runs)      the next factor for an arm whose best rate is at an end of its range
    pending(runs, ...)     what the rules still run before a reading (none: read)
    reading(runs, ...)     the pre-registered comparisons at the best rates (t and crossed)
    same_rate(runs, pairs) descriptive: each pair of arms at every rate both ran
    plot_rates(runs, ...)  rates.png: validation (choice) and reported outcome per factor
    step_size(runs)        every run's outcome beside its KL and q/k change, and how much of the
                           outcome the step size explains, with and without the arm

Shapes: S seeds, I evaluation items, R runs.
Test: .venv/bin/python -m pytest -q tests/test_rates.py
"""

import math

from experiments.stats import crossed_bootstrap, difference, mean_se, paired_detectable

ARMS = ("grpo-longact", "grpo-random-static", "grpo-uniform")  # read at their own best rates
FACTORS = ("0.25", "0.5", "1", "2", "4", "8", "16")  # the ends a widening may reach
FIRST = ("1", "2", "4")  # the pre-registered range, x setting 2's learning rate
SEEDS = (0, 1, 2)  # the seeds that choose a rate; seeds 3 and 4 (rule 3) never re-choose it
ALL = "mean of cells"


def rate_arm(arm: str, factor: str) -> str:
    return f"{arm}-lrx{factor}"


def split(name: str) -> tuple:
    """"grpo-uniform-lrx2" -> ("grpo-uniform", "2")."""
    arm, _, factor = name.rpartition("-lrx")
    return arm, factor


def factors_started(runs: dict, arm: str) -> list:
    """The factors of `arm` with at least one finished run, smallest first."""
    return sorted({split(n)[1] for n in runs if split(n)[0] == arm}, key=float)


def factors_run(runs: dict, arm: str) -> list:
    """The factors of `arm` whose seeds 0-2 have all finished, smallest first."""
    done = [f for f in FACTORS if set(SEEDS) <= set(runs.get(rate_arm(arm, f), {}))]
    return sorted(done, key=float)


def best_rates(runs: dict) -> dict:
    """{arm: factor} with the highest validation mean of cells (mean over seeds 0-2); a tie goes
    to the smaller factor. Only the validation items are looked at, never the reported cells."""
    best = {}
    for arm in ARMS:
        scores = {f: mean_se([runs[rate_arm(arm, f)][s]["val"][ALL] for s in SEEDS])[0]
                  for f in factors_run(runs, arm)}
        if scores:
            best[arm] = max(scores, key=lambda f: (scores[f], -float(f)))
    return best


def arms_to_add(runs: dict) -> list:
    """Rule 2: a best rate at an end of the factors run adds the next factor beyond it (x2 or
    /2), until the best is inside the range or the range reaches FACTORS' ends."""
    out = []
    for arm, f in best_rates(runs).items():
        done = factors_run(runs, arm)
        i = FACTORS.index(f)
        if f == done[-1] and i + 1 < len(FACTORS):
            out.append(rate_arm(arm, FACTORS[i + 1]))
        elif f == done[0] and i > 0:
            out.append(rate_arm(arm, FACTORS[i - 1]))
    return out


def in_cells(items: dict, cells: list | None) -> list:
    """The sorted item ids of the given cells ("task@length"); every item when cells is None."""
    return sorted(i for i in items if cells is None or i.split("/", 1)[0] in cells)


def items_matrix(runs: dict, a: str, b: str, seeds: list, cells: list | None = None) -> list:
    """(S, I) per-seed, per-item differences a - b of correctness x 100 (so that the mean is on
    the scale of the mean of cells), over the items of `cells` (default: all). The items must be
    the same prompts in every run."""
    ids = in_cells(runs[a][seeds[0]]["items"], cells)
    rows = []
    for s in seeds:
        ra, rb = runs[a][s]["items"], runs[b][s]["items"]
        if in_cells(ra, cells) != ids or in_cells(rb, cells) != ids:
            raise ValueError(f"{a} / {b} seed {s}: not the same evaluation items")
        bad = [i for i in ids if ra[i][1] != rb[i][1]]
        if bad:
            raise ValueError(f"{a} / {b} seed {s}: item {bad[0]} has another prompt")
        rows.append([100 * (ra[i][0] - rb[i][0]) for i in ids])  # (I,)
    return rows


def outcome(scores: dict, cells: list | None) -> float:
    """A run's outcome: the reported mean of cells, or its mean over `cells` (equal item counts)."""
    return scores[ALL] if cells is None else sum(scores[c] for c in cells) / len(cells)


def compare(runs: dict, a: str, b: str, cells: list | None = None) -> dict:
    """a - b on the reported mean of cells (or the mean over `cells`): the per-seed t interval
    and the crossed bootstrap over the same items."""
    seeds = sorted(set(runs[a]) & set(runs[b]))
    ds = [outcome(runs[a][s]["after"], cells) - outcome(runs[b][s]["after"], cells)
          for s in seeds]  # (S,)
    d, half = difference(ds)
    out = {"seeds": len(seeds), "d": d, "t": (d - half, d + half),
           "detectable": paired_detectable(ds)}
    if all(runs[x][s].get("items") for x in (a, b) for s in seeds):
        out["crossed"] = crossed_bootstrap(items_matrix(runs, a, b, seeds, cells))[1:]
    return out


def first_seeds(runs: dict) -> dict:
    """The runs of seeds 0-2 only: the seed rule is decided on these, so a grid that stopped
    after some of seeds 3 and 4 had finished decides the same way when it is started again."""
    return {arm: {s: r for s, r in per_seed.items() if s in SEEDS}
            for arm, per_seed in runs.items()}


def needs_more_seeds(c: dict) -> bool:
    """The seed rule of settings 2b and 3: a primary comparison over 3 seeds whose smallest
    detectable difference exceeds 4 points gets seeds 3 and 4."""
    return c["seeds"] == 3 and c["detectable"] > 4


def verdict(c: dict, a: str, b: str, better: str = "is better") -> str:
    """Rule 4: a direction is claimed only where both intervals exclude 0 on the same side."""
    lows = [c["t"][0]] + ([c["crossed"][0]] if "crossed" in c else [])
    highs = [c["t"][1]] + ([c["crossed"][1]] if "crossed" in c else [])
    if min(lows) > 0:
        return f"{a} {better}"
    if max(highs) < 0:
        return f"{b} {better}"
    return "no difference detected"


def unfinished(runs: dict, arm: str) -> list:
    """"grpo-longact-lrx2 seeds 2": the arm's pre-registered or started rates that lack some
    of seeds 0-2 (an arm's best rate is chosen only once it has none)."""
    out = []
    for f in sorted(set(FIRST) | set(factors_started(runs, arm)), key=float):
        missing = [s for s in SEEDS if s not in runs.get(rate_arm(arm, f), {})]
        if missing:
            out.append(f"{rate_arm(arm, f)} seeds {' '.join(map(str, missing))}")
    return out


def pending(runs: dict, primary: tuple) -> list:
    """What the rules still have to run before any comparison may be read: the pre-registered
    rates' (and any started rate's) seeds 0-2, rule 2's next factors, then rule 3's seeds 3
    and 4. A reading of a grid half run would choose rates on some seeds and compare others."""
    left = {arm: unfinished(runs, arm) for arm in ARMS}
    out = [name for arm in ARMS for name in left[arm]]
    out += [f"{name} seeds 0 1 2 (rule 2)" for name in arms_to_add(runs)
            if not left[split(name)[0]]]  # an arm with a rate under way has no best yet
    best = best_rates(runs)
    if out or any(a not in best for a in primary):
        return out
    chosen = [rate_arm(a, best[a]) for a in ARMS]
    c = compare(first_seeds(runs), *(rate_arm(a, best[a]) for a in primary))
    if needs_more_seeds(c):
        missing = {n: [str(s) for s in (3, 4) if s not in runs[n]] for n in chosen}
        out = [f"{n} seeds {' '.join(m)} (rule 3)" for n, m in missing.items() if m]
    return out


def reading(runs: dict, primary: tuple, secondary: tuple, prereg: str) -> str:
    """The pre-registered reading: best rates, then the primary and secondary comparisons, once
    the rules have nothing left to run (`pending`); before that, what is left."""
    best = best_rates(runs)
    lines = [f"Pre-registered in {prereg}: each arm at its best rate on the validation items "
             "(seeds 0-2); mean of the reported cells, paired by seed (95% t) and by seed and "
             "item (crossed bootstrap)."]
    left = pending(runs, primary)
    if not any(unfinished(runs, a) for a in ARMS):  # a best rate chosen on every seed 0-2
        lines.append(("- best rates so far: " if left else "- best rates: ")
                     + ", ".join(f"{a} x{f}" for a, f in best.items()))
    if left:
        lines.append("- not read yet: the rules still run " + ", ".join(left))
        return "\n".join(lines)
    for role, (a, b) in (("primary", primary), ("secondary", secondary)):
        if a not in best or b not in best:
            lines.append(f"- {role}, {a} - {b}: an arm has no finished rate yet")
            continue
        ra, rb = rate_arm(a, best[a]), rate_arm(b, best[b])
        c = compare(runs, ra, rb)
        if c["seeds"] < 2:
            lines.append(f"- {role}, {ra} - {rb}: fewer than 2 paired seeds")
            continue
        crossed = (f", crossed [{c['crossed'][0]:+.1f}, {c['crossed'][1]:+.1f}]"
                   if "crossed" in c else ", no item records")
        more = (" > 4 with 3 seeds: rule 3 adds seeds 3 and 4" if role == "primary"
                and needs_more_seeds(c) else "")
        lines.append(f"- {role}, {ra} - {rb}: {c['d']:+.1f}, t [{c['t'][0]:+.1f}, "
                     f"{c['t'][1]:+.1f}]{crossed} over {c['seeds']} seeds: {verdict(c, a, b)}"
                     f"; smallest detectable {c['detectable']:.1f}{more}")
    return "\n".join(lines)


def rates_table(runs: dict) -> str:
    """Per arm and factor: validation and reported mean of cells (mean +- se over seeds), the
    last steps' KL and the relative q/k change; the best rate marked once every rate of the
    arm has seeds 0-2."""
    best = best_rates(runs)
    lines = ["| arm | rate | seeds | validation | reported | KL, last 4 steps | q/k change |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fmt = lambda xs, p: "n/a" if not xs else "{:.{p}f} ± {:.{p}f}".format(  # noqa: E731
        *(x if not math.isnan(x) else 0.0 for x in mean_se(xs)), p=p)
    for arm in ARMS:
        for f in factors_started(runs, arm):
            r = runs[rate_arm(arm, f)].values()
            val = [x["val"][ALL] for x in r if x.get("val")]
            moved = [x["qk"]["qk_rel_change"] for x in r if x.get("qk")]
            mark = " (best)" if best.get(arm) == f and not unfinished(runs, arm) else ""
            lines.append(f"| {arm} | x{f}{mark} | {len(r)} | "
                         f"{fmt(val, 1)} | {fmt([x['after'][ALL] for x in r], 1)} | "
                         f"{fmt([x['kl_last'] for x in r], 4)} | {fmt(moved, 4)} |")
    return "\n".join(lines)


def common_slope_sse(points: list) -> float:
    """Residual sum of squares of y ~ one slope in x and an intercept per arm (least squares);
    points: (arm, x, y). With one arm name for all points it is the plain line."""
    by_arm = {}
    for a, x, y in points:
        by_arm.setdefault(a, []).append((x, y))
    means = {a: (sum(x for x, _ in v) / len(v), sum(y for _, y in v) / len(v))
             for a, v in by_arm.items()}
    sxy = sum((x - means[a][0]) * (y - means[a][1]) for a, x, y in points)
    sxx = sum((x - means[a][0]) ** 2 for a, x, _ in points)
    b = sxy / sxx if sxx else 0.0
    return sum((y - means[a][1] - b * (x - means[a][0])) ** 2 for a, x, y in points)


def r_squared(points: list) -> dict:
    """points: (arm, x, y). The share of the variance of y explained by x alone (one line), by
    the arm alone (its mean), and by both (one slope, an intercept per arm): what the arm adds
    to the step size is the gap between the first and the last. Descriptive only."""
    ys = [y for _, _, y in points]
    sst = sum((y - sum(ys) / len(ys)) ** 2 for y in ys)
    if sst == 0 or len(points) < 3:
        return {}
    alone = common_slope_sse([("all", x, y) for _, x, y in points])
    arm_only = common_slope_sse([(a, 0.0, y) for a, _, y in points])
    both = common_slope_sse(points)
    return {"step size": 1 - alone / sst, "arm": 1 - arm_only / sst,
            "step size and arm": 1 - both / sst}


def same_rate(runs: dict, pairs: list) -> str:
    """Descriptive, not pre-registered: each pair of arms at every learning rate both ran, a - b
    paired by seed (t) and by seed and item (crossed). It separates the two readings of setting
    2's gap that the best-rate comparison merges: at x1 (setting 2's rate) a fixed random subset
    replaces the redrawn one (stability); across rates the gap may close (step size)."""
    lines = ["Descriptive, not pre-registered (many comparisons, none corrected): each pair at one "
             "learning rate, paired by seed (95% t) and by seed and item (crossed bootstrap).",
             "", "| a - b | rate | seeds | difference | t | crossed |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for a, b in pairs:
        for f in FACTORS:
            ra, rb = rate_arm(a, f), rate_arm(b, f)
            if ra not in runs or rb not in runs or len(set(runs[ra]) & set(runs[rb])) < 2:
                continue
            c = compare(runs, ra, rb)
            crossed = ("n/a" if "crossed" not in c
                       else f"[{c['crossed'][0]:+.1f}, {c['crossed'][1]:+.1f}]")
            lines.append(f"| {a} - {b} | x{f} | {c['seeds']} | {c['d']:+.1f} | "
                         f"[{c['t'][0]:+.1f}, {c['t'][1]:+.1f}] | {crossed} |")
    return "\n".join(lines) if len(lines) > 4 else ""


def step_size(runs: dict) -> str:
    """Every run of the rate arms: outcome (reported mean of cells), the last steps' KL and the
    relative q/k change; then R^2 of the outcome on log KL and on log q/k change, with and
    without the arm (SOURCES.md §9.46)."""
    rows, by = [], {"log KL": [], "log q/k change": []}
    for name in sorted(runs):
        arm, f = split(name)
        if arm not in ARMS:
            continue
        for seed, r in sorted(runs[name].items()):
            qk = r.get("qk", {}).get("qk_rel_change")
            rows.append(f"| {arm} | x{f} | {seed} | {r['after'][ALL]:.1f} | {r['kl_last']:.4f} | "
                        + ("n/a" if qk is None else f"{qk:.4f}") + " |")
            if r["kl_last"] > 0:
                by["log KL"].append((arm, math.log(r["kl_last"]), r["after"][ALL]))
            if qk:
                by["log q/k change"].append((arm, math.log(qk), r["after"][ALL]))
    head = ["| arm | rate | seed | reported | KL, last 4 steps | q/k change |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    fits = ["| outcome explained by (R^2) | step size | arm | step size and arm |",
            "| --- | ---: | ---: | ---: |"]
    for x, points in by.items():
        r2 = r_squared(points)
        if r2:
            fits.append(f"| {x} ({len(points)} runs) | " + " | ".join(
                f"{r2[k]:.2f}" for k in ("step size", "arm", "step size and arm")) + " |")
    return "\n".join(head + rows) + ("\n\n" + "\n".join(fits) if len(fits) > 2 else "")


def plot_step_size(runs: dict, out, colour: dict) -> None:
    """Outcome against log KL (left) and log q/k change (right), one colour per arm (`colour`:
    the A/B figures' colours), a marker size per rate: if the arms lie on one curve, "which
    rows" adds nothing to "how big a step"."""
    import matplotlib  # plots only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from plumbing import common
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in ARMS:
        pts = [(r["kl_last"], r.get("qk", {}).get("qk_rel_change"), r["after"][ALL], f)
               for name in runs if split(name)[0] == arm
               for f in [split(name)[1]] for r in runs[name].values()]
        for ax, k in zip(axes, (0, 1)):
            xs = [(p[k], p[2], p[3]) for p in pts if p[k]]
            ax.scatter([x for x, _, _ in xs], [y for _, y, _ in xs], color=colour[arm],
                       label=arm, s=[18 * float(f) ** 0.5 + 10 for _, _, f in xs], alpha=0.8)
    for ax, what in zip(axes, ("KL to the reference, last 4 steps", "relative q/k change")):
        ax.set(xscale="log", xlabel=what + " (log)", ylabel="reported mean of cells (%)",
               title=f"outcome against {what}")
        # ticks at 1, 2, 5 of each decade, written plainly (matplotlib's log labels overlapped)
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.legend(fontsize=8, title="marker size: learning rate", title_fontsize=7)
    fig.tight_layout()
    with common.atomic_path(out / "step_size.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def plot_rates(runs: dict, out, colour: dict) -> None:
    """Each arm's mean of cells against its learning-rate factor: the validation items that
    choose the rate (left, seeds 0-2 only, the best rate ringed) and the reported cells read
    at it (right). A dot per seed, a line through the means over seeds."""
    import matplotlib  # plots only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plumbing import common
    best = best_rates(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, seeds in zip(axes, ("val", "after"), (SEEDS, None)):
        for arm in ARMS:
            factors = factors_started(runs, arm)
            means = []
            for f in factors:
                ys = [r[key][ALL] for s, r in runs[rate_arm(arm, f)].items()
                      if r.get(key) and (seeds is None or s in seeds)]  # (S,)
                ax.scatter([float(f)] * len(ys), ys, color=colour[arm], s=10, alpha=0.4)
                means.append(mean_se(ys)[0] if ys else math.nan)
            ax.plot([float(f) for f in factors], means, color=colour[arm], marker="o",
                    label=arm)
            if arm in best and key == "val" and not unfinished(runs, arm):  # as rates_table
                ax.scatter([float(best[arm])], [means[factors.index(best[arm])]], s=160,
                           facecolors="none", edgecolors=colour[arm], linewidths=1.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks([float(f) for f in FACTORS], [f"x{f}" for f in FACTORS])
        ax.set_xlim(0.2, 20)
    axes[0].set(xlabel="learning rate, x setting 2's", ylabel="mean of cells (%)",
                title="validation items, seeds 0-2: choose the rate (ringed)")
    axes[1].set(xlabel="learning rate, x setting 2's",
                title="reported cells, every seed: read at the chosen rate")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with common.atomic_path(out / "rates.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
