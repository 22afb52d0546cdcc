"""
tasks/sample.py -- what the model is asked: a `Sample` (one benchmark item ready to prompt and to
score, RULER and LongBench v2 alike, and every training prompt) and the token ids it becomes.

    build_prompt_ids(tok, text, chat, answer_prefix, thinking)  chat template + text + prefix
    prompt_ids(tok, sample)                 the ids the model is given for a sample
    ruler_sample(tok, task, length, seed, index)    one RULER item fitted to `length` tokens
    longbench_sample(item, index, tok, ...)         one LongBench v2 item, truncated to fit

The generators in tasks/ruler.py and tasks/longbench.py return plain dicts of Sample fields;
this file builds the Sample, with the one function that turns text into the model's token ids
(the chat template included). `evaluate.py` scores Samples and runs a policy on them;
tasks/train_data.py builds the training prompts from here, so neither imports the other.
Test: .venv/bin/python -m pytest -q tests/test_evaluate.py
"""

from dataclasses import dataclass, field

from tasks import longbench, ruler


@dataclass
class Sample:
    """One benchmark item, ready to prompt and to score (RULER and LongBench v2 alike).

    The model sees: chat template(user turn = `prompt`, thinking switch) + `answer_prefix`, and may
    write `max_new_tokens` tokens. `score(sample, completion)` compares the completion with
    `references`.
    """
    bench: str            # "ruler" | "longbench-v2" | what train.py reads from its own data
    task: str             # RULER task name, or "longbench-v2"
    length: int           # RULER: target tokens (prompt + generation budget); LongBench v2: 0
    index: int            # position within its (task, length, seed) set
    seed: int
    prompt: str           # the user turn
    answer_prefix: str    # after the chat template's assistant header (RULER); "" for LongBench v2
    references: list      # RULER: strings to find in the completion; LongBench v2: [correct letter]
    metric: str           # "string_match_all" | "string_match_part" | "choice"
    max_new_tokens: int
    prompt_tokens: int = 0  # chat template + prompt + answer prefix, in the evaluated tokenizer
    meta: dict = field(default_factory=dict)
    thinking: bool = False  # Qwen3's enable_thinking: the model writes its own <think> block first


def build_prompt_ids(tokenizer, text: str, chat: bool = True, answer_prefix: str = "",
                     thinking: bool = False) -> list:
    """Token ids of one prompt: the text as a user turn in the model's chat template with the
    assistant header appended (chat=True and the tokenizer has a template; else the plain text),
    then an optional answer prefix that the model continues (RULER's, SOURCES.md §5).

    thinking is handed to the template as `enable_thinking` (transformers passes extra keywords
    through as template variables). Qwen3's template then ends the prompt with
        thinking=False: '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + answer prefix
        thinking=True:  '<|im_start|>assistant\\n' (the model opens its own block)
    tests/test_evaluate.py checks both on the published template. Templates without the switch
    ignore it."""
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            enable_thinking=thinking, tokenize=True,
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if answer_prefix:
        ids = list(ids) + tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    return list(ids)


def prompt_ids(tokenizer, sample: Sample) -> list:
    """Token ids the model is given for a sample (chat template + user turn + answer prefix)."""
    return build_prompt_ids(tokenizer, sample.prompt, chat=True, answer_prefix=sample.answer_prefix,
                            thinking=sample.thinking)


def template_tokens(tokenizer, thinking: bool = False) -> int:
    """Tokens the chat template adds around an empty user turn, in the given thinking mode."""
    return len(build_prompt_ids(tokenizer, "", chat=True, thinking=thinking))


def ruler_sample(tokenizer, task: str, length: int, seed: int = 0, index: int = 0) -> Sample:
    """One RULER sample fitted to `length` tokens of this tokenizer, chat template included
    (thinking off, §9.19). Pure function of (tokenizer, task, length, seed, index); train.py uses
    seeds >= TRAIN_SEED_START."""
    encode = lambda text, prefix: build_prompt_ids(tokenizer, text, chat=True, answer_prefix=prefix)
    fields = ruler.ruler_item(tokenizer, task, length, seed, index, prompt_ids=encode)
    return Sample(bench="ruler", **fields)


def ruler_samples(tokenizer, task: str, length: int, num: int, seed: int = 0) -> list:
    """`num` samples of one task at one length: indices 0..num-1 of this seed."""
    return [ruler_sample(tokenizer, task, length, seed, i) for i in range(num)]


def longbench_sample(item: dict, index: int, tokenizer, max_len: int = longbench.LONGBENCH_MAX_LEN,
                     window=None, cot: bool = False, seed: int = 0,
                     thinking: bool = False) -> Sample:
    """A LongBench v2 item as a Sample (0-shot, the first CoT call, or 0-shot in thinking mode),
    truncated to fit `window` together with the chat template and the generation budget
    (tasks/longbench.py)."""
    fields = longbench.longbench_item(item, index, tokenizer, template_tokens(tokenizer, thinking),
                                      max_len=max_len, window=window, cot=cot, seed=seed,
                                      thinking=thinking)
    return Sample(bench="longbench-v2", **fields)
