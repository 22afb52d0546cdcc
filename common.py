"""
common.py -- the few small helpers that several files need, written once.

Nothing here is LongAct-specific; each helper exists because two or more modules needed the same few lines:
  * atomic files: a reader (or a resumed run) never sees half of a file. We write a temp file in the same folder,
    flush and fsync it, then `os.replace` it over the target (atomic on one file system).
  * JSON lines: append one row and flush it to disk; read rows back with errors that name the file and the line.
  * q/k projections: Llama, Mistral, Qwen2 and Qwen3 all call them `q_proj` / `k_proj`.
  * natural sort: "layers.10" after "layers.9".
  * positions from an attention mask: what `generate` computes for left-padded rows.
  * seeds: every random choice derives from a tuple of printable parts (run seed, step, prompt index, ...).

Shapes: N rows, P positions.
Test: .venv/bin/python -m pytest -q tests/test_common.py
"""

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

QK_SUFFIXES = ("q_proj", "k_proj")  # the projections whose weight rows LongAct masks (SOURCES.md §1)


# -----------------------------------------------------------------------------
# files

@contextmanager
def atomic_path(path):
    """Yield a temp path next to `path`; on success it is fsynced and renamed over `path`, on error deleted.

        with atomic_path("x.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path, row: dict) -> None:
    """Append one JSON row and push it to disk (a crash right after still finds the row whole)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list:
    """Rows of a JSON-lines file; blank lines skipped; a bad line raises naming the file and line number."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
    return rows


# -----------------------------------------------------------------------------
# models and names

def qk_modules(model) -> dict:
    """{name: module} of every q/k projection, in model order. Raises if the model has none."""
    found = {n: m for n, m in model.named_modules() if n.endswith(QK_SUFFIXES)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no module whose name ends in {QK_SUFFIXES}")
    return found


def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: 'layers.2.q' < 'layers.10.q'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, P) 0/1 attention mask -> (N, P) positions that skip left padding (0 on the padding itself).

    Example: [[0, 0, 1, 1, 1]] -> [[0, 0, 0, 1, 2]], as `generate` numbers a left-padded row."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def mix_seed(*parts) -> int:
    """A 63-bit seed from printable parts (ints or strings), stable across runs and Python versions
    (unlike hash()). mix_seed(run_seed, step, attempt) gives every step its own stream."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
