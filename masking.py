"""
masking.py -- LongAct's second step: from query/key saliency statistics to the weight rows RL may update.

The idea (LongAct, arXiv 2604.14922, abstract + third-party summaries, see facts.md §1): long inputs produce
high-magnitude activations in a few query/key channels. Output channel c of `q_proj` is computed by row c of
`q_proj.weight` (shape (C, I)), so "update the weights behind the salient activations" means: keep a row mask per
q/k matrix, let RL change only the masked-in rows of W_Q and W_K, and train every other parameter normally.
The mask is static (computed once before RL) and is not needed at inference.

    stats  (saliency.py)  --build_masks-->  masks {module name: (C,) bool}  --attach/param_groups-->  training

Keeping the other rows *bit-identical* needs more than zeroing their gradients. With zero gradient rows and fresh
optimizer state, Adam's moments stay exactly 0 and its update for those rows is exactly 0 (0 / (0 + eps) = 0), but:
  * AdamW's decoupled weight decay `p *= 1 - lr * wd` is applied to EVERY parameter that has a `.grad`, whatever
    the grad's values (torch/optim/adam.py, `_single_tensor_adam` and `_multi_tensor_adam`). With wd = 0.1 (DAPO's
    recipe) the "frozen" rows would shrink a little every step.
  * Adam with L2 decay (`torch.optim.Adam(weight_decay=...)`) adds `wd * p` to the gradient, and SGD momentum or a
    resumed optimizer state carry non-zero moments: all of them move rows whose gradient is zero.
So we (1) zero the masked gradient rows with tensor hooks, (2) put the masked matrices in their own AdamW param
group with weight_decay 0, and (3) apply AdamW's decoupled decay ourselves, only to the trainable rows, right before
`optimizer.step()`. AdamW decays before its update and the update does not read p, so (3) gives the trainable rows
the exact values plain AdamW would give them (tests/test_masking.py checks bit equality against a reference run).

The training step (train.py) calls, in this order:
    masks = build_masks(stats, ratio=0.3)                       # or load_masks(path)
    check_masks(model, masks)                                   # shapes match the model, every q/k module covered
    handles = attach_grad_masks(model, masks)                   # once, before the first backward
    opt = torch.optim.AdamW(param_groups(model, masks, weight_decay=0.1), lr=...)   # fresh optimizer state
    per step:  opt.zero_grad(); for each micro-batch: (loss / n).backward()   # masked grad rows are exact zeros
               clip_grad_norm_(model.parameters(), 1.0)         # the norm sees zeros for masked rows (intended)
               apply_row_weight_decay(opt)                      # AdamW's decay on trainable rows only
               opt.step(); scheduler.step()
    for h in handles: h.remove()                                # when done

Choices (the LongAct full text is not available to us; facts.md §1):
  1. choice: one row mask per matrix, `round(ratio * C)` rows, default ratio 0.3 (the paper's fixed 30%) and
     strategy "topk" by saliency. "bottomk", "random" (seeded) and "all" (uniform updates) are the ablations.
  2. choice: `per_head=True` keeps `round(ratio * D)` rows inside each head instead of the top share of the matrix
     (which may pile into a few heads); the default is global, per matrix.
  3. choice: ties are broken by the lower channel index (stable sort), so equal statistics give one answer.
  4. choice: "random" draws each matrix's rows from its own generator seeded by (seed, module name): different
     matrices get different rows, and the result does not depend on the dict's order.
  5. choice: q/k bias rows (Qwen2) follow their weight's row mask: bias c only feeds channel c.
  6. choice: the masked-group's trainable rows are decayed like plain `AdamW(model.parameters())` decays every
     parameter (biases included). A train.py that exempts biases/norms from decay must extend `param_groups`.
  7. choice: the whole mechanism assumes a fresh optimizer state at the first masked step (Adam moments of masked
     rows start at 0). Loading optimizer state from a run without masks would move the "frozen" rows.
  8. Global grad-norm clipping sees the masked rows as zeros; the clip factor is computed from the trainable
     gradients only. That is what "update only the salient rows" means, and it is stated here rather than hidden.

Shapes: L layers, H heads, D head dim, C = H*D output channels of one q/k matrix (its rows), I input features.

Run: python masking.py qk_stats.safetensors --ratio 0.3 --strategy topk [--per-head --head-dim 64] [--out m.safetensors]
"""

import argparse
import hashlib
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import Tensor

# -----------------------------------------------------------------------------
STRATEGIES = ("topk", "bottomk", "random", "all")
QK_SUFFIXES = ("q_proj", "k_proj")  # Llama, Mistral, Qwen2, Qwen3 naming (same as saliency.py)
GROUP_NAME = "masked_rows"  # name of the AdamW param group that holds the masked matrices


# ----------------------------------------------------------------------------- building masks (pure)
def _derived_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, module name): stable across runs and Python versions (unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def select_rows(scores: Tensor, ratio: float, largest: bool = True, group: int | None = None) -> Tensor:
    """Boolean mask keeping `round(ratio * n)` entries with the largest (or smallest) scores in each group of n.

    group=None: one group, the whole vector (n = C). group=D: C // D consecutive groups (heads) of n = D each.
    Ties go to the lower index (stable sort). Example: scores [1, 5, 5, 0], ratio 0.5 -> [F, T, T, F].
    """
    C = scores.shape[0]
    n = C if group is None else group
    if C % n:
        raise ValueError(f"{C} channels do not split into heads of {n} (wrong head_dim?)")
    grouped = scores.reshape(C // n, n)  # (H, D), or (1, C) when global
    k = round(ratio * n)  # Python round: the exact count the issue asks for (half to even, e.g. 2.5 -> 2)
    order = torch.sort(grouped, dim=1, descending=largest, stable=True).indices[:, :k]  # (H, k)
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(1, order, True)  # (H, D)
    return mask.reshape(C)  # (C,)


def build_masks(stats: dict[str, Tensor], ratio: float = 0.3, strategy: str = "topk", per_head: bool = False,
                head_dim: int | None = None, seed: int = 0) -> dict[str, Tensor]:
    """One row mask (C,) bool per matrix: True = the row may be updated by RL.

    stats: {module name: (C,) saliency per output channel}, as saliency.collect_qk_stats returns.
    strategy: "topk" (LongAct: most salient rows), "bottomk" (least salient), "random" (seeded by (seed, name)),
    "all" (every row, i.e. uniform updates; ratio is then ignored). per_head needs head_dim.
    """
    if not (0 < ratio <= 1):  # also rejects NaN
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if per_head and not head_dim:
        raise ValueError("per_head=True needs head_dim (the model's config.head_dim)")
    masks = {}
    for name in sorted(stats):
        s = stats[name].detach().float().cpu()  # (C,)
        if s.dim() != 1:
            raise ValueError(f"{name}: statistics must have shape (out_features,), got {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError(f"{name}: statistics contain NaN/inf; recollect them")
        if strategy == "all":
            masks[name] = torch.ones_like(s, dtype=torch.bool)
            continue
        if strategy == "random":  # a random score per row, then the same selection as topk
            s = torch.rand(s.shape, generator=torch.Generator().manual_seed(_derived_seed(seed, name)))
        masks[name] = select_rows(s, ratio, largest=strategy != "bottomk", group=head_dim if per_head else None)
    return masks


# ----------------------------------------------------------------------------- summaries and files
def _natural_key(name: str) -> list:
    """Sort key reading digit runs as numbers, so layer 2 comes before layer 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def mask_summary(masks: dict[str, Tensor], stats: dict[str, Tensor] | None = None):
    """(per-layer shares, overall share of trainable q/k rows).

    per_layer: {layer prefix, e.g. "model.layers.0.self_attn": {"q_proj": share of rows, "k_proj": ...}}; with
    stats, also {"q_proj mass": share of the statistic's total held by the kept rows, ...}, i.e. how much of the
    saliency the mask covers. Overall share = kept rows / all rows (rows of q and k have the same length I).
    """
    per_layer: dict[str, dict[str, float]] = {}
    kept = total = 0
    for name, m in sorted(masks.items(), key=lambda kv: _natural_key(kv[0])):
        prefix, proj = name.rsplit(".", 1) if "." in name else ("", name)
        row = per_layer.setdefault(prefix, {})
        row[proj] = m.float().mean().item()
        if stats is not None and name in stats:
            s = stats[name].float()  # (C,)
            row[proj + " mass"] = (s[m].sum() / s.sum().clamp_min(1e-30)).item()
        kept, total = kept + int(m.sum()), total + m.numel()
    return per_layer, kept / max(total, 1)


def format_summary(per_layer: dict[str, dict[str, float]], overall: float) -> str:
    """The summary as a text table, one line per layer (layer index when the prefix has `layers.<i>`)."""
    names = {c for row in per_layer.values() for c in row}
    cols = sorted(names, key=lambda c: (c.endswith("mass"), not c.startswith("q"), c))  # q, k, then the masses
    lines = [f"{'layer':>10} " + " ".join(f"{c:>12}" for c in cols)]
    for prefix, row in per_layer.items():
        hit = re.search(r"layers\.(\d+)", prefix)
        label = hit.group(1) if hit else prefix[-10:]
        lines.append(f"{label:>10} " + " ".join(f"{row[c]:>12.3f}" if c in row else f"{'-':>12}" for c in cols))
    if any(c.endswith("mass") for c in cols):
        lines.append("(<proj> = share of rows trainable; <proj> mass = share of the statistic's sum in those rows)")
    lines.append(f"overall share of q/k rows trainable: {overall:.4f}")
    return "\n".join(lines)


def save_masks(path, masks: dict[str, Tensor], meta: dict | None = None) -> None:
    """Write masks to safetensors (bool stored as uint8) with string metadata; atomic (temp file + os.replace)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.uint8).contiguous() for k, v in masks.items()}
    metadata = {"kind": "longact_row_masks", **{str(k): str(v) for k, v in (meta or {}).items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # a reader never sees a half-written file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_masks(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(masks {name: (C,) bool}, metadata) from a file written by save_masks."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    masks = {}
    for name, t in load_file(str(path)).items():
        if t.dim() != 1 or (t.dtype != torch.bool and not ((t == 0) | (t == 1)).all()):
            raise ValueError(f"{path}: {name} is not a 0/1 row mask (shape {tuple(t.shape)}, dtype {t.dtype})")
        masks[name] = t.bool()
    return masks, meta


# ----------------------------------------------------------------------------- applying masks to a model
def check_masks(model: torch.nn.Module, masks: dict[str, Tensor], require_all_qk: bool = True) -> None:
    """Raise ValueError naming the module and both shapes when masks do not fit the model.

    Each mask must be a 1-D bool tensor with one entry per row of its module's weight (and bias). With
    require_all_qk, every q_proj/k_proj of the model must have a mask: a forgotten module would train fully.
    """
    modules = dict(model.named_modules())
    for name, m in masks.items():
        if name not in modules or getattr(modules[name], "weight", None) is None:
            raise ValueError(f"mask for {name!r}: the model has no such module with a weight "
                             f"(mask shape {tuple(m.shape)}); were the masks built for another model?")
        weight = modules[name].weight
        if m.dtype != torch.bool or m.dim() != 1 or m.shape[0] != weight.shape[0]:
            raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)} and dtype {m.dtype}, but the module's "
                             f"weight has shape {tuple(weight.shape)}: expected a bool mask of shape "
                             f"({weight.shape[0]},); were the masks built for another model?")
    if require_all_qk:
        missing = [n for n in modules if n.endswith(QK_SUFFIXES) and n not in masks]
        if missing:
            raise ValueError(f"no mask for {len(missing)} q/k modules of the model, e.g. {missing[:3]}; "
                             "they would be fully trained")


def masked_params(model: torch.nn.Module, masks: dict[str, Tensor]) -> list[tuple[str, torch.nn.Parameter, Tensor]]:
    """(parameter name, parameter, row mask shaped to broadcast over it) for each weight/bias with a frozen row.

    Masks that keep every row (strategy "all") are skipped: those matrices need nothing special.
    """
    check_masks(model, masks, require_all_qk=False)
    out = []
    for name in sorted(masks):
        m = masks[name]
        if bool(m.all()):
            continue
        module = model.get_submodule(name)
        for pname in ("weight", "bias"):  # choice 5: the bias row c follows weight row c
            p = getattr(module, pname, None)
            if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                rows = m.to(p.device).reshape(-1, *([1] * (p.dim() - 1)))  # (C, 1) for weights, (C,) for biases
                out.append((f"{name}.{pname}", p, rows))
    return out


def attach_grad_masks(model: torch.nn.Module, masks: dict[str, Tensor]) -> list:
    """Register gradient hooks that zero the frozen rows of every masked weight/bias; return the hook handles.

    A tensor hook on a leaf parameter runs on each backward's gradient before it is added to `.grad`, so every
    micro-batch is masked and clipping, accumulation and Adam's moments only ever see exact zeros there.
    masked_fill (not a multiply by 0) keeps the zeros exact even if a gradient entry is inf/NaN.
    Remove with `for h in handles: h.remove()`.
    """
    check_masks(model, masks)
    handles = []
    for _, p, rows in masked_params(model, masks):
        frozen = ~rows  # (C, 1) or (C,), on the parameter's device
        handles.append(p.register_hook(lambda g, frozen=frozen: g.masked_fill(frozen, 0.0)))
    return handles


def param_groups(model: torch.nn.Module, masks: dict[str, Tensor], weight_decay: float) -> list[dict]:
    """AdamW param groups: every other trainable parameter with `weight_decay`; masked matrices with 0.

    The second group carries its row masks and the decay it should have had ("row_masks", "row_weight_decay");
    apply_row_weight_decay(optimizer) reads them. Usage: torch.optim.AdamW(param_groups(model, masks, 0.1), lr=lr).
    """
    special = masked_params(model, masks)
    special_ids = {id(p) for _, p, _ in special}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special_ids]
    groups = [{"params": rest, "weight_decay": weight_decay}]
    if special:
        groups.append({"params": [p for _, p, _ in special], "weight_decay": 0.0, "name": GROUP_NAME,
                       "row_masks": [rows for _, _, rows in special], "row_weight_decay": weight_decay})
    return groups


@torch.no_grad()
def apply_row_weight_decay(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's decoupled decay `p <- p * (1 - lr * wd)`, on the trainable rows of the masked group only.

    Call after clipping and right before optimizer.step(), at the lr the step will use (read from the group, so a
    scheduler is respected). Same expression as torch's AdamW, so trainable rows match plain AdamW bit for bit
    (checked for its for-loop, foreach and CPU fused implementations; the CUDA fused kernel is not checked here).
    Like AdamW, parameters without a gradient this step are skipped.
    """
    for group in optimizer.param_groups:
        if "row_masks" not in group or group["row_weight_decay"] == 0:
            continue
        lr = group["lr"]
        lr = lr.item() if isinstance(lr, Tensor) else lr  # AdamW converts a tensor lr to a scalar the same way
        for p, rows in zip(group["params"], group["row_masks"]):
            if p.grad is None:
                continue
            decayed = p.mul(1 - lr * group["row_weight_decay"])  # exactly AdamW's `param.mul_(1 - lr * wd)`
            p.copy_(torch.where(rows.to(p.device), decayed, p))  # frozen rows keep their exact bits


# ----------------------------------------------------------------------------- CLI
def read_stats(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(stats, metadata) from a saliency file; read directly so this file does not depend on saliency.py."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def main(argv=None):
    p = argparse.ArgumentParser(description="Build LongAct row masks from q/k saliency statistics.")
    p.add_argument("stats", help="safetensors file written by saliency.py (one (C,) statistic per q/k module)")
    p.add_argument("--ratio", type=float, default=0.3, help="share of rows kept trainable (paper: 0.3)")
    p.add_argument("--strategy", choices=STRATEGIES, default="topk", help="topk = LongAct; others are ablations")
    p.add_argument("--per-head", action="store_true", help="keep the top share within each head")
    p.add_argument("--head-dim", type=int, default=None, help="head dim for --per-head (default: file metadata)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    p.add_argument("--out", default=None, help="write the masks here (safetensors)")
    args = p.parse_args(argv)

    stats, meta = read_stats(args.stats)
    head_dim = args.head_dim or (int(meta["head_dim"]) if "head_dim" in meta else None)
    masks = build_masks(stats, args.ratio, args.strategy, args.per_head, head_dim, args.seed)
    print(f"{len(masks)} matrices from {args.stats} (model {meta.get('model', '?')}, stat {meta.get('stat', '?')}); "
          f"strategy {args.strategy}, ratio {args.ratio}, per_head {args.per_head}")
    print(format_summary(*mask_summary(masks, stats)))
    if args.out:
        save_masks(args.out, masks, {"model": meta.get("model", ""), "stat": meta.get("stat", ""),
                                     "source": str(args.stats), "ratio": args.ratio, "strategy": args.strategy,
                                     "per_head": args.per_head, "head_dim": head_dim, "seed": args.seed})
        print(f"wrote {args.out}")
    return masks


if __name__ == "__main__":
    main()
