"""
experiments/repeat.py -- does a run repeat? Two run folders of the same configuration (the same
flags and seed, made on two machines or from two commits) compared field by field.

    python -m experiments.repeat RUN_A RUN_B

A seeded fp32 run on the CPU is deterministic for one kind of kernel: the sampler draws from
torch's generator, which every CPU advances the same way, so two runs agree exactly unless some
floating-point sum rounds differently; once that changes a sampled token, they part for good.
So the test is exact equality, not a tolerance: every per-step metric of metrics.jsonl except
the clocks, eval.json, every per-item record under items/ and qk_change.json. Why it matters:
a grid whose runs were made on two CPU kinds is one grid only if its runs repeat across them
(RESULTS.md, setting 2b, shows one such check).
Test: .venv/bin/python -m pytest -q tests/test_repeat.py
"""

import argparse
from pathlib import Path

from plumbing import common

CLOCKS = ("elapsed",)  # per-step fields that measure time, not the run; so is every "t_*"
FILES = ("eval.json", "qk_change.json")  # compared whole, when both runs have them


def is_clock(key: str) -> bool:
    return key.startswith("t_") or key in CLOCKS


def step_differences(rows_a: list, rows_b: list) -> list:
    """["step S field: A vs B", ...] for every non-clock metric that differs, and a line for a
    step that only one run has."""
    out = []
    for a, b in zip(rows_a, rows_b):
        for key in sorted(set(a) | set(b)):
            if not is_clock(key) and a.get(key) != b.get(key):
                out.append(f"step {a.get('step')} {key}: {a.get(key)!r} vs {b.get(key)!r}")
    if len(rows_a) != len(rows_b):
        out.append(f"steps: {len(rows_a)} vs {len(rows_b)}")
    return out


def compare(run_a: Path, run_b: Path) -> dict:
    """{"steps": compared, "fields": compared, "differences": [...], "files": {name: equal}}."""
    for run in (run_a, run_b):
        if not (run / "metrics.jsonl").exists():
            raise SystemExit(f"{run / 'metrics.jsonl'}: no such file (is {run} a run folder?)")
    rows_a = common.read_jsonl(run_a / "metrics.jsonl")
    rows_b = common.read_jsonl(run_b / "metrics.jsonl")
    fields = sum(sum(not is_clock(k) for k in a) for a, _ in zip(rows_a, rows_b))
    files = {}
    names = list(FILES) + sorted(f"items/{p.name}" for p in (run_a / "items").glob("*.jsonl"))
    for name in names:
        if (run_a / name).exists() and (run_b / name).exists():
            files[name] = (run_a / name).read_bytes() == (run_b / name).read_bytes()
        elif (run_a / name).exists():
            files[name] = None  # only in the first run: reported, not counted as a difference
    return {"steps": min(len(rows_a), len(rows_b)), "fields": fields,
            "differences": step_differences(rows_a, rows_b), "files": files}


def verdict(c: dict) -> str:
    """One line: the run repeats only if every compared field and file is equal."""
    unequal = [n for n, same in c["files"].items() if same is False]
    if not c["differences"] and not unequal:
        files = sum(1 for same in c["files"].values() if same)
        return (f"repeats exactly: {c['fields']} per-step fields over {c['steps']} steps "
                f"and {files} files equal (clocks aside)")
    return (f"does not repeat: {len(c['differences'])} per-step differences, "
            f"{len(unequal)} files differ ({', '.join(unequal) or 'none'})")


def main(argv=None):
    p = argparse.ArgumentParser(description="Compare two runs of one configuration exactly.")
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--show", type=int, default=10, help="how many differences to print")
    a = p.parse_args(argv)
    c = compare(a.run_a, a.run_b)
    for name in ("code_version", "cpu"):
        cfg = [common.read_json(r / "config.json").get(name) if (r / "config.json").exists()
               else None for r in (a.run_a, a.run_b)]
        print(f"{name}: {cfg[0]} | {cfg[1]}")
    for line in c["differences"][:a.show]:
        print(line)
    words = {True: "equal", False: "DIFFERS", None: "only in the first run"}
    for name, same in c["files"].items():
        print(f"{name}: {words[same]}")
    line = verdict(c)
    print(line)
    return 0 if line.startswith("repeats") else 1


if __name__ == "__main__":
    raise SystemExit(main())
