"""
saliency.py -- LongAct step 1: how large each query/key channel's activations are on long inputs.

When an LLM reads a long context, a few channels of its query and key vectors carry much larger
activations than the rest (LongAct, arXiv 2604.14922; AWQ's salient channels, the massive
values of Q and K in low-frequency RoPE dims). LongAct lets RL update only
the weight rows behind those channels (`masking.py`). The statistic (SOURCES.md §1.2, from
third-party summaries), per head h and head dim d:

    M_{h,d} = (1/B) sum_i sqrt( sum_s Q_{i,s,h,d}^2 )        (the same for K)

the L2 norm over the positions s of each sequence i, averaged over the B sequences. With
q = x @ W_q.T (+ b_q), output channel c = h*D + d is row c of W_q: one number per weight row.
Hooks on every `q_proj` / `k_proj` output reduce on the fly (no activation is stored):
  * a calibration pass:  collect_qk_stats(model, batches)   (a static mask, computed once), or
  * around the rollout's prefill, every RL step, without an extra forward:
        hook, state = prefill_collector(model)           # a fresh state per step
        rollout.sample_groups(..., prefill_hook=hook)    # may run several times a step (DAPO)
        stats = finalize_state(state)                    # {name: (C,) float32}
Choices (the hook site, the statistic and its options, the inputs, fp32 accumulation, padding):
SOURCES.md §9.1-9.4. How concentrated the statistic is: `concentration` below; its per-layer
table and heatmaps: experiments/concentration.py.

Shapes: B sequences, T tokens, L layers, H heads (KV heads for k_proj), D head dim, C = H*D
        channels, N non-padding tokens.
Run:  python saliency.py --model smollm2-135m --seq-len 2048 --num-samples 8 \
          --out qk_stats.safetensors
      python -m experiments.concentration qk_stats.safetensors --plot qk_saliency.png
"""

import contextlib
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from masking import DEFAULT_RATIO
from plumbing import flags
from plumbing.common import (PRECISIONS, atomic_path, autocast, choose_precision, head_dim_of,
                             load_stats_file, model_device, positions_from_mask, qk_modules)
from plumbing.policy import load_policy
from tasks.haystack import calibration_prompts

# -----------------------------------------------------------------------------
# constants

STATS = ("seq_l2", "mean_abs", "l2", "max_abs")  # the choice list; the first is the default
DEFAULT_STAT = STATS[0]

# -----------------------------------------------------------------------------
# pure functions: the streaming reduction


def new_acc(num_channels: int) -> dict:
    """An empty accumulator for one matrix: float32 running values (C,), token/sequence counts."""
    return {"value": torch.zeros(num_channels, dtype=torch.float32), "tokens": 0, "sequences": 0}


def check_stat(stat: str) -> None:
    if stat not in STATS:
        raise ValueError(f"unknown stat {stat!r}; choose one of {STATS}")


def update_stats(acc: dict, x: torch.Tensor, mask, stat: str = DEFAULT_STAT) -> dict:
    """Fold one batch of activations into an accumulator; returns a new one (the input is kept).

    x: (B, T, C), any float dtype, one whole sequence per row; mask: (B, T), 1 = real, or None.
    Running value: seq_l2 sum_i sqrt(sum_t x^2); mean_abs sum |x|; l2 sum x^2; max_abs max |x|.

    Worked example (tests/test_saliency.py runs it): two sequences of two tokens, C = 2; the
    second sequence's last token is padding (its 9s must not count).
    >>> x = torch.tensor([[[3., 0.], [4., 1.]], [[6., 2.], [9., 9.]]])
    >>> mask = torch.tensor([[1, 1], [1, 0]])
    >>> acc = update_stats(new_acc(2), x, mask, "seq_l2")  # norms [5, 1] and [6, 2]
    >>> acc["value"].tolist(), acc["sequences"], acc["tokens"]
    ([11.0, 3.0], 2, 3)
    >>> finalize(acc, "seq_l2").tolist()  # (1/B) sum_i ||x_i||: [(5 + 6) / 2, (1 + 2) / 2]
    [5.5, 1.5]
    >>> mean_abs = finalize(update_stats(new_acc(2), x, mask, "mean_abs"), "mean_abs")
    >>> [round(v, 4) for v in mean_abs.tolist()]  # per token, not per sequence: [13 / 3, 3 / 3]
    [4.3333, 1.0]
    """
    check_stat(stat)
    B, T, C = x.shape
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ValueError(f"attention mask has shape {tuple(mask.shape)}, activations {(B, T, C)}")
    x = x.detach().float()  # (B, T, C) fp32 before any sum (§9.4); stays on its device
    keep = (torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None
            else mask.to(device=x.device, dtype=torch.bool))  # (B, T)
    tokens = int(keep.sum())
    if tokens == 0:  # an all-padding batch adds nothing (and amax of an empty tensor would fail)
        return dict(acc)
    prev = acc["value"].to(x.device)  # (C,) the accumulator follows the activations (GPU stays GPU)
    real_seqs = keep.any(dim=1)  # (B,) sequences with at least one real token (§9.4)
    if stat == "seq_l2":
        x = x.masked_fill(~keep[..., None], 0.0)  # (B, T, C) inf/NaN in padding cannot leak
        value = prev + x.square().sum(dim=1)[real_seqs].sqrt().sum(dim=0)  # (B, C) -> (C,)
    else:
        x = x[keep]  # (N, C) padding rows dropped
        if stat == "mean_abs":
            value = prev + x.abs().sum(dim=0)  # (C,)
        elif stat == "l2":
            value = prev + x.square().sum(dim=0)  # (C,) sum of squares; sqrt only at the end
        else:
            value = torch.maximum(prev, x.abs().amax(dim=0))  # (C,)
    return {"value": value, "tokens": acc["tokens"] + tokens,
            "sequences": acc["sequences"] + int(real_seqs.sum())}


def finalize(acc: dict, stat: str = DEFAULT_STAT) -> torch.Tensor:
    """Turn an accumulator into the per-channel statistic, a float32 CPU tensor (C,)."""
    check_stat(stat)
    if acc["tokens"] == 0:
        raise ValueError("no non-padding tokens were seen; cannot compute a statistic")
    value = acc["value"].cpu()
    if stat == "seq_l2":
        return value / acc["sequences"]  # the mean over sequences of each sequence's norm
    if stat == "mean_abs":
        return value / acc["tokens"]
    if stat == "l2":
        return value.sqrt()  # one L2 norm over every token seen
    return value.clone()


# -----------------------------------------------------------------------------
# how concentrated a finished statistic is (pure; its table and heatmaps:
# experiments/concentration.py)


def top_channels(s: torch.Tensor, ratio: float, head_dim: int, per_head: bool) -> torch.Tensor:
    """Channel ids a `ratio` mask keeps (as masking.build_masks; ties go to the lower index)."""
    C = s.numel()
    n = head_dim if per_head else C
    k = round(ratio * n)
    grouped = s.float().view(C // n, n)  # (H, D) per head, or (1, C)
    order = torch.sort(grouped, dim=1, descending=True, stable=True).indices  # (H, n)
    offsets = torch.arange(0, C, n).unsqueeze(1)  # (H, 1) first channel of each group
    return (order[:, :k] + offsets).flatten()  # (H*k,)


def concentration(stats: dict, ratio: float = DEFAULT_RATIO, *, head_dim: int,
                  per_head: bool = True):
    """How concentrated each matrix's statistic is, and where its top channels sit (§9.40).

    Returns (per_module, metrics). per_module[name] holds:
      top_share       share of sum(stat) held by the channels a `ratio` mask keeps (flat: ratio)
      dim_hist        (D,) how many top channels have dim index d = c % D (summed over heads)
      mean_freq_index mean RoPE frequency index d mod (D/2) of the top channels; in HF's
                      rotate_half layout d and d + D/2 share one frequency; higher = lower
      low_freq_share  share of top channels with frequency index >= D/4 (0.5 = no preference)
    metrics: the mean of each scalar over the q and over the k matrices ("q_top_share", ...).

    Example: head_dim 4, stats {"...q_proj": [1, 1, 1, 7]}, ratio 0.25 -> one top channel, c = 3:
      top_share 7/10 = 0.7, dim_hist [0, 0, 0, 1], frequency index 3 mod 2 = 1 -> low_freq_share 1.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    half = head_dim // 2
    per_module = {}
    for name, s in stats.items():
        if s.numel() % head_dim:
            raise ValueError(f"{name}: {s.numel()} channels do not split into heads of {head_dim}")
        top = top_channels(s, ratio, head_dim, per_head)  # (k,)
        d = top % head_dim  # (k,) dim inside the head
        freq = d % half  # (k,) RoPE frequency index, 0 = fastest rotation
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


# -----------------------------------------------------------------------------
# files: safetensors with string metadata, written atomically


def save_stats(path, stats: dict, meta: dict) -> None:
    """Write {module name: (C,) float32} and metadata (as strings) to a safetensors file."""
    tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in stats.items()}
    with atomic_path(path) as tmp:  # a kill mid-write leaves the old file, never half of one
        save_file(tensors, tmp, metadata={str(k): str(v) for k, v in meta.items()})


def out_features(module) -> int:
    """Output channels of a projection (rows of its weight)."""
    return getattr(module, "out_features", None) or module.weight.shape[0]


def check_stats_match(stats: dict, model) -> None:
    """Raise ValueError naming every q/k module missing on one side or of a different shape."""
    expected = {n: (out_features(m),) for n, m in qk_modules(model).items()}
    problems = []
    for name, shape in expected.items():
        if name not in stats:
            problems.append(f"{name}: missing in the stats file (model has shape {shape})")
        elif tuple(stats[name].shape) != shape:
            problems.append(f"{name}: stats file has shape {tuple(stats[name].shape)}, "
                            f"model has shape {shape}")
    problems += [f"{n}: in the stats file (shape {tuple(stats[n].shape)}) but not in the model"
                 for n in stats if n not in expected]
    if problems:
        raise ValueError(f"stats do not match {type(model).__name__} "
                         f"({len(problems)} problems):\n  "
                         + "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else ""))


def load_stats(path, model=None):
    """(stats, meta) written by save_stats; meta values are strings. With `model`, check shapes."""
    stats, meta = load_stats_file(path)
    if model is not None:
        check_stats_match(stats, model)
    return stats, meta


# -----------------------------------------------------------------------------
# model-touching code: hooks, the per-step prefill collector and the calibration pass


def new_state(model, stat: str = DEFAULT_STAT) -> dict:
    """Empty accumulators for every q/k projection of `model`, the statistic and the mask."""
    check_stat(stat)
    return {"stat": stat, "mask": None,
            "accs": {n: new_acc(out_features(m)) for n, m in qk_modules(model).items()}}


@contextlib.contextmanager
def qk_hooks(model, stat: str = DEFAULT_STAT, state: dict | None = None):
    """Forward hooks on every q_proj/k_proj for the duration of the block; yields `state`.

    state=None starts fresh (new_state); an earlier state keeps accumulating. Before each forward
    the caller sets state["mask"] to that batch's (B, T) attention mask (or None). Each hook folds
    its module's output into state["accs"][name]. The hooks are removed on exit, also on errors.
    """
    state = new_state(model, stat) if state is None else state
    if state["stat"] != stat:
        raise ValueError(f"state accumulates {state['stat']!r}, hooks asked for {stat!r}")

    def make_hook(name):
        def hook(module, inputs, output):  # output: (B, T, C), bf16 under autocast
            state["accs"][name] = update_stats(state["accs"][name], output, state["mask"], stat)
        return hook

    handles = []
    try:
        for name, module in qk_modules(model).items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield state
    finally:
        for h in handles:  # runs on success, on exceptions and on KeyboardInterrupt alike
            h.remove()


def prefill_collector(model, stat: str = DEFAULT_STAT):
    """(hook, state): per-step statistics from the rollout's prefill, no extra forward (§9.3).

    `hook(attention_mask)` is a context manager: inside it, every q/k output is folded into `state`
    with that (N, P) mask; on exit the hooks are gone, so decoding steps are not counted. Every call
    adds to the same state, so several generation batches per step (DAPO) accumulate.
    finalize_state(state) gives the statistics. Make a new collector per step.
    """
    state = new_state(model, stat)

    @contextlib.contextmanager
    def hook(attention_mask):
        with qk_hooks(model, stat, state):
            state["mask"] = attention_mask
            try:
                yield state
            finally:
                state["mask"] = None

    return hook, state


def finalize_state(state: dict) -> dict:
    """{q/k module name: (C,) float32 statistic} from a state of qk_hooks / prefill_collector."""
    return {name: finalize(acc, state["stat"]) for name, acc in state["accs"].items()}


@torch.no_grad()
def collect_qk_stats(model, batches, stat: str = DEFAULT_STAT) -> dict:
    """Run `model` over `batches` and return {q/k module name: (C,) float32 statistic}.

    batches: iterable of dicts with "input_ids" (B, T), optionally "attention_mask" (B, T).
    Autocast is the caller's choice (the CLI picks it from the hardware); the accumulators are
    float32 either way.
    """
    device = model_device(model)
    body = model.base_model  # the transformer without the LM head (§9.4)
    with qk_hooks(model, stat) as state:
        for batch in batches:
            ids = batch["input_ids"].to(device)  # (B, T)
            mask = batch.get("attention_mask")
            mask = None if mask is None else mask.to(device)  # (B, T)
            state["mask"] = mask
            pos = None if mask is None else positions_from_mask(mask)  # (B, T) (§9.4)
            body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return finalize_state(state)


def make_batches(prompts: list, batch_size: int):
    """Equal-length token lists -> dicts of (B, T) input_ids and an all-ones attention_mask."""
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[i:i + batch_size], dtype=torch.long)  # (B, T)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# -----------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = flags.Parser(description="LongAct step 1: q/k channel statistics on long text.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or HF folder")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per prompt (§9.3)")
    g.add_argument("--num-samples", type=int, default=8, help="number of calibration prompts")
    g.add_argument("--batch-size", type=int, default=1, help="prompts per forward pass")
    g.add_argument("--seed", type=int, default=0, help="picks the essay windows")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="bf16 autocast where the device has native bf16, else fp32 (§9.17)")
    g = p.add_argument_group("statistic and outputs")
    g.add_argument("--stat", choices=STATS, default=DEFAULT_STAT, help="statistic (§9.2)")
    g.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="top share in the summary")
    g.add_argument("--out", default="qk_stats.safetensors", help="where the statistics are written")
    args = p.parse_args(argv)
    flags.at_least(p, args, 2, "seq_len")  # (B, T) with T >= 2: a statistic over positions
    flags.at_least(p, args, 1, "num_samples", "batch_size")
    flags.between(p, args, "ratio", 0, 1, low_open=True)
    flags.model_source(p, "model", args.model)  # a hub id: reachable or cached, else one line
    flags.within(p, "seq_len", args.seq_len, flags.model_window(args.model), "a prompt")
    folder = Path(args.out).expanduser().resolve().parent
    if not folder.is_dir():
        p.error(f"{flags.name('out')} {args.out}: no folder {folder}")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    model, tokenizer = load_policy(args.model, dtype=torch.float32, device=args.device)
    model.eval()
    head_dim = head_dim_of(model.config)
    # 1. long calibration text: windows of RULER's essay haystack, exactly seq_len tokens each
    prompts = calibration_prompts(tokenizer, args.seq_len, args.num_samples, seed=args.seed)
    batches = tqdm(make_batches(prompts, args.batch_size), desc="calibration batches",
                   total=-(-len(prompts) // args.batch_size), unit="batch")
    # 2. one forward pass per batch; hooks fold q/k outputs into fp32 per-channel statistics
    precision, why = choose_precision(args.precision, args.device)
    print(f"precision: {precision} ({why})")
    t1 = time.time()
    with autocast(args.device, precision):
        stats = collect_qk_stats(model, batches, stat=args.stat)
    t_fwd = time.time() - t1
    meta = {"model": args.model, "model_type": model.config.model_type, "stat": args.stat,
            "num_samples": len(prompts), "num_tokens": len(prompts) * args.seq_len,
            "seq_len": args.seq_len, "head_dim": head_dim, "seed": args.seed,
            "precision": precision,
            "calibration": "RULER Paul Graham essays (tasks.haystack.calibration_prompts)"}
    save_stats(args.out, stats, meta)
    # 3. how concentrated the statistic is, and in which RoPE dims the top channels sit
    _, metrics = concentration(stats, ratio=args.ratio, head_dim=head_dim)
    print(f"{args.model}: {len(stats)} q/k matrices, stat {args.stat}, {meta['num_tokens']} tokens "
          f"({len(prompts)} x {args.seq_len}), {precision}, head_dim {head_dim}")
    pct = f"top {round(100 * args.ratio)}%"
    print(f"mean over layers: {pct} share q {metrics['q_top_share']:.3f}, k "
          f"{metrics['k_top_share']:.3f} (flat: {args.ratio:.3f}); low-frequency share of the "
          f"top channels q {metrics['q_low_freq_share']:.2f}, k {metrics['k_low_freq_share']:.2f}"
          " (flat: 0.50)")
    print(f"wrote {args.out}; forward {t_fwd:.0f} s, total {time.time() - t0:.0f} s. Per layer, "
          f"and heatmaps: python -m experiments.concentration {args.out} --plot qk_saliency.png")


if __name__ == "__main__":
    main()
