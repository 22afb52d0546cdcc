"""
masking.py -- LongAct step 2: from query/key statistics to the weight rows RL may update.

Output channel c of `q_proj` is computed by row c of `q_proj.weight` (C, I), so "update the weights
behind the salient activations" is a row mask G per q/k matrix (SOURCES.md §1.3):

    grad W_Q <- grad W_Q * G_Q,    grad W_K <- grad W_K * G_K,

keeping round(0.3 * D) rows in every head; W_V, W_O and the MLPs train normally. Masks are built
once before RL or every step; strategies topk (LongAct), bottomk, random, all. Rows outside the
mask: AdamW's decay and momentum move rows whose gradient is zero, so "frozen" (default) copies
those rows of the parameter and of its same-shape optimizer state out, steps, and copies them back
(bit-identical); "grad" masks only the gradient, the formula as written. `apply_train_scope`
decides which weights train at all. Choices: SOURCES.md §9.5-9.9.

Each training step (train.py):
    masks = build_masks(stats, ratio=0.3, head_dim=D, seed=mix_seed(run_seed, step))
    optimizer.zero_grad(); for each micro-batch: (loss / n).backward()
    mask_grads(model, masks)                    # the masked gradient of the paper
    clip_grad_norm_(model.parameters(), 1.0)    # the norm sees zeros outside the mask
    drift = masked_step(optimizer, model, masks, "frozen")   # max |delta| outside the mask
A trainer that calls optimizer.step() itself: hold_rows before it, put_back_rows after it.

Shapes: H heads, D head dim, C = H*D output channels (rows) of one q/k matrix, I input features.
Run:  python masking.py qk_stats.safetensors --ratio 0.3 --strategy topk [--out masks.safetensors]
"""

import argparse
import re

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from plumbing.common import QK_SUFFIXES, atomic_path, load_stats_file, mix_seed, natural_key

# -----------------------------------------------------------------------------
STRATEGIES = ("topk", "bottomk", "random", "all")  # the choice list; topk is LongAct
SEMANTICS = ("frozen", "grad")  # what rows outside the mask do; frozen is the default
SCOPES = ("all", "qk")  # which weights train at all (§9.36); "all" is the paper's
DEFAULT_RATIO = 0.3  # LongAct's share of trainable rows (SOURCES.md §1.3)


# ------------------------------------------------------------------------ building masks (pure)
def select_rows(scores: Tensor, ratio: float, largest: bool = True,
                group: int | None = None) -> Tensor:
    """Bool mask keeping round(ratio * n) entries with the largest (smallest) scores per group of n.

    group=None: one group, the whole vector (n = C). group=D: C // D consecutive heads of n = D.
    Ties go to the lower index (stable sort). Example: [1, 5, 5, 0], ratio 0.5 -> [F, T, T, F].
    """
    C = scores.shape[0]
    n = C if group is None else group
    if C % n:
        raise ValueError(f"{C} channels do not split into heads of {n} (wrong head_dim?)")
    grouped = scores.reshape(C // n, n)  # (H, D), or (1, C) for the whole matrix
    k = round(ratio * n)  # Python round: half to even, e.g. 2.5 -> 2
    order = torch.sort(grouped, dim=1, descending=largest, stable=True).indices[:, :k]  # (H, k)
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(1, order, True)  # (H, D)
    return mask.reshape(C)  # (C,)


def build_masks(stats: dict[str, Tensor], ratio: float = DEFAULT_RATIO, strategy: str = "topk",
                per_head: bool = True, head_dim: int | None = None,
                seed: int = 0) -> dict[str, Tensor]:
    """One row mask (C,) bool per matrix: True = the row may be updated this step.

    stats: {module name: (C,) statistic per output channel} (saliency.py). strategy: one of
    STRATEGIES ("all" keeps every row and ignores ratio). per_head (default) needs head_dim.
    seed: only "random" uses it (train.py passes a per-step seed to redraw the rows every step).
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
            raise ValueError(f"{name}: statistics must have shape (out_features,), "
                             f"got {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError(f"{name}: statistics contain NaN/inf; recollect them")
        if strategy == "all":
            masks[name] = torch.ones_like(s, dtype=torch.bool)
            continue
        if strategy == "random":  # a random score per row, then the same selection as topk
            s = torch.rand(s.shape, generator=torch.Generator().manual_seed(mix_seed(seed, name)))
        group = head_dim if per_head else None
        masks[name] = select_rows(s, ratio, largest=strategy != "bottomk", group=group)
    return masks


# ----------------------------------------------------------------------------- summaries and files
def mask_summary(masks: dict[str, Tensor], stats: dict[str, Tensor] | None = None):
    """(per-layer shares, overall share of trainable q/k rows).

    per_layer: {layer prefix: {"q_proj": share of rows, "k_proj": ...}}; with stats also
    {"q_proj mass": share of the statistic's sum held by the kept rows, ...}. Overall share = kept
    rows / all rows (rows of q and k have the same length I).
    """
    per_layer: dict[str, dict[str, float]] = {}
    kept = total = 0
    for name, m in sorted(masks.items(), key=lambda kv: natural_key(kv[0])):
        prefix, proj = name.rsplit(".", 1) if "." in name else ("", name)
        row = per_layer.setdefault(prefix, {})
        row[proj] = m.float().mean().item()
        if stats is not None and name in stats:
            s = stats[name].float()  # (C,)
            row[proj + " mass"] = (s[m].sum() / s.sum().clamp_min(1e-30)).item()
        kept, total = kept + int(m.sum()), total + m.numel()
    return per_layer, kept / max(total, 1)


def format_summary(per_layer: dict[str, dict[str, float]], overall: float) -> str:
    """The summary as a text table, one line per layer (labelled by `layers.<i>` when present)."""
    names = {c for row in per_layer.values() for c in row}
    cols = sorted(names, key=lambda c: (c.endswith("mass"), not c.startswith("q"), c))  # q, k, mass
    lines = [f"{'layer':>10} " + " ".join(f"{c:>12}" for c in cols)]
    for prefix, row in per_layer.items():
        hit = re.search(r"layers\.(\d+)", prefix)
        label = hit.group(1) if hit else prefix[-10:]
        cells = (f"{row[c]:>12.3f}" if c in row else f"{'-':>12}" for c in cols)
        lines.append(f"{label:>10} " + " ".join(cells))
    if any(c.endswith("mass") for c in cols):
        lines.append("(<proj> = share of rows trainable; <proj> mass = share of the statistic's "
                     "sum in those rows)")
    lines.append(f"overall share of q/k rows trainable: {overall:.4f}")
    return "\n".join(lines)


def save_masks(path, masks: dict[str, Tensor], meta: dict | None = None) -> None:
    """Write masks to safetensors (bool stored as uint8) with string metadata, atomically."""
    tensors = {k: v.detach().to("cpu", torch.uint8).contiguous() for k, v in masks.items()}
    metadata = {"kind": "longact_row_masks", **{str(k): str(v) for k, v in (meta or {}).items()}}
    with atomic_path(path) as tmp:  # a reader never sees a half-written file
        save_file(tensors, tmp, metadata=metadata)


def load_masks(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(masks {name: (C,) bool}, metadata) from a file written by save_masks."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    masks = {}
    for name, t in load_file(str(path)).items():
        if t.dim() != 1 or (t.dtype != torch.bool and not ((t == 0) | (t == 1)).all()):
            raise ValueError(f"{path}: {name} is not a 0/1 row mask "
                             f"(shape {tuple(t.shape)}, dtype {t.dtype})")
        masks[name] = t.bool()
    return masks, meta


# ----------------------------------------------------------------------------- applying masks
def apply_train_scope(model: torch.nn.Module, scope: str = "all") -> int:
    """Which weights train at all; returns the number of trainable parameter elements.
    "all" (the paper): every weight, LongAct masking only the q/k rows. "qk": only the q/k
    projections' weights and biases, everything else frozen (`requires_grad=False`, so it gets
    no gradient, no optimizer state, no weight decay): then the q/k rows are the only thing that
    can learn, and which rows train is the whole question (SOURCES.md §9.36)."""
    if scope not in SCOPES:
        raise ValueError(f"train scope {scope!r}: expected one of {SCOPES}")
    for name, p in model.named_parameters():  # tied weights appear once
        module = name.rpartition(".")[0]
        p.requires_grad_(scope == "all" or module.endswith(QK_SUFFIXES))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_masks(model: torch.nn.Module, masks: dict[str, Tensor],
                require_all_qk: bool = True) -> None:
    """Raise ValueError naming the module and both shapes when masks do not fit the model.

    Each mask must be a 1-D bool tensor with one entry per row of its module's weight. With
    require_all_qk, every q_proj/k_proj must have a mask: a forgotten module would train fully.
    """
    modules = dict(model.named_modules())
    for name, m in masks.items():
        if name not in modules or getattr(modules[name], "weight", None) is None:
            raise ValueError(f"mask for {name!r}: the model has no such module with a weight "
                             f"(mask shape {tuple(m.shape)}); were the masks built for another "
                             "model?")
        weight = modules[name].weight
        if m.dtype != torch.bool or m.dim() != 1 or m.shape[0] != weight.shape[0]:
            raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)} and dtype {m.dtype}, "
                             f"but the module's weight has shape {tuple(weight.shape)}: expected a "
                             f"bool mask of shape ({weight.shape[0]},); were the masks built for "
                             "another model?")
    if require_all_qk:
        missing = [n for n in modules if n.endswith(QK_SUFFIXES) and n not in masks]
        if missing:
            raise ValueError(f"no mask for {len(missing)} q/k modules of the model, e.g. "
                             f"{missing[:3]}; they would be fully trained")


def masked_params(model: torch.nn.Module, masks: dict[str, Tensor]) -> list:
    """[(parameter name, parameter, (C,) bool rows on its device)] for each weight/bias that has
    rows outside its mask. Masks that keep every row ("all") are skipped: nothing to do there."""
    check_masks(model, masks, require_all_qk=False)
    out = []
    for name in sorted(masks):
        m = masks[name]
        if bool(m.all()):
            continue
        module = model.get_submodule(name)
        for pname in ("weight", "bias"):  # §9.7: bias row c follows weight row c
            p = getattr(module, pname, None)
            if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                out.append((f"{name}.{pname}", p, m.to(p.device)))
    return out


@torch.no_grad()
def mask_grads(model: torch.nn.Module, masks: dict[str, Tensor]) -> None:
    """grad W <- grad W * G for every masked q/k weight and bias: call after the last backward of
    the step and before clipping. Assigning zeros (not multiplying) is exact even for inf/NaN."""
    for _, p, rows in masked_params(model, masks):
        if p.grad is not None:
            p.grad[~rows] = 0.0  # (C, I) or (C,): whole rows outside the mask


def _state_keys(optimizer, p) -> list:
    """Keys of the optimizer's state tensors of p's shape (element-wise state, §9.8)."""
    state = optimizer.state.get(p, {})
    return [k for k, t in state.items() if torch.is_tensor(t) and t.shape == p.shape]


@torch.no_grad()
def masked_step(optimizer, model: torch.nn.Module, masks: dict[str, Tensor],
                semantics: str = "frozen") -> float:
    """optimizer.step() under a row mask; returns the max |delta| over rows outside the mask.

    "frozen": rows outside the mask come back bit-identical, in the parameter and in every
    same-shape optimizer state tensor. "grad": the plain step (after mask_grads). Both require the
    gradients to be masked already (mask_grads), so that clipping saw the masked gradient.
    """
    held = hold_rows(optimizer, model, masks, semantics)
    optimizer.step()
    return put_back_rows(optimizer, held, semantics)


@torch.no_grad()
def hold_rows(optimizer, model: torch.nn.Module, masks: dict[str, Tensor],
              semantics: str = "frozen") -> list:
    """masked_step's first half, before optimizer.step() (also for a trainer that calls the step
    itself): [(parameter, (C,) rows outside, their values, {state key: their values})]."""
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}; choose one of {SEMANTICS}")
    held = []
    for name, p, rows in masked_params(model, masks):
        out = ~rows  # (C,)
        if p.grad is not None and bool(p.grad[out].any()):
            raise ValueError(f"{name}: gradient rows outside the mask are not zero; "
                             "call mask_grads(model, masks) before clipping and masked_step")
        keys = _state_keys(optimizer, p) if semantics == "frozen" else []
        state = {k: optimizer.state[p][k][out] for k in keys}  # boolean indexing copies the rows
        held.append((p, out, p[out], state))
    return held


@torch.no_grad()
def put_back_rows(optimizer, held: list, semantics: str = "frozen") -> float:
    """masked_step's second half, after optimizer.step(): under "frozen" the held rows written
    back; returns the max |delta| over rows outside the mask."""
    drift = 0.0
    for p, out, before, state in held:
        if semantics == "frozen":
            p[out] = before  # index_put: whole rows back, bit for bit
            for k, rows in state.items():  # looked up again: the optimizer may have replaced them
                optimizer.state[p][k][out] = rows
        if out.any():
            drift = max(drift, (p[out].float() - before.float()).abs().max().item())
    return drift


# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    p = argparse.ArgumentParser(description="Build LongAct row masks from q/k statistics.")
    p.add_argument("stats", help="safetensors file from saliency.py (one (C,) statistic per q/k)")
    p.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="share of rows kept (0.3)")
    p.add_argument("--strategy", choices=STRATEGIES, default="topk", help="topk = LongAct")
    p.add_argument("--per-head", action=argparse.BooleanOptionalAction, default=True,
                   help="keep round(ratio * D) rows in every head (default) or per whole matrix")
    p.add_argument("--head-dim", type=int, default=None, help="default: the file's metadata")
    p.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    p.add_argument("--out", default=None, help="write the masks here (safetensors)")
    args = p.parse_args(argv)

    stats, meta = load_stats_file(args.stats)
    head_dim = args.head_dim or (int(meta["head_dim"]) if "head_dim" in meta else None)
    if args.per_head and not head_dim:
        p.error(f"{args.stats} has no head_dim metadata: pass --head-dim or --no-per-head")
    masks = build_masks(stats, args.ratio, args.strategy, args.per_head, head_dim, args.seed)
    print(f"{len(masks)} matrices from {args.stats} (model {meta.get('model', '?')}, stat "
          f"{meta.get('stat', '?')}); strategy {args.strategy}, ratio {args.ratio}, "
          f"per_head {args.per_head}")
    print(format_summary(*mask_summary(masks, stats)))
    if args.out:
        save_masks(args.out, masks, {"model": meta.get("model", ""), "stat": meta.get("stat", ""),
                                     "source": str(args.stats), "ratio": args.ratio,
                                     "strategy": args.strategy, "per_head": args.per_head,
                                     "head_dim": head_dim, "seed": args.seed})
        print(f"wrote {args.out}")
    return masks


if __name__ == "__main__":
    main()
