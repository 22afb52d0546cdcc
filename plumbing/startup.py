"""
plumbing/startup.py -- what an entry point does before torch loads (standard library only).

CUDA's caching allocator reads its setting (PYTORCH_ALLOC_CONF, or the older
PYTORCH_CUDA_ALLOC_CONF) once, when torch starts it; a value put into os.environ after that is
silently ignored. So train.py and bench/gpu_check.py call set_allocator() before `import torch`,
and a run records the setting that was in force (SOURCES.md §9.57).

    from plumbing import startup
    startup.set_allocator()   # expandable segments, unless the user chose a setting
    import torch
    startup.allocator_setting()  # "PYTORCH_ALLOC_CONF=expandable_segments:True"

Test: .venv/bin/python -m pytest -q tests/test_report.py
"""

import os
import sys

ALLOC_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
DEFAULT_ALLOC = "expandable_segments:True"  # a phase's freed blocks serve the next phase
SET = {}  # {"before_torch": bool}: whether the first call came before torch was imported


def set_allocator() -> None:
    """Expandable segments, unless the user set one of the allocator's variables; remembers
    whether torch had been imported already (then the setting may not be in force)."""
    if not any(os.environ.get(k) for k in ALLOC_VARS):
        os.environ["PYTORCH_ALLOC_CONF"] = DEFAULT_ALLOC
    SET.setdefault("before_torch", "torch" not in sys.modules)


def allocator_setting() -> str:
    """The allocator setting as a run records it: "VAR=value", with a warning when it was set
    only after torch was imported (a script that imported torch before train.py, say)."""
    found = next((f"{k}={os.environ[k]}" for k in ALLOC_VARS if os.environ.get(k)), "")
    if found and not SET.get("before_torch", False):
        found += " (set after torch was imported: in force only if CUDA had not started)"
    return found
