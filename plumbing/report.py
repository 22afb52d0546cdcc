"""
report.py -- watching a long run: live metrics in TensorBoard or Weights & Biases, the whole
run's ETA, and the guards that stop a run gone wrong with one line that says where to resume.

    reporter = open_reporter(args, run_dir)   # None (default), TensorBoard or wandb (optional)
    reporter.log(row, step)                   # every metrics.jsonl row and every evaluation
    check_update(loss, grad_norm, kl_mean, args)  # raises RunStopped BEFORE the optimizer step
    eta_seconds(step_seconds, steps_left, evals_left, eval_seconds)
    with phase_memory(device, peaks, "sampling"): ...   # CUDA: cached blocks released first,
                                                        # the phase's peak allocation kept
    summarize_update(stats, norms, drift, lr, mu)       # one update's metrics row
    mask_dynamics(masks, refs, static_masks)            # [LongAct] how much the masks change

Names: where a quantity is the one TRL's GRPOTrainer logs (reward, reward_std, kl, clip ratios,
completion lengths, ...), a tracker gets TRL's name, so dashboards of the two compare;
metrics.jsonl keeps this repository's keys, and LongAct's own metrics (mask overlap, drift
outside the mask) keep theirs. wandb runs offline unless WANDB_MODE says otherwise (a GPU node
often has no network; `wandb sync` uploads later). Choices: SOURCES.md §9.47.

Test: .venv/bin/python -m pytest -q tests/test_report.py
"""

import importlib
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from plumbing import startup

GB = 1e9  # decimal, as plan.py
# this repository's metric -> TRL's name for the same quantity (trl/trainer/grpo_trainer.py)
TRL_NAMES = {"reward": "reward", "reward_std": "reward_std", "kl": "kl", "loss": "loss",
             "grad_norm": "grad_norm", "lr": "learning_rate",
             "clip_frac_low": "clip_ratio/low_mean", "clip_frac_high": "clip_ratio/high_mean",
             "len": "completions/mean_length", "frac_truncated": "completions/clipped_ratio",
             "frac_all_equal": "frac_reward_zero_std"}
REPORTERS = ("none", "tensorboard", "wandb")


class RunStopped(Exception):
    """An update that must not be applied: the run stops before the optimizer step."""


def tracker_metrics(row: dict, prefix: str = "") -> dict:
    """The numbers of a metrics row (or an evaluation) under the tracker's names."""
    return {prefix + TRL_NAMES.get(k, k): float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Reporter:
    """One tracker behind two calls. `writer` is a TensorBoard SummaryWriter or a wandb run."""

    def __init__(self, kind: str, writer):
        self.kind, self.writer = kind, writer

    def log(self, metrics: dict, step: int) -> None:
        if self.kind == "tensorboard":
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        else:
            self.writer.log(metrics, step=step)

    def close(self) -> None:
        (self.writer.close if self.kind == "tensorboard" else self.writer.finish)()


def import_tracker(kind: str):
    """The tracker's module, or SystemExit with one line saying how to install it."""
    name = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}[kind]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        package = "tensorboard" if kind == "tensorboard" else "wandb"
        raise SystemExit(f"--report-to {kind}: {e}; install it with `pip install {package}` "
                         "(optional, not in the lock)") from None


def open_reporter(args, run_dir: Path) -> Reporter | None:
    """None for --report-to none. A resumed run continues the same wandb run (its id is kept in
    the run folder) and the same TensorBoard folder."""
    if args.report_to == "none":
        return None
    module = import_tracker(args.report_to)
    if args.report_to == "tensorboard":
        return Reporter("tensorboard", module.SummaryWriter(log_dir=str(run_dir / "tensorboard")))
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else module.util.generate_id()
    id_file.write_text(run_id + "\n")
    run = module.init(project=args.wandb_project, name=run_dir.name, id=run_id, resume="allow",
                      dir=str(run_dir), config=vars(args),
                      mode=os.environ.get("WANDB_MODE", "offline"))
    return Reporter("wandb", run)


KL_STOP = 5.0  # nats: the step's mean k3 KL above which a run stops (SOURCES.md §9.56)


def step_mean_kl(stats: list) -> tuple:
    """(sum of token k3, tokens) of one optimizer step's micro-batches: the step's mean KL to the
    reference is their ratio (summed over ranks under FSDP before dividing)."""
    return (sum(s.get("kl", 0.0) * s["num_tokens"] for s in stats),
            sum(s["num_tokens"] for s in stats))


def check_update(loss: float, grad_norm: float, kl_mean: float, args) -> None:
    """Raise RunStopped for an update that would damage the weights: a non-finite loss or
    gradient, or a policy that has left the reference behind: the step's mean KL (the k3 the
    loss uses, clamped per token) past --kl-stop nats (0 = never). No per-token test: the
    largest token's KL grows with the tokens sampled, and a clamped token adds no gradient."""
    if not math.isfinite(loss):
        raise RunStopped(f"non-finite loss ({loss})")
    if not math.isfinite(grad_norm):
        raise RunStopped(f"non-finite gradient norm ({grad_norm})")
    if args.kl_stop and not kl_mean <= args.kl_stop:  # a NaN mean stops too
        raise RunStopped(f"the step's mean KL to the reference is {kl_mean:.3g} nats, past "
                         f"--kl-stop {args.kl_stop:g}")


def stop_line(step: int, reason: str, run_dir: Path, saved: int | None) -> str:
    """The one line a stopped run ends with: what, at which step, and where to resume (`saved`:
    the step of the newest checkpoint on disk, None when there is none)."""
    where = (f"resume from the checkpoint of step {saved} with `python train.py --resume "
             f"{run_dir} ...` (and, say, a smaller --lr)" if saved is not None else
             "no checkpoint was written yet: start again (say, with a smaller --lr)")
    return (f"stopped at step {step}: {reason}; this step's update was not applied. {where}. "
            f"Metrics so far: {run_dir / 'metrics.jsonl'}")


def eta_seconds(step_seconds: list, steps_left: int, evals_left: float,
                eval_seconds: float | None) -> float | None:
    """The rest of the run: the mean measured step times the steps left, plus the evaluations
    left at the measured time of one. Until an evaluation has been timed here, a negative number
    whose size is the steps' part alone: a lower bound (format_eta shows ">="). None before the
    first step."""
    if not step_seconds:
        return None
    steps = sum(step_seconds) / len(step_seconds) * steps_left
    if evals_left and eval_seconds is None:
        return -steps
    return steps + evals_left * (eval_seconds or 0.0)


def format_eta(seconds: float | None) -> str:
    """"eta 1h05m"; "eta >=12m" for a lower bound (evaluations not timed yet)."""
    if seconds is None:
        return "eta ?"
    h, m = divmod(int(round(abs(seconds) / 60)), 60)
    return f"eta {'>=' if seconds < 0 else ''}" + (f"{h}h{m:02d}m" if h else f"{m}m")


# -----------------------------------------------------------------------------
# memory between phases (CUDA only; a no-op elsewhere)

ALLOC_VARS = startup.ALLOC_VARS


def configure_allocator(device: str) -> str:
    """Expandable segments on CUDA, unless the user set the allocator's variable: memory freed by
    one phase (sampling's KV cache) is then reused by the next (the update's activations)
    instead of staying fragmented in fixed-size blocks. The entry points set it before torch
    loads (startup.py); this call covers code that imports train later. Returns the setting in
    force, as the run records it ("" off CUDA)."""
    if not device.startswith("cuda"):
        return ""
    startup.set_allocator()
    return startup.allocator_setting()


@contextmanager
def phase_memory(device: str, peaks: dict, name: str):
    """Around one phase on CUDA: release the cached blocks of the phase before, reset the peak
    counter, and keep the largest allocation seen in `peaks[name]` (GB, the max over the run's
    occurrences of the phase)."""
    if not str(device).startswith("cuda"):
        yield
        return
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        peak = torch.cuda.max_memory_allocated(device) / GB
        peaks[name] = max(peaks.get(name, 0.0), peak)


def memory_report(peaks: dict, planned: dict, device: str) -> dict:
    """memory.json: each phase's measured peak beside the plan's (the plan's update phase is the
    larger of its "update" and "step" rows: the optimizer step runs inside the measured update)."""
    planned = dict(planned, update=max(planned.get("update", 0.0), planned.get("step", 0.0)))
    total = torch.cuda.get_device_properties(device).total_memory / GB
    return {"device": torch.cuda.get_device_name(device), "total_gb": total,
            "phases": {k: {"measured_gb": v, "planned_gb": planned.get(k)}
                       for k, v in peaks.items()}}


# -----------------------------------------------------------------------------
# the metrics row of one update (train.py logs it): grpo.py's losses summed up, LongAct's masks


def summarize_update(stats: list, norms: list, drift: list, lr: float, mu: int) -> dict:
    """One update's metrics from its micro-batches' (token-weighted means; the largest KL and
    ratio deviation; the loss per optimizer step), the grad norms and the frozen-row drift."""
    w = [s.get("num_tokens", 1) for s in stats]  # token-weighted means of per-micro-batch metrics
    out = {k: sum(s[k] * wi for s, wi in zip(stats, w)) / max(1, sum(w)) for k in stats[0]
           if k not in ("num_tokens", "loss", "kl_max", "ratio_dev_max")
           and isinstance(stats[0][k], (int, float))}
    out["kl_max"] = max(s.get("kl_max", 0.0) for s in stats)
    out["ratio_dev_max"] = max(s["ratio_dev_max"] for s in stats)  # 0 when every step is on-policy
    out["loss"] = sum(s["loss"] for s in stats) / (mu * max(1, len(norms) // mu))
    out["grad_norm"], out["opt_steps"], out["lr"] = max(norms), len(norms), lr
    if drift:
        out["drift_outside_mask"] = max(drift)  # [LongAct] 0.0 exactly under `frozen`
    return out


def mask_overlap(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Jaccard |a & b| / |a | b| of two mask dicts, averaged over matrices (1.0 = the same rows).

    Example: {"q": [T, T, F, F]} vs {"q": [F, T, T, F]} -> 1 shared row of 3 -> 0.333.
    Two empty masks count as identical (1.0). Both dicts must name the same matrices.
    """
    if set(a) != set(b):
        raise ValueError(f"mask sets differ: only in the first {sorted(set(a) - set(b))[:3]}, "
                         f"only in the second {sorted(set(b) - set(a))[:3]}")
    if not a:
        raise ValueError("no masks to compare")
    scores = []
    for name in a:
        if a[name].shape != b[name].shape:
            raise ValueError(f"{name}: shapes {tuple(a[name].shape)} and {tuple(b[name].shape)}")
        union = int((a[name] | b[name]).sum())
        scores.append(1.0 if union == 0 else int((a[name] & b[name]).sum()) / union)
    return sum(scores) / len(scores)


def mask_dynamics(masks: dict, refs: dict, static_masks: dict) -> dict:
    """[LongAct] Jaccard overlap of this step's masks with the previous step's and step 0's, and of
    step 0's with the static calibration mask. Updates `refs` in place."""
    if refs.get("step0") is None:
        refs["step0"] = masks
    out = {"mask_jaccard_prev": (mask_overlap(masks, refs["prev"])
                                 if refs.get("prev") is not None else 1.0),
           "mask_jaccard_step0": mask_overlap(masks, refs["step0"])}
    if static_masks:  # built only where used (--mask-schedule static, --static-overlap)
        out["mask_jaccard_step0_static"] = mask_overlap(refs["step0"], static_masks)
    refs["prev"] = masks
    return out
