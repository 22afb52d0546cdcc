"""
preflight.py -- everything train.py checks before a model loads: a bad flag, a bad row, a disk too
small or a plan too large for the GPU costs seconds, not the minutes of a model load and a first
evaluation.

    check_args(p, args)       every flag: ranges, combinations, paths, task names, the window
    resolve_from_plan(args)   --gen-groups / --eval-batch -1: the most the plan fits on --gpu
    check_sources(args)       what the run loads from the hub: reachable, or cached
    preflight(args)           disk, free GPU memory, LongBench v2, one RULER sample per cell

Each failure is one line on stderr and exit code 2 (flags.py); `--force` lets the disk and memory
checks pass with a warning.
Test: .venv/bin/python -m pytest -q tests/test_flags.py tests/test_train.py
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

import evaluate
import rollout
from plumbing import flags, plan, policy, report
from tasks import TRAIN_SEED_START, longbench, ruler
from tasks.train_data import parse_field_map


def check_args(p, args) -> None:
    """Every flag against what can work, before any weights, data or run folder (flags.py)."""
    flags.check_ranges(p, args)  # the plain ranges, also checked before torch loads
    if args.report_to != "none":  # an optional package: missing is one line, before the model
        try:
            report.import_tracker(args.report_to)
        except SystemExit as e:
            p.error(str(e))
    if args.val_samples and not 0 < args.val_seed < TRAIN_SEED_START:
        p.error(f"--val-seed {args.val_seed}: must be > 0 (seed 0 holds the reported cells) and "
                f"< {TRAIN_SEED_START} (training seeds start there)")
    if args.engine == "fast" and rollout.fast_engine is None:
        p.error("--engine fast: plumbing/engine.py is missing; pass --engine hf")
    check_paths(p, args)


def check_paths(p, args) -> None:
    """Files that must exist, names that must be known, a model LongAct can mask, lengths within
    the model's window. A hub id needs only its config here (--plan, --show-config); what a run
    loads from the hub is check_sources'."""
    flags.model_source(p, "model", args.model, weights=False)
    check_architecture(p, args.model)
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
    if args.yarn:  # YaRN's window replaces the config's (policy.with_yarn)
        window = int(args.yarn_original * args.yarn)
    if args.yarn < 0 or (args.yarn and args.yarn_original < 1):
        p.error(f"--yarn {args.yarn:g} --yarn-original {args.yarn_original}: the factor must be "
                ">= 0 and the original window >= 1")
    if args.train_data == "builtin":  # a RULER length: the task's answer budget included
        flags.within(p, "train_len", args.train_len, window, "a RULER length")
    else:  # prompts middle-truncated to --train-len, then the completion
        flags.within(p, "train_len", args.train_len + args.max_new_tokens, window,
                     f"{args.train_len} + --max-new-tokens {args.max_new_tokens}")
    for L in args.eval_lengths if args.eval else ():
        flags.within(p, "eval_lengths", L, window, "a RULER length (answer included)")


ARCHITECTURES = "Llama, Qwen2/Qwen3, Mistral, SmolLM2"  # decoders LongAct masks as they are


def check_architecture(p, model: str) -> None:
    """Decoder layers with the q_proj and k_proj linear modules whose rows LongAct masks, and the
    config fields the memory plan reads, decided from the config alone (no weights) before the
    plan uses it, --force or not (SOURCES.md §9.61). The embedded model before its first
    conversion has no config yet: a Llama, nothing to check."""
    try:
        if model in policy.EMBEDDED:
            folder = policy.embedded_dir(model)
            if not (folder / "config.json").exists():
                return
            config = policy.transformers.AutoConfig.from_pretrained(folder)
        else:
            config = policy.model_config(model)
    except Exception as e:  # noqa: BLE001 -- no config.json, bad JSON, an unknown model_type...
        p.error(f"--model {model}: its config cannot be read ({type(e).__name__}: "
                f"{(str(e).splitlines() or [''])[0]})")
    kind = f"model type {config.model_type}" + (
        f" ({', '.join(config.architectures)})" if getattr(config, "architectures", None) else "")
    try:
        counts = policy.qk_projections(config)
    except ValueError as e:
        p.error(f"--model {model}: {kind} has no causal-LM class in transformers "
                f"{policy.transformers.__version__} ({str(e).splitlines()[0]})")
    missing = [s for s, n in counts.items() if not n]
    if missing:
        p.error(f"--model {model}: {kind} has no {' or '.join(missing)} linear module; "
                "LongAct masks rows of the q_proj and k_proj of every decoder layer: pass a model "
                f"built that way ({ARCHITECTURES})")
    lacking = [f for f in plan.CONFIG_FIELDS if getattr(config, f, None) is None]
    if lacking:
        p.error(f"--model {model}: {kind} has q_proj and k_proj, but its config lacks "
                f"{', '.join(lacking)}, which the memory plan reads (plumbing/plan.py): pass a "
                f"model configured as {ARCHITECTURES} are")


def check_sources(args) -> None:
    """What a run loads from the hub (the model's weights, --train-data, --longbench hub): with
    the hub out of reach and no cached copy, one line in seconds, before any data or model loads
    (flags.from_hub)."""
    flags.check_sources(args, lambda m: m not in policy.EMBEDDED, longbench.LONGBENCH_HUB_ID)


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
        n, why = plan.largest_fitting(policy.model_config(args.model), s, field, most)
        setattr(args, flag, n)
        args.plan_reasons[flag] = f"{n}: {why}"



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


def existing_parent(path) -> Path:
    path = Path(path).resolve()
    return next(p for p in (path, *path.parents) if p.exists())


def free_disk(folder) -> int:
    """Bytes free on folder's file system; its own function so that tests can set it (a test
    about another check must not depend on how full the host's disk is)."""
    return shutil.disk_usage(folder).free


def cuda_free_bytes(device) -> int:
    """Bytes a run on `device` can allocate: the driver's free memory plus what this process's
    caching allocator holds reserved but unused (blocks of an earlier phase, model or run: torch
    hands them out again, while the driver counts them as used)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def disk_problems(args, rows: list, config) -> list:
    """The plan's checkpoint peak (less a resumed run's checkpoints, already on disk) and the
    model's download, each on its own file system or together when they share one."""
    held = sum(f.stat().st_size for d in Path(args.resume or "/nonexistent").glob("ckpt*")
               for f in d.rglob("*") if f.is_file())
    out = existing_parent(args.out_dir)
    cache = existing_parent(os.environ.get("HF_HUB_CACHE") or Path(
        os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    needs = {}  # file system -> [folder, bytes, what]
    for folder, nbytes, what in ((out, plan.peaks(rows)["disk"] * plan.GB - held,
                                  f"checkpoints (the plan's disk peak, --keep-checkpoints "
                                  f"{args.keep_checkpoints})"),
                                 (cache, plan.download_bytes(args.model, config),
                                  f"the download of {args.model} into the hub cache")):
        if nbytes > 0:
            entry = needs.setdefault(folder.stat().st_dev, [folder, 0, []])
            entry[1] += nbytes
            entry[2].append(f"{what} {nbytes / plan.GB:.1f} GB")
    problems = []
    for folder, nbytes, what in needs.values():
        free = free_disk(folder)
        if nbytes > free:
            problems.append(f"disk: {' + '.join(what)} need {nbytes / plan.GB:.1f} GB more, "
                            f"{folder} has {free / plan.GB:.1f} GB free")
    return problems


def preflight(args) -> None:
    """Before the model loads: the disk holds the plan's checkpoint peak; on a GPU, the plan's
    largest phase fits its free memory (a failed check stops with the numbers; --force: go on
    anyway); then LongBench v2 loads and validates when asked for, and every RULER task and
    length the run builds has a sample."""
    config = policy.model_config(policy.resolve_model_path(args.model))
    rows = plan.plan(config, plan.settings_for_args(args))
    problems = disk_problems(args, rows, config)
    if args.device.startswith("cuda"):
        free = cuda_free_bytes(torch.device(args.device))
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
