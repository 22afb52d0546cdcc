"""
evaluate.py -- what the model is asked, and the one scorer used for benchmark tables AND RL rewards.

A `Sample` is one benchmark item ready to prompt and to score. `build_prompt_ids` turns it into the
token ids the model sees (chat template, assistant header, answer prefix); `score(sample,
completion)` maps a completion to [0, 1] for the RULER / LongBench v2 tables and for `train.py`'s
reward alike, so the reward is the metric. The data lives in `tasks/`, and tasks/sample.py builds
Samples from it (Sample and build_prompt_ids are there); this file runs a policy on them
(`rollout.py` generates), scores them, and prints the tables.

RULER (SOURCES.md §5): string_match_all (niah, vt, cwe, fwe) and string_match_part (qa), after
RULER's clean-up `scripts/eval/evaluate.py:postprocess_pred`; scores x100 with 2 decimals, greedy
decoding. LongBench v2: the letter extracted from "The correct answer is (X)" against the
answer; temperature 0.1; the table of `result.py` (Overall, Easy, Hard, Short, Medium, Long).
Qwen3's thinking switch is passed explicitly: off for RULER and training, either way for LongBench
v2. Unparsed answers score 0; precision from the hardware.

Seeds: Samples are pure functions of (task, length, seed, index); evaluation seeds are <
TRAIN_SEED_START (tasks/__init__.py). Sampled completions (LongBench's temperature 0.1) are seeded
by (seed, item index).

Run:
    python evaluate.py --model smollm2-135m --bench ruler --lengths 1024 2048 --samples 20
    python evaluate.py --model smollm2-135m --bench longbench-v2 --data lb2.jsonl [--cot]
    python evaluate.py --model Qwen/Qwen3-4B --bench longbench-v2 --data lb2.jsonl --thinking
"""

import argparse
import hashlib
import re
import sys
import time
from pathlib import Path

from plumbing import flags
from tasks import TRAIN_SEED_START, is_training_seed

# -----------------------------------------------------------------------------
# the command line: plain values only, so that `python evaluate.py --help` and a bad flag are
# answered before torch loads (tests/test_flags.py holds them equal to the modules')

RULER_TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
               "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt",
               "cwe", "fwe", "qa_1", "qa_2"]  # tasks/ruler.py's
LONGBENCH_HUB_ID, LONGBENCH_MAX_LEN, LONGBENCH_THINKING_TOKENS = "THUDM/LongBench-v2", 120_000, 8192


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(description="RULER / LongBench v2 evaluation (docstring: choices).",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name, hub id or local folder (rollout.py)")
    p.add_argument("--bench", choices=("ruler", "longbench-v2"), default="ruler",
                   help="which benchmark")
    p.add_argument("--seed", type=int, default=0,
                   help=f"evaluation seed, < {TRAIN_SEED_START} (training uses the seeds above)")
    p.add_argument("--out", default=None,
                   help="results JSON (default runs/eval/<bench>_<model>_s<seed>.json)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 or fp32 weights; auto = bf16 where the device has it natively")
    p.add_argument("--device", default="auto", help="where to run (auto: cuda if there is one)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("RULER")
    g.add_argument("--lengths", type=int, nargs="+", default=[4096],
                   help="target lengths in the model's tokens (prompt + generation budget)")
    g.add_argument("--samples", type=int, default=20,
                   help="samples per task and length (official: 500)")
    g.add_argument("--tasks", nargs="+", default=list(RULER_TASKS),
                   help="any of the 13 tasks: " + ", ".join(RULER_TASKS))
    g.add_argument("--batch", type=int, default=8, help="prompts per greedy generate call")
    g = p.add_argument_group("LongBench v2")
    g.add_argument("--data", default=None,
                   help=f"local .json/.jsonl in the {LONGBENCH_HUB_ID} schema "
                        f"(else the hub)")
    g.add_argument("--max-len", type=int, default=LONGBENCH_MAX_LEN,
                   help="middle-truncate prompts to this many tokens")
    g.add_argument("--cot", action="store_true",
                   help="chain-of-thought prompt, then the answer call")
    g.add_argument("--thinking", action="store_true",
                   help=f"Qwen3 thinking mode: enable_thinking=True in the chat template, a "
                        f"{LONGBENCH_THINKING_TOKENS}-token budget, the answer read "
                        f"after </think>")
    g.add_argument("--limit", type=int, default=None, help="only the first N items")
    g.add_argument("--yarn", type=float, default=0.0,
                   help="YaRN rope scaling factor (Qwen3's cards: 4 for 131k tokens; 0 = off)")
    g.add_argument("--yarn-original", type=int, default=32768,
                   help="YaRN's original_max_position_embeddings (Qwen3's cards: 32768)")
    return p


def check_plain(p, args) -> None:
    """What needs no model: ranges and combinations."""
    flags.at_least(p, args, 1, "lengths", "samples", "batch", "max_len", "limit", "threads")
    flags.at_least(p, args, 0, "seed")
    if is_training_seed(args.seed):
        p.error(f"--seed {args.seed} is a training seed; evaluation seeds are below "
                f"{TRAIN_SEED_START}")
    if args.thinking and args.bench == "ruler":
        p.error("--thinking is for longbench-v2: RULER's answer prefix follows the assistant "
                "header (SOURCES.md §9.19)")
    if args.thinking and args.cot:
        p.error("--thinking and --cot are exclusive: the reasoning block is the chain of thought")


if __name__ == "__main__":
    check_plain(parser := build_parser(), parser.parse_args(sys.argv[1:]))

import torch  # noqa: E402 -- the heavy imports come after that first parse
from tqdm import tqdm  # noqa: E402

from plumbing import common  # noqa: E402
from plumbing.common import mix_seed, write_json_atomic  # noqa: E402
from plumbing.policy import load_policy  # noqa: E402
from rollout import sample_groups  # noqa: E402
from tasks import longbench, ruler  # noqa: E402
from tasks.sample import (Sample, build_prompt_ids, longbench_sample,  # noqa: F401,E402
                          prompt_ids, ruler_sample, ruler_samples, template_tokens)

# what the model is asked -- Sample, build_prompt_ids, prompt_ids, ruler_sample(s),
# longbench_sample -- is tasks/sample.py's (imported above: evaluate.Sample names the same class)

# -----------------------------------------------------------------------------
# RULER metrics (scripts/eval/synthetic/constants.py and scripts/eval/evaluate.py:postprocess_pred)

def postprocess_pred(text: str) -> str:
    """RULER's clean-up: strip, replace every control character (0x00-0x1f, incl. \\t) by a newline,
    strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", (text or "").strip()).strip()


def references_found(prediction: str, references: list) -> list:
    """For each reference: is it a case-insensitive substring of the cleaned prediction?"""
    pred = postprocess_pred(prediction).lower()
    return [ref.lower() in pred for ref in references]


def string_match_all(predictions: list, references: list) -> float:
    """RULER's metric for niah/vt/cwe/fwe: mean over samples of the fraction of references found,
    x100, 2 decimals.

    >>> string_match_all(["The numbers are 12 and 34."], [["12", "34", "56"]])
    66.67
    """
    per = [sum(references_found(p, r)) / len(r) for p, r in zip(predictions, references)]
    return round(100 * sum(per) / len(per), 2)


def string_match_part(predictions: list, references: list) -> float:
    """RULER's metric for qa: mean over samples of 1 if ANY reference is found, x100, 2 decimals."""
    per = [float(any(references_found(p, r))) for p, r in zip(predictions, references)]
    return round(100 * sum(per) / len(per), 2)


RULER_METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


# -----------------------------------------------------------------------------
# the one scorer: benchmark tables and RL rewards

def score(sample: Sample, completion: str) -> float:
    """Score in [0, 1] of one completion (the text after the answer prefix); train.py's reward.

    RULER string_match_all: fraction of references found; string_match_part: 1 if any is found (both
    after RULER's clean-up, case-insensitive). LongBench v2: 1 if the extracted letter is the
    answer, else 0 (unparsed = 0; in thinking mode only the text after </think> counts). Averaging
    over a task's samples and x100 gives RULER's `string_match_*` exactly.
    """
    if sample.metric == "string_match_all":
        found = references_found(completion, sample.references)
        return sum(found) / len(found)
    if sample.metric == "string_match_part":
        return float(any(references_found(completion, sample.references)))
    if sample.metric == "choice":
        return float(longbench.extract_choice(completion, sample.thinking) == sample.references[0])
    raise ValueError(f"unknown metric {sample.metric!r}")


def longbench_table(records: list) -> dict:
    """result.py's table: percent correct (1 decimal) overall, by difficulty and by length class,
    plus counts (§9.23)."""
    def pct(rows):
        return round(100 * sum(r["judge"] for r in rows) / len(rows), 1) if rows else None
    table = {"overall": pct(records)}
    for key, field_name in (("easy", "difficulty"), ("hard", "difficulty"), ("short", "length"),
                            ("medium", "length"), ("long", "length")):
        table[key] = pct([r for r in records if r[field_name] == key])
    table.update(n=len(records), unparsed=sum(r["pred"] is None for r in records),
                 truncated=sum(r["truncated"] for r in records),
                 truncated_by_window=sum(r["truncated_by"] == "window" for r in records),
                 unfinished_thinking=sum(r.get("unfinished_thinking", False) for r in records))
    return table


# -----------------------------------------------------------------------------
# running a model (rollout.py owns generation)

def model_window(model):
    return getattr(model.config, "max_position_embeddings", None)


def complete_samples(model, tokenizer, samples: list, batch: int = 8, temperature: float = 0.0,
                     seed: int = 0, first_index: int = 0, bar=None, engine: str = "fast") -> list:
    """Completions for samples that share max_new_tokens: greedy in left-padded batches of `batch`
    (temperature 0), else one call per sample, seeded by mix_seed(seed, first_index + position), so
    a sample's completion does not depend on its neighbours. Returns [(text, truncated)]."""
    out, step = [], batch if temperature <= 0 else 1
    for start in range(0, len(samples), step):
        chunk = samples[start:start + step]
        prompts = [prompt_ids(tokenizer, s) for s in chunk]
        ro = sample_groups(model, tokenizer, prompts, group_size=1,
                           max_new_tokens=chunk[0].max_new_tokens, temperature=temperature,
                           top_p=1.0, seed=mix_seed(seed, first_index + start), greedy_batch=batch,
                           engine=engine)
        out += list(zip(ro.texts, ro.truncated.tolist()))
        if bar is not None:
            bar.update(len(chunk))
    return out


def check_ruler_args(tasks, lengths, window=None):
    """Clear errors for bad input before any model work: unknown task, non-positive length, beyond
    the window."""
    unknown = [t for t in tasks if t not in ruler.RULER_TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; choose from: "
                         f"{', '.join(ruler.RULER_TASKS)}")
    for L in lengths:
        if L <= 0:
            raise ValueError(f"length {L} must be a positive number of tokens")
        if window and L > window:
            raise ValueError(f"length {L} exceeds the model's window of {window} tokens (RULER "
                             f"lengths include the generation budget)")


def prompt_sha(sample: Sample) -> str:
    """16 hex digits of the sha256 of what the model is asked (prompt and answer prefix): two
    runs' records of one item can be checked to hold the same prompt."""
    return hashlib.sha256((sample.prompt + "\0" + sample.answer_prefix).encode()).hexdigest()[:16]


def item_rows(records: list) -> list:
    """One row per evaluated item, the same for RULER and LongBench v2: its id, the hash of its
    prompt, the model's answer, the references and its correctness in [0, 1] (RULER's per-sample
    score; 1 or 0 for a LongBench v2 choice). Arms are paired item by item on these rows."""
    rows = []
    for r in records:
        if "_id" in r:  # LongBench v2
            rows.append(dict(id=r["_id"], prompt_sha=r["prompt_sha"], answer=r["response"],
                             references=[r["answer"]], correct=float(r["judge"])))
        else:  # RULER: (task, length, seed, index) names the item
            rows.append(dict(id=f"{r['task']}@{r['length']}/s{r['seed']}/{r['index']}",
                             prompt_sha=r["prompt_sha"], answer=r["completion"],
                             references=r["references"], correct=float(r["score"])))
    return rows


def evaluate_ruler(model, tokenizer, tasks=tuple(ruler.RULER_TASKS), lengths=(4096,),
                   samples: int = 20, seed: int = 0, batch: int = 8, progress: bool = True,
                   engine: str = "fast"):
    """RULER on a model: (table, records). table = {"scores": {task: {length: score}}, "average":
    {length: mean over tasks}, ...} with RULER's x100, 2-decimal scores; records = one dict per
    sample (no prompt). All samples are generated first, so a bad task or a too-short length fails
    before any generation."""
    tasks, lengths = list(tasks), [int(L) for L in lengths]
    check_ruler_args(tasks, lengths, model_window(model))
    cells = {(t, L): ruler_samples(tokenizer, t, L, samples, seed) for L in lengths for t in tasks}
    scores, records = {t: {} for t in tasks}, []
    bar = tqdm(total=samples * len(cells), desc="RULER", unit="sample", disable=not progress)
    for (task, L), cell in cells.items():
        bar.set_postfix_str(f"{task} @ {L}")
        outs = complete_samples(model, tokenizer, cell, batch=batch, bar=bar, engine=engine)
        metric = RULER_METRICS[cell[0].metric]
        scores[task][L] = metric([o for o, _ in outs], [s.references for s in cell])
        records += [dict(task=task, length=L, index=s.index, seed=s.seed,
                         prompt_sha=prompt_sha(s), prompt_tokens=s.prompt_tokens,
                         references=s.references, completion=text, truncated=trunc,
                         score=score(s, text))
                    for s, (text, trunc) in zip(cell, outs)]
    bar.close()
    average = {L: round(sum(scores[t][L] for t in tasks) / len(tasks), 2) for L in lengths}
    table = dict(scores=scores, average=average, tasks=tasks, lengths=lengths, samples=samples,
                 seed=seed)
    return table, records


def evaluate_longbench(model, tokenizer, items: list, max_len: int = longbench.LONGBENCH_MAX_LEN,
                       cot: bool = False, seed: int = 0, progress: bool = True,
                       thinking: bool = False, engine: str = "fast"):
    """LongBench v2 on a model: (table, records). Temperature 0.1, one seeded call per item; two
    with cot (the reasoning, then the answer-extraction prompt that carries the reasoning but not
    the document). thinking=True asks in the template's thinking mode (tasks/longbench.py, choice 2;
    exclusive with cot)."""
    window, records = model_window(model), []

    def complete(sample, i):  # one sampled completion, seeded by (seed, item index)
        (text, _), = complete_samples(model, tokenizer, [sample], seed=seed, first_index=i,
                                      temperature=longbench.LONGBENCH_TEMPERATURE, engine=engine)
        return text.strip()

    for i, item in enumerate(tqdm(items, desc="LongBench v2", unit="item", disable=not progress)):
        sample = longbench_sample(item, i, tokenizer, max_len, window, cot, seed, thinking)
        response = complete(sample, i)
        record = dict(_id=item["_id"], difficulty=item["difficulty"], length=item["length"],
                      answer=item["answer"], prompt_sha=prompt_sha(sample),
                      truncated=sample.meta["truncated"],
                      truncated_by=sample.meta["truncated_by"])
        if cot:
            record["response_cot"] = response
            sample = Sample(bench="longbench-v2", **longbench.longbench_answer_item(
                item, i, tokenizer, response, template_tokens(tokenizer), max_len, window, seed))
            response = complete(sample, i)
        if thinking:
            record["unfinished_thinking"] = "</think>" not in response
        record.update(response=response, pred=longbench.extract_choice(response, thinking))
        record["judge"] = score(sample, response) == 1.0
        records.append(record)
    return longbench_table(records), records


# -----------------------------------------------------------------------------
# reporting

def format_before_after(before: dict, after: dict) -> str:
    lines = [f"{'metric':<32} {'before':>8} {'after':>8} {'delta':>8}"]
    for k in before:
        lines.append(f"{k:<32} {before[k]:8.2f} {after[k]:8.2f} {after[k] - before[k]:+8.2f}")
    return "\n".join(lines)



def format_ruler_table(table: dict) -> str:
    """Task x length table with RULER's scores and the per-length average (the mean over tasks)."""
    lengths = table["lengths"]
    width = max(len(t) for t in table["tasks"] + ["average"])
    lines = [f"{'task':<{width}}" + "".join(f"{L:>10}" for L in lengths)]
    for t in table["tasks"]:
        lines.append(f"{t:<{width}}" + "".join(f"{table['scores'][t][L]:>10.2f}" for L in lengths))
    average = "".join(f"{table['average'][L]:>10.2f}" for L in lengths)
    lines.append(f"{'average':<{width}}" + average)
    return "\n".join(lines)


def format_longbench_table(table: dict) -> str:
    cols = ("overall", "easy", "hard", "short", "medium", "long")
    cell = lambda v: "-" if v is None else f"{v:.1f}"
    text = ("".join(f"{c.capitalize():>9}" for c in cols) + "\n"
            + "".join(f"{cell(table[c]):>9}" for c in cols)
            + f"\n{table['n']} items, {table['unparsed']} unparsed answers (scored wrong), "
              f"{table['truncated']} prompts middle-truncated "
              f"({table['truncated_by_window']} of them to the model's window)")
    if table.get("unfinished_thinking"):
        text += f", {table['unfinished_thinking']} reasoning blocks never closed"
    return text


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    """Every flag checked: the plain ones (check_plain), then files, task names and the model's
    window (check_args)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    check_plain(p, args)
    check_args(p, args)
    return args


def check_args(p, args) -> None:
    """Ranges, files, task names and the model's window, before the model loads
    (plumbing/flags.py)."""
    flags.model_source(p, "model", args.model)  # a hub id: reachable or cached, else one line
    flags.existing(p, "data", args.data, "file")
    if args.bench == "ruler":
        flags.known(p, "tasks", args.tasks, ruler.RULER_TASKS)
        window = int(args.yarn_original * args.yarn) if args.yarn else \
            flags.model_window(args.model)
        for L in args.lengths:
            flags.within(p, "lengths", L, window, "a RULER length (answer included)")


def main(argv=None):
    args = parse_args(argv)
    if args.bench == "ruler":
        check_ruler_args(args.tasks, args.lengths)  # fail before loading anything
    elif args.data is None:  # the hub's copy: reachable or cached, else one line now
        hub = longbench.LONGBENCH_HUB_ID
        flags.from_hub(flags.die, f"--bench longbench-v2 without --data: {hub} is not a local path",
                       flags.dataset_in_cache(hub),
                       flags.local_dataset_hint("data", hub, "DIR/data.json"))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    precision, why = common.choose_precision(args.precision, args.device)
    print(f"precision: {precision} ({why})")
    model, tokenizer = load_policy(args.model, device=args.device, yarn=args.yarn,
                                   yarn_original=args.yarn_original,
                                   dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    if args.bench == "ruler":
        table, records = evaluate_ruler(model, tokenizer, args.tasks, args.lengths, args.samples,
                                        args.seed, args.batch)
        report = format_ruler_table(table)
    else:
        items = longbench.load_longbench(args.data)[:args.limit]
        table, records = evaluate_longbench(model, tokenizer, items, args.max_len, args.cot,
                                            args.seed, thinking=args.thinking)
        report = format_longbench_table(table)
    seconds = time.time() - t0
    print(report)
    print(f"wall time {seconds / 60:.1f} min ({seconds:.0f} s), {len(records)} samples, "
          f"model {args.model}")
    out = args.out or f"runs/eval/{args.bench}_{Path(args.model).name}_s{args.seed}.json"
    write_json_atomic(out, dict(bench=args.bench, model=args.model, args=vars(args),
                                versions=common.versions(),
                                seconds=round(seconds, 1), table=table, records=records))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
