"""Tests for masking.py: row selection, and rows outside the mask staying bit-identical through real training steps.

Run: .venv/bin/python -m pytest -q tests/test_masking.py      (about 20 s on 2 CPU cores; tiny models, no downloads,
     plus one test on the embedded SmolLM2 model)
"""

import copy
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model

from masking import (apply_row_weight_decay, attach_grad_masks, build_masks, check_masks, format_summary,
                     load_masks, mask_summary, masked_params, param_groups, save_masks)

QK = ("q_proj", "k_proj")


def qk_shapes(model) -> dict[str, int]:
    """{module name: out_features} for every q/k projection of a model."""
    return {n: m.weight.shape[0] for n, m in model.named_modules() if n.endswith(QK)}


def random_stats(model, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(c, generator=g) for n, c in qk_shapes(model).items()}


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("strategy", ["topk", "bottomk", "random", "all"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
def test_row_counts_global(strategy, ratio):
    stats = {"a.q_proj": torch.rand(32), "a.k_proj": torch.rand(16), "b.q_proj": torch.rand(50)}
    masks = build_masks(stats, ratio=ratio, strategy=strategy)
    for name, m in masks.items():
        C = stats[name].numel()
        assert m.dtype == torch.bool and m.shape == (C,)
        assert int(m.sum()) == (C if strategy == "all" else round(ratio * C))


@pytest.mark.parametrize("strategy", ["topk", "bottomk", "random"])
def test_row_counts_per_head(strategy):
    stats = {"a.q_proj": torch.rand(4 * 8), "a.k_proj": torch.rand(2 * 8)}
    masks = build_masks(stats, ratio=0.3, strategy=strategy, per_head=True, head_dim=8)
    for m in masks.values():
        assert m.view(-1, 8).sum(1).tolist() == [round(0.3 * 8)] * (m.numel() // 8)  # 2 rows in every head


def test_topk_and_bottomk_pick_extremes():
    s = torch.tensor([0.1, 5.0, 3.0, 0.2, 4.0, 0.0, 2.0, 1.0, 6.0, 0.3])  # (10,)
    top = build_masks({"x.q_proj": s}, ratio=0.3, strategy="topk")["x.q_proj"]
    bottom = build_masks({"x.q_proj": s}, ratio=0.3, strategy="bottomk")["x.q_proj"]
    assert top.nonzero().flatten().tolist() == [1, 4, 8]  # values 5, 4, 6
    assert bottom.nonzero().flatten().tolist() == [0, 3, 5]  # values 0.1, 0.2, 0
    # per head (2 heads of 5): the top 2 (round(0.3 * 5) = 2) of [0.1 5 3 0.2 4] and of [0 2 1 6 0.3]
    ph = build_masks({"x.q_proj": s}, ratio=0.3, strategy="topk", per_head=True, head_dim=5)["x.q_proj"]
    assert ph.nonzero().flatten().tolist() == [1, 4, 6, 8]


def test_ties_broken_by_lower_index():
    s = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    assert build_masks({"x.k_proj": s}, 0.5, "topk")["x.k_proj"].nonzero().flatten().tolist() == [1, 2, 3]
    flat = torch.ones(10)
    assert build_masks({"x.k_proj": flat}, 0.3, "topk")["x.k_proj"].nonzero().flatten().tolist() == [0, 1, 2]
    assert build_masks({"x.k_proj": flat}, 0.3, "bottomk")["x.k_proj"].nonzero().flatten().tolist() == [0, 1, 2]


def test_random_reproducible_and_different():
    stats = {f"model.layers.{i}.self_attn.q_proj": torch.rand(64) for i in range(2)}
    a = build_masks(stats, 0.3, "random", seed=1)
    b = build_masks(dict(reversed(list(stats.items()))), 0.3, "random", seed=1)  # dict order must not matter
    c = build_masks(stats, 0.3, "random", seed=2)
    names = sorted(stats)
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert not all(torch.equal(a[n], c[n]) for n in names)
    assert not torch.equal(a[names[0]], a[names[1]])  # same shape, different matrices -> different rows
    # random ignores the statistic's values (only its shape matters)
    d = build_masks({n: torch.zeros(64) for n in names}, 0.3, "random", seed=1)
    assert all(torch.equal(a[n], d[n]) for n in names)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_range_is_an_error(ratio):
    with pytest.raises(ValueError, match="ratio"):
        build_masks({"x.q_proj": torch.rand(8)}, ratio=ratio)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="strategy"):
        build_masks({"x.q_proj": torch.rand(8)}, strategy="largest")
    with pytest.raises(ValueError, match="head_dim"):
        build_masks({"x.q_proj": torch.rand(8)}, per_head=True)
    with pytest.raises(ValueError, match="heads of 3"):
        build_masks({"x.q_proj": torch.rand(8)}, per_head=True, head_dim=3)
    with pytest.raises(ValueError, match="NaN"):
        build_masks({"x.q_proj": torch.tensor([1.0, float("nan")])})


def test_mask_summary_hand_example():
    masks = {"model.layers.0.self_attn.q_proj": torch.tensor([True, False, False, False]),
             "model.layers.0.self_attn.k_proj": torch.tensor([True, True]),
             "model.layers.1.self_attn.q_proj": torch.tensor([False, False, True, True])}
    stats = {"model.layers.0.self_attn.q_proj": torch.tensor([3.0, 1.0, 1.0, 1.0])}
    per_layer, overall = mask_summary(masks, stats)
    assert per_layer["model.layers.0.self_attn"] == {"q_proj": 0.25, "k_proj": 1.0, "q_proj mass": 0.5}
    assert per_layer["model.layers.1.self_attn"] == {"q_proj": 0.5}
    assert overall == 5 / 10
    table = format_summary(per_layer, overall)
    assert "overall share of q/k rows trainable: 0.5000" in table and "q_proj mass" in table


# ----------------------------------------------------------------------------- training with masks
def run_steps(model, masks, mode: str, steps: int = 5, lr: float = 1e-2, wd: float = 0.1, clip: float = 0.1,
              impl: str = "for-loop") -> list[float]:
    """`steps` AdamW steps of 2 accumulated micro-batches under bf16 autocast with grad-norm clipping.

    mode "ours": masking.py's recipe. "restore": the brute-force reference (zero grads, plain AdamW on everything,
    then copy the frozen rows back). "zero_only": zero grads + plain AdamW (the naive recipe). "plain": no masks.
    impl: AdamW's implementation, "for-loop" (the CPU default), "foreach" or "fused". Returns the pre-clip grad norms.
    """
    data = torch.randint(3, 128, (steps, 2, 2, 12), generator=torch.Generator().manual_seed(0))  # (S, micro, B, T)
    handles = attach_grad_masks(model, masks) if mode != "plain" else []
    params = param_groups(model, masks, wd) if mode == "ours" else model.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=impl == "foreach", fused=impl == "fused")
    frozen = [(p, rows, p.detach().clone()) for _, p, rows in masked_params(model, masks)]
    norms = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        for ids in data[step]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            (loss / len(data[step])).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        if mode == "ours":
            apply_row_weight_decay(opt)
        opt.step()
        if mode == "restore":
            with torch.no_grad():
                for p, rows, init in frozen:
                    p.copy_(torch.where(rows, p, init))
    for h in handles:
        h.remove()
    return norms


def masked_model(kind: str, ratio: float = 0.3, strategy: str = "topk", dtype=torch.float32):
    """A tiny model with random (non-zero) q/k biases where it has them, plus masks from random statistics."""
    model = tiny_model(kind).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.bias", "k_proj.bias")):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))  # zero biases would hide decay
    return model, build_masks(random_stats(model), ratio, strategy)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_frozen_rows_bit_identical_others_train(kind):
    model, masks = masked_model(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = run_steps(model, masks, "ours")
    assert max(norms) > 0.1  # clipping really was active
    checked = set()
    for name, p, rows in masked_params(model, masks):
        keep = rows.expand_as(p)  # (C, I) or (C,)
        assert torch.equal(p[~keep], before[name][~keep]), f"{name}: frozen rows moved"
        changed = (p != before[name]).reshape(p.shape[0], -1).any(1)  # (C,)
        assert changed[rows.flatten()].all(), f"{name}: a trainable row did not change"
        checked.add(name)
    if kind == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in checked) and any(n.endswith("k_proj.bias") for n in checked)
    for n, p in model.named_parameters():
        if n not in checked:
            assert not torch.equal(p, before[n]), f"{n} did not train"


# bf16 parameters need a larger decay: a relative change of lr * wd = 1e-3 is below bf16's resolution (2^-8), so
# with wd 0.1 the decay would round away and the test could not tell a missing decay from a correct one.
@pytest.mark.parametrize("kind,impl,dtype,wd", [("llama", "for-loop", torch.float32, 0.1),
                                                ("qwen2", "for-loop", torch.float32, 0.1),
                                                ("qwen2", "foreach", torch.float32, 0.1),
                                                ("qwen3", "fused", torch.float32, 0.1),
                                                ("llama", "for-loop", torch.bfloat16, 1.0)])
def test_trainable_rows_match_reference_adamw(kind, impl, dtype, wd):
    """Bit equality of EVERY parameter with the brute-force reference: decay on trainable rows is AdamW's own."""
    ours, masks = masked_model(kind, dtype=dtype)
    ref, _ = masked_model(kind, dtype=dtype)
    run_steps(ours, masks, "ours", wd=wd, impl=impl)
    run_steps(ref, masks, "restore", wd=wd, impl=impl)
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), f"{n} differs from the reference AdamW run"


def test_zeroing_gradients_alone_is_not_enough():
    """Why param_groups/apply_row_weight_decay exist: with weight decay, AdamW moves rows whose grad is zero."""
    model, masks = masked_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_steps(model, masks, "zero_only")
    name, p, rows = masked_params(model, masks)[0]
    keep = rows.expand_as(p)
    assert not torch.equal(p[~keep], before[name][~keep])
    torch.testing.assert_close(p[~keep], before[name][~keep] * (1 - 1e-2 * 0.1) ** 5)  # pure decay, no update


def test_all_strategy_is_plain_adamw():
    ours, masks = masked_model("qwen2", strategy="all")
    ref, _ = masked_model("qwen2", strategy="all")
    assert masked_params(ours, masks) == [] and len(param_groups(ours, masks, 0.1)) == 1
    run_steps(ours, masks, "ours")
    run_steps(ref, masks, "plain")
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))


def test_mismatched_masks_are_refused():
    model = tiny_model("llama")
    masks = build_masks(random_stats(model), 0.3)
    check_masks(model, masks)  # the right masks pass
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"q_proj.*\(16,\).*\(32, 32\)"):  # both shapes named
        check_masks(model, {**masks, name: torch.ones(16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="model.layers.7.self_attn.q_proj"):
        check_masks(model, {**masks, "model.layers.7.self_attn.q_proj": torch.ones(32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="dtype"):
        check_masks(model, {**masks, name: torch.ones(32)})
    with pytest.raises(ValueError, match="no mask for 1 q/k"):
        check_masks(model, {k: v for k, v in masks.items() if k != name})
    with pytest.raises(ValueError, match="another model"):  # masks of a bigger model
        attach_grad_masks(model, {n: torch.ones(2 * c, dtype=torch.bool) for n, c in qk_shapes(model).items()})


def test_save_load_round_trip(tmp_path):
    masks = build_masks(random_stats(tiny_model("qwen3")), 0.3, "random", seed=3)
    path = tmp_path / "sub" / "masks.safetensors"
    save_masks(path, masks, {"model": "tiny", "ratio": 0.3})
    loaded, meta = load_masks(path)
    assert set(loaded) == set(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert all(m.dtype == torch.bool for m in loaded.values())
    assert meta["model"] == "tiny" and meta["ratio"] == "0.3"
    assert [p.name for p in path.parent.iterdir()] == ["masks.safetensors"]  # no temp file left behind


def test_cli_runs(tmp_path):
    from safetensors.torch import save_file
    model = tiny_model("qwen2")
    stats_path, out = tmp_path / "qk_stats.safetensors", tmp_path / "masks.safetensors"
    save_file(random_stats(model), str(stats_path), metadata={"model": "tiny-qwen2", "stat": "mean_abs",
                                                              "head_dim": "8"})
    cmd = [sys.executable, str(ROOT / "masking.py"), str(stats_path), "--ratio", "0.3", "--strategy", "topk",
           "--per-head", "--out", str(out)]  # head_dim comes from the file's metadata
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "overall share of q/k rows trainable: 0.2500" in res.stdout  # round(0.3 * 8) = 2 of 8 per head
    masks, meta = load_masks(out)
    check_masks(model, masks)
    assert meta["strategy"] == "topk" and meta["head_dim"] == "8"


# ----------------------------------------------------------------------------- the embedded model
def test_embedded_model_one_masked_step(embedded):
    model = copy.deepcopy(embedded[0])  # the fixture is shared by other test files: never train it in place
    for n, p in model.named_parameters():  # only q/k train here: keeps the AdamW step (and the test) cheap
        p.requires_grad_(n.endswith(("q_proj.weight", "k_proj.weight")))
    masks = build_masks(random_stats(model), 0.3, "topk")
    assert len(masks) == 2 * model.config.num_hidden_layers
    name = "model.layers.0.self_attn.k_proj"
    before = model.get_submodule(name).weight.detach().clone()  # (192, 576)
    handles = attach_grad_masks(model, masks)
    opt = torch.optim.AdamW(param_groups(model, masks, 0.1), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        apply_row_weight_decay(opt)
        opt.step()
    finally:
        for h in handles:
            h.remove()
        opt.zero_grad(set_to_none=True)
    after, rows = model.get_submodule(name).weight.detach(), masks[name]
    assert torch.equal(after[~rows], before[~rows]) and not torch.equal(after[rows], before[rows])
