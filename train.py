"""
train.py -- LongAct end to end: `main()` is the algorithm box (arXiv 2604.14922; SOURCES.md §1).

    python train.py --algo grpo                     # the embedded default on a CPU (make demo)
    python train.py --algo dapo --mask-strategy all # the uniform-update baseline, under DAPO
    python train.py --preset paper                  # Qwen3-4B, 16k-token prompts, one large GPU
    python train.py --preset paper-8b --plan        # memory, disk and time plan of Qwen3-8B, exit
    python train.py --show-config [--config runs/RUN/config.json]  # every setting, exit

Per RL step (`rl_step`), as the paper describes it:
  1. sample     G completions for each of B long-context prompts; the prefill that sampling does
                anyway reads every q_proj/k_proj output through hooks            rollout.py
  2. saliency   M[h, d] = mean over the step's prompts of the L2 norm over positions  saliency.py
  3. masks      keep the top 30% rows within each head of every W_Q, W_K               masking.py
  4. score      reward = the benchmark's own scorer on each completion                 evaluate.py
  5. update     advantages per group; GRPO or DAPO loss; backward; masked AdamW step
                (rows outside the step's mask stay bit-identical)            grpo.py, dapo.py
and RULER at the training length and at 2x it, before and after. Lines that make this LongAct
rather than GRPO/DAPO carry the tag `# [LongAct]`; the bookkeeping is plumbing/runner.py.
Letters: B prompts per step, G completions per prompt, T new tokens.
"""

import sys
import time

from plumbing import config, startup  # the standard library only: nothing heavy before parsing

startup.set_allocator()  # before torch loads: CUDA's allocator reads its setting once

# -----------------------------------------------------------------------------
# config: one block, every default visible. An algorithm or a preset changes the defaults in its
# table, nothing else; a run's saved config.json (--config) comes next; a flag given on the
# command line always wins. `--show-config` prints the result; every run saves it. Plain values
# (tests/test_flags.py holds them equal to the modules'): parsing needs no torch.

ALGORITHMS = {  # GRPO (DeepSeekMath; SOURCES.md §3) vs DAPO (arXiv 2503.14476; SOURCES.md §4)
    "grpo": dict(eps_high=0.2, beta=0.04, aggregation="seq-mean-token-mean", dynamic_sampling=False,
                 overlong_buffer=0.0, mini_batch_groups=0),
    # DAPO on the CPU: a buffer of the budget's last quarter at a quarter of the recipe's factor;
    # 2 groups per optimizer step, so the second mini-batch sees ratios != 1 (clip-higher acts)
    "dapo": dict(eps_high=0.28, beta=0.0, aggregation="token-mean", dynamic_sampling=True,
                 overlong_buffer=0.25, overlong_factor=0.25, mini_batch_groups=2),
}
PRESETS = {
    "cpu": {},
    "paper": dict(model="Qwen/Qwen3-4B", train_len=16384, calib_len=16384, calib_samples=8,
                  prompts_per_step=32, group_size=8, max_new_tokens=1024, lr=1e-6, warmup_steps=10,
                  steps=200, weight_decay=0.1, grad_checkpointing=True, eval_lengths=[16384, 32768],
                  eval_samples=50, eval_every=50, longbench="hub", micro_groups=1, save_every=25,
                  save_final=True,
                  max_gen_batches=10, gen_groups=-1, eval_batch=-1,  # -1: from the plan
                  # DAPO's recipe: a buffer of a fifth (4096 of 20480 tokens); 16 optimizer steps
                  # per rollout batch (512 prompts, mini-batches of 32): 32 prompts -> 2 a step
                  dapo=dict(overlong_buffer=0.2, overlong_factor=1.0, mini_batch_groups=2)),
}
# Qwen3-8B fits one 141 GB GPU with bf16 weights and moments, stochastic rounding (--plan)
PRESETS["paper-8b"] = PRESETS["paper"] | dict(model="Qwen/Qwen3-8B", optimizer="bf16-sr")
FLAGS = {  # name: (default, help[, choices]); --help shows these groups
    "run": dict(
        preset=("cpu", "a set of defaults (PRESETS)", sorted(PRESETS)),
        show_config=(False, "print the effective config, exit"),
        plan=(False, "print the memory, disk and time plan (plumbing/plan.py), exit"),
        gpu=("h200", "the GPU the plan sizes and times (not --device)", ["a100", "h100", "h200"]),
        force=(False, "start even when the checks before loading say it will not fit")),
    "model and precision": dict(
        model=("smollm2-135m", "embedded name, hub id or folder"),
        device=("auto", "where the run computes (auto: cuda if there is one, else cpu)"),
        precision=("auto", "auto: bf16 where computed natively", ["auto", "fp32", "bf16"]),
        optimizer=("adamw", "adamw: fp32; bf16-sr: bf16 stochastic rounding", ["adamw", "bf16-sr"]),
        grad_checkpointing=(False, "recompute activations in backward"),
        threads=(0, "torch CPU threads (0 = torch's default)"),
        expected_new_tokens=(0, "the time plan's mean completion (0 = half the budget)"),
        report_to=("none", "also log live (optional packages)", ["none", "tensorboard", "wandb"]),
        wandb_project=("longact", "with --report-to wandb"),
        kl_stop=(5.0, "stop before an update whose mean KL passes this (0 = never)"),
        hub_kernels=(False, "let transformers swap in hub kernels (SOURCES.md §9.44)"),
        fsdp=(False, "shard the policy over torchrun's processes (plumbing/fsdp.py)"),
        thinking=(False, "Qwen3 thinking mode for LongBench v2 (training prompts: off)")),
    "LongAct": dict(
        mask_strategy=("topk", "rows that train (LongAct: topk)", ["topk", "bottomk", "random",
                                                                   "all"]),
        mask_schedule=("step", "step: each step's prompts; static: calibration", ["step","static"]),
        mask_semantics=("frozen", "frozen: rows outside stay; grad: masked", ["frozen", "grad"]),
        train_scope=("all", "weights that train: all (the paper) or only q/k", ["all", "qk"]),
        ratio=(0.3, "share of rows per head that train"),
        stat=("seq_l2", "the saliency statistic", ["seq_l2", "mean_abs", "l2", "max_abs"]),
        per_head=(True, "select within each head (else within each whole matrix)"),
        stats=(None, "a saliency.py statistics file (static masks)"),
        static_overlap=(False, "log step 0's mask overlap with a calibration mask (calibrates)"),
        calib_len=(1024, "tokens per calibration prompt"),
        calib_samples=(8, "number of calibration prompts")),
    "algorithm": dict(
        algo=("grpo", "the objective (ALGORITHMS)", sorted(ALGORITHMS)),
        group_size=(8, "G completions per prompt"),
        clip_eps=(0.2, "lower clip epsilon"),
        eps_high=(0.2, "upper clip epsilon (DAPO: 0.28)"),
        beta=(0.04, "KL coefficient (GRPO 0.04, DAPO 0)"),
        kl_clamp=(10.0, "clamp each token's k3 to +-this (0 = off, as TRL)"),
        aggregation=("seq-mean-token-mean", "loss aggregation",
                     ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]),
        adv_scale=("group", "advantage scale", ["group", "batch", "none"]),
        mu=(1, "passes over each rollout batch (GRPO's mu)"),
        mini_batch_groups=(0, "groups per optimizer step (verl's ppo_mini_batch_size; 0 = all)"),
        dynamic_sampling=(False, "DAPO: keep only groups whose rewards differ"),
        max_gen_batches=(3, "DAPO: at most this many generation batches per step"),
        overlong_buffer=(0.0, "DAPO soft buffer, a share of --max-new-tokens (0 = off)"),
        overlong_factor=(1.0, "DAPO penalty at the full length"),
        filter_truncated=(False, "drop truncated completions from the loss")),
    "data": dict(
        train_data=("builtin", "'builtin', a .jsonl file or a hub id"),
        train_task=("niah_multikey_1", "builtin RULER training task"),
        train_len=(512, "prompt tokens"),
        field_map=("", "JSONL fields, e.g. context=doc,answer=ans")),
    "sampling": dict(
        prompts_per_step=(4, "B prompts (groups) per step"),
        gen_groups=(0, "groups per generate call (0 = all, -1 = the most the plan fits)"),
        max_new_tokens=(32, "completion budget"),
        engine=("fast", "fast: cascade decoding (plumbing/engine.py); hf: plain", ["fast", "hf"]),
        temperature=(1.0, "sampling temperature"),
        top_p=(1.0, "nucleus sampling")),
    "optimiser": dict(
        steps=(6, "RL steps"),
        lr=(5e-5, "learning rate"),
        warmup_steps=(2, "linear warm-up, then constant"),
        weight_decay=(0.1, "AdamW decay (the DAPO recipe's 0.1)"),
        grad_clip=(1.0, "global gradient norm clip"),
        micro_groups=(1, "groups per micro-batch")),
    "evaluation": dict(
        eval=(True, "RULER before and after training"),
        eval_tasks=(["niah_multikey_1", "niah_multikey_2"], "RULER tasks on held-out seeds"),
        eval_lengths=([512, 1024], "RULER lengths"),
        eval_samples=(12, "samples per task and length"),
        eval_batch=(8, "greedy prompts per generate call (-1 = the most the plan fits)"),
        eval_every=(0, "also evaluate every N steps (0 = only before and after)"),
        val_samples=(0, "samples per cell of a validation set (evaluation seed --val-seed)"),
        val_seed=(1, "the validation set's evaluation seed (reported cells: seed 0)"),
        before_eval=(None, "a JSON file with the 'before' scores: read, else written"),
        longbench=(None, "also LongBench v2: a file or 'hub'"),
        longbench_max_len=(120000, "LongBench v2 prompts cut in the middle to this"),
        yarn=(0.0, "YaRN factor (Qwen3: 4 for 131k tokens; 0 = off)"),
        yarn_original=(32768, "YaRN's original window")),
    "checkpoints": dict(
        out_dir=("runs", "where run folders go"),
        run_name=(None, "default: <algo>-<strategy>-seed<seed>-<time>"),
        save_every=(0, "checkpoint every N steps (0 = none; a signal still saves one)"),
        save_final=(False, "keep the last step's weights and optimizer state in ckpt/"),
        keep_checkpoints=(1, "checkpoints kept; the old one goes once the new one is complete"),
        resume=(None, "a run folder to continue exactly"),
        seed=(0, "the run's seed")),
}


def build_parser():
    return config.build_parser(FLAGS, PRESETS, ALGORITHMS, config.DESCRIPTION, config.STEP_HELP)


if __name__ == "__main__":  # --help and a bad flag are answered before torch loads
    config.early(build_parser(), sys.argv[1:], PRESETS, ALGORITHMS)

import torch  # noqa: E402 -- the heavy imports come after that first parse

import dapo  # noqa: E402
import evaluate  # noqa: E402
import grpo  # noqa: E402
import masking  # noqa: E402
import rollout  # noqa: E402
import saliency  # noqa: E402
from plumbing import common, fsdp, report, runner  # noqa: E402
from plumbing.checkpoint import StopFlag  # noqa: E402
from tasks import haystack  # noqa: E402
from tasks.train_data import draw_samples  # noqa: E402


def parse_args(argv=None):
    """Flags over --config over preset over algorithm over FLAGS, each value checked."""
    return runner.parse_and_check(build_parser(), argv, PRESETS, ALGORITHMS)


# -----------------------------------------------------------------------------
# [LongAct] statistics -> masks

def calibration_stats(run) -> dict:
    """q/k statistics on long calibration text: the static mask's source, and the reference the
    per-step masks are compared with (runner.statistics reads a --stats file instead, saves)."""
    args = run.args
    prompts = haystack.calibration_prompts(run.tokenizer, args.calib_len, args.calib_samples,
                                           seed=args.seed)
    batches = [{"input_ids": torch.tensor([p], device=args.device)} for p in prompts]
    with run.autocast():
        return saliency.collect_qk_stats(run.model, batches, stat=args.stat)


def masks_from(stats: dict | None, model, args, seed: int) -> dict:
    """[LongAct] row masks of every q/k matrix from statistics (None: for strategies without)."""
    if stats is None:
        stats = {n: torch.zeros(m.weight.shape[0]) for n, m in common.qk_modules(model).items()}
    return masking.build_masks(stats, ratio=args.ratio, strategy=args.mask_strategy, seed=seed,
                               per_head=args.per_head, head_dim=common.head_dim_of(model.config))


# -----------------------------------------------------------------------------
# steps 1, 2 and 4: prompts -> groups of completions (+ q/k statistics) -> rewards

def sample_and_score(run, samples: list, seed: int, prefill_hook, offset: int = 0):
    """G completions per sample, --gen-groups groups per generate call (all by default); scores
    from evaluate.py's scorer. `offset`: the global index of samples[0] (a rank's share)."""
    args, model, tokenizer, G = run.args, run.model, run.tokenizer, run.args.group_size
    prompts = [evaluate.prompt_ids(tokenizer, s) for s in samples]
    size, parts = args.gen_groups or len(prompts), []
    with run.autocast():
        for i in range(0, len(prompts), size):
            parts.append(rollout.sample_groups(
                model, tokenizer, prompts[i:i + size], args.group_size, args.max_new_tokens,
                args.temperature, args.top_p, seed=common.mix_seed(seed, "generate", offset + i),
                prefill_hook=prefill_hook, engine=args.engine))
    r = rollout.concat_rollouts(parts, tokenizer.pad_token_id)
    scores = torch.tensor([evaluate.score(samples[i // G], t) for i, t in enumerate(r.texts)],
                          device=r.completion_ids.device)  # (B*G,) on the policy's device
    rewards = scores.clone()  # (B*G,)
    if args.overlong_buffer > 0:  # DAPO §3.4 soft overlong punishment, on top of the task score
        buffer = max(1, round(args.overlong_buffer * args.max_new_tokens))  # tokens
        rewards = rewards + dapo.overlong_penalty(r.lengths, args.max_new_tokens, buffer,
                                                  args.overlong_factor)[0]
    return r, rewards, scores


def collect_batch(run, step: int, prefill_hook):
    """One step's groups. GRPO: one generation batch. DAPO dynamic sampling (§3.2): drop groups
    whose scores are all equal, draw more until B (at most --max-gen-batches); truncate to B."""
    args, tokenizer = run.args, run.tokenizer
    B, G = args.prompts_per_step // fsdp.world(), args.group_size  # this rank's share of B
    parts, seen, all_equal = [], 0, 0
    for attempt in range(args.max_gen_batches if args.dynamic_sampling else 1):
        seed = common.mix_seed(args.seed, "step", step, attempt)
        drawn = draw_samples(run.data, tokenizer, args, seed, args.prompts_per_step)
        samples = fsdp.my_share(drawn)
        r, rewards, scores = sample_and_score(run, samples, seed, prefill_hook, fsdp.rank() * B)
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
                          num_tokens=num_tokens, num_seqs=num_seqs, kl_clamp=args.kl_clamp or None)


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
    args, model, optimizer, autocast = run.args, run.model, run.optimizer, run.autocast
    mask = (dapo.truncation_mask(r.completion_mask, r.truncated)[0] if args.filter_truncated
            else r.completion_mask)  # (B, T)
    batches = mini_batches(len(r.prompt_ids), args)
    model.train()
    with torch.no_grad(), autocast():  # sampling policy's and reference's log-probs, once per batch
        multi = args.mu > 1 or len(batches) > 1  # later optimizer steps see ratios != 1
        old = rollout.completion_logprobs(model, r, args.temperature) if multi else None
        ref = (rollout.completion_logprobs(run.ref_model, r, args.temperature)
               if run.ref_model is not None else None)
    stats, norms, drift, lr = [], [], [], optimizer.param_groups[0]["lr"]
    for _ in range(args.mu):
        for groups in batches:
            optimizer.zero_grad(set_to_none=True)
            new = accumulate_gradients(model, r, groups, adv, mask, old, ref, args, autocast)
            stats += new
            if args.fsdp:  # the same rule on the rows each rank holds (plumbing/fsdp.py)
                fsdp.mask_grads(model, masks)
            else:  # [LongAct] grad W_Q <- grad W_Q * G_Q, same for W_K
                masking.mask_grads(model, masks)
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)))
            runner.guard_update(new, norms[-1], args)  # a non-finite or runaway update stops here
            # [LongAct] the step; under `frozen` rows outside the mask come back bit-identical
            step_fn = fsdp.masked_step if args.fsdp else masking.masked_step
            drift.append(step_fn(optimizer, model, masks, args.mask_semantics))
    optimizer.zero_grad(set_to_none=True)  # free the gradients before the next sampling phase
    run.scheduler.step()
    return report.summarize_update(stats, norms, drift, lr, args.mu)


# -----------------------------------------------------------------------------
# one RL step: the algorithm box's inner loop

def rl_step(run, step: int) -> dict | None:
    """One RL step, the box's steps 1-5; the metrics row (None when no group was informative)."""
    args, t = run.args, time.time()
    per_step = args.mask_schedule == "step" and args.mask_strategy in ("topk", "bottomk")
    hook, state = (saliency.prefill_collector(run.model, args.stat) if per_step
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
    t_score, t = time.time() - t, time.time()
    with report.phase_memory(args.device, run.peaks, "update"):
        upd = policy_update(run, r, adv, masks)  # 5. the masked update
    runner.log_samples(run, step, r, samples, scores)  # two completions into samples.jsonl
    G, (_, qk_share) = r.group_size, masking.mask_summary(masks)
    return {"step": step, "reward": float(rewards.mean()),
            "reward_std": float(rewards.view(-1, G).std(dim=1).mean()),  # TRL's: within groups
            "acc": float((scores >= 1).float().mean()), "len": float(r.lengths.float().mean()),
            "frac_truncated": float(r.truncated.float().mean()),
            "t_sample": t_sample, "t_score": t_score, "t_update": time.time() - t,
            "qk_trainable": qk_share} | info | dyn | upd


def step_masks(model, args, step: int, state, static_masks: dict) -> dict:
    """[LongAct] this step's masks: from its statistics, a random draw, or the static mask."""
    if args.mask_schedule == "static":
        return static_masks
    # every rank's prompts together (a no-op in one process), so every rank builds one mask
    stats = saliency.finalize_state(fsdp.reduce_qk_state(state)) if state is not None else None
    return masks_from(stats, model, args, seed=common.mix_seed(args.seed, "mask", step))


# -----------------------------------------------------------------------------
# main: the algorithm box

def main(argv=None):
    """Calibration statistics -> the static mask; then per step: sample (+ statistics), masks,
    rewards, the masked update; RULER before and after. Bookkeeping: plumbing/runner.py."""
    args = parse_args(argv)
    if args.show_config or args.plan:
        return runner.show_config_or_plan(args)
    rows = runner.check_before_loading(args)  # data rows, disk, memory: seconds, not hours
    run = runner.setup(args)  # seeds, precision, run folder, policy, reference, optimizer
    if runner.uses_static_mask(args):  # [LongAct] calibration statistics -> the static mask
        stats = runner.statistics(run, calibration_stats)  # timed, saved; or a --stats file
        run.static_masks = masks_from(stats, run.model, args, common.mix_seed(args.seed, "mask"))
    runner.start(run, rows)  # the static mask saved; a resume's state; the data; the tracker
    runner.evaluate_at(run, "before")
    with StopFlag() as stop:  # Ctrl-C: a checkpoint at the end of the step, then stop
        for step in runner.steps(run):
            row = runner.guarded(rl_step, run, step)  # steps 1-5 of the box
            runner.log_step(run, row, step)
            runner.evaluate_during(run, step)
            runner.save_or_stop(run, step, stop)  # Ctrl-C: saved, then exit with the resume line
    runner.end(run)  # the last checkpoint, RULER after, the run's summary
    return run.folder


if __name__ == "__main__":
    main()
