"""
tasks -- the benchmark data, with no policy attached: what a RULER or LongBench v2 item says, never
how a model is run on it.

    tasks/haystack.py    RULER's essay haystack (SOURCES.md §7): windows of it for calibration
    tasks/ruler.py       RULER's 13 synthetic tasks, fitted to a length in a tokenizer's tokens (§5)
    tasks/longbench.py   LongBench v2: loading, checks, prompts, middle truncation, extraction (§6)
    tasks/sample.py      the `Sample` record and the prompt's token ids (the chat template's)
    tasks/train_data.py  the RL training prompts: the builtin task or a dataset, rows checked

Imports point one way: `evaluate.py` and `train.py` import these modules, and they import nothing
of the policy (no rollout, no evaluate, no model). They get a tokenizer, and -- where a length
must include the chat template -- a function that builds the prompt's token ids, passed in by
tasks/sample.py. Generators return plain dicts of `Sample` fields; tasks/sample.py builds the
`Sample`.

Seeds: a sample is a pure function of (task, length, seed, index). Evaluation uses seeds below
TRAIN_SEED_START; `train.py` uses seeds from TRAIN_SEED_START on, which also switches RULER to
source material that no evaluation sample uses (SOURCES.md §9.22), so no training prompt is
ever an evaluation prompt.
Test: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""

TRAIN_SEED_START = 10**6  # evaluation seeds are < 10**6; training seeds are >= 10**6


def is_training_seed(seed: int) -> bool:
    return seed >= TRAIN_SEED_START
