"""
plumbing/config.py -- train.py's config table made into its command line: one flag per entry,
grouped as the table groups them, so `python train.py --help` reads like the table.

    FLAGS = {"group": {"name": (default, "help"), "other": (default, "help", choices)}}
    p = build_parser(FLAGS, PRESETS, ALGORITHMS, description)
    args = parse(p, argv, PRESETS, ALGORITHMS)

Layers, last wins: the table, the algorithm's defaults, the preset's (and the preset's for this
algorithm), a saved config.json given with --config, the flags on the command line. The flag's
type follows its default: a list takes one or more values of its first element's type, a switch
is `--x` (with `--no-x` where the default is True or a preset or an algorithm sets it), None
takes a string. `--help` shows the defaults of the chosen --preset and --algo.

Test: .venv/bin/python -m pytest -q tests/test_flags.py tests/test_presets.py
"""

import argparse
import json
from pathlib import Path

from plumbing import flags

# keys of a saved config.json that --config does not take back: a new run gets its own name,
# starts fresh, and runs rather than printing
NOT_FROM_FILE = ("config", "run_name", "resume", "show_config", "plan")


def add_flag(g, name: str, default, text: str, choices=None, switch_off: bool = False) -> None:
    """One table entry as one argparse flag of group `g`."""
    flag = "--" + name.replace("_", "-")
    if isinstance(default, bool):
        action = argparse.BooleanOptionalAction if default or switch_off else "store_true"
        g.add_argument(flag, action=action, default=default, help=text)
    elif isinstance(default, list):
        g.add_argument(flag, nargs="+", type=type(default[0]), default=default, help=text,
                       choices=choices)
    else:
        kind = str if default is None else type(default)
        g.add_argument(flag, type=kind, default=default, help=text, choices=choices)


def build_parser(table: dict, presets: dict, algorithms: dict,
                 description: str) -> argparse.ArgumentParser:
    """The parser of `table` ({group: {name: (default, help[, choices])}}), plus --config."""
    p = flags.Parser(description=description,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    varied = {k for d in [*presets.values(), *algorithms.values()] for k in d}
    varied |= {k for d in presets.values() for v in d.values() if isinstance(v, dict) for k in v}
    for title, entries in table.items():
        g = p.add_argument_group(title)
        for name, (default, text, *choices) in entries.items():
            add_flag(g, name, default, text, *choices, switch_off=name in varied)
    p.add_argument("--config", default=None,
                   help="a run's config.json: its settings as defaults (its name and resume "
                        "excepted); flags given here still win")
    return p


def from_file(path: str, p: argparse.ArgumentParser) -> dict:
    """The settings of a saved config.json that are flags of `p` (derived values, such as the
    precision chosen, are recomputed)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        flags.die(f"--config {path}: {e}")
    if not isinstance(saved, dict):
        flags.die(f"--config {path}: expected a JSON object of settings (a run's config.json)")
    dests = {a.dest for a in p._actions}
    return {k: v for k, v in saved.items() if k in dests and k not in NOT_FROM_FILE}


def parse(p: argparse.ArgumentParser, argv, presets: dict, algorithms: dict):
    """Flags over --config file over preset over algorithm over the table (module docstring)."""
    first, _ = p.parse_known_args(argv)
    saved = from_file(first.config, p) if first.config else {}
    p.set_defaults(**saved)  # so that the file's --preset and --algo count when none is given
    first, _ = p.parse_known_args(argv)
    preset = dict(presets[first.preset])
    p.set_defaults(**algorithms[first.algo])  # the algorithm's settings ...
    p.set_defaults(**{k: v for k, v in preset.items() if k not in algorithms})  # ... the preset's
    p.set_defaults(**preset.get(first.algo, {}))  # ... and the preset's for this algorithm
    p.set_defaults(**saved)  # ... and the saved run's
    return p.parse_args(argv)
