"""
flags.py -- command-line values checked right after parsing: a bad flag costs a second, not the
minutes a model takes to load before the code that needs the value finds it wrong.

Each script's parser is a `Parser` (argparse with one-line errors: `prog: error: --flag VALUE:
what is allowed`, exit code 2 as argparse's, no usage block, no traceback), and each script's
`check_args` calls the helpers below on the parsed values: ranges, paths that must exist, known
task names, lengths within the model's window (read from its config, never its weights).

    p = flags.Parser(description=...)
    args = p.parse_args(argv)
    flags.at_least(p, args, 1, "steps", "prompts_per_step")    # counts >= 1
    flags.between(p, args, "ratio", 0, 1, low_open=True)      # ratio in (0, 1]

Test: .venv/bin/python -m pytest -q tests/test_flags.py
"""

import argparse
import json
import sys
from pathlib import Path

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".safetensors")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (the usage block of a 60-flag script would
    bury the message)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (--help lists the flags)\n")
        raise SystemExit(2)


def die(message: str) -> None:
    """The same one-line error for bad data found before the model loads (a row, a file)."""
    sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}\n")
    raise SystemExit(2)


def name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def at_least(p, args, minimum, *dests) -> None:
    """Each listed value (a number, or every number of a list) is >= minimum."""
    for d in dests:
        v = getattr(args, d)
        for x in (v if isinstance(v, list) else [v]):
            if x is not None and x < minimum:
                p.error(f"{name(d)} {x}: must be >= {minimum}")


def between(p, args, dest, low, high, low_open=False, high_open=False) -> None:
    """low <= value <= high, each end open when asked: (0, 1] is low_open."""
    v = getattr(args, dest)
    if (v < low or (low_open and v == low)) or (v > high or (high_open and v == high)):
        p.error(f"{name(dest)} {v}: must be in {'(' if low_open else '['}{low}, {high}"
                f"{')' if high_open else ']'}")


def looks_like_path(value: str) -> bool:
    """A value meant as a local file or folder rather than a hub id: it has a data file's suffix
    or starts like a path. (A hub id is `owner/name`, neither.)"""
    return value.startswith(("/", "./", "../", "~")) or value.endswith(DATA_SUFFIXES)


def existing(p, dest, value, what: str) -> None:
    """A path that must exist, said as such (instead of a hub lookup failing minutes later)."""
    if value and not Path(value).expanduser().exists():
        p.error(f"{name(dest)} {value}: no such {what}")


def local_or_hub(p, dest, value, what: str) -> None:
    """A value that may be a hub id: if it looks like a local path it must exist."""
    if value and looks_like_path(value):
        existing(p, dest, value, what)


def known(p, dest, values, choices) -> None:
    for v in (values if isinstance(values, list) else [values]):
        if v not in choices:
            shown = list(choices)
            p.error(f"{name(dest)} {v}: not a known name; choose from "
                    f"{', '.join(shown[:12])}{' ...' if len(shown) > 12 else ''}")


def model_window(model: str):
    """max_position_embeddings of a model from its config alone (None when it cannot be read
    without the network or a conversion): the bound of every length flag."""
    from plumbing import policy
    if model in policy.EMBEDDED:
        config = policy.embedded_dir(model) / "config.json"
        return json.loads(config.read_text()).get("max_position_embeddings") \
            if config.exists() else None
    try:
        return getattr(policy.model_config(model), "max_position_embeddings", None)
    except Exception:  # noqa: BLE001 -- a hub id offline: the load will say so
        return None


def within(p, dest, value: int, window, what: str) -> None:
    if window is not None and value > window:
        p.error(f"{name(dest)} {value}: {what} exceeds the model's window of {window} tokens")
