"""Every tensor of a step lives on the policy's device: sampling -> scores -> advantages -> old and
reference log-probs -> loss -> masked step -> checkpoint -> resume, run by train.main itself.

How: the policy is put on a second device that holds real values (tests/fake_device.py: torch's
`meta` device type, computed on the CPU behind the scenes). Every aten operation checks, as CUDA
does, that its tensor arguments are on one device (0-dim CPU scalars and CPU index tensors
allowed, as CUDA allows them). On a CPU-only machine the model and the data are otherwise on the
same device, so a forgotten `.to(device)` or a stray `.cpu()` is invisible; here it raises
"Expected all tensors to be on the same device" at the operation that mixes them, exactly where a
GPU run would crash after loading the model and running the first evaluation.

Run: .venv/bin/python -m pytest -q tests/test_device.py
"""

import json

import pytest
import torch

import train
from fake_device import FAKE, DeviceTensor, fake_device


def run_args(tiny_dir, qa_file, out, name, steps, *extra):
    return ["--model", tiny_dir, "--train-data", qa_file, "--train-len", "128",
            "--calib-len", "32", "--calib-samples", "2", "--prompts-per-step", "2",
            "--group-size", "4", "--max-new-tokens", "6", "--steps", str(steps), "--save-final",
            "--precision", "fp32", "--out-dir", str(out), "--run-name", name,
            "--lr", "1e-3", "--device", str(FAKE), *extra]


def test_the_fake_device_refuses_a_mix_and_keeps_values():
    with fake_device():
        x = torch.arange(6.0, device=FAKE).view(2, 3)  # (2, 3) on the device, real values
        assert isinstance(x, DeviceTensor) and x.device == FAKE
        assert (x * 2).sum().item() == 30.0
        assert x[torch.tensor([1])].tolist() == [[3.0, 4.0, 5.0]]  # CPU indices: allowed
        assert (x + torch.tensor(1.0)).device == FAKE  # a 0-dim CPU scalar: allowed
        with pytest.raises(RuntimeError, match="same device"):
            torch.where(x > 2, x, torch.zeros(2, 3))  # the crash of the first GPU update
        with pytest.raises(RuntimeError, match="same device"):
            x + x.cpu()


@pytest.mark.parametrize("algo", ["grpo", "dapo"])
def test_a_whole_run_stays_on_the_policy_device(tiny_dir, qa_file, tmp_path, algo):
    # GRPO with a KL reference and mu = 2 (old and reference log-probs), an evaluation before
    # and after, a checkpoint and a resume; DAPO with dynamic sampling, the overlong penalty and
    # two mini-batches. A device mix anywhere raises inside train.main.
    extra = (("--beta", "0.04", "--mu", "2", "--eval-tasks", "niah_single_1", "--eval-lengths",
              "512", "--eval-samples", "1") if algo == "grpo" else ("--algo", "dapo", "--no-eval"))
    with fake_device():
        run = train.main(run_args(tiny_dir, qa_file, tmp_path, algo, 2, *extra))
        train.main(run_args(tiny_dir, qa_file, tmp_path, algo, 3, *extra, "--allow-change",
                            "steps", "--resume", str(run)))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["drift_outside_mask"] == 0.0 for r in rows)
