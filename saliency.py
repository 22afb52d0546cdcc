"""
saliency.py -- LongAct step 1: find the query/key channels that carry high-magnitude activations on long inputs.

The idea (LongAct, arXiv 2604.14922, abstract and method section; facts.md §1): when an LLM reads a long context,
a few channels of its query and key vectors carry much larger activations than the rest. Quantization work already
knows such outliers are the critical ones (AWQ, Lin et al. 2024: "salient channels" found from activation
magnitudes), and the massive-values study (Jin et al., ICML 2025) finds them in the low-frequency RoPE dims of Q
and K. LongAct then lets RL update only the weight rows that produce those channels (`masking.py`).

This file measures them. We hook the output of every `q_proj` / `k_proj`, run the policy on long calibration
text, and keep one number per output channel, streaming over batches (no activations are stored):

    q = x @ W_q.T (+ b_q)        # (B, T, C)   output channel c  <->  row c of W_q  <->  head c // D, dim c % D
    saliency[c] = mean over non-padding tokens of |q[:, :, c]|

Choices (the paper's full text is unavailable to us, so each of these is ours; facts.md §1 "[choice]"):
  1. choice: hook the projection OUTPUTS (before RoPE, and before the q_norm/k_norm of Qwen3). Channel c of the
     output is exactly row c of the weight that `masking.py` freezes or trains, so the statistic and the mask speak
     about the same rows. RoPE rotates pairs (d, d + D/2) and preserves each pair's norm, so pair-level magnitudes
     are the same before and after it.
  2. choice: the default statistic is mean |x| over all non-padding tokens of all samples (AWQ's channel score).
     Options: `l2` = the L2 norm over all those tokens (the massive-values detector of Jin et al., there per sample;
     here pooled over samples, so it grows with sqrt(#tokens) -- the ranking is what matters), and `max_abs`.
  3. choice: calibration text = windows of RULER's Paul Graham essay haystack (`evaluate.calibration_prompts`),
     default 8 samples x 2048 tokens, raw text without a chat template: the paper says "long contexts", not which.
  4. choice: the CLI runs the fp32 model under bf16 autocast (as training does, facts.md §6), but every
     accumulator is float32: each hooked bf16 activation is cast to fp32 before it is summed.
  5. choice: padding is excluded through the attention mask, and position ids are derived from the mask (as
     `generate` does), so a left-padded sequence gives the same statistics as the unpadded one.
  6. choice: the model is run through its base model (`model.base_model`), skipping the LM head: we only need the
     attention inputs, and 2048 x 49152 logits would cost ~10% more compute and 0.4 GB for nothing.
  7. choice: "concentration" = share of a matrix's total channel magnitude held by its top 30% channels (the
     paper's fixed ratio); 0.30 would mean no concentration at all. Where the top channels sit is reported as the
     share of them in the low-frequency half of RoPE's frequencies (0.5 = no preference).

Shapes: B batch of sequences, T tokens, L layers, H heads (KV heads for k_proj), D head dim, C channels = H*D,
        N non-padding tokens.

Run:  python saliency.py --model smollm2-135m --seq-len 2048 --num-samples 8 --out qk_stats.safetensors \
          --plot qk_saliency.png
      8 x 2048 tokens, forward only: ~105 s of CPU time on 2 cores (2-4 min wall on a busy machine), 1.4 GB RAM.
      What it prints for the embedded model is in figures/qk_saliency.txt (mean top-30% share q 0.601, k 0.593).
Test: .venv/bin/python -m pytest -q tests/test_saliency.py
"""

import argparse
import contextlib
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# constants

STATS = ("mean_abs", "l2", "max_abs")  # mean_abs first: the default (choice 2)
QK_SUFFIXES = ("q_proj", "k_proj")     # Llama, Qwen2, Qwen3 and Mistral all name the projections this way
DEFAULT_RATIO = 0.3                    # LongAct's fixed share of trainable Q/K rows (facts.md §1, [summary])

# -----------------------------------------------------------------------------
# pure functions: the streaming reduction


def new_acc(num_channels: int) -> dict:
    """An empty accumulator for one matrix: a float32 running value per channel and a token count."""
    return {"value": torch.zeros(num_channels, dtype=torch.float32), "tokens": 0}


def update_stats(acc: dict, x: torch.Tensor, mask, stat: str = "mean_abs") -> dict:
    """Fold one batch of activations into an accumulator; returns a new accumulator (the input is not changed).

    x: (B, T, C) activations of any float dtype; mask: (B, T) with 1/True on real tokens, or None (all real).
    The running value is sum |x| for mean_abs, sum x^2 for l2 and max |x| for max_abs, all in float32.

    Example: x = [[[1, -2], [3, 4], [-5, 6]]], mask = [[1, 1, 0]] (the last token is padding)
      mean_abs -> value [1+3, 2+4] = [4, 6], tokens 2   (finalize: [2, 3])
      l2       -> value [1+9, 4+16] = [10, 20]           (finalize: [sqrt 10, sqrt 20])
      max_abs  -> value [3, 4]
    """
    if stat not in STATS:
        raise ValueError(f"unknown stat {stat!r}; choose one of {STATS}")
    B, T, C = x.shape
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ValueError(f"attention mask has shape {tuple(mask.shape)}, activations {(B, T, C)}")
    x = x.detach().reshape(B * T, C).float()   # (B*T, C) fp32 before any sum (choice 4); stays on its device
    if mask is not None:
        x = x[mask.reshape(B * T).to(device=x.device, dtype=torch.bool)]  # (N, C) padding rows dropped (choice 5)
    if x.shape[0] == 0:  # an all-padding batch adds nothing (and amax of an empty tensor would fail)
        return dict(acc)
    prev = acc["value"].to(x.device)           # (C,) the accumulator follows the activations (GPU stays GPU)
    if stat == "mean_abs":
        value = prev + x.abs().sum(dim=0)              # (C,)
    elif stat == "l2":
        value = prev + x.square().sum(dim=0)           # (C,) sum of squares; sqrt only at the end
    else:
        value = torch.maximum(prev, x.abs().amax(dim=0))  # (C,)
    return {"value": value, "tokens": acc["tokens"] + x.shape[0]}


def finalize(acc: dict, stat: str = "mean_abs") -> torch.Tensor:
    """Turn an accumulator into the per-channel statistic, a float32 CPU tensor (C,)."""
    if acc["tokens"] == 0:
        raise ValueError("no non-padding tokens were seen; cannot compute a statistic")
    value = acc["value"].cpu()
    if stat == "mean_abs":
        return value / acc["tokens"]
    if stat == "l2":
        return value.sqrt()  # L2 norm over every token seen (choice 2)
    if stat == "max_abs":
        return value.clone()
    raise ValueError(f"unknown stat {stat!r}; choose one of {STATS}")


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over real tokens only, as `generate` does for left padding (choice 5).

    Example: mask [[0, 0, 1, 1, 1]] -> [[0, 0, 0, 1, 2]] (padding positions are clamped to 0; they are masked anyway).
    """
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, T)


# -----------------------------------------------------------------------------
# pure functions: analysis of finished statistics


def natural_key(name: str) -> list:
    """Sort key that orders 'layers.2' before 'layers.10' (safetensors returns keys alphabetically)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def layer_pairs(stats: dict) -> list:
    """[(layer prefix, q name, k name)] in layer order; a side is None when a layer lacks it."""
    prefixes = {n[:-len(s)] for n in stats for s in QK_SUFFIXES if n.endswith(s)}
    return [(p, p + "q_proj" if p + "q_proj" in stats else None, p + "k_proj" if p + "k_proj" in stats else None)
            for p in sorted(prefixes, key=natural_key)]


def concentration(stats: dict, ratio: float = DEFAULT_RATIO, *, head_dim: int):
    """How concentrated each matrix's saliency is, and where its top channels sit inside the heads (choice 7).

    Returns (per_module, metrics). per_module[name] holds:
      top_share       share of sum(stat) held by the round(ratio*C) largest channels (= ratio when flat)
      dim_hist        (D,) how many top channels have dim index d = c % D (summed over heads)
      mean_freq_index mean over top channels of the RoPE frequency index d mod (D/2); in HF's rotate_half layout
                      dims d and d + D/2 share one frequency, and a higher index means a lower frequency (base^-2i/D)
      low_freq_share  share of top channels with frequency index >= D/4, the low-frequency half (0.5 = no preference)
    metrics: the mean of each scalar over the q matrices and over the k matrices ("q_top_share", ...).

    Example: head_dim 4, stats {"...q_proj": [1, 1, 1, 7]}, ratio 0.25 -> one top channel, c = 3:
      top_share 7/10 = 0.7, dim_hist [0, 0, 0, 1], frequency index 3 mod 2 = 1 -> mean_freq_index 1, low_freq_share 1.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    half = head_dim // 2
    per_module = {}
    for name, s in stats.items():
        C = s.numel()
        if C % head_dim:
            raise ValueError(f"{name}: {C} channels is not a multiple of head_dim {head_dim}")
        k = max(1, round(ratio * C))                       # same count as masking.build_masks keeps
        top = torch.topk(s.float(), k).indices              # (k,) channel ids of the most salient rows
        d = top % head_dim                                  # (k,) dim inside the head
        freq = d % half                                     # (k,) RoPE frequency index, 0 = fastest rotation
        per_module[name] = {
            "top_share": (s[top].sum() / s.sum()).item(),
            "dim_hist": torch.bincount(d, minlength=head_dim),  # (D,)
            "mean_freq_index": freq.float().mean().item(),
            "low_freq_share": (freq >= half // 2).float().mean().item(),
        }
    metrics = {}
    for side in ("q", "k"):
        rows = [v for n, v in per_module.items() if n.endswith(f"{side}_proj")]
        for key in ("top_share", "mean_freq_index", "low_freq_share"):
            if rows:
                metrics[f"{side}_{key}"] = sum(r[key] for r in rows) / len(rows)
    return per_module, metrics


def top_dims(hist: torch.Tensor, n: int = 3) -> str:
    """The n dim indices holding the most top channels, e.g. '63,31,62' (ties go to the lower index)."""
    order = sorted(range(hist.numel()), key=lambda d: (-int(hist[d]), d))[:n]
    return ",".join(str(d) for d in order)


def _cells(row: dict | None) -> tuple:
    """(top share, low-freq share, top dims) of one matrix as strings; dashes when a layer lacks the matrix."""
    if row is None:
        return "-", "-", "-"
    return f"{row['top_share']:.3f}", f"{row['low_freq_share']:.2f}", top_dims(row["dim_hist"])


def _row(cells) -> str:
    """One table line: the layer label left-aligned, then right-aligned columns."""
    widths = (6, 10, 10, 11, 11, 14, 14)
    return "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))


def format_table(per_module: dict, metrics: dict, ratio: float, head_dim: int) -> str:
    """The per-layer table the CLI prints: top-share of q and k, low-frequency share and most frequent dims."""
    pct = f"top{round(100 * ratio)}%"
    lines = [_row(("layer", f"q {pct}", f"k {pct}", "q lowfreq", "k lowfreq", "q top dims", "k top dims"))]
    for i, (prefix, q, k) in enumerate(layer_pairs(per_module)):
        m = re.search(r"(\d+)\.\w*\.?$", prefix)           # "model.layers.12.self_attn." -> "12"
        (qs, ql, qd), (ks, kl, kd) = _cells(per_module.get(q)), _cells(per_module.get(k))
        lines.append(_row((m.group(1) if m else str(i), qs, ks, ql, kl, qd, kd)))
    mean = [format(metrics[k], ".3f" if "top" in k else ".2f") if k in metrics else "-"
            for k in ("q_top_share", "k_top_share", "q_low_freq_share", "k_low_freq_share")]
    lines.append(_row(("mean", *mean)))
    lines.append(f"flat saliency would give {ratio:.3f} and 0.50. lowfreq = share of the top channels whose RoPE "
                 f"frequency index (d mod {head_dim // 2}) is >= {head_dim // 4};\ntop dims = the dims d = c mod "
                 f"{head_dim} that hold the most top channels, summed over heads.")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# files: safetensors with string metadata, written atomically


def _atomic_path(path: Path):
    """A temp file next to `path` (same file system, so os.replace is atomic); the caller replaces or deletes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be read by others
    return Path(tmp)


def save_stats(path, stats: dict, meta: dict) -> None:
    """Write {module name: (C,) float32} plus metadata (every value stored as a string) to a safetensors file."""
    path = Path(path)
    tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in stats.items()}
    tmp = _atomic_path(path)
    try:
        save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in meta.items()})
        os.replace(tmp, path)  # a kill mid-write leaves the old file (or none), never half of one
    finally:
        tmp.unlink(missing_ok=True)


def qk_modules(model) -> dict:
    """{full module name: module} for every module whose name ends in q_proj or k_proj, in model order."""
    found = {n: m for n, m in model.named_modules() if n.endswith(QK_SUFFIXES)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no module whose name ends in {QK_SUFFIXES}")
    return found


def out_features(module) -> int:
    """Output channels of a projection (rows of its weight)."""
    return getattr(module, "out_features", None) or module.weight.shape[0]


def check_stats_match(stats: dict, model) -> None:
    """Raise ValueError naming every q/k module that is missing on one side or has a different shape."""
    expected = {n: (out_features(m),) for n, m in qk_modules(model).items()}
    problems = []
    for name, shape in expected.items():
        if name not in stats:
            problems.append(f"{name}: missing in the stats file (model has shape {shape})")
        elif tuple(stats[name].shape) != shape:
            problems.append(f"{name}: stats file has shape {tuple(stats[name].shape)}, model has shape {shape}")
    problems += [f"{n}: in the stats file (shape {tuple(stats[n].shape)}) but not in the model"
                 for n in stats if n not in expected]
    if problems:
        raise ValueError(f"stats do not match {type(model).__name__} ({len(problems)} problems):\n  "
                         + "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else ""))


def load_stats(path, model=None):
    """Read (stats, meta) written by save_stats; meta values are strings. With `model`, refuse mismatched shapes."""
    stats = {}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        for name in sorted(f.keys(), key=natural_key):  # layer order, not alphabetical
            stats[name] = f.get_tensor(name)
    if model is not None:
        check_stats_match(stats, model)
    return stats, meta


# -----------------------------------------------------------------------------
# model-touching code: hooks and the calibration pass


@contextlib.contextmanager
def qk_hooks(model, stat: str = "mean_abs"):
    """Register a forward hook on every q_proj/k_proj; yield `state`; always remove the hooks (also on errors).

    Before each forward pass the caller sets state["mask"] to that batch's (B, T) attention mask (or None); each
    hook folds its module's output into state["accs"][name]. Nothing but the (C,) accumulators is kept.
    """
    if stat not in STATS:
        raise ValueError(f"unknown stat {stat!r}; choose one of {STATS}")
    modules = qk_modules(model)
    state = {"mask": None, "accs": {n: new_acc(out_features(m)) for n, m in modules.items()}}

    def make_hook(name):
        def hook(module, inputs, output):  # output: (B, T, C), bf16 under autocast
            state["accs"][name] = update_stats(state["accs"][name], output, state["mask"], stat)
        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield state
    finally:
        for h in handles:  # runs on success, on exceptions and on KeyboardInterrupt alike
            h.remove()


@torch.no_grad()
def collect_qk_stats(model, batches, stat: str = "mean_abs") -> dict:
    """Run `model` over `batches` and return {q/k module name: (C,) float32 statistic}.

    batches: iterable of dicts with "input_ids" (B, T) and optionally "attention_mask" (B, T) (1 = real token).
    Autocast is the caller's choice (the CLI uses bf16); the accumulators are float32 either way.
    """
    device = next(model.parameters()).device
    body = model.base_model  # the transformer without the LM head (choice 6); a bare model returns itself
    with qk_hooks(model, stat) as state:
        for batch in batches:
            ids = batch["input_ids"].to(device)                 # (B, T)
            mask = batch.get("attention_mask")
            mask = None if mask is None else mask.to(device)    # (B, T)
            state["mask"] = mask
            pos = None if mask is None else position_ids_from_mask(mask)  # (B, T) (choice 5)
            body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return {name: finalize(acc, stat) for name, acc in state["accs"].items()}


def make_batches(prompts: list, batch_size: int):
    """Equal-length token lists -> dicts of (B, T) input_ids and an all-ones attention_mask."""
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[i:i + batch_size], dtype=torch.long)  # (B, T)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def plot_stats(stats: dict, head_dim: int, path, title: str = "") -> None:
    """Heatmaps layer x channel (left) for q (top row) and k (bottom row); right: folded over heads, layer x dim.

    Each layer's row is divided by its mean so layers of different scale share one colour scale (log); 1 = average.
    matplotlib is imported here so the rest of the file works without it.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(2, 2, figsize=(15, 9), gridspec_kw={"width_ratios": [3, 1]})
    for r, side in enumerate(("q", "k")):
        names = [q if side == "q" else k for _, q, k in layer_pairs(stats)]
        grid = torch.stack([stats[n].float() for n in names if n])          # (L, C)
        grid = grid / grid.mean(dim=1, keepdim=True).clamp_min(1e-12)        # (L, C) relative to the layer mean
        L, C = grid.shape
        folded = grid.view(L, C // head_dim, head_dim).mean(dim=1)           # (L, D) mean over heads
        for c, (img, xlab) in enumerate(((grid, f"{side}_proj output channel c (head = c // {head_dim})"),
                                           (folded, f"dim d within head (d, d+{head_dim // 2}: same frequency)"))):
            lim = 10.0 if c == 0 else 4.0  # a decade around the layer mean; head averages spread less
            ax = axes[r, c]
            im = ax.imshow(img.clamp(1 / lim, lim).numpy(), aspect="auto", interpolation="nearest", cmap="magma",
                           norm=LogNorm(vmin=1 / lim, vmax=lim))
            step = head_dim if c == 0 else head_dim // 2   # head boundaries / the two rotate_half halves
            for x in range(step, img.shape[1], step):
                ax.axvline(x - 0.5, color="white", lw=0.6, alpha=0.7)
            ax.set_xlabel(xlab)
            ax.set_ylabel("layer")
            ax.set_title(f"{side}_proj: {'per channel' if c == 0 else 'mean over heads'}")
            fig.colorbar(im, ax=ax, label="stat / layer mean" if c == 1 else None)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = _atomic_path(path)
    try:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)


def head_dim_of(config) -> int:
    """Head dim from a HF config (Qwen3 sets it explicitly; older configs imply hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# -----------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LongAct step 1: per-channel q/k activation statistics on long text.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or local HF folder")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration prompt (choice 3)")
    g.add_argument("--num-samples", type=int, default=8, help="number of calibration prompts")
    g.add_argument("--batch-size", type=int, default=1, help="prompts per forward pass")
    g.add_argument("--seed", type=int, default=0, help="picks the essay windows (evaluate.calibration_prompts)")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--autocast", choices=("bf16", "none"), default="bf16",
                   help="bf16 autocast over fp32 weights (choice 4) or plain fp32")
    g = p.add_argument_group("statistic and outputs")
    g.add_argument("--stat", choices=STATS, default="mean_abs", help="per-channel statistic (choice 2)")
    g.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="top share reported in the table")
    g.add_argument("--out", default="qk_stats.safetensors", help="where the statistics are written")
    g.add_argument("--plot", default=None, help="optional heatmap image (needs matplotlib)")
    return p.parse_args(argv)


def main(argv=None):
    from tqdm import tqdm
    from evaluate import calibration_prompts
    from rollout import load_policy

    args = parse_args(argv)
    t0 = time.time()
    model, tokenizer = load_policy(args.model, dtype=torch.float32, device=args.device)
    model.eval()
    head_dim = head_dim_of(model.config)
    # 1. long calibration text: windows of RULER's essay haystack, exactly seq_len tokens each
    prompts = calibration_prompts(tokenizer, args.seq_len, args.num_samples, seed=args.seed)
    batches = tqdm(make_batches(prompts, args.batch_size), total=-(-len(prompts) // args.batch_size),
                   desc="calibration batches", unit="batch")
    # 2. one forward pass per batch, hooks fold q/k outputs into fp32 per-channel statistics
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.autocast == "bf16")
    t1 = time.time()
    with autocast:
        stats = collect_qk_stats(model, batches, stat=args.stat)
    t_fwd = time.time() - t1
    meta = {"model": args.model, "model_type": model.config.model_type, "stat": args.stat,
            "num_samples": len(prompts), "num_tokens": len(prompts) * args.seq_len, "seq_len": args.seq_len,
            "head_dim": head_dim, "seed": args.seed, "autocast": args.autocast,
            "calibration": "RULER Paul Graham essays (evaluate.calibration_prompts)"}
    save_stats(args.out, stats, meta)
    # 3. how concentrated the saliency is, and in which RoPE dims the top channels sit
    per_module, metrics = concentration(stats, ratio=args.ratio, head_dim=head_dim)
    print(f"{args.model}: {len(stats)} q/k matrices, stat {args.stat}, {meta['num_tokens']} tokens "
          f"({len(prompts)} x {args.seq_len}), autocast {args.autocast}, head_dim {head_dim}")
    print(format_table(per_module, metrics, args.ratio, head_dim))
    if args.plot:
        plot_stats(stats, head_dim, args.plot,
                   title=f"{args.model}: {args.stat} of q_proj / k_proj outputs over {meta['num_tokens']} tokens")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else "")
          + f"; forward {t_fwd:.0f} s, total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
