"""Tests for evaluate.py and tasks/: RULER metrics and generators, LongBench v2 loading/prompting/
extraction, the shared scorer, and the prompt the model is given (Qwen3's thinking switch).

Run: .venv/bin/python -m pytest -q tests/test_evaluate.py
Uses the embedded SmolLM2 tokenizer (no network), a tiny byte-level tokenizer carrying Qwen3's
published chat template (tests/fixtures), and, end to end, tiny random models from conftest.
"""

import json
import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import evaluate as E
from conftest import ROOT, tiny_model
from plumbing.common import write_json_atomic
from plumbing.policy import resolve_model_path
from tasks import TRAIN_SEED_START, longbench, ruler

LENGTHS = (1024, 2048)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def qwen3_tok():
    """A tiny byte-level tokenizer (one token per byte, no merges) with Qwen3's special tokens and
    its published chat template: decoding gives back the exact prompt text."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    qtok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    qtok.add_tokens(["<think>", "</think>"])  # Qwen3 declares both as added tokens, NOT special
    qtok.chat_template = (ROOT / "tests" / "fixtures" / "qwen3_chat_template.jinja").read_text()
    return qtok


# -----------------------------------------------------------------------------
# RULER metrics (scripts/eval/synthetic/constants.py) on hand cases

def test_postprocess_replaces_control_characters_and_strips():
    assert E.postprocess_pred("  The answer:\t42\x00x \n") == "The answer:\n42\nx"
    assert E.postprocess_pred(None) == ""


def test_string_match_all_partial_and_case_insensitive():
    preds = ["The numbers are 12 and 34.", "nothing here", "ALPHA-Beta"]
    refs = [["12", "34", "56"], ["7"], ["alpha-beta"]]
    # (2/3 + 0 + 1) / 3 = 0.5556 -> 55.56
    assert E.string_match_all(preds, refs) == 55.56
    assert E.string_match_all(["x"], [["a", "b", "c"]]) == 0.0


def test_string_match_part_any_reference_counts():
    preds = ["in the 10th century", "Paris", "no idea"]
    refs = [["10th and 11th centuries", "10th century"], ["paris", "France"], ["London"]]
    assert E.string_match_part(preds, refs) == 66.67


def test_control_character_inside_prediction_is_a_newline():
    # RULER turns \x07 into \n: "12\x0734" no longer contains "1234" but still has "12" and "34"
    assert E.string_match_all(["12\x0734"], [["1234"]]) == 0.0
    assert E.string_match_all(["12\x0734"], [["12", "34"]]) == 100.0


def test_score_averages_to_the_ruler_metric():
    sample = lambda refs, metric: E.Sample("ruler", "t", 0, 0, 0, "", "", refs, metric, 8)
    preds, refs = ["a b", "c", "B"], [["a", "b"], ["a", "c", "d"], ["b", "x"]]
    per = [E.score(sample(r, "string_match_all"), p) for p, r in zip(preds, refs)]
    assert per == [1.0, pytest.approx(1 / 3), 0.5]
    assert round(100 * sum(per) / 3, 2) == E.string_match_all(preds, refs)
    assert E.score(sample(["x", "B"], "string_match_part"), "b!") == 1.0


# -----------------------------------------------------------------------------
# RULER generators

def distractor_line_tokens(tok, task):
    """Tokens of one needle-haystack line: the indivisible unit of niah_multikey_2/3
    (SOURCES.md §9.22)."""
    _, cfg = ruler.RULER_TASKS[task]
    rng = ruler.sample_rng("unit")
    line = ruler.NEEDLE.format(type_needle_v=cfg["type_needle_v"],
                               key=ruler.random_value(rng, cfg["type_needle_k"]),
                               value=ruler.random_value(rng, cfg["type_needle_v"]))
    return len(tok("\n" + line, add_special_tokens=False)["input_ids"]) + 2


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(ruler.RULER_TASKS))
def test_generator_fits_length_and_contains_its_answers(tok, task, length):
    s = E.ruler_sample(tok, task, length, seed=0, index=0)
    # RULER's length: prompt (chat template included) + generation budget
    total = len(E.prompt_ids(tok, s)) + s.max_new_tokens
    assert total == s.prompt_tokens + s.max_new_tokens
    slack = 0.02 * length
    if task in ("niah_multikey_2", "niah_multikey_3"):
        slack = max(slack, distractor_line_tokens(tok, task))
    assert length - slack <= total <= length, (task, total)
    assert s.references and s.max_new_tokens >= 24
    assert "{context}" not in s.prompt and "{query}" not in s.prompt
    if task == "qa_2":  # HotpotQA answers are often 'yes'/'no': check the supporting paragraphs
        assert all(doc in s.prompt for doc in s.meta["gold"])
    else:
        for ref in s.references:
            assert ref in s.prompt, (task, ref)


def test_official_wording_and_singular_rewrite(tok):
    s = E.ruler_sample(tok, "niah_single_2", 1024)
    assert s.prompt.startswith("A special magic number is hidden within the following text.")
    assert s.answer_prefix.startswith(" The special magic number for ")
    assert s.answer_prefix.endswith(" is")
    m = E.ruler_sample(tok, "niah_multivalue", 1024)
    assert m.prompt.startswith("Some special magic numbers are hidden")
    assert m.answer_prefix.endswith(" are")
    assert m.prompt.count("One of the special magic numbers for") == 4 and len(m.references) == 4
    vt = E.ruler_sample(tok, "vt", 1024)
    # the solved in-context example, then the task
    assert vt.prompt.count("Memorize and track the chain(s)") == 2
    assert "assgined" in vt.answer_prefix  # RULER's own spelling
    assert E.ruler_sample(tok, "qa_1", 1024).answer_prefix == " Answer:"


def test_generators_are_deterministic_by_seed(tok):
    for task in ("niah_multikey_1", "vt", "cwe", "fwe", "qa_1"):
        a = E.ruler_sample(tok, task, 1024, seed=3, index=1)
        b = E.ruler_sample(tok, task, 1024, seed=3, index=1)
        assert a == b
        c = E.ruler_sample(tok, task, 1024, seed=4, index=1)
        assert c.prompt != a.prompt
    first, second = (E.ruler_sample(tok, "niah_single_1", 1024, 0, i) for i in (0, 1))
    assert first != second


def test_training_seeds_use_disjoint_material(tok):
    qas, _ = ruler.qa_dataset("squad")
    eval_questions = {q["query"] for q in qas[:ruler.EVAL_QA_QUESTIONS]}
    train = [E.ruler_sample(tok, "qa_1", 1024, seed=TRAIN_SEED_START + i) for i in range(3)]
    assert all(s.meta["query"] not in eval_questions for s in train)
    ev = E.ruler_sample(tok, "niah_single_2", 1024, seed=0)
    tr = E.ruler_sample(tok, "niah_single_2", 1024, seed=TRAIN_SEED_START)
    # evaluation starts at the first essay word, training at a random one
    assert "April 2012" in ev.prompt and "April 2012" not in tr.prompt


def test_bad_ruler_input_gives_clear_errors(tok):
    with pytest.raises(ValueError, match="unknown RULER task 'nope'"):
        E.ruler_sample(tok, "nope", 1024)
    with pytest.raises(ValueError, match="below its minimum"):
        E.ruler_sample(tok, "vt", 300)  # vt's in-context example alone needs ~500 tokens
    with pytest.raises(ValueError, match="exceeds the model's window"):
        E.check_ruler_args(["vt"], [9000], window=8192)
    with pytest.raises(SystemExit):  # a flag error, before loading a model (tests/test_flags.py)
        E.main(["--bench", "ruler", "--tasks", "niah_single_1", "bogus"])


# -----------------------------------------------------------------------------
# LongBench v2

def lb_row(i, **over):
    row = dict(_id=f"id{i}", domain="Single-Document QA", sub_domain="Invented", difficulty="easy",
               length="short", question=f"Which colour is door {i}?", choice_A="red",
               choice_B="green", choice_C="blue", choice_D="white", answer="B",
               context=f"Door {i} is green. " * 50)
    row.update(over)
    return row


@pytest.mark.parametrize("response, letter", [
    ("The correct answer is (B).", "B"),
    ("**The correct answer is (C)**", "C"),
    ("The correct answer is **D**", "D"),
    ("The correct answer is A because ...", "A"),
    ("<think>The correct answer is (A)? no...</think>\nThe correct answer is (B)", "B"),
    ("so it is B. </think> The correct answer is (C)", "C"),      # <think> opened in the prompt
    ("<think>The correct answer is (A) I think, but", None),       # never finished thinking
    ("I believe the answer is B.", None),
    ("The correct answer is (E)", None),
    ("", None),
])
def test_extract_choice(response, letter):
    assert longbench.extract_choice(response) == letter


def test_load_jsonl_and_json(tmp_path):
    rows = [lb_row(1), lb_row(2, difficulty="hard", length="long", answer="D")]
    jl = tmp_path / "lb.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert longbench.load_longbench(jl) == rows
    js = tmp_path / "lb.json"
    js.write_text(json.dumps(rows + [dict(lb_row(3), extra="ignored")]))
    assert longbench.load_longbench(js)[2] == lb_row(3)


def test_load_errors_name_file_row_and_field(tmp_path):
    bad = lb_row(2)
    del bad["choice_C"]
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(lb_row(1)) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 2: missing field 'choice_C'"):
        longbench.load_longbench(f)
    f.write_text(json.dumps(lb_row(1, answer="E")) + "\n")
    with pytest.raises(ValueError, match=r"row 1: field 'answer' is 'E'"):
        longbench.load_longbench(f)
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: invalid JSON"):
        longbench.load_longbench(f)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1",
                    reason="would download the real dataset")
def test_hub_loading_offline_says_what_to_do():
    with pytest.raises(RuntimeError, match="pass --data FILE"):
        longbench.load_longbench(None)


def test_middle_truncation_keeps_first_and_last_halves(tok):
    assert longbench.middle_truncate(list(range(10)), 4) == [0, 1, 8, 9]
    # pred.py: ids[:5//2] + ids[-5//2:]
    assert longbench.middle_truncate(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert longbench.middle_truncate([1, 2], 5) == [1, 2]
    text = "BEGIN " + " ".join(f"w{i}" for i in range(2000)) + " END?"
    short, truncated = longbench.truncate_prompt(tok, text, 100)
    assert truncated and short.startswith("BEGIN w0 w1") and short.endswith("w1999 END?")
    assert abs(len(tok(short, add_special_tokens=False)["input_ids"]) - 100) <= 2
    assert longbench.truncate_prompt(tok, "short", 100) == ("short", False)


def test_longbench_prompt_and_window_truncation(tok):
    item = lb_row(1, context="Door 1 is green. " * 3000)  # ~18k tokens
    s = E.longbench_sample(item, 0, tok, max_len=120_000, window=8192)
    assert s.prompt.startswith("Please read the following text and answer the question below.\n\n"
                               "<text>\nDoor 1")
    assert "(B) green\n(C) blue" in s.prompt
    assert s.prompt.endswith('"The correct answer is (insert answer here)".')
    assert s.meta["truncated"] and s.meta["truncated_by"] == "window"
    assert len(E.prompt_ids(tok, s)) + s.max_new_tokens <= 8192
    s = E.longbench_sample(item, 0, tok, max_len=1000, window=8192)
    assert s.meta["truncated_by"] == "max_len"
    cot = E.longbench_sample(lb_row(1), 0, tok, window=8192, cot=True)
    assert cot.prompt.endswith("Let’s think step by step:") and cot.max_new_tokens == 1024
    assert not cot.meta["truncated"]
    assert E.score(s, "The correct answer is (B)") == 1.0 and E.score(s, "(B)") == 0.0


def test_longbench_table_counts():
    rec = lambda d, l, judge, pred="A", trunc=False: dict(
        difficulty=d, length=l, judge=judge, pred=pred, truncated=trunc,
        truncated_by="window" if trunc else None)
    records = [rec("easy", "short", True), rec("hard", "medium", False, None),
               rec("hard", "long", True, trunc=True), rec("easy", "medium", True)]
    t = E.longbench_table(records)
    columns = (t["overall"], t["easy"], t["hard"], t["short"], t["medium"], t["long"])
    assert columns == (75.0, 100.0, 50.0, 100.0, 50.0, 100.0)
    assert (t["n"], t["unparsed"], t["truncated"], t["truncated_by_window"]) == (4, 1, 1, 1)


# -----------------------------------------------------------------------------
# end to end with a tiny random model (window 512) and the real tokenizer

def test_evaluate_ruler_and_longbench_end_to_end(tok, tmp_path, monkeypatch):
    model = tiny_model("llama", vocab=len(tok))
    # a random model never says EOS: shorten the generation budgets so the test takes seconds
    for family in ("niah", "qa"):
        monkeypatch.setitem(ruler.RULER_FAMILIES[family], "max_new_tokens", 4)
    monkeypatch.setattr(longbench, "LONGBENCH_NEW_TOKENS", 4)
    monkeypatch.setattr(longbench, "LONGBENCH_COT_TOKENS", 4)
    table, records = E.evaluate_ruler(model, tok, ["niah_single_1", "qa_1"], [512], samples=2,
                                      progress=False)
    assert set(table["scores"]) == {"niah_single_1", "qa_1"} and len(records) == 4
    assert all(0 <= table["scores"][t][512] <= 100 for t in table["scores"])
    scores = table["scores"]
    mean = (scores["niah_single_1"][512] + scores["qa_1"][512]) / 2
    assert table["average"][512] == round(mean, 2)
    assert "average" in E.format_ruler_table(table)
    out = tmp_path / "r.json"
    write_json_atomic(out, dict(table=table, records=records))
    assert json.loads(out.read_text())["table"]["average"]["512"] == table["average"][512]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind

    items = [lb_row(1, context="Door 1 is green. " * 200),
             lb_row(2, difficulty="hard", length="long")]
    lb, recs = E.evaluate_longbench(model, tok, items, progress=False)
    assert lb["n"] == 2 and lb["truncated_by_window"] >= 1  # ~1k-token document, 512-token window
    assert lb["unparsed"] == sum(r["pred"] is None for r in recs)
    assert "unparsed" in E.format_longbench_table(lb)
    # the reasoning call, then the answer call
    lb, recs = E.evaluate_longbench(model, tok, items[:1], cot=True, progress=False)
    assert lb["n"] == 1 and "response_cot" in recs[0] and "response" in recs[0]


# -----------------------------------------------------------------------------
# the prompt the model sees: Qwen3's thinking switch on its published template

HEADER = "<|im_start|>user\nWhich door?<|im_end|>\n<|im_start|>assistant\n"


def test_thinking_off_closes_an_empty_think_block_before_the_answer_prefix(qwen3_tok):
    ids = E.build_prompt_ids(qwen3_tok, "Which door?", answer_prefix=" Answer:", thinking=False)
    assert qwen3_tok.decode(ids) == HEADER + "<think>\n\n</think>\n\n Answer:"
    think, end_think = qwen3_tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert ids.count(think) == 1 and ids.count(end_think) == 1  # the real tokens, not their letters


def test_thinking_on_stops_at_the_assistant_header(qwen3_tok):
    ids = E.build_prompt_ids(qwen3_tok, "Which door?", thinking=True)
    assert qwen3_tok.decode(ids) == HEADER
    assert E.build_prompt_ids(qwen3_tok, "Which door?") == \
        E.build_prompt_ids(qwen3_tok, "Which door?", thinking=False)  # off unless asked for


def test_template_tokens_count_the_empty_think_block(qwen3_tok):
    # byte-level, no merges: <think> \n \n </think> \n \n = 6 tokens more with thinking off
    assert E.template_tokens(qwen3_tok, False) - E.template_tokens(qwen3_tok, True) == 6


def test_templates_without_the_switch_ignore_it(tok):
    plain = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"]
    assert E.build_prompt_ids(tok, "Hi", thinking=True) == list(plain)
    assert E.build_prompt_ids(tok, "Hi") == list(plain)
    assert not E.ruler_sample(tok, "niah_single_1", 1024).thinking  # RULER asks with thinking off


@pytest.mark.parametrize("response, letter", [
    ("<think>so (A)? no.</think>\n\nThe correct answer is (B)", "B"),
    ("so it is D.</think> The correct answer is (D)", "D"),       # the opening tag is not needed
    ("<think>The correct answer is (C), I think, but", None),     # budget ran out inside the block
    ("The correct answer is (C)", None),                          # no </think>: no answer
])
def test_extract_choice_in_thinking_mode_reads_only_after_the_block(response, letter):
    assert longbench.extract_choice(response, thinking=True) == letter


def test_longbench_thinking_sample_budget_prompt_and_score(qwen3_tok):
    s = E.longbench_sample(lb_row(1), 0, qwen3_tok, thinking=True)
    assert s.thinking and s.max_new_tokens == longbench.LONGBENCH_THINKING_TOKENS
    text = qwen3_tok.decode(E.prompt_ids(qwen3_tok, s))
    assert text.endswith("(insert answer here)\".<|im_end|>\n<|im_start|>assistant\n")
    assert E.score(s, "<think>door 1 is green</think>\n\nThe correct answer is (B)") == 1.0
    assert E.score(s, "The correct answer is (B)") == 0.0  # never thought: no answer
    off = E.longbench_sample(lb_row(1), 0, qwen3_tok)
    assert E.score(off, "The correct answer is (B)") == 1.0
    with pytest.raises(ValueError, match="exclusive"):
        E.longbench_sample(lb_row(1), 0, qwen3_tok, cot=True, thinking=True)


def test_prompt_limit_leaves_room_for_budget_and_template():
    assert longbench.prompt_limit(120_000, 8192, 128, 20) == (8192 - 128 - 20 - 8, "window")
    assert longbench.prompt_limit(1000, 8192, 128, 20) == (1000, "max_len")
    assert longbench.prompt_limit(1000, None, 128, 20) == (1000, "max_len")
    with pytest.raises(ValueError, match="no room for a prompt"):
        longbench.prompt_limit(120_000, 8192, 8192, 20)


def test_thinking_flag_is_refused_where_it_has_no_meaning():
    with pytest.raises(SystemExit):
        E.parse_args(["--bench", "ruler", "--thinking"])
    with pytest.raises(SystemExit):
        E.parse_args(["--bench", "longbench-v2", "--thinking", "--cot"])
    assert E.parse_args(["--bench", "longbench-v2", "--thinking"]).thinking


def test_evaluate_longbench_in_thinking_mode_end_to_end(qwen3_tok, monkeypatch):
    model = tiny_model("qwen3", vocab=len(qwen3_tok))
    monkeypatch.setattr(longbench, "LONGBENCH_THINKING_TOKENS", 4)
    lb, recs = E.evaluate_longbench(model, qwen3_tok, [lb_row(1), lb_row(2)], thinking=True,
                                    progress=False)
    assert lb["n"] == 2 and lb["unfinished_thinking"] == sum(r["unfinished_thinking"] for r in recs)
    assert all(r["pred"] is None for r in recs if r["unfinished_thinking"])


def test_sampled_completion_does_not_depend_on_its_neighbours(tok):
    model = tiny_model("llama", vocab=len(tok))
    samples = [E.Sample(bench="t", task="t", length=0, index=i, seed=0, prompt=f"Door {i}?",
                        answer_prefix="", references=["x"], metric="string_match_part",
                        max_new_tokens=6)
               for i in range(2)]
    both = E.complete_samples(model, tok, samples, temperature=1.0, seed=5)
    alone = E.complete_samples(model, tok, samples[1:], temperature=1.0, seed=5, first_index=1)
    assert both[1] == alone[0]
    assert E.complete_samples(model, tok, samples, temperature=1.0, seed=6) != both  # seed matters


def test_tasks_import_nothing_of_the_policy():
    code = ("import sys; import tasks.ruler, tasks.longbench, tasks.haystack; "
            "print(sorted(m for m in ('rollout', 'evaluate', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
