"""
train.py -- LongAct end to end: saliency -> masks -> (sample groups -> score -> advantages -> masked update)* -> eval.

    python train.py --algo grpo                      # the embedded default on a CPU (make demo)
    python train.py --algo dapo --mask-strategy none # the uniform-update baseline, DAPO
    python train.py --preset paper                   # Qwen3-4B, 16k-token prompts, one large GPU

The algorithm box (LongAct, arXiv 2604.14922; facts.md §1), as `main()` runs it:
    1. statistics  s_c = mean_t |x_t,c| of every q_proj/k_proj output channel on long calibration text   saliency.py
    2. masks       keep the top 30% rows of every W_Q, W_K; all other parameters train normally          masking.py
    3. repeat:     sample G completions for each of B long-context prompts                              rollout.py
                   reward = the benchmark's own scorer on each completion                               evaluate.py
                   advantages per group; GRPO or DAPO loss; backward; masked AdamW step               grpo.py / dapo.py
    4. evaluate    RULER at the training length and at 2x it, before -> after

Choices (the paper's full text is not available to us; each is a flag):
  1. choice: calibration text = the RULER essay haystack at the training length, 8 windows (--calib-*), computed once
     before RL and saved in the run folder (a resumed run reuses the same masks).
  2. choice: training data = RULER's multi-key needle task (a needle with distractor needles) generated from the
     shipped haystack with seeds disjoint from every evaluation seed; a local JSONL / hub dataset also works.
  3. choice: reward = the evaluation scorer itself (fraction of reference strings found, RULER's string_match_all;
     letter match for multiple choice). No format reward.
  4. choice: the reference model for GRPO's KL (beta > 0) is the initial policy, reloaded from --model.
  5. choice: CPU defaults are scaled down to finish in minutes (B=4 prompts x G=8, 1k-token prompts, 12 steps,
     lr 5e-5); `--preset paper` restores the paper-scale setting (see README for its memory budget).
  6. choice: bf16 autocast for compute with fp32 master weights and optimizer state; one optimisation pass (mu=1)
     per batch, so old log-probs equal the current ones (ratio 1) unless --mu > 1.

What a correct `make demo` prints (2-core CPU, 16.7 min in all; each step ~45-65 s: half sampling, half update):
    step    0 | reward 0.281 acc 0.281 len  16.1 ... kl 0.0000 gnorm 3.311 lr 2.5e-05 qk-train 0.30 | ...
    step    5 | reward 1.000 acc 1.000 len   9.8 ... kl 0.2160 ...
    niah_multikey_1@1024   83.33 -> 100.00,  niah_multikey_2@1024   16.67 -> 91.67   (README, "Measured")
Training reward rises from ~0.3-0.7 to ~1.0 within 5 steps; the KL to the initial policy stays below ~0.4.

Outputs in --out-dir/RUN: config.json, qk_stats.safetensors, masks.safetensors, metrics.jsonl (one line per step),
samples.jsonl (a few completions per step), eval.json, ckpt/ (weights + optimizer + scheduler + RNG + step + config).
"""

import argparse
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import torch

import dapo
import evaluate
import grpo
import masking
import rollout
import saliency

# -----------------------------------------------------------------------------
# config: one block, grouped by topic. Presets change defaults only; explicit flags always win.

PRESETS = {
    "cpu": {},
    "paper": dict(model="Qwen/Qwen3-4B", train_len=16384, calib_len=16384, calib_samples=8, prompts_per_step=32,
                  group_size=8, max_new_tokens=1024, lr=1e-6, warmup_steps=10, steps=200, weight_decay=0.1,
                  grad_checkpointing=True, eval_lengths=[16384, 32768], eval_samples=50, eval_every=50,
                  longbench="hub", micro_groups=1, save_every=25, max_gen_batches=10),
}
ALGO_DEFAULTS = {  # GRPO (DeepSeekMath) vs DAPO (arXiv 2503.14476 §3); facts.md §2-3
    "grpo": dict(eps_high=0.2, beta=0.04, aggregation="seq-mean-token-mean", dynamic_sampling=False,
                 overlong_buffer=0),
    "dapo": dict(eps_high=0.28, beta=0.0, aggregation="token-mean", dynamic_sampling=True, overlong_buffer=-1),
}
# What a resumed run must share with the run it continues (else its masks/weights would not belong together).
RESUME_KEYS = ("model", "mask_strategy", "ratio", "stat", "per_head", "stats", "calib_len", "calib_samples", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="a set of defaults (flags override)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=rollout.DEFAULT_MODEL, help="embedded name, hub id or local HF folder")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", help="compute in fp32 (default: bf16 autocast)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (long prompts)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    g = p.add_argument_group("LongAct")
    g.add_argument("--mask-strategy", default="topk", choices=["topk", "random", "bottomk", "none"],
                   help="which q/k rows train: top-k by saliency (LongAct), random/bottom-k ablations, none = all rows")
    g.add_argument("--ratio", type=float, default=0.3, help="share of rows of each W_Q/W_K that train (paper: 30%%)")
    g.add_argument("--stat", default="mean_abs", choices=["mean_abs", "l2", "max_abs"], help="channel saliency")
    g.add_argument("--per-head", action="store_true", help="take the top share within each head")
    g.add_argument("--stats", default=None, help="reuse a saliency.py statistics file instead of computing one")
    g.add_argument("--calib-len", type=int, default=1024, help="tokens per calibration prompt")
    g.add_argument("--calib-samples", type=int, default=8, help="number of calibration prompts")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algo", default="grpo", choices=["grpo", "dapo"])
    g.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
    g.add_argument("--clip-eps", type=float, default=0.2, help="lower clip epsilon (both sides for GRPO)")
    g.add_argument("--eps-high", type=float, default=None, help="upper clip epsilon (DAPO clip-higher: 0.28)")
    g.add_argument("--beta", type=float, default=None, help="KL coefficient to the reference (GRPO 0.04, DAPO 0)")
    g.add_argument("--aggregation", default=None, choices=list(grpo.AGGREGATIONS), help="loss aggregation")
    g.add_argument("--adv-scale", default="group", choices=list(grpo.SCALES), help="advantage normalisation")
    g.add_argument("--mu", type=int, default=1, help="optimisation passes per batch (GRPO's mu)")
    g.add_argument("--dynamic-sampling", type=int, default=None, help="DAPO: keep only informative groups (1/0)")
    g.add_argument("--max-gen-batches", type=int, default=3, help="DAPO: bound on generation batches per step")
    g.add_argument("--overlong-buffer", type=int, default=None,
                   help="DAPO: soft overlong buffer in tokens (0 = off; DAPO default: a fifth of --max-new-tokens, "
                        "the recipe's 4096 of 20480)")
    g.add_argument("--overlong-factor", type=float, default=1.0, help="DAPO: overlong penalty at max length")
    g.add_argument("--filter-truncated", action="store_true", help="drop truncated completions from the loss")
    g = p.add_argument_group("data")
    g.add_argument("--train-data", default="builtin", help="'builtin' (synthetic RULER-style), a .jsonl file or hub id")
    g.add_argument("--train-task", default="niah_multikey_1", help="builtin task generating training prompts")
    g.add_argument("--train-len", type=int, default=1024, help="prompt length in tokens for builtin tasks")
    g.add_argument("--field-map", default="", help="JSONL/hub fields, e.g. context=doc,question=q,answer=ans")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompts-per-step", type=int, default=4, help="B prompts (groups) per step")
    g.add_argument("--max-new-tokens", type=int, default=32, help="completion budget")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g = p.add_argument_group("optimiser")
    g.add_argument("--steps", type=int, default=12)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--warmup-steps", type=int, default=2, help="linear warm-up, then constant")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled decay (DAPO recipe: 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--micro-groups", type=int, default=1, help="groups per micro-batch (gradient accumulation)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-tasks", nargs="+", default=["niah_multikey_1", "niah_multikey_2"],
                   help="RULER tasks (held-out seeds): the trained task and a harder one with a haystack of needles")
    g.add_argument("--eval-lengths", type=int, nargs="+", default=None, help="default: train length and 2x")
    g.add_argument("--eval-samples", type=int, default=12, help="samples per task and length")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = before and after only)")
    g.add_argument("--no-eval", dest="eval", action="store_false", help="skip evaluation (tests)")
    g.add_argument("--longbench", default=None, help="also evaluate LongBench v2 from this file or 'hub'")
    g.add_argument("--longbench-max-len", type=int, default=120000, help="middle-truncation length (official)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--out-dir", default="runs")
    g.add_argument("--run-name", default=None, help="default: <algo>-<mask-strategy>-seed<seed>-<date-time>")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    g.add_argument("--resume", default=None, help="a run folder to continue exactly")
    g.add_argument("--seed", type=int, default=0)
    first, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS[first.preset])
    args = p.parse_args(argv)
    for k, v in ALGO_DEFAULTS[args.algo].items():  # algorithm defaults fill only what the user left unset
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.overlong_buffer < 0:
        args.overlong_buffer = max(1, args.max_new_tokens // 5)
    args.eval_lengths = args.eval_lengths or [args.train_len, 2 * args.train_len]
    args.run_name = args.run_name or f"{args.algo}-{args.mask_strategy}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


# -----------------------------------------------------------------------------
# small utilities

def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def step_seed(seed: int, step: int, attempt: int = 0) -> int:
    """Every random choice of a step derives from (run seed, step, generation attempt): resumable and printable."""
    return (seed * 1_000_003 + step * 10_007 + attempt * 101) % (2**31 - 1)


def autocast(args):
    """bf16 autocast for compute, fp32 master weights (choice 6); a no-op context with --no-bf16."""
    return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)


# -----------------------------------------------------------------------------
# run folder, config and resume

def prepare_run(args) -> Path:
    """Create (or, with --resume, check) the run folder; write config.json. Refuses a resume with another model/mask."""
    if args.resume:
        run_dir = Path(args.resume)
        saved = json.loads((run_dir / "config.json").read_text())
        changed = {k: (saved.get(k), getattr(args, k)) for k in RESUME_KEYS if saved.get(k) != getattr(args, k)}
        if changed:
            raise SystemExit(f"refusing to resume {run_dir}: these settings differ from the saved run "
                             f"(saved -> now): {changed}. Start a new run or pass the same flags.")
    else:
        run_dir = Path(args.out_dir) / args.run_name
        if (run_dir / "ckpt").exists():
            raise SystemExit(f"{run_dir} already holds a checkpoint; pass --resume {run_dir} or another --run-name")
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(vars(args), indent=2))
    return run_dir


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, scheduler, step: int, args) -> None:
    """weights + optimizer + scheduler + RNG + step + config into ckpt/, via a temp folder and renames.

    At every instant either ckpt/ or ckpt.old/ is a complete checkpoint, so a kill while saving never loses the last
    good one (load_checkpoint falls back to ckpt.old/)."""
    tmp, final, old = run_dir / "ckpt.tmp", run_dir / "ckpt", run_dir / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, "config": vars(args)},
               tmp / "trainer_state.pt")
    (tmp / "config.json.run").write_text(json.dumps(vars(args), indent=2))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(run_dir: Path) -> Path:
    for name in ("ckpt", "ckpt.old"):
        if (run_dir / name / "trainer_state.pt").exists():
            return run_dir / name
    raise SystemExit(f"no complete checkpoint in {run_dir} (looked for ckpt/ and ckpt.old/)")


def resume_state(run_dir: Path, optimizer, scheduler):
    """Optimizer, scheduler and RNG state and the next step from the last good checkpoint; past evaluations."""
    state = torch.load(checkpoint_dir(run_dir) / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    evals = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
    print(f"resuming {run_dir} at step {state['step']}")
    return state["step"], evals


def reference_model(args):
    """GRPO's KL reference: the initial policy, frozen (choice 4). bf16 on a GPU (it only runs forwards under bf16
    autocast anyway, and halves its memory: 8 GB instead of 16 GB for Qwen3-4B); fp32 on a CPU, so that the KL is
    exactly 0 before the first update."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    ref, _ = rollout.load_policy(args.model, dtype=dtype, device=args.device)
    ref.eval().requires_grad_(False)
    return ref


# -----------------------------------------------------------------------------
# LongAct steps 1-2: statistics -> masks

def longact_masks(model, tokenizer, args, run_dir: Path) -> dict:
    """Row masks for every q/k matrix, computed once per run and saved (a resumed run loads the same file)."""
    mask_file = run_dir / "masks.safetensors"
    if mask_file.exists() and args.resume:
        masks, _ = masking.load_masks(mask_file)
        masking.check_masks(model, masks)
        return masks
    if args.stats:
        stats, meta = saliency.load_stats(args.stats, model)
    else:
        prompts = evaluate.calibration_prompts(tokenizer, args.calib_len, args.calib_samples, seed=args.seed)
        batches = [{"input_ids": torch.tensor([p], device=args.device)} for p in prompts]
        with autocast(args):
            stats = saliency.collect_qk_stats(model, batches, stat=args.stat)
        meta = {"model": args.model, "stat": args.stat, "num_samples": str(len(prompts)),
                "num_tokens": str(sum(map(len, prompts))), "seq_len": str(args.calib_len),
                "head_dim": str(saliency.head_dim_of(model.config))}
        saliency.save_stats(run_dir / "qk_stats.safetensors", stats, meta)
    strategy = "all" if args.mask_strategy == "none" else args.mask_strategy
    masks = masking.build_masks(stats, ratio=1.0 if strategy == "all" else args.ratio, strategy=strategy,
                                per_head=args.per_head, head_dim=saliency.head_dim_of(model.config), seed=args.seed)
    masking.save_masks(mask_file, masks, {"strategy": strategy, "ratio": str(args.ratio), "model": args.model})
    return masks


def make_optimizer(model, masks: dict, args):
    """AdamW over masking.param_groups (masked rows stay bit-identical) and a linear warm-up schedule."""
    masking.attach_grad_masks(model, masks)  # masked gradient rows become exact zeros in every backward
    optimizer = torch.optim.AdamW(masking.param_groups(model, masks, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.999), eps=1e-8, foreach=False)
    warm = max(1, args.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    return optimizer, scheduler


# -----------------------------------------------------------------------------
# training data: the builtin RULER-style task, or any dataset with context/question/answer (or choices) fields

QA_TEMPLATE = ("Read the following text and answer the question.\n\n{context}\n\nQuestion: {question}")
DEFAULT_FIELDS = {"context": "context", "question": "question", "answer": "answer", "choices": "choices"}


def parse_field_map(spec: str) -> dict:
    """'context=doc,answer=ans' -> the default mapping with those fields renamed."""
    fields = dict(DEFAULT_FIELDS)
    for part in filter(None, spec.split(",")):
        key, _, name = part.partition("=")
        if key not in fields or not name:
            raise SystemExit(f"--field-map: bad entry {part!r}; expected one of {sorted(fields)}=<field name>")
        fields[key] = name
    return fields


def row_to_sample(row: dict, n: int, fields: dict, source: str, tokenizer, max_len: int):
    """A dataset row -> evaluate.Sample. Multiple choice (a choices list, or LongBench v2's choice_A..D) is scored
    by the letter; free answers (a string or a list of acceptable strings) by RULER's string_match_part."""
    def need(key):
        if fields[key] not in row or row[fields[key]] in (None, ""):
            raise ValueError(f"{source}: row {n}: missing field '{fields[key]}' (the {key}; see --field-map)")
        return row[fields[key]]
    context, question, answer = need("context"), need("question"), need("answer")
    choices = row.get(fields["choices"]) or ([row[f"choice_{c}"] for c in "ABCD"] if "choice_A" in row else None)
    if choices:
        if len(choices) != 4 or answer not in ("A", "B", "C", "D"):
            raise ValueError(f"{source}: row {n}: expected 4 choices and an answer letter A-D, got "
                             f"{len(choices)} choices and answer {answer!r}")
        item = {"_id": str(n), "domain": "", "sub_domain": "", "difficulty": "", "length": "", "context": context,
                "question": question, "answer": answer, **{f"choice_{c}": x for c, x in zip("ABCD", choices)}}
        return evaluate.longbench_sample(item, n, tokenizer, max_len=max_len)
    refs = [answer] if isinstance(answer, str) else [str(a) for a in answer]
    return evaluate.Sample("train", "qa", 0, n, 0, QA_TEMPLATE.format(context=context, question=question),
                           "Answer:", refs, "string_match_part", 32)


def load_train_data(args, tokenizer):
    """None for the builtin generator (samples are drawn per step); else the list of samples of the dataset."""
    if args.train_data == "builtin":
        evaluate.check_ruler_args([args.train_task], [args.train_len])
        return None
    fields, path = parse_field_map(args.field_map), Path(args.train_data)
    if path.exists():
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: row {n}: invalid JSON ({e.msg})") from None
    else:  # a hub dataset id (needs the network)
        from datasets import load_dataset
        rows = list(load_dataset(args.train_data, split="train"))
    samples = [row_to_sample(row, n, fields, str(path), tokenizer, args.train_len) for n, row in enumerate(rows, 1)]
    if not samples:
        raise ValueError(f"{path}: no rows")
    return samples


def draw_samples(data, tokenizer, args, seed: int, num: int) -> list:
    """`num` training samples for one generation batch, a pure function of `seed`. Builtin samples use seeds
    >= evaluate.TRAIN_SEED_START, disjoint from every evaluation seed."""
    if data is None:
        return [evaluate.ruler_sample(tokenizer, args.train_task, args.train_len, seed=evaluate.TRAIN_SEED_START + seed,
                                      index=i) for i in range(num)]
    rng = random.Random(seed)
    return [data[rng.randrange(len(data))] for _ in range(num)]


# -----------------------------------------------------------------------------
# LongAct step 3a: prompts -> groups of completions -> rewards

def sample_and_score(model, tokenizer, samples: list, args, seed: int, index_offset: int):
    """G completions per sample; scores from evaluate.py's scorer (the same one the benchmark tables use)."""
    prompts = [rollout.build_prompt_ids(tokenizer, s.prompt, chat=True, answer_prefix=s.answer_prefix)
               for s in samples]
    with autocast(args):
        r = rollout.sample_groups(model, tokenizer, prompts, args.group_size, args.max_new_tokens, args.temperature,
                                  args.top_p, seed=seed, index_offset=index_offset)
    G = args.group_size
    scores = torch.tensor([evaluate.score(samples[i // G], text) for i, text in enumerate(r.texts)])  # (B,)
    rewards = scores.clone()
    if args.overlong_buffer > 0:  # DAPO §3.4 soft overlong punishment, on top of the task score
        penalty, _ = dapo.overlong_penalty(r.lengths, args.max_new_tokens, args.overlong_buffer, args.overlong_factor)
        rewards = rewards + penalty
    return r, rewards, scores


def collect_batch(model, tokenizer, data, args, step: int):
    """One step's groups. GRPO: one generation batch. DAPO dynamic sampling (§3.2): drop groups whose scores are all
    equal (zero advantage, zero gradient) and draw more prompts until B informative groups, at most
    --max-gen-batches generation batches; then truncate to B."""
    B, G = args.prompts_per_step, args.group_size
    parts, seen, all_equal = [], 0, 0
    for attempt in range(args.max_gen_batches if args.dynamic_sampling else 1):
        seed = step_seed(args.seed, step, attempt)
        samples = draw_samples(data, tokenizer, args, seed, B)
        r, rewards, scores = sample_and_score(model, tokenizer, samples, args, seed, index_offset=0)
        informative, _ = dapo.keep_informative_groups(scores, G)  # (B groups,) on the task score, as verl's "acc"
        seen, all_equal = seen + B, all_equal + int((~informative).sum())  # logged for GRPO too (zero-gradient share)
        keep = informative if args.dynamic_sampling else torch.ones(B, dtype=torch.bool)
        idx = keep.nonzero().flatten().tolist()
        parts.append((rollout.select_groups(r, idx), rewards.view(B, G)[idx], scores.view(B, G)[idx],
                      [samples[i] for i in idx]))
        if sum(len(p[3]) for p in parts) >= B:
            break
    r = rollout.concat_rollouts([p[0] for p in parts], tokenizer.pad_token_id)
    n = min(B, len(r.prompt_ids))
    r = rollout.select_groups(r, list(range(n)))
    rewards = torch.cat([p[1] for p in parts])[:n].flatten()  # (n*G,)
    scores = torch.cat([p[2] for p in parts])[:n].flatten()
    samples = [s for p in parts for s in p[3]][:n]
    info = {"gen_batches": attempt + 1, "groups_seen": seen, "frac_all_equal": all_equal / seen}
    return r, rewards, scores, samples, info


# -----------------------------------------------------------------------------
# LongAct step 3b: the masked policy update

def loss_fn(logp, old_logp, ref_logp, adv, mask, counts, args):
    """GRPO or DAPO objective on one micro-batch, normalised by the WHOLE step's counts (micro-batch invariant)."""
    num_tokens, num_seqs = counts
    if args.algo == "dapo":
        return dapo.dapo_loss(logp, old_logp, adv, mask, eps_low=args.clip_eps, eps_high=args.eps_high,
                              num_tokens=num_tokens)
    return grpo.grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps=args.clip_eps, beta=args.beta,
                          aggregation=args.aggregation, max_len=args.max_new_tokens, num_tokens=num_tokens,
                          num_seqs=num_seqs)


def policy_update(model, ref_model, optimizer, scheduler, r, adv, args) -> dict:
    """mu passes over micro-batches of whole groups; gradient accumulation; clip; masked AdamW step."""
    G, N = r.group_size, len(r.prompt_ids)
    mask = r.completion_mask
    if args.filter_truncated:
        mask, _ = dapo.truncation_mask(mask, r.truncated)
    counts = grpo.batch_counts(mask)
    model.train()
    with torch.no_grad(), autocast(args):  # log-probs of the sampling policy and of the reference, once per batch
        old = rollout.completion_logprobs(model, r, args.temperature) if args.mu > 1 else None
        ref = rollout.completion_logprobs(ref_model, r, args.temperature) if ref_model is not None else None
    stats, lr = [], optimizer.param_groups[0]["lr"]
    for _ in range(args.mu):
        optimizer.zero_grad(set_to_none=True)
        for g0 in range(0, N, args.micro_groups):
            rows = slice(g0 * G, min(N, g0 + args.micro_groups) * G)  # whole groups only
            sub = rollout.select_groups(r, list(range(g0, min(N, g0 + args.micro_groups))))
            with autocast(args):
                logp = rollout.completion_logprobs(model, sub, args.temperature)  # (b, T) with gradients
            old_lp = old[rows] if old is not None else logp.detach()  # mu = 1: on-policy, ratio exactly 1
            ref_lp = ref[rows] if ref is not None else None
            loss, m = loss_fn(logp, old_lp, ref_lp, adv[rows], mask[rows], counts, args)
            loss.backward()  # no extra scaling: the loss already divides by the whole batch's counts
            stats.append(m | {"loss": loss.item()})
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # masked rows count as 0
        masking.apply_row_weight_decay(optimizer)  # AdamW's decay on trainable q/k rows only (masking.py)
        optimizer.step()
    scheduler.step()
    w = [s.get("num_tokens", 1) for s in stats]  # token-weighted means of the per-micro-batch metrics
    out = {k: sum(s[k] * wi for s, wi in zip(stats, w)) / max(1, sum(w))
           for k in stats[0] if k not in ("num_tokens", "loss") and isinstance(stats[0][k], (int, float))}
    loss = sum(s["loss"] for s in stats) / args.mu  # micro-batch losses are parts of one sum: add, then per pass
    return out | {"loss": loss, "grad_norm": float(grad_norm), "lr": lr}


def rl_step(model, ref_model, tokenizer, optimizer, scheduler, data, args, step: int, run_dir: Path):
    """One RL step: sample groups and score them, advantages per group, one masked GRPO/DAPO update."""
    t = time.time()
    r, rewards, scores, samples, info = collect_batch(model, tokenizer, data, args, step)
    t_sample = time.time() - t
    if len(r.prompt_ids) == 0:
        print(f"step {step}: no informative group in {info['gen_batches']} generation batches; update skipped")
        return None
    t = time.time()
    adv, _ = grpo.group_advantages(rewards, args.group_size, scale=args.adv_scale)  # (B,) one per completion
    t_score = time.time() - t
    t = time.time()
    upd = policy_update(model, ref_model, optimizer, scheduler, r, adv, args)
    G = r.group_size
    for i in (0, len(r.texts) - 1):  # two completions per step, to read what the policy writes
        append_jsonl(run_dir / "samples.jsonl", {"step": step, "row": i, "references": samples[i // G].references,
                                                 "score": float(scores[i]), "completion": r.texts[i]})
    return {"step": step, "reward": float(rewards.mean()), "acc": float((scores >= 1).float().mean()),
            "len": float(r.lengths.float().mean()), "frac_truncated": float(r.truncated.float().mean()),
            "t_sample": t_sample, "t_score": t_score, "t_update": time.time() - t} | info | upd


# -----------------------------------------------------------------------------
# evaluation, logging

def run_eval(model, tokenizer, args) -> dict:
    """RULER at the training length and 2x (length generalisation); LongBench v2 when --longbench is given.
    Returns {"task@length": score in percent}. Evaluation seeds are evaluate.py's, disjoint from training seeds."""
    model.eval()
    with autocast(args):
        table, _ = evaluate.evaluate_ruler(model, tokenizer, args.eval_tasks, args.eval_lengths, args.eval_samples,
                                           seed=0)
        out = {f"{t}@{n}": s for t, row in table["scores"].items() for n, s in row.items()}
        out.update({f"ruler_avg@{n}": s for n, s in table["average"].items()})
        if args.longbench:
            items = evaluate.load_longbench(None if args.longbench == "hub" else args.longbench)
            lb, _ = evaluate.evaluate_longbench(model, tokenizer, items, max_len=args.longbench_max_len)
            out.update({f"longbench_v2/{k}": v for k, v in lb.items() if isinstance(v, (int, float))})
    return out


def format_before_after(before: dict, after: dict) -> str:
    lines = [f"{'metric':<32} {'before':>8} {'after':>8} {'delta':>8}"]
    for k in before:
        lines.append(f"{k:<32} {before[k]:8.2f} {after[k]:8.2f} {after[k] - before[k]:+8.2f}")
    return "\n".join(lines)


def log_step(run_dir: Path, step: int, row: dict) -> None:
    """One line per step on stdout, the same as JSON in metrics.jsonl."""
    print(f"step {step:4d} | reward {row['reward']:.3f} acc {row['acc']:.3f} len {row['len']:5.1f} "
          f"trunc {row['frac_truncated']:.2f} eq-groups {row['frac_all_equal']:.2f} | loss {row.get('loss', 0):+.4f} "
          f"clip {row.get('clip_frac_low', 0):.3f}/{row.get('clip_frac_high', 0):.3f} kl {row.get('kl', 0):.4f} "
          f"gnorm {row.get('grad_norm', 0):.3f} lr {row.get('lr', 0):.1e} qk-train {row['qk_trainable']:.2f} | "
          f"t sample {row['t_sample']:.1f}s score {row['t_score']:.1f}s update {row['t_update']:.1f}s", flush=True)
    append_jsonl(run_dir / "metrics.jsonl", row)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and exits cleanly.
    A context manager: the previous handlers come back on exit."""
    def __enter__(self):
        self.set, self.old = False, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.old:
            signal.signal(s, self.handler)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def handler(self, signum, frame):
        print(f"\nsignal {signum}: finishing this step, saving a checkpoint, then exiting", flush=True)
        self.set = True


# -----------------------------------------------------------------------------
# main: the algorithm box

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    run_dir = prepare_run(args)
    t0 = time.time()
    model, tokenizer = rollout.load_policy(str(checkpoint_dir(run_dir)) if args.resume else args.model,
                                           device=args.device)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    masks = longact_masks(model, tokenizer, args, run_dir)  # 1-2. saliency statistics -> row masks
    _, qk_share = masking.mask_summary(masks)
    optimizer, scheduler = make_optimizer(model, masks, args)
    start, evals = resume_state(run_dir, optimizer, scheduler) if args.resume else (0, {})
    ref_model = reference_model(args) if args.algo == "grpo" and args.beta > 0 else None
    data = load_train_data(args, tokenizer)
    print(f"run {run_dir} | {args.algo} | mask {args.mask_strategy} ratio {args.ratio} -> {qk_share:.1%} of q/k rows "
          f"train | B={args.prompts_per_step} G={args.group_size} steps {start}..{args.steps}", flush=True)
    if args.eval and "before" not in evals:
        evals["before"] = run_eval(model, tokenizer, args)  # 4. (before)
        atomic_write_text(run_dir / "eval.json", json.dumps(evals, indent=2))
    with StopFlag() as stop:
        for step in range(start, args.steps):  # 3. the RL loop
            row = rl_step(model, ref_model, tokenizer, optimizer, scheduler, data, args, step, run_dir)
            if row is not None:
                row.update(qk_trainable=qk_share, elapsed=time.time() - t0)
                log_step(run_dir, step, row)
            if args.eval and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                evals[f"step{step + 1}"] = run_eval(model, tokenizer, args)
                atomic_write_text(run_dir / "eval.json", json.dumps(evals, indent=2))
            if stop.set or (args.save_every and (step + 1) % args.save_every == 0):
                save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, step + 1, args)
            if stop.set:
                return run_dir
    save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, args.steps, args)
    if args.eval:
        evals["after"] = run_eval(model, tokenizer, args)  # 4. (after)
        atomic_write_text(run_dir / "eval.json", json.dumps(evals, indent=2))
        print(format_before_after(evals["before"], evals["after"]))
    print(f"done in {time.time() - t0:.0f} s; run folder {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
