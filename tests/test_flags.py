"""Bad flags and bad data rows fail in about a second, before any model loads, with one line on
stderr that names the flag (or file, line and field), the value and what is allowed; exit code 2.
So do a hub name the hub cannot give (offline, or no answer) and a model LongAct cannot mask.
A good command still gets past the checks.

Each case runs the script's main() in this process with the model loader replaced by a function
that fails the test: a message that comes from a model load cannot pass.
Run: .venv/bin/python -m pytest -q tests/test_flags.py
"""

import json
import os
import time
from pathlib import Path

import pytest

import evaluate
import saliency
import train
from experiments import causal
from plumbing import flags, policy


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
    for script, argv, code_ in (("train.py", ["--help"], 0), ("train.py", ["--algo", "ppo"], 2),
                                ("train.py", ["--steps", "-3"], 2),
                                ("evaluate.py", ["--help"], 0),
                                ("evaluate.py", ["--samples", "0"], 2)):
        out = subprocess.run([sys.executable, "-c", code.replace("train.py", script), *argv],
                             cwd=root, capture_output=True, text=True).stdout
        assert out.strip().splitlines()[-1] == f"exit {code_} False", (script, argv, out)


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
# ------------------------------------------------------------ names that go to the hub

@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """Hub and datasets caches that hold nothing (the host's may hold anything)."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path


def silent_host(*args, **kwargs):
    time.sleep(1)  # past the probe's 0.1 s
    raise TimeoutError("timed out")


@pytest.fixture(params=["offline", "no answer"])
def hub_out_of_reach(request, monkeypatch, empty_caches):
    """The hub turned off (HF_HUB_OFFLINE=1), or on but silent: every connection hangs past the
    probe's time (no network used: the connection is replaced)."""
    for var in ("TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    if request.param == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(flags, "HUB_PROBE_SECONDS", 0.1)
        monkeypatch.setattr(flags.socket, "create_connection", silent_host)
    flags.answers.cache_clear()
    yield request.param
    flags.answers.cache_clear()


HUB = [  # (flags, what the message starts with)
    (["--train-data", "mydata"], "--train-data mydata: not a local path"),
    (["--model", "Qwen/Qwen3-0.6B"], "--model Qwen/Qwen3-0.6B: not a local path"),
    (["--longbench", "hub"], "--longbench hub: THUDM/LongBench-v2 is not a local path"),
]


@pytest.mark.parametrize("extra, message", HUB, ids=[" ".join(c[0]) for c in HUB])
def test_a_hub_name_out_of_reach_says_how_to_pass_a_local_copy(extra, message, hub_out_of_reach,
                                                               no_model, capsys, tmp_path):
    err = one_line_error(train.main, ["--out-dir", str(tmp_path / "runs")] + extra, capsys)
    assert message in err
    assert "local folder" in err or "local file" in err
    assert "--local-dir DIR" in err
    why = "offline: HF_HUB_OFFLINE=1" if hub_out_of_reach == "offline" else \
        "no answer from huggingface.co:443 within 0.1 s"
    assert why in err
    assert not (tmp_path / "runs").exists()


def test_the_other_scripts_say_so_too(hub_out_of_reach, no_model, capsys):
    err = one_line_error(evaluate.main, ["--model", "Qwen/Qwen3-0.6B"], capsys)
    assert "--model Qwen/Qwen3-0.6B: not a local path" in err
    err = one_line_error(evaluate.main, ["--bench", "longbench-v2"], capsys)
    assert "THUDM/LongBench-v2 is not a local path" in err and "--data DIR/data.json" in err
    err = one_line_error(saliency.main, ["--model", "Qwen/Qwen3-0.6B"], capsys)
    assert "--model Qwen/Qwen3-0.6B: not a local path" in err


def test_the_plan_needs_only_a_config_the_paper_models_have_offline(hub_out_of_reach, capsys):
    train.main(["--preset", "paper-8b", "--plan", "--train-data", "mydata"])  # no data needed
    assert "sampling" in capsys.readouterr().out
    err = one_line_error(train.main, ["--model", "Qwen/Qwen3-0.6B", "--plan"], capsys)
    assert "--model Qwen/Qwen3-0.6B: not a local path" in err  # its config is on the hub


def test_a_cached_hub_model_runs_offline_without_retries(hub_out_of_reach, empty_caches,
                                                         qa_file, monkeypatch, tmp_path):
    from transformers import Qwen3Config
    repo = empty_caches / "hub" / "models--Qwen--Qwen3-0.6B"
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=1024).save_pretrained(snapshot)
    for name in ("tokenizer_config.json", "model.safetensors"):
        (snapshot / name).write_text("{}")
    import huggingface_hub.constants  # go_offline sets it: restored after the test
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE",
                        huggingface_hub.constants.HF_HUB_OFFLINE)
    reached = []
    monkeypatch.setattr(train.runner, "setup", lambda args: reached.append(args) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.main(["--model", "Qwen/Qwen3-0.6B", "--train-data", qa_file, "--train-len", "128",
                    "--max-new-tokens", "6", "--no-eval", "--out-dir", str(tmp_path / "runs")])
    assert reached  # past every check, to the load
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE


def test_what_the_caches_hold(empty_caches, monkeypatch):
    from datasets.naming import camelcase_to_snakecase
    assert not flags.dataset_in_cache("THUDM/LongBench-v2")
    name = "THUDM___" + camelcase_to_snakecase("LongBench-v2")  # datasets' own folder name
    (empty_caches / "datasets" / name / "default" / "0.0.0" / "f00").mkdir(parents=True)
    assert flags.dataset_in_cache("THUDM/LongBench-v2")
    assert not flags.model_in_cache("Qwen/Qwen3-0.6B")


def test_the_probe_reads_the_endpoint_and_a_proxy(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    assert flags.hub_address() == ("huggingface.co", 443)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.lan:8080")
    assert flags.hub_address() == ("mirror.lan", 8080)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.lan:3128")
    assert flags.hub_address() == ("proxy.lan", 3128)


# ------------------------------------------------------------ models LongAct cannot mask

@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A 2-layer GPT-2 (fused c_attn, no q_proj / k_proj) with the embedded model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config
    tok = AutoTokenizer.from_pretrained(policy.resolve_model_path("smollm2-135m"))
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=1024,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("gpt2")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("extra", [[], ["--force"], ["--plan"], ["--show-config"]])
def test_a_model_without_q_proj_and_k_proj_fails_before_the_plan(extra, gpt2_dir, no_model,
                                                                 monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(train.runner.preflight, "resolve_from_plan",
                        lambda args: pytest.fail("the plan was reached"))
    err = one_line_error(train.main, ["--model", gpt2_dir, "--out-dir", str(tmp_path)] + extra,
                         capsys)
    assert "model type gpt2 (GPT2LMHeadModel) has no q_proj or k_proj linear module" in err
    assert "Llama, Qwen2/Qwen3, Mistral, SmolLM2" in err


def test_a_q_k_model_without_the_plans_fields_says_which(no_model, capsys, tmp_path):
    from transformers import OPTConfig  # q_proj / k_proj, but ffn_dim and no grouped KV heads
    OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
              vocab_size=128, max_position_embeddings=1024).save_pretrained(tmp_path / "opt")
    err = one_line_error(train.main, ["--model", str(tmp_path / "opt"), "--plan"], capsys)
    assert "model type opt has q_proj and k_proj, but its config lacks intermediate_size, " \
           "num_key_value_heads, which the memory plan reads" in err
    (tmp_path / "empty").mkdir()
    err = one_line_error(train.main, ["--model", str(tmp_path / "empty"), "--plan"], capsys)
    assert f"--model {tmp_path / 'empty'}: its config cannot be read" in err


def test_the_early_checks_name_the_same_hub_dataset_and_tasks():
    from plumbing import common, config
    from tasks import longbench, ruler
    assert config.LONGBENCH_HUB_ID == longbench.LONGBENCH_HUB_ID == evaluate.LONGBENCH_HUB_ID
    assert evaluate.RULER_TASKS == list(ruler.RULER_TASKS)
    assert evaluate.LONGBENCH_MAX_LEN == longbench.LONGBENCH_MAX_LEN
    assert evaluate.LONGBENCH_THINKING_TOKENS == longbench.LONGBENCH_THINKING_TOKENS
    precision = next(a for a in evaluate.build_parser()._actions if a.dest == "precision")
    assert list(precision.choices) == list(common.PRECISIONS)
