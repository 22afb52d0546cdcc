"""Watching a long run (plumbing/report.py): tracker names, the guards that stop a bad update
before it reaches the weights, the ETA, and --report-to through train.main with stand-in
trackers (the real packages are optional and not in the lock).

Run: .venv/bin/python -m pytest -q tests/test_report.py
"""

import json
import math
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import train
from plumbing import report, runner

ROOT = Path(__file__).resolve().parents[1]


def args_for(tiny_dir, qa_file, out, name, steps, *extra):
    return ["--model", tiny_dir, "--train-data", qa_file, "--train-len", "128", "--calib-len",
            "32", "--calib-samples", "2", "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "6", "--steps", str(steps), "--save-final", "--precision", "fp32",
            "--lr", "1e-3", "--out-dir", str(out), "--run-name", name, *extra]


def test_tracker_names_follow_trl_where_the_quantity_is_the_same():
    row = {"step": 3, "reward": 0.5, "reward_std": 0.2, "clip_frac_low": 0.01, "len": 7.0,
           "frac_truncated": 0.25, "lr": 1e-5, "frac_all_equal": 0.5, "mask_jaccard_prev": 0.9,
           "drift_outside_mask": 0.0, "note": "text"}
    assert report.tracker_metrics(row) == {
        "reward": 0.5, "reward_std": 0.2, "clip_ratio/low_mean": 0.01,
        "completions/mean_length": 7.0, "completions/clipped_ratio": 0.25,
        "learning_rate": 1e-5, "frac_reward_zero_std": 0.5,
        "mask_jaccard_prev": 0.9, "drift_outside_mask": 0.0}  # LongAct's keep their names
    assert report.tracker_metrics({"a@512": 50.0}, "eval/after/") == {"eval/after/a@512": 50.0}


def test_guards_refuse_non_finite_and_runaway_updates():
    args = SimpleNamespace(kl_stop=report.KL_STOP)
    report.check_update(0.1, 2.0, 0.6, args)  # the largest step mean of the committed runs
    for loss, norm, kl, match in ((math.nan, 1.0, 0.0, "non-finite loss"),
                                  (0.1, math.inf, 0.0, "non-finite gradient norm"),
                                  (0.1, 1.0, 12.0, "mean KL .* 12 nats, past --kl-stop 5"),
                                  (0.1, 1.0, math.nan, "mean KL")):
        with pytest.raises(report.RunStopped, match=match):
            report.check_update(loss, norm, kl, args)
    report.check_update(0.1, 1.0, 1e9, SimpleNamespace(kl_stop=0.0))  # 0: never


def test_the_default_guard_stops_none_of_the_committed_runs():
    # every committed run's metrics replayed through the default guard: healthy runs, all of
    # them (their step-mean KL peaked at 0.59 nats; a token's KL went past 1000 in some)
    files = subprocess.run(["git", "ls-files", "*metrics.jsonl"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    args, steps = SimpleNamespace(kl_stop=report.KL_STOP), 0
    for name in files:
        for line in (ROOT / name).read_text().splitlines():
            row = json.loads(line)
            report.check_update(row.get("loss", 0.0), row.get("grad_norm", 0.0),
                                row.get("kl", 0.0), args)
            steps += 1
    assert len(files) >= 120 and steps >= 1400, (len(files), steps)


def test_a_run_whose_mean_kl_climbs_to_tens_of_nats_stops_before_that_update(
        tiny_dir, qa_file, tmp_path, monkeypatch):
    real, updates = train.loss_fn, []
    climb = iter([0.1, 0.1, 30.0, 30.0])  # nats, one value per micro-batch (2 a step)

    def diverging(*a, **kw):
        loss, m = real(*a, **kw)
        return loss, m | {"kl": next(climb)}

    def counted(*a, **kw):
        updates.append(1)
        return real_step(*a, **kw)
    real_step = train.masking.masked_step
    monkeypatch.setattr(train, "loss_fn", diverging)
    monkeypatch.setattr(train.masking, "masked_step", counted)
    with pytest.raises(SystemExit) as stop:
        train.main(args_for(tiny_dir, qa_file, tmp_path, "kl", 3, "--no-eval",
                            "--save-every", "1"))
    assert str(stop.value).startswith("stopped at step 1: the step's mean KL to the reference "
                                      "is 30 nats, past --kl-stop 5")
    assert len(updates) == 1  # step 0's update only: step 1's never reached the weights


def test_eta_counts_steps_and_evaluations():
    assert report.eta_seconds([], 5, 1, 60.0) is None
    assert report.eta_seconds([10.0, 20.0], 4, 1.5, 60.0) == 15.0 * 4 + 90.0
    assert report.eta_seconds([10.0], 3, 1, None) == -30.0  # a lower bound: evaluations untimed
    assert report.format_eta(3900.0) == "eta 1h05m"
    assert report.format_eta(-720.0) == "eta >=12m" and report.format_eta(None) == "eta ?"


def test_a_nan_update_stops_the_run_before_the_weights_change(tiny_dir, qa_file, tmp_path,
                                                              monkeypatch):
    real = train.loss_fn
    calls = []

    def poisoned(*a, **kw):  # NaN from the second step on (2 micro-batches a step)
        loss, m = real(*a, **kw)
        calls.append(1)
        return (loss * math.nan if len(calls) > 2 else loss), m
    monkeypatch.setattr(train, "loss_fn", poisoned)
    with pytest.raises(SystemExit) as stop:
        train.main(args_for(tiny_dir, qa_file, tmp_path, "nan", 3, "--no-eval", "--beta", "0",
                            "--save-every", "1"))
    line = str(stop.value)
    assert line.startswith("stopped at step 1: non-finite loss (nan)")
    assert "resume from the checkpoint of step 1" in line and "\n" not in line
    run = tmp_path / "nan"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0]
    weights = load_file(run / "ckpt" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def fake_module(name, monkeypatch, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def test_tensorboard_gets_every_row_and_evaluation_live(tiny_dir, qa_file, tmp_path,
                                                         monkeypatch):
    logged, closed = [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, name, value, step):
            logged.append((name, value, step))

        def flush(self):
            pass

        def close(self):
            closed.append(self.log_dir)
    fake_module("torch.utils.tensorboard", monkeypatch, SummaryWriter=SummaryWriter)
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "tb", 2, "--report-to", "tensorboard",
                              "--eval-tasks", "niah_single_1", "--eval-lengths", "512",
                              "--eval-samples", "1"))
    names = {(n, s) for n, _, s in logged}
    assert {("reward", 0), ("reward", 1), ("reward_std", 1), ("clip_ratio/low_mean", 1),
            ("completions/mean_length", 0), ("mask_jaccard_prev", 1)} <= names
    assert ("eval/before/niah_single_1@512", 0) in names
    assert ("eval/after/niah_single_1@512", 2) in names
    assert closed == [str(run / "tensorboard")]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "clip_frac_low" in rows[0] and "clip_ratio/low_mean" not in rows[0]  # its own keys


def test_wandb_runs_offline_by_default_and_a_resume_continues_its_run(tiny_dir, qa_file, tmp_path,
                                                                      monkeypatch):
    inits = []

    class Run:
        def log(self, metrics, step):
            pass

        def finish(self):
            pass
    fake_module("wandb", monkeypatch, init=lambda **kw: inits.append(kw) or Run(),
                util=SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "wb", 1, "--report-to", "wandb",
                              "--no-eval", "--beta", "0"))
    train.main(args_for(tiny_dir, qa_file, tmp_path, "wb", 2, "--report-to", "wandb",
                        "--no-eval", "--beta", "0", "--allow-change", "steps",
                        "--resume", str(run)))
    assert [k["mode"] for k in inits] == ["offline", "offline"]
    assert [k["id"] for k in inits] == ["abc123", "abc123"] and inits[1]["resume"] == "allow"


def test_a_missing_tracker_is_one_line_before_the_model_loads(tiny_dir, qa_file, tmp_path,
                                                              monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setattr(runner.policy, "load_policy", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as e:
        train.main(args_for(tiny_dir, qa_file, tmp_path, "x", 1, "--report-to", "wandb"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report-to wandb:" in err[0] and "pip install wandb" in err[0]


def test_the_allocator_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    for k in report.ALLOC_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(report.startup, "SET", {"before_torch": True})  # as train.py does it
    assert report.configure_allocator("cpu") == "" and not any(
        k in report.os.environ for k in report.ALLOC_VARS)
    assert report.configure_allocator("cuda:0") == "PYTORCH_ALLOC_CONF=expandable_segments:True"
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert report.configure_allocator("cuda") == "PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:512"
    assert "PYTORCH_ALLOC_CONF" not in report.os.environ
    monkeypatch.setattr(report.startup, "SET", {})  # first set after torch was imported
    assert report.configure_allocator("cuda").endswith(
        "(set after torch was imported: in force only if CUDA had not started)")


def test_each_phase_releases_the_cache_and_keeps_its_peak(monkeypatch):
    calls, allocated = [], iter([3e9, 5e9, 2e9])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: next(allocated))
    peaks = {}
    for name in ("sampling", "update", "sampling"):
        with report.phase_memory("cuda", peaks, name):
            pass
    assert peaks == {"sampling": 3.0, "update": 5.0} and calls == ["empty", "reset"] * 3
    with report.phase_memory("cpu", peaks, "evaluation"):  # a no-op off CUDA
        pass
    assert "evaluation" not in peaks
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(total_memory=80e9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "a GPU")
    memory = report.memory_report(peaks, {"sampling": 4.0, "update": 6.0, "step": 7.0}, "cuda")
    assert memory["phases"] == {"sampling": {"measured_gb": 3.0, "planned_gb": 4.0},
                                "update": {"measured_gb": 5.0, "planned_gb": 7.0}}
    assert memory["total_gb"] == 80.0


def test_no_memory_file_off_cuda(tiny_dir, qa_file, tmp_path):
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "cpu", 1, "--no-eval", "--beta", "0"))
    assert not (run / "memory.json").exists()
    assert json.loads((run / "config.json").read_text())["alloc_conf"] == ""
