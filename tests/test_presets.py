"""The GPU presets in miniature, on the CPU: train.main with `--preset paper-8b` (and `--preset
paper --algo dapo`) where only sizes and data are overridden, on the fake second device
(tests/fake_device.py), with a small stated GPU capacity so that the plan splits sampling and
evaluation into several calls. Each test asserts that the paths a GPU run takes were taken: the
bf16 stochastic-rounding optimizer, gradient checkpointing, the per-step saliency prefill hook,
the plan's groups per call and evaluation batch, LongBench v2 from a local file in the hub's
format, checkpoints with --keep-checkpoints, a resume, and DAPO's dynamic sampling. Not covered
here: bf16 autocast (no autocast on the fake device; the bf16 weights of paper-8b do run) and
anything torch.cuda reports (memory, kernels).

Run: .venv/bin/python -m pytest -q tests/test_presets.py
"""

import json

import pytest
import torch

import saliency
import train
from plumbing import optim, plan, runner
from fake_device import FAKE, fake_device

GPU_GB = 0.064  # the stated capacity, 64 MB: the tiny model's 4 groups take 2 generate calls


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """A 2-layer Qwen3 as 8B is built (q/k RMS norm, GQA 4:2, untied head), real tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    from plumbing.policy import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def longbench_file(tmp_path_factory):
    """Two LongBench v2 items in the hub's fields, contexts of a few hundred tokens."""
    path = tmp_path_factory.mktemp("lb") / "longbench.jsonl"
    rows = [{"_id": f"item{i}", "domain": "d", "sub_domain": "s", "difficulty": "easy",
             "length": "short", "question": "Which colour is the sky?", "choice_A": "blue",
             "choice_B": "green", "choice_C": "red", "choice_D": "black", "answer": "A",
             "context": " ".join(["The sky is blue and the grass is green."] * 40)}
            for i in range(1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def spies(monkeypatch) -> dict:
    """Counters on the paths under test."""
    seen = {"bf16_sr_steps": 0, "prefill_hooks": 0, "models": []}
    step = optim.AdamWSR.step

    def counted_step(self, *a, **kw):
        seen["bf16_sr_steps"] += 1
        return step(self, *a, **kw)
    monkeypatch.setattr(optim.AdamWSR, "step", counted_step)
    collector = saliency.prefill_collector

    def counted_collector(*a, **kw):
        seen["prefill_hooks"] += 1
        return collector(*a, **kw)
    monkeypatch.setattr(saliency, "prefill_collector", counted_collector)
    load = runner.load_model

    def kept(*a, **kw):
        model, tok = load(*a, **kw)
        seen["models"].append(model)
        return model, tok
    monkeypatch.setattr(runner, "load_model", kept)
    monkeypatch.setitem(plan.GPUS["h200"], "gb", GPU_GB)
    return seen


def mini(preset, model, data, lb, out, steps, *extra):
    return ["--preset", preset, "--model", model, "--train-data", data, "--train-len", "256",
            "--calib-len", "64", "--calib-samples", "2", "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "6", "--steps", str(steps), "--save-final",
            "--eval-tasks", "niah_single_1", "--eval-lengths", "512", "--eval-samples", "1",
            "--longbench", lb,
            "--longbench-max-len", "600", "--save-every", "1", "--keep-checkpoints", "1",
            "--device", str(FAKE), "--out-dir", str(out), "--run-name", preset, *extra]


def before_file(argv, path) -> str:
    """The shared "before" evaluation, written as train.py would (settings, scores, items): the
    run then evaluates only once, after training (the fake device decodes slowly)."""
    args = train.parse_args(argv)
    args.precision_used = "fp32"  # what --precision auto picks on the fake device
    path.write_text(json.dumps({"settings": runner.eval_settings(args), "items": [],
                                "scores": {"niah_single_1@512": 0.0, "ruler_avg@512": 0.0}}))
    return str(path)


def test_paper_8b_in_miniature(tiny_qwen3, qa_file, longbench_file, tmp_path, monkeypatch):
    seen = spies(monkeypatch)
    argv = mini("paper-8b", tiny_qwen3, qa_file, longbench_file, tmp_path, 2)
    before = before_file(argv, tmp_path / "before.json")
    with fake_device():
        run = train.main(argv + ["--no-eval"])
        first = json.loads((run / "config.json").read_text())  # the plan's sizes, resolved
        train.main(mini("paper-8b", tiny_qwen3, qa_file, longbench_file, tmp_path, 3,
                        "--resume", str(run), "--before-eval", before, "--eval",
                        "--allow-change", "steps", "eval", "before_eval"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["optimizer"] == "bf16-sr" and seen["bf16_sr_steps"] >= 3
    assert all(m.is_activation_checkpointing for m in seen["models"])
    assert seen["prefill_hooks"] == 3  # one per step: the per-step masks read the prefill
    assert first["gen_groups"] == 2 and "2 call(s) for 4" in first["plan_reasons"]["gen_groups"]
    assert first["eval_batch"] == 1 and "eval_batch" in first["plan_reasons"]
    assert (cfg["gen_groups"], cfg["eval_batch"]) == (2, 1)  # the resume keeps them
    evals = json.loads((run / "eval.json").read_text())
    assert "longbench_v2/overall" in evals["after"]  # LongBench v2 through run_eval
    items = [json.loads(x)["id"] for x in (run / "items" / "after.jsonl").read_text().splitlines()]
    assert items == ["niah_single_1@512/s0/0", "item0"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert sorted(p.name for p in run.glob("ckpt*")) == ["ckpt"]  # --keep-checkpoints 1


def test_paper_dapo_in_miniature(tiny_qwen3, qa_file, longbench_file, tmp_path, monkeypatch):
    seen = spies(monkeypatch)
    with fake_device():
        run = train.main(mini("paper", tiny_qwen3, qa_file, longbench_file, tmp_path, 2,
                              "--algo", "dapo", "--no-eval"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["algo"] == "dapo" and cfg["optimizer"] == "adamw" and cfg["beta"] == 0
    assert all(m.is_activation_checkpointing for m in seen["models"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    # dynamic sampling: all-equal groups dropped, more generation batches drawn to refill the
    # step's 4 groups; the recipe's 2 groups per mini-batch: 2 optimizer steps per batch
    assert any(r["gen_batches"] > 1 and r["frac_all_equal"] > 0 for r in rows)
    assert all(r["opt_steps"] == 2 for r in rows)
