"""Tests for experiments/causal.py: which channels are removed, that the hooks zero exactly those
and nothing else, and that an interrupted dose-response resumes where it stopped.

Run: .venv/bin/python -m pytest -q tests/test_causal.py   (seconds; tiny models, no downloads)
"""

import pytest
import torch

from conftest import tiny_model
from experiments.causal import (channel_masks, load_done, plan_points, plot_summary,
                                removed_channels, run_points, summary_table)
from plumbing.common import qk_modules, read_jsonl

HEAD_DIM = 8  # tiny_model: 4 query heads, 2 KV heads of dim 8
CONFIG = {"model": "tiny", "tasks": ["t"], "lengths": [64], "samples": 1, "seed": 0}


def stats_of(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape[0], generator=g) for n, m in qk_modules(model).items()}


def _hooks_left(model):
    return sum(len(m._forward_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- which channels
def test_channel_masks_hand_example():
    stats = {"q": torch.tensor([4., 3., 2., 1., 1., 2., 3., 4.])}  # two heads of 4
    assert channel_masks(stats, "massive", 1, 4)["q"].nonzero().flatten().tolist() == [0, 7]
    assert channel_masks(stats, "least", 1, 4)["q"].nonzero().flatten().tolist() == [3, 4]
    assert channel_masks(stats, "massive", 2, 4)["q"].nonzero().flatten().tolist() == [0, 1, 6, 7]
    assert not channel_masks(stats, "original", 0, 4)["q"].any()
    assert not channel_masks(stats, "random", 0, 4)["q"].any()
    with pytest.raises(ValueError, match="head_dim = 4"):
        channel_masks(stats, "massive", 5, 4)
    with pytest.raises(ValueError, match="unknown condition"):
        channel_masks(stats, "none", 1, 4)


def test_sets_are_per_head_nested_and_the_70_percent_point_is_the_complement():
    stats = {"a.q_proj": torch.rand(64 * 2), "a.k_proj": torch.rand(64)}  # GQA: fewer k heads
    for cond in ("massive", "least", "random"):
        small, big = (channel_masks(stats, cond, n, 64, seed=3) for n in (4, 8))
        for name in stats:
            assert big[name].view(-1, 64).sum(1).tolist() == [8] * (stats[name].numel() // 64)
            assert (small[name] <= big[name]).all()  # nested: n=4 inside n=8
    top30 = channel_masks(stats, "massive", round(0.3 * 64), 64)
    non_massive = channel_masks(stats, "least", round(0.7 * 64), 64)
    for name in stats:
        assert torch.equal(top30[name], ~non_massive[name])  # 19 + 45 = 64 channels per head


def test_plan_points_hand_example():
    assert plan_points((1, 2), 64) == [("original", 0), ("massive", 1), ("massive", 2),
                                       ("least", 1), ("least", 2), ("random", 1), ("random", 2),
                                       ("massive", 19), ("least", 45), ("random", 19),
                                       ("random", 45)]
    assert plan_points((1, 19, 100), 64, ("massive",)) == [("original", 0), ("massive", 1),
                                                           ("massive", 19)]
    with pytest.raises(ValueError, match="unknown condition"):
        plan_points((1,), 64, ("biggest",))


# ----------------------------------------------------------------------------- the hooks
@pytest.mark.parametrize("kind", ("llama", "qwen2", "qwen3"))
def test_hooks_zero_exactly_the_chosen_channels(kind):
    model = tiny_model(kind)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    removed = channel_masks(stats_of(model), "massive", 3, HEAD_DIM)
    seen = {}

    def capture(name):
        def hook(module, inputs, output):
            seen[name] = output.detach().clone()
        return hook

    def outputs():
        handles = [m.register_forward_hook(capture(n)) for n, m in qk_modules(model).items()]
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            for h in handles:
                h.remove()
        return dict(seen)

    plain = outputs()
    with removed_channels(model, removed) as hooked:  # our hooks run before the capture hooks
        assert hooked == len(removed)
        cut = outputs()
    assert _hooks_left(model) == 0
    for name, mask in removed.items():
        assert (cut[name][..., mask] == 0).all(), name
        assert (plain[name][..., mask] != 0).all(), name  # they were not zero to begin with
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
        keep = ~removed[name]  # layer 0's inputs do not depend on any removal
        assert torch.equal(cut[name][..., keep], plain[name][..., keep])


def test_removing_nothing_reproduces_the_unhooked_output():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with removed_channels(model, channel_masks(stats_of(model), "original", 0, HEAD_DIM)) as n:
            same = model(input_ids=ids).logits
        with removed_channels(model, channel_masks(stats_of(model), "least", 1, HEAD_DIM)):
            other = model(input_ids=ids).logits
    assert n == 0 and torch.equal(ref, same)
    assert not torch.equal(ref, other)


def test_hooks_removed_on_error_and_bad_masks_refused():
    model = tiny_model("llama")
    removed = channel_masks(stats_of(model), "random", 2, HEAD_DIM)
    with pytest.raises(RuntimeError, match="boom"):
        with removed_channels(model, removed):
            raise RuntimeError("boom")
    assert _hooks_left(model) == 0
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match="32 output channels"):
        with removed_channels(model, {name: torch.ones(16, dtype=torch.bool)}):
            pass
    assert _hooks_left(model) == 0
    with pytest.raises(ValueError, match="no q/k module"):
        with removed_channels(model, {"model.layers.9.self_attn.q_proj": removed[name]}):
            pass


# ----------------------------------------------------------------------------- resumable runs
def fake_evaluate(calls):
    """An evaluate_fn that scores the model by its logits on fixed ids (changes when hooked)."""
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(2))

    def evaluate_fn(model):
        calls.append(_hooks_left(model))
        with torch.no_grad():
            score = float(model(input_ids=ids).logits.float().abs().mean())
        table = {"average": {64: score}, "scores": {"t": {64: score}}}
        return table, [{"task": "t", "length": 64, "score": score, "completion": "x" * 200}]
    return evaluate_fn


def test_resume_skips_finished_points_and_refuses_another_config(tmp_path):
    model = tiny_model("llama")
    stats = stats_of(model)
    out = tmp_path / "causal.jsonl"
    masks_for = lambda c, n: channel_masks(stats, c, n, HEAD_DIM)  # noqa: E731
    points = plan_points((1, 2), HEAD_DIM, ("massive", "random"))
    calls = []
    first = run_points(model, points[:3], masks_for, fake_evaluate(calls), out, CONFIG,
                       log=lambda *a: None)
    assert len(calls) == 3 and calls[0] == 0 and all(c > 0 for c in calls[1:])  # hooked
    calls.clear()
    rows = run_points(model, points, masks_for, fake_evaluate(calls), out, CONFIG,
                      log=lambda *a: None)
    assert len(calls) == len(points) - 3  # only the new points ran
    assert rows[:3] == first and len(read_jsonl(out)) == len(points)
    assert [(r["condition"], r["n"]) for r in rows] == points
    assert len(rows[0]["examples"][0]["completion"]) == 120
    massive1 = rows[1]["average"]["64"]
    assert rows[0]["average"]["64"] != massive1  # the removal changed the model's output
    with pytest.raises(ValueError, match=r"causal.jsonl: line 1: .*samples: file has 1"):
        load_done(out, {**CONFIG, "samples": 5})


def test_interrupted_run_keeps_finished_points(tmp_path):
    model = tiny_model("llama")
    stats, out, calls = stats_of(model), tmp_path / "causal.jsonl", []
    masks_for = lambda c, n: channel_masks(stats, c, n, HEAD_DIM)  # noqa: E731
    good = fake_evaluate(calls)

    def dies_on_second(model):
        if len(calls) == 1:
            raise KeyboardInterrupt
        return good(model)

    points = plan_points((1,), HEAD_DIM, ("least",))
    with pytest.raises(KeyboardInterrupt):
        run_points(model, points, masks_for, dies_on_second, out, CONFIG, log=lambda *a: None)
    assert _hooks_left(model) == 0 and len(read_jsonl(out)) == 1
    calls.clear()
    run_points(model, points, masks_for, good, out, CONFIG, log=lambda *a: None)
    assert len(calls) == len(points) - 1 and len(read_jsonl(out)) == len(points)


def test_summary_table_and_figure(tmp_path):
    rows = [{"condition": "original", "n": 0, "average": {"1024": 80.0}},
            {"condition": "massive", "n": 1, "average": {"1024": 10.0}},
            {"condition": "random", "n": 1, "average": {"1024": 78.5}},
            {"condition": "massive", "n": 19, "average": {"1024": 0.0}}]
    table = summary_table(rows).splitlines()
    assert table[0] == "RULER average at 1024 tokens (channels removed per head ->)"
    assert table[2] == "| condition | n=0 | n=1 | n=19 |"
    assert table[4] == "| original | 80.0 |  |  |"
    assert table[5] == "| massive |  | 10.0 | 0.0 |"
    assert table[6] == "| random |  | 78.5 |  |"
    pytest.importorskip("matplotlib")
    plot_summary(rows, tmp_path / "causal.png")
    assert (tmp_path / "causal.png").stat().st_size > 1000
