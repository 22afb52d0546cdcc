"""The environment a result comes from: only shipped code runs (no hub kernels, no remote code),
and every run, checkpoint and evaluation records its versions and the lock's hash.

transformers 5.25 made `use_kernels=True` the default of `from_pretrained`: a loaded model then
swaps layers for kernels fetched from the hub, and `model.train()` kernelizes it again for its
device. Here kernelization raises, whichever transformers is installed, so a loader that lets it
happen fails the test (SOURCES.md §9.44).

Run: .venv/bin/python -m pytest -q tests/test_install.py
"""

import importlib
import importlib.metadata
import json
import shutil

import pytest
import torch
import transformers

import train
from experiments import runfiles
from plumbing import common, policy


def refuse(*a, **kw):
    raise AssertionError("a model was kernelized with code from the hub")


@pytest.fixture
def no_kernelize(monkeypatch):
    """Every entry to kernelization raises (the kernels package may or may not be installed)."""
    for module in ("transformers.modeling_utils", "transformers.integrations.hub_kernels",
                   "kernels"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        monkeypatch.setattr(mod, "kernelize", refuse, raising=False)


def test_a_loaded_policy_never_kernelizes(tiny_dir, no_kernelize):
    model, tok = policy.load_policy(tiny_dir)
    assert not getattr(model, "use_kernels", False)
    model.train()  # transformers >= 5.25 re-kernelizes here for the device, if kernels are on
    model.eval()
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, model.config.vocab_size)  # (B, T, V)


def test_the_hub_kernels_flag_reaches_transformers(tiny_dir, no_kernelize):
    # the patch above is live: asking for kernels does reach kernelization (or is refused by a
    # transformers without the kernels package), so the test before it can fail
    with pytest.raises((AssertionError, ValueError, ImportError)):
        policy.load_policy(tiny_dir, hub_kernels=True)


def test_train_loads_policy_and_reference_without_kernels(tiny_dir, qa_file, tmp_path,
                                                          no_kernelize):
    run = train.main(["--model", tiny_dir, "--train-data", qa_file, "--train-len", "128",
                      "--calib-len", "32", "--calib-samples", "2", "--prompts-per-step", "2",
                      "--group-size", "2", "--max-new-tokens", "4", "--steps", "1",
                      "--beta", "0.04", "--precision", "fp32", "--no-eval",
                      "--out-dir", str(tmp_path), "--run-name", "k"])
    saved = json.loads((run / "config.json").read_text())
    assert saved["hub_kernels"] is False


def test_remote_code_in_a_model_folder_never_runs(tiny_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_dir, folder)
    marker = tmp_path / "remote_code_ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    try:
        model, _ = policy.load_policy(str(folder))
        assert type(model) is transformers.LlamaForCausalLM  # the shipped class, not the folder's
    except ValueError:  # a transformers that refuses instead of falling back is fine too
        pass
    assert not marker.exists()


def test_versions_name_the_packages_and_the_lock():
    v = common.versions()
    for key in ("python", "torch", "transformers", "datasets", "lock", "differs_from_lock"):
        assert key in v
    assert v["lock"] == common.lock_hash() != "no lock file"
    assert common.versions_changed(v, v) == ""
    moved = dict(v, transformers="0.0")
    assert common.versions_changed(moved, v) == f"transformers 0.0 -> {v['transformers']}"
    assert common.versions_changed(None, v) == "versions not recorded when the run started"


def test_a_run_records_versions_and_a_resume_under_others_warns(tiny_dir, qa_file, tmp_path,
                                                                monkeypatch, capsys):
    args = ["--model", tiny_dir, "--train-data", qa_file, "--train-len", "128", "--calib-len",
            "32", "--calib-samples", "2", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "4", "--beta", "0", "--precision", "fp32", "--no-eval",
            "--out-dir", str(tmp_path), "--run-name", "v", "--save-final"]
    run = train.main(args + ["--steps", "1"])
    saved = json.loads((run / "config.json").read_text())
    assert saved["versions"]["lock"] == common.lock_hash()
    assert saved["versions"]["torch"] == common.versions()["torch"]
    capsys.readouterr()
    real = common.versions()
    monkeypatch.setattr(common, "versions", lambda: dict(real, transformers="9.9.9"))
    train.main(args + ["--steps", "2", "--allow-change", "steps", "--resume", str(run)])
    warned = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and f"transformers {real['transformers']} -> 9.9.9" in warned[0]
    resumed = json.loads((run / "config.json").read_text())
    assert resumed["versions"] == saved["versions"]  # where the run started
    assert resumed["resumed_with"]["versions"]["transformers"] == "9.9.9"


def test_the_grid_summary_prints_versions_or_not_recorded(tmp_path):
    for name, versions in (("old", None), ("new", common.versions())):
        run = tmp_path / name
        run.mkdir()
        cfg = {"code_version": "abc", "cpu": "cpu"} | ({"versions": versions} if versions else {})
        (run / "config.json").write_text(json.dumps(cfg))
        (run / "eval.json").write_text(json.dumps({"after": {}}))
    table = runfiles.provenance(tmp_path)
    assert "| abc | cpu | not recorded | 1 |" in table
    assert f"transformers {transformers.__version__}" in table


def test_a_grids_copied_run_files_do_not_mark_the_code_dirty():
    assert common.code_changes("?? experiments/runs/ab3/grpo-uniform-seed4/eval.json\n") == []
    assert common.code_changes("?? figures/ab3/rates.png\n") == []  # a summary's new figure
    assert common.code_changes(" M train.py\n") == [" M train.py"]  # a tracked change
    assert common.code_changes("?? helper.py\n") == ["?? helper.py"]  # new code
    assert common.code_changes(" M figures/ab3/ab_table.md\n") != []  # tracked, even there
    assert common.code_changes(" M experiments/runs/ab3/before.json\n") != []
    assert common.code_changes("") == []


def test_the_embedded_model_cache_is_keyed_by_the_converting_versions():
    folder = policy.embedded_dir("smollm2-135m")
    assert folder.parent == policy.cache_dir() / "smollm2-135m"
    assert f"transformers-{transformers.__version__}" in folder.name
    assert "gguf-" in folder.name and "torch-" in folder.name


def test_every_model_load_goes_through_the_one_loader():
    # a from_pretrained of a model anywhere else would take transformers' default (kernels on)
    root = policy.Path(policy.__file__).parents[1]
    files = [p for p in root.rglob("*.py") if ".venv" not in p.parts and ".cache" not in p.parts]
    direct = [f"{p.relative_to(root)}:{n}" for p in files
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if "ForCausalLM." + "from_pretrained(" in line and p.name != "policy.py"]
    assert files and not direct, f"models loaded around policy.load_weights: {direct}"


def test_a_run_records_a_torch_other_than_the_locks(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "2.11.0+cu130" if name == "torch" else real(name))
    assert "torch 2.11.0+cu130 (lock 2.13.0)" in common.versions()["differs_from_lock"]
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "2.13.0+cu130" if name == "torch" else real(name))
    assert common.versions()["differs_from_lock"] == []  # a CUDA build of the same release
