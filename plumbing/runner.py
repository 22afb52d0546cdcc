"""
plumbing/runner.py -- a run's bookkeeping around train.py's algorithm box: the checks before
loading, the run's objects (policy, reference, optimizer) in one `Run`, a resume's state, the
evaluations and when they happen, the step line and metrics.jsonl, the guards, checkpoints and
the stop after Ctrl-C, the run's summary. train.main calls each with one named line; none of it
changes what LongAct computes.

    rows = check_before_loading(args)    # allocator, every data row, disk, memory, lengths
    run = setup(args)                    # seeds, precision, run folder, policy, reference, optim
    start(run, rows)                     # static mask saved, a resume's state, data, tracker
    evaluate_at(run, "before")           # RULER (and LongBench v2) unless --no-eval
    for step in steps(run): row = guarded(rl_step, run, step); log_step(run, row, step); ...
    end(run)                             # last checkpoint, "after" evaluations, summary files

Test: .venv/bin/python -m pytest -q tests/test_train.py tests/test_report.py
"""

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import evaluate
import masking
import saliency
from plumbing import (checkpoint, common, config, fsdp, optim, plan, policy, preflight, report,
                      timeplan)
from tasks.train_data import load_train_data, read_train_rows

# -----------------------------------------------------------------------------
# before and around the loop

def parse_and_check(p, argv, presets: dict, algorithms: dict):
    """train.parse_args: the layers (config.parse), every value checked against what can work,
    the plan's sizes for -1, the run's default name."""
    args = config.parse(p, argv, presets, algorithms)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    preflight.check_args(p, args)
    preflight.resolve_from_plan(args)
    args.run_name = args.run_name or (f"{args.algo}-{args.mask_strategy}-seed{args.seed}-"
                                      f"{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def check_before_loading(args) -> list:
    """Everything that can fail in seconds, before minutes of loading: the torch version, what
    comes from the hub, the allocator's setting (before CUDA starts), every training row, disk,
    memory, LongBench v2 and RULER lengths. Returns the training rows."""
    common.check_torch()
    preflight.check_sources(args)  # a hub out of reach: one line now, not retries, tracebacks
    args.alloc_conf = report.configure_allocator(args.device)
    rows = read_train_rows(args)
    preflight.preflight(args)
    return rows


def start(run, rows: list) -> None:
    """After the static mask: save it, put a resume's state back (optimizer, scheduler, RNG,
    evaluations, reference masks, time so far), load the training data, announce, open the
    tracker."""
    args, main_rank = run.args, fsdp.is_main()
    if main_rank and run.static_masks:
        masking.save_masks(run.folder / "masks.safetensors", run.static_masks, {"role": "static"})
    run.evals, run.masks_ref, earlier = (
        checkpoint.resume_state(run.folder, run.model, run.optimizer, run.scheduler, args)
        if args.resume else ({}, {"step0": None, "prev": None}, {}))
    run.t0 -= earlier.pop("total", 0.0)  # a resumed run counts its earlier part(s) too
    run.phases = {k: run.phases.get(k, 0.0) + earlier.get(k, 0.0)
                  for k in run.phases | earlier}
    run.data = load_train_data(args, run.tokenizer, rows)
    announce(run)
    run.reporter = report.open_reporter(args, run.folder) if main_rank else None
    run.saved = run.start if args.resume else -1


def steps(run):
    """The steps left, with a progress bar on the main rank."""
    return tqdm(range(run.start, run.args.steps), desc="RL steps", initial=run.start,
                total=run.args.steps, dynamic_ncols=True, disable=not fsdp.is_main())


def evaluate_at(run, name: str) -> None:
    """The named evaluation where the run has one: "before" (unless eval.json already holds it),
    or "after" (with the validation set first when --val-samples)."""
    args = run.args
    if not args.eval:
        return
    if name == "before" and "before" not in run.evals:  # every rank (forwards are collective)
        evaluation(run, run.evals, run.phases, "before", "eval before", run.start)
    if name == "after":
        if args.val_samples:  # before "after": a run with "after" in eval.json is finished
            evaluation(run, run.evals, run.phases, "after_val", "eval validation", args.steps,
                       seed=args.val_seed, samples=args.val_samples, longbench=False)
        evaluation(run, run.evals, run.phases, "after", "eval after", args.steps)
        if fsdp.is_main():
            print(evaluate.format_before_after(run.evals["before"], run.evals["after"]))


def evaluate_during(run, step: int) -> None:
    """Every --eval-every steps, except at the end (the "after" evaluation)."""
    a = run.args
    if a.eval and a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
        evaluation(run, run.evals, run.phases, f"step{step + 1}", "eval during", step + 1)


def save(run, step: int) -> None:
    common.timed(run.phases, "checkpoint", checkpoint.save_run, run, step,
                 run.phases | {"total": time.time() - run.t0})
    run.saved = step


def save_or_stop(run, step: int, stop) -> None:
    """A checkpoint every --save-every steps, and one when Ctrl-C asked the run to stop (every
    rank agrees): then the run ends, non-zero, with the command that resumes it."""
    stopping = bool(fsdp.reduce_numbers([int(stop.set)], "max")[0])
    if stopping or (run.args.save_every and (step + 1) % run.args.save_every == 0):
        save(run, step + 1)
    if stopping:
        if run.reporter:
            run.reporter.close()
        raise SystemExit(f"stopped after step {step + 1} of {run.args.steps} (signal); "
                         f"resume with: python train.py --resume {run.folder}")


def end(run) -> None:
    """The last step's checkpoint (unless the loop just wrote it), the policy as a plain Hugging
    Face folder under --fsdp, the "after" evaluations, the run's summary files."""
    if run.args.save_final and run.saved != run.args.steps:
        save(run, run.args.steps)
    if run.args.fsdp:  # a plain Hugging Face folder of the trained policy, for evaluation
        fsdp.export_hf(run.model, run.tokenizer, run.folder / "final")
    evaluate_at(run, "after")
    finish(run, run.phases, run.t0)


def guard_update(stats: list, grad_norm: float, args) -> None:
    """Before an optimizer step: report.check_update on the mini-batch's loss, the global
    gradient norm and the step's mean KL (loss and KL summed over ranks under --fsdp, so every
    rank decides alike); raises report.RunStopped."""
    loss, (kl_sum, tokens) = sum(s["loss"] for s in stats), report.step_mean_kl(stats)
    if args.fsdp:
        loss, kl_sum, tokens = fsdp.reduce_numbers([loss, kl_sum, float(tokens)], "sum")
    report.check_update(loss, grad_norm, kl_sum / max(tokens, 1), args)


def uses_static_mask(args) -> bool:
    """A static mask is built only where something uses it: the static schedule, or the logged
    overlap of step 0's mask with it (--static-overlap)."""
    return args.mask_schedule == "static" or args.static_overlap


def statistics(run, calibrate) -> dict | None:
    """[LongAct] the calibration statistics, timed: from a --stats file, from a resumed run's
    folder, or calibrate(run) (saved there as qk_stats.safetensors); None for a strategy that
    reads none (random, all)."""
    args, path = run.args, run.folder / "qk_stats.safetensors"
    t = time.time()
    if args.mask_strategy not in ("topk", "bottomk"):
        return None
    if args.stats:
        stats = saliency.load_stats(args.stats, run.model)[0]
    elif args.resume and path.exists():
        stats = saliency.load_stats(path, run.model)[0]
    else:
        stats = calibrate(run)
        meta = {"model": args.model, "stat": args.stat, "num_samples": str(args.calib_samples),
                "seq_len": str(args.calib_len),
                "head_dim": str(common.head_dim_of(run.model.config))}
        if fsdp.is_main():
            saliency.save_stats(path, stats, meta)
    run.phases["statistics"] = run.phases.get("statistics", 0.0) + time.time() - t
    return stats


def log_samples(run, step: int, r, samples: list, scores) -> None:
    """Two completions per step (the first and the last row) into samples.jsonl."""
    G = r.group_size
    for i in (0, len(r.texts) - 1) if fsdp.is_main() else ():
        common.append_jsonl(run.folder / "samples.jsonl", {
            "step": step, "row": i, "references": samples[i // G].references,
            "score": float(scores[i]), "completion": r.texts[i]})


# -----------------------------------------------------------------------------
# the run's objects, evaluations, logging, the end

def yarn_of(args) -> dict:
    """load_policy's YaRN arguments (SOURCES.md §9.50)."""
    return {"yarn": args.yarn, "yarn_original": args.yarn_original}


def reference_model(args):
    """GRPO's KL reference: the initial policy, frozen (§9.15). fp32 on a CPU, so the KL is
    exactly 0 before the first update; bf16 on a GPU, where it only runs forwards under bf16
    autocast anyway and halves its memory (8 GB instead of 16 GB for Qwen3-4B): there the step-0
    KL is small but not exactly 0 (norms and residuals round differently)."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    ref, _ = policy.load_policy(args.model, dtype=dtype, hub_kernels=args.hub_kernels,
                                 device="cpu" if args.fsdp else args.device, **yarn_of(args))
    ref.eval().requires_grad_(False)
    return fsdp.shard_policy(ref) if args.fsdp else ref



def run_eval(run, seed: int = 0, samples: int = 0, longbench: bool = True) -> tuple:
    """RULER at the given lengths on held-out seeds (evaluation seed `seed`, `samples` per cell,
    default --eval-samples); LongBench v2 with --longbench. Returns ({"task@length": score in
    percent}, per-item rows: evaluate.item_rows)."""
    args, model, tokenizer = run.args, run.model, run.tokenizer
    model.eval()
    with run.autocast():
        table, records = evaluate.evaluate_ruler(
            model, tokenizer, args.eval_tasks, args.eval_lengths, samples or args.eval_samples,
            seed=seed, batch=args.eval_batch, engine=args.engine)
        out = {f"{t}@{n}": s for t, row in table["scores"].items() for n, s in row.items()}
        out.update({f"ruler_avg@{n}": s for n, s in table["average"].items()})
        if args.longbench and longbench:
            items = preflight.longbench_items(args)  # loaded and validated before the model
            lb, lb_records = evaluate.evaluate_longbench(model, tokenizer, items,
                                                         max_len=args.longbench_max_len,
                                                         thinking=args.thinking,
                                                         engine=args.engine)
            out.update({f"longbench_v2/{k}": v for k, v in lb.items()
                        if isinstance(v, (int, float))})
            records += lb_records
    return out, evaluate.item_rows(records)


def evaluation(run, evals: dict, phases: dict, name: str, phase: str, step: int, **kw) -> None:
    """One named evaluation: its scores into eval.json (and the tracker), its items into
    items/<name>.jsonl; its time kept for the run's ETA."""
    fn, t = (before_eval if name == "before" else run_eval), time.time()
    with report.phase_memory(run.args.device, run.peaks, "evaluation"):
        evals[name], items = common.timed(phases, phase, fn, run, **kw)
    if time.time() - t > 1.0 and not kw:  # a full evaluation, not one read from a file
        run.eval_seconds = time.time() - t
    write_evals(run.folder, evals)
    if fsdp.is_main():
        common.write_text_atomic(run.folder / "items" / f"{name}.jsonl",
                                 "".join(json.dumps(r) + "\n" for r in items))
        if run.reporter:
            run.reporter.log(report.tracker_metrics(evals[name], f"eval/{name}/"), step)


EVAL_ADDED_LATER = {"longbench_max_len": 120000, "yarn": 0.0}  # what older files had


def eval_settings(args) -> dict:
    return {k: getattr(args, k) for k in ("model", "eval_tasks", "eval_lengths", "eval_samples",
                                          "longbench", "thinking", "precision_used",
                                          *EVAL_ADDED_LATER)}


def before_eval(run) -> dict:
    """The 'before' evaluation, shared through --before-eval by runs that start from one model
    (an A/B grid computes it once). A file made with other settings is refused."""
    args = run.args
    path = Path(args.before_eval) if args.before_eval else None
    if path is not None and path.exists():
        saved = common.read_json(path)
        if (EVAL_ADDED_LATER | saved["settings"]) != eval_settings(args):
            raise SystemExit(f"{path}: made with other evaluation settings {saved['settings']}; "
                             f"this run has {eval_settings(args)}")
        return saved["scores"], saved.get("items", [])  # files made before items: none
    scores, items = run_eval(run)
    if path is not None and fsdp.is_main():
        common.write_json_atomic(path, {"settings": eval_settings(args), "scores": scores,
                                        "versions": common.versions(), "items": items})
    return scores, items


STEP_LINE = ("step {step:4d} | reward {reward:.3f} acc {acc:.3f} len {len:5.1f} trunc "
             "{frac_truncated:.2f} eq-groups {frac_all_equal:.2f} | loss {loss:+.4f} clip "
             "{clip_frac_low:.3f}/{clip_frac_high:.3f} kl {kl:.4f} (max {kl_max:.2f}) gnorm "
             "{grad_norm:.3f} lr {lr:.1e} | qk {qk_trainable:.2f} J-prev {mask_jaccard_prev:.2f} "
             "J-0 {mask_jaccard_step0:.2f} | t sample {t_sample:.1f}s update {t_update:.1f}s")
UPDATE_KEYS = dict.fromkeys(("loss", "clip_frac_low", "clip_frac_high", "kl", "kl_max",
                             "grad_norm", "lr"), 0.0)  # 0 on a step that did not update


def log_step(run, row: dict | None, step: int) -> None:
    """One line per step on stdout (with the whole run's ETA), the same as JSON in
    metrics.jsonl and, with --report-to, in the tracker. Under --fsdp the numbers are averaged
    over ranks (each describes its share), the largest KL is the largest. None: no update."""
    if row is None:
        return
    row, eta = row | {"elapsed": time.time() - run.t0}, run_eta(run, step)
    if run.args.fsdp:
        kl_max = fsdp.reduce_numbers([row.get("kl_max", 0.0)], "max")[0]
        row = fsdp.mean_over_ranks(row) | {"kl_max": kl_max, "step": row["step"]}
    if not fsdp.is_main():
        return
    tqdm.write(STEP_LINE.format_map(UPDATE_KEYS | row) + " | "
               + report.format_eta(eta))
    common.append_jsonl(run.folder / "metrics.jsonl", row)
    if run.reporter:
        run.reporter.log(report.tracker_metrics(row), row["step"])


def run_eta(run, step: int) -> float | None:
    """Seconds left after `step`: the steps at their measured mean, and every evaluation left
    (the ones during training, the validation set in proportion, the last) at the measured
    time of one."""
    a = run.args
    evals = 0.0
    if a.eval:
        evals = 1 + a.val_samples / a.eval_samples + (sum(
            1 for k in range(step + 1, a.steps) if k % a.eval_every == 0) if a.eval_every else 0)
    return report.eta_seconds(run.step_seconds, a.steps - step - 1, evals, run.eval_seconds)



@dataclass
class Run:
    """The run's long-lived objects, passed around as one piece of plain data (no trainer
    class): what every phase of the algorithm box reads."""
    args: argparse.Namespace
    folder: Path
    start: int  # the first step to run (> 0 on a resume)
    model: torch.nn.Module
    tokenizer: object
    ref_model: torch.nn.Module | None  # GRPO's KL reference (beta > 0), else None
    optimizer: torch.optim.Optimizer
    scheduler: object
    autocast: Callable  # () -> the context manager of the run's precision
    data: list | None = None  # training samples of --train-data (None: the builtin task)
    static_masks: dict = field(default_factory=dict)  # [LongAct] from calibration text
    masks_ref: dict = field(default_factory=dict)  # step 0's and the previous step's masks
    reporter: object = None  # report.Reporter with --report-to (main rank), else None
    step_seconds: list = field(default_factory=list)  # wall time of each step run here (ETA)
    eval_seconds: float | None = None  # of the last full evaluation run here (ETA)
    peaks: dict = field(default_factory=dict)  # CUDA: {phase: peak GB} (memory.json)
    phases: dict = field(default_factory=dict)  # wall seconds per phase (phases.json)
    t0: float = 0.0  # when the run's phases began (earlier parts of a resumed run counted)
    evals: dict = field(default_factory=dict)  # {name: scores} (eval.json)
    saved: int = -1  # the step of the newest checkpoint on disk (-1: none)


def setup(args) -> Run:
    """Threads, seeds, precision, run folder, policy (sharded with --fsdp), reference, optim."""
    if args.fsdp:
        args.device = fsdp.init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    precision, why = common.choose_precision(args.precision, args.device)
    args.precision_used, args.precision_reason = precision, why
    run_dir, start = fsdp.from_main(checkpoint.prepare_run(args) if fsdp.is_main() else None)
    if fsdp.is_main():
        print(f"precision: {precision} ({why})", flush=True)
    model, tokenizer = load_model(args, run_dir)
    ref_model = reference_model(args) if args.algo == "grpo" and args.beta > 0 else None
    optimizer, scheduler = optim.make_optimizer(model, args)
    autocast = lambda: common.autocast(args.device, precision)  # noqa: E731
    return Run(args, run_dir, start, model, tokenizer, ref_model, optimizer, scheduler, autocast,
               t0=time.time())


def load_model(args, run_dir: Path):
    """The policy: from the checkpoint's HF folder on resume; under --fsdp from --model on the CPU,
    then sharded (a resume loads the shards later, resume_state)."""
    dtype = torch.bfloat16 if args.optimizer == "bf16-sr" else torch.float32
    if args.fsdp:
        model, tokenizer = policy.load_policy(args.model, dtype=dtype, device="cpu",
                                              hub_kernels=args.hub_kernels, **yarn_of(args))
    else:
        source = str(checkpoint.checkpoint_dir(run_dir)) if args.resume else args.model
        model, tokenizer = policy.load_policy(source, dtype=dtype, device=args.device,
                                              hub_kernels=args.hub_kernels, **yarn_of(args))
    masking.apply_train_scope(model, args.train_scope)  # before the optimizer sees the params
    if args.grad_checkpointing:  # before sharding (plumbing/fsdp.py)
        model.activation_checkpointing_enable({"use_reentrant": False})
    return (fsdp.shard_policy(model) if args.fsdp else model), tokenizer



def guarded(rl_step, run, step: int) -> dict | None:
    """rl_step(run, step), timed; an update the guards refuse (report.check_update) ends the run
    with one line naming the step and the checkpoint to resume from (SOURCES.md §9.47)."""
    t = time.time()
    try:
        row = common.timed(run.phases, "training", rl_step, run, step)
    except report.RunStopped as e:
        if run.reporter:
            run.reporter.close()
        raise SystemExit(report.stop_line(step, str(e), run.folder,
                                          run.saved if run.saved >= 0 else None)) from None
    run.step_seconds.append(time.time() - t)
    return row


def announce(run) -> None:
    """The plan's sizing reasons and the run's one-line summary (main rank)."""
    if not fsdp.is_main():
        return
    a = run.args
    for flag, why in a.plan_reasons.items():
        print(f"--{flag.replace('_', '-')} {why}")
    print(f"run {run.folder} | {a.algo} | mask {a.mask_strategy} ({a.mask_schedule}, "
          f"{a.mask_semantics}) ratio {a.ratio}, trains {a.train_scope} | B={a.prompts_per_step} "
          f"G={a.group_size} | steps {run.start}..{a.steps}", flush=True)


def qk_change(run) -> dict:
    """How far the q/k projections moved from the initial policy (the KL reference): the L2 norm
    of the change over every q/k weight, and of the initial weights. A yardstick of step size
    beside the KL ({} without a reference, or under --fsdp; SOURCES.md §9.45)."""
    if run.ref_model is None or run.args.fsdp:
        return {}
    now, ref = common.qk_modules(run.model), common.qk_modules(run.ref_model)
    with torch.no_grad():
        moved = sum(float((now[n].weight.float() - ref[n].weight.float()).pow(2).sum())
                    for n in now)
        size = sum(float(ref[n].weight.float().pow(2).sum()) for n in ref)
    return {"qk_change_l2": math.sqrt(moved), "qk_weight_l2": math.sqrt(size),
            "qk_rel_change": math.sqrt(moved / size)}


def finish(run, phases: dict, t0: float) -> None:
    phases["total"] = time.time() - t0
    if run.reporter:
        run.reporter.close()
    if fsdp.is_main():
        common.write_json_atomic(run.folder / "phases.json", phases)
        change = qk_change(run)
        if change:
            common.write_json_atomic(run.folder / "qk_change.json", change)
        if run.peaks:  # CUDA: each phase's measured peak beside the plan's
            planned = plan.memory_peaks(plan.plan_for_args(run.args))
            memory = report.memory_report(run.peaks, planned, run.args.device)
            common.write_json_atomic(run.folder / "memory.json", memory)
            print("peak memory per phase, measured / planned (GB): " + ", ".join(
                f"{k} {v['measured_gb']:.1f} / {v['planned_gb'] or 0:.1f}"
                for k, v in memory["phases"].items()))
        print("wall time per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
        print(pointers(run))


def pointers(run) -> str:
    """The run's last lines: where everything it kept is, and the command that draws it."""
    a, f = run.args, run.folder
    ckpt = f / "ckpt" if (f / "ckpt").exists() else None
    lines = [f"run folder {f} (metrics.jsonl, eval.json, samples.jsonl, config.json)",
             f"picture:   python -m experiments.curves {f}",
             f"weights:   {ckpt} (and the optimizer state: --resume continues from it)" if ckpt
             else "weights:   not kept (--save-final keeps them, --save-every N as it goes)"]
    if a.report_to == "tensorboard":
        lines.append(f"live logs: tensorboard --logdir {f / 'tensorboard'}")
    elif a.report_to == "wandb":
        lines.append(f"live logs: {f / 'wandb'} (offline unless WANDB_MODE; wandb sync uploads)")
    return "\n".join(lines)


def write_evals(run_dir: Path, evals: dict) -> None:
    if fsdp.is_main():
        common.write_json_atomic(run_dir / "eval.json", evals)


def show_config_or_plan(args):
    """--show-config: every effective setting; --plan: the memory plan of this run
    (plumbing/plan.py)."""
    for flag, why in getattr(args, "plan_reasons", {}).items():
        print(f"--{flag.replace('_', '-')} {why}")
    if args.plan:
        plan.print_plan(args)
        return timeplan.print_time_plan(args)
    width = max(map(len, vars(args)))
    for k, v in sorted(vars(args).items()):
        print(f"{k:<{width}}  {v}")
    return None


