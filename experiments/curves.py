"""
experiments/curves.py -- a run as a picture: reward, accuracy, KL, grad norm, mask overlap and
the phase times of every step, from the run's metrics.jsonl (train.py writes one line per step).

    python -m experiments.curves runs/RUN [--out RUN/curves.png]
    python -m experiments.curves experiments/runs/demo          # -> figures/demo/curves.png

Six panels over the step: reward (the task score plus any overlong penalty) and accuracy
(completions that score 1); KL to the reference (mean and largest); gradient norm before
clipping; the Jaccard overlap of the step's q/k row masks with the previous step's and with
step 0's (1.0 = the same rows); seconds of sampling and of the update. The RULER scores before
and after (eval.json), when there are, go into the title.
Test: .venv/bin/python -m pytest -q tests/test_curves.py
"""

import argparse
from pathlib import Path

from experiments import figures_twin
from plumbing import common

PANELS = [  # (title, [(metrics key, label)])
    ("reward and accuracy", [("reward", "reward"), ("acc", "accuracy")]),
    ("KL to the reference", [("kl", "mean"), ("kl_max", "largest")]),
    ("gradient norm (before clipping)", [("grad_norm", "norm")]),
    ("[LongAct] mask Jaccard", [("mask_jaccard_prev", "vs previous step"),
                                ("mask_jaccard_step0", "vs step 0")]),
    ("seconds per step", [("t_sample", "sampling"), ("t_update", "update")]),
    ("completions", [("len", "mean length (tokens)"), ("frac_truncated", "share truncated")]),
]


def read_run(run: Path) -> tuple[list, dict]:
    """(metrics rows, eval.json or {}); a run without metrics is a clear error."""
    path = run / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no such file (is {run} a train.py run folder?)")
    rows = common.read_jsonl(path)
    evals = common.read_json(run / "eval.json") if (run / "eval.json").exists() else {}
    return rows, evals


def title_of(run: Path, evals: dict) -> str:
    """The run's name, and its RULER averages before -> after when both exist."""
    parts = [run.name]
    before, after = evals.get("before", {}), evals.get("after", {})
    for key in sorted(k for k in before if k.startswith("ruler_avg@") and k in after):
        parts.append(f"RULER {key.split('@')[1]}: {before[key]:.1f} -> {after[key]:.1f}")
    return " | ".join(parts)


def plot(rows: list, evals: dict, run: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, series) in zip(axes.flat, PANELS):
        for key, label in series:
            ys = [r.get(key) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(steps, [float("nan") if y is None else y for y in ys], marker="o",
                        ms=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title_of(run, evals), fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with common.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw a train.py run's per-step metrics.")
    p.add_argument("run", help="a run folder (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="image path (default RUN/curves.png; for a "
                   "committed run experiments/runs/NAME, figures/NAME/curves.png)")
    a = p.parse_args(argv)
    run = Path(a.run)
    rows, evals = read_run(run)
    out = Path(a.out) if a.out else (figures_twin(run) or run) / "curves.png"
    plot(rows, evals, run, out)
    print(f"{len(rows)} steps -> {out}")
    return out


if __name__ == "__main__":
    main()
