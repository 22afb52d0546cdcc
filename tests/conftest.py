"""Shared fixtures: tiny models built from configs (no downloads), and the embedded model.

Run all tests: make test   (or: .venv/bin/python -m pytest -q tests)
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Keep caches in the work tree and never touch the network (SOURCES.md §8).
os.environ.setdefault("LONGACT_CACHE", str(ROOT / ".cache" / "longact"))
os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "hf"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "real_disk: the test reads the host's free disk")


@pytest.fixture(autouse=True)
def roomy_disk(request, monkeypatch):
    """preflight sees 1 TB free in every test: a test about a bad flag or file must fail on that,
    not on a nearly full /tmp (a CI machine had under 2 GB free; the embedded model's default
    plan wants 3.2 GB). The disk check's own tests set free_disk themselves; `real_disk` opts
    out."""
    if request.node.get_closest_marker("real_disk") is None:
        monkeypatch.setattr("plumbing.preflight.free_disk", lambda folder: 10 ** 12)


def tiny_model(kind: str = "llama", seed: int = 0, vocab: int = 128, layers: int = 2):
    """A tiny causal LM of one family: 4 query heads / 2 KV heads of dim 8, fp32, sdpa attention.

    kind: "llama" (no q/k bias), "qwen2" (q/k/v bias, like Qwen2), "qwen3" (q/k RMS norm after
    the projections).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind](**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct (converted once, .cache/longact)."""
    from plumbing.policy import load_policy
    return load_policy("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 2-layer Llama with the embedded model's tokenizer (prompts are real text), an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from plumbing.policy import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory):
    """Training rows whose answer is one letter, "k": the tiny random model writes it in about a
    quarter of its 6-token completions (measured), so most groups of 4 have mixed rewards and the
    policy gradient is not zero. ("e" is in 98% of them: most groups were all-equal.)"""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"context": f"Document {i}: the grass is green and the sky is blue.",
             "question": "Which letter?", "answer": "k"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
