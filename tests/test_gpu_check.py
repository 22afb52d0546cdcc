"""bench/gpu_check.py on the CPU: the dry run is the GPU check's own code -- train.main with the
chosen preset's settings on random weights and the carried byte tokenizer, shortened, then a
resume -- and must write a complete record in which every part ran. The check's time on an H200
and an H100 is planned within its 5-minute budget.

Run: .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""

import json

import pytest
import torch

import train
from bench import gpu_check
from plumbing import common, policy


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dry_run_is_the_run_shortened_and_writes_json_and_table(tmp_path):
    gpu_check.main(["--dry-run", "--out", str(tmp_path / "check"),
                    "--work", str(tmp_path / "work")])
    record = json.loads((tmp_path / "check.json").read_text())
    assert [p["error"] for p in record["parts"]] == [None, None, None], record["parts"]
    argv = record["argv"]
    last = lambda flag: argv[len(argv) - argv[::-1].index(flag)]  # noqa: E731 -- the one that wins
    assert argv[:2] == ["--preset", "paper-8b"]  # the largest candidate whose plan fits
    assert last("--steps") == "1"
    assert last("--prompts-per-step") == last("--gen-groups")  # one generate call's groups
    seconds = record["measured"]["seconds"]
    assert all(seconds[k] is not None for k in ("sampling", "update", "evaluation",
                                                  "checkpoint"))
    assert set(record["plan_seconds"]) >= {"sampling", "update", "evaluation", "total"}
    assert record["environment"]["lock"] == common.lock_hash()
    assert not (tmp_path / "work").exists()  # weights and checkpoint removed after
    text = (tmp_path / "check.md").read_text()
    assert "| phase | seconds | plan s (estimate) | peak GB | plan GB |" in text


@pytest.mark.parametrize("gb, preset, optimizer", [(141.0, "paper-8b", "bf16-sr"),
                                                   (80.0, "paper", "bf16-sr")])
def test_the_check_fits_its_budget_by_the_plan(gb, preset, optimizer, tmp_path):
    argv, chosen, config = gpu_check.choose(gb, dry=False)
    assert argv[1] == preset and chosen.optimizer == optimizer
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(config.to_json_string())
    (tmp_path / "longbench.jsonl").write_text("")
    run_argv = gpu_check.shortened(argv, chosen, tmp_path, "cpu", 64e9, config)
    run_argv[run_argv.index("--device") + 1] = "cpu"
    args = train.parse_args(run_argv)
    planned = gpu_check.planned(args, config)
    assert planned["total"] <= gpu_check.BUDGET_S, planned
    assert ("--train-scope" in run_argv) == (preset == "paper-8b")  # 64 GB: no full checkpoint


def test_the_byte_tokenizer_round_trips_and_stays_in_qwens_vocabulary(tmp_path):
    gpu_check.byte_tokenizer(tmp_path)
    tok = policy.load_tokenizer(str(tmp_path))
    ids = tok.apply_chat_template([{"role": "user", "content": "héllo"}],
                                  add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert max(ids) < 151936 and tok.decode(tok("héllo")["input_ids"]) == "héllo"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id


def test_an_older_torch_is_refused_in_one_line():
    common.check_torch("2.13.0+cpu")
    with pytest.raises(SystemExit, match="torch 2.10.1 is older than 2.11"):
        common.check_torch("2.10.1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_the_full_check_says_to_use_the_dry_run():
    with pytest.raises(SystemExit, match="--dry-run"):
        gpu_check.main([])
