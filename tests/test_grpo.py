"""Tests of grpo.py: advantages, the clipped surrogate, k3 KL, aggregations, micro-batch invariance.

Every expected number is computed by hand in a comment. Runs in about a second, no model, no
network.
Run: .venv/bin/python -m pytest -q tests/test_grpo.py
"""

import math

import pytest
import torch

from grpo import batch_counts, grpo_loss, group_advantages, k3_kl

F64 = dict(dtype=torch.float64)  # float64 so that hand-computed values match to 1e-12


def lengths_to_mask(lengths, T):
    """(B, T) mask from positions: the first lengths[i] tokens of row i (incl. its EOS) count."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float64)  # (B, T)


def grad_of(fn, old_logp, *args, **kw):
    """Loss value and its gradient w.r.t. logp, at logp = old_logp (rho = 1)."""
    logp = old_logp.clone().requires_grad_(True)
    loss, metrics = fn(logp, old_logp, *args, **kw)
    loss.backward()
    return loss.item(), logp.grad, metrics


# ----------------------------------------------------------------------------- advantages

def test_group_scale():
    # group 1: [1, 0, 0, 0]: mean 0.25, centred [0.75, -0.25, -0.25, -0.25],
    #          Bessel var (0.5625 + 3*0.0625)/3 = 0.25
    #          -> std 0.5 -> A = [1.5, -0.5, -0.5, -0.5]
    # group 2: [0, 2, 4, 6]: mean 3, centred [-3, -1, 1, 3], var (9+1+1+9)/3 = 20/3,
    #          std 2.581989 -> A = centred/std
    r = torch.tensor([1., 0, 0, 0, 0, 2, 4, 6], **F64)
    adv, m = group_advantages(r, 4, eps=0.0)
    s = (20 / 3) ** 0.5
    want = torch.tensor([1.5, -.5, -.5, -.5, -3 / s, -1 / s, 1 / s, 3 / s], **F64)
    assert torch.allclose(adv, want)
    assert m["frac_all_equal_groups"] == 0.0
    # with TRL's eps 1e-4: 0.75 / 0.5001 = 1.49970006
    adv, _ = group_advantages(r, 4)
    assert adv[0].item() == pytest.approx(0.75 / 0.5001, abs=1e-12)


def test_batch_and_none_scales():
    r = torch.tensor([1., 0, 0, 0, 1, 1, 1, 1], **F64)
    # centred by group means 0.25 and 1: [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]
    # batch std of the raw rewards: mean 5/8; squares 5*(3/8)^2 + 3*(5/8)^2 = 45/64 + 75/64
    # = 1.875; /7 -> std 0.517549
    adv, _ = group_advantages(r, 4, scale="batch", eps=0.0)
    s = (1.875 / 7) ** 0.5
    assert torch.allclose(adv, torch.tensor([.75, -.25, -.25, -.25, 0, 0, 0, 0], **F64) / s)
    adv, m = group_advantages(r, 4, scale="none")  # Dr. GRPO: centring only
    assert torch.equal(adv, torch.tensor([.75, -.25, -.25, -.25, 0, 0, 0, 0], **F64))
    assert m["frac_all_equal_groups"] == 0.5


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_group_and_group_of_one_get_exact_zero(scale):
    # 0.1 is not exact in binary: the mean of three 0.1s can be off by an ulp; 1 ulp / 1e-4 != 0
    adv, m = group_advantages(torch.tensor([0.1, 0.1, 0.1]), 3, scale=scale)
    assert torch.equal(adv, torch.zeros(3)) and m["frac_all_equal_groups"] == 1.0
    # a group of one: no peer, so advantage 0 (verl would give the raw reward; see SOURCES.md §9.10)
    adv, _ = group_advantages(torch.tensor([0.3, 1.0]), 1, scale=scale)
    assert torch.equal(adv, torch.zeros(2)) and not adv.isnan().any()


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="std")


# ----------------------------------------------------------------------------- the loss

def worked_example():
    """The file docstring's example: A = [1.5, -0.5, -0.5, -0.5], lengths [1, 2, 3, 2], T = 4."""
    adv, _ = group_advantages(torch.tensor([1., 0, 0, 0], **F64), 4, eps=0.0)
    mask = lengths_to_mask([1, 2, 3, 2], 4)
    old = torch.log(torch.full((4, 4), 0.3, **F64))
    return adv, mask, old


def test_worked_example():
    adv, mask, old = worked_example()
    # rho = 1, beta = 0: token loss -A_i.  seq-mean-token-mean: (1/4)(-1.5 + .5 + .5 + .5) = 0
    for agg, want in [("seq-mean-token-mean", 0.0), ("token-mean", 0.25),
                      ("seq-mean-token-sum-norm", 0.125)]:
        # token-mean: (-1.5 + .5*2 + .5*3 + .5*2)/8 = 2/8;  sum-norm: 2/(4 seqs * max_len 4) = 0.125
        loss, m = grpo_loss(old, old, None, adv, mask, beta=0.0, aggregation=agg, max_len=4)
        assert loss.item() == pytest.approx(want, abs=1e-12)
    assert m["num_tokens"] == 8 and m["ratio_mean"] == pytest.approx(1.0)
    assert m["adv_mean"] == pytest.approx(0.0)
    # o_1's token at rho = 1.5: -min(1.5*1.5, 1.2*1.5) = -1.8; token-mean (-1.8 + 3.5)/8 = 0.2125,
    # zero gradient there
    logp = old.clone()
    logp[0, 0] += torch.log(torch.tensor(1.5, **F64))
    logp.requires_grad_(True)
    loss, m = grpo_loss(logp, old, None, adv, mask, beta=0.0, aggregation="token-mean")
    loss.backward()
    assert loss.item() == pytest.approx(0.2125, abs=1e-12) and logp.grad[0, 0] == 0.0
    assert m["clip_frac_high"] == pytest.approx(1 / 8)


@pytest.mark.parametrize("agg,weights", [
    # d loss / d logp_i,t at rho = 1 is -A_i * w_i (REINFORCE with the group mean as baseline),
    # w_i per aggregation:
    ("seq-mean-token-mean", [1 / (4 * 1), 1 / (4 * 2), 1 / (4 * 3), 1 / (4 * 2)]),  # 1/(B |o_i|)
    ("token-mean", [1 / 8] * 4),  # 1/(total tokens)
    ("seq-mean-token-sum-norm", [1 / 16] * 4),  # 1/(B * max_len) = 1/(4*4)
])
def test_gradient_is_reinforce_with_group_baseline(agg, weights):
    adv, mask, old = worked_example()
    _, grad, _ = grad_of(grpo_loss, old, None, adv, mask, beta=0.0, aggregation=agg, max_len=4)
    # e.g. seq-mean-token-mean row 0: -1.5/4 = -0.375; row 2: +0.5/12 = 0.041667
    want = (-adv * torch.tensor(weights, **F64))[:, None] * mask  # (B, T); padding gets exactly 0
    assert torch.allclose(grad, want, atol=1e-15)


def test_clipping_zeroes_gradient_on_the_right_side():
    # four one-token sequences, token-mean over 4 tokens, clip_eps 0.2 -> range [0.8, 1.2]
    rho = torch.tensor([1.3, 0.7, 1.3, 0.7], **F64)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], **F64)
    old = torch.zeros(4, 1, **F64)
    logp = torch.log(rho)[:, None].requires_grad_(True)
    loss, m = grpo_loss(logp, old, None, adv, torch.ones(4, 1), beta=0.0, aggregation="token-mean")
    loss.backward()
    # row 0: rho 1.3 > 1.2, A > 0 -> clipped: loss -1.2, grad 0
    # row 1: rho 0.7 < 0.8, A < 0 -> clipped: loss 0.8, grad 0
    # row 2: rho 1.3, A < 0 -> min(-1.3, -1.2) = -1.3 unclipped: loss 1.3,
    #        d/dlogp = -A*rho/4 = 1.3/4 = 0.325
    # row 3: rho 0.7, A > 0 -> min(0.7, 0.8) = 0.7 unclipped: loss -0.7, grad -0.7/4 = -0.175
    assert torch.allclose(logp.grad[:, 0], torch.tensor([0.0, 0.0, 0.325, -0.175], **F64))
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 1.3 - 0.7) / 4)
    assert m["clip_frac_high"] == 0.25 and m["clip_frac_low"] == 0.25
    assert m["ratio_mean"] == pytest.approx(1.0)


def test_k3_kl():
    # d = ref - logp = ln 2: k3 = 2 - ln 2 - 1 = 0.3068528;  d = -ln 2: 0.5 + ln 2 - 1 = 0.1931472;
    # d = 0: 0
    logp = torch.zeros(1, 3, **F64)
    ref = torch.log(torch.tensor([[2.0, 0.5, 1.0]], **F64))
    k3 = k3_kl(logp, ref, torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(k3, torch.tensor([[0.30685282, 0.19314718, 0.0]], **F64))
    x, y = torch.randn(2, 64, 50, **F64)
    assert (k3_kl(x, y, torch.ones(64, 50, dtype=torch.bool)) >= 0).all()
    assert torch.equal(k3_kl(x, x, torch.ones(64, 50, dtype=torch.bool)),
                       torch.zeros(64, 50, **F64))
    # inside grpo_loss: with rho = 1 and A = 0 only the KL remains:
    # beta * mean k3 = 0.04 * (0.30685 + 0.19315 + 0)/3
    loss, m = grpo_loss(logp, logp, ref, torch.zeros(1, **F64), torch.ones(1, 3),
                        aggregation="token-mean")
    assert loss.item() == pytest.approx(0.04 * 0.5 / 3) and m["kl"] == pytest.approx(0.5 / 3)


def test_kl_clamp_bounds_an_outlier_token_and_reports_kl_max():
    # token 0: ref - logp = 20 -> k3 = e^20 - 20 - 1 = 485165174.41 unclamped, 10 clamped (verl)
    # token 1: ref - logp = ln 2 -> k3 = 0.3068528 either way (inside [-10, 10])
    # token 2: padding with ref - logp = 50 -> ignored by the loss and by kl_max
    ref = torch.tensor([[20.0, math.log(2), 50.0]], **F64)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.zeros(1, 3, **F64, requires_grad=True)
    assert torch.allclose(k3_kl(logp, ref, mask.bool(), clamp=10.0),
                          torch.tensor([[10.0, 0.30685282, 0.0]], **F64))
    assert k3_kl(logp, ref, mask.bool())[0, 0].item() == pytest.approx(485165174.40979)
    # rho = 1 and A = 0: only beta * token-mean k3 remains. Default kl_clamp = 10:
    #   loss = 0.04 * (10 + 0.3068528) / 2 = 0.2061371
    #   d loss / d logp = 0.04 / 2 * (1 - e^d): 0 on the clamped token, 0.02 * (1 - 2) = -0.02 on
    #   token 1, 0 on padding
    kw = dict(advantages=torch.zeros(1, **F64), mask=mask, aggregation="token-mean")
    loss, m = grpo_loss(logp, logp.detach().clone(), ref, **kw)
    loss.backward()
    assert loss.item() == pytest.approx(0.04 * (10 + 0.30685282) / 2)
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.02, 0.0]], **F64))
    assert m["kl"] == pytest.approx((10 + 0.30685282) / 2)
    assert m["kl_max"] == pytest.approx(485165174.40979)  # before clamping, padding excluded
    # kl_clamp=None is TRL's unclamped k3: 0.04 * (485165174.41 + 0.31) / 2 = 9703303.5
    loss, m = grpo_loss(logp, logp.detach().clone(), ref, kl_clamp=None, **kw)
    assert loss.item() == pytest.approx(0.04 * (485165174.40979 + 0.30685282) / 2)
    assert m["kl_max"] == pytest.approx(485165174.40979)


def test_kl_clamp_keeps_gradients_finite_when_exp_overflows():
    # fp32, ref - logp = 100: exp(100) = inf. Clamped k3 = 10, zero gradient -- not 0 * inf = NaN
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[100.0, 0.0]])
    loss, m = grpo_loss(logp, logp.detach().clone(), ref, torch.zeros(1), torch.ones(1, 2),
                        aggregation="token-mean")
    loss.backward()
    assert loss.item() == pytest.approx(0.04 * 10 / 2) and torch.equal(logp.grad, torch.zeros(1, 2))
    assert m["kl_max"] == float("inf")  # the outlier stays visible in the log


def test_all_equal_group_and_padding_contribute_nothing():
    torch.manual_seed(0)
    adv, _ = group_advantages(torch.tensor([1., 1, 1, 1, 1, 0, 0, 0]), 4)  # group 1: all equal
    mask = lengths_to_mask([3, 5, 2, 4, 5, 1, 3, 2], 5).float()
    old = -torch.rand(8, 5)
    logp = (old + 0.1 * torch.randn(8, 5)).requires_grad_(True)  # rho != 1, some tokens clipped
    loss, _ = grpo_loss(logp, old, None, adv, mask, beta=0.0)
    loss.backward()
    assert torch.equal(logp.grad[:4], torch.zeros(4, 5))  # the all-equal group
    assert (logp.grad[mask == 0] == 0).all()  # padding
    # garbage (but finite) values at padding change nothing, not even through exp overflow
    junk_old, junk = old.clone(), logp.detach().clone()
    junk_old[mask == 0], junk[mask == 0] = -1e4, 1e4
    loss2, _ = grpo_loss(junk, junk_old, None, adv, mask, beta=0.0)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-7)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_invariance(agg):
    torch.manual_seed(1)
    adv, _ = group_advantages(torch.randint(0, 2, (8,)).float(), 4)
    mask = lengths_to_mask([3, 5, 2, 4, 5, 1, 3, 2], 6)
    old, ref = -torch.rand(2, 8, 6, **F64)
    logp = (old + 0.2 * torch.randn(8, 6, **F64)).requires_grad_(True)
    kw = dict(beta=0.04, aggregation=agg, max_len=6)
    full, _ = grpo_loss(logp, old, ref, adv.double(), mask, **kw)
    (g_full,) = torch.autograd.grad(full, logp)
    num_tokens, num_seqs = batch_counts(mask)  # 25 tokens, 8 sequences
    assert (num_tokens, num_seqs) == (25, 8)
    total = 0.0
    for rows in torch.arange(8).split(2):  # 4 micro-batches of 2 sequences, summed
        part, _ = grpo_loss(logp[rows], old[rows], ref[rows], adv.double()[rows], mask[rows],
                            num_tokens=num_tokens, num_seqs=num_seqs, **kw)
        total = total + part
    (g_acc,) = torch.autograd.grad(total, logp)
    assert torch.allclose(total, full) and torch.allclose(g_acc, g_full)


def test_bad_inputs_raise():
    adv, mask, old = worked_example()
    bad = old.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="logp has 1 non-finite"):
        grpo_loss(bad, old, None, adv, mask, beta=0.0)
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(old, old.masked_fill(mask == 0, float("-inf")), None, adv, mask, beta=0.0)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(old, old, bad, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(old, old, None, torch.tensor([1.0, float("inf"), 0, 0], **F64), mask, beta=0.0)
    with pytest.raises(ValueError, match="max_len"):
        grpo_loss(old, old, None, adv, mask, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        grpo_loss(old, old, None, adv[:3], mask)
