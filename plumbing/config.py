"""
plumbing/config.py -- train.py's config table made into its command line: one flag per entry,
grouped as the table groups them, so `python train.py --help` reads like the table.

    FLAGS = {"group": {"name": (default, "help"), "other": (default, "help", choices)}}
    p = build_parser(FLAGS, PRESETS, ALGORITHMS, description)
    args = parse(p, argv, PRESETS, ALGORITHMS)

Layers, last wins: the table, the algorithm's defaults, the preset's (and the preset's for this
algorithm), a saved config.json given with --config, the flags on the command line. With --resume
RUN the run's own config.json is that layer, and a flag given with it that differs from the saved
value is refused unless --allow-change names it: a resume continues the run it saved. The flag's
type follows its default: a list takes one or more values of its first element's type, a switch is
`--x` (with `--no-x` where the default is True or a preset or an algorithm sets it), None takes a
string. `--help` shows the defaults of the chosen --preset and --algo.

Test: .venv/bin/python -m pytest -q tests/test_flags.py tests/test_presets.py
"""

import argparse
import json
from pathlib import Path

from plumbing import flags

DESCRIPTION = "LongAct RL: saliency-guided sparse q/k updates (train.py)."
STEP_HELP = """\
The step line: reward = mean reward of the step's completions; acc = share scored 1; len = mean
completion tokens; trunc = share cut at --max-new-tokens; eq-groups = share of groups whose
rewards are all equal (no learning signal); loss; clip = shares of tokens clipped below / above
(low/high); kl = mean k3 KL to the reference (max: the largest single token's); gnorm = gradient
norm before clipping; lr; qk = share of q/k rows that train; J-prev / J-0 = overlap (Jaccard) of
this step's masks with the previous step's / step 0's; t sample / update = seconds; eta = the
whole run's time left.

RULER tasks (--train-task, --eval-tasks): niah_single_1, niah_single_2, niah_single_3,
niah_multikey_1, niah_multikey_2, niah_multikey_3, niah_multivalue, niah_multiquery, vt, cwe,
fwe, qa_1, qa_2."""

# keys of a saved config.json that --config does not take back: a new run gets its own name,
# starts fresh, and runs rather than printing (a resume keeps the run's name)
NOT_FROM_FILE = ("config", "run_name", "resume", "show_config", "plan", "allow_change")


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


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, and the epilog as written."""


def build_parser(table: dict, presets: dict, algorithms: dict, description: str,
                 epilog: str = "") -> argparse.ArgumentParser:
    """The parser of `table` ({group: {name: (default, help[, choices])}}), plus --config."""
    p = flags.Parser(description=description, epilog=epilog, formatter_class=Formatter)
    varied = {k for d in [*presets.values(), *algorithms.values()] for k in d}
    varied |= {k for d in presets.values() for v in d.values() if isinstance(v, dict) for k in v}
    for title, entries in table.items():
        g = p.add_argument_group(title)
        for name, (default, text, *choices) in entries.items():
            add_flag(g, name, default, text, *choices, switch_off=name in varied)
    g = p.add_argument_group("settings from a file")
    g.add_argument("--config", default=None,
                   help="a run's config.json: its settings as defaults for a new run; flags "
                        "given here still win")
    g.add_argument("--allow-change", nargs="+", default=[], metavar="FLAG",
                   help="with --resume: flags that may differ from the saved run (e.g. steps)")
    return p


def given(p: argparse.ArgumentParser, argv) -> dict:
    """{dest: value} of the flags named on the command line, nothing filled in."""
    defaults, layers = {a: a.default for a in p._actions}, p._defaults
    try:  # no action default and no layer (set_defaults) may fill a flag that was not given
        p._defaults = {}
        for a in defaults:
            a.default = argparse.SUPPRESS
        named, _ = p.parse_known_args(argv)
    finally:
        p._defaults = layers
        for a, d in defaults.items():
            a.default = d
    return vars(named)


def from_file(path, p: argparse.ArgumentParser, flag: str = "--config", keep=()) -> dict:
    """The settings of a saved config.json that are flags of `p` (derived values, such as the
    precision chosen, are recomputed); `keep`: names of NOT_FROM_FILE taken all the same."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        flags.die(f"{flag} {path}: {e}")
    if not isinstance(saved, dict):
        flags.die(f"{flag} {path}: expected a JSON object of settings (a run's config.json)")
    dests = {a.dest for a in p._actions}
    return {k: v for k, v in saved.items()
            if k in dests and (k not in NOT_FROM_FILE or k in keep)}


def parse(p: argparse.ArgumentParser, argv, presets: dict, algorithms: dict, quiet=False):
    """Flags over --config file (or the resumed run's) over preset over algorithm over the table
    (module docstring)."""
    first, _ = p.parse_known_args(argv)
    if first.config and first.resume:
        flags.die("--config with --resume: a resume takes its settings from the run's folder")
    saved = from_file(first.config, p) if first.config else {}
    if first.resume and not (Path(first.resume) / "config.json").exists():
        flags.die(f"--resume {first.resume}: not a run folder (no config.json in it)")
    if first.resume:  # the run's own settings, its name included
        saved = from_file(Path(first.resume) / "config.json", p, "--resume", keep=("run_name",))
    p.set_defaults(**saved)  # so that the file's --preset and --algo count when none is given
    first, _ = p.parse_known_args(argv)
    preset = dict(presets[first.preset])
    p.set_defaults(**algorithms[first.algo])  # the algorithm's settings ...
    p.set_defaults(**{k: v for k, v in preset.items() if k not in algorithms})  # ... the preset's
    p.set_defaults(**preset.get(first.algo, {}))  # ... and the preset's for this algorithm
    p.set_defaults(**saved)  # ... and the saved run's
    args = p.parse_args(argv)
    if first.resume:
        check_resume_changes(args, saved, given(p, argv), quiet)
    return args


def early(p: argparse.ArgumentParser, argv, presets: dict, algorithms: dict) -> None:
    """train.py's first look, before torch loads: --help, an unknown flag, a bad choice or type,
    a value out of range or a resume's changed flag each end here in one line, in well under a
    second. The full parse and every check that needs a model's config come after the imports."""
    args = parse(p, argv, presets, algorithms, quiet=True)
    flags.check_ranges(p, args)
    if not (args.show_config or args.plan):  # a hub name out of reach: one line, now
        hub_names_early(args)


LONGBENCH_HUB_ID = "THUDM/LongBench-v2"  # tasks/longbench.py's (a test holds them equal)


def hub_names_early(args) -> None:
    """preflight.check_sources for what can be told without torch: a --model of the form
    owner/name (embedded names have no slash), --train-data and --longbench hub, each neither a
    local path nor in the hub cache while the hub is out of reach."""
    flags.check_sources(args, lambda m: "/" in m, LONGBENCH_HUB_ID)


def check_resume_changes(args, saved: dict, named: dict, quiet: bool = False) -> None:
    """A flag given with --resume that differs from the saved run: refused in one line, or with
    --allow-change printed (config.json's "resumes" records it)."""
    allowed = {a.removeprefix("--").replace("-", "_") for a in args.allow_change}
    changed = {k: (saved[k], v) for k, v in named.items()
               if k in saved and saved[k] != v and k not in ("resume", "allow_change")}
    refused = {k: ab for k, ab in changed.items() if k not in allowed}
    if refused:
        flags.die(f"--resume {args.resume}: " + "; ".join(
            f"{flags.name(k)} {new} differs from the saved run's {old}"
            for k, (old, new) in refused.items())
            + " (a resume continues the saved settings: drop the flag, or pass --allow-change "
            + " ".join(sorted(refused)) + ")")
    for k, (old, new) in changed.items() if not quiet else ():
        print(f"resume: {flags.name(k)} {old} -> {new} (--allow-change)", flush=True)
