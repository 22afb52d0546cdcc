"""The shared helpers: precision from the hardware (every case of the decision), atomic files,
JSON lines, seeds, positions.

Run: .venv/bin/python -m pytest -q tests/test_common.py
"""

import json

import pytest
import torch

from plumbing import common


@pytest.mark.parametrize("device, capability, flags, cuda_bf16, expected", [
    ("cpu", "AVX512", {"avx512_bf16"}, False, "bf16"),      # e.g. AMD Zen 4/5, Intel Cooper Lake+
    ("cpu", "AVX512", {"amx_bf16", "avx512f"}, False, "bf16"),  # Intel Sapphire Rapids (AMX)
    ("cpu", "AVX512", {"avx512f"}, False, "fp32"),          # AVX-512 without bf16 dot products
    ("cpu", "AVX2", {"avx2"}, False, "fp32"),               # AVX2-only: bf16 would be emulated
    ("cpu", "AVX2", {"avx512_bf16"}, False, "fp32"),        # kernels capped at AVX2 (env override)
    ("cpu", "DEFAULT", set(), False, "fp32"),
    ("cuda", "", set(), True, "bf16"),
    ("cuda", "", set(), False, "fp32"),                     # e.g. a V100
])
def test_auto_precision_follows_the_hardware(device, capability, flags, cuda_bf16, expected):
    got, reason = common.decide_precision("auto", device, capability, frozenset(flags), cuda_bf16)
    assert got == expected and reason


def test_explicit_precision_is_taken_as_asked_and_typos_are_refused():
    assert common.decide_precision("fp32", "cpu", "AVX512", frozenset({"avx512_bf16"}))[0] == "fp32"
    assert common.decide_precision("bf16", "cpu", "AVX2")[0] == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        common.decide_precision("fp16", "cpu")


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    path = tmp_path / "x.json"
    common.write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with common.atomic_path(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    common.append_jsonl(path, {"step": 0})
    path.write_text(path.read_text() + "\n{oops\n")
    with pytest.raises(ValueError, match=r"rows.jsonl: line 3: invalid JSON"):
        common.read_jsonl(path)


def test_mix_seed_is_stable_and_separates_parts():
    assert common.mix_seed(0, "step", 1) == common.mix_seed(0, "step", 1)
    assert common.mix_seed(0, "step", 1) != common.mix_seed(0, "step", 2)
    assert common.mix_seed(1, 2) != common.mix_seed(12)  # parts are separated, not concatenated
    assert 0 <= common.mix_seed("x") < 2**63


def test_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert common.positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_natural_key_orders_layers_by_number():
    names = ["layers.10.q_proj", "layers.2.q_proj", "layers.1.k_proj"]
    assert sorted(names, key=common.natural_key) == [
        "layers.1.k_proj", "layers.2.q_proj", "layers.10.q_proj"]


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp32"), ((7, 5), "fp32"),
                                                  ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_never_picks_emulated_bf16_on_a_gpu(monkeypatch, capability, expected):
    # a V100 (7.0) or T4 (7.5) "supports" bf16 by emulation: torch.cuda.is_bf16_supported() says
    # True there; auto must still choose fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert common.choose_precision("auto", "cuda:0")[0] == expected


def test_cpu_name_says_which_machine_a_timing_came_from(monkeypatch):
    # one model name ("AMD EPYC") covers CPUs of very different speeds: family, cores and the
    # vector capability come with it
    monkeypatch.setattr(common.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    name = common.cpu_name()
    assert name.endswith(" cores, AVX2)") and "(" in name
