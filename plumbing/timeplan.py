"""
timeplan.py -- about how long a LongAct run takes on one GPU: an estimate from FLOPs and bytes at
stated efficiencies, not a measurement (SOURCES.md §9.31; `python train.py --preset paper --plan`).

plan.py sizes memory; this file turns the same settings into seconds per phase on a named GPU
(plan.GPUS, data-sheet numbers in SOURCES.md §8.10), for completions of the expected length
and for the worst case (all at the limit), with every evaluation and checkpoint write:

    prefill   compute bound: 2 FLOPs per matmul weight per token + attention's two products
    decode    per new token the slower of its compute and of reading the weights + the cascade
              cache at a share of the bandwidth, plus the eager kernel launches of every layer
    update    3 forwards' FLOPs per group (forward + backward), one more with checkpointing, one
              per reference or old-policy forward
    step      the optimizer reads and writes weights, gradients and state once

The four constants below are the estimate's assumptions, named so that a measured GPU run
(`python -m bench.gpu_check`, which prints its times next to these) can correct them.

Letters: L layers, H query heads, D head dim, P prompt tokens, G completions per prompt,
T new tokens per completion, R rows decoded together.
Run: python train.py --preset paper-8b --plan --gpu h100
"""

from dataclasses import replace
from pathlib import Path

from plumbing.plan import (GPUS, OPTIMIZERS, Settings, act_bytes, cascade_cache_bytes,
                           dims, param_counts, settings_for_args)
from plumbing.policy import model_config
from tasks.longbench import LONGBENCH_NEW_TOKENS, load_longbench

MATMUL_EFFICIENCY = 0.45   # share of the dense bf16 peak that long prefill/training matmuls reach
BANDWIDTH_EFFICIENCY = 0.7  # share of the memory bandwidth that a decode step's reads reach
LAUNCH_SECONDS = 7.5e-6    # one eager CUDA kernel launch, as the CPU issues them
LAUNCHES_PER_LAYER = 110   # kernels of one eager decoder layer in a decode step (estimate)
DISK_WRITE_BPS = 1e9       # a checkpoint's write to a local NVMe disk, bytes/s (estimate)
CHARS_PER_TOKEN = 4.0      # LongBench v2 text per Qwen3 token, for --plan without a tokenizer
LONGBENCH_HUB_ITEMS = 503  # LongBench v2's test set (SOURCES.md §6)


def forward_flops(config, tokens: int, attended: float) -> float:
    """One forward: 2 FLOPs per matmul weight per token, plus attention's two products
    (q k^T and p v: 4 H D FLOPs per layer per query token per attended key)."""
    d = dims(config)
    return 2 * param_counts(config)["linear"] * tokens + 4 * d["L"] * d["H"] * d["D"] * attended


def prefill_seconds(config, s: Settings, prompt_len: int) -> float:
    """One prompt's prefill: compute bound; causal attention sees P/2 keys per query on average."""
    g = GPUS[s.gpu]
    return forward_flops(config, prompt_len, prompt_len ** 2 / 2) / (
        g["tflops"] * 1e12 * MATMUL_EFFICIENCY * (1 if act_bytes(s)["a"] == 2 else 0.5))


def decode_seconds(config, s: Settings, prompts: int, prompt_len: int, rows: int,
                   new_tokens: int) -> float:
    """`new_tokens` decode steps of prompts x rows rows: each step reads the weights once and the
    cascade cache (prefixes once per prompt), computes 2 FLOPs per weight per row, and pays the
    eager launches; the slower of compute and memory, plus the launches."""
    g, d, b = GPUS[s.gpu], dims(config), act_bytes(s)
    weights = param_counts(config)["total"] * b["a"]  # read in the compute dtype
    cache = cascade_cache_bytes(config, s, prompts, prompt_len, rows, new_tokens // 2)  # mean
    R = prompts * rows
    flops = forward_flops(config, R, R * (prompt_len + new_tokens / 2))
    step = max(flops / (g["tflops"] * 1e12 * MATMUL_EFFICIENCY),
               (weights + cache) / (g["tbps"] * 1e12 * BANDWIDTH_EFFICIENCY))
    return new_tokens * (step + d["L"] * LAUNCHES_PER_LAYER * LAUNCH_SECONDS)


def update_seconds(config, s: Settings, old_logprobs: bool) -> float:
    """One group's update: forward + backward (3 forwards' FLOPs), one more forward when
    checkpointing recomputes, the reference's and the old policy's forwards when there are."""
    g = GPUS[s.gpu]
    P, G, T = s.prompt_len, s.group_size, s.new_tokens
    fwd = forward_flops(config, P + G * T, P * P / 2 + G * T * (P + T / 2))
    passes = 3 + s.grad_checkpointing + s.reference + old_logprobs
    return passes * fwd / (g["tflops"] * 1e12 * MATMUL_EFFICIENCY
                           * (1 if act_bytes(s)["a"] == 2 else 0.5))


def time_plan(config, s: Settings, groups: int, steps: int, old_logprobs: bool,
              eval_prompts: dict, evaluations: int) -> list:
    """Rows (phase, seconds, how): one generate call, sampling / update / optimizer step of one
    RL step of `groups` groups, one evaluation ({length: prompts}), one RL step, the whole run."""
    g, n = GPUS[s.gpu], s.prompts_per_generate
    call = n * prefill_seconds(config, s, s.prompt_len) + decode_seconds(
        config, s, n, s.prompt_len, s.group_size, s.new_tokens)
    calls = -(-groups // n)
    sampling = calls * call
    update = groups * update_seconds(config, s, old_logprobs)
    w, gr, st, _ = OPTIMIZERS[s.optimizer]
    opt = 2 * param_counts(config)["total"] * (w + gr + st) / (g["tbps"] * 1e12
                                                               * BANDWIDTH_EFFICIENCY)
    evaluation = sum(k * prefill_seconds(config, s, L) + -(-k // s.eval_batch) * decode_seconds(
        config, s, min(k, s.eval_batch), L, 1, s.eval_new_tokens) for L, k in eval_prompts.items())
    step = sampling + update + opt
    total = steps * step + evaluations * evaluation
    return [dict(phase="sampling: one generate call", seconds=call,
                 how=f"{n} prefills + {s.new_tokens} decode steps of {n * s.group_size} rows"),
            dict(phase="sampling", seconds=sampling, how=f"{calls} generate calls"),
            dict(phase="update", seconds=update, how=f"{groups} groups, forward + backward"
                 + (" + recompute" if s.grad_checkpointing else "")
                 + (" + reference" if s.reference else "") + (" + old" if old_logprobs else "")),
            dict(phase="optimizer step", seconds=opt, how="read + write weights, grads, state"),
            dict(phase="one RL step", seconds=step, how="sampling + update + optimizer step"),
            dict(phase="one evaluation", seconds=evaluation,
                 how=", ".join(f"{k} prompts at {L}" for L, k in eval_prompts.items())
                 + f", batches of {s.eval_batch}, {s.eval_new_tokens} new tokens"),
            dict(phase="whole run", seconds=total,
                 how=f"{steps} steps + {evaluations} evaluations (LongBench v2 not counted)")]


def longbench_seconds(config, s: Settings, lengths: list) -> float:
    """One LongBench v2 evaluation: each item's prefill at its truncated length, then its answer
    budget decoded alone (greedy-like single rows; longbench.py calls one item at a time)."""
    return sum(prefill_seconds(config, s, L) + decode_seconds(config, s, 1, L, 1,
                                                              LONGBENCH_NEW_TOKENS)
               for L in lengths)


def longbench_cap(args, config) -> tuple:
    """(the longest LongBench v2 prompt in tokens, the window): --longbench-max-len, and the
    window (YaRN's when --yarn) less the answer budget."""
    window = (int(args.yarn_original * args.yarn) if args.yarn else
              getattr(config, "max_position_embeddings", None) or args.longbench_max_len)
    return min(args.longbench_max_len, window - LONGBENCH_NEW_TOKENS), window


def longbench_lengths(args, config) -> tuple:
    """(prompt tokens per item at the chosen truncation, how they were found). A local file:
    each item's characters / CHARS_PER_TOKEN; the hub's 503 items (not read by --plan): each at
    the cap, since almost all are longer than any window here (an upper bound)."""
    cap, window = longbench_cap(args, config)
    if args.longbench != "hub" and Path(args.longbench).exists():
        items = load_longbench(args.longbench)
        chars = [sum(len(str(i[k])) for k in ("context", "question", "choice_A", "choice_B",
                                               "choice_C", "choice_D")) for i in items]
        return ([min(cap, int(c / CHARS_PER_TOKEN)) for c in chars],
                f"{len(items)} items of {args.longbench}, characters / {CHARS_PER_TOKEN}, "
                f"capped at {cap} ({why(args, window)})")
    return [cap] * LONGBENCH_HUB_ITEMS, (f"{LONGBENCH_HUB_ITEMS} hub items, each at the cap {cap} "
                                         f"({why(args, window)})")


def why(args, window: int) -> str:
    """The cap's two stated choices: the truncation and the window (YaRN or not)."""
    return (f"--longbench-max-len {args.longbench_max_len}, window {window}"
            + (f" with YaRN x{args.yarn:g}" if args.yarn else ", no YaRN"))


def time_plan_for_args(args) -> list:
    """The run's rows with two times each: "expected" (completions of --expected-new-tokens)
    and "worst" (every completion at --max-new-tokens); every evaluation (RULER, and LongBench
    v2 with --longbench) and every checkpoint write counted in the whole run."""
    s, config = settings_for_args(args), model_config(args.model)
    evals = (2 + (max(0, (args.steps - 1) // args.eval_every) if args.eval_every else 0)
             if args.eval else 0)
    old = bool(args.mu > 1 or (args.mini_batch_groups and args.mini_batch_groups
                               < args.prompts_per_step))
    ruler = {L: args.eval_samples * len(args.eval_tasks) for L in args.eval_lengths}
    expected = args.expected_new_tokens or args.max_new_tokens // 2
    cases = {name: time_plan(config, replace(s, new_tokens=T), args.prompts_per_step,
                             args.steps, old, ruler, evals)
             for name, T in (("expected", expected), ("worst", args.max_new_tokens))}
    rows = [dict(r, worst=w["seconds"], expected=r["seconds"])
            for r, w in zip(cases["expected"], cases["worst"]) if r["phase"] != "whole run"]
    extra = []
    if args.eval and args.longbench:
        lengths, how = longbench_lengths(args, config)
        t = longbench_seconds(config, s, lengths)
        extra.append(dict(phase="one LongBench v2 evaluation", expected=t, worst=t, how=how))
        extra.append(dict(phase="LongBench v2, every evaluation", expected=t * evals,
                          worst=t * evals, how=f"{evals} evaluations"))
    n, (w, _, st, _) = param_counts(config)["total"], OPTIMIZERS[s.optimizer]  # bytes per param
    saves = args.steps // args.save_every + (args.steps % args.save_every > 0) \
        if args.save_every else 1
    write = saves * n * (w + st) / DISK_WRITE_BPS
    extra.append(dict(phase="checkpoint writes", expected=write, worst=write,
                      how=f"{saves} x {n * (w + st) / 1e9:.1f} GB at {DISK_WRITE_BPS / 1e9:.0f} "
                          "GB/s"))
    whole = {k: next(r for r in cases[k] if r["phase"] == "whole run")["seconds"]
             + sum(r[k] for r in extra if r["phase"] != "one LongBench v2 evaluation")
             for k in cases}
    return rows + extra + [dict(phase="whole run", **whole,
                                how=f"{args.steps} steps + {evals} evaluations + checkpoint "
                                    f"writes; expected: {expected} new tokens per completion")]


def human(t: float) -> str:
    return f"{t:.1f} s" if t < 120 else f"{t / 60:.1f} min" if t < 7200 else f"{t / 3600:.1f} h"


def format_time_plan(rows: list, s: Settings) -> str:
    g = GPUS[s.gpu]
    lines = [f"Time plan on one {g['name']} (an ESTIMATE: {g['tflops']:.0f} dense bf16 TFLOP/s "
             f"at {MATMUL_EFFICIENCY:.0%}, {g['tbps']} TB/s at {BANDWIDTH_EFFICIENCY:.0%}, "
             f"{LAUNCHES_PER_LAYER} kernel launches per layer per decode step at "
             f"{LAUNCH_SECONDS * 1e6:.1f} us; python -m bench.gpu_check measures it)",
             "| phase | expected | worst case | how |", "|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {human(r['expected'])} | {human(r['worst'])} | "
                     f"{r['how']} |")
    return "\n".join(lines)


def print_time_plan(args) -> None:
    """`python train.py ... --plan`: the time plan, after plan.print_plan's memory plan."""
    print(format_time_plan(time_plan_for_args(args), settings_for_args(args)))
