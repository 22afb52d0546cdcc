"""bench/gpu_check.py on the CPU: the dry run goes through the same code as the GPU check --
train.py itself (2 steps, RULER, checkpoint, resume), train.policy_update on the preset's arguments,
sampling at the plan's groups per call, a greedy evaluation batch -- and must write a complete
record in which every part ran without error.

Run: .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""

import json
import math

import pytest
import torch

from bench import gpu_check

MODEL_PARTS = ["build policy + reference + optimizer",
               "(b) train.policy_update, one group, step 1",
               "(b) train.policy_update, one group, step 2", "(c) sampling", "(d) greedy"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dry_run_runs_every_part_and_writes_json_and_table(tmp_path):
    gpu_check.main(["--dry-run", "--out", str(tmp_path / "check")])
    record = json.loads((tmp_path / "check.json").read_text())
    train_part, *models = record["results"]
    assert [p["error"] for p in train_part["parts"]] == [None, None]
    assert [len(train_part["parts"][0]["metrics"]), train_part["parts"][1]["steps_logged"]] \
        == [2, 3]
    assert [m["model"] for m in models] == ["qwen3-4b", "qwen3-8b"]
    for res in models:
        names = [p["part"] for p in res["parts"]]
        assert len(names) == len(MODEL_PARTS)
        assert all(n.startswith(m) for n, m in zip(names, MODEL_PARTS)), names
        assert all(p["error"] is None for p in res["parts"]), res["parts"]
        assert all(p["plan_s"] > 0 and p["plan_gb"] > 0 for p in res["parts"][1:])
        for p in res["parts"][1:3]:
            assert math.isfinite(p["update"]["loss"])
            assert p["update"]["drift_outside_mask"] == 0.0  # rows outside the mask: frozen
        assert res["parts"][3]["sampled_tokens"] > 0 and res["parts"][4]["answer_tokens"] > 0
        assert set(res["plan_reasons"]) == {"gen_groups", "eval_batch"}
    table = (tmp_path / "check.md").read_text().splitlines()
    assert table[2].startswith("| model | part | seconds | plan s (estimate) |")
    assert len(table) == 4 + 2 + 2 * len(MODEL_PARTS)


def test_a_failing_part_is_recorded_with_its_traceback_and_the_next_runs():
    records, device = [], torch.device("cpu")
    with gpu_check.part(records, "breaks", device):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with gpu_check.part(records, "runs", device):
        pass
    assert records[0]["error"] == "out of memory" and "OutOfMemoryError" in records[0]["traceback"]
    assert records[1]["error"] is None
    line = gpu_check.format_table([dict(model="m", parts=records)]).splitlines()[2]
    assert line.startswith("| m | breaks |") and line.endswith("| out of memory |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_the_full_check_says_to_use_the_dry_run():
    with pytest.raises(SystemExit, match="--dry-run"):
        gpu_check.main([])
