"""Tests for masking.py: row selection, and what rows outside the mask do in real training steps.

Run: .venv/bin/python -m pytest -q tests/test_masking.py   (seconds; tiny models, plus one test on
     the embedded SmolLM2 model)
"""

import copy
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model

from mask_helpers import qk_snapshot, rows_outside_drift
from masking import (SEMANTICS, STRATEGIES, build_masks, check_masks, format_summary, load_masks,
                     mask_grads, mask_summary, masked_params, masked_step, save_masks)
from plumbing.report import mask_overlap

QK = ("q_proj", "k_proj")
HEAD_DIM = 8  # tiny_model: 4 query heads, 2 KV heads, head_dim 8


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
    masks = build_masks(stats, ratio=ratio, strategy=strategy, per_head=False)
    for name, m in masks.items():
        C = stats[name].numel()
        assert m.dtype == torch.bool and m.shape == (C,)
        assert int(m.sum()) == (C if strategy == "all" else round(ratio * C))


@pytest.mark.parametrize("strategy", ["topk", "bottomk", "random"])
def test_row_counts_per_head(strategy):
    stats = {"a.q_proj": torch.rand(4 * 8), "a.k_proj": torch.rand(2 * 8)}  # GQA: fewer k heads
    masks = build_masks(stats, ratio=0.3, strategy=strategy, per_head=True, head_dim=8)
    for m in masks.values():
        assert m.view(-1, 8).sum(1).tolist() == [round(0.3 * 8)] * (m.numel() // 8)  # 2 per head


def test_per_head_is_the_default_and_differs_from_whole_matrix():
    s = torch.tensor([9., 8., 7., 6., 0., 1., 2., 3.])  # head 0 holds the 4 largest values
    default = build_masks({"x.q_proj": s}, ratio=0.5, head_dim=4)["x.q_proj"]
    whole = build_masks({"x.q_proj": s}, ratio=0.5, per_head=False)["x.q_proj"]
    assert default.nonzero().flatten().tolist() == [0, 1, 6, 7]  # top 2 of each head
    assert whole.nonzero().flatten().tolist() == [0, 1, 2, 3]  # top 4 of the matrix


def test_topk_and_bottomk_pick_extremes():
    s = torch.tensor([0.1, 5.0, 3.0, 0.2, 4.0, 0.0, 2.0, 1.0, 6.0, 0.3])  # (10,)
    top = build_masks({"x.q_proj": s}, ratio=0.3, strategy="topk", per_head=False)["x.q_proj"]
    bottom = build_masks({"x.q_proj": s}, ratio=0.3, strategy="bottomk", per_head=False)["x.q_proj"]
    assert top.nonzero().flatten().tolist() == [1, 4, 8]  # values 5, 4, 6
    assert bottom.nonzero().flatten().tolist() == [0, 3, 5]  # values 0.1, 0.2, 0
    # per head (2 heads of 5): the top round(0.3 * 5) = 2 of [0.1 5 3 0.2 4] and of [0 2 1 6 0.3]
    ph = build_masks({"x.q_proj": s}, ratio=0.3, strategy="topk", per_head=True, head_dim=5)
    assert ph["x.q_proj"].nonzero().flatten().tolist() == [1, 4, 6, 8]
    phb = build_masks({"x.q_proj": s}, ratio=0.3, strategy="bottomk", head_dim=5)["x.q_proj"]
    assert phb.nonzero().flatten().tolist() == [0, 3, 5, 9]  # 0.1, 0.2 | 0, 0.3


def test_ties_broken_by_lower_index():
    s = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    top = build_masks({"x.k_proj": s}, 0.5, "topk", per_head=False)["x.k_proj"]
    assert top.nonzero().flatten().tolist() == [1, 2, 3]
    flat = torch.ones(10)
    for strategy in ("topk", "bottomk"):
        m = build_masks({"x.k_proj": flat}, 0.3, strategy, per_head=False)["x.k_proj"]
        assert m.nonzero().flatten().tolist() == [0, 1, 2]


def test_random_reproducible_and_different():
    stats = {f"model.layers.{i}.self_attn.q_proj": torch.rand(64) for i in range(2)}
    a = build_masks(stats, 0.3, "random", per_head=False, seed=1)
    b = build_masks(dict(reversed(list(stats.items()))), 0.3, "random", per_head=False, seed=1)
    c = build_masks(stats, 0.3, "random", per_head=False, seed=2)
    names = sorted(stats)
    assert all(torch.equal(a[n], b[n]) for n in names)  # dict order does not matter
    assert not all(torch.equal(a[n], c[n]) for n in names)
    assert not torch.equal(a[names[0]], a[names[1]])  # other matrix, other rows
    # random ignores the statistic's values (only its shape matters)
    d = build_masks({n: torch.zeros(64) for n in names}, 0.3, "random", per_head=False, seed=1)
    assert all(torch.equal(a[n], d[n]) for n in names)


def test_random_per_step_seed_redraws_rows_per_head():
    stats = {"x.q_proj": torch.rand(64)}
    step1 = build_masks(stats, 0.25, "random", head_dim=8, seed=101)["x.q_proj"]
    step2 = build_masks(stats, 0.25, "random", head_dim=8, seed=102)["x.q_proj"]
    assert not torch.equal(step1, step2)
    assert step1.view(8, 8).sum(1).tolist() == step2.view(8, 8).sum(1).tolist() == [2] * 8


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_range_is_an_error(ratio):
    with pytest.raises(ValueError, match="ratio"):
        build_masks({"x.q_proj": torch.rand(8)}, ratio=ratio)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="strategy"):
        build_masks({"x.q_proj": torch.rand(8)}, strategy="largest")
    with pytest.raises(ValueError, match="strategy"):  # one name for uniform updates: "all"
        build_masks({"x.q_proj": torch.rand(8)}, strategy="none", per_head=False)
    assert STRATEGIES == ("topk", "bottomk", "random", "all") and SEMANTICS == ("frozen", "grad")
    with pytest.raises(ValueError, match="head_dim"):
        build_masks({"x.q_proj": torch.rand(8)}, per_head=True)
    with pytest.raises(ValueError, match="heads of 3"):
        build_masks({"x.q_proj": torch.rand(8)}, per_head=True, head_dim=3)
    with pytest.raises(ValueError, match="NaN"):
        build_masks({"x.q_proj": torch.tensor([1.0, float("nan")])}, per_head=False)


def test_mask_summary_hand_example():
    masks = {"model.layers.0.self_attn.q_proj": torch.tensor([True, False, False, False]),
             "model.layers.0.self_attn.k_proj": torch.tensor([True, True]),
             "model.layers.1.self_attn.q_proj": torch.tensor([False, False, True, True])}
    stats = {"model.layers.0.self_attn.q_proj": torch.tensor([3.0, 1.0, 1.0, 1.0])}
    per_layer, overall = mask_summary(masks, stats)
    layer0 = per_layer["model.layers.0.self_attn"]
    assert layer0 == {"q_proj": 0.25, "k_proj": 1.0, "q_proj mass": 0.5}
    assert per_layer["model.layers.1.self_attn"] == {"q_proj": 0.5}
    assert overall == 5 / 10
    table = format_summary(per_layer, overall)
    assert "overall share of q/k rows trainable: 0.5000" in table and "q_proj mass" in table


def test_mask_overlap_is_jaccard_averaged_over_matrices():
    T, F = True, False
    a = {"q": torch.tensor([T, T, F, F]), "k": torch.tensor([T, F])}
    b = {"q": torch.tensor([F, T, T, F]), "k": torch.tensor([T, F])}
    assert mask_overlap(a, b) == pytest.approx((1 / 3 + 1) / 2)  # q: 1 shared of 3; k: identical
    assert mask_overlap(a, a) == 1.0
    assert mask_overlap({"q": torch.tensor([T, F])}, {"q": torch.tensor([F, T])}) == 0.0
    assert mask_overlap({"q": torch.tensor([F, F])}, {"q": torch.tensor([F, F])}) == 1.0
    with pytest.raises(ValueError, match="only in the first"):
        mask_overlap(a, {"q": b["q"]})
    with pytest.raises(ValueError, match="shapes"):
        mask_overlap({"q": torch.ones(4, dtype=torch.bool)}, {"q": torch.ones(2, dtype=torch.bool)})


def test_rows_outside_drift_hand_example():
    bias = torch.zeros(2)
    before = {"m.q_proj.weight": torch.tensor([[1., 1.], [2., 2.]]), "m.q_proj.bias": bias}
    after = {"m.q_proj.weight": torch.tensor([[9., 1.], [2.5, 2.]]), "m.q_proj.bias": bias}
    masks = {"m.q_proj": torch.tensor([True, False])}  # row 0 may move (by 8), row 1 moved by 0.5
    assert rows_outside_drift(before, after, masks) == 0.5
    assert rows_outside_drift(before, before, masks) == 0.0
    with pytest.raises(ValueError, match="no mask"):
        rows_outside_drift(before, after, {})


# ----------------------------------------------------------------------------- training with masks
def zero_grad_hooks(model, masks) -> list:
    """The naive recipe as gradient hooks: zero the rows outside the mask, nothing else."""
    def hook(rows):
        return lambda g: g.masked_fill(~rows.reshape(-1, *[1] * (g.dim() - 1)), 0.0)
    return [p.register_hook(hook(rows)) for _, p, rows in masked_params(model, masks)]


def backward_batch(model, data_step) -> None:
    """Accumulate the gradients of a step's micro-batches under bf16 autocast."""
    for ids in data_step:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        (loss / len(data_step)).backward()


def run_steps(model, masks, mode: str, steps: int = 5, lr: float = 1e-2, wd: float = 0.1,
              clip: float = 0.1, impl: str = "for-loop") -> list[float]:
    """`steps` AdamW steps of 2 accumulated micro-batches under bf16 autocast with clipping.

    mode "ours": mask_grads + masked_step(frozen). "restore": the brute-force reference (gradient
    hooks, plain AdamW on everything, then copy the parameter rows back). "zero_only": gradient
    hooks + plain AdamW (the naive recipe). "plain": no masks. impl: "for-loop", "foreach", "fused".
    Returns the pre-clip grad norms.
    """
    data = torch.randint(3, 128, (steps, 2, 2, 12), generator=torch.Generator().manual_seed(0))
    handles = zero_grad_hooks(model, masks) if mode in ("restore", "zero_only") else []
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, foreach=impl == "foreach",
                            fused=impl == "fused")
    frozen = [(p, rows, p.detach().clone()) for _, p, rows in masked_params(model, masks)]
    norms = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        backward_batch(model, data[step])
        if mode == "ours":
            mask_grads(model, masks)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        if mode == "ours":
            assert masked_step(opt, model, masks, "frozen") == 0.0
        else:
            opt.step()
        if mode == "restore":
            with torch.no_grad():
                for p, rows, init in frozen:
                    p[~rows] = init[~rows]
    for h in handles:
        h.remove()
    return norms


def masked_model(kind: str, ratio: float = 0.3, strategy: str = "topk", dtype=torch.float32):
    """A tiny model with random (non-zero) q/k biases where it has them, plus per-head masks."""
    model = tiny_model(kind).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.bias", "k_proj.bias")):  # zero biases would hide decay
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model, build_masks(random_stats(model), ratio, strategy, head_dim=HEAD_DIM)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_frozen_rows_bit_identical_others_train(kind):
    model, masks = masked_model(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = run_steps(model, masks, "ours")
    assert max(norms) > 0.1  # clipping really was active
    checked = set()
    for name, p, rows in masked_params(model, masks):
        assert torch.equal(p[~rows], before[name][~rows]), f"{name}: frozen rows moved"
        changed = (p != before[name]).reshape(p.shape[0], -1).any(1)  # (C,)
        assert changed[rows].all(), f"{name}: a trainable row did not change"
        checked.add(name)
    if kind == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in checked)
        assert any(n.endswith("k_proj.bias") for n in checked)
    for n, p in model.named_parameters():
        if n not in checked:
            assert not torch.equal(p, before[n]), f"{n} did not train"


# bf16 parameters need a larger decay: a relative change of lr * wd = 1e-3 is below bf16's
# resolution (2^-8), so with wd 0.1 the decay would round away and the test could not tell a
# missing decay from a correct one.
@pytest.mark.parametrize("kind,impl,dtype,wd", [("llama", "for-loop", torch.float32, 0.1),
                                                ("qwen2", "for-loop", torch.float32, 0.1),
                                                ("qwen2", "foreach", torch.float32, 0.1),
                                                ("qwen3", "fused", torch.float32, 0.1),
                                                ("llama", "for-loop", torch.bfloat16, 1.0)])
def test_trainable_rows_match_reference_adamw(kind, impl, dtype, wd):
    """Bit equality of EVERY parameter with the brute-force reference under a static mask."""
    ours, masks = masked_model(kind, dtype=dtype)
    ref, _ = masked_model(kind, dtype=dtype)
    run_steps(ours, masks, "ours", wd=wd, impl=impl)
    run_steps(ref, masks, "restore", wd=wd, impl=impl)
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), f"{n} differs from the reference AdamW run"


def test_zeroing_gradients_alone_is_not_enough():
    """Why "frozen" copies rows back: with weight decay, AdamW moves rows whose grad is zero."""
    model, masks = masked_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_steps(model, masks, "zero_only")
    name, p, rows = masked_params(model, masks)[0]
    assert not torch.equal(p[~rows], before[name][~rows])
    torch.testing.assert_close(p[~rows], before[name][~rows] * (1 - 1e-2 * 0.1) ** 5)  # pure decay


def test_all_strategy_is_plain_adamw():
    ours, masks = masked_model("qwen2", strategy="all")
    ref, _ = masked_model("qwen2", strategy="all")
    assert masked_params(ours, masks) == []
    run_steps(ours, masks, "ours")
    run_steps(ref, masks, "plain")
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))


# ----------------------------------------------------------------------------- masks that change
def per_step_training(kind: str, semantics: str, wd: float, optimizer: str = "adamw"):
    """3 steps, a new random per-head mask each step (seeds 1, 2, 3). Yields, after every step,
    (step, masks, params before, params after, state before, state after, returned drift)."""
    model, _ = masked_model(kind)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=wd)
    else:  # SGD with momentum: a different optimizer with element-wise state
        opt = torch.optim.SGD(model.parameters(), lr=1e-1, momentum=0.9, weight_decay=wd)
    data = torch.randint(3, 128, (3, 2, 2, 12), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        masks = build_masks(random_stats(model), 0.25, "random", head_dim=HEAD_DIM, seed=step + 1)
        opt.zero_grad(set_to_none=True)
        backward_batch(model, data[step])
        mask_grads(model, masks)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = qk_snapshot(model, masks)
        state_before = {n: {k: t.clone() for k, t in opt.state[p].items()}
                        for n, p, _ in masked_params(model, masks)}
        drift = masked_step(opt, model, masks, semantics)
        assert drift == rows_outside_drift(before, model, masks)  # the model itself as "after"
        state_after = {n: dict(opt.state[p]) for n, p, _ in masked_params(model, masks)}
        yield step, masks, before, qk_snapshot(model, masks), state_before, state_after, drift


@pytest.mark.parametrize("kind,optimizer", [("llama", "adamw"), ("qwen2", "adamw"),
                                            ("qwen2", "sgd")])
def test_frozen_with_per_step_masks_keeps_rows_and_optimizer_state(kind, optimizer):
    """Rows outside THIS step's mask: parameter and moments bit-identical, although earlier steps
    (other masks) left non-zero moments there and weight decay is 0.1."""
    moments_seen = 0
    for step, masks, before, after, st_before, st_after, drift in per_step_training(
            kind, "frozen", wd=0.1, optimizer=optimizer):
        assert drift == 0.0 and rows_outside_drift(before, after, masks) == 0.0
        for name, b in before.items():
            rows = masks[name.rsplit(".", 1)[0]]
            assert torch.equal(after[name][~rows], b[~rows]), (step, name)
            assert (after[name][rows] != b[rows]).reshape(int(rows.sum()), -1).any(1).all()
            for key, t in st_before[name].items():
                if t.shape != b.shape:
                    continue  # Adam's scalar step counter
                assert torch.equal(st_after[name][key][~rows], t[~rows]), (step, name, key)
                moments_seen += int(step > 0 and bool(t[~rows].ne(0).any()))
    assert moments_seen > 0  # the frozen rows really carried non-zero moments from earlier steps


def test_grad_semantics_moves_rows_selected_earlier():
    """"grad": only the gradient is masked. Without weight decay, rows never selected stay put
    (Adam's moments there are 0) and rows selected at an earlier step keep moving (momentum)."""
    ever = {}
    drifts = []
    for step, masks, before, after, *_, drift in per_step_training("llama", "grad", wd=0.0):
        drifts.append(drift)
        assert drift == rows_outside_drift(before, after, masks)
        for name, b in before.items():
            rows = masks[name.rsplit(".", 1)[0]]
            earlier = ever.get(name, torch.zeros_like(rows))
            never = ~rows & ~earlier
            assert torch.equal(after[name][never], b[never]), (step, name)
            moved = (after[name] != b).reshape(len(rows), -1).any(1)  # (C,)
            assert moved[~rows & earlier].all(), (step, name)
            ever[name] = earlier | rows
    assert drifts[0] == 0.0 and drifts[1] > 0 and drifts[2] > 0
    decayed = [d for *_, d in per_step_training("llama", "grad", wd=0.1)]
    assert all(d > 0 for d in decayed)  # with decay even the first step moves the rows outside


def test_masked_step_refuses_unmasked_gradients():
    model, masks = masked_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 128, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="call mask_grads"):
        masked_step(opt, model, masks)
    with pytest.raises(ValueError, match="semantics"):
        masked_step(opt, model, masks, "none")


def test_mismatched_masks_are_refused():
    model = tiny_model("llama")
    masks = build_masks(random_stats(model), 0.3, head_dim=HEAD_DIM)
    check_masks(model, masks)  # the right masks pass
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"q_proj.*\(16,\).*\(32, 32\)"):  # both shapes named
        check_masks(model, {**masks, name: torch.ones(16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="model.layers.7.self_attn.q_proj"):
        check_masks(model, {**masks, "model.layers.7.self_attn.q_proj": torch.ones(32).bool()})
    with pytest.raises(ValueError, match="dtype"):
        check_masks(model, {**masks, name: torch.ones(32)})
    with pytest.raises(ValueError, match="no mask for 1 q/k"):
        check_masks(model, {k: v for k, v in masks.items() if k != name})
    with pytest.raises(ValueError, match="another model"):  # masks of a bigger model
        mask_grads(model, {n: torch.ones(2 * c).bool() for n, c in qk_shapes(model).items()})


def test_save_load_round_trip(tmp_path):
    masks = build_masks(random_stats(tiny_model("qwen3")), 0.3, "random", head_dim=HEAD_DIM, seed=3)
    path = tmp_path / "sub" / "masks.safetensors"
    save_masks(path, masks, {"model": "tiny", "ratio": 0.3})
    loaded, meta = load_masks(path)
    assert set(loaded) == set(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert all(m.dtype == torch.bool for m in loaded.values())
    assert meta["model"] == "tiny" and meta["ratio"] == "0.3"
    assert [p.name for p in path.parent.iterdir()] == ["masks.safetensors"]  # no temp file left


def test_cli_runs(tmp_path):
    from safetensors.torch import save_file
    model = tiny_model("qwen2")
    stats_path, out = tmp_path / "qk_stats.safetensors", tmp_path / "masks.safetensors"
    meta = {"model": "tiny-qwen2", "stat": "mean_abs", "head_dim": "8"}
    save_file(random_stats(model), str(stats_path), metadata=meta)
    cmd = [sys.executable, str(ROOT / "masking.py"), str(stats_path), "--ratio", "0.3",
           "--strategy", "topk", "--per-head", "--out", str(out)]  # head_dim: the metadata
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "overall share of q/k rows trainable: 0.2500" in res.stdout  # round(0.3 * 8) = 2 of 8
    masks, meta = load_masks(out)
    check_masks(model, masks)
    assert meta["strategy"] == "topk" and meta["head_dim"] == "8"


# ----------------------------------------------------------------------------- the embedded model
def test_embedded_model_one_masked_step(embedded):
    model = copy.deepcopy(embedded[0])  # the fixture is shared by other test files: never train it
    for n, p in model.named_parameters():  # only q/k train here: keeps the AdamW step cheap
        p.requires_grad_(n.endswith(("q_proj.weight", "k_proj.weight")))
    masks = build_masks(random_stats(model), 0.3, "topk", head_dim=model.config.head_dim)
    assert len(masks) == 2 * model.config.num_hidden_layers
    name = "model.layers.0.self_attn.k_proj"
    assert masks[name].view(3, 64).sum(1).tolist() == [19, 19, 19]  # 3 KV heads, round(0.3 * 64)
    before = model.get_submodule(name).weight.detach().clone()  # (192, 576)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    mask_grads(model, masks)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert masked_step(opt, model, masks) == 0.0
    after, rows = model.get_submodule(name).weight.detach(), masks[name]
    assert torch.equal(after[~rows], before[~rows]) and not torch.equal(after[rows], before[rows])
