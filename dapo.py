"""
dapo.py -- DAPO (arXiv 2503.14476; SOURCES.md §4) as a diff on grpo.py: one small function per
change, each citing its section. Advantages A_i are GRPO's (grpo.group_advantages); the objective
(DAPO §3, the boxed objective) is

    loss = (1 / sum_i |o_i|) * sum_i sum_t -min(rho_i,t * A_i,
                                                clip(rho_i,t, 1 - eps_low, 1 + eps_high) * A_i)
    over groups with 0 < #correct < G     (a kept group's rewards are not all equal)

The changes from grpo.py:
  1. Clip-Higher (§3.1): eps_high 0.28 > eps_low 0.2, so low-probability tokens can grow and
     entropy stays up.
  2. Dynamic sampling (§3.2): `keep_informative_groups`; all-equal groups have A = 0 and give no
     gradient. train.py's loop samples more prompts until N informative groups are collected.
  3. Token-level loss (§3.3): `dapo_loss`, one denominator for the whole step's tokens
     (grpo.batch_counts), so micro-batch losses add up to the full-batch loss.
  4. Overlong reward shaping (§3.4): `overlong_penalty` (the recipe's soft punishment) adds to the
     reward; `truncation_mask` (overlong filtering) drops truncated samples, off as in verl.
  Removed: the KL term (§2.3).

A worked example (GRPO and DAPO on one group, by hand) is tests/test_dapo.py::test_worked_example.

Shapes: N prompts (= groups), G group size, B = N*G completions, T completion tokens.
Run the tests: .venv/bin/python -m pytest -q tests/test_dapo.py
"""

import torch

from grpo import aggregate, check_finite, clipped_surrogate, validate_inputs


def dapo_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28, num_tokens=None):
    """Clip-higher (§3.1) surrogate, token-level mean over the whole batch (§3.3), no KL (§2.3).

    logp/old_logp/mask (B, T), advantages (B,). num_tokens: loss tokens of the whole step's batch
    (None: this call's). Returns (loss scalar, metrics: clip_frac_low, clip_frac_high, ratio_mean,
    adv_mean, num_tokens).
    """
    mask = validate_inputs(logp, old_logp, advantages, mask)
    per_token, metrics = clipped_surrogate(logp, old_logp, advantages, mask, eps_low, eps_high)
    return aggregate(per_token, mask, "token-mean", num_tokens=num_tokens), metrics


def keep_informative_groups(rewards, group_size):
    """Dynamic sampling filter (§3.2): keep a group only if its rewards are not all equal (a group
    of one never is). rewards (B,) group after group. Returns (keep BoolTensor (N,), metrics); per
    completion: keep.repeat_interleave(G).
    """
    check_finite(rewards=rewards)
    B, G = rewards.numel(), group_size
    if G < 1 or B % G:
        raise ValueError(f"{B} rewards do not split into groups of {G}")
    r = rewards.view(-1, G)  # (N, G)
    # "not all equal" is an exact comparison, the test of grpo.group_advantages: kept => A != 0
    keep = (r != r[:, :1]).any(dim=1)  # (N,) paper: 0 < #{correct} < G; the recipe: std > 0
    return keep, {"frac_all_equal_groups": 1.0 - keep.float().mean().item(),
                  "num_groups": keep.numel()}


def overlong_penalty(lengths, max_len, buffer_len, factor=1.0):
    """Soft overlong punishment (§3.4), added to the reward: 0 up to max_len - buffer_len, then
    linear to -factor.

    penalty = clamp(((max_len - buffer_len) - L) / buffer_len * factor, -factor, 0). Beyond max_len
    it stays at -factor (the paper's third case; generation normally stops at max_len).
    Returns (penalty (B,), metrics).
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, "
                         f"max_len={max_len}")
    L = lengths.to(torch.float32)  # (B,) completion lengths in tokens
    penalty = ((max_len - buffer_len) - L) / buffer_len * factor  # (B,)
    penalty = penalty.clamp(min=-factor, max=0.0)  # (B,)
    return penalty, {"frac_overlong_penalised": (penalty < 0).float().mean().item(),
                     "overlong_penalty_mean": penalty.mean().item()}


def truncation_mask(mask, truncated):
    """Overlong filtering (§3.4): zero the loss mask of samples cut off at max_len before their EOS.
    Off by default.

    The paper's remark: a truncated sample gets a punitive reward by default, which is noise -- a
    sound reasoning chain is punished only for its length -- and masking such samples out of the
    loss stabilised training (its ablation lists this as a step of its own). Count num_tokens
    (grpo.batch_counts) *after* this filter. mask (B, T), truncated bool (B,). -> (mask, metrics).
    """
    if truncated.shape != mask.shape[:1]:
        raise ValueError(f"truncated must be (B,) = {tuple(mask.shape[:1])}, "
                         f"got {tuple(truncated.shape)}")
    keep = ~truncated.bool()  # (B,)
    out = mask * keep[:, None].to(mask.dtype)  # (B, T)
    return out, {"frac_truncated": truncated.float().mean().item()}
