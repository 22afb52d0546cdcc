"""End-to-end tests of train.py on a tiny model (random weights, the embedded tokenizer): resume exactness,
refusal to resume with another model/mask config, masked rows frozen through real training steps, DAPO's path.

Run: .venv/bin/python -m pytest -q tests/test_train.py
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import train
from rollout import resolve_model_path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer Llama with the embedded model's tokenizer (so prompts are real text), saved as an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    """Training rows whose answer is one common letter: a random model writes it now and then, so groups have
    mixed rewards and the policy gradient is not zero."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"context": f"Document {i}: the grass is green and the sky is blue.", "question": "Which letter?",
             "answer": "e"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def args_for(tiny_dir, qa_file, out, name, steps, *extra):
    return ["--model", tiny_dir, "--train-data", qa_file, "--train-len", "128", "--calib-len", "32",
            "--calib-samples", "2", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6",
            "--steps", str(steps), "--no-eval", "--no-bf16", "--out-dir", str(out), "--run-name", name,
            "--threads", "2", "--lr", "1e-3", "--warmup-steps", "2", *extra]


def weights(run_dir):
    return load_file(str(run_dir / "ckpt" / "model.safetensors"))


def test_resume_gives_identical_weights(tiny_dir, qa_file, tmp_path):
    # GRPO with a KL reference and mu = 2 (old log-probs computed once): every piece of state must survive a resume.
    extra = ("--beta", "0.04", "--mu", "2", "--micro-groups", "1")
    straight = train.main(args_for(tiny_dir, qa_file, tmp_path, "straight", 4, *extra))
    half = train.main(args_for(tiny_dir, qa_file, tmp_path, "half", 2, *extra))
    resumed = train.main(args_for(tiny_dir, qa_file, tmp_path, "half", 4, *extra, "--resume", str(half)))
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = load_file(str(__import__("pathlib").Path(tiny_dir) / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training did move the weights
    config = json.loads((straight / "config.json").read_text())
    assert config["algo"] == "grpo" and config["steps"] == 4
    assert torch.load(straight / "ckpt" / "trainer_state.pt", weights_only=False)["config"]["ratio"] == 0.3
    assert len((straight / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_refuses_changed_mask_config(tiny_dir, qa_file, tmp_path):
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "r", 1, "--beta", "0"))
    with pytest.raises(SystemExit, match="mask_strategy"):
        train.main(args_for(tiny_dir, qa_file, tmp_path, "r", 2, "--beta", "0", "--mask-strategy", "random",
                            "--resume", str(run)))
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        train.main(args_for(tiny_dir, qa_file, tmp_path, "r", 2, "--beta", "0"))


def test_masked_rows_frozen_through_training_dapo(tiny_dir, qa_file, tmp_path):
    run = train.main(args_for(tiny_dir, qa_file, tmp_path, "dapo", 3, "--algo", "dapo", "--weight-decay", "0.1",
                              "--micro-groups", "1"))
    start = load_file(str(__import__("pathlib").Path(tiny_dir) / "model.safetensors"))
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


def test_bad_training_row_names_row_and_field(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "question": "q", "answer": "a"}) + "\n" +
                   json.dumps({"context": "x", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"row 2: missing field 'question'"):
        train.main(args_for(tiny_dir, str(bad), tmp_path, "bad", 1))
