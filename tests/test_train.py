"""End-to-end tests of train.py on a tiny model (random weights, the embedded tokenizer): resume
exactness, refusal to resume with changed settings, masked rows frozen through real training steps,
per-step masks and their dynamics, DAPO's mini-batches, crash and signal handling, presets.

Run: .venv/bin/python -m pytest -q tests/test_train.py
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from plumbing import checkpoint, common, flags, preflight


def args_for(tiny_dir, qa_file, out, name, steps, *extra):
    return ["--model", tiny_dir, "--train-data", qa_file, "--train-len", "128", "--calib-len", "32",
            "--calib-samples", "2", "--prompts-per-step", "2", "--group-size", "4", "--save-final",
            "--max-new-tokens", "6", "--steps", str(steps), "--no-eval", "--precision", "fp32",
            "--out-dir", str(out), "--run-name", name, "--threads", "2", "--lr", "1e-3",
            "--warmup-steps", "2", *extra]


def weights(run_dir):
    return load_file(str(run_dir / "ckpt" / "model.safetensors"))


def test_resume_gives_identical_weights(tiny_dir, qa_file, tmp_path):
    # GRPO with a KL reference and mu = 2 (old log-probs computed once), per-step masks: every
    # piece of state must survive a resume.
    extra = ("--beta", "0.04", "--mu", "2", "--micro-groups", "1")
    straight = train.main(args_for(tiny_dir, qa_file, tmp_path, "straight", 4, *extra))
    half = train.main(args_for(tiny_dir, qa_file, tmp_path, "half", 2, *extra))
    first = json.loads((half / "phases.json").read_text())  # the resume rewrites it
    kept = torch.load(half / "ckpt" / "trainer_state.pt", weights_only=False)["phases"]
    assert kept["training"] == first["training"] and kept["total"] <= first["total"]
    resumed = train.main(args_for(tiny_dir, qa_file, tmp_path, "half", 4, *extra,
                                  "--allow-change", "steps", "--resume", str(half)))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = load_file(str(Path(tiny_dir) / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training did move the weights
    config = json.loads((straight / "config.json").read_text())
    assert config["algo"] == "grpo" and config["steps"] == 4
    resumed_config = json.loads((resumed / "config.json").read_text())
    assert resumed_config["resumed_at"] == 2 and "code_version" in resumed_config["resumed_with"]
    assert resumed_config["resumes"] == [{"at": 2, "changed": {"steps": [2, 4]}}]
    # the resumed run's phases.json counts both parts: its first two steps are in its training
    both = json.loads((resumed / "phases.json").read_text())
    later = sum(r["t_sample"] + r["t_update"] for r in
                map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines()[2:]))
    assert both["training"] >= first["training"] + later and both["total"] > first["total"]
    state = torch.load(straight / "ckpt" / "trainer_state.pt", weights_only=False)
    assert state["config"]["ratio"] == 0.3
    assert len((straight / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_refuses_changed_mask_config(tiny_dir, qa_file, tmp_path, capsys):
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "r", 1, "--beta", "0"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(args_for(tiny_dir, qa_file, tmp_path, "r", 2, "--beta", "0",
                            "--mask-strategy", "random", "--resume", str(run)))
    assert "--mask-strategy random differs" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        train.main(args_for(tiny_dir, qa_file, tmp_path, "r", 2, "--beta", "0"))


def test_masked_rows_frozen_through_training_dapo(tiny_dir, qa_file, tmp_path):
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "dapo", 3, "--algo", "dapo",
                              "--weight-decay", "0.1", "--micro-groups", "1",
                              "--mask-schedule", "static"))
    start = load_file(str(Path(tiny_dir) / "model.safetensors"))
    end = weights(run)
    masks = load_file(str(run / "masks.safetensors"))
    changed_rows = 0
    for name, m in masks.items():
        w0, w1 = start[name + ".weight"], end[name + ".weight"]
        frozen = ~m.bool()
        assert torch.equal(w0[frozen], w1[frozen]), name  # bit-identical outside the mask
        changed_rows += int((w0[m.bool()] != w1[m.bool()]).any(-1).sum())
    assert changed_rows > 0  # ... while the salient rows trained
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("gen_batches" in r and "frac_all_equal" in r for r in rows)


def test_bad_training_row_names_line_and_field(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "question": "q", "answer": "a"}) + "\n\n" +
                   json.dumps({"context": "x", "answer": "a"}) + "\n")
    with pytest.raises(SystemExit):
        train.main(args_for(tiny_dir, str(bad), tmp_path, "bad", 1))
    assert "bad.jsonl: line 3: missing field 'question'" in capsys.readouterr().err


def rows_of(run, name="metrics.jsonl"):
    return [json.loads(x) for x in (run / name).read_text().splitlines()]


def test_default_run_uses_per_step_masks_and_logs_their_dynamics(tiny_dir, qa_file, tmp_path):
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "step", 3, "--weight-decay", "0.1",
                              "--static-overlap"))
    config = json.loads((run / "config.json").read_text())
    assert (config["mask_schedule"], config["stat"], config["per_head"]) == ("step", "seq_l2", True)
    assert config["code_version"] and config["cpu"]  # a grid shows its runs share one commit
    rows = rows_of(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["mask_jaccard_step0"] == 1.0 and rows[0]["mask_jaccard_prev"] == 1.0
    for r in rows:
        assert 0.0 <= r["mask_jaccard_step0_static"] <= 1.0
        assert r["drift_outside_mask"] == 0.0  # frozen: rows outside each step's mask never move
    assert any(r["mask_jaccard_prev"] < 1.0 for r in rows[1:])  # the prompts change, so do masks


def test_static_random_rows_are_one_fixed_draw_for_the_run(tiny_dir, qa_file, tmp_path):
    # the fixed random subset: drawn once from the seed, never redrawn, not the top-k rows
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "rs", 3, "--mask-strategy", "random",
                              "--mask-schedule", "static", "--weight-decay", "0.1"))
    rows = rows_of(run)
    assert all(r["mask_jaccard_prev"] == 1.0 and r["drift_outside_mask"] == 0.0 for r in rows)
    topk = train.main(args_for(tiny_dir, qa_file, tmp_path, "ts", 1, "--mask-schedule", "static"))
    a = load_file(str(run / "masks.safetensors"))
    b = load_file(str(topk / "masks.safetensors"))
    assert a.keys() == b.keys()
    assert all(a[n].sum() == b[n].sum() for n in a)  # the same number of rows ...
    assert any(not torch.equal(a[n], b[n]) for n in a)  # ... but other rows


def test_grad_semantics_lets_rows_outside_the_mask_drift(tiny_dir, qa_file, tmp_path):
    # AdamW decays every parameter with a gradient: a masked gradient alone does not freeze rows
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "grad", 2, "--weight-decay", "0.1",
                              "--mask-semantics", "grad"))
    assert all(r["drift_outside_mask"] > 0 for r in rows_of(run))


def test_qk_scope_trains_only_the_qk_projections(tiny_dir, qa_file, tmp_path):
    # every other weight frozen: bit-identical after steps with weight decay; q/k rows move
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "qk", 2, "--weight-decay", "0.1",
                              "--train-scope", "qk", "--mask-strategy", "all", "--beta", "0"))
    start = load_file(str(Path(tiny_dir) / "model.safetensors"))
    after = weights(run)
    qk = [n for n in start if n.rsplit(".", 1)[0].endswith(("q_proj", "k_proj"))]
    assert qk and all(not torch.equal(start[n], after[n]) for n in qk)
    assert all(torch.equal(start[n], after[n]) for n in start if n not in qk)
    resumed = train.main(["--resume", str(run), "--steps", "3", "--allow-change", "steps"])
    assert json.loads((resumed / "config.json").read_text())["train_scope"] == "qk"  # kept


def test_resume_refuses_changed_optimisation_settings(tiny_dir, qa_file, tmp_path, capsys):
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "lr", 1, "--beta", "0"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(args_for(tiny_dir, qa_file, tmp_path, "lr", 2, "--beta", "0", "--lr", "2e-3",
                            "--resume", str(run)))
    assert "--lr 0.002 differs from the saved run's 0.001" in capsys.readouterr().err


def test_resume_after_a_crash_does_not_duplicate_rows(tiny_dir, qa_file, tmp_path):
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "crash", 2, "--beta", "0"))
    # a SIGKILL after step 2 was logged but before its checkpoint: rows past the checkpoint
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(run / name, "a") as f:
            f.write(json.dumps({"step": 2, "stale": True}) + "\n")
    train.main(args_for(tiny_dir, qa_file, tmp_path, "crash", 3, "--beta", "0",
                        "--allow-change", "steps", "--resume", str(run)))
    rows = rows_of(run)
    assert [r["step"] for r in rows] == [0, 1, 2] and not any("stale" in r for r in rows)
    assert not any("stale" in r for r in rows_of(run, "samples.jsonl"))


def test_second_signal_stops_at_once():
    with checkpoint.StopFlag() as stop:
        stop.handler(15, None)  # first: finish the step, then save
        assert stop.set
        with pytest.raises(KeyboardInterrupt):
            stop.handler(15, None)  # second: now


def test_dapo_mini_batches_step_the_optimizer_per_group_off_policy(tiny_dir, qa_file, tmp_path):
    # one group per mini-batch: the second optimizer step of each batch sees ratios != 1
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "mini", 3, "--algo", "dapo",
                              "--no-dynamic-sampling", "--mini-batch-groups", "1",
                              "--lr", "3e-2", "--gen-groups", "1", "--max-new-tokens", "2",
                              "--prompts-per-step", "4"))
    rows = rows_of(run)
    assert all(r["opt_steps"] == 4 for r in rows)  # 4 groups per step, 1 per mini-batch
    assert all(r["ratio_dev_max"] > 0 for r in rows)  # later mini-batches are off-policy
    # one mini-batch per rollout batch: the policy that sampled is the one that is scored
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "one", 1, "--algo", "dapo",
                              "--no-dynamic-sampling", "--mini-batch-groups", "0"))
    assert rows_of(run)[0]["ratio_dev_max"] == 0.0 and rows_of(run)[0]["opt_steps"] == 1


def test_presets_and_algorithms_set_their_defaults_and_flags_win():
    a = train.parse_args(["--algo", "dapo"])
    assert (a.beta, a.eps_high, a.aggregation) == (0.0, 0.28, "token-mean")
    assert a.dynamic_sampling
    assert a.mini_batch_groups == 2 and a.overlong_buffer == 0.25
    p = train.parse_args(["--preset", "paper", "--algo", "dapo"])
    assert (p.model, p.overlong_buffer, p.mini_batch_groups) == ("Qwen/Qwen3-4B", 0.2, 2)
    assert train.parse_args(["--preset", "paper-8b"]).optimizer == "bf16-sr"
    assert train.parse_args(["--algo", "dapo", "--beta", "0.01"]).beta == 0.01
    g = train.parse_args([])
    assert (g.beta, g.kl_clamp, g.mask_schedule, g.mask_semantics) == (0.04, 10.0, "step", "frozen")


def torchrun(argv, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "train.py", *argv, "--fsdp", "--threads", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(train.__file__).parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_fsdp_two_ranks_train_like_one_process_and_resume(tiny_dir, qa_file, tmp_path):
    # one generate call per prompt in both, so each prompt gets the same sampling seed
    extra = ("--beta", "0.04", "--gen-groups", "1", "--weight-decay", "0.1")
    one = train.main(args_for(tiny_dir, qa_file, tmp_path, "one", 2, *extra))
    torchrun(args_for(tiny_dir, qa_file, tmp_path, "two", 2, *extra), tmp_path)
    torchrun(args_for(tiny_dir, qa_file, tmp_path, "half", 1, *extra), tmp_path)
    torchrun(args_for(tiny_dir, qa_file, tmp_path, "half", 2, *extra, "--allow-change", "steps",
                      "--resume", str(tmp_path / "half")), tmp_path)
    a = weights(one)
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    c = load_file(str(tmp_path / "half" / "final" / "model.safetensors"))
    # fp32 rounding: FSDP adds the ranks' gradients in another order (SOURCES.md §9.37), and Adam
    # divides by sqrt(v), which turns a rounding difference of a near-zero gradient entry into a
    # visible one: agreement is judged against how far training moved the weights
    start = load_file(str(Path(tiny_dir) / "model.safetensors"))
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    mean_diff = sum((a[k] - b[k]).abs().sum().item() for k in a) / sum(a[k].numel() for k in a)
    assert diff < 0.05 * moved and mean_diff < 1e-7, (diff, moved, mean_diff)
    assert all(torch.equal(b[k], c[k]) for k in b)  # a sharded resume is exact
    assert [r["step"] for r in rows_of(tmp_path / "two")] == [0, 1]
    assert all(r["drift_outside_mask"] == 0.0 for r in rows_of(tmp_path / "two"))


# ------------------------------------------------------------ checkpoints kept, failed saves

def test_keep_checkpoints_keeps_the_newest_and_a_step_file(tiny_dir, qa_file, tmp_path):
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "keep", 3, "--beta", "0",
                              "--save-every", "1", "--keep-checkpoints", "2"))
    assert sorted(p.name for p in run.glob("ckpt*")) == ["ckpt", "ckpt-step2"]
    step_file = json.loads((run / "ckpt" / "step.json").read_text())
    assert step_file["step"] == 3 and step_file["versions"]["lock"] == common.lock_hash()
    assert checkpoint.saved_step(run / "ckpt-step2") == 2
    one = train.main(args_for(tiny_dir, qa_file, tmp_path, "one", 2, "--beta", "0",
                              "--save-every", "1"))
    assert sorted(p.name for p in one.glob("ckpt*")) == ["ckpt"]


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint(tiny_dir, qa_file, tmp_path,
                                                                    monkeypatch):
    args = args_for(tiny_dir, qa_file, tmp_path, "crash", 2, "--beta", "0", "--save-every", "1")
    real, calls = torch.save, []

    def failing_save(obj, path, *a, **k):  # the second checkpoint's state file: disk full
        calls.append(path)
        if len(calls) == 2:
            real(obj, path, *a, **k)
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **k)
    monkeypatch.setattr(train.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        train.main(args)
    monkeypatch.setattr(train.torch, "save", real)
    run = tmp_path / "crash"
    assert checkpoint.saved_step(checkpoint.checkpoint_dir(run)) == 1  # step 1's checkpoint, intact
    resumed = train.main(args + ["--resume", str(run)])
    assert [r["step"] for r in rows_of(resumed)] == [0, 1]


# ------------------------------------------------------------ checks before the model loads

def test_too_little_disk_stops_before_loading_and_force_goes_on(tiny_dir, qa_file, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.setattr(preflight, "free_disk", lambda folder: 1000)
    monkeypatch.setattr(train.runner, "setup", lambda a: pytest.fail("the model must not load"))
    with pytest.raises(SystemExit) as e:
        train.main(args_for(tiny_dir, qa_file, tmp_path, "disk", 1))
    assert e.value.code == 2
    assert "preflight: disk: checkpoints (the plan's disk peak" in capsys.readouterr().err
    monkeypatch.setattr(train.runner, "setup",
                        lambda a: (_ for _ in ()).throw(RuntimeError("loaded")))
    with pytest.raises(RuntimeError, match="loaded"):  # --force: past the checks, to the load
        train.main(args_for(tiny_dir, qa_file, tmp_path, "disk2", 1, "--force"))


@pytest.mark.real_disk
def test_free_disk_reads_the_file_system_of_the_folder(tmp_path):
    assert preflight.free_disk(tmp_path) == pytest.approx(shutil.disk_usage(tmp_path).free,
                                                         abs=512 * 2 ** 20)  # others write


def test_the_disk_check_counts_the_model_download(tmp_path, monkeypatch, tiny_dir):
    # paper-8b: 98.3 GB of checkpoints fit 100 GB free, the 16.4 GB download on top does not
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache: not downloaded
    monkeypatch.setattr(preflight, "free_disk", lambda folder: 100e9)
    args = train.parse_args(["--preset", "paper-8b", "--device", "cpu",
                             "--out-dir", str(tmp_path / "runs")])
    config = preflight.policy.model_config(args.model)
    rows = preflight.plan.plan(config, preflight.plan.settings_for_args(args))
    assert preflight.plan.download_bytes(args.model, config) == 2 * preflight.plan.param_counts(
        config)["total"]
    problem, = preflight.disk_problems(args, rows, config)
    assert "checkpoints (the plan's disk peak, --keep-checkpoints 1) 98.3 GB + the download " \
           "of Qwen/Qwen3-8B into the hub cache 16.4 GB need 114.7 GB more" in problem
    local = train.parse_args(["--model", tiny_dir, "--device", "cpu"])  # a folder: none
    assert preflight.plan.download_bytes(local.model, config) == 0


def test_a_plan_larger_than_the_free_gpu_memory_stops_with_the_phase(monkeypatch, capsys):
    monkeypatch.setattr(train.torch.cuda, "mem_get_info", lambda d: (40e9, 141e9))
    monkeypatch.setattr(train.runner, "setup", lambda a: pytest.fail("the model must not load"))
    monkeypatch.setattr(flags, "hub_reachable", lambda: True)  # a GPU node: the weights come
    with pytest.raises(SystemExit):
        train.main(["--preset", "paper-8b", "--device", "cuda", "--longbench", ""])
    err = capsys.readouterr().err
    assert "memory: the plan's evaluation phase needs" in err and "40.0 GB free" in err


def test_a_bad_longbench_file_fails_before_the_model(tmp_path, monkeypatch):
    bad = tmp_path / "lb.json"
    bad.write_text('[{"_id": "1"}]')
    monkeypatch.setattr(train.runner, "setup", lambda a: pytest.fail("the model must not load"))
    with pytest.raises(ValueError, match="lb.json"):
        train.main(["--longbench", str(bad), "--out-dir", str(tmp_path)])


CLOCKS = ("t_sample", "t_score", "t_update", "elapsed")


def test_ctrl_c_then_resume_with_the_run_alone_equals_an_uninterrupted_run(
        tiny_dir, qa_file, tmp_path, monkeypatch, capsys):
    # a user's JSONL, GRPO with a reference; the run is stopped by a signal during step 1 and
    # resumed with `--resume RUN` and nothing else: data, lengths, evaluation all come back
    argv = args_for(tiny_dir, qa_file, tmp_path, "straight", 4, "--beta", "0.04")
    straight = train.main(argv)
    real = train.rl_step

    def interrupted(run, step):
        if step == 1:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: finish the step, save, stop
        return real(run, step)
    monkeypatch.setattr(train, "rl_step", interrupted)
    with pytest.raises(SystemExit) as stop:
        train.main(args_for(tiny_dir, qa_file, tmp_path, "cut", 4, "--beta", "0.04"))
    cut = tmp_path / "cut"
    assert stop.value.code != 0 and str(stop.value).endswith(
        f"resume with: python train.py --resume {cut}")
    monkeypatch.setattr(train, "rl_step", real)
    resumed = train.main(["--resume", str(cut)])
    a = [{k: v for k, v in r.items() if k not in CLOCKS} for r in rows_of(straight)]
    b = [{k: v for k, v in r.items() if k not in CLOCKS} for r in rows_of(resumed)]
    assert a == b and len(a) == 4 and all(r["grad_norm"] > 0 for r in a)
    wa, wb = weights(straight), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    config = json.loads((resumed / "config.json").read_text())
    assert config["train_data"] == qa_file and config["resumes"] == [{"at": 2, "changed": {}}]


def test_a_flag_given_with_resume_must_match_or_be_allowed(tiny_dir, qa_file, tmp_path, capsys):
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "r", 1, "--beta", "0"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run), "--max-new-tokens", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "--max-new-tokens 8 differs from the saved run's 6" in err[0]
    assert "--allow-change max_new_tokens" in err[0]
    train.main(["--resume", str(run), "--steps", "2", "--allow-change", "steps"])
    assert "resume: --steps 1 -> 2 (--allow-change)" in capsys.readouterr().out
    assert [r["step"] for r in rows_of(run)] == [0, 1]


def test_a_small_run_keeps_no_checkpoint_and_calibrates_only_when_asked(tiny_dir, qa_file,
                                                                         tmp_path, capsys):
    base = [a for a in args_for(tiny_dir, qa_file, tmp_path, "small", 2) if a != "--save-final"]
    run = train.main(base)
    out = capsys.readouterr().out
    assert not (run / "ckpt").exists() and not (run / "qk_stats.safetensors").exists()
    assert f"picture:   python -m experiments.curves {run}" in out
    assert "weights:   not kept (--save-final keeps them" in out
    plain = rows_of(run)
    assert "mask_jaccard_step0_static" not in plain[0]
    full = train.main(base[:-2] + ["--run-name", "full", "--static-overlap", "--save-final",
                                   "--warmup-steps", "2"])
    assert (full / "qk_stats.safetensors").exists() and (full / "ckpt").exists()
    rows = rows_of(full)
    assert "mask_jaccard_step0_static" in rows[0]
    drop = CLOCKS + ("mask_jaccard_step0_static",)  # calibration changes nothing else
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in plain]
