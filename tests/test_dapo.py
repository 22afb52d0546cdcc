"""Tests of dapo.py: clip-higher, the batch-level token mean, dynamic sampling, overlong shaping
and filtering.

Every expected number is computed by hand in a comment. Runs in about a second, no model, no
network.
Run: .venv/bin/python -m pytest -q tests/test_dapo.py
"""

import math

import pytest
import torch

from dapo import dapo_loss, keep_informative_groups, overlong_penalty, truncation_mask
from grpo import batch_counts, grpo_loss, group_advantages

F64 = dict(dtype=torch.float64)


def lengths_to_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float64)  # (B, T)


def test_worked_example():
    adv, _ = group_advantages(torch.tensor([1., 0, 0, 0], **F64), 4, eps=0.0)  # A = [1.5, -.5, ...]
    mask = lengths_to_mask([1, 2, 3, 2], 4)  # 8 tokens
    old = torch.full((4, 4), math.log(0.3), **F64)
    logp = old.clone()
    logp[0, 0] += math.log(1.25)  # o_1's only token now at rho = 1.25
    logp.requires_grad_(True)
    loss, m = dapo_loss(logp, old, adv, mask)
    loss.backward()
    # DAPO: 1.25 < 1 + 0.28, unclipped: -1.25*1.5 = -1.875; others -A = +0.5 on 7 tokens
    # -> (-1.875 + 3.5)/8
    assert loss.item() == pytest.approx(0.203125, abs=1e-12)
    # d(-rho*A)/dlogp = -rho*A, over 8 tokens
    assert logp.grad[0, 0].item() == pytest.approx(-1.25 * 1.5 / 8)
    assert m["clip_frac_high"] == 0.0 and m["num_tokens"] == 8
    # GRPO, same token-mean: 1.25 > 1.2 -> clipped: -1.2*1.5 = -1.8 -> (-1.8 + 3.5)/8 = 0.2125,
    # zero gradient
    logp.grad = None
    loss, m = grpo_loss(logp, old, None, adv, mask, beta=0.0, aggregation="token-mean")
    loss.backward()
    assert loss.item() == pytest.approx(0.2125, abs=1e-12) and logp.grad[0, 0] == 0.0
    assert m["clip_frac_high"] == pytest.approx(1 / 8)


def test_asymmetric_clip_range():
    # one-token sequences, A = +1, +1, -1, -1 at rho = 1.25, 1.30, 0.75, 0.85; range [0.8, 1.28]
    rho = torch.tensor([1.25, 1.30, 0.75, 0.85], **F64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], **F64)
    logp = torch.log(rho)[:, None].requires_grad_(True)
    loss, m = dapo_loss(logp, torch.zeros(4, 1, **F64), adv, torch.ones(4, 1))
    loss.backward()
    # row 0: inside -> grad -A*rho/4 = -0.3125   row 1: 1.30 > 1.28, A > 0 -> clipped, 0
    # row 2: 0.75 < 0.8 (eps_low stays 0.2), A < 0 -> clipped, 0
    # row 3: inside -> grad +0.85/4 = 0.2125
    assert torch.allclose(logp.grad[:, 0], torch.tensor([-0.3125, 0.0, 0.0, 0.2125], **F64))
    assert m["clip_frac_high"] == 0.25 and m["clip_frac_low"] == 0.25


def test_equals_grpo_token_mean_without_kl_when_symmetric():
    torch.manual_seed(0)
    adv = torch.randn(6, **F64)
    mask = lengths_to_mask([4, 1, 3, 4, 2, 2], 4)
    old = -torch.rand(6, 4, **F64)
    logp = old + 0.3 * torch.randn(6, 4, **F64)
    a, _ = dapo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    b, _ = grpo_loss(logp, old, -torch.rand(6, 4, **F64), adv, mask, beta=0.0,
                     aggregation="token-mean")
    assert torch.allclose(a, b)


def test_micro_batch_invariance():
    torch.manual_seed(2)
    adv, _ = group_advantages(torch.randint(0, 2, (16,)).float().double(), 4)
    mask = lengths_to_mask(torch.randint(1, 9, (16,)).tolist(), 8)  # very uneven lengths on purpose
    old = -torch.rand(16, 8, **F64)
    logp = (old + 0.3 * torch.randn(16, 8, **F64)).requires_grad_(True)  # some tokens clipped
    full, _ = dapo_loss(logp, old, adv, mask)
    (g_full,) = torch.autograd.grad(full, logp)
    num_tokens, _ = batch_counts(mask)
    for rows in torch.arange(16).split(4):  # 4 micro-batches; backward() accumulates into .grad
        part, _ = dapo_loss(logp[rows], old[rows], adv[rows], mask[rows], num_tokens=num_tokens)
        part.backward()
    assert torch.allclose(logp.grad, g_full)
    # without the whole-batch count each micro-batch divides by its own tokens: the sum is not
    # the full gradient
    logp.grad = None
    for rows in torch.arange(16).split(4):
        (dapo_loss(logp[rows], old[rows], adv[rows], mask[rows])[0] / 4).backward()
    assert not torch.allclose(logp.grad, g_full)


def test_all_equal_group_gives_zero_gradient_and_non_finite_raises():
    adv, _ = group_advantages(torch.tensor([0., 0, 0, 0, 1, 0, 1, 0]), 4)  # group 0: A = 0
    old = -torch.rand(8, 3)
    logp = (old + 0.1 * torch.randn(8, 3)).requires_grad_(True)
    dapo_loss(logp, old, adv, torch.ones(8, 3))[0].backward()
    assert torch.equal(logp.grad[:4], torch.zeros(4, 3)) and logp.grad[4:].abs().sum() > 0
    with pytest.raises(ValueError, match="logp has 1 non-finite"):
        bad = logp.detach().clone()
        bad[0, 0] = float("nan")
        dapo_loss(bad, old, adv, torch.ones(8, 3))


def test_keep_informative_groups():
    r = torch.tensor([1., 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])  # all right / one right / all wrong
    keep, m = keep_informative_groups(r, 4)
    assert keep.tolist() == [False, True, False]
    assert m["frac_all_equal_groups"] == pytest.approx(2 / 3)
    # per completion: keep.repeat_interleave(G) -> rows 4..7
    assert keep.repeat_interleave(4).nonzero().flatten().tolist() == [4, 5, 6, 7]
    keep, _ = keep_informative_groups(torch.tensor([0.0, 1.0]), 1)  # a group of one never is
    assert keep.tolist() == [False, False]


def test_overlong_penalty():
    # recipe numbers: max_len 20480, buffer 4096 -> threshold 16384
    # 10000 -> 0; 16384 -> 0; 18432 -> (16384 - 18432)/4096 = -0.5; 20480 -> -1;
    # 30000 -> clamped to -1
    pen, m = overlong_penalty(torch.tensor([10000, 16384, 18432, 20480, 30000]), 20480, 4096)
    assert pen.tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert m["frac_overlong_penalised"] == pytest.approx(3 / 5)
    # factor 0.5 halves it: 17408 -> (16384 - 17408)/4096 * 0.5 = -0.125
    pen, _ = overlong_penalty(torch.tensor([17408, 20480]), 20480, 4096, factor=0.5)
    assert pen.tolist() == [-0.125, -0.5]
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(torch.tensor([1]), 10, 0)


def test_truncation_mask():
    mask = lengths_to_mask([2, 4, 3], 4)  # 9 tokens
    new, m = truncation_mask(mask, torch.tensor([False, True, False]))  # row 1 hit max_len
    assert new.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    assert m["frac_truncated"] == pytest.approx(1 / 3)
    assert batch_counts(new) == (5, 2)  # count after filtering: 2 + 3 tokens, 2 sequences left
