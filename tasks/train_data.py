"""
tasks/train_data.py -- the RL training prompts: the builtin RULER-style task, or any dataset with
context / question / answer fields (a local JSONL file or a hub id), every row checked before a
model loads.

    rows = read_train_rows(args)              [(line, row)] of --train-data, each one checked
    data = load_train_data(args, tok, rows)   a Sample (tasks/sample.py) per row (None: builtin)
    draw_samples(data, tok, args, seed, n)    one generation batch, a pure function of the seed

Builtin samples use seeds >= tasks.TRAIN_SEED_START, disjoint from every evaluation seed
(SOURCES.md §9.16). A bad row names the file, the line and the field.
Test: .venv/bin/python -m pytest -q tests/test_flags.py tests/test_train.py
"""

import random
from pathlib import Path

import tasks
from plumbing import common, flags
from tasks.sample import Sample, longbench_sample, ruler_sample


QA_TEMPLATE = ("Read the following text and answer the question.\n\n{context}\n\n"
               "Question: {question}")
DEFAULT_FIELDS = {"context": "context", "question": "question", "answer": "answer",
                  "choices": "choices"}


def parse_field_map(spec: str) -> dict:
    """'context=doc,answer=ans' -> the default mapping with those fields renamed."""
    fields = dict(DEFAULT_FIELDS)
    for part in filter(None, spec.split(",")):
        key, _, name = part.partition("=")
        if key not in fields or not name:
            raise ValueError(f"bad entry {part!r}; expected one of {sorted(fields)}=NAME")
        fields[key] = name
    return fields


def row_to_sample(row: dict, n: int, fields: dict, source: str, tokenizer, max_len: int):
    """A dataset row -> a Sample. Multiple choice (a choices list, or LongBench v2's
    choice_A..D) is scored by the letter; a free answer (a string or a list of acceptable strings)
    by RULER's string_match_part."""
    def need(key):
        if fields[key] not in row or row[fields[key]] in (None, ""):
            raise ValueError(f"{source}: row {n}: missing field '{fields[key]}' (the {key}; "
                             "see --field-map)")
        return row[fields[key]]
    context, question, answer = need("context"), need("question"), need("answer")
    choices = row.get(fields["choices"]) or (
        [row[f"choice_{c}"] for c in "ABCD"] if "choice_A" in row else None)
    if choices:
        if len(choices) != 4 or answer not in ("A", "B", "C", "D"):
            raise ValueError(f"{source}: row {n}: expected 4 choices and an answer letter A-D, got "
                             f"{len(choices)} choices and answer {answer!r}")
        item = {"_id": str(n), "domain": "", "sub_domain": "", "difficulty": "", "length": "",
                "context": context, "question": question, "answer": answer,
                **{f"choice_{c}": x for c, x in zip("ABCD", choices)}}
        return longbench_sample(item, n, tokenizer, max_len=max_len)
    refs = [answer] if isinstance(answer, str) else [str(a) for a in answer]
    return Sample(bench="train", task="qa", length=0, index=n, seed=0,
                  prompt=QA_TEMPLATE.format(context=context, question=question),
                  answer_prefix="Answer:", references=refs, metric="string_match_part",
                  max_new_tokens=32)


def read_train_rows(args) -> list:
    """[(line or row number, row)] of --train-data, every row checked (check_row) before any model
    loads; [] for the builtin generator. A hub id needs the network."""
    if args.train_data == "builtin":
        return []
    fields, path = parse_field_map(args.field_map), Path(args.train_data)
    if path.exists():
        try:
            rows, where = common.read_jsonl(path, numbered=True), "line"
        except (ValueError, UnicodeDecodeError) as e:
            flags.die(str(e))
    else:  # a hub dataset id (`datasets` is imported only on this path)
        from datasets import load_dataset
        rows, where = list(enumerate(load_dataset(args.train_data, split="train"), 1)), "row"
    if not rows:
        flags.die(f"{path}: no rows")
    for n, row in rows:
        check_row(row, fields, f"{path}: {where} {n}")
    return rows


def check_row(row, fields: dict, where: str) -> None:
    """One training row: an object with a non-empty string context and question, an answer that
    is a string or a list of strings, and, if it has choices, 4 strings and a letter A-D."""
    def bad(field, expected, got):
        flags.die(f"{where}: field '{field}': expected {expected}, got {got!r:.80}")
    if not isinstance(row, dict):
        flags.die(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("context", "question", "answer"):
        if fields[key] not in row or row[fields[key]] in (None, ""):
            flags.die(f"{where}: missing field '{fields[key]}' (the {key}; see --field-map)")
    for key in ("context", "question"):
        if not isinstance(row[fields[key]], str):
            bad(fields[key], "a string", row[fields[key]])
    answer = row[fields["answer"]]
    if not (isinstance(answer, str) or (isinstance(answer, list) and answer
                                        and all(isinstance(a, str) for a in answer))):
        bad(fields["answer"], "a string or a list of strings", answer)
    choices = row.get(fields["choices"])
    if choices is not None and not (isinstance(choices, list) and len(choices) == 4
                                    and all(isinstance(c, str) for c in choices)):
        bad(fields["choices"], "a list of 4 strings", choices)
    if (choices or "choice_A" in row) and answer not in ("A", "B", "C", "D"):
        bad(fields["answer"], "a letter A-D (the row has choices)", answer)


def load_train_data(args, tokenizer, rows: list):
    """None for the builtin generator (samples are drawn per step); else the dataset's samples."""
    if args.train_data == "builtin":
        return None
    fields = parse_field_map(args.field_map)
    return [row_to_sample(row, n, fields, args.train_data, tokenizer, args.train_len)
            for n, row in rows]


def draw_samples(data, tokenizer, args, seed: int, num: int) -> list:
    """`num` training samples for one generation batch, a pure function of `seed`. Builtin samples
    use seeds >= tasks.TRAIN_SEED_START, disjoint from every evaluation seed."""
    if data is None:
        return [ruler_sample(tokenizer, args.train_task, args.train_len,
                             seed=tasks.TRAIN_SEED_START + seed % 10**9, index=i)
                for i in range(num)]
    rng = random.Random(seed)
    return [data[rng.randrange(len(data))] for _ in range(num)]
