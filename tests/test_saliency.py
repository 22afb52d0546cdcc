"""Tests for saliency.py: the streaming q/k statistics, their files and the concentration analysis.

Run: .venv/bin/python -m pytest -q tests/test_saliency.py      (~15 s; the last test loads the embedded model)
"""

import math

import pytest
import torch

from conftest import tiny_model
from saliency import (collect_qk_stats, concentration, finalize, format_table, load_stats, new_acc,
                      position_ids_from_mask, qk_modules, save_stats, update_stats)

KINDS = ("llama", "qwen2", "qwen3")


def _batch(seed=0, B=2, T=12, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, vocab, (B, T), generator=g),  # (B, T), ids 0-2 are special in the tiny config
            "attention_mask": torch.ones(B, T, dtype=torch.long)}


def _hooks_left(model):
    return sum(len(m._forward_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- the pure reduction on hand tensors

def test_stats_on_hand_tensor_with_mask():
    x = torch.tensor([[[1., -2.], [3., 4.], [-5., 6.]]])  # (B=1, T=3, C=2); the last token is padding
    mask = torch.tensor([[1, 1, 0]])
    # mean_abs: (|1| + |3|) / 2 = 2, (|-2| + |4|) / 2 = 3 ; the padded -5 and 6 are ignored
    assert torch.equal(finalize(update_stats(new_acc(2), x, mask, "mean_abs"), "mean_abs"), torch.tensor([2., 3.]))
    # l2: sqrt(1 + 9) = sqrt 10, sqrt(4 + 16) = sqrt 20
    l2 = finalize(update_stats(new_acc(2), x, mask, "l2"), "l2")
    assert torch.allclose(l2, torch.tensor([math.sqrt(10), math.sqrt(20)]))
    # max_abs: max(1, 3) = 3, max(2, 4) = 4 (6 would win if padding counted)
    assert torch.equal(finalize(update_stats(new_acc(2), x, mask, "max_abs"), "max_abs"), torch.tensor([3., 4.]))


def test_streaming_equals_one_pass_and_input_untouched():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 3, generator=g), torch.randn(3, 5, 3, generator=g)
    ma, mb = torch.rand(2, 5, generator=g) > 0.3, torch.rand(3, 5, generator=g) > 0.3
    for stat in ("mean_abs", "l2", "max_abs"):
        acc0 = new_acc(3)
        streamed = finalize(update_stats(update_stats(acc0, a, ma, stat), b, mb, stat), stat)
        once = finalize(update_stats(new_acc(3), torch.cat([a, b]), torch.cat([ma, mb]), stat), stat)
        assert torch.allclose(streamed, once)
        assert acc0["tokens"] == 0 and not acc0["value"].any()  # pure: the accumulator passed in is not changed


def test_bf16_input_accumulates_in_fp32():
    x = torch.full((1, 4, 2), 3.0, dtype=torch.bfloat16)
    acc = update_stats(new_acc(2), x, None, "l2")
    assert acc["value"].dtype == torch.float32 and acc["tokens"] == 4
    assert torch.allclose(finalize(acc, "l2"), torch.tensor([6., 6.]))  # sqrt(4 * 9)


def test_errors_on_unknown_stat_no_tokens_and_bad_mask():
    with pytest.raises(ValueError, match="unknown stat"):
        update_stats(new_acc(2), torch.ones(1, 2, 2), None, "median")
    with pytest.raises(ValueError, match="no non-padding tokens"):
        finalize(update_stats(new_acc(2), torch.ones(1, 2, 2), torch.zeros(1, 2), "mean_abs"))
    with pytest.raises(ValueError, match="attention mask"):
        update_stats(new_acc(2), torch.ones(1, 2, 2), torch.ones(1, 3), "mean_abs")


def test_position_ids_from_mask():
    assert position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).tolist() == \
        [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# ----------------------------------------------------------------------------- hooks on tiny models

@pytest.mark.parametrize("kind", KINDS)
def test_hook_matches_hand_computation(kind):
    """The statistic of every q/k equals one computed by hand from the projection's input: x @ W.T (+ b)."""
    model = tiny_model(kind)
    batch = _batch()
    batch["attention_mask"][0, :3] = 0  # some padding in row 0 (left padding) so the mask matters
    inputs, handles = {}, []
    for name, m in qk_modules(model).items():  # capture each projection's INPUT with our own pre-hook
        handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0])))
    try:
        got = {s: collect_qk_stats(model, [batch], stat=s) for s in ("mean_abs", "l2", "max_abs")}
    finally:
        for h in handles:
            h.remove()
    assert len(got["mean_abs"]) == 2 * model.config.num_hidden_layers
    keep = batch["attention_mask"].bool()  # (B, T)
    for name, m in qk_modules(model).items():
        y = inputs[name] @ m.weight.T  # (B, T, C)
        if m.bias is not None:
            assert kind == "qwen2"
            y = y + m.bias
        y = y[keep]  # (N, C) real tokens only
        assert torch.allclose(got["mean_abs"][name], y.abs().mean(0), atol=1e-6), name
        assert torch.allclose(got["l2"][name], y.norm(dim=0), atol=1e-5), name
        assert torch.allclose(got["max_abs"][name], y.abs().amax(0), atol=1e-6), name
        assert got["mean_abs"][name].dtype == torch.float32 and got["mean_abs"][name].shape == (m.out_features,)
    assert _hooks_left(model) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_padding_is_excluded(kind):
    """Adding extra left padding (any token ids there) changes no statistic."""
    model = tiny_model(kind)
    plain = _batch(B=2, T=10)
    pad = 5
    padded = {"input_ids": torch.cat([torch.full((2, pad), 7), plain["input_ids"]], dim=1),  # (B, pad + T)
              "attention_mask": torch.cat([torch.zeros(2, pad, dtype=torch.long), plain["attention_mask"]], dim=1)}
    for stat in ("mean_abs", "max_abs"):
        a = collect_qk_stats(model, [plain], stat=stat)
        b = collect_qk_stats(model, [padded], stat=stat)
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5), (stat, name)


def test_bf16_autocast_gives_fp32_close_to_fp32_run():
    model, batch = tiny_model("llama"), _batch()
    ref = collect_qk_stats(model, [batch])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = collect_qk_stats(model, [batch])
    for name in ref:
        assert low[name].dtype == torch.float32
        assert torch.allclose(low[name], ref[name], rtol=5e-2, atol=1e-3), name


def test_hooks_removed_after_exception():
    model = tiny_model("llama")

    def batches():
        yield _batch()
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        collect_qk_stats(model, batches())
    assert _hooks_left(model) == 0
    bad = _batch()
    bad["attention_mask"] = bad["attention_mask"][:, :-1]  # wrong shape: the model or the hook raises
    with pytest.raises(Exception):
        collect_qk_stats(model, [bad])
    assert _hooks_left(model) == 0


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen2")
    stats = collect_qk_stats(model, [_batch()])
    meta = {"model": "tiny-qwen2", "stat": "mean_abs", "num_samples": 2, "num_tokens": 24, "head_dim": 8, "seq_len": 12}
    path = tmp_path / "sub" / "qk.safetensors"
    save_stats(path, stats, meta)
    got, got_meta = load_stats(path, model)
    assert sorted(got) == sorted(stats)
    layers = [int(n.split(".")[2]) for n in got]
    assert layers == sorted(layers)  # layer order (2 before 10), not alphabetical
    assert all(torch.equal(got[n], stats[n]) for n in stats)
    assert got_meta == {k: str(v) for k, v in meta.items()}  # metadata comes back as strings
    assert [p.name for p in path.parent.iterdir()] == ["qk.safetensors"]  # no temp file left behind


def test_load_refuses_mismatched_model(tmp_path):
    model = tiny_model("llama")  # q_proj out 32, k_proj out 16
    stats = collect_qk_stats(model, [_batch()])
    stats["model.layers.1.self_attn.k_proj"] = torch.ones(24)
    path = tmp_path / "qk.safetensors"
    save_stats(path, stats, {"stat": "mean_abs"})
    with pytest.raises(ValueError) as e:
        load_stats(path, model)
    assert "model.layers.1.self_attn.k_proj" in str(e.value)
    assert "(24,)" in str(e.value) and "(16,)" in str(e.value)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.q_proj: missing .* \(32,\)"):
        load_stats(path, tiny_model("llama", layers=3))  # a third layer the file knows nothing about


# ----------------------------------------------------------------------------- analysis

def test_concentration_hand_example():
    stats = {"model.layers.0.self_attn.q_proj": torch.tensor([1., 1., 1., 7.]),
             "model.layers.0.self_attn.k_proj": torch.tensor([5., 1., 1., 1., 1., 1., 1., 1.])}
    per, metrics = concentration(stats, ratio=0.25, head_dim=4)
    q, k = per["model.layers.0.self_attn.q_proj"], per["model.layers.0.self_attn.k_proj"]
    assert q["top_share"] == pytest.approx(0.7)               # 7 / (1 + 1 + 1 + 7)
    assert q["dim_hist"].tolist() == [0, 0, 0, 1]             # the top channel is c = 3, dim 3
    assert q["mean_freq_index"] == 1 and q["low_freq_share"] == 1  # 3 mod 2 = 1: the lower of the two frequencies
    # k: two heads of dim 4, round(0.25 * 8) = 2 top channels: c = 0 (value 5) and a tie at 1 -> share 6/12
    assert k["top_share"] == pytest.approx(0.5)
    assert metrics["q_top_share"] == pytest.approx(0.7) and metrics["k_top_share"] == pytest.approx(0.5)
    table = format_table(per, metrics, 0.25, 4).splitlines()
    assert len(table) == 5 and table[1].split()[:4] == ["0", "0.700", "0.500", "1.00"]  # header, layer 0, mean, 2 notes
    flat, _ = concentration({"a.q_proj": torch.ones(64)}, ratio=0.3, head_dim=8)
    assert flat["a.q_proj"]["top_share"] == pytest.approx(19 / 64)  # round(0.3 * 64) = 19 equal channels
    with pytest.raises(ValueError):
        concentration(stats, ratio=0, head_dim=4)


# ----------------------------------------------------------------------------- the embedded model

def test_embedded_model_shapes(embedded, tmp_path):
    model, tokenizer = embedded
    ids = tokenizer("The grass is green. The sky is blue. The sun is yellow. Here we go.", return_tensors="pt")
    stats = collect_qk_stats(model, [{"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}])
    assert len(stats) == 60  # 30 layers x (q, k)
    sizes = [t.numel() for n, t in stats.items()]
    assert sizes.count(576) == 30 and sizes.count(192) == 30  # 9 heads x 64, 3 KV heads x 64
    assert all(stats[n].numel() == 576 for n in stats if n.endswith("q_proj"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() and (t > 0).all() for t in stats.values())
    save_stats(tmp_path / "qk.safetensors", stats, {"model": "smollm2-135m"})
    got, meta = load_stats(tmp_path / "qk.safetensors", model)  # the right model is accepted
    layers = [int(n.split(".")[2]) for n in got]
    assert layers == sorted(layers) and meta == {"model": "smollm2-135m"}  # layer 2 before 10, not alphabetical
    with pytest.raises(ValueError, match="shape"):
        load_stats(tmp_path / "qk.safetensors", tiny_model("llama", layers=30))
