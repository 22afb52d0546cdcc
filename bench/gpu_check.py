"""
bench/gpu_check.py -- the paper run, shortened, on one GPU: train.main itself with a GPU preset's
settings, its measured time and peak memory per phase next to the plan's.

The largest preset whose plan fits the card runs (paper-8b on an H200; on an H100 Qwen3-4B with
the bf16 optimizer), on random weights from the model's published config and a byte-level
tokenizer built here (no network, no model wheel), shortened to: one generate call's groups of
full-length prompts and completions (a random model never stops: every completion at the limit),
one update, one evaluation batch of RULER at the longest length and one LongBench v2 item at the
cap, a checkpoint (of the q/k rows' optimizer only when the disk cannot hold a full one), and a
resume that loads it. Its time by plumbing/timeplan.py, start-up and prompt building included,
fits 5 minutes. After each part it writes check.json, check.md and check.log into --out, so a run
killed by a timeout still leaves what it measured; a failed part makes the command fail.

    python -m bench.gpu_check --out DIR  # on the GPU (bench/gpu_node.sh runs it on a GPU node)
    python -m bench.gpu_check --dry-run  # the same code on the CPU, a tiny Qwen3 (in make test)
    python -m bench.gpu_check --simulate-preflight  # the preflight with each card's figures
    make gpu-wheels                      # the locked wheels a GPU node without network needs

Letters: P prompt tokens, G completions per prompt, T new tokens.
"""

import argparse
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

if not __package__:  # run as a file, `import train` would not find the repository's modules
    sys.exit("run from the repository root as a module: python -m bench.gpu_check")

from plumbing import startup

startup.set_allocator()  # before torch loads: CUDA's allocator reads its setting once

import torch
import transformers

import train
from plumbing import common, plan, policy, preflight, runner, timeplan
from plumbing.common import write_json_atomic, write_text_atomic

BUDGET_S = 300  # the check must fit 5 minutes by the plan: a rerun fits a 15-minute rental
STARTUP_S = 20  # imports (11 s on a 2-core Zen 3) and CUDA's start, estimated (SOURCES.md §9.57)
PROMPT_S_PER_MTOK = 80  # RULER prompt building: 1.3 s per 16k tokens on that CPU (estimate)
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


def cut(chosen, groups: int, scope: str) -> argparse.Namespace:
    """The chosen run's settings cut to one step of `groups` groups sampled in one generate call,
    one evaluation batch at the longest length, one checkpoint: what train.parse_args gives for
    shortened()'s flags (tests/test_gpu_check.py holds the two equal)."""
    return argparse.Namespace(**vars(chosen) | dict(
        steps=1, prompts_per_step=groups, gen_groups=groups, eval_tasks=["niah_multikey_2"],
        eval_lengths=[max(chosen.eval_lengths)], eval_samples=chosen.eval_batch,
        calib_samples=1, save_every=1, keep_checkpoints=1, train_scope=scope))


def shortened(argv: list, args, folder: Path, device, disk_free: float, config) -> list:
    """The chosen run cut (cut()) to the most groups, up to one generate call's, whose planned
    time fits BUDGET_S; the q/k rows' optimizer state only when the model's weights and one
    full checkpoint would not fit the disk."""
    full = plan.plan(config, plan.settings_for_args(cut(args, args.gen_groups, "all")))
    one = next(r["bytes"] for r in full if r["item"] == "one checkpoint")
    weights = 2 * plan.param_counts(config)["total"]
    scope = "qk" if weights + one > 0.9 * disk_free else "all"
    groups = next((n for n in range(args.gen_groups, 0, -1)
                   if planned(cut(args, n, scope), config)["total"] <= BUDGET_S), 1)
    short = cut(args, groups, scope)
    return argv + ["--train-scope", scope] + [
        "--model", str(folder / "model"), "--device", str(device), "--steps", "1",
        "--prompts-per-step", str(groups), "--gen-groups", str(groups),
        "--eval-tasks", *short.eval_tasks, "--eval-lengths", str(short.eval_lengths[0]),
        "--eval-samples", str(short.eval_samples), "--eval-batch", str(args.eval_batch),
        "--calib-samples", "1", "--save-every", "1", "--keep-checkpoints", "1",
        "--longbench", str(folder / "longbench.jsonl"), "--before-eval",
        str(folder / "before.json"), "--out-dir", str(folder / "runs"), "--run-name", "check"]


def prepare(folder: Path, argv: list, chosen, config, device) -> None:
    """Random weights in the model's dtype (made on the device, then released), the byte
    tokenizer, one LongBench v2 item longer than the cap, and the "before" file (only "after"
    is evaluated)."""
    dtype = torch.bfloat16 if chosen.optimizer == "bf16-sr" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder / "model")
    del model
    release(device)
    byte_tokenizer(folder / "model")
    write_longbench_item(folder, chosen)
    args = train.parse_args(argv)
    args.precision_used = common.choose_precision(args.precision, str(device))[0]
    write_json_atomic(folder / "before.json", {"settings": runner.eval_settings(args),
                                               "scores": {}, "items": []})


def write_longbench_item(folder: Path, chosen) -> None:
    """longbench.jsonl: one LongBench v2 item, its context longer than the cap."""
    item = {"_id": "check", "domain": "d", "sub_domain": "s", "difficulty": "hard",
            "length": "long", "question": "Which colour is the sky?", "choice_A": "blue",
            "choice_B": "green", "choice_C": "red", "choice_D": "black", "answer": "A",
            "context": "The sky is blue and the grass is green. " * (chosen.longbench_max_len
                                                                     // 40)}
    (folder / "longbench.jsonl").write_text(json.dumps(item) + "\n")


def release(device) -> None:
    """Give back the memory this process holds but no longer uses (a deleted model, a finished
    run's cached blocks), so that the next preflight sees the card as a fresh run would."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def planned(args, config) -> dict:
    """The time plan's seconds of each part of the shortened run: start-up, prompt building,
    statistics, sampling, update, evaluation, checkpoint, and the model's writing and reading
    (policy, reference, resume) at the disk's rate; and their sum."""
    s = plan.settings_for_args(args)
    rows = {r["phase"]: r["seconds"] for r in timeplan.time_plan(
        config, s, args.prompts_per_step, 1, False, {max(args.eval_lengths): args.eval_batch}, 1)}
    lengths = [timeplan.longbench_cap(args, config)[0]]  # the one item, longer than the cap
    one = next(r["bytes"] for r in plan.plan(config, s) if r["item"] == "one checkpoint")
    weights = 2 * plan.param_counts(config)["total"]
    prompt_tokens = (args.prompts_per_step * args.train_len + args.calib_samples * args.calib_len
                     + args.eval_batch * max(args.eval_lengths))
    out = {"start-up": STARTUP_S, "prompts": prompt_tokens / 1e6 * PROMPT_S_PER_MTOK,
           "statistics": args.calib_samples * timeplan.prefill_seconds(config, s, args.calib_len),
           "sampling": rows["sampling"], "update": rows["update"] + rows["optimizer step"],
           "evaluation": rows["one evaluation"] + timeplan.longbench_seconds(config, s, lengths),
           "checkpoint": one / timeplan.DISK_WRITE_BPS,
           "weights written and read 3 times": 4 * weights / timeplan.DISK_WRITE_BPS}
    return out | {"total": sum(out.values())}


# -----------------------------------------------------------------------------
# running and reporting

def part(result: dict, out: Path, name: str, fn, *a):
    """fn(*a), timed; a failure is recorded with its traceback and the check goes on. The
    record is written to `out` after the part, whatever happened."""
    rec = dict(part=name, seconds=None, error=None, traceback=None)
    result["parts"].append(rec)
    start = time.perf_counter()
    try:
        return fn(*a)
    except (Exception, SystemExit) as e:  # noqa: BLE001 -- recorded, and the next part runs
        rec["error"] = ("out of memory" if isinstance(e, torch.OutOfMemoryError)
                        else f"{type(e).__name__}: {e}")[:300]
        rec["traceback"] = traceback.format_exc()
        print(rec["traceback"], file=sys.stderr, flush=True)
        return None
    finally:
        rec["seconds"] = round(time.perf_counter() - start, 1)
        write_record(out, result)


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
                               "platform": platform.platform(),
                               "allocator": startup.allocator_setting()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_total_gb=round(props.total_memory / plan.GB, 1))
    return env


def summary(result: dict) -> str:
    """The markdown record: the command, the chosen run, the plan's total, each part's outcome,
    the table."""
    env, dry = result["environment"], result["dry_run"]
    lines = [f"`python -m bench.gpu_check{' --dry-run' * dry}` on "
             f"{env.get('gpu', env['cpu'])} ({result['capacity_gb']} GB): "
             f"`{' '.join(result['argv'][:6])} ...`, planned {result['plan_seconds']['total']:.0f}"
             f" s of a {BUDGET_S} s budget" + (f"; {result['note']}" if result["note"] else ""),
             ""]
    lines += [f"- {r['part']}: " + (f"FAILED after {r['seconds']} s: {r['error']}" if r["error"]
                                    else f"{r['seconds']} s") for r in result["parts"]]
    return "\n".join(lines + ["", table(result), ""])


def write_record(out: Path, result: dict) -> None:
    """check.json, check.md and check.log (each part's outcome and traceback) in `out`."""
    write_json_atomic(out / "check.json", result)
    write_text_atomic(out / "check.md", summary(result))
    write_text_atomic(out / "check.log", "".join(
        f"{r['part']}: {r['error'] or 'ok'} ({r['seconds']} s)\n{r['traceback'] or ''}"
        for r in result["parts"]))


# -----------------------------------------------------------------------------
# the preflight on the cards, simulated on any machine

CARDS = {"H100 80GB HBM3": 85.5, "H200": 150.8}  # GB, as torch reports them (SOURCES.md §9.57)
NODE_DISK = 64 * 2**30  # bytes: the GPU node's disk


def simulate_preflight(card: str, folder: Path) -> str:
    """train.main's preflight for this check's run on `card`, here: torch.cuda's figures set to
    the card's after the check's release (0.6 GB of CUDA context taken, 40 GB of a finished run
    cached but unused), the disk to the node's 64 GiB less the weights prepare() writes. A
    problem raises SystemExit(2) as on the node; else one line saying what passed."""
    argv, chosen, config = choose(CARDS[card], dry=False)
    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "model" / "config.json").write_text(config.to_json_string())
    byte_tokenizer(folder / "model")
    write_longbench_item(folder, chosen)
    run_argv = shortened(argv, chosen, folder, "cuda", NODE_DISK, config)
    total, weights = CARDS[card] * plan.GB, 2 * plan.param_counts(config)["total"]
    with mock.patch.object(torch.cuda, "mem_get_info", lambda d: (total - 40.6e9, total)), \
            mock.patch.object(torch.cuda, "memory_reserved", lambda d: 40e9), \
            mock.patch.object(torch.cuda, "memory_allocated", lambda d: 0), \
            mock.patch.object(preflight, "free_disk", lambda f: NODE_DISK - weights):
        args = train.parse_args(run_argv)
        preflight.preflight(args)
        rows = plan.plan(config, plan.settings_for_args(args))
    top = max(plan.memory_peaks(rows).values())
    return (f"preflight on {card} ({CARDS[card]} GB) passes: {' '.join(run_argv[:2])}, "
            f"{args.prompts_per_step} groups, --train-scope {args.train_scope}; memory "
            f"{top:.1f} of {(total - 0.6e9) / plan.GB:.1f} GB free, disk "
            f"{plan.peaks(rows)['disk']:.1f} of {(NODE_DISK - weights) / plan.GB:.1f} GB free")


def check(device, dry: bool, work: Path, out: Path) -> dict:
    """Choose, prepare, run, resume; measured beside planned, recorded after each part."""
    gb = capacity_gb(device, dry)
    argv, chosen, config = choose(gb, dry)
    work.mkdir(parents=True, exist_ok=True)
    run_argv = shortened(argv, chosen, work, device, shutil.disk_usage(work).free, config)
    i = run_argv.index("--prompts-per-step")  # the shortened run's groups (cut() of them)
    args = cut(chosen, int(run_argv[i + 1]), run_argv[run_argv.index("--train-scope") + 1])
    result = dict(argv=run_argv, capacity_gb=round(gb, 1), dry_run=dry, parts=[], measured={},
                  environment=environment(device), plan_seconds=planned(args, config),
                  plan_gb=plan.memory_peaks(plan.plan(config, plan.settings_for_args(args))),
                  note=("the disk holds no full checkpoint next to the weights: --train-scope qk,"
                        " so the update's time and memory are below the full run's (the plan's"
                        " are the full run's)" if args.train_scope == "qk" else ""))
    result["fits_budget"] = result["plan_seconds"]["total"] <= BUDGET_S
    part(result, out, "prepare: random weights, byte tokenizer, data", prepare, work, run_argv,
         chosen, config, device)
    run = part(result, out, "the run, shortened (train.main)", train.main, run_argv)
    if run is not None:
        result["measured"] = measured(run)  # before the resume rewrites phases.json
        release(device)  # the run's cached blocks: the resume's preflight sees them free
        part(result, out, "resume from its checkpoint (train.main --resume)", train.main,
             ["--resume", str(run), "--no-eval", "--allow-change", "eval"])
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="The paper run, shortened, on one GPU.")
    p.add_argument("--dry-run", action="store_true", help="a tiny Qwen3 on the CPU, seconds")
    p.add_argument("--out", default=None, help="folder for check.json, check.md and check.log, "
                   "written after each part (default experiments/runs/gpu_check, or "
                   "runs/gpu_check_dry with --dry-run)")
    p.add_argument("--work", default="runs/gpu_check_work",
                   help="weights, data and the run's checkpoint while it runs (removed after)")
    p.add_argument("--simulate-preflight", action="store_true",
                   help="no run: train.main's preflight with each card's figures (any machine)")
    a = p.parse_args(argv)
    common.check_torch()
    if a.simulate_preflight:
        for card in CARDS:
            with tempfile.TemporaryDirectory() as folder:
                print(simulate_preflight(card, Path(folder)), flush=True)
        return None
    device = torch.device("cpu" if a.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --dry-run to exercise the code path on the CPU")
    out = Path(a.out or ("runs/gpu_check_dry" if a.dry_run else "experiments/runs/gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = check(device, a.dry_run, Path(a.work), out)
    finally:
        shutil.rmtree(a.work, ignore_errors=True)
    print(summary(result))
    failed = [r for r in result["parts"] if r["error"]]
    if failed or len(result["parts"]) < 3:  # a failure, or a part that never ran
        why = f"{failed[0]['part']}: {failed[0]['error']}" if failed else "not every part ran"
        raise SystemExit(f"gpu_check FAILED: {why}")
    return result


if __name__ == "__main__":
    main()
