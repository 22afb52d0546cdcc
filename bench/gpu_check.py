"""
bench/gpu_check.py -- the paper run, shortened, on one GPU: train.main itself with a GPU preset's
settings, its measured time and peak memory per phase next to the plan's.

The largest preset whose plan fits the card runs (paper-8b on an H200; on an 80 GB card Qwen3-4B
with the bf16 optimizer), on random weights from the model's published config and a byte-level
tokenizer built here (no network, no model wheel), shortened to: one generate call's groups of
full-length prompts and completions (a random model never stops: every completion at the limit),
one update, one evaluation batch of RULER at the longest length and one LongBench v2 item at the
cap, a checkpoint (of the q/k rows' optimizer only when the disk cannot hold a full one), and a
resume that loads it. Its own time, estimated by plumbing/timeplan.py, must fit 5 minutes.

    python -m bench.gpu_check            # on the GPU: figures/gpu_check.json and .md
    python -m bench.gpu_check --dry-run  # the same code on the CPU, a tiny Qwen3 (in make test)
    make gpu-wheels                      # the locked wheels a GPU node without network needs

Letters: P prompt tokens, G completions per prompt, T new tokens.
"""

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, `import train` would not find the repository's modules
    sys.exit("run from the repository root as a module: python -m bench.gpu_check")

import torch
import transformers

import train
from plumbing import common, plan, policy, report, timeplan
from plumbing.common import write_json_atomic, write_text_atomic

BUDGET_S = 300  # the check must fit 5 minutes by the plan: a rerun fits a 15-minute rental
CANDIDATES = [("paper-8b", []), ("paper", ["--optimizer", "bf16-sr"]), ("paper", [])]
TINY = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=2048, tie_word_embeddings=False)  # 8B's shape, small
DRY = ["--train-len", "1024", "--calib-len", "64", "--max-new-tokens", "8", "--group-size", "4",
       "--eval-lengths", "1024", "--prompts-per-step", "4", "--longbench-max-len", "600"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (ids 0-255 the bytes, 256-258 Qwen's chat tokens) saved in
    `folder`: real text in, one token per byte, every id inside Qwen3's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, chat_template=CHAT)
    fast.save_pretrained(folder)


def capacity_gb(device, dry: bool) -> float:
    """The card's memory (the dry run: a stated 0.2 GB, so that its plan splits too)."""
    return 0.2 if dry else torch.cuda.get_device_properties(device).total_memory / plan.GB


class card:
    """Within: the plan's GPU `key` (its speeds) has `gb` of memory, the card's own."""

    def __init__(self, key: str, gb: float):
        self.key, self.gb, self.saved = key, gb, dict(plan.GPUS[key])

    def __enter__(self):
        plan.GPUS[self.key]["gb"] = self.gb

    def __exit__(self, *exc):
        plan.GPUS[self.key].update(self.saved)


def choose(gb: float, dry: bool) -> tuple:
    """(argv, parsed args, config): the first candidate whose planned largest phase fits 90% of
    `gb`, with the groups per call and evaluation batch the plan gives for that card."""
    key = "h200" if gb >= 130 else "h100"  # the speeds the time plan uses
    for preset, extra in CANDIDATES:
        argv = ["--preset", preset, *extra, "--gpu", key] + (DRY if dry else [])
        with card(key, gb):
            args = train.parse_args(argv)
        config = transformers.Qwen3Config(**TINY) if dry else policy.model_config(args.model)
        top = max(plan.memory_peaks(plan.plan(config, plan.settings_for_args(args))).values())
        if top <= 0.9 * gb:
            return argv, args, config
    raise SystemExit(f"no preset's plan fits {gb:.1f} GB")


def shortened(argv: list, args, folder: Path, device, disk_free: float, config) -> list:
    """The chosen run cut to one generate call's groups, one step, one evaluation batch of each
    benchmark; the q/k rows' optimizer state only when a full checkpoint would not fit the disk."""
    one = next(r["bytes"] for r in plan.plan(config, plan.settings_for_args(args))
               if r["item"] == "one checkpoint")
    weights = 2 * plan.param_counts(config)["total"]
    scope = ["--train-scope", "qk"] if weights + one > 0.9 * disk_free else []
    return argv + scope + [
        "--model", str(folder / "model"), "--device", str(device), "--steps", "1",
        "--prompts-per-step", str(args.gen_groups), "--gen-groups", str(args.gen_groups),
        "--eval-tasks", "niah_multikey_2", "--eval-lengths", str(max(args.eval_lengths)),
        "--eval-samples", str(args.eval_batch), "--eval-batch", str(args.eval_batch),
        "--calib-samples", "1", "--save-every", "1", "--keep-checkpoints", "1",
        "--longbench", str(folder / "longbench.jsonl"), "--before-eval",
        str(folder / "before.json"), "--out-dir", str(folder / "runs"), "--run-name", "check"]


def prepare(folder: Path, argv: list, chosen, config, device) -> None:
    """Random weights in the model's dtype (made on the device), the byte tokenizer, one
    LongBench v2 item longer than the cap, and the "before" file (only "after" is evaluated)."""
    dtype = torch.bfloat16 if chosen.optimizer == "bf16-sr" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder / "model")
    del model
    byte_tokenizer(folder / "model")
    item = {"_id": "check", "domain": "d", "sub_domain": "s", "difficulty": "hard",
            "length": "long", "question": "Which colour is the sky?", "choice_A": "blue",
            "choice_B": "green", "choice_C": "red", "choice_D": "black", "answer": "A",
            "context": "The sky is blue and the grass is green. " * (chosen.longbench_max_len
                                                                     // 40)}
    (folder / "longbench.jsonl").write_text(json.dumps(item) + "\n")
    args = train.parse_args(argv)
    args.precision_used = common.choose_precision(args.precision, str(device))[0]
    write_json_atomic(folder / "before.json", {"settings": train.eval_settings(args),
                                               "scores": {}, "items": []})


def planned(args, config) -> dict:
    """The time plan's seconds of each phase of the shortened run, and their sum with the model's
    writing and reading (policy, reference, resume) at the disk's rate."""
    s = plan.settings_for_args(args)
    rows = {r["phase"]: r["seconds"] for r in timeplan.time_plan(
        config, s, args.prompts_per_step, 1, False, {max(args.eval_lengths): args.eval_batch}, 1)}
    lengths = [timeplan.longbench_cap(args, config)[0]]  # the one item, longer than the cap
    one = next(r["bytes"] for r in plan.plan(config, s) if r["item"] == "one checkpoint")
    weights = 2 * plan.param_counts(config)["total"]
    out = {"statistics": args.calib_samples * timeplan.prefill_seconds(config, s, args.calib_len),
           "sampling": rows["sampling"], "update": rows["update"] + rows["optimizer step"],
           "evaluation": rows["one evaluation"] + timeplan.longbench_seconds(config, s, lengths),
           "checkpoint": one / timeplan.DISK_WRITE_BPS,
           "weights written and read 3 times": 4 * weights / timeplan.DISK_WRITE_BPS}
    return out | {"total": sum(out.values())}


# -----------------------------------------------------------------------------
# running and reporting

def part(records: list, name: str, fn, *a):
    """fn(*a), timed; a failure is recorded with its traceback and the check goes on."""
    rec = dict(part=name, seconds=None, error=None, traceback=None)
    records.append(rec)
    start = time.perf_counter()
    try:
        return fn(*a)
    except (Exception, SystemExit) as e:  # noqa: BLE001 -- recorded, and the next part runs
        import traceback
        rec["error"] = ("out of memory" if isinstance(e, torch.OutOfMemoryError)
                        else f"{type(e).__name__}: {e}")[:300]
        rec["traceback"] = traceback.format_exc()
        print(rec["traceback"], file=sys.stderr, flush=True)
        return None
    finally:
        rec["seconds"] = round(time.perf_counter() - start, 1)


def measured(run: Path) -> dict:
    """Seconds and peak GB per phase of the run, from its own files (phases.json, the step's
    t_sample / t_update in metrics.jsonl, memory.json on CUDA)."""
    phases = common.read_json(run / "phases.json")
    step = common.read_jsonl(run / "metrics.jsonl")[0]
    memory = common.read_json(run / "memory.json")["phases"] if (run / "memory.json").exists() \
        else {}
    seconds = {"statistics": phases.get("statistics"), "sampling": step["t_sample"],
               "update": step["t_update"], "evaluation": phases.get("eval after"),
               "checkpoint": phases.get("checkpoint"), "total": phases.get("total")}
    return {"seconds": seconds, "peak_gb": {k: v["measured_gb"] for k, v in memory.items()}}


def table(result: dict) -> str:
    """Markdown: each phase, measured next to the plan (time and peak memory)."""
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    got, plan_s, plan_gb = result["measured"], result["plan_seconds"], result["plan_gb"]
    lines = ["| phase | seconds | plan s (estimate) | peak GB | plan GB |",
             "|---|---:|---:|---:|---:|"]
    for k in plan_s:
        lines.append(f"| {k} | {fmt(got.get('seconds', {}).get(k))} | {fmt(plan_s[k])} | "
                     f"{fmt(got.get('peak_gb', {}).get(k))} | {fmt(plan_gb.get(k))} |")
    return "\n".join(lines)


def environment(device) -> dict:
    env = common.versions() | {"device": str(device), "cpu": common.cpu_name(),
                               "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_total_gb=round(props.total_memory / plan.GB, 1))
    return env


def check(device, dry: bool, work: Path) -> dict:
    """Choose, prepare, run, resume; measured beside planned."""
    gb = capacity_gb(device, dry)
    argv, chosen, config = choose(gb, dry)
    work.mkdir(parents=True, exist_ok=True)
    run_argv = shortened(argv, chosen, work, device, shutil.disk_usage(work).free, config)
    records = []
    part(records, "prepare: random weights, byte tokenizer, data", prepare, work, run_argv,
         chosen, config, device)
    run = part(records, "the run, shortened (train.main)", train.main, run_argv)
    got = measured(run) if run is not None else {}  # before the resume rewrites phases.json
    if run is not None:
        part(records, "resume from its checkpoint (train.main --resume)", train.main,
             run_argv + ["--resume", str(run), "--no-eval"])
    args = train.parse_args(run_argv) if (work / "model").exists() else chosen
    plan_s = planned(args, config)
    note = ("the disk holds no full checkpoint next to the weights: --train-scope qk, so the "
            "update's time and memory are below the full run's (the plan's are the full run's)"
            if args.train_scope == "qk" else "")
    return dict(argv=run_argv, capacity_gb=round(gb, 1), parts=records, note=note,
                measured=got, plan_seconds=plan_s,
                plan_gb=plan.memory_peaks(plan.plan(config, plan.settings_for_args(args))),
                fits_budget=plan_s["total"] <= BUDGET_S)


def main(argv=None):
    p = argparse.ArgumentParser(description="The paper run, shortened, on one GPU.")
    p.add_argument("--dry-run", action="store_true", help="a tiny Qwen3 on the CPU, seconds")
    p.add_argument("--out", default=None, help="output prefix (default figures/gpu_check, "
                   "runs/gpu_check_dry for --dry-run)")
    p.add_argument("--work", default="runs/gpu_check_work",
                   help="weights, data and the run's checkpoint while it runs (removed after)")
    a = p.parse_args(argv)
    common.check_torch()
    device = torch.device("cpu" if a.dry_run else "cuda")
    report.configure_allocator(str(device))  # before CUDA starts here, as train.main does
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --dry-run to exercise the code path on the CPU")
    out = a.out or ("runs/gpu_check_dry" if a.dry_run else "figures/gpu_check")
    try:
        result = check(device, a.dry_run, Path(a.work))
    finally:
        shutil.rmtree(a.work, ignore_errors=True)
    result["environment"] = environment(device)
    where = result["environment"].get("gpu", common.cpu_name())
    text = (f"`python -m bench.gpu_check{' --dry-run' * a.dry_run}` on {where}: "
            f"`{' '.join(result['argv'][:6])}"
            f" ...`, planned {result['plan_seconds']['total']:.0f} s of a {BUDGET_S} s budget"
            + (f"; {result['note']}" if result["note"] else "") + "\n\n" + table(result) + "\n")
    write_json_atomic(f"{out}.json", result)
    write_text_atomic(f"{out}.md", text)
    print(text)
    return result


if __name__ == "__main__":
    main()

