"""
train.py -- LongAct end to end: `main()` is the algorithm box (arXiv 2604.14922; SOURCES.md §1).

    python train.py --algo grpo                     # the embedded default on a CPU (make demo)
    python train.py --algo dapo --mask-strategy all # the uniform-update baseline, under DAPO
    python train.py --preset paper                  # Qwen3-4B, 16k-token prompts, one large GPU
    python train.py --preset paper-8b --plan        # memory, disk and time plan of Qwen3-8B, exit
    python train.py --show-config [--algo dapo]     # print every effective setting and exit

Per RL step (`rl_step`), as the paper describes it:
  1. sample     G completions for each of B long-context prompts; the prefill that sampling does
                anyway reads every q_proj/k_proj output through hooks            rollout.py
  2. saliency   M[h, d] = mean over the step's prompts of the L2 norm over positions  saliency.py
  3. masks      keep the top 30% rows within each head of every W_Q, W_K               masking.py
  4. score      reward = the benchmark's own scorer on each completion                 evaluate.py
  5. update     advantages per group; GRPO or DAPO loss; backward; masked AdamW step
                (rows outside the step's mask stay bit-identical)            grpo.py, dapo.py
and RULER at the training length and at 2x it, before and after. Lines that make this LongAct rather
than plain GRPO/DAPO carry the tag `# [LongAct]`. Choices where the paper is silent: SOURCES.md
§9, items 6, 15-17, 24, 26-28, 32, 36. Checks before loading: plumbing/preflight.py; checkpoints:
plumbing/checkpoint.py.
Outputs in --out-dir/RUN: config.json, qk_stats.safetensors, masks.safetensors (static mask),
metrics.jsonl (one line per step), samples.jsonl, eval.json, phases.json (wall seconds per
phase), ckpt/. A resumed run's phases.json and "elapsed" count every part of it.
"""

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from plumbing import startup

startup.set_allocator()  # before torch loads: CUDA's allocator reads its setting once

import torch
from tqdm import tqdm

import dapo
import evaluate
import grpo
import masking
import rollout
import saliency
from plumbing import (checkpoint, common, flags, fsdp, optim, plan, policy, preflight, report,
                      timeplan)
from tasks import haystack
from tasks.train_data import draw_samples, load_train_data, read_train_rows

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
# Qwen3-8B fits one 141 GB GPU with bf16 weights and moments under stochastic rounding
# (plumbing/optim.py); groups per generate call and evaluation batch from the plan (python train.py
# --preset paper-8b --plan; README, "The paper recipe on one GPU").
PRESETS["paper-8b"] = PRESETS["paper"] | dict(model="Qwen/Qwen3-8B", optimizer="bf16-sr")
def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(description="LongAct RL: saliency-guided sparse q/k updates.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="a set of defaults")
    p.add_argument("--show-config", action="store_true", help="print the effective config, exit")
    p.add_argument("--plan", action="store_true",
                   help="print the memory, disk and time plan (plumbing/plan.py), exit")
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
    g.add_argument("--expected-new-tokens", type=int, default=0,
                   help="the time plan's expected completion length (0 = half of "
                        "--max-new-tokens); its worst case has every completion at the limit")
    g.add_argument("--report-to", default="none", choices=report.REPORTERS,
                   help="also log every metrics row and evaluation live (optional packages)")
    g.add_argument("--wandb-project", default="longact", help="with --report-to wandb")
    g.add_argument("--kl-stop", type=float, default=report.KL_STOP,
                   help="stop the run, before the update, when the step's mean KL to the "
                        "reference exceeds this many nats (0 = never)")
    g.add_argument("--hub-kernels", action="store_true",
                   help="let transformers swap layers for kernels from the hub (off: only the "
                        "code this repository and its lock ship runs; SOURCES.md §9.44)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the policy over torchrun's processes with FSDP2 "
                        "(plumbing/fsdp.py)")
    g.add_argument("--thinking", action="store_true",
                   help="Qwen3 thinking mode for LongBench v2 evaluation (training prompts: off)")
    g = p.add_argument_group("LongAct")
    g.add_argument("--mask-strategy", default="topk", choices=masking.STRATEGIES,
                   help="which q/k rows train: topk (LongAct), random/bottomk ablations, all")
    g.add_argument("--mask-schedule", default="step", choices=["step", "static"],
                   help="step: masks from each step's prompts; static: from calibration text once")
    g.add_argument("--mask-semantics", default="frozen", choices=masking.SEMANTICS,
                   help="frozen: rows outside the mask do not move at all; grad: masked gradient")
    g.add_argument("--train-scope", default="all", choices=masking.SCOPES,
                   help="weights that train: all (the paper) or only q/k (a positive control)")
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
    g.add_argument("--train-len", type=int, default=512, help="prompt tokens for builtin tasks")
    g.add_argument("--field-map", default="", help="JSONL fields, e.g. context=doc,answer=ans")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompts-per-step", type=int, default=4, help="B prompts (groups) per step")
    g.add_argument("--gen-groups", type=int, default=0,
                   help="groups per generate call (0 = all B at once, -1 = the most the plan "
                        "fits on --gpu); bounds the KV cache")
    g.add_argument("--max-new-tokens", type=int, default=32, help="completion budget")
    g.add_argument("--engine", default="fast", choices=rollout.ENGINES,
                   help="fast: plumbing/engine.py (cascade decoding); hf: transformers' "
                        "generate, plain")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g = p.add_argument_group("optimiser")
    g.add_argument("--steps", type=int, default=6)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--warmup-steps", type=int, default=2, help="linear warm-up, then constant")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (DAPO recipe 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--micro-groups", type=int, default=1, help="groups per micro-batch")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-tasks", nargs="+", default=["niah_multikey_1", "niah_multikey_2"],
                   help="RULER tasks on held-out seeds: the trained task and a harder one")
    g.add_argument("--eval-lengths", type=int, nargs="+", default=[512, 1024])
    g.add_argument("--eval-samples", type=int, default=12, help="samples per task and length")
    g.add_argument("--eval-batch", type=int, default=8,
                   help="greedy evaluation prompts per generate call (-1 = the most the plan "
                        "fits on --gpu with the training state resident)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = ends)")
    g.add_argument("--val-samples", type=int, default=0,
                   help="also evaluate the final policy on this many samples per cell of a "
                        "validation set (other items: evaluation seed --val-seed); 0 = none")
    g.add_argument("--val-seed", type=int, default=1,
                   help="the validation set's evaluation seed (the reported cells use seed 0)")
    g.add_argument("--no-eval", dest="eval", action="store_false", help="skip evaluation")
    g.add_argument("--before-eval", default=None,
                   help="a JSON file with the 'before' evaluation of the same starting model "
                        "and evaluation settings: read if it exists, else computed and written")
    g.add_argument("--longbench", default=None, help="also LongBench v2: a file or 'hub'")
    g.add_argument("--longbench-max-len", type=int, default=120000,
                   help="LongBench v2 prompts are cut in the middle to this many tokens (and to "
                        "the model's window): a stated choice, recorded with the run")
    g.add_argument("--yarn", type=float, default=0.0,
                   help="YaRN rope scaling factor (Qwen3's cards: 4 for 131k tokens; 0 = off): "
                        "the window becomes --yarn-original x --yarn, for training and eval")
    g.add_argument("--yarn-original", type=int, default=policy.QWEN3_YARN_ORIGINAL,
                   help="YaRN's original_max_position_embeddings (Qwen3's cards: 32768)")
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
    preflight.check_args(p, args)
    preflight.resolve_from_plan(args)
    args.run_name = args.run_name or (f"{args.algo}-{args.mask_strategy}-seed{args.seed}-"
                                      f"{time.strftime('%Y%m%d-%H%M%S')}")
    return args


# -----------------------------------------------------------------------------
# model, reference, optimizer

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


# -----------------------------------------------------------------------------
# [LongAct] statistics -> masks

def calibration_stats(run) -> dict:
    """q/k statistics on long calibration text (or a --stats file): the static mask's source, and
    the reference the per-step masks are compared with. Saved in the run folder."""
    args, model, run_dir = run.args, run.model, run.folder
    if args.stats:
        return saliency.load_stats(args.stats, model)[0]
    if args.resume and (run_dir / "qk_stats.safetensors").exists():
        return saliency.load_stats(run_dir / "qk_stats.safetensors", model)[0]
    prompts = haystack.calibration_prompts(run.tokenizer, args.calib_len, args.calib_samples,
                                           seed=args.seed)
    batches = [{"input_ids": torch.tensor([p], device=args.device)} for p in prompts]
    with run.autocast():
        stats = saliency.collect_qk_stats(model, batches, stat=args.stat)
    meta = {"model": args.model, "stat": args.stat, "num_samples": str(len(prompts)),
            "seq_len": str(args.calib_len), "head_dim": str(common.head_dim_of(model.config))}
    if fsdp.is_main():
        saliency.save_stats(run_dir / "qk_stats.safetensors", stats, meta)
    return stats


def masks_from(stats: dict | None, model, args, seed: int) -> dict:
    """[LongAct] row masks of every q/k matrix from statistics (None: for strategies without)."""
    if stats is None:
        stats = {n: torch.zeros(m.weight.shape[0]) for n, m in common.qk_modules(model).items()}
    return masking.build_masks(stats, ratio=args.ratio, strategy=args.mask_strategy,
                               per_head=args.per_head, head_dim=common.head_dim_of(model.config),
                               seed=seed)


def needs_step_stats(args) -> bool:
    return args.mask_schedule == "step" and args.mask_strategy in ("topk", "bottomk")


# -----------------------------------------------------------------------------
# steps 1, 2 and 4: prompts -> groups of completions (+ q/k statistics) -> rewards

def sample_and_score(run, samples: list, seed: int, prefill_hook, offset: int = 0):
    """G completions per sample, --gen-groups groups per generate call (all by default); scores
    from evaluate.py's scorer. `offset`: the global index of samples[0] (a rank's share)."""
    args, model, tokenizer = run.args, run.model, run.tokenizer
    prompts = [evaluate.prompt_ids(tokenizer, s) for s in samples]
    size = args.gen_groups or len(prompts)
    parts = []
    with run.autocast():
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


def collect_batch(run, step: int, prefill_hook):
    """One step's groups. GRPO: one generation batch. DAPO dynamic sampling (§3.2): drop groups
    whose scores are all equal and draw more prompts until B informative groups, at most
    --max-gen-batches generation batches; then truncate to B."""
    args, tokenizer = run.args, run.tokenizer
    B, G = args.prompts_per_step // fsdp.world(), args.group_size  # this rank's share of B
    parts, seen, all_equal = [], 0, 0
    for attempt in range(args.max_gen_batches if args.dynamic_sampling else 1):
        seed = common.mix_seed(args.seed, "step", step, attempt)
        samples = fsdp.my_share(draw_samples(run.data, tokenizer, args, seed,
                                             args.prompts_per_step))
        r, rewards, scores = sample_and_score(run, samples, seed, prefill_hook,
                                              offset=fsdp.rank() * B)
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
    # the loss divides by the mini-batch's counts over every rank (SOURCES.md §9.30)
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


def policy_update(run, r, adv, masks) -> dict:
    """mu passes x mini-batches, one masked optimizer step each; the scheduler steps once."""
    args, model, ref_model, optimizer, autocast = (run.args, run.model, run.ref_model,
                                                   run.optimizer, run.autocast)
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
            new = accumulate_gradients(model, r, groups, adv, mask, old, ref, args, autocast)
            stats += new
            rows = fsdp if args.fsdp else masking  # the same rules, on each rank's local rows
            rows.mask_grads(model, masks)  # [LongAct] grad W_Q <- grad W_Q * G_Q, same for K
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)))
            # before the step: a non-finite or runaway update never reaches the weights; every
            # rank sees the same numbers (the norm is global, loss and KL are reduced)
            loss, (kl_sum, tokens) = sum(s["loss"] for s in new), report.step_mean_kl(new)
            if args.fsdp:
                loss, kl_sum, tokens = fsdp.reduce_numbers([loss, kl_sum, float(tokens)], "sum")
            report.check_update(loss, norms[-1], kl_sum / max(tokens, 1), args)
            # [LongAct] the step; under `frozen` rows outside the mask come back bit-identical
            drift.append(rows.masked_step(optimizer, model, masks, args.mask_semantics))
    optimizer.zero_grad(set_to_none=True)  # free the gradients before the next sampling phase
    run.scheduler.step()
    return report.summarize_update(stats, norms, drift, lr, args.mu)


# -----------------------------------------------------------------------------
# one RL step: the algorithm box's inner loop

def rl_step(run, step: int) -> dict | None:
    """One RL step, the box's steps 1-5; the metrics row (None when no group was informative)."""
    args, t = run.args, time.time()
    hook, state = (saliency.prefill_collector(run.model, args.stat) if needs_step_stats(args)
                   else (None, None))  # [LongAct] statistics read during the sampling prefill
    with report.phase_memory(args.device, run.peaks, "sampling"):  # CUDA: its peak memory
        r, rewards, scores, samples, info = collect_batch(run, step, hook)  # 1. sample, 4. score
    t_sample = time.time() - t
    masks = step_masks(run.model, args, step, state, run.static_masks)  # [LongAct] 2. and 3.
    dyn = report.mask_dynamics(masks, run.masks_ref, run.static_masks)
    if len(r.prompt_ids) == 0:
        print(f"step {step}: no informative group in {info['gen_batches']} generation batches; "
              "update skipped")
        return None
    t = time.time()
    adv, _ = grpo.group_advantages(rewards, args.group_size, scale=args.adv_scale)  # (B*G,)
    t_score = time.time() - t
    t = time.time()
    with report.phase_memory(args.device, run.peaks, "update"):
        upd = policy_update(run, r, adv, masks)  # 5. the masked update
    G = r.group_size
    for i in (0, len(r.texts) - 1) if fsdp.is_main() else ():  # two completions per step
        common.append_jsonl(run.folder / "samples.jsonl", {
            "step": step, "row": i, "references": samples[i // G].references,
            "score": float(scores[i]), "completion": r.texts[i]})
    _, qk_share = masking.mask_summary(masks)
    return {"step": step, "reward": float(rewards.mean()),
            "reward_std": float(rewards.view(-1, G).std(dim=1).mean()),  # TRL's: within groups
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


# -----------------------------------------------------------------------------
# evaluation, logging

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


def log_step(run, row: dict, eta: float | None = None) -> None:
    """One line per step on stdout (with the whole run's ETA), the same as JSON in
    metrics.jsonl and, with --report-to, in the tracker. Under --fsdp the numbers are averaged
    over ranks (each describes its share), the largest KL is the largest."""
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


# -----------------------------------------------------------------------------
# main: the algorithm box

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
    return Run(args, run_dir, start, model, tokenizer, ref_model, optimizer, scheduler, autocast)


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


def main(argv=None):
    common.check_torch()
    args = parse_args(argv)
    if args.show_config or args.plan:
        return show_config_or_plan(args)
    args.alloc_conf = report.configure_allocator(args.device)  # before CUDA starts
    rows = read_train_rows(args)  # every row checked before the model loads
    preflight.preflight(args)  # disk, memory, LongBench v2, RULER lengths: seconds, not hours
    run = setup(args)
    phases, t0, main_rank = {}, time.time(), fsdp.is_main()
    # [LongAct] calibration statistics -> the static mask (and the reference of the per-step ones)
    stats = common.timed(phases, "statistics", calibration_stats, run)
    run.static_masks = masks_from(stats, run.model, args, seed=common.mix_seed(args.seed, "mask"))
    if main_rank:
        masking.save_masks(run.folder / "masks.safetensors", run.static_masks, {"role": "static"})
    evals, run.masks_ref, earlier = (checkpoint.resume_state(run.folder, run.model,
                                                             run.optimizer, run.scheduler, args)
                                     if args.resume else ({}, {"step0": None, "prev": None}, {}))
    t0 -= earlier.pop("total", 0.0)  # a resumed run counts its earlier part(s) too
    phases = {k: phases.get(k, 0.0) + earlier.get(k, 0.0) for k in phases | earlier}
    run.data = load_train_data(args, run.tokenizer, rows)
    announce(run)
    run.reporter = report.open_reporter(args, run.folder) if main_rank else None
    if args.eval and "before" not in evals:  # every rank evaluates (forwards are collective)
        evaluation(run, evals, phases, "before", "eval before", run.start)
    saved = run.start if args.resume else -1  # the step of the newest checkpoint on disk
    with checkpoint.StopFlag() as stop:
        for step in tqdm(range(run.start, args.steps), desc="RL steps", initial=run.start,
                         total=args.steps, dynamic_ncols=True, disable=not main_rank):
            row = guarded_step(run, step, phases, saved)  # steps 1-5 of the box
            if row is not None:
                log_step(run, row | {"elapsed": time.time() - t0}, run_eta(run, step))
            if args.eval and args.eval_every and (step + 1) % args.eval_every == 0 \
                    and step + 1 < args.steps:
                evaluation(run, evals, phases, f"step{step + 1}", "eval during", step + 1)
            stopping = bool(fsdp.reduce_numbers([int(stop.set)], "max")[0])  # all ranks agree
            if stopping or (args.save_every and (step + 1) % args.save_every == 0):
                common.timed(phases, "checkpoint", checkpoint.save_run, run, step + 1,
                             phases | {"total": time.time() - t0})
                saved = step + 1
            if stopping:
                return run.folder
    if saved != args.steps:  # the last step's checkpoint, unless the loop just wrote it
        common.timed(phases, "checkpoint", checkpoint.save_run, run, args.steps,
                     phases | {"total": time.time() - t0})
    if args.fsdp:  # a plain Hugging Face folder of the trained policy, for evaluation
        fsdp.export_hf(run.model, run.tokenizer, run.folder / "final")
    if args.eval:
        if args.val_samples:  # before "after": a run with "after" in eval.json is finished
            evaluation(run, evals, phases, "after_val", "eval validation", args.steps,
                       seed=args.val_seed, samples=args.val_samples, longbench=False)
        evaluation(run, evals, phases, "after", "eval after", args.steps)
        if main_rank:
            print(evaluate.format_before_after(evals["before"], evals["after"]))
    finish(run, phases, t0)
    return run.folder


def guarded_step(run, step: int, phases: dict, saved: int) -> dict | None:
    """rl_step, timed; an update the guards refuse (report.check_update) ends the run with one
    line naming the step and the checkpoint to resume from (SOURCES.md §9.47)."""
    t = time.time()
    try:
        row = common.timed(phases, "training", rl_step, run, step)
    except report.RunStopped as e:
        if run.reporter:
            run.reporter.close()
        raise SystemExit(report.stop_line(step, str(e), run.folder,
                                          saved if saved >= 0 else None)) from None
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
        print(f"run folder {run.folder}")


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


if __name__ == "__main__":
    main()
