"""Tests for plumbing/engine.py, the fast sampling path: cascade decoding against the repeated
cache, the cascade attention itself, the CDF-draw decoding loop, per-prompt prefill, oneDNN
linears.

Run: .venv/bin/python -m pytest -q tests/test_engine.py
"""

from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_model
from sampling_helpers import EOS, TinyTok, engine_sample, eos_boost, prompts, spy_generate
from transformers import DynamicCache

from plumbing import common, engine
from rollout import sample_groups

# ------------------------------------------------------------------ cascade decoding

def cascade_vs_repeated(model, ps, G=4, T=8, temperature=0.0, seed=0):
    """Sample the same batch with the cascade and the repeated cache: {cascade: (Rollout,
    (B, T', V) raw logits per step, the cache generate got)}."""
    out = {}
    for cascade in (True, False):
        with spy_generate(model, output_logits=True, return_dict_in_generate=True) as calls:
            ids = engine_sample(model, ps, G, T, temperature, seed, cascade=cascade)
        out[cascade] = (ids, torch.stack(calls[0].logits, 1), calls[0].cache)
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cascade_decoding_gives_the_repeated_cache_completions_and_logits(kind, temperature):
    # 3 left-padded prompts of different lengths x 4 rows: greedy, and sampling with one seed.
    model = tiny_model(kind)
    ps = prompts(3, lengths=(9, 14, 11))
    out = cascade_vs_repeated(model, ps, temperature=temperature, seed=5)
    (ra, la, cache_a), (rb, lb, cache_b) = out[True], out[False]
    assert isinstance(cache_a, engine.CascadeCache) and type(cache_b) is DynamicCache
    assert cache_a.layers[0].prefix_keys.shape == (3, 2, 13, 8)  # (N, Hkv, P-1, D) once per group
    assert cache_a.get_seq_length() == cache_b.get_seq_length() == 13 + la.shape[1]
    assert torch.equal(ra, rb)
    assert (la - lb).abs().max() <= 1e-5
    assert model.config._attn_implementation == "sdpa"  # restored after the call
    assert not any(hasattr(m, "cascade_layer") for m in model.modules())


def test_cascade_attention_handles_every_decode_step(monkeypatch):
    # Every attention call of every decode step takes the per-group path (one query token, a
    # prefix attached), none the fallback: 2 layers x 5 steps.
    model, seen = tiny_model("llama"), []
    inner = engine.cascade_attention

    def counting(module, query, *args, **kwargs):
        seen.append((query.shape[2], hasattr(module, "cascade_layer")))
        return inner(module, query, *args, **kwargs)

    monkeypatch.setitem(engine.AttentionInterface._global_mapping, "cascade", counting)
    with eos_boost(model, -100.0):  # EOS never wins: exactly 5 steps
        sample_groups(model, TinyTok(), prompts(2), group_size=3, max_new_tokens=5, seed=0)
    assert seen == [(1, True)] * 10


def test_cascade_attention_equals_softmax_over_repeated_keys():
    # N=2 groups of G=3 rows, 4 query heads on 2 KV heads (rep 2), prefix 5, suffix 2, group 1's
    # first two prefix positions are left padding. Reference: the textbook formula on keys
    # [prefix repeated to every row ; suffix].
    g = torch.Generator().manual_seed(0)
    N, G, H, Hkv, Pp, S, D = 2, 3, 4, 2, 5, 2, 8
    pk, pv = torch.randn(2, N, Hkv, Pp, D, generator=g)
    sk, sv = torch.randn(2, N * G, Hkv, S, D, generator=g)
    q = torch.randn(N * G, H, 1, D, generator=g)
    keep = torch.ones(N * G, 1, 1, Pp + S, dtype=torch.bool)
    keep[G:, ..., :2] = False  # group 1's padding, the same for its 3 rows
    layer = engine.CascadeLayer(pk, pv)
    module = torch.nn.Module()
    module.cascade_layer = layer
    out, _ = engine.cascade_attention(module, q, sk, sv, keep, scaling=0.5)  # (B, 1, H, D)
    k = torch.cat([pk.repeat_interleave(G, 0), sk], 2).repeat_interleave(2, 1)  # (B, H, 7, D)
    v = torch.cat([pv.repeat_interleave(G, 0), sv], 2).repeat_interleave(2, 1)
    w = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~keep, float("-inf")).softmax(-1)
    assert out.shape == (N * G, 1, H, D)
    assert torch.allclose(out, (w @ v).transpose(1, 2), atol=1e-6)
    assert torch.allclose(w[G:, ..., :2], torch.zeros(()))  # padding got no weight


def test_cascade_layer_reports_prefix_plus_suffix_length():
    pk = torch.zeros(2, 1, 5, 4)  # (N, Hkv, P', D): 5 prompt positions, 2 groups
    layer = engine.CascadeLayer(pk, pk)
    assert layer.get_seq_length() == 5 and layer.get_mask_sizes(1) == (6, 0)
    keys, _ = layer.update(torch.ones(6, 1, 1, 4), torch.ones(6, 1, 1, 4))  # 6 rows = 2 x G=3
    assert keys.shape == (6, 1, 1, 4)  # update returns the suffix only
    assert layer.get_seq_length() == 6 and layer.get_mask_sizes(1) == (7, 0)
    with pytest.raises(NotImplementedError, match="cascade=False"):
        layer.batch_select_indices(torch.tensor([0]))


def test_cascade_falls_back_to_repeated_keys_for_several_query_tokens():
    # Two new tokens per row at once (never happens in our decoding): the explicit fallback
    # materialises [prefix repeated ; suffix] and must give the repeated cache's hidden states.
    model, G = tiny_model("qwen3"), 2
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))  # (N, P')
    new = torch.randint(3, 128, (2 * G, 2), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(7, 9)[None].expand(2 * G, -1)  # (B, 2)
    hidden = []
    for cascade in (True, False):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model.model(input_ids=ids, cache=cache, use_cache=True)
            if cascade:
                cache = engine.CascadeCache(cache)
                ctx = engine.cascade_decoding(model, cache)
            else:
                cache.batch_repeat_interleave(G)
                ctx = contextmanager(lambda: (yield))()
            with ctx:
                hidden.append(model.model(input_ids=new, position_ids=pos, cache=cache,
                                          use_cache=True).last_hidden_state)
    assert torch.allclose(hidden[0], hidden[1], atol=1e-5)


def test_sliding_window_layers_use_the_repeated_cache():
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      use_sliding_window=True, sliding_window=4, max_window_layers=0,
                      eos_token_id=EOS, pad_token_id=EOS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    out = cascade_vs_repeated(model, prompts(2, lengths=(9, 12)), G=2, T=5)
    assert type(out[True][2]) is DynamicCache  # cascade asked for, not applicable: plain path
    assert torch.equal(out[True][0], out[False][0])


def test_cascade_under_bf16_autocast_matches_the_repeated_cache():
    # bf16 rounds the two summation orders differently, so a near-tie may pick another token;
    # compare the logits of every step whose history is still the same in both runs.
    model = tiny_model("qwen3")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cascade_vs_repeated(model, prompts(3, lengths=(9, 14, 11)))
    (ra, la, _), (rb, lb, _) = out[True], out[False]
    agree = (ra == rb).long().cumprod(1)  # (B, T) same so far
    history = torch.cat([torch.ones_like(agree[:, :1]), agree[:, :-1]], 1).bool()  # (B, T)
    assert history[:, 0].all() and history.float().mean() > 0.5
    assert (la - lb).abs()[history].max() < 0.01


def test_cascade_decoding_restores_the_model_after_an_error():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=torch.tensor([[5, 6, 7]]), cache=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="boom"):
        with engine.cascade_decoding(model, engine.CascadeCache(cache)):
            assert model.config._attn_implementation == "cascade"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "cascade_layer") for m in model.modules())


# ------------------------------------------------------------------ the decoding loop and prefill

def test_draw_follows_the_distribution_and_skips_empty_intervals():
    # 200k rows of one distribution with a zero in the middle and at the end (what the softmax
    # makes of -inf scores, e.g. tokens cut by top_p): frequencies within 5 standard errors, the
    # zero-probability tokens never.
    p = torch.tensor([0.1, 0.0, 0.2, 0.7, 0.0])
    torch.manual_seed(0)
    counts = torch.bincount(engine.draw(p.expand(200_000, -1)), minlength=5).double()
    se = (p * (1 - p) / 200_000).sqrt()
    assert counts[1] == counts[4] == 0
    assert ((counts / 200_000 - p).abs() <= 5 * se + 1e-12).all()


def test_draw_never_returns_a_tail_token_when_u_rounds_up(monkeypatch):
    # u * total can round up to total; searchsorted then points past the last token. The draw
    # must give the last token WITH probability, not the zero-probability tail.
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, **kw))
    p = torch.tensor([[0.3, 0.7, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert engine.draw(p).tolist() == [1, 0]


def test_decode_loop_equals_transformers_loop_when_greedy():
    # Same logits processors and stopping criteria, argmax on the same scores: our loop and
    # transformers' give the same completions and the same processed scores at every step.
    model, ps = tiny_model("qwen3"), prompts(3, lengths=(9, 14, 11))
    out = {}
    for hf in (False, True):
        with spy_generate(model, output_scores=True, return_dict_in_generate=True) as calls:
            ids = engine_sample(model, ps, 2, 7, hf_loop=hf)
        out[hf] = (ids, torch.stack(calls[0].scores, 1))
    assert torch.equal(out[False][0], out[True][0])
    assert (out[False][1] - out[True][1]).abs().max() <= 1e-5


def test_decode_loop_stops_each_row_at_eos_and_pads_after():
    model = tiny_model("llama")
    with eos_boost(model, 3.5):
        r = sample_groups(model, TinyTok(), prompts(2, lengths=(9, 13)), group_size=4,
                          max_new_tokens=10, seed=2)
    assert r.completion_ids.shape[1] <= 10
    assert len(set(r.lengths.tolist())) >= 2 and not r.truncated.all()
    for row, n in zip(r.completion_ids, r.lengths.tolist()):
        assert (row[n:] == EOS).all()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_per_prompt_prefill_equals_the_padded_batch(kind):
    # Each prompt alone, its keys/values left-padded, against one padded batch with a padding
    # mask: the same keys/values at every real position (fp32 rounding), zeros in the pad slots.
    model, ps = tiny_model(kind), prompts(3, lengths=(9, 14, 11))
    ours = engine.prefill(model, ps, EOS)
    ids, attn = common.left_pad(ps, EOS)  # (N, P), (N, P)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], cache=ref, use_cache=True,
                    position_ids=common.positions_from_mask(attn)[:, :-1])
    real = attn[:, :-1].bool()  # (N, P-1)
    for a, b in zip(ours.layers, ref.layers):
        assert a.keys.shape == b.keys.shape == (3, 2, 13, 8)  # (N, Hkv, P-1, D)
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            x, y = x.transpose(1, 2)[real], y.transpose(1, 2)[real]  # (real positions, Hkv, D)
            assert (x - y).abs().max() <= 1e-5
        assert (a.keys.transpose(1, 2)[~real] == 0).all()


def test_onednn_linears_match_torch_linears_keep_hooks_and_restore():
    model, ps = tiny_model("qwen2"), prompts(3, lengths=(9, 14, 11))  # qwen2: q/k/v with bias
    x = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    seen = []
    h = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        with engine.onednn_linears(model):
            got = model(input_ids=x).logits
    h.remove()
    assert len(seen) == 2  # the hook on the LM head fired through the swapped forward too
    assert (got - ref).abs().max() <= 1e-5
    assert not any("forward" in vars(m) for m in model.modules())  # the class forward is back
    greedy = [engine_sample(model, ps, 2, 6, onednn=o) for o in (True, False)]
    assert torch.equal(*greedy)


def test_onednn_only_for_fp32_on_an_avx512_cpu(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert engine.onednn_suits(model)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not engine.onednn_suits(model)  # close kernels there: the conversions eat the gain
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls: oneDNN already
        assert not engine.onednn_suits(model)
    assert not engine.onednn_suits(model.to(torch.bfloat16))
