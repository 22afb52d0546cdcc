"""
experiments/causal.py -- the causal test: does the model need its massive Q/K channels on long
inputs?

The LongAct write-up (SOURCES.md §1.5) removes the massive channels of Qwen3-8B and sees LongBench
v2 collapse, far more than when the other channels go. If massive channels carry long-context
work, removing them must hurt far more than removing as many random or least-salient ones. We
repeat the test as a dose-response on RULER (§5) with the embedded model (SOURCES.md §9.25):

    conditions   original  nothing removed (n = 0), the reference
                 massive   the n channels of every head with the LARGEST statistic
                 least     the n channels of every head with the SMALLEST statistic
                 random    n random channels of every head (seeded), the control
    dose         n = 1, 2, 4, 8, 16 per head, plus the write-up's two points: massive at
                 round(0.3 D) and least at round(0.7 D), with random at both sizes.

A channel is removed by zeroing it at the output of q_proj / k_proj with forward hooks (no weight
is edited). Every condition sees the same RULER samples; one JSON line per (condition, n) is
appended when done, so an interrupted run resumes where it stopped.

Shapes: H heads, D head dim, C = H*D output channels of one q/k projection.
Run:  python -m experiments.causal            (measurement, resumable: experiments/runs/causal/)
      python -m experiments.causal --summary  (the table, and figures/causal/causal.png)
      python -m experiments.causal --out /tmp/c.jsonl --tasks niah_single_1 --lengths 512 \
          --samples 2 --ns 1 --calib-len 256 --calib-samples 1            (smoke run, minutes)
"""

import contextlib
import time
from pathlib import Path

import torch

import evaluate
import masking
import saliency
from experiments import figures_twin
from plumbing import common, flags
from plumbing.common import append_jsonl, atomic_path, qk_modules, read_jsonl, versions
from plumbing.policy import load_policy
from tasks import ruler
from tasks.haystack import calibration_prompts

CONDITIONS = ("massive", "least", "random")  # plus "original" (n = 0), always measured first
STRATEGY = {"massive": "topk", "least": "bottomk", "random": "random"}  # masking.py's names
DEFAULT_NS = (1, 2, 4, 8, 16)
PAPER_POINTS = (("massive", 0.3), ("least", 0.7), ("random", 0.3), ("random", 0.7))  # share of D
DEFAULT_TASKS = ("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "qa_1")


# ----------------------------------------------------------------------------- pure functions
def plan_points(ns, head_dim: int, conditions=CONDITIONS) -> list:
    """[(condition, n)]: ("original", 0) first, then every condition at every n <= head_dim, then
    the write-up's points. Example, head_dim 64, ns (1, 2): original 0, massive 1, massive 2,
    least 1, least 2, random 1, random 2, massive 19, least 45, random 19, random 45."""
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad:
        raise ValueError(f"unknown condition(s) {bad}; choose from {CONDITIONS}")
    points = [("original", 0)]
    points += [(c, int(n)) for c in conditions for n in ns if 0 < int(n) <= head_dim]
    points += [(c, round(share * head_dim)) for c, share in PAPER_POINTS if c in conditions]
    return list(dict.fromkeys(points))  # drop repeats, keep the order


def channel_masks(stats: dict, condition: str, n: int, head_dim: int, seed: int = 0) -> dict:
    """{q/k module name: (C,) bool}, True = channel removed: n channels in every head.

    Example: head_dim 4, stats {"q": [4, 3, 2, 1, 1, 2, 3, 4]} (two heads), n 1:
      massive -> channels 0 and 7; least -> channels 3 and 4.
    """
    if not 0 <= n <= head_dim:
        raise ValueError(f"n = {n} channels per head; expected 0 <= n <= head_dim = {head_dim}")
    if condition == "original" or n == 0:
        return {name: torch.zeros(s.numel(), dtype=torch.bool) for name, s in stats.items()}
    if condition not in STRATEGY:
        raise ValueError(f"unknown condition {condition!r}; choose from original, {CONDITIONS}")
    return masking.build_masks(stats, ratio=n / head_dim, strategy=STRATEGY[condition],
                               per_head=True, head_dim=head_dim, seed=seed)


def config_mismatch(row: dict, config: dict) -> str:
    """'' when a result row belongs to this configuration, else the first differing field."""
    for key, value in config.items():
        if row.get("config", {}).get(key) != value:
            return f"{key}: file has {row.get('config', {}).get(key)!r}, this run {value!r}"
    return ""


def load_done(path, config: dict) -> dict:
    """{(condition, n): row} of the points already in the results file (none if it is missing).
    A row of another configuration is an error naming the file, the line and the field."""
    path = Path(path)
    if not path.exists():
        return {}
    done = {}
    for line, row in enumerate(read_jsonl(path), 1):
        for field in ("condition", "n", "average", "config"):
            if field not in row:
                raise ValueError(f"{path}: line {line}: missing field {field!r}")
        why = config_mismatch(row, config)
        if why:
            raise ValueError(f"{path}: line {line}: written by another configuration ({why}); "
                             "use another --out")
        done[(row["condition"], int(row["n"]))] = row
    return done


def summary_table(rows: list) -> str:
    """Markdown: one row per condition, one column per n, RULER average (x100) per length."""
    lengths = sorted({L for r in rows for L in r["average"]}, key=int)
    ns = sorted({int(r["n"]) for r in rows})
    lines = []
    for L in lengths:
        cell = {(r["condition"], int(r["n"])): r["average"].get(L) for r in rows}
        conds = [c for c in ("original", *CONDITIONS) if any(k[0] == c for k in cell)]
        lines += [f"RULER average at {L} tokens (channels removed per head ->)", "",
                  "| condition | " + " | ".join(f"n={n}" for n in ns) + " |",
                  "| --- |" + " ---: |" * len(ns)]
        for c in conds:
            vals = [cell.get((c, n)) for n in ns]
            lines.append(f"| {c} | " + " | ".join("" if v is None else f"{v:.1f}" for v in vals)
                         + " |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- model-touching code
@contextlib.contextmanager
def removed_channels(model, removed: dict):
    """Zero the chosen output channels of q_proj/k_proj for the duration of the block.

    removed: {module name: (C,) bool}, True = zero that channel. Forward hooks return a new output
    (masked_fill), so no weight changes; all hooks are removed on exit, also on errors.
    """
    modules = qk_modules(model)
    unknown = sorted(set(removed) - set(modules))
    if unknown:
        raise ValueError(f"no q/k module named {unknown[:3]} in {type(model).__name__}")
    handles = []
    try:
        for name, mask in removed.items():
            if not bool(mask.any()):
                continue  # nothing to remove: no hook, so the output is untouched bit for bit
            if mask.shape != (modules[name].weight.shape[0],):
                raise ValueError(f"{name}: mask of shape {tuple(mask.shape)}, module has "
                                 f"{modules[name].weight.shape[0]} output channels")

            def hook(module, inputs, output, mask=mask):  # output (..., C)
                return output.masked_fill(mask.to(output.device), 0.0)
            handles.append(modules[name].register_forward_hook(hook))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def run_points(model, points: list, masks_for, evaluate_fn, out, config: dict,
               log=print) -> list:
    """Evaluate every (condition, n) not yet in `out`, appending one JSON row each; returns all rows
    in `points` order. masks_for(condition, n) -> removed-channel masks; evaluate_fn(model) ->
    (table with "average": {length: score}, records)."""
    done = load_done(out, config)
    for condition, n in points:
        if (condition, n) in done:
            log(f"{condition:>8} n={n:<3} done earlier: {done[(condition, n)]['average']}")
            continue
        t0 = time.time()
        with removed_channels(model, masks_for(condition, n)) as hooked:
            table, records = evaluate_fn(model)
        scores = {t: {str(L): s for L, s in by_len.items()}  # str keys, as JSON reads them back
                  for t, by_len in table.get("scores", {}).items()}
        row = {"condition": condition, "n": n, "hooked_modules": hooked,
               "average": {str(L): s for L, s in table["average"].items()},
               "scores": scores, "seconds": round(time.time() - t0, 1),
               "examples": [dict(task=r["task"], length=r["length"], score=r["score"],
                                 completion=r["completion"][:120]) for r in records[:3]],
               "config": config, "versions": versions()}
        append_jsonl(out, row)  # on disk before the next point starts
        done[(condition, n)] = row
        log(f"{condition:>8} n={n:<3} {row['average']}  ({row['seconds']} s)")
    return [done[p] for p in points]


def calibration_stats(model, tokenizer, args, path: Path) -> dict:
    """saliency.py's default statistic on calibration text; saved once, reloaded on resume."""
    if path.exists():
        stats, meta = saliency.load_stats(path, model)
        want = {"stat": args.stat, "seq_len": str(args.calib_len),
                "num_samples": str(args.calib_samples), "seed": str(args.seed)}
        if any(meta.get(k) != v for k, v in want.items()):
            raise ValueError(f"{path}: statistics of another configuration ({meta}); delete it")
        return stats
    prompts = calibration_prompts(tokenizer, args.calib_len, args.calib_samples, seed=args.seed)
    stats = saliency.collect_qk_stats(model, saliency.make_batches(prompts, 1), stat=args.stat)
    saliency.save_stats(path, stats, {"stat": args.stat, "seq_len": args.calib_len,
                                      "num_samples": args.calib_samples, "seed": args.seed,
                                      "model": args.model})
    return stats


def plot_summary(rows: list, path) -> None:
    """Accuracy vs channels removed per head, one line per condition, one panel per length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({L for r in rows for L in r["average"]}, key=int)
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for c, style in zip(CONDITIONS, ("o-", "s-", "^--")):
            pts = sorted((int(r["n"]), r["average"][L]) for r in rows
                         if r["condition"] == c and L in r["average"])
            if pts:
                ax.plot(*zip(*pts), style, label=c)
        base = [r["average"][L] for r in rows if r["condition"] == "original" and L in r["average"]]
        if base:
            ax.axhline(base[0], color="gray", ls=":", label="original")
        ns = sorted({int(r["n"]) for r in rows if int(r["n"]) > 0})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])  # the measured n, not powers of two
        ax.minorticks_off()
        ax.set_xlabel("channels removed per head (q_proj and k_proj outputs)")
        ax.set_ylabel("RULER average (x100)")
        ax.set_title(f"{L} tokens")
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = flags.Parser(description="Remove massive / least / random q/k channels, "
                                 "evaluate RULER (a resumable dose-response).")
    g = p.add_argument_group("model and benchmark")
    g.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or HF folder")
    g.add_argument("--precision", choices=common.PRECISIONS, default="auto",
                   help="bf16 or fp32 weights; auto = bf16 where the device has it natively")
    g.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="RULER tasks")
    g.add_argument("--lengths", nargs="+", type=int, default=[1024], help="RULER lengths")
    g.add_argument("--samples", type=int, default=20, help="samples per task and length")
    g.add_argument("--seed", type=int, default=0, help="RULER samples, calibration, random sets")
    g = p.add_argument_group("removal")
    g.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    g.add_argument("--ns", nargs="+", type=int, default=list(DEFAULT_NS),
                   help="channels removed per head (the paper points are added)")
    g.add_argument("--stat", choices=saliency.STATS, default=saliency.DEFAULT_STAT)
    g.add_argument("--calib-len", type=int, default=2048, help="tokens per calibration text")
    g.add_argument("--calib-samples", type=int, default=8, help="calibration texts")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default="experiments/runs/causal/causal.jsonl",
                   help="results (JSON lines)")
    g.add_argument("--summary", action="store_true", help="print the table, write the figure")
    g.add_argument("--figure", default=None,
                   help="figure path (default: figures/NAME/ for results under "
                        "experiments/runs/NAME/, else next to --out)")
    args = p.parse_args(argv)
    if args.summary:
        flags.existing(p, "out", args.out, "results file to summarise")
        return args
    flags.at_least(p, args, 1, "lengths", "samples", "ns", "calib_samples")
    flags.at_least(p, args, 0, "seed")
    flags.at_least(p, args, 2, "calib_len")
    flags.model_source(p, "model", args.model)  # a hub id: reachable or cached, else one line
    flags.known(p, "tasks", args.tasks, ruler.RULER_TASKS)
    window = flags.model_window(args.model)
    flags.within(p, "calib_len", args.calib_len, window, "a calibration text")
    for L in args.lengths:
        flags.within(p, "lengths", L, window, "a RULER length (answer included)")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.summary:
        rows = read_jsonl(out)
        print(summary_table(rows))
        twin = figures_twin(out.parent)  # committed results: the picture goes to figures/
        figure = Path(args.figure or (twin / (out.stem + ".png") if twin else
                                      out.with_suffix(".png")))
        plot_summary(rows, figure)
        print(f"wrote {figure}")
        return rows
    args.precision, why = common.choose_precision(args.precision, "cpu")
    print(f"precision: {args.precision} ({why})")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model, tokenizer = load_policy(args.model, dtype=dtype)
    model.eval()
    head_dim = common.head_dim_of(model.config)
    config = {k: getattr(args, k) for k in ("model", "precision", "tasks", "lengths", "samples",
                                            "seed", "stat", "calib_len", "calib_samples")}
    stats_path = out.with_name(out.stem + ".qk_stats.safetensors")
    cache = {}

    def masks_for(condition, n):
        if "stats" not in cache and condition != "original":  # the original point needs none
            cache["stats"] = calibration_stats(model, tokenizer, args, stats_path)
        shapes = cache.get("stats") or {k: torch.zeros(m.weight.shape[0])
                                        for k, m in qk_modules(model).items()}
        return channel_masks(shapes, condition, n, head_dim, seed=args.seed)

    def evaluate_fn(m):
        return evaluate.evaluate_ruler(m, tokenizer, args.tasks, args.lengths, args.samples,
                                       seed=args.seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    points = plan_points(args.ns, head_dim, args.conditions)
    print(f"{args.model}: {len(points)} points, head_dim {head_dim}, tasks {args.tasks}, "
          f"lengths {args.lengths}, {args.samples} samples; results -> {out}")
    rows = run_points(model, points, masks_for, evaluate_fn, out, config)
    print(summary_table(rows))
    return rows


if __name__ == "__main__":
    main()
