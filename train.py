"""
train.py -- LongAct end to end: (sample groups + q/k statistics -> masks -> score -> advantages ->
masked update)* -> evaluation. `main()` is the algorithm box.

    python train.py --algo grpo                     # the embedded default on a CPU (make demo)
    python train.py --algo dapo --mask-strategy all # the uniform-update baseline, under DAPO
    python train.py --preset paper                  # Qwen3-4B, 16k-token prompts, one large GPU
    python train.py --preset paper-8b --plan        # print the memory plan of Qwen3-8B and exit
    python train.py --show-config [--algo dapo]     # print every effective setting and exit

The algorithm box (LongAct, arXiv 2604.14922; SOURCES.md §1), as `main()` runs it, per RL step:
  1. sample     G completions for each of B long-context prompts; during the prompt prefill that
                sampling does anyway, hooks read every q_proj/k_proj output            rollout.py
  2. saliency   M[h, d] = mean over the step's prompts of the L2 norm over positions  saliency.py
  3. masks      keep the top 30% rows within each head of every W_Q, W_K               masking.py
  4. score      reward = the benchmark's own scorer on each completion                 evaluate.py
  5. update     advantages per group; GRPO or DAPO loss; backward; masked AdamW step
                                                                          grpo.py, dapo.py
                (rows outside this step's mask stay bit-identical; all other parameters train fully)
and RULER at the training length and at 2x it, before and after. Lines that make this LongAct rather
than plain GRPO/DAPO carry the tag `# [LongAct]`.

Choices (the paper's full text is not available to us; each is a flag; SOURCES.md §9):
  1. choice: masks are rebuilt every step from the step's own prompts (`--mask-schedule step`);
     under DAPO's dynamic sampling every prompt sampled in the step counts, kept or not (the mask
     describes the step's inputs). `static` = one mask from calibration text before RL.
  2. choice: training data = RULER's multi-key needle task generated from the shipped haystack with
     seeds disjoint from every evaluation seed; a local JSONL / hub dataset also works.
  3. choice: reward = the evaluation scorer itself (RULER's string_match_all), no format reward.
  4. choice: GRPO's KL reference is the initial policy; k3 clamped to [-10, 10] as verl does.
  5. choice: CPU defaults are scaled down to finish in minutes; `--preset paper` is the paper scale.
  6. choice: precision from the hardware (`--precision auto`): bf16 autocast only where the device
     computes bf16 natively, fp32 otherwise (common.choose_precision).

Outputs in --out-dir/RUN: config.json, qk_stats.safetensors (calibration), masks.safetensors (static
mask), metrics.jsonl (one line per step), samples.jsonl, eval.json, ckpt/ (weights, optimizer,
scheduler, RNG, step, config, the masks the mask-dynamics metrics compare against).
"""

import argparse
import json
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
import dapo
import evaluate
import flags
import fsdp
import grpo
import masking
import optim
import plan
import policy
import rollout
import saliency
import tasks
from tasks import haystack, longbench, ruler

# -----------------------------------------------------------------------------
# config: one block. The flags' defaults below are the CPU preset under GRPO. An algorithm or a
# preset changes the defaults listed in its table, nothing else; a flag given on the command line
# always wins. `--show-config` prints the result.

ALGORITHMS = {  # GRPO (DeepSeekMath; SOURCES.md §3) vs DAPO (arXiv 2503.14476; SOURCES.md §4)
    "grpo": dict(eps_high=0.2, beta=0.04, aggregation="seq-mean-token-mean", dynamic_sampling=False,
                 overlong_buffer=0.0, mini_batch_groups=0),
    # DAPO on the CPU: a soft buffer of the last quarter of the budget (8 of 32 tokens) at a quarter
    # of the recipe's factor, so that at step 0 (about a quarter of completions cut at 32 tokens)
    # the penalty stays well below the task reward;
    # 2 groups per optimizer step, so the second mini-batch sees ratios != 1 and clip-higher acts.
    "dapo": dict(eps_high=0.28, beta=0.0, aggregation="token-mean", dynamic_sampling=True,
                 overlong_buffer=0.25, overlong_factor=0.25, mini_batch_groups=2),
}
PRESETS = {
    "cpu": {},
    "paper": dict(model="Qwen/Qwen3-4B", train_len=16384, calib_len=16384, calib_samples=8,
                  prompts_per_step=32, group_size=8, max_new_tokens=1024, lr=1e-6, warmup_steps=10,
                  steps=200, weight_decay=0.1, grad_checkpointing=True, eval_lengths=[16384, 32768],
                  eval_samples=50, eval_every=50, longbench="hub", micro_groups=1, save_every=25,
                  max_gen_batches=10, gen_groups=-1, eval_batch=-1,  # -1: from the plan
                  # the recipe's buffer is a fifth (4096 of 20480 tokens); its 512 prompts in
                  # mini-batches of 32 are 16 optimizer steps per rollout batch: 32 prompts
                  # -> 2 per mini-batch.
                  dapo=dict(overlong_buffer=0.2, overlong_factor=1.0, mini_batch_groups=2)),
}
# Qwen3-8B fits one 141 GB GPU with bf16 weights and moments under stochastic rounding (optim.py);
# groups per generate call and evaluation batch from the plan (python train.py --preset paper-8b
# --plan; README, "The paper recipe on one GPU").
PRESETS["paper-8b"] = PRESETS["paper"] | dict(model="Qwen/Qwen3-8B", optimizer="bf16-sr")
# What a resumed run must share with the run it continues: else its masks, weights, optimizer state
# or schedule would not belong together. A resume that changes one of these is refused.
RESUME_KEYS = ("model", "mask_strategy", "mask_schedule", "mask_semantics", "ratio", "stat",
               "per_head", "stats", "calib_len", "calib_samples", "seed", "algo", "lr",
               "weight_decay", "beta", "group_size", "prompts_per_step", "mini_batch_groups",
               "micro_groups", "mu", "warmup_steps", "optimizer", "precision", "kl_clamp",
               "eps_high", "clip_eps", "aggregation")


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(description="LongAct RL: saliency-guided sparse q/k updates.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="a set of defaults")
    p.add_argument("--show-config", action="store_true", help="print the effective config, exit")
    p.add_argument("--plan", action="store_true",
                   help="print the memory, disk and time plan (plan.py), exit")
    p.add_argument("--gpu", default="h200", choices=sorted(plan.GPUS),
                   help="the GPU the plan sizes and times (the run itself uses --device)")
    p.add_argument("--force", action="store_true",
                   help="start even when the checks before loading say it will not fit")
    g = p.add_argument_group("model and precision")
    g.add_argument("--model", default=policy.DEFAULT_MODEL, help="embedded name, hub id or folder")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--precision", default="auto", choices=common.PRECISIONS,
                   help="auto: bf16 autocast where the device computes bf16 natively, else fp32")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "bf16-sr"],
                   help="adamw: fp32 weights and state; bf16-sr: bf16 weights, stochastic rounding")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute in backward")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the policy over torchrun's processes with FSDP2 (fsdp.py)")
    g.add_argument("--thinking", action="store_true",
                   help="Qwen3 thinking mode for LongBench v2 evaluation (training prompts: off)")
    g = p.add_argument_group("LongAct")
    g.add_argument("--mask-strategy", default="topk", choices=masking.STRATEGIES,
                   help="which q/k rows train: topk (LongAct), random/bottomk ablations, all")
    g.add_argument("--mask-schedule", default="step", choices=["step", "static"],
                   help="step: masks from each step's prompts; static: from calibration text once")
    g.add_argument("--mask-semantics", default="frozen", choices=masking.SEMANTICS,
                   help="frozen: rows outside the mask do not move at all; grad: masked gradient")
    g.add_argument("--ratio", type=float, default=0.3, help="share of rows per head that train")
    g.add_argument("--stat", default=saliency.STATS[0], choices=saliency.STATS, help="saliency")
    g.add_argument("--per-head", action=argparse.BooleanOptionalAction, default=True,
                   help="select within each head (else within each whole matrix)")
    g.add_argument("--stats", default=None, help="a saliency.py statistics file (static masks)")
    g.add_argument("--calib-len", type=int, default=1024, help="tokens per calibration prompt")
    g.add_argument("--calib-samples", type=int, default=8, help="number of calibration prompts")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algo", default="grpo", choices=sorted(ALGORITHMS))
    g.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
    g.add_argument("--clip-eps", type=float, default=0.2, help="lower clip epsilon")
    g.add_argument("--eps-high", type=float, default=0.2, help="upper clip epsilon (DAPO: 0.28)")
    g.add_argument("--beta", type=float, default=0.04, help="KL coefficient (GRPO 0.04, DAPO 0)")
    g.add_argument("--kl-clamp", type=float, default=10.0, help="clamp k3 to +-this (0 = off, TRL)")
    g.add_argument("--aggregation", default="seq-mean-token-mean", choices=grpo.AGGREGATIONS)
    g.add_argument("--adv-scale", default="group", choices=grpo.SCALES, help="advantage scale")
    g.add_argument("--mu", type=int, default=1, help="passes over each rollout batch (GRPO's mu)")
    g.add_argument("--mini-batch-groups", type=int, default=0,
                   help="groups per optimizer step (verl's ppo_mini_batch_size); 0 = all")
    g.add_argument("--dynamic-sampling", action=argparse.BooleanOptionalAction, default=False,
                   help="DAPO: keep only groups whose rewards differ")
    g.add_argument("--max-gen-batches", type=int, default=3, help="DAPO: generation batches bound")
    g.add_argument("--overlong-buffer", type=float, default=0.0,
                   help="DAPO soft buffer, as a share of --max-new-tokens (0 = off)")
    g.add_argument("--overlong-factor", type=float, default=1.0, help="DAPO penalty at max length")
    g.add_argument("--filter-truncated", action="store_true", help="drop truncated from the loss")
    g = p.add_argument_group("data")
    g.add_argument("--train-data", default="builtin", help="'builtin', a .jsonl file or a hub id")
    g.add_argument("--train-task", default="niah_multikey_1", help="builtin RULER training task")
    g.add_argument("--train-len", type=int, default=1024, help="prompt tokens for builtin tasks")
    g.add_argument("--field-map", default="", help="JSONL fields, e.g. context=doc,answer=ans")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompts-per-step", type=int, default=4, help="B prompts (groups) per step")
    g.add_argument("--gen-groups", type=int, default=0,
                   help="groups per generate call (0 = all B at once, -1 = the most the plan "
                        "fits on --gpu); bounds the KV cache")
    g.add_argument("--max-new-tokens", type=int, default=32, help="completion budget")
    g.add_argument("--engine", default="fast", choices=rollout.ENGINES,
                   help="fast: engine.py (cascade decoding); hf: transformers' generate, plain")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g = p.add_argument_group("optimiser")
    g.add_argument("--steps", type=int, default=8)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--warmup-steps", type=int, default=2, help="linear warm-up, then constant")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (DAPO recipe 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--micro-groups", type=int, default=1, help="groups per micro-batch")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-tasks", nargs="+", default=["niah_multikey_1", "niah_multikey_2"],
                   help="RULER tasks on held-out seeds: the trained task and a harder one")
    g.add_argument("--eval-lengths", type=int, nargs="+", default=[1024, 2048])
    g.add_argument("--eval-samples", type=int, default=12, help="samples per task and length")
    g.add_argument("--eval-batch", type=int, default=8,
                   help="greedy evaluation prompts per generate call (-1 = the most the plan "
                        "fits on --gpu with the training state resident)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = ends)")
    g.add_argument("--no-eval", dest="eval", action="store_false", help="skip evaluation")
    g.add_argument("--before-eval", default=None,
                   help="a JSON file with the 'before' evaluation of the same starting model "
                        "and evaluation settings: read if it exists, else computed and written")
    g.add_argument("--longbench", default=None, help="also LongBench v2: a file or 'hub'")
    g.add_argument("--longbench-max-len", type=int, default=120000, help="middle truncation")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--out-dir", default="runs")
    g.add_argument("--run-name", default=None, help="default: <algo>-<strategy>-seed<seed>-<time>")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = end)")
    g.add_argument("--keep-checkpoints", type=int, default=1,
                   help="checkpoints kept; older ones go only once the new one is complete")
    g.add_argument("--resume", default=None, help="a run folder to continue exactly")
    g.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None):
    """Flags over preset over algorithm over the parser's defaults; no value is filled in later."""
    p = build_parser()
    first, _ = p.parse_known_args(argv)
    preset = dict(PRESETS[first.preset])
    p.set_defaults(**ALGORITHMS[first.algo])  # the algorithm's settings ...
    p.set_defaults(**{k: v for k, v in preset.items() if k not in ALGORITHMS})  # ... the preset's
    p.set_defaults(**preset.get(first.algo, {}))  # ... and the preset's for this algorithm
    args = p.parse_args(argv)
    check_args(p, args)
    resolve_from_plan(args)
    args.run_name = args.run_name or (f"{args.algo}-{args.mask_strategy}-seed{args.seed}-"
                                      f"{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def check_args(p, args) -> None:
    """Every flag against what can work, before any weights, data or run folder (flags.py)."""
    flags.between(p, args, "ratio", 0, 1, low_open=True)
    flags.at_least(p, args, 1, "steps", "prompts_per_step", "max_new_tokens", "train_len",
                   "calib_samples", "eval_samples", "eval_lengths", "micro_groups", "mu",
                   "max_gen_batches", "keep_checkpoints", "longbench_max_len")
    flags.at_least(p, args, 0, "warmup_steps", "weight_decay", "beta", "kl_clamp", "eps_high",
                   "overlong_factor", "eval_every", "save_every", "threads", "mini_batch_groups")
    flags.at_least(p, args, -1, "gen_groups", "eval_batch")
    flags.at_least(p, args, 2, "calib_len")
    if args.group_size < 2:  # one completion is its own group mean: every advantage is 0
        p.error(f"--group-size {args.group_size}: must be >= 2 (group-relative advantages "
                "compare completions of one prompt)")
    for dest in ("lr", "grad_clip", "temperature"):
        if getattr(args, dest) <= 0:
            p.error(f"{flags.name(dest)} {getattr(args, dest)}: must be > 0")
    flags.between(p, args, "clip_eps", 0, 1, low_open=True, high_open=True)
    flags.between(p, args, "top_p", 0, 1, low_open=True)
    flags.between(p, args, "overlong_buffer", 0, 1, high_open=True)
    if args.eval_batch == 0:
        p.error("--eval-batch 0: must be >= 1, or -1 for the most the plan fits")
    if args.mini_batch_groups > args.prompts_per_step:
        p.error(f"--mini-batch-groups {args.mini_batch_groups}: more than the step's "
                f"--prompts-per-step {args.prompts_per_step} groups")
    if args.fsdp and (args.optimizer == "bf16-sr" or args.adv_scale == "batch"):
        p.error("--fsdp: tested with --optimizer adamw and per-group advantages only")
    if args.engine == "fast" and rollout.fast_engine is None:
        p.error("--engine fast: engine.py is missing; pass --engine hf")
    check_paths(p, args)


def check_paths(p, args) -> None:
    """Files that must exist, names that must be known, lengths within the model's window."""
    flags.local_or_hub(p, "model", args.model, "model folder")
    if args.train_data != "builtin":
        flags.local_or_hub(p, "train_data", args.train_data, "file")
    if args.longbench not in (None, "", "hub"):
        flags.existing(p, "longbench", args.longbench, "file")
    flags.existing(p, "stats", args.stats, "statistics file")
    if args.resume and not (Path(args.resume) / "config.json").exists():
        p.error(f"--resume {args.resume}: not a run folder (no config.json in it)")
    try:
        parse_field_map(args.field_map)
    except ValueError as e:
        p.error(f"--field-map {args.field_map}: {e}")
    flags.known(p, "train_task", args.train_task, ruler.RULER_TASKS)
    flags.known(p, "eval_tasks", args.eval_tasks, ruler.RULER_TASKS)
    window = flags.model_window(args.model)
    if args.train_data == "builtin":  # a RULER length: the task's answer budget included
        flags.within(p, "train_len", args.train_len, window, "a RULER length")
    else:  # prompts middle-truncated to --train-len, then the completion
        flags.within(p, "train_len", args.train_len + args.max_new_tokens, window,
                     f"{args.train_len} + --max-new-tokens {args.max_new_tokens}")
    for L in args.eval_lengths if args.eval else ():
        flags.within(p, "eval_lengths", L, window, "a RULER length (answer included)")


def resolve_from_plan(args) -> None:
    """--gen-groups / --eval-batch -1: the most that the plan fits on --gpu (pure arithmetic on
    the model's config, no weights); the reasons are kept in args for --show-config and --plan."""
    args.plan_reasons = {}
    for flag, field, most in (("gen_groups", "prompts_per_generate", args.prompts_per_step),
                              ("eval_batch", "eval_batch", args.eval_samples)):
        if getattr(args, flag) != -1:
            continue
        s = plan.settings_for_args(argparse.Namespace(**{**vars(args), "gen_groups": 1,
                                                         "eval_batch": 1}))
        n, why = plan.largest_fitting(plan.model_config(args.model), s, field, most)
        setattr(args, flag, n)
        args.plan_reasons[flag] = f"{n}: {why}"


# -----------------------------------------------------------------------------
# run folder, config, checkpoints and resume

def prepare_run(args) -> tuple[Path, int]:
    """Create (or with --resume check) the run folder and write config.json. Returns (folder, step
    to start at). A resume whose RESUME_KEYS differ from the saved run is refused with the list."""
    if not args.resume:
        run_dir = Path(args.out_dir) / args.run_name
        if (run_dir / "ckpt").exists() or (run_dir / "ckpt.old").exists():
            raise SystemExit(f"{run_dir} already holds a checkpoint; pass --resume {run_dir} "
                             "or another --run-name")
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl", "eval.json"):
            (run_dir / name).unlink(missing_ok=True)
        common.write_json_atomic(run_dir / "config.json", vars(args))
        return run_dir, 0
    run_dir = Path(args.resume)
    saved = json.loads((run_dir / "config.json").read_text())
    changed = {k: (saved.get(k), getattr(args, k)) for k in RESUME_KEYS
               if saved.get(k) != getattr(args, k)}
    if changed:
        raise SystemExit(f"refusing to resume {run_dir}: these settings differ from the saved run "
                         f"(saved -> now): {changed}. Start a new run or pass the same flags.")
    start = saved_step(checkpoint_dir(run_dir))
    for name in ("metrics.jsonl", "samples.jsonl"):  # rows a crash left past the checkpoint go
        drop_rows_from(run_dir / name, start)
    common.write_json_atomic(run_dir / "config.json", vars(args) | {"resumed_at": start})
    return run_dir, start


def drop_rows_from(path: Path, step: int) -> None:
    """Keep only the rows of steps before `step` (they will be logged again after the resume)."""
    if path.exists():
        rows = [r for r in common.read_jsonl(path) if r["step"] < step]
        common.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, scheduler, step: int, args,
                    masks_ref: dict) -> None:
    """weights + optimizer + scheduler + RNG + step + config + reference masks into ckpt/.

    Written to ckpt.tmp/, fsynced, then swapped in with renames: at every instant ckpt/ or
    ckpt.old/ is a complete checkpoint, so a kill while saving never loses the last good one.
    Under --fsdp every rank writes its shards (torch.distributed.checkpoint, fsdp.py)."""
    state = {"step": step, "scheduler": scheduler.state_dict(), "config": vars(args),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
             "masks_ref": masks_ref, "world": fsdp.world()}  # masks_ref: mask-dynamics metrics
    if args.fsdp:
        return fsdp.save_checkpoint(run_dir / "ckpt", model, optimizer, state)
    tmp, final, old = run_dir / "ckpt.tmp", run_dir / "ckpt", run_dir / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(state | {"optimizer": optimizer.state_dict()}, tmp / STATE_FILES[0])
    common.write_json_atomic(tmp / STEP_FILE, {"step": step})
    common.fsync_tree(tmp)
    if final.exists():  # the previous one: kept as ckpt-step<k>/ or, with only 1 kept, dropped
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)  # from here on ckpt/ is the new, complete checkpoint
    if old.exists() and args.keep_checkpoints > 1:
        old.rename(run_dir / f"ckpt-step{saved_step(old)}")
    shutil.rmtree(old, ignore_errors=True)
    for extra in older_checkpoints(run_dir)[:max(0, len(older_checkpoints(run_dir))
                                                 - (args.keep_checkpoints - 1))]:
        shutil.rmtree(extra)


STATE_FILES = ("trainer_state.pt", "extra.pt")  # one process / --fsdp (fsdp.save_checkpoint)
STEP_FILE = "step.json"  # {"step": k}: read without loading the (large) state file


def older_checkpoints(run_dir: Path) -> list:
    """The kept ckpt-step<k>/ folders, oldest first."""
    return sorted(run_dir.glob("ckpt-step*"), key=lambda p: int(p.name.removeprefix("ckpt-step")))


def saved_step(ckpt: Path) -> int:
    """The step a checkpoint folder holds, from its small step file (older ones: the state)."""
    if (ckpt / STEP_FILE).exists():
        return common.read_json(ckpt / STEP_FILE)["step"]
    return load_state_file(ckpt)["step"]


def checkpoint_dir(run_dir: Path) -> Path:
    for name in ("ckpt", "ckpt.old"):
        if any((run_dir / name / f).exists() for f in STATE_FILES):
            return run_dir / name
    raise SystemExit(f"no complete checkpoint in {run_dir} (looked for ckpt/ and ckpt.old/)")


def load_state_file(ckpt: Path) -> dict:
    path = next(ckpt / f for f in STATE_FILES if (ckpt / f).exists())
    # to the CPU first: optimizer.load_state_dict moves each state tensor to its parameter's
    # device, so a GPU never holds the file's copy next to the optimizer's
    return torch.load(path, weights_only=False, map_location="cpu")


def resume_state(run_dir: Path, model, optimizer, scheduler, args) -> tuple[dict, dict]:
    """Load optimizer, scheduler and RNG state (and, under --fsdp, the sharded weights); return
    (past evaluations, reference masks)."""
    ckpt = checkpoint_dir(run_dir)
    if args.fsdp:
        state = fsdp.load_checkpoint(ckpt, model, optimizer)
        if state["world"] != fsdp.world():
            raise SystemExit(f"{ckpt} was written by {state['world']} ranks; resume with as many")
    else:
        state = load_state_file(ckpt)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    evals = common.read_json(run_dir / "eval.json") if (run_dir / "eval.json").exists() else {}
    print(f"resuming {run_dir} at step {state['step']}")
    return evals, state["masks_ref"]


class StopFlag:
    """The first SIGINT/SIGTERM sets a flag: the loop finishes the step, saves and exits. A second
    one raises KeyboardInterrupt at once; the last good checkpoint stays intact (saves are atomic).
    A context manager: the previous handlers come back on exit."""
    def __enter__(self):
        self.set = False
        self.old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.old:
            signal.signal(s, self.handler)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt(f"second signal {signum}: stopping now")
        print(f"\nsignal {signum}: finishing this step, saving, then exiting "
              "(signal again to stop at once)", flush=True)
        self.set = True


# -----------------------------------------------------------------------------
# checks before any weights load: fail in seconds, not hours in

LONGBENCH_ITEMS = {}  # --longbench value -> its validated rows, loaded once by preflight


def longbench_items(args) -> list:
    if args.longbench not in LONGBENCH_ITEMS:
        LONGBENCH_ITEMS[args.longbench] = longbench.load_longbench(
            None if args.longbench == "hub" else args.longbench)
    return LONGBENCH_ITEMS[args.longbench]


def check_ruler_lengths(args) -> None:
    """One RULER sample of each task and length the run will build (the tokenizer only): a length
    below a task's smallest haystack fails here, naming the flag, not after the first phases."""
    cells = [("train_len", args.train_task, args.train_len)] if args.train_data == "builtin" \
        else []
    cells += [("eval_lengths", t, L) for t in args.eval_tasks for L in args.eval_lengths] \
        if args.eval else []
    tokenizer = policy.load_tokenizer(args.model) if cells else None
    for dest, task, length in cells:
        try:
            evaluate.ruler_sample(tokenizer, task, length, seed=0, index=0)
        except ValueError as e:
            flags.die(f"{flags.name(dest)} {length}: {e}")


def preflight(args) -> None:
    """Before the model loads: the disk holds the plan's checkpoint peak; on a GPU, the plan's
    largest phase fits its free memory (a failed check stops with the numbers; --force: go on
    anyway); then LongBench v2 loads and validates when asked for, and every RULER task and
    length the run builds has a sample."""
    rows = plan.plan(plan.model_config(policy.resolve_model_path(args.model)),
                     plan.settings_for_args(args))
    problems = []
    out = Path(args.out_dir).resolve()
    existing = next(p for p in (out, *out.parents) if p.exists())
    held = sum(f.stat().st_size for d in Path(args.resume or "/nonexistent").glob("ckpt*")
               for f in d.rglob("*") if f.is_file())  # a resumed run's checkpoints are on disk
    need, free = plan.peaks(rows)["disk"] * plan.GB - held, shutil.disk_usage(existing).free
    if need > free:
        problems.append(f"disk: checkpoints need {need / plan.GB:.1f} GB more (the plan's disk "
                        f"peak, --keep-checkpoints {args.keep_checkpoints}), {existing} has "
                        f"{free / plan.GB:.1f} GB free")
    if args.device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(args.device))
        phase, top = max(plan.memory_peaks(rows).items(), key=lambda kv: kv[1])
        if top * plan.GB > 0.95 * free:
            problems.append(f"memory: the plan's {phase} phase needs {top:.1f} GB, "
                            f"{args.device} has {free / plan.GB:.1f} GB free (lower "
                            "--gen-groups, --eval-batch or --prompts-per-step)")
    for problem in problems:
        print(f"preflight: {problem}" + ("; going on (--force)" if args.force else ""),
              file=sys.stderr)
    if problems and not args.force:
        raise SystemExit(2)
    if args.eval and args.longbench:
        print(f"LongBench v2: {len(longbench_items(args))} items, validated", flush=True)
    check_ruler_lengths(args)


# -----------------------------------------------------------------------------
# model, reference, optimizer

def reference_model(args):
    """GRPO's KL reference: the initial policy, frozen (choice 4). fp32 on a CPU, so the KL is
    exactly 0 before the first update; bf16 on a GPU, where it only runs forwards under bf16
    autocast anyway and halves its memory (8 GB instead of 16 GB for Qwen3-4B): there the step-0
    KL is small but not exactly 0 (norms and residuals round differently)."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    ref, _ = policy.load_policy(args.model, dtype=dtype,
                                 device="cpu" if args.fsdp else args.device)
    ref.eval().requires_grad_(False)
    return fsdp.shard_policy(ref) if args.fsdp else ref


def make_optimizer(model, args):
    """AdamW (fp32 state) or the bf16 stochastic-rounding AdamW (optim.py), and a linear warm-up.
    Masks act in masking.masked_step, so one param group with decay serves every matrix."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "bf16-sr":
        optimizer = optim.AdamWSR(params, lr=args.lr, weight_decay=args.weight_decay,
                                  seed=common.mix_seed(args.seed, "optimizer"))
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=args.weight_decay, foreach=False)
    warm = max(1, args.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    return optimizer, scheduler


# -----------------------------------------------------------------------------
# [LongAct] statistics -> masks

def calibration_stats(model, tokenizer, args, run_dir: Path, autocast) -> dict:
    """q/k statistics on long calibration text (or a --stats file): the static mask's source, and
    the reference the per-step masks are compared with. Saved in the run folder."""
    if args.stats:
        return saliency.load_stats(args.stats, model)[0]
    if args.resume and (run_dir / "qk_stats.safetensors").exists():
        return saliency.load_stats(run_dir / "qk_stats.safetensors", model)[0]
    prompts = haystack.calibration_prompts(tokenizer, args.calib_len, args.calib_samples,
                                           seed=args.seed)
    batches = [{"input_ids": torch.tensor([p], device=args.device)} for p in prompts]
    with autocast():
        stats = saliency.collect_qk_stats(model, batches, stat=args.stat)
    meta = {"model": args.model, "stat": args.stat, "num_samples": str(len(prompts)),
            "seq_len": str(args.calib_len), "head_dim": str(saliency.head_dim_of(model.config))}
    if fsdp.is_main():
        saliency.save_stats(run_dir / "qk_stats.safetensors", stats, meta)
    return stats


def masks_from(stats: dict | None, model, args, seed: int) -> dict:
    """[LongAct] row masks of every q/k matrix from statistics (None: for strategies without)."""
    if stats is None:
        stats = {n: torch.zeros(m.weight.shape[0]) for n, m in common.qk_modules(model).items()}
    return masking.build_masks(stats, ratio=args.ratio, strategy=args.mask_strategy,
                               per_head=args.per_head, head_dim=saliency.head_dim_of(model.config),
                               seed=seed)


def needs_step_stats(args) -> bool:
    return args.mask_schedule == "step" and args.mask_strategy in ("topk", "bottomk")


# -----------------------------------------------------------------------------
# training data: the builtin RULER-style task, or any dataset with context/question/answer fields

QA_TEMPLATE = ("Read the following text and answer the question.\n\n{context}\n\n"
               "Question: {question}")
DEFAULT_FIELDS = {"context": "context", "question": "question", "answer": "answer",
                  "choices": "choices"}


def parse_field_map(spec: str) -> dict:
    """'context=doc,answer=ans' -> the default mapping with those fields renamed."""
    fields = dict(DEFAULT_FIELDS)
    for part in filter(None, spec.split(",")):
        key, _, name = part.partition("=")
        if key not in fields or not name:
            raise ValueError(f"bad entry {part!r}; expected one of {sorted(fields)}=NAME")
        fields[key] = name
    return fields


def row_to_sample(row: dict, n: int, fields: dict, source: str, tokenizer, max_len: int):
    """A dataset row -> evaluate.Sample. Multiple choice (a choices list, or LongBench v2's
    choice_A..D) is scored by the letter; a free answer (a string or a list of acceptable strings)
    by RULER's string_match_part."""
    def need(key):
        if fields[key] not in row or row[fields[key]] in (None, ""):
            raise ValueError(f"{source}: row {n}: missing field '{fields[key]}' (the {key}; "
                             "see --field-map)")
        return row[fields[key]]
    context, question, answer = need("context"), need("question"), need("answer")
    choices = row.get(fields["choices"]) or (
        [row[f"choice_{c}"] for c in "ABCD"] if "choice_A" in row else None)
    if choices:
        if len(choices) != 4 or answer not in ("A", "B", "C", "D"):
            raise ValueError(f"{source}: row {n}: expected 4 choices and an answer letter A-D, got "
                             f"{len(choices)} choices and answer {answer!r}")
        item = {"_id": str(n), "domain": "", "sub_domain": "", "difficulty": "", "length": "",
                "context": context, "question": question, "answer": answer,
                **{f"choice_{c}": x for c, x in zip("ABCD", choices)}}
        return evaluate.longbench_sample(item, n, tokenizer, max_len=max_len)
    refs = [answer] if isinstance(answer, str) else [str(a) for a in answer]
    return evaluate.Sample(bench="train", task="qa", length=0, index=n, seed=0,
                           prompt=QA_TEMPLATE.format(context=context, question=question),
                           answer_prefix="Answer:", references=refs, metric="string_match_part",
                           max_new_tokens=32)


def read_train_rows(args) -> list:
    """[(line or row number, row)] of --train-data, every row checked (check_row) before any model
    loads; [] for the builtin generator. A hub id needs the network."""
    if args.train_data == "builtin":
        return []
    fields, path = parse_field_map(args.field_map), Path(args.train_data)
    if path.exists():
        try:
            rows, where = common.read_jsonl(path, numbered=True), "line"
        except (ValueError, UnicodeDecodeError) as e:
            flags.die(str(e))
    else:  # a hub dataset id (`datasets` is imported only on this path)
        from datasets import load_dataset
        rows, where = list(enumerate(load_dataset(args.train_data, split="train"), 1)), "row"
    if not rows:
        flags.die(f"{path}: no rows")
    for n, row in rows:
        check_row(row, fields, f"{path}: {where} {n}")
    return rows


def check_row(row, fields: dict, where: str) -> None:
    """One training row: an object with a non-empty string context and question, an answer that
    is a string or a list of strings, and, if it has choices, 4 strings and a letter A-D."""
    def bad(field, expected, got):
        flags.die(f"{where}: field '{field}': expected {expected}, got {got!r:.80}")
    if not isinstance(row, dict):
        flags.die(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("context", "question", "answer"):
        if fields[key] not in row or row[fields[key]] in (None, ""):
            flags.die(f"{where}: missing field '{fields[key]}' (the {key}; see --field-map)")
    for key in ("context", "question"):
        if not isinstance(row[fields[key]], str):
            bad(fields[key], "a string", row[fields[key]])
    answer = row[fields["answer"]]
    if not (isinstance(answer, str) or (isinstance(answer, list) and answer
                                        and all(isinstance(a, str) for a in answer))):
        bad(fields["answer"], "a string or a list of strings", answer)
    choices = row.get(fields["choices"])
    if choices is not None and not (isinstance(choices, list) and len(choices) == 4
                                    and all(isinstance(c, str) for c in choices)):
        bad(fields["choices"], "a list of 4 strings", choices)
    if (choices or "choice_A" in row) and answer not in ("A", "B", "C", "D"):
        bad(fields["answer"], "a letter A-D (the row has choices)", answer)


def load_train_data(args, tokenizer, rows: list):
    """None for the builtin generator (samples are drawn per step); else the dataset's samples."""
    if args.train_data == "builtin":
        return None
    fields = parse_field_map(args.field_map)
    return [row_to_sample(row, n, fields, args.train_data, tokenizer, args.train_len)
            for n, row in rows]


def draw_samples(data, tokenizer, args, seed: int, num: int) -> list:
    """`num` training samples for one generation batch, a pure function of `seed`. Builtin samples
    use seeds >= tasks.TRAIN_SEED_START, disjoint from every evaluation seed."""
    if data is None:
        return [evaluate.ruler_sample(tokenizer, args.train_task, args.train_len,
                                      seed=tasks.TRAIN_SEED_START + seed % 10**9, index=i)
                for i in range(num)]
    rng = random.Random(seed)
    return [data[rng.randrange(len(data))] for _ in range(num)]


# -----------------------------------------------------------------------------
# steps 1, 2 and 4: prompts -> groups of completions (+ q/k statistics) -> rewards

def sample_and_score(model, tokenizer, samples: list, args, seed: int, autocast, prefill_hook,
                     offset: int = 0):
    """G completions per sample, --gen-groups groups per generate call (all by default); scores
    from evaluate.py's scorer. `offset`: the global index of samples[0] (a rank's share)."""
    prompts = [evaluate.prompt_ids(tokenizer, s) for s in samples]
    size = args.gen_groups or len(prompts)
    parts = []
    with autocast():
        for i in range(0, len(prompts), size):
            parts.append(rollout.sample_groups(
                model, tokenizer, prompts[i:i + size], args.group_size, args.max_new_tokens,
                args.temperature, args.top_p,
                seed=common.mix_seed(seed, "generate", offset + i),
                prefill_hook=prefill_hook, engine=args.engine))
    r = rollout.concat_rollouts(parts, tokenizer.pad_token_id)
    G = args.group_size
    scores = torch.tensor([evaluate.score(samples[i // G], t) for i, t in enumerate(r.texts)],
                          device=r.completion_ids.device)  # (B*G,) on the policy's device
    rewards = scores.clone()  # (B*G,)
    if args.overlong_buffer > 0:  # DAPO §3.4 soft overlong punishment, on top of the task score
        buffer = max(1, round(args.overlong_buffer * args.max_new_tokens))  # tokens
        penalty, _ = dapo.overlong_penalty(r.lengths, args.max_new_tokens, buffer,
                                           args.overlong_factor)
        rewards = rewards + penalty
    return r, rewards, scores


def collect_batch(model, tokenizer, data, args, step: int, autocast, prefill_hook):
    """One step's groups. GRPO: one generation batch. DAPO dynamic sampling (§3.2): drop groups
    whose scores are all equal and draw more prompts until B informative groups, at most
    --max-gen-batches generation batches; then truncate to B."""
    B, G = args.prompts_per_step // fsdp.world(), args.group_size  # this rank's share of B
    parts, seen, all_equal = [], 0, 0
    for attempt in range(args.max_gen_batches if args.dynamic_sampling else 1):
        seed = common.mix_seed(args.seed, "step", step, attempt)
        samples = fsdp.my_share(draw_samples(data, tokenizer, args, seed, args.prompts_per_step))
        r, rewards, scores = sample_and_score(model, tokenizer, samples, args, seed, autocast,
                                              prefill_hook, offset=fsdp.rank() * B)
        informative, _ = dapo.keep_informative_groups(scores, G)  # (B,) on the task score
        seen, all_equal = seen + B, all_equal + int((~informative).sum())
        keep = informative if args.dynamic_sampling else torch.ones_like(informative)  # (B,)
        idx = keep.nonzero().flatten().tolist()
        parts.append((rollout.select_groups(r, idx), rewards.view(B, G)[idx],
                      scores.view(B, G)[idx], [samples[i] for i in idx]))
        if fsdp.reduce_numbers([sum(len(p[3]) for p in parts)], "min")[0] >= B:
            break  # (one process: this rank's count; --fsdp: every rank has B)
    r = rollout.concat_rollouts([p[0] for p in parts], tokenizer.pad_token_id)
    n = int(fsdp.reduce_numbers([min(B, len(r.prompt_ids))], "min")[0])  # equal work per rank
    r = fsdp.same_width(rollout.select_groups(r, list(range(n))), tokenizer.pad_token_id)
    rewards = torch.cat([p[1] for p in parts])[:n].flatten()  # (n*G,)
    scores = torch.cat([p[2] for p in parts])[:n].flatten()  # (n*G,)
    samples = [s for p in parts for s in p[3]][:n]
    seen, all_equal = fsdp.reduce_numbers([seen, all_equal])
    info = {"gen_batches": attempt + 1, "groups_seen": seen, "frac_all_equal": all_equal / seen}
    return r, rewards, scores, samples, info


# -----------------------------------------------------------------------------
# step 5: the masked policy update

def loss_fn(logp, old_logp, ref_logp, adv, mask, counts, args):
    """GRPO or DAPO objective on one micro-batch, normalised by its mini-batch's counts."""
    num_tokens, num_seqs = counts
    if args.algo == "dapo":
        return dapo.dapo_loss(logp, old_logp, adv, mask, eps_low=args.clip_eps,
                              eps_high=args.eps_high, num_tokens=num_tokens)
    return grpo.grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps=args.clip_eps,
                          beta=args.beta, aggregation=args.aggregation, max_len=args.max_new_tokens,
                          num_tokens=num_tokens, num_seqs=num_seqs,
                          kl_clamp=args.kl_clamp or None)


def mini_batches(num_groups: int, args) -> list:
    """Lists of group indices, one per optimizer step (verl's ppo_mini_batch_size; §4)."""
    size = args.mini_batch_groups // fsdp.world() if args.mini_batch_groups else num_groups
    return [list(range(g, min(num_groups, g + size))) for g in range(0, num_groups, size)]


def accumulate_gradients(model, r, groups, adv, mask, old, ref, args, autocast) -> list:
    """Backward over micro-batches of whole groups of one mini-batch; the loss of each divides by
    the mini-batch's counts, so their gradients add up to the mini-batch gradient."""
    G, device = r.group_size, mask.device
    rows = rollout.group_rows(groups, G, device)  # (b,) the mini-batch's rows
    # the loss divides by the mini-batch's counts over every rank (fsdp.py note 2)
    counts = fsdp.global_counts(mask[rows]) if args.fsdp else grpo.batch_counts(mask[rows])
    stats = []
    for i in range(0, len(groups), args.micro_groups):
        sub_groups = groups[i:i + args.micro_groups]
        sub_rows = rollout.group_rows(sub_groups, G, device)  # (m,)
        with autocast():
            logp = rollout.completion_logprobs(model, rollout.select_groups(r, sub_groups),
                                               args.temperature)  # (m, T) with gradients
        old_lp = old[sub_rows] if old is not None else logp.detach()  # on-policy: ratio exactly 1
        ref_lp = ref[sub_rows] if ref is not None else None
        loss, m = loss_fn(logp, old_lp, ref_lp, adv[sub_rows], mask[sub_rows], counts, args)
        loss.backward()  # no extra scaling: the loss already divides by the mini-batch's counts
        stats.append(m | {"loss": loss.item()})
    return stats


def policy_update(model, ref_model, optimizer, scheduler, r, adv, masks, args, autocast) -> dict:
    """mu passes x mini-batches, one masked optimizer step each; the scheduler steps once."""
    mask = r.completion_mask  # (B, T)
    if args.filter_truncated:
        mask, _ = dapo.truncation_mask(mask, r.truncated)
    batches = mini_batches(len(r.prompt_ids), args)
    model.train()
    with torch.no_grad(), autocast():  # sampling policy's and reference's log-probs, once per batch
        multi = args.mu > 1 or len(batches) > 1  # later optimizer steps see ratios != 1
        old = rollout.completion_logprobs(model, r, args.temperature) if multi else None
        ref = (rollout.completion_logprobs(ref_model, r, args.temperature)
               if ref_model is not None else None)
    stats, norms, drift, lr = [], [], [], optimizer.param_groups[0]["lr"]
    for _ in range(args.mu):
        for groups in batches:
            optimizer.zero_grad(set_to_none=True)
            stats += accumulate_gradients(model, r, groups, adv, mask, old, ref, args, autocast)
            rows = fsdp if args.fsdp else masking  # the same rules, on each rank's local rows
            rows.mask_grads(model, masks)  # [LongAct] grad W_Q <- grad W_Q * G_Q, same for K
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)))
            # [LongAct] the step; under `frozen` rows outside the mask come back bit-identical
            drift.append(rows.masked_step(optimizer, model, masks, args.mask_semantics))
    optimizer.zero_grad(set_to_none=True)  # free the gradients before the next sampling phase
    scheduler.step()
    return summarize_update(stats, norms, drift, lr, args)


def summarize_update(stats: list, norms: list, drift: list, lr: float, args) -> dict:
    w = [s.get("num_tokens", 1) for s in stats]  # token-weighted means of per-micro-batch metrics
    out = {k: sum(s[k] * wi for s, wi in zip(stats, w)) / max(1, sum(w)) for k in stats[0]
           if k not in ("num_tokens", "loss", "kl_max", "ratio_dev_max")
           and isinstance(stats[0][k], (int, float))}
    out["kl_max"] = max(s.get("kl_max", 0.0) for s in stats)
    out["ratio_dev_max"] = max(s["ratio_dev_max"] for s in stats)  # 0 when every step is on-policy
    out["loss"] = sum(s["loss"] for s in stats) / (args.mu * max(1, len(norms) // args.mu))
    out["grad_norm"], out["opt_steps"], out["lr"] = max(norms), len(norms), lr
    if drift:
        out["drift_outside_mask"] = max(drift)  # [LongAct] 0.0 exactly under `frozen`
    return out


# -----------------------------------------------------------------------------
# one RL step: the algorithm box's inner loop

def rl_step(model, ref_model, tokenizer, optimizer, scheduler, data, args, step: int,
            run_dir: Path, autocast, masks_ref: dict, static_masks: dict) -> dict | None:
    t = time.time()
    hook, state = (saliency.prefill_collector(model, args.stat) if needs_step_stats(args)
                   else (None, None))  # [LongAct] statistics read during the sampling prefill
    r, rewards, scores, samples, info = collect_batch(model, tokenizer, data, args, step,
                                                      autocast, hook)
    t_sample = time.time() - t
    masks = step_masks(model, args, step, state, static_masks)  # [LongAct] this step's masks
    dyn = mask_dynamics(masks, masks_ref, static_masks)
    if len(r.prompt_ids) == 0:
        print(f"step {step}: no informative group in {info['gen_batches']} generation batches; "
              "update skipped")
        return None
    t = time.time()
    adv, _ = grpo.group_advantages(rewards, args.group_size, scale=args.adv_scale)  # (B*G,)
    t_score = time.time() - t
    t = time.time()
    upd = policy_update(model, ref_model, optimizer, scheduler, r, adv, masks, args, autocast)
    G = r.group_size
    for i in (0, len(r.texts) - 1) if fsdp.is_main() else ():  # two completions per step
        common.append_jsonl(run_dir / "samples.jsonl", {
            "step": step, "row": i, "references": samples[i // G].references,
            "score": float(scores[i]), "completion": r.texts[i]})
    _, qk_share = masking.mask_summary(masks)
    return {"step": step, "reward": float(rewards.mean()),
            "acc": float((scores >= 1).float().mean()), "len": float(r.lengths.float().mean()),
            "frac_truncated": float(r.truncated.float().mean()),
            "t_sample": t_sample, "t_score": t_score, "t_update": time.time() - t,
            "qk_trainable": qk_share} | info | dyn | upd


def step_masks(model, args, step: int, state, static_masks: dict) -> dict:
    """[LongAct] the masks of this step: from the step's statistics, a per-step random draw, or the
    static calibration mask."""
    if args.mask_schedule == "static":
        return static_masks
    # every rank's prompts together (a no-op in one process), so every rank builds one mask
    stats = saliency.finalize_state(fsdp.reduce_qk_state(state)) if state is not None else None
    return masks_from(stats, model, args, seed=common.mix_seed(args.seed, "mask", step))


def mask_dynamics(masks: dict, refs: dict, static_masks: dict) -> dict:
    """[LongAct] Jaccard overlap of this step's masks with the previous step's and step 0's, and of
    step 0's with the static calibration mask. Updates `refs` in place."""
    if refs.get("step0") is None:
        refs["step0"] = masks
    out = {"mask_jaccard_prev": (masking.mask_overlap(masks, refs["prev"])
                                 if refs.get("prev") is not None else 1.0),
           "mask_jaccard_step0": masking.mask_overlap(masks, refs["step0"]),
           "mask_jaccard_step0_static": masking.mask_overlap(refs["step0"], static_masks)}
    refs["prev"] = masks
    return out


# -----------------------------------------------------------------------------
# evaluation, logging

def run_eval(model, tokenizer, args, autocast) -> dict:
    """RULER at the given lengths on held-out seeds; LongBench v2 with --longbench.
    Returns {"task@length": score in percent}."""
    model.eval()
    with autocast():
        table, _ = evaluate.evaluate_ruler(model, tokenizer, args.eval_tasks, args.eval_lengths,
                                           args.eval_samples, seed=0, batch=args.eval_batch,
                                           engine=args.engine)
        out = {f"{t}@{n}": s for t, row in table["scores"].items() for n, s in row.items()}
        out.update({f"ruler_avg@{n}": s for n, s in table["average"].items()})
        if args.longbench:
            items = longbench_items(args)  # loaded and validated before the model (preflight)
            lb, _ = evaluate.evaluate_longbench(model, tokenizer, items,
                                                max_len=args.longbench_max_len,
                                                thinking=args.thinking, engine=args.engine)
            out.update({f"longbench_v2/{k}": v for k, v in lb.items()
                        if isinstance(v, (int, float))})
    return out


def eval_settings(args) -> dict:
    return {k: getattr(args, k) for k in ("model", "eval_tasks", "eval_lengths", "eval_samples",
                                          "longbench", "thinking", "precision_used")}


def before_eval(model, tokenizer, args, autocast) -> dict:
    """The 'before' evaluation, shared through --before-eval by runs that start from one model
    (an A/B grid computes it once). A file made with other settings is refused."""
    path = Path(args.before_eval) if args.before_eval else None
    if path is not None and path.exists():
        saved = common.read_json(path)
        if saved["settings"] != eval_settings(args):
            raise SystemExit(f"{path}: made with other evaluation settings {saved['settings']}; "
                             f"this run has {eval_settings(args)}")
        return saved["scores"]
    scores = run_eval(model, tokenizer, args, autocast)
    if path is not None and fsdp.is_main():
        common.write_json_atomic(path, {"settings": eval_settings(args), "scores": scores})
    return scores


def format_before_after(before: dict, after: dict) -> str:
    lines = [f"{'metric':<32} {'before':>8} {'after':>8} {'delta':>8}"]
    for k in before:
        lines.append(f"{k:<32} {before[k]:8.2f} {after[k]:8.2f} {after[k] - before[k]:+8.2f}")
    return "\n".join(lines)


def log_step(run_dir: Path, row: dict, args) -> None:
    """One line per step on stdout, the same as JSON in metrics.jsonl. Under --fsdp the numbers
    are averaged over ranks (each describes its share), the largest KL is the largest."""
    if args.fsdp:
        kl_max = fsdp.reduce_numbers([row.get("kl_max", 0.0)], "max")[0]
        row = fsdp.mean_over_ranks(row) | {"kl_max": kl_max, "step": row["step"]}
    if not fsdp.is_main():
        return
    tqdm.write(
        f"step {row['step']:4d} | reward {row['reward']:.3f} acc {row['acc']:.3f} "
        f"len {row['len']:5.1f} trunc {row['frac_truncated']:.2f} "
        f"eq-groups {row['frac_all_equal']:.2f} | loss {row.get('loss', 0):+.4f} "
        f"clip {row.get('clip_frac_low', 0):.3f}/{row.get('clip_frac_high', 0):.3f} "
        f"kl {row.get('kl', 0):.4f} (max {row.get('kl_max', 0):.2f}) "
        f"gnorm {row.get('grad_norm', 0):.3f} lr {row.get('lr', 0):.1e} | "
        f"qk {row['qk_trainable']:.2f} J-prev {row['mask_jaccard_prev']:.2f} "
        f"J-0 {row['mask_jaccard_step0']:.2f} | t sample {row['t_sample']:.1f}s "
        f"update {row['t_update']:.1f}s")
    common.append_jsonl(run_dir / "metrics.jsonl", row)


def timed(phases: dict, name: str, fn, *a, **kw):
    t = time.time()
    out = fn(*a, **kw)
    phases[name] = phases.get(name, 0.0) + time.time() - t
    return out


# -----------------------------------------------------------------------------
# main: the algorithm box

def setup(args):
    """Threads, seeds, precision, run folder, policy (sharded with --fsdp), reference, optim."""
    if args.fsdp:
        args.device = fsdp.init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    precision, why = common.choose_precision(args.precision, args.device)
    args.precision_used, args.precision_reason = precision, why
    run_dir, start = fsdp.from_main(prepare_run(args) if fsdp.is_main() else None)
    if fsdp.is_main():
        print(f"precision: {precision} ({why})", flush=True)
    model, tokenizer = load_model(args, run_dir)
    ref_model = reference_model(args) if args.algo == "grpo" and args.beta > 0 else None
    optimizer, scheduler = make_optimizer(model, args)
    autocast = lambda: common.autocast(args.device, precision)  # noqa: E731
    return run_dir, start, model, tokenizer, ref_model, optimizer, scheduler, autocast


def load_model(args, run_dir: Path):
    """The policy: from the checkpoint's HF folder on resume; under --fsdp from --model on the CPU,
    then sharded (a resume loads the shards later, resume_state)."""
    dtype = torch.bfloat16 if args.optimizer == "bf16-sr" else torch.float32
    if args.fsdp:
        model, tokenizer = policy.load_policy(args.model, dtype=dtype, device="cpu")
    else:
        source = str(checkpoint_dir(run_dir)) if args.resume else args.model
        model, tokenizer = policy.load_policy(source, dtype=dtype, device=args.device)
    if args.grad_checkpointing:  # before sharding (fsdp.py)
        model.activation_checkpointing_enable({"use_reentrant": False})
    return (fsdp.shard_policy(model) if args.fsdp else model), tokenizer


def main(argv=None):
    args = parse_args(argv)
    if args.show_config or args.plan:
        return show_config_or_plan(args)
    rows = read_train_rows(args)  # every row checked before the model loads
    preflight(args)
    run_dir, start, model, tokenizer, ref_model, optimizer, scheduler, autocast = setup(args)
    phases, t0, main_rank = {}, time.time(), fsdp.is_main()
    stats = timed(phases, "statistics", calibration_stats, model, tokenizer, args, run_dir,
                  autocast)
    static_masks = masks_from(stats, model, args, seed=common.mix_seed(args.seed, "mask"))
    if main_rank:
        masking.save_masks(run_dir / "masks.safetensors", static_masks, {"role": "static"})
    evals, masks_ref = (resume_state(run_dir, model, optimizer, scheduler, args) if args.resume
                        else ({}, {"step0": None, "prev": None}))
    data = load_train_data(args, tokenizer, rows)
    for flag, why in args.plan_reasons.items() if main_rank else ():
        print(f"--{flag.replace('_', '-')} {why}")
    if main_rank:
        print(f"run {run_dir} | {args.algo} | mask {args.mask_strategy} ({args.mask_schedule}, "
              f"{args.mask_semantics}) ratio {args.ratio} | B={args.prompts_per_step} "
              f"G={args.group_size} | steps {start}..{args.steps}", flush=True)
    if args.eval and "before" not in evals:  # every rank evaluates (forwards are collective)
        evals["before"] = timed(phases, "eval before", before_eval, model, tokenizer, args,
                                autocast)
        write_evals(run_dir, evals)
    saved = start if args.resume else -1  # the step of the newest checkpoint on disk
    with StopFlag() as stop:
        for step in tqdm(range(start, args.steps), desc="RL steps", initial=start,
                         total=args.steps, dynamic_ncols=True, disable=not main_rank):
            row = timed(phases, "training", rl_step, model, ref_model, tokenizer, optimizer,
                        scheduler, data, args, step, run_dir, autocast, masks_ref, static_masks)
            if row is not None:
                log_step(run_dir, row | {"elapsed": time.time() - t0}, args)
            if args.eval and args.eval_every and (step + 1) % args.eval_every == 0 \
                    and step + 1 < args.steps:
                evals[f"step{step + 1}"] = timed(phases, "eval during", run_eval, model,
                                                 tokenizer, args, autocast)
                write_evals(run_dir, evals)
            stopping = bool(fsdp.reduce_numbers([int(stop.set)], "max")[0])  # all ranks agree
            if stopping or (args.save_every and (step + 1) % args.save_every == 0):
                save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, step + 1, args,
                                masks_ref)
                saved = step + 1
            if stopping:
                return run_dir
    if saved != args.steps:  # the last step's checkpoint, unless the loop just wrote it
        save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, args.steps, args,
                        masks_ref)
    if args.fsdp:  # a plain Hugging Face folder of the trained policy, for evaluation
        fsdp.export_hf(model, tokenizer, run_dir / "final")
    if args.eval:
        evals["after"] = timed(phases, "eval after", run_eval, model, tokenizer, args, autocast)
        write_evals(run_dir, evals)
        if main_rank:
            print(format_before_after(evals["before"], evals["after"]))
    phases["total"] = time.time() - t0
    if main_rank:
        common.write_json_atomic(run_dir / "phases.json", phases)
        print("wall time per phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
        print(f"run folder {run_dir}")
    return run_dir


def write_evals(run_dir: Path, evals: dict) -> None:
    if fsdp.is_main():
        common.write_json_atomic(run_dir / "eval.json", evals)


def show_config_or_plan(args):
    """--show-config: every effective setting; --plan: the memory plan of this run (plan.py)."""
    for flag, why in getattr(args, "plan_reasons", {}).items():
        print(f"--{flag.replace('_', '-')} {why}")
    if args.plan:
        rows, s = plan.plan_for_args(args), plan.settings_for_args(args)
        print(plan.format_plan(rows))
        print(plan.verdict(rows, s) + "\n")
        print(plan.format_time_plan(plan.time_plan_for_args(args), s))
        return None
    width = max(map(len, vars(args)))
    for k, v in sorted(vars(args).items()):
        print(f"{k:<{width}}  {v}")
    return None


if __name__ == "__main__":
    main()
