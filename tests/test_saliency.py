"""Tests for saliency.py: streaming q/k statistics, the per-step prefill collector, files, analysis.

Run: .venv/bin/python -m pytest -q tests/test_saliency.py   (seconds; the last test loads SmolLM2)
"""

import doctest
import math

import pytest
import torch

import saliency
from conftest import tiny_model
from experiments import concentration as analysis
from experiments.concentration import format_table
from plumbing.common import positions_from_mask, qk_modules
from saliency import (STATS, collect_qk_stats, concentration, finalize, finalize_state,
                      load_stats, new_acc, prefill_collector, qk_hooks, save_stats, update_stats)

KINDS = ("llama", "qwen2", "qwen3")


def _batch(seed=0, B=2, T=12, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, vocab, (B, T), generator=g),  # (B, T); 0-2 are special
            "attention_mask": torch.ones(B, T, dtype=torch.long)}


def _hooks_left(model):
    return sum(len(m._forward_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- the pure reduction

def test_docstring_worked_example_seq_l2_with_padding():
    """update_stats' docstring example: per-sequence norms [5, 1] and [6, 2] -> mean [5.5, 1.5]."""
    finder = doctest.DocTestFinder()
    (test,) = finder.find(saliency.update_stats, "update_stats", globs=vars(saliency))
    result = doctest.DocTestRunner().run(test)
    assert result.attempted >= 5 and result.failed == 0


def test_stats_on_hand_tensor_with_mask():
    x = torch.tensor([[[1., -2.], [3., 4.], [-5., 6.]]])  # (B=1, T=3, C=2); the last is padding
    mask = torch.tensor([[1, 1, 0]])
    # mean_abs: (|1| + |3|) / 2 = 2, (|-2| + |4|) / 2 = 3 ; the padded -5 and 6 are ignored
    mean_abs = finalize(update_stats(new_acc(2), x, mask, "mean_abs"), "mean_abs")
    assert torch.equal(mean_abs, torch.tensor([2., 3.]))
    # l2: sqrt(1 + 9) = sqrt 10, sqrt(4 + 16) = sqrt 20
    l2 = finalize(update_stats(new_acc(2), x, mask, "l2"), "l2")
    assert torch.allclose(l2, torch.tensor([math.sqrt(10), math.sqrt(20)]))
    # max_abs: max(1, 3) = 3, max(2, 4) = 4 (6 would win if padding counted)
    max_abs = finalize(update_stats(new_acc(2), x, mask, "max_abs"), "max_abs")
    assert torch.equal(max_abs, torch.tensor([3., 4.]))


def test_seq_l2_averages_per_sequence_norms_and_skips_empty_sequences():
    # sequence 0: norms over its 2 tokens [5, 13]; sequence 1: all padding (inf must not leak);
    # sequence 2: one real token [1, 1]. Mean over the 2 sequences with a real token: [3, 7].
    x = torch.tensor([[[3., 5.], [4., 12.]],
                      [[float("inf"), 1.], [1., 1.]],
                      [[0., 0.], [1., 1.]]])  # (B=3, T=2, C=2)
    mask = torch.tensor([[1, 1], [0, 0], [0, 1]])
    acc = update_stats(new_acc(2), x, mask, "seq_l2")
    assert acc["sequences"] == 2 and acc["tokens"] == 3
    assert torch.equal(finalize(acc, "seq_l2"), torch.tensor([3., 7.]))
    # the pooled l2 is a different number: sqrt(9 + 16 + 1) and sqrt(25 + 144 + 1)
    pooled = finalize(update_stats(new_acc(2), x, mask, "l2"), "l2")
    assert torch.allclose(pooled, torch.tensor([26., 170.]).sqrt())


def test_streaming_equals_one_pass_and_input_untouched():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 3, generator=g), torch.randn(3, 5, 3, generator=g)
    ma, mb = torch.rand(2, 5, generator=g) > 0.3, torch.rand(3, 5, generator=g) > 0.3
    for stat in STATS:
        acc0 = new_acc(3)
        streamed = finalize(update_stats(update_stats(acc0, a, ma, stat), b, mb, stat), stat)
        both = update_stats(new_acc(3), torch.cat([a, b]), torch.cat([ma, mb]), stat)
        assert torch.allclose(streamed, finalize(both, stat))
        assert acc0["tokens"] == 0 and not acc0["value"].any()  # pure: the input is not changed


def test_bf16_input_accumulates_in_fp32():
    x = torch.full((1, 4, 2), 3.0, dtype=torch.bfloat16)
    acc = update_stats(new_acc(2), x, None, "l2")
    assert acc["value"].dtype == torch.float32 and acc["tokens"] == 4
    assert torch.allclose(finalize(acc, "l2"), torch.tensor([6., 6.]))  # sqrt(4 * 9)


def test_errors_on_unknown_stat_no_tokens_and_bad_mask():
    with pytest.raises(ValueError, match="unknown stat"):
        update_stats(new_acc(2), torch.ones(1, 2, 2), None, "median")
    empty = update_stats(new_acc(2), torch.ones(1, 2, 2), torch.zeros(1, 2), "mean_abs")
    with pytest.raises(ValueError, match="no non-padding tokens"):
        finalize(empty, "mean_abs")
    with pytest.raises(ValueError, match="attention mask"):
        update_stats(new_acc(2), torch.ones(1, 2, 2), torch.ones(1, 3), "mean_abs")


def test_seq_l2_is_the_default_statistic():
    assert STATS[0] == "seq_l2" == saliency.DEFAULT_STAT
    x = torch.tensor([[[3.], [4.]], [[1.], [0.]]])  # (B=2, T=2, C=1): norms 5 and 1
    assert finalize(update_stats(new_acc(1), x, None)).tolist() == [3.0]


def test_position_ids_from_mask():
    assert positions_from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).tolist() == \
        [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# ----------------------------------------------------------------------------- hooks on tiny models

def _capture_inputs(model):
    """Our own pre-hooks that record each q/k projection's INPUT; returns (inputs dict, handles)."""
    inputs, handles = {}, []
    for name, m in qk_modules(model).items():
        def pre(mod, args, name=name):
            inputs[name] = args[0]
        handles.append(m.register_forward_pre_hook(pre))
    return inputs, handles


@pytest.mark.parametrize("kind", KINDS)
def test_hook_matches_hand_computation(kind):
    """Every statistic of every q/k equals one computed by hand from the input: x @ W.T (+ b)."""
    model = tiny_model(kind)
    batch = _batch()
    batch["attention_mask"][0, :3] = 0  # some left padding in row 0 so the mask matters
    inputs, handles = _capture_inputs(model)
    try:
        got = {s: collect_qk_stats(model, [batch], stat=s) for s in STATS}
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
        per_seq = torch.stack([y[i][keep[i]].norm(dim=0) for i in range(len(y))])  # (B, C)
        assert torch.allclose(got["seq_l2"][name], per_seq.mean(0), atol=1e-5), name
        y = y[keep]  # (N, C) real tokens only
        assert torch.allclose(got["mean_abs"][name], y.abs().mean(0), atol=1e-6), name
        assert torch.allclose(got["l2"][name], y.norm(dim=0), atol=1e-5), name
        assert torch.allclose(got["max_abs"][name], y.abs().amax(0), atol=1e-6), name
        assert got["mean_abs"][name].dtype == torch.float32
        assert got["mean_abs"][name].shape == (m.out_features,)
    assert _hooks_left(model) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_padding_is_excluded(kind):
    """Adding extra left padding (any token ids there) changes no statistic."""
    model = tiny_model(kind)
    plain = _batch(B=2, T=10)
    pad = 5
    pad_ids, pad_mask = torch.full((2, pad), 7), torch.zeros(2, pad, dtype=torch.long)
    padded = {"input_ids": torch.cat([pad_ids, plain["input_ids"]], dim=1),  # (B, pad + T)
              "attention_mask": torch.cat([pad_mask, plain["attention_mask"]], dim=1)}
    for stat in ("seq_l2", "mean_abs", "max_abs"):
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
    bad["attention_mask"] = bad["attention_mask"][:, :-1]  # wrong shape: the model/hook raises
    with pytest.raises(Exception):
        collect_qk_stats(model, [bad])
    assert _hooks_left(model) == 0


# ---------------------------------------------------------------------- per-step prefill collector

def _prefill(model, ids, mask):
    """As rollout does: the decoder alone, over the prompt minus its last token."""
    model.get_decoder()(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                        position_ids=positions_from_mask(mask)[:, :-1], use_cache=False)


@pytest.mark.parametrize("kind", ("llama", "qwen2"))
def test_prefill_collector_accumulates_over_calls_and_only_inside_the_hook(kind):
    model = tiny_model(kind)
    a, b = _batch(seed=1, B=2, T=9), _batch(seed=2, B=3, T=7)
    b["attention_mask"][1, :4] = 0  # a left-padded prompt in the second generation batch
    hook, state = prefill_collector(model)
    with torch.no_grad():
        for batch in (a, b):  # two generation batches of one step (DAPO)
            with hook(batch["attention_mask"][:, :-1]):
                assert _hooks_left(model) == 2 * model.config.num_hidden_layers
                _prefill(model, batch["input_ids"], batch["attention_mask"])
            assert _hooks_left(model) == 0
            model(input_ids=batch["input_ids"])  # outside the hook: not counted
    got = finalize_state(state)
    # the same statistic from the calibration path over the two prefixes (prompt minus last token)
    calib = [{"input_ids": x["input_ids"][:, :-1], "attention_mask": x["attention_mask"][:, :-1]}
             for x in (a, b)]
    want = collect_qk_stats(model, calib, stat="seq_l2")
    name = next(iter(got))
    assert state["accs"][name]["sequences"] == 5 and state["mask"] is None
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-5), n


def test_prefill_hook_removes_hooks_on_error_and_states_do_not_mix():
    model = tiny_model("llama")
    hook, state = prefill_collector(model, "mean_abs")
    with pytest.raises(RuntimeError, match="boom"):
        with hook(torch.ones(1, 4)):
            raise RuntimeError("boom")
    assert _hooks_left(model) == 0 and state["mask"] is None
    with pytest.raises(ValueError, match="accumulates 'mean_abs'"):
        with qk_hooks(model, "seq_l2", state):
            pass
    with pytest.raises(ValueError, match="unknown stat"):
        prefill_collector(model, "median")


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen2")
    stats = collect_qk_stats(model, [_batch()])
    meta = {"model": "tiny-qwen2", "stat": "mean_abs", "num_samples": 2, "num_tokens": 24,
            "head_dim": 8, "seq_len": 12}
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
    missing = r"model\.layers\.2\.self_attn\.q_proj: missing .* \(32,\)"
    with pytest.raises(ValueError, match=missing):
        load_stats(path, tiny_model("llama", layers=3))  # a third layer the file does not know


# ----------------------------------------------------------------------------- analysis

def test_concentration_hand_example():
    stats = {"model.layers.0.self_attn.q_proj": torch.tensor([1., 1., 1., 7.]),
             "model.layers.0.self_attn.k_proj": torch.tensor([5., 1., 1., 1., 1., 1., 1., 1.])}
    per, metrics = concentration(stats, ratio=0.25, head_dim=4)
    q, k = per["model.layers.0.self_attn.q_proj"], per["model.layers.0.self_attn.k_proj"]
    assert q["top_share"] == pytest.approx(0.7)  # 7 / (1 + 1 + 1 + 7)
    assert q["dim_hist"].tolist() == [0, 0, 0, 1]  # the top channel is c = 3, dim 3
    assert q["mean_freq_index"] == 1 and q["low_freq_share"] == 1  # 3 mod 2 = 1: lower frequency
    # k: two heads of dim 4, one top channel each: c = 0 (value 5) and c = 4 (a tie) -> share 6/12
    assert k["top_share"] == pytest.approx(0.5)
    assert metrics["q_top_share"] == pytest.approx(0.7)
    assert metrics["k_top_share"] == pytest.approx(0.5)
    table = format_table(per, metrics, 0.25, 4).splitlines()
    # header, layer 0, mean, 2 notes
    assert len(table) == 5 and table[1].split()[:4] == ["0", "0.700", "0.500", "1.00"]
    flat, _ = concentration({"a.q_proj": torch.ones(64)}, ratio=0.3, head_dim=8, per_head=False)
    assert flat["a.q_proj"]["top_share"] == pytest.approx(19 / 64)  # round(0.3 * 64) = 19 channels
    with pytest.raises(ValueError):
        concentration(stats, ratio=0, head_dim=4)


def test_concentration_per_head_keeps_the_masks_count():
    s = torch.tensor([9., 8., 7., 1., 1., 1., 1., 2.])  # 2 heads of 4; global top 2: head 0
    per_head, _ = concentration({"a.q_proj": s}, ratio=0.25, head_dim=4)
    whole, _ = concentration({"a.q_proj": s}, ratio=0.25, head_dim=4, per_head=False)
    assert per_head["a.q_proj"]["top_share"] == pytest.approx((9 + 2) / 30)  # one channel per head
    assert whole["a.q_proj"]["top_share"] == pytest.approx((9 + 8) / 30)


def test_the_table_and_heatmaps_come_from_a_saved_statistics_file(tmp_path, capsys):
    # saliency.py writes the data; experiments/concentration.py prints its table and draws it
    stats = {f"model.layers.{i}.self_attn.{s}": torch.rand(16, generator=torch.Generator()
                                                            .manual_seed(i))
             for i in range(2) for s in ("q_proj", "k_proj")}
    save_stats(tmp_path / "qk.safetensors", stats, {"model": "tiny", "stat": "seq_l2",
                                                    "num_tokens": 64, "head_dim": 8})
    per, metrics = analysis.main([str(tmp_path / "qk.safetensors"), "--ratio", "0.25",
                                  "--plot", str(tmp_path / "qk.png")])
    table = capsys.readouterr().out
    assert format_table(per, metrics, 0.25, 8) in table and "q top25%" in table
    assert (tmp_path / "qk.png").stat().st_size > 10_000
    assert metrics == concentration(stats, ratio=0.25, head_dim=8)[1]


# ----------------------------------------------------------------------------- the embedded model

def test_embedded_model_shapes(embedded, tmp_path):
    model, tokenizer = embedded
    text = "The grass is green. The sky is blue. The sun is yellow. Here we go."
    ids = tokenizer(text, return_tensors="pt")
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    stats = collect_qk_stats(model, [batch])
    assert len(stats) == 60  # 30 layers x (q, k)
    sizes = [t.numel() for n, t in stats.items()]
    assert sizes.count(576) == 30 and sizes.count(192) == 30  # 9 heads x 64, 3 KV heads x 64
    assert all(stats[n].numel() == 576 for n in stats if n.endswith("q_proj"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() and (t > 0).all()
               for t in stats.values())
    save_stats(tmp_path / "qk.safetensors", stats, {"model": "smollm2-135m"})
    got, meta = load_stats(tmp_path / "qk.safetensors", model)  # the right model is accepted
    layers = [int(n.split(".")[2]) for n in got]
    assert layers == sorted(layers)  # layer 2 before 10, not alphabetical
    assert meta == {"model": "smollm2-135m"}
    with pytest.raises(ValueError, match="shape"):
        load_stats(tmp_path / "qk.safetensors", tiny_model("llama", layers=30))


def test_prefill_collector_inside_rollout_sample_groups(embedded):
    """Wired into rollout.sample_groups: the statistic equals a calibration pass over the prompts
    minus their last token (left padding and the G-fold KV repeat change nothing)."""
    from rollout import sample_groups
    model, tokenizer = embedded
    texts = ["The grass is green. The sky is blue.", "Here we go. There and back again, twice."]
    prompts = [tokenizer(t)["input_ids"] for t in texts]  # different lengths: left padding
    hook, state = prefill_collector(model)
    sample_groups(model, tokenizer, prompts, group_size=3, max_new_tokens=2, seed=0,
                  prefill_hook=hook)
    got = finalize_state(state)
    want = collect_qk_stats(model, [{"input_ids": torch.tensor([p[:-1]])} for p in prompts])
    assert state["accs"]["model.layers.0.self_attn.q_proj"]["sequences"] == 2  # not 2 x 3
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-5), name
