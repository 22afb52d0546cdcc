"""
flags.py -- command-line values checked right after parsing: a bad flag costs a second, not the
minutes a model takes to load before the code that needs the value finds it wrong.

Each script's parser is a `Parser` (argparse with one-line errors: `prog: error: --flag VALUE:
what is allowed`, exit code 2 as argparse's, no usage block, no traceback), and each script's
`check_args` calls the helpers below on the parsed values: ranges, paths that must exist, known
task names, lengths within the model's window (read from its config, never its weights).

A name that is not a local path goes to the Hugging Face hub. When the hub cannot be reached
(HF_HUB_OFFLINE set, or no answer within HUB_PROBE_SECONDS) and the name is not in the local cache,
`from_hub` stops in seconds with one line saying how to pass a local copy, instead of the libraries'
retries and tracebacks; a cached name loads from the cache without retries (SOURCES.md §9.60).

    p = flags.Parser(description=...)
    args = p.parse_args(argv)
    flags.at_least(p, args, 1, "steps", "prompts_per_step")    # counts >= 1
    flags.between(p, args, "ratio", 0, 1, low_open=True)      # ratio in (0, 1]

Test: .venv/bin/python -m pytest -q tests/test_flags.py
"""

import argparse
import functools
import json
import os
import re
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".safetensors")
HUB_PROBE_SECONDS = 3.0  # a hub that has not accepted a connection by then counts as unreachable
TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # huggingface_hub's reading of its switches


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


# -----------------------------------------------------------------------------
# the hub: reachable or not, what its cache holds

def hub_offline_setting():
    """'HF_HUB_OFFLINE=1' (or TRANSFORMERS_OFFLINE) when one turns the hub off, else None; read at
    each call, since the libraries read it too."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in TRUE_VALUES:
            return f"{var}={os.environ[var]}"
    return None


def hub_address() -> tuple:
    """(host, port) that the hub's requests connect to: the HTTPS proxy when one is set (the hub
    is then reached through it), else HF_ENDPOINT's host (huggingface.co)."""
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(v)), None)
    url = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else
                   os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.cache
def answers(host: str, port: int) -> bool:
    """A TCP connection to host:port within HUB_PROBE_SECONDS, name lookup included (in a thread:
    a socket's timeout does not bound the lookup). Once per process."""
    ok = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            ok.append(True)
        except OSError:  # no such host, refused, timed out: no answer
            pass
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_PROBE_SECONDS)
    return bool(ok)


def hub_reachable() -> bool:
    """Whether a name that is not a local path can come from the hub now (tests replace this)."""
    return hub_offline_setting() is None and answers(*hub_address())


def hub_unreachable_why() -> str:
    setting = hub_offline_setting()
    if setting:
        return f"the hub cannot be reached (offline: {setting})"
    host, port = hub_address()
    return (f"the hub cannot be reached (no answer from {host}:{port} within "
            f"{HUB_PROBE_SECONDS:g} s)")


def go_offline() -> None:
    """The libraries read the cache without trying the network: without this, a cached name would
    still wait for the hub's retries before its cache is used."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # for `datasets` (it reads it on import) and children
    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # what transformers' downloads ask
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def model_in_cache(name: str, weights: bool = True) -> bool:
    """The hub cache holds `name`'s config.json and, when `weights`, its tokenizer config and every
    weight file (each shard of a sharded model)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename):
        try:
            path = try_to_load_from_cache(name, filename)
        except ValueError:  # not a repository name at all
            return None
        return path if isinstance(path, str) else None
    if not cached("config.json") or (weights and not cached("tokenizer_config.json")):
        return False
    if not weights:
        return True
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if cached(single):
            return True
        if cached(index):
            shards = set(json.loads(Path(cached(index)).read_text())["weight_map"].values())
            return all(cached(s) for s in shards)
    return False


def dataset_in_cache(name: str) -> bool:
    """`datasets` has prepared `name` before: load_dataset's offline fallback reads its cache
    folder <namespace>___<name in snake case>/<config>/<version>/<hash> (datasets' naming)."""
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache"),
                                                 "huggingface")
    root = Path(os.environ.get("HF_DATASETS_CACHE") or Path(home, "datasets")).expanduser()
    parts = name.split("/")
    snake = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", parts[-1])
    parts[-1] = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", snake).lower()
    return any(p.is_dir() for p in (root / "___".join(parts)).glob("*/*/*"))


def from_hub(fail, what: str, cached: bool, local: str) -> None:
    """`what` ("--flag VALUE: not a local path") comes from the hub: fine when the hub answers; from
    the cache without retries when it does not; else `fail` (p.error or die) says so in one line
    that ends with `local`, how to pass a local copy instead."""
    if hub_reachable():
        return
    if cached:
        go_offline()
        return
    fail(f"{what}, and {hub_unreachable_why()}; {local}")


def model_source(p, dest: str, value: str, weights: bool = True) -> None:
    """A model name: an embedded one; a local folder, which must exist; else a hub id that the
    command can get (from_hub). `weights`: the command loads the model; else it needs only the
    config, which the paper's models have offline (policy.QWEN3)."""
    from plumbing import policy
    if not value or value in policy.EMBEDDED:
        return
    if looks_like_path(value) or Path(value).expanduser().exists():
        existing(p, dest, value, "model folder")
    elif weights or not policy.offline_config(value):
        from_hub(p.error, f"{name(dest)} {value}: not a local path",
                 model_in_cache(value, weights), local_model_hint(value))


def local_model_hint(value: str) -> str:
    return (f"pass a local folder: download it where the hub answers with `hf download {value} "
            f"--local-dir DIR` and pass {name('model')} DIR")


def local_dataset_hint(dest: str, value: str, file: str = "a .jsonl file in DIR") -> str:
    return (f"pass a local file: download it where the hub answers with `hf download "
            f"--repo-type dataset {value} --local-dir DIR` and pass {name(dest)} {file}")


def check_sources(args, may_be_hub_id, longbench_id: str) -> None:
    """What a run loads from the hub (a --model that may_be_hub_id(name) says could be one,
    --train-data, --longbench hub): with the hub out of reach and no cached copy, one line in
    seconds (from_hub)."""
    if may_be_hub_id(args.model) and not Path(args.model).expanduser().exists():
        from_hub(die, f"--model {args.model}: not a local path",
                 model_in_cache(args.model), local_model_hint(args.model))
    data = args.train_data
    if data != "builtin" and not Path(data).expanduser().exists():
        from_hub(die, f"--train-data {data}: not a local path", dataset_in_cache(data),
                 local_dataset_hint("train_data", data))
    if args.eval and args.longbench == "hub":
        from_hub(die, f"--longbench hub: {longbench_id} is not a local path",
                 dataset_in_cache(longbench_id),
                 local_dataset_hint("longbench", longbench_id, "DIR/data.json"))


def check_ranges(p, args) -> None:
    """Every numeric flag within what can work and the combinations that cannot: plain values
    only, so train.py checks them before torch loads (and again in preflight.check_args)."""
    between(p, args, "ratio", 0, 1, low_open=True)
    at_least(p, args, 1, "steps", "prompts_per_step", "max_new_tokens", "train_len",
                   "calib_samples", "eval_samples", "eval_lengths", "micro_groups", "mu",
                   "max_gen_batches", "keep_checkpoints", "longbench_max_len")
    at_least(p, args, 0, "warmup_steps", "weight_decay", "beta", "kl_clamp", "eps_high",
                   "overlong_factor", "eval_every", "save_every", "threads", "mini_batch_groups")
    at_least(p, args, -1, "gen_groups", "eval_batch")
    at_least(p, args, 2, "calib_len")
    if args.group_size < 2:  # one completion is its own group mean: every advantage is 0
        p.error(f"--group-size {args.group_size}: must be >= 2 (group-relative advantages "
                "compare completions of one prompt)")
    for dest in ("lr", "grad_clip", "temperature"):
        if getattr(args, dest) <= 0:
            p.error(f"{name(dest)} {getattr(args, dest)}: must be > 0")
    between(p, args, "clip_eps", 0, 1, low_open=True, high_open=True)
    between(p, args, "top_p", 0, 1, low_open=True)
    between(p, args, "overlong_buffer", 0, 1, high_open=True)
    at_least(p, args, 0, "val_samples", "kl_stop", "expected_new_tokens")
    if args.eval_batch == 0:
        p.error("--eval-batch 0: must be >= 1, or -1 for the most the plan fits")
    if args.mini_batch_groups > args.prompts_per_step:
        set_by = " (set by --algo dapo: 2 optimizer steps per batch; pass --mini-batch-groups " \
            "0 for one)" if args.algo == "dapo" and args.mini_batch_groups == 2 else ""
        p.error(f"--mini-batch-groups {args.mini_batch_groups}{set_by}: more than the step's "
                f"--prompts-per-step {args.prompts_per_step} groups")
    if args.fsdp and (args.optimizer == "bf16-sr" or args.adv_scale == "batch"):
        p.error("--fsdp: tested with --optimizer adamw and per-group advantages only")
