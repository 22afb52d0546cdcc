"""
experiments/concentration.py -- how concentrated a model's q/k statistics are, and where the top
channels sit: the per-layer table and the heatmaps of a `python saliency.py` statistics file.

LongAct's premise (arXiv 2604.14922; SOURCES.md §1.1, §2) is that a few q/k channels carry much
larger activations on long inputs, in the low-frequency RoPE dims. Given finished statistics
({module name: (C,)} from saliency.py) saliency.concentration measures it, and this file shows it:

    top_share        share of a matrix's summed statistic held by the channels a 30% mask keeps
                     (per head, as masking.build_masks); a flat statistic gives 0.30
    low_freq_share   share of those top channels in the low-frequency half of RoPE's frequencies
                     (d mod D/2 >= D/4 in HF's rotate_half layout); 0.5 = no preference
    dim_hist         which dims d = c mod D hold the top channels, summed over heads

The definitions are this project's (SOURCES.md §9.40). All pure functions of tensors except
plot_stats, which writes an image (matplotlib, imported there), and the CLI.

Shapes: L layers, H heads (KV heads for k_proj), D head dim, C = H*D channels.
Run:  python saliency.py --seq-len 2048 --out qk_stats.safetensors         (the statistics, first)
      python -m experiments.concentration qk_stats.safetensors --plot qk_saliency.png
"""

import argparse
import re
from pathlib import Path

import torch

from masking import DEFAULT_RATIO
from plumbing.common import QK_SUFFIXES, atomic_path, load_stats_file, natural_key
from saliency import concentration  # the metric lives with the statistic it measures


def layer_pairs(stats: dict) -> list:
    """[(layer prefix, q name, k name)] in layer order; a side is None when a layer lacks it."""
    prefixes = {n[:-len(s)] for n in stats for s in QK_SUFFIXES if n.endswith(s)}
    pick = lambda p, s: p + s if p + s in stats else None  # noqa: E731
    return [(p, pick(p, "q_proj"), pick(p, "k_proj")) for p in sorted(prefixes, key=natural_key)]


def top_dims(hist: torch.Tensor, n: int = 3) -> str:
    """The n dims holding the most top channels, e.g. '63,31,62' (ties: the lower index)."""
    order = sorted(range(hist.numel()), key=lambda d: (-int(hist[d]), d))[:n]
    return ",".join(str(d) for d in order)


def _cells(row: dict | None) -> tuple:
    """(top share, low-freq share, top dims) of one matrix as strings; dashes if it is missing."""
    if row is None:
        return "-", "-", "-"
    return f"{row['top_share']:.3f}", f"{row['low_freq_share']:.2f}", top_dims(row["dim_hist"])


def _row(cells) -> str:
    """One table line: the layer label left-aligned, then right-aligned columns."""
    widths = (6, 10, 10, 11, 11, 14, 14)
    return "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                   for i, (c, w) in enumerate(zip(cells, widths)))


def format_table(per_module: dict, metrics: dict, ratio: float, head_dim: int) -> str:
    """The per-layer table the CLI prints: top share, low-frequency share and top dims of q, k."""
    pct = f"top{round(100 * ratio)}%"
    head = ("layer", f"q {pct}", f"k {pct}", "q lowfreq", "k lowfreq", "q top dims", "k top dims")
    lines = [_row(head)]
    for i, (prefix, q, k) in enumerate(layer_pairs(per_module)):
        m = re.search(r"(\d+)\.\w*\.?$", prefix)  # "model.layers.12.self_attn." -> "12"
        (qs, ql, qd), (ks, kl, kd) = _cells(per_module.get(q)), _cells(per_module.get(k))
        lines.append(_row((m.group(1) if m else str(i), qs, ks, ql, kl, qd, kd)))
    mean = [format(metrics[k], ".3f" if "top" in k else ".2f") if k in metrics else "-"
            for k in ("q_top_share", "k_top_share", "q_low_freq_share", "k_low_freq_share")]
    lines.append(_row(("mean", *mean)))
    lines.append(f"flat saliency would give {ratio:.3f} and 0.50. lowfreq = share of the top "
                 f"channels whose RoPE frequency index (d mod {head_dim // 2}) is >= "
                 f"{head_dim // 4};\ntop dims = the dims d = c mod {head_dim} that hold the most "
                 f"top channels, summed over heads.")
    return "\n".join(lines)


def plot_stats(stats: dict, head_dim: int, path, title: str = "") -> None:
    """Heatmaps layer x channel (left) for q (top row) and k (bottom row); right: folded over heads.

    Each layer's row is divided by its mean, so layers of different scale share one log scale.
    matplotlib is imported here so the rest of the file works without it.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(2, 2, figsize=(15, 9), gridspec_kw={"width_ratios": [3, 1]})
    for r, side in enumerate(("q", "k")):
        names = [q if side == "q" else k for _, q, k in layer_pairs(stats)]
        grid = torch.stack([stats[n].float() for n in names if n])  # (L, C)
        grid = grid / grid.mean(dim=1, keepdim=True).clamp_min(1e-12)  # (L, C) / layer mean
        L, C = grid.shape
        folded = grid.view(L, C // head_dim, head_dim).mean(dim=1)  # (L, D) mean over heads
        panels = ((grid, f"{side}_proj output channel c (head = c // {head_dim})"),
                  (folded, f"dim d within head (d, d+{head_dim // 2}: same frequency)"))
        for c, (img, xlab) in enumerate(panels):
            lim = 10.0 if c == 0 else 4.0  # a decade around the mean; head averages spread less
            ax = axes[r, c]
            im = ax.imshow(img.clamp(1 / lim, lim).numpy(), aspect="auto", interpolation="nearest",
                           cmap="magma", norm=LogNorm(vmin=1 / lim, vmax=lim))
            step = head_dim if c == 0 else head_dim // 2  # head boundaries / rotate_half halves
            for x in range(step, img.shape[1], step):
                ax.axvline(x - 0.5, color="white", lw=0.6, alpha=0.7)
            ax.set_xlabel(xlab)
            ax.set_ylabel("layer")
            ax.set_title(f"{side}_proj: {'per channel' if c == 0 else 'mean over heads'}")
            fig.colorbar(im, ax=ax, label="stat / layer mean" if c == 1 else None)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="The concentration table (and heatmaps) of a "
                                            "saliency.py statistics file.")
    p.add_argument("stats", help="safetensors file from saliency.py (one (C,) statistic per q/k)")
    p.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="top share in the table")
    p.add_argument("--head-dim", type=int, default=None, help="default: the file's metadata")
    p.add_argument("--plot", default=None, help="heatmap image (needs matplotlib)")
    a = p.parse_args(argv)
    if not 0 < a.ratio <= 1:
        p.error(f"--ratio {a.ratio}: must be in (0, 1]")
    stats, meta = load_stats_file(a.stats)
    head_dim = a.head_dim or (int(meta["head_dim"]) if "head_dim" in meta else None)
    if not head_dim:
        p.error(f"{a.stats} has no head_dim metadata: pass --head-dim")
    per_module, metrics = concentration(stats, ratio=a.ratio, head_dim=head_dim)
    print(format_table(per_module, metrics, a.ratio, head_dim))
    if a.plot:
        title = (f"{meta.get('model', '?')}: {meta.get('stat', '?')} of q/k outputs over "
                 f"{meta.get('num_tokens', '?')} tokens")
        plot_stats(stats, head_dim, a.plot, title=title)
        print(f"wrote {a.plot}")
    return per_module, metrics


if __name__ == "__main__":
    main()
