"""
tasks/longbench.py -- LongBench v2: loading and checking the data, the official prompts, middle
truncation and answer extraction.

LongBench v2 (Bai et al. 2024, THUDM/LongBench; SOURCES.md §6): 503 four-choice questions over
8k-2M-word contexts. Prompts are `prompts/0shot.txt`, `0shot_cot.txt`, `0shot_cot_ans.txt`;
truncation, temperature and answer extraction follow `pred.py`. The table (`result.py`) and the
scorer live in `evaluate.py`.

    longbench_item(row, 0, tok, template_tokens=14, window=8192)
      -> dict of `tasks.sample.Sample` fields: the 0-shot prompt, middle-truncated to fit
    extract_choice("**The correct answer is (C)**") -> "C"

Choices:
  1. choice: prompts are middle-truncated to min(max_len, model window - generation budget - chat
     template) tokens; both kinds of truncation are counted in the sample's meta. pred.py truncates
     to max_len only.
  2. choice: thinking mode (Qwen3's template with enable_thinking=True, SOURCES.md §8): the model
     opens its own `<think>` block, so the generation budget is LONGBENCH_THINKING_TOKENS instead of
     128, and the answer is read only after `</think>`; a response that never closes the block has
     no answer (scored 0). Qwen3's model card suggests up to 32,768 output tokens when thinking; we
     take 8192 so that a 40,960-token window (Qwen3's native one) still holds ~32k tokens of
     document. Thinking and --cot are exclusive: the reasoning block is the chain of thought. We
     keep pred.py's temperature 0.1 in both modes (the card advises 0.6 for thinking), so the two
     modes differ only in the template and the budget.

Test: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""

import json
import re
from pathlib import Path

from plumbing.common import read_jsonl

LONGBENCH_HUB_ID = "THUDM/LongBench-v2"
LONGBENCH_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question",
                    "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")
LONGBENCH_VALUES = {"answer": ("A", "B", "C", "D"), "difficulty": ("easy", "hard"),
                    "length": ("short", "medium", "long")}
# prompts/0shot.txt, 0shot_cot.txt, 0shot_cot_ans.txt verbatim (the CoT ones say "questions" and use
# a curly ’; the answer-extraction call omits the document, as the official prompt does).
LONGBENCH_0SHOT = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
    "(D) $C_D$\n\nFormat your response as follows: \"The correct answer is (insert answer here)\".")
LONGBENCH_COT = (
    "Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
    "(D) $C_D$\n\nLet’s think step by step:")
LONGBENCH_COT_ANSWER = (
    "Please read the following text and answer the questions below.\n\n"
    "The text is too long and omitted here.\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n"
    "(D) $C_D$\n\nLet’s think step by step: $COT$\n\n"
    "Based on the above, what is the single, most likely answer choice? "
    "Format your response as follows: \"The correct answer is (insert answer here)\".")
LONGBENCH_MAX_LEN = 120_000      # pred.py's model2maxlen for 128k-context models
LONGBENCH_TEMPERATURE = 0.1      # pred.py: temperature 0.1 for every call
LONGBENCH_NEW_TOKENS = 128       # pred.py: 128 new tokens, 1024 for the CoT call
LONGBENCH_COT_TOKENS = 1024
LONGBENCH_THINKING_TOKENS = 8192  # choice 2: a reasoning block plus the answer line
SEAM_MARGIN = 8  # a middle-truncated prompt, decoded and re-encoded, may merge tokens at the seam


# -----------------------------------------------------------------------------
# data

def validate_longbench(rows: list, source: str) -> list:
    """Check every row has the LongBench v2 fields with usable values; errors name the source, row
    (1-based) and field. Returns the rows as plain dicts restricted to the official fields (as
    pred.py's `data_all`)."""
    out = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {n}: expected a JSON object, got {type(row).__name__}")
        for f in LONGBENCH_FIELDS:
            if f not in row or row[f] is None:
                raise ValueError(f"{source}: row {n}: missing field '{f}'")
            if not isinstance(row[f], str):
                raise ValueError(f"{source}: row {n}: field '{f}' must be a string, got "
                                 f"{type(row[f]).__name__}")
        for f, allowed in LONGBENCH_VALUES.items():
            if row[f] not in allowed:
                raise ValueError(f"{source}: row {n}: field '{f}' is {row[f]!r}, expected one of "
                                 f"{allowed}")
        out.append({f: row[f] for f in LONGBENCH_FIELDS})
    return out


def load_longbench(path=None) -> list:
    """LongBench v2 rows: from a local .json (a list) or .jsonl file, else from the hub."""
    if path is None:
        try:
            # imported here: `datasets` is needed only for the hub, and importing it is slow
            from datasets import load_dataset
            rows = list(load_dataset(LONGBENCH_HUB_ID, split="train"))
        except Exception as e:  # offline, or no access: say what to do instead
            raise RuntimeError(f"could not load {LONGBENCH_HUB_ID} from the hub "
                               f"({type(e).__name__}: {e}); pass --data FILE, a .json list or "
                               f".jsonl file with the fields {LONGBENCH_FIELDS}") from e
        return validate_longbench(rows, LONGBENCH_HUB_ID)
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
    else:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows (or use a .jsonl file)")
    return validate_longbench(rows, str(path))


# -----------------------------------------------------------------------------
# prompts and truncation (pred.py)

def longbench_prompt(item: dict, template: str, cot: str = "") -> str:
    """Fill an official template as pred.py does: plain replace of the stripped document, question
    and choices."""
    text = template.replace("$DOC$", item["context"].strip())
    text = text.replace("$Q$", item["question"].strip())
    for letter in "ABCD":
        text = text.replace(f"$C_{letter}$", item[f"choice_{letter}"].strip())
    return text.replace("$COT$", cot)


def middle_truncate(ids: list, max_len: int) -> list:
    """pred.py: keep the first max_len//2 and the last max_len - max_len//2 tokens (its
    ids[-max_len//2:] takes the ceiling half): the instructions at the start and the question at
    the end both survive."""
    if len(ids) <= max_len:
        return list(ids)
    return list(ids[:max_len // 2]) + list(ids[len(ids) - (max_len - max_len // 2):])


def truncate_prompt(tokenizer, text: str, max_len: int):
    """(text, truncated): a prompt middle-truncated to max_len tokens, decoded with special tokens
    skipped (pred.py)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_len:
        return text, False
    return tokenizer.decode(middle_truncate(ids, max_len), skip_special_tokens=True), True


def prompt_limit(max_len: int, window, budget: int, template_tokens: int):
    """Token limit for the prompt text (choice 1): max_len, or the model window minus the generation
    budget, the chat template's own tokens and a seam margin when that is smaller.
    Returns (limit, reason).

    >>> prompt_limit(120_000, 8192, 128, 20)
    (8036, 'window')
    """
    if not window:
        return max_len, "max_len"
    own = window - budget - template_tokens - SEAM_MARGIN
    if own < 1:
        raise ValueError(f"a {window}-token window leaves no room for a prompt after the "
                         f"{budget}-token generation budget and {template_tokens} chat-template "
                         f"tokens")
    return (max_len, "max_len") if max_len <= own else (own, "window")


def longbench_item(item: dict, index: int, tokenizer, template_tokens: int,
                   max_len: int = LONGBENCH_MAX_LEN, window=None, cot: bool = False, seed: int = 0,
                   thinking: bool = False) -> dict:
    """A LongBench v2 item as a dict of `tasks.sample.Sample` fields: the 0-shot prompt, the first
    CoT call (cot=True) or the 0-shot prompt for a thinking model (thinking=True, choice 2),
    truncated as pred.py does (choice 1). template_tokens: the chat template's own tokens, in the
    thinking mode the model is asked in."""
    if cot and thinking:
        raise ValueError("cot and thinking are exclusive: a thinking model's <think> block is its "
                         "chain of thought")
    budget = LONGBENCH_COT_TOKENS if cot else LONGBENCH_NEW_TOKENS
    budget = LONGBENCH_THINKING_TOKENS if thinking else budget
    limit, reason = prompt_limit(max_len, window, budget, template_tokens)
    template = LONGBENCH_COT if cot else LONGBENCH_0SHOT
    text, truncated = truncate_prompt(tokenizer, longbench_prompt(item, template), limit)
    meta = {k: item[k] for k in ("_id", "domain", "sub_domain", "difficulty", "length")}
    meta.update(truncated=truncated, truncated_by=reason if truncated else None, limit=limit,
                cot=cot)
    return dict(task="longbench-v2", length=0, index=index, seed=seed, prompt=text,
                answer_prefix="", references=[item["answer"]], metric="choice",
                max_new_tokens=budget, meta=meta, thinking=thinking)


def longbench_answer_item(item: dict, index: int, tokenizer, reasoning: str, template_tokens: int,
                          max_len: int = LONGBENCH_MAX_LEN, window=None, seed: int = 0) -> dict:
    """pred.py's second CoT call: the answer-extraction prompt, which carries the reasoning of the
    first call but not the document. A dict of `tasks.sample.Sample` fields."""
    limit, _ = prompt_limit(max_len, window, LONGBENCH_NEW_TOKENS, template_tokens)
    prompt = longbench_prompt(item, LONGBENCH_COT_ANSWER, reasoning)
    text, _ = truncate_prompt(tokenizer, prompt, limit)
    return dict(task="longbench-v2", length=0, index=index, seed=seed, prompt=text,
                answer_prefix="", references=[item["answer"]], metric="choice",
                max_new_tokens=LONGBENCH_NEW_TOKENS)


# -----------------------------------------------------------------------------
# answer extraction (pred.py)

def extract_choice(response: str, thinking: bool = False):
    """pred.py's extraction after dropping a reasoning block: the letter in 'The correct answer is
    (X)', else in 'The correct answer is X'; None when absent (scored wrong, counted as unparsed).

    thinking=False: text after a `</think>` (a template may have opened the block inside the
    prompt), or, when a block was opened and never closed, the text before its `<think>`.
    thinking=True (choice 2): only the text after `</think>` counts; no `</think>` means no answer.

    >>> extract_choice("<think>maybe (B)</think>**The correct answer is (C)**")
    'C'
    >>> extract_choice("The correct answer is (C)", thinking=True) is None
    True
    """
    if "</think>" in response:
        response = response.split("</think>")[-1]
    elif thinking:
        return None
    elif "<think>" in response:  # thinking never finished: whatever came before it is all we have
        response = response.split("<think>")[0]
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response) or \
        re.search(r"The correct answer is ([A-D])", response)
    return match.group(1) if match else None
