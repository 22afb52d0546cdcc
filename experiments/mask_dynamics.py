"""
experiments/mask_dynamics.py -- how much LongAct's per-step masks change during a run.

train.py logs, per step, the Jaccard overlap of the step's q/k row masks with the previous step's
(`mask_jaccard_prev`), with step 0's (`mask_jaccard_step0`), and of step 0's with the static
calibration mask (`mask_jaccard_step0_static`), each averaged over the q/k matrices. This script
plots them from one or more runs' metrics.jsonl and prints a table. For reference: two random masks
of 30% of the rows overlap by about 0.18 (J = p / (2 - p) for p = 0.3).

    python -m experiments.mask_dynamics runs/RUN [runs/RUN2 ...] --out figures/mask_dynamics.png
"""

import argparse
from pathlib import Path

from plumbing import common

KEYS = ("mask_jaccard_prev", "mask_jaccard_step0", "mask_jaccard_step0_static")


def random_overlap(p: float) -> float:
    """Expected Jaccard of two independent random masks keeping a share p of rows: p^2 / (2p - p^2).
    Example: p = 0.3 -> 0.09 / 0.51 = 0.176."""
    return p * p / (2 * p - p * p)


def table(runs: dict) -> str:
    lines = ["| run | steps | " + " | ".join(KEYS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in KEYS) + " |"]
    for name, rows in runs.items():
        later = rows[1:] or rows  # step 0 compares with itself
        means = [sum(r[k] for r in later) / len(later) if k in later[0] else None for k in KEYS]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(
            "-" if m is None else f"{m:.3f}" for m in means) + " |")  # static: --static-overlap
    return "\n".join(lines)


def plot(runs: dict, out: Path, ratio: float) -> None:
    import matplotlib  # plots only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        for key, style in zip(KEYS, ("-", "--", ":")):
            if key not in rows[0]:  # the static overlap is logged with --static-overlap only
                continue
            ax.plot(steps, [r[key] for r in rows], style, label=f"{name}: {key[13:]}")
    ax.axhline(random_overlap(ratio), color="grey", lw=0.8, label="two random masks")
    ax.set(xlabel="step", ylabel="Jaccard overlap (mean over q/k matrices)", ylim=(0, 1.02),
           title="LongAct per-step masks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with common.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    p.add_argument("--out", default="figures/mask_dynamics.png")
    p.add_argument("--ratio", type=float, default=0.3, help="share of rows kept (random line)")
    a = p.parse_args(argv)
    runs = {Path(r).name: common.read_jsonl(Path(r) / "metrics.jsonl") for r in a.runs}
    print(table(runs))
    plot(runs, Path(a.out), a.ratio)


if __name__ == "__main__":
    main()
