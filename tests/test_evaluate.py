"""Tests for evaluate.py: RULER metrics and generators, LongBench v2 loading/prompting/extraction, the shared scorer.

Run: .venv/bin/python -m pytest -q tests/test_evaluate.py
Uses the embedded SmolLM2 tokenizer (no network) and, for the end-to-end paths, a tiny random Llama from conftest.
"""

import json
import os

import pytest

import evaluate as E
from conftest import tiny_model

LENGTHS = (1024, 2048)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    from rollout import resolve_model_path
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


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
    # RULER turns \x07 into \n, so "12\x0734" no longer contains "1234" but still contains "12" and "34"
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
    """Tokens of one needle-haystack line: the indivisible unit of niah_multikey_2/3 (module docstring, choice 2)."""
    _, cfg = E.RULER_TASKS[task]
    rng = E.sample_rng("unit")
    line = E.NEEDLE.format(type_needle_v=cfg["type_needle_v"], key=E.random_value(rng, cfg["type_needle_k"]),
                           value=E.random_value(rng, cfg["type_needle_v"]))
    return len(tok("\n" + line, add_special_tokens=False)["input_ids"]) + 2


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(E.RULER_TASKS))
def test_generator_fits_length_and_contains_its_answers(tok, task, length):
    s = E.ruler_sample(tok, task, length, seed=0, index=0)
    total = len(E.prompt_ids(tok, s)) + s.max_new_tokens  # RULER's length: prompt (incl. chat template) + budget
    assert total == s.prompt_tokens + s.max_new_tokens
    slack = 0.02 * length
    if task in ("niah_multikey_2", "niah_multikey_3"):
        slack = max(slack, distractor_line_tokens(tok, task))
    assert length - slack <= total <= length, (task, total)
    assert s.references and s.max_new_tokens >= 24 and "{context}" not in s.prompt and "{query}" not in s.prompt
    if task == "qa_2":  # HotpotQA answers are often 'yes'/'no': check the supporting paragraphs instead
        assert all(doc in s.prompt for doc in s.meta["gold"])
    else:
        for ref in s.references:
            assert ref in s.prompt, (task, ref)


def test_official_wording_and_singular_rewrite(tok):
    s = E.ruler_sample(tok, "niah_single_2", 1024)
    assert s.prompt.startswith("A special magic number is hidden within the following text.")
    assert s.answer_prefix.startswith(" The special magic number for ") and s.answer_prefix.endswith(" is")
    m = E.ruler_sample(tok, "niah_multivalue", 1024)
    assert m.prompt.startswith("Some special magic numbers are hidden") and m.answer_prefix.endswith(" are")
    assert m.prompt.count("One of the special magic numbers for") == 4 and len(m.references) == 4
    vt = E.ruler_sample(tok, "vt", 1024)
    assert vt.prompt.count("Memorize and track the chain(s)") == 2  # the solved in-context example, then the task
    assert "assgined" in vt.answer_prefix  # RULER's own spelling
    assert E.ruler_sample(tok, "qa_1", 1024).answer_prefix == " Answer:"


def test_generators_are_deterministic_by_seed(tok):
    for task in ("niah_multikey_1", "vt", "cwe", "fwe", "qa_1"):
        a, b = E.ruler_sample(tok, task, 1024, seed=3, index=1), E.ruler_sample(tok, task, 1024, seed=3, index=1)
        assert a == b
        c = E.ruler_sample(tok, task, 1024, seed=4, index=1)
        assert c.prompt != a.prompt
    assert E.ruler_sample(tok, "niah_single_1", 1024, 0, 0) != E.ruler_sample(tok, "niah_single_1", 1024, 0, 1)


def test_training_seeds_use_disjoint_material(tok):
    qas, _ = E.qa_dataset("squad")
    eval_questions = {q["query"] for q in qas[:E.EVAL_QA_QUESTIONS]}
    train = [E.ruler_sample(tok, "qa_1", 1024, seed=E.TRAIN_SEED_START + i) for i in range(3)]
    assert all(s.meta["query"] not in eval_questions for s in train)
    ev = E.ruler_sample(tok, "niah_single_2", 1024, seed=0)
    tr = E.ruler_sample(tok, "niah_single_2", 1024, seed=E.TRAIN_SEED_START)
    assert "April 2012" in ev.prompt and "April 2012" not in tr.prompt  # eval starts at the first essay word


def test_bad_ruler_input_gives_clear_errors(tok):
    with pytest.raises(ValueError, match="unknown RULER task 'nope'"):
        E.ruler_sample(tok, "nope", 1024)
    with pytest.raises(ValueError, match="below its minimum"):
        E.ruler_sample(tok, "vt", 300)  # vt's in-context example alone needs ~500 tokens
    with pytest.raises(ValueError, match="exceeds the model's window"):
        E.check_ruler_args(["vt"], [9000], window=8192)
    with pytest.raises(ValueError, match="unknown RULER task"):
        E.main(["--bench", "ruler", "--tasks", "niah_single_1", "bogus"])  # fails before loading a model


# -----------------------------------------------------------------------------
# LongBench v2

def lb_row(i, **over):
    row = dict(_id=f"id{i}", domain="Single-Document QA", sub_domain="Invented", difficulty="easy",
               length="short", question=f"Which colour is door {i}?", choice_A="red", choice_B="green",
               choice_C="blue", choice_D="white", answer="B", context=f"Door {i} is green. " * 50)
    row.update(over)
    return row


@pytest.mark.parametrize("response, letter", [
    ("The correct answer is (B).", "B"),
    ("**The correct answer is (C)**", "C"),
    ("The correct answer is **D**", "D"),
    ("The correct answer is A because ...", "A"),
    ("<think>The correct answer is (A)? no...</think>\nThe correct answer is (B)", "B"),
    ("so it is B. </think> The correct answer is (C)", "C"),      # template opened <think> in the prompt
    ("<think>The correct answer is (A) I think, but", None),       # never finished thinking
    ("I believe the answer is B.", None),
    ("The correct answer is (E)", None),
    ("", None),
])
def test_extract_choice(response, letter):
    assert E.extract_choice(response) == letter


def test_load_jsonl_and_json(tmp_path):
    rows = [lb_row(1), lb_row(2, difficulty="hard", length="long", answer="D")]
    jl = tmp_path / "lb.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert E.load_longbench(jl) == rows
    js = tmp_path / "lb.json"
    js.write_text(json.dumps(rows + [dict(lb_row(3), extra="ignored")]))
    assert E.load_longbench(js)[2] == lb_row(3)


def test_load_errors_name_file_row_and_field(tmp_path):
    bad = lb_row(2)
    del bad["choice_C"]
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(lb_row(1)) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 2: missing field 'choice_C'"):
        E.load_longbench(f)
    f.write_text(json.dumps(lb_row(1, answer="E")) + "\n")
    with pytest.raises(ValueError, match=r"row 1: field 'answer' is 'E'"):
        E.load_longbench(f)
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match="row 1: invalid JSON"):
        E.load_longbench(f)


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="would download the real dataset")
def test_hub_loading_offline_says_what_to_do():
    with pytest.raises(RuntimeError, match="pass --data FILE"):
        E.load_longbench(None)


def test_middle_truncation_keeps_first_and_last_halves(tok):
    assert E.middle_truncate(list(range(10)), 4) == [0, 1, 8, 9]
    assert E.middle_truncate(list(range(10)), 5) == [0, 1, 7, 8, 9]  # pred.py: ids[:5//2] + ids[-5//2:]
    assert E.middle_truncate([1, 2], 5) == [1, 2]
    text = "BEGIN " + " ".join(f"w{i}" for i in range(2000)) + " END?"
    short, truncated = E.truncate_prompt(tok, text, 100)
    assert truncated and short.startswith("BEGIN w0 w1") and short.endswith("w1999 END?")
    assert abs(len(tok(short, add_special_tokens=False)["input_ids"]) - 100) <= 2
    assert E.truncate_prompt(tok, "short", 100) == ("short", False)


def test_longbench_prompt_and_window_truncation(tok):
    item = lb_row(1, context="Door 1 is green. " * 3000)  # ~18k tokens
    s = E.longbench_sample(item, 0, tok, max_len=120_000, window=8192)
    assert s.prompt.startswith("Please read the following text and answer the question below.\n\n<text>\nDoor 1")
    assert "(B) green\n(C) blue" in s.prompt and s.prompt.endswith('"The correct answer is (insert answer here)".')
    assert s.meta["truncated"] and s.meta["truncated_by"] == "window"
    assert len(E.prompt_ids(tok, s)) + s.max_new_tokens <= 8192
    s = E.longbench_sample(item, 0, tok, max_len=1000, window=8192)
    assert s.meta["truncated_by"] == "max_len"
    cot = E.longbench_sample(lb_row(1), 0, tok, window=8192, cot=True)
    assert cot.prompt.endswith("Let’s think step by step:") and cot.max_new_tokens == 1024
    assert not cot.meta["truncated"]
    assert E.score(s, "The correct answer is (B)") == 1.0 and E.score(s, "(B)") == 0.0


def test_longbench_table_counts():
    rec = lambda d, l, judge, pred="A", trunc=False: dict(difficulty=d, length=l, judge=judge, pred=pred,
                                                          truncated=trunc, truncated_by="window" if trunc else None)
    records = [rec("easy", "short", True), rec("hard", "medium", False, None), rec("hard", "long", True, trunc=True),
               rec("easy", "medium", True)]
    t = E.longbench_table(records)
    assert (t["overall"], t["easy"], t["hard"], t["short"], t["medium"], t["long"]) == (75.0, 100.0, 50.0, 100.0,
                                                                                           50.0, 100.0)
    assert (t["n"], t["unparsed"], t["truncated"], t["truncated_by_window"]) == (4, 1, 1, 1)


# -----------------------------------------------------------------------------
# end to end with a tiny random model (window 512) and the real tokenizer

def test_evaluate_ruler_and_longbench_end_to_end(tok, tmp_path, monkeypatch):
    model = tiny_model("llama", vocab=len(tok))
    # a random model never says EOS: shorten the generation budgets so the test takes seconds
    for family in ("niah", "qa"):
        monkeypatch.setitem(E.RULER_FAMILIES[family], "max_new_tokens", 4)
    monkeypatch.setattr(E, "LONGBENCH_NEW_TOKENS", 4)
    monkeypatch.setattr(E, "LONGBENCH_COT_TOKENS", 4)
    table, records = E.evaluate_ruler(model, tok, ["niah_single_1", "qa_1"], [512], samples=2, progress=False)
    assert set(table["scores"]) == {"niah_single_1", "qa_1"} and len(records) == 4
    assert all(0 <= table["scores"][t][512] <= 100 for t in table["scores"])
    assert table["average"][512] == round((table["scores"]["niah_single_1"][512] + table["scores"]["qa_1"][512]) / 2, 2)
    assert "average" in E.format_ruler_table(table)
    out = tmp_path / "r.json"
    E.write_json_atomic(out, dict(table=table, records=records))
    assert json.loads(out.read_text())["table"]["average"]["512"] == table["average"][512]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind

    items = [lb_row(1, context="Door 1 is green. " * 200), lb_row(2, difficulty="hard", length="long")]
    lb, recs = E.evaluate_longbench(model, tok, items, progress=False)
    assert lb["n"] == 2 and lb["truncated_by_window"] >= 1  # ~1k-token document, 512-token window
    assert lb["unparsed"] == sum(r["pred"] is None for r in recs)
    assert "unparsed" in E.format_longbench_table(lb)
    lb, recs = E.evaluate_longbench(model, tok, items[:1], cot=True, progress=False)  # reasoning call, then answer call
    assert lb["n"] == 1 and "response_cot" in recs[0] and "response" in recs[0]
