"""
checkpoint.py -- a run's folder, its checkpoints and an exact resume; the signal that stops a run
cleanly.

    prepare_run(args)             -> (run folder, step to start at); config.json written
    save_checkpoint(run_dir, ...)    weights + optimizer + scheduler + RNG + step into ckpt/
    resume_state(run_dir, ...)       put the optimizer, scheduler and RNG back; the time so far
    with StopFlag() as stop: ...     the first SIGINT/SIGTERM finishes the step, saves, exits

A save writes ckpt.tmp/, fsyncs it, then renames it into place: at every instant ckpt/ (or
ckpt.old/ during the swap) is a complete checkpoint, so a kill or a full disk while saving never
loses the last good one. Under --fsdp every rank writes its shards (fsdp.save_checkpoint). The
step lives in a small step.json; the state file loads to the CPU first (SOURCES.md §9.34).
Each checkpoint also keeps the seconds per phase spent so far, so that a resumed run's phases.json
adds up its parts: the time of the steps it kept (work lost after the last checkpoint and
redone is counted once, the second time; the few seconds of the save it resumes from are not).

Test: .venv/bin/python -m pytest -q tests/test_train.py
"""

import json
import random
import shutil
import signal
from pathlib import Path

import torch

from plumbing import common, fsdp

# What a resumed run must share with the run it continues: else its masks, weights, optimizer state
# or schedule would not belong together. A resume that changes one of these is refused.
RESUME_KEYS = ("model", "mask_strategy", "mask_schedule", "mask_semantics", "ratio", "stat",
               "per_head", "stats", "calib_len", "calib_samples", "seed", "algo", "lr",
               "weight_decay", "beta", "group_size", "prompts_per_step", "mini_batch_groups",
               "micro_groups", "mu", "warmup_steps", "optimizer", "precision", "kl_clamp",
               "eps_high", "clip_eps", "aggregation", "train_scope", "hub_kernels", "yarn",
               "yarn_original")
# Keys added after runs were saved without them: the value those runs had.
ADDED_LATER = {"train_scope": "all", "hub_kernels": False, "yarn": 0.0, "yarn_original": 32768}


def code_and_machine() -> dict:
    """Saved in config.json: the commit of the code (a grid's runs must share one), the CPU (every
    timing names its machine) and the package versions with the lock's hash (common.versions)."""
    return {"code_version": common.code_version(), "cpu": common.cpu_name(),
            "versions": common.versions()}


def warn_if_versions_changed(run_dir: Path, saved: dict, now: dict) -> None:
    """A resume under other package versions continues, with one line that says what moved: the
    run's numbers then come from two environments (config.json keeps both)."""
    changed = common.versions_changed(saved.get("versions"), now["versions"])
    if changed:
        print(f"warning: resuming {run_dir} under other versions than it started with: {changed}")


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
        common.write_json_atomic(run_dir / "config.json", vars(args) | code_and_machine())
        return run_dir, 0
    run_dir = Path(args.resume)
    saved = json.loads((run_dir / "config.json").read_text())
    old = {k: saved.get(k, ADDED_LATER.get(k)) for k in RESUME_KEYS}
    allowed = {a.removeprefix("--").replace("-", "_") for a in getattr(args, "allow_change", [])}
    changed = {k: (old[k], getattr(args, k)) for k in RESUME_KEYS
               if old[k] != getattr(args, k) and k not in allowed}
    if changed:  # (flags given with --resume are checked at parsing: plumbing/config.py)
        raise SystemExit(f"refusing to resume {run_dir}: these settings differ from the saved run "
                         f"(saved -> now): {changed}. Start a new run or pass the same flags.")
    start = saved_step(checkpoint_dir(run_dir))
    for name in ("metrics.jsonl", "samples.jsonl"):  # rows a crash left past the checkpoint go
        drop_rows_from(run_dir / name, start)
    first = {k: saved.get(k) for k in ("code_version", "cpu", "versions")}  # where it started
    now = code_and_machine()
    warn_if_versions_changed(run_dir, saved.get("resumed_with", saved), now)
    # flags a resume may change (say --kl-stop, --steps) are kept per resume, old and new value,
    # so that config.json still says what the run's first steps ran with
    changed = {k: [saved[k], v] for k, v in vars(args).items()
               if k not in ("resume", "allow_change") and k in saved and saved[k] != v}
    common.write_json_atomic(run_dir / "config.json", vars(args) | first | {
        "resumed_at": start, "resumed_with": now,
        "resumes": saved.get("resumes", []) + [{"at": start, "changed": changed}]})
    return run_dir, start


def drop_rows_from(path: Path, step: int) -> None:
    """Keep only the rows of steps before `step` (they will be logged again after the resume)."""
    if path.exists():
        rows = [r for r in common.read_jsonl(path) if r["step"] < step]
        common.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def save_run(run, step: int, phases: dict) -> None:
    """save_checkpoint of a train.Run; `phases`: seconds per phase so far, "total" included."""
    save_checkpoint(run.folder, run.model, run.tokenizer, run.optimizer, run.scheduler, step,
                    run.args, run.masks_ref, phases)


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, scheduler, step: int, args,
                    masks_ref: dict, phases: dict | None = None) -> None:
    """weights + optimizer + scheduler + RNG + step + config + reference masks into ckpt/.

    Written to ckpt.tmp/, fsynced, then swapped in with renames (common.swap_folder_in): at every
    instant ckpt/, ckpt.old/ or a kept ckpt-step<k>/ is complete, so a kill while saving never
    loses the last good one.
    Under --fsdp every rank writes its shards (torch.distributed.checkpoint, fsdp.py)."""
    state = {"step": step, "scheduler": scheduler.state_dict(), "config": vars(args),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
             "masks_ref": masks_ref, "world": fsdp.world(),  # masks_ref: mask-dynamics metrics
             "versions": common.versions(), "phases": phases or {}}
    if args.fsdp:
        return fsdp.save_checkpoint(run_dir / "ckpt", model, optimizer, state)
    tmp, final = run_dir / "ckpt.tmp", run_dir / "ckpt"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(state | {"optimizer": optimizer.state_dict()}, tmp / STATE_FILES[0])
    common.write_json_atomic(tmp / STEP_FILE, {"step": step, "versions": state["versions"]})
    if final.exists() and args.keep_checkpoints > 1:  # the previous one stays, complete, as
        final.rename(run_dir / f"ckpt-step{saved_step(final)}")  # ckpt-step<k>/
    common.swap_folder_in(tmp, final)  # fsynced; the previous ckpt/ is dropped once it is in
    kept = older_checkpoints(run_dir)
    for extra in kept[:max(0, len(kept) - (args.keep_checkpoints - 1))]:
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
    """The newest complete checkpoint: ckpt/, else ckpt.old/ (a swap was cut short), else the
    newest kept ckpt-step<k>/."""
    for folder in [run_dir / "ckpt", run_dir / "ckpt.old"] + older_checkpoints(run_dir)[::-1]:
        if any((folder / f).exists() for f in STATE_FILES):
            return folder
    raise SystemExit(f"no complete checkpoint in {run_dir} (looked for ckpt/, ckpt.old/ and "
                     "ckpt-step*/)")


def load_state_file(ckpt: Path) -> dict:
    path = next(ckpt / f for f in STATE_FILES if (ckpt / f).exists())
    # to the CPU first: optimizer.load_state_dict moves each state tensor to its parameter's
    # device, so a GPU never holds the file's copy next to the optimizer's
    return torch.load(path, weights_only=False, map_location="cpu")


def resume_state(run_dir: Path, model, optimizer, scheduler,
                 args) -> tuple[dict, dict, dict]:
    """Load optimizer, scheduler and RNG state (and, under --fsdp, the sharded weights); return
    (past evaluations, reference masks, seconds per phase up to the checkpoint: {} where a
    checkpoint predates them)."""
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
    return evals, state["masks_ref"], state.get("phases", {})


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
