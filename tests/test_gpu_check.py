"""bench/gpu_check.py on the CPU: the dry run is the GPU check's own code -- train.main with the
chosen preset's settings on random weights and the carried byte tokenizer, shortened, then a
resume -- and must write a complete record in which every part ran. A failed part fails the
command, and the record is on disk after every part. On the cards' own sizes (as torch reports
them: 85.5 GB for an H100 80GB HBM3, 150.8 GB for an H200) the check's plan fits its budget and
train.main's preflight passes: memory after the check releases its own, a 64 GiB disk less the
weights.

Run: .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""

import json

import pytest
import torch

import train
from bench import gpu_check
from plumbing import common, plan, policy, preflight, startup

CARDS = gpu_check.CARDS
DISK = gpu_check.NODE_DISK


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dry_run_is_the_run_shortened_and_writes_its_record(tmp_path, monkeypatch):
    calls = []
    real_release, real_main = gpu_check.release, train.main
    monkeypatch.setattr(gpu_check, "release", lambda d: (calls.append("release"),
                                                         real_release(d)))
    monkeypatch.setattr(gpu_check.train, "main", lambda a: (calls.append("main"),
                                                            real_main(a))[1])
    gpu_check.main(["--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")])
    assert calls == ["release", "main", "release", "main"]  # released before each preflight
    record = json.loads((tmp_path / "out" / "check.json").read_text())
    assert [p["error"] for p in record["parts"]] == [None, None, None], record["parts"]
    argv = record["argv"]
    last = lambda flag: argv[len(argv) - argv[::-1].index(flag)]  # noqa: E731 -- the one that wins
    assert argv[:2] == ["--preset", "paper-8b"]  # the largest candidate whose plan fits
    assert last("--steps") == "1"
    assert last("--prompts-per-step") == last("--gen-groups")  # one generate call's groups
    seconds = record["measured"]["seconds"]
    assert all(seconds[k] is not None for k in ("sampling", "update", "evaluation",
                                                  "checkpoint"))
    assert set(record["plan_seconds"]) >= {"start-up", "prompts", "sampling", "update",
                                           "evaluation", "total"}
    assert record["environment"]["lock"] == common.lock_hash()
    assert "allocator" in record["environment"]
    assert not (tmp_path / "w").exists()  # weights and checkpoint removed after
    text = (tmp_path / "out" / "check.md").read_text()
    assert "| phase | seconds | plan s (estimate) | peak GB | plan GB |" in text
    assert "resume from its checkpoint (train.main --resume):" in text
    assert (tmp_path / "out" / "check.log").read_text().count(": ok (") == 3


def test_a_failed_part_fails_the_command_and_the_record_is_written_after_each_part(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def crash(argv):  # the record already holds the part before, as if the node killed us here
        before = json.loads((out / "check.json").read_text())
        assert [p["part"] for p in before["parts"]][0].startswith("prepare")
        raise RuntimeError("CUDA error: an illegal memory access")
    monkeypatch.setattr(gpu_check.train, "main", crash)
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "w")])
    assert e.value.code != 0
    assert str(e.value) == ("gpu_check FAILED: the run, shortened (train.main): RuntimeError: "
                            "CUDA error: an illegal memory access")
    record = json.loads((out / "check.json").read_text())
    assert record["parts"][1]["error"].startswith("RuntimeError") and len(record["parts"]) == 2
    assert "illegal memory access" in (out / "check.log").read_text()
    assert "FAILED after" in (out / "check.md").read_text()


def test_release_empties_the_cuda_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    gpu_check.release("cpu")
    assert emptied == []
    gpu_check.release("cuda")
    assert emptied == [1]


def test_free_memory_counts_what_the_process_holds_cached_but_unused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (30e9, 85.5e9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 50e9)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 4e9)
    assert preflight.cuda_free_bytes(torch.device("cuda")) == 30e9 + 46e9


def shortened_for(card: str, tmp_path):
    """gpu_check's shortened run for `card` on a 64 GiB disk, its model folder holding the
    config and the byte tokenizer (no weights: the preflight reads neither)."""
    argv, chosen, config = gpu_check.choose(CARDS[card], dry=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(config.to_json_string())
    gpu_check.byte_tokenizer(model)
    (tmp_path / "longbench.jsonl").write_text("")
    run_argv = gpu_check.shortened(argv, chosen, tmp_path, "cpu", DISK, config)
    return run_argv, chosen, config


@pytest.mark.parametrize("card, preset, optimizer", [("H200", "paper-8b", "bf16-sr"),
                                                     ("H100 80GB HBM3", "paper", "bf16-sr")])
def test_the_check_fits_its_budget_on_each_card(card, preset, optimizer, tmp_path):
    run_argv, chosen, config = shortened_for(card, tmp_path)
    assert run_argv[1] == preset and chosen.optimizer == optimizer
    args = train.parse_args(run_argv)
    i = run_argv.index("--prompts-per-step")
    cut = gpu_check.cut(chosen, int(run_argv[i + 1]), args.train_scope)
    assert gpu_check.planned(args, config) == gpu_check.planned(cut, config)  # one arithmetic
    planned = gpu_check.planned(args, config)
    assert planned["start-up"] > 0 and planned["prompts"] > 0
    assert planned["total"] <= gpu_check.BUDGET_S, planned
    assert args.train_scope == ("qk" if preset == "paper-8b" else "all")  # 8B: no full ckpt


@pytest.mark.parametrize("card", CARDS)
def test_train_mains_preflight_passes_on_each_card(card, tmp_path):
    line = gpu_check.simulate_preflight(card, tmp_path)  # SystemExit(2) on a problem
    assert line.startswith(f"preflight on {card} ({CARDS[card]} GB) passes")


def test_without_the_release_counted_the_h100_preflight_would_stop(tmp_path, monkeypatch):
    # the driver's free figure alone: 40 GB of the check's own cache counted as used
    monkeypatch.setattr(preflight, "cuda_free_bytes", lambda d: torch.cuda.mem_get_info(d)[0])
    with pytest.raises(SystemExit) as e:
        gpu_check.simulate_preflight("H100 80GB HBM3", tmp_path)
    assert e.value.code == 2


def test_with_train_scope_qk_a_checkpoint_holds_the_qk_rows_state_only():
    config = policy.model_config("qwen3-8b")
    s = plan.Settings(optimizer="bf16-sr", saves=1)
    n = plan.param_counts(config)
    disk = {r["item"]: r["bytes"] for r in plan.disk_rows(config, s)}
    assert disk["one checkpoint"] == n["total"] * 6 and disk["peak"] == n["total"] * 6
    qk = {r["item"]: r["bytes"] for r in plan.disk_rows(config, plan.Settings(
        optimizer="bf16-sr", saves=5, keep_checkpoints=1, train_scope="qk"))}
    assert qk["one checkpoint"] == n["total"] * 2 + n["qk"] * 4
    assert qk["peak"] == 2 * qk["one checkpoint"]  # one kept + the one being written
    assert qk["peak"] / plan.GB < 0.45 * 2 * disk["one checkpoint"] / plan.GB


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


def test_the_entry_points_set_the_allocator_before_torch_loads(tmp_path):
    import subprocess
    import sys
    code = ("import os, sys; import train; from plumbing import startup; "
            "print(startup.SET['before_torch'], os.environ['PYTORCH_ALLOC_CONF'])")
    env = {k: v for k, v in __import__("os").environ.items() if k not in startup.ALLOC_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=str(gpu_check.Path(train.__file__).parent), check=True)
    assert out.stdout.split() == ["True", "expandable_segments:True"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_the_full_check_says_to_use_the_dry_run():
    with pytest.raises(SystemExit, match="--dry-run"):
        gpu_check.main([])


def test_the_node_script_fits_one_device_command_and_parses():
    import subprocess
    script = gpu_check.Path(train.__file__).parent / "bench" / "gpu_node.sh"
    assert len(script.read_text()) <= 2000
    subprocess.run(["bash", "-n", str(script)], check=True)
