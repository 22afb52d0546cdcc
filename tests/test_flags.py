"""Bad flags and bad data rows fail in about a second, before any model loads, with one line on
stderr that names the flag (or file, line and field), the value and what is allowed; exit code 2.
A good command still gets past the checks.

Each case runs the script's main() in this process with the model loader replaced by a function
that fails the test: a message that comes from a model load cannot pass.
Run: .venv/bin/python -m pytest -q tests/test_flags.py
"""

import json
from pathlib import Path

import pytest

import evaluate
import saliency
import train
from experiments import causal
from plumbing import policy


@pytest.fixture
def no_model(monkeypatch):
    def load(*a, **k):
        raise AssertionError("a model was loaded")
    for module in (policy, evaluate, saliency, causal):
        monkeypatch.setattr(module, "load_policy", load)


def one_line_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:  # before any model: the no_model fixture checks that
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1, err  # one line: no usage block, no traceback
    return err


TRAIN = [  # (flags, what the message says)
    (["--ratio", "1.5"], "--ratio 1.5: must be in (0, 1]"),
    (["--ratio", "0"], "--ratio 0.0: must be in (0, 1]"),
    (["--train-data", "missing.jsonl"], "--train-data missing.jsonl: no such file"),
    (["--group-size", "1"], "--group-size 1: must be >= 2"),
    (["--prompts-per-step", "0"], "--prompts-per-step 0: must be >= 1"),
    (["--steps", "-3"], "--steps -3: must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--eval-samples", "0"], "--eval-samples 0: must be >= 1"),
    (["--val-samples", "10", "--val-seed", "0"], "--val-seed 0: must be > 0"),
    (["--val-samples", "-1"], "--val-samples -1: must be >= 0"),
    (["--eval-lengths", "1024", "-5"], "--eval-lengths -5: must be >= 1"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--clip-eps", "1"], "--clip-eps 1.0: must be in (0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be >= 0"),
    (["--overlong-buffer", "1"], "--overlong-buffer 1.0: must be in [0, 1)"),
    (["--eval-batch", "0"], "--eval-batch 0: must be >= 1, or -1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints 0: must be >= 1"),
    (["--algo", "dapo", "--mini-batch-groups", "8"],
     "--mini-batch-groups 8: more than the step's --prompts-per-step 4 groups"),
    (["--longbench", "nope.json"], "--longbench nope.json: no such file"),
    (["--stats", "missing.safetensors"], "--stats missing.safetensors: no such statistics file"),
    (["--model", "./no/such/model"], "--model ./no/such/model: no such model folder"),
    (["--eval-tasks", "niah_nope"], "--eval-tasks niah_nope: not a known name"),
    (["--train-task", "qa_nope"], "--train-task qa_nope: not a known name"),
    (["--field-map", "ctx"], "--field-map ctx: bad entry 'ctx'"),
    (["--algo", "ppo"], "argument --algo: invalid choice: 'ppo'"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
]


@pytest.mark.parametrize("extra, message", TRAIN, ids=[" ".join(c[0]) for c in TRAIN])
def test_a_bad_train_flag_says_what_to_change(extra, message, no_model, capsys, tmp_path):
    err = one_line_error(train.main, ["--out-dir", str(tmp_path), "--no-eval"] + extra, capsys)
    assert message in err
    assert not any(tmp_path.iterdir())  # no run folder either


def test_resume_without_a_run_and_lengths_past_the_window(tiny_dir, no_model, capsys, tmp_path):
    err = one_line_error(train.main, ["--resume", str(tmp_path)], capsys)
    assert "not a run folder" in err
    base = ["--model", tiny_dir, "--out-dir", str(tmp_path)]  # max_position_embeddings 1024
    err = one_line_error(train.main, base + ["--train-len", "128", "--eval-lengths", "4096"],
                         capsys)
    assert "--eval-lengths 4096: a RULER length (answer included) exceeds the model's window " \
           "of 1024 tokens" in err
    err = one_line_error(train.main, base + ["--train-len", "2048", "--no-eval"], capsys)
    assert "--train-len 2048: a RULER length exceeds the model's window of 1024" in err


def test_a_ruler_length_below_the_task_minimum_fails_before_the_model(no_model, capsys,
                                                                     tmp_path):
    err = one_line_error(train.main, ["--eval-tasks", "niah_single_1", "--eval-lengths", "256",
                                      "--out-dir", str(tmp_path)], capsys)
    assert "--eval-lengths 256: RULER task niah_single_1: length 256 is below its minimum" in err


ROWS = [  # (file text, what the message says)
    ('{"context": "c", "question": "q", "answer": "a"}\n{"context": "c", "question"\n',
     "line 2: invalid JSON"),
    ('{"context": "c", "question": "q", "answer": "a"}\n\n{"context": "c", "answer": "a"}\n',
     "line 3: missing field 'question' (the question; see --field-map)"),
    ('{"context": 7, "question": "q", "answer": "a"}\n', "line 1: field 'context': expected a "
     "string, got 7"),
    ('{"context": "c", "question": "q", "answer": ["a", 3]}\n', "line 1: field 'answer': "
     "expected a string or a list of strings"),
    ('{"context": "c", "question": "q", "answer": "A", "choices": ["x", "y"]}\n',
     "line 1: field 'choices': expected a list of 4 strings"),
    ('{"context": "c", "question": "q", "answer": "E", "choices": ["w", "x", "y", "z"]}\n',
     "line 1: field 'answer': expected a letter A-D"),
    ('["a list", "not an object"]\n', "line 1: expected a JSON object, got list"),
    ("\n\n", "no rows"),
]


@pytest.mark.parametrize("text, message", ROWS, ids=[m for _, m in ROWS])
def test_a_bad_training_row_names_file_line_and_field(text, message, no_model, capsys,
                                                      tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(text)
    err = one_line_error(train.main, ["--train-data", str(data), "--no-eval",
                                      "--out-dir", str(tmp_path / "runs")], capsys)
    assert f"{data}: {message}" in err


OTHERS = [
    (evaluate.main, ["--samples", "0"], "--samples 0: must be >= 1"),
    (evaluate.main, ["--lengths", "0"], "--lengths 0: must be >= 1"),
    (evaluate.main, ["--tasks", "nope"], "--tasks nope: not a known name"),
    (evaluate.main, ["--batch", "0"], "--batch 0: must be >= 1"),
    (evaluate.main, ["--bench", "longbench-v2", "--data", "lb.json"], "--data lb.json: no such"),
    (evaluate.main, ["--bench", "longbench-v2", "--limit", "0"], "--limit 0: must be >= 1"),
    (saliency.main, ["--seq-len", "1"], "--seq-len 1: must be >= 2"),
    (saliency.main, ["--num-samples", "0"], "--num-samples 0: must be >= 1"),
    (saliency.main, ["--ratio", "2"], "--ratio 2.0: must be in (0, 1]"),
    (saliency.main, ["--out", "/no/such/dir/s.safetensors"], "--out /no/such/dir/s.safetensors"),
    (causal.main, ["--ns", "4", "0"], "--ns 0: must be >= 1"),
    (causal.main, ["--samples", "0"], "--samples 0: must be >= 1"),
    (causal.main, ["--tasks", "nope"], "--tasks nope: not a known name"),
    (causal.main, ["--calib-len", "1"], "--calib-len 1: must be >= 2"),
    (causal.main, ["--summary", "--out", "none.jsonl"], "--out none.jsonl: no such results"),
]


@pytest.mark.parametrize("main, argv, message", OTHERS,
                         ids=[f"{m.__module__} {' '.join(a)}" for m, a, _ in OTHERS])
def test_a_bad_flag_of_the_other_scripts_says_what_to_change(main, argv, message, no_model,
                                                             capsys):
    assert message in one_line_error(main, argv, capsys)


def test_a_good_command_gets_past_the_checks(tiny_dir, qa_file, monkeypatch, tmp_path):
    reached = []
    monkeypatch.setattr(train.runner, "setup", lambda args: reached.append(args) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.main(["--model", tiny_dir, "--train-data", qa_file, "--train-len", "128",
                    "--max-new-tokens", "6", "--eval-lengths", "512", "--out-dir", str(tmp_path)])
    assert reached and reached[0].train_data == qa_file


def test_help_groups_the_flags_as_the_config_block_does(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    titles = [f"{t}:" for t in train.FLAGS]
    assert all(t in out for t in titles)
    assert [out.index(t) for t in titles] == sorted(out.index(t) for t in titles)  # table order
    assert "--eval, --no-eval" in out  # a switch whose default is on can be turned off
    for group in train.FLAGS.values():  # every entry is one flag of the parser
        for name in group:
            assert f"--{name.replace('_', '-')}" in out


def test_a_runs_saved_config_gives_the_same_settings_back(tmp_path, qa_file, tiny_dir):
    argv = ["--model", tiny_dir, "--train-data", qa_file, "--train-len", "128", "--algo", "dapo",
            "--max-new-tokens", "6", "--lr", "3e-4", "--no-eval", "--seed", "7", "--run-name", "a"]
    saved = vars(train.parse_args(argv)) | {"precision_used": "fp32", "resumes": []}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    again = vars(train.parse_args(["--config", str(tmp_path / "config.json")]))
    differ = {k for k in saved if k in again and saved[k] != again[k]}
    assert differ == {"run_name", "config"}  # its own name; everything else comes back
    assert train.parse_args(["--config", str(tmp_path / "config.json"), "--seed", "8"]).seed == 8
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(tmp_path / "bad.json")])


def test_the_config_tables_plain_values_match_the_modules():
    # the table holds plain values so that --help needs no torch; they must stay the modules'
    import grpo
    import masking
    import rollout
    from plumbing import common, plan, policy, report
    f = {k: v for group in train.FLAGS.values() for k, v in group.items()}
    assert f["gpu"][2] == sorted(plan.GPUS) and f["model"][0] == policy.DEFAULT_MODEL
    assert f["yarn_original"][0] == policy.QWEN3_YARN_ORIGINAL and f["kl_stop"][0] == report.KL_STOP
    assert list(f["stat"][2]) == list(saliency.STATS) and f["stat"][0] == saliency.STATS[0]
    for name, values in (("precision", common.PRECISIONS), ("report_to", report.REPORTERS),
                         ("mask_strategy", masking.STRATEGIES), ("train_scope", masking.SCOPES),
                         ("mask_semantics", masking.SEMANTICS), ("engine", rollout.ENGINES),
                         ("aggregation", grpo.AGGREGATIONS), ("adv_scale", grpo.SCALES)):
        assert list(f[name][2]) == list(values), name


def test_help_and_a_bad_choice_are_answered_before_torch_loads(tmp_path):
    import subprocess
    import sys
    code = ("import runpy, sys\nsys.argv = ['train.py'] + sys.argv[1:]\ntry:\n"
            "    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules)\n")
    root = str(Path(train.__file__).parent)
    for argv, code_ in ((["--help"], 0), (["--algo", "ppo"], 2)):
        out = subprocess.run([sys.executable, "-c", code, *argv], cwd=root, capture_output=True,
                             text=True).stdout
        assert out.strip().splitlines()[-1] == f"exit {code_} False", out


def test_help_explains_the_step_line_and_names_the_tasks(capsys):
    from tasks import ruler
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for word in ("eq-groups =", "J-prev / J-0 =", "trunc =", "gnorm =", "qk ="):
        assert word in out, word
    assert ", ".join(ruler.RULER_TASKS) + "." in out
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: ruler)" in out and ", ".join(ruler.RULER_TASKS) in out


def test_dapos_mini_batch_error_says_dapo_set_it(no_model, capsys, tmp_path):
    err = one_line_error(train.main, ["--algo", "dapo", "--prompts-per-step", "1",
                                      "--out-dir", str(tmp_path)], capsys)
    assert "--mini-batch-groups 2 (set by --algo dapo" in err


def test_converted_models_live_in_the_repositorys_cache_without_make(monkeypatch):
    monkeypatch.delenv("LONGACT_CACHE", raising=False)
    assert policy.cache_dir() == Path(train.__file__).resolve().parent / ".cache" / "longact"
