"""bench/gpu_check.py on the CPU: the dry run goes through the same code path as the GPU check
(tiny Qwen3 configs, 64-token prompts) and must write a complete, sane record.

Run: .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""

import json
import math

import pytest
import torch

from bench import gpu_check

PHASES = ["build policy + reference + masks"] + [
    p for _ in range(2) for p in ("reference log-probs", "update (forward + backward)",
                                  "optimizer step")] + ["sampling"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames checkpointing calls
def test_dry_run_updates_both_models_and_writes_json_and_table(tmp_path):
    gpu_check.main(["--dry-run", "--out", str(tmp_path / "check")])
    record = json.loads((tmp_path / "check.json").read_text())
    assert record["dry_run"] and [r["model"] for r in record["results"]] == ["qwen3-4b", "qwen3-8b"]
    for res in record["results"]:
        assert res["error"] is None
        assert [p["phase"] for p in res["phases"]] == PHASES
        assert set(res["plan_gb"]) == {"sampling", "update", "step"}
        assert res["sampled_tokens"] > 0
        for step in res["steps"]:
            assert math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"])
            assert step["frozen_drift"] == 0.0  # rows outside the mask: bit-identical
            assert step["frozen_rows_moved"] == 0.0
    # fp32 AdamW moves every trainable row of the probed matrix; the bf16 optimizer moves a row
    # only where stochastic rounding carries (lr 1e-6 is ~1% of an ulp at these weights).
    adamw, sr = record["results"]
    assert all(s["trainable_rows_moved"] == 1.0 for s in adamw["steps"])
    assert sr["steps"][-1]["trainable_rows_moved"] > 0.0
    table = (tmp_path / "check.md").read_text().splitlines()
    assert table[0].startswith("| model | optimizer | phase |")
    assert len(table) == 2 + 2 * len(PHASES)


def test_a_phase_out_of_memory_reads_oom_in_the_table():
    res = dict(model="qwen3-8b", optimizer="bf16-sr", plan_gb={"update": 107.7}, phases=[
        dict(phase="update (forward + backward)", step=1, peak_gb=139.2, reserved_gb=139.9,
             seconds=3.5, error="out of memory")])
    line = gpu_check.format_table([res]).splitlines()[-1]
    assert line == ("| qwen3-8b | bf16-sr | update (forward + backward) | 1 | OOM | 139.9 | "
                    "107.7 | 3.50 |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_the_full_check_says_to_use_the_dry_run():
    with pytest.raises(SystemExit, match="--dry-run"):
        gpu_check.main([])
