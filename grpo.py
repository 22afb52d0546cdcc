"""
grpo.py -- the GRPO objective (DeepSeekMath, arXiv 2402.03300, §4.1): pure functions, tensors in, (value, metrics) out.

For N prompts with G sampled completions o_1..o_G each (B = N*G rows), rewards r_i, and per token t of o_i:

    A_i     = (r_i - mean(r of its group)) / (std(r of its group) + eps)        one advantage per completion
    rho_i,t = exp(logp_i,t - old_logp_i,t)                                       ratio to the sampling policy
    k3_i,t  = exp(ref_i,t - logp_i,t) - (ref_i,t - logp_i,t) - 1                 KL estimate to the reference, >= 0
    l_i,t   = -min(rho_i,t * A_i, clip(rho_i,t, 1 - clip_eps, 1 + clip_eps) * A_i) + beta * k3_i,t
    loss    = (1/B) * sum_i (1/|o_i|) * sum_t l_i,t                              ("seq-mean-token-mean", the paper's)

How our version relates to the paper and to TRL / verl (facts.md §2):
  1. Advantages follow TRL: Bessel-corrected std, eps 1e-4 (verl: 1e-6). `scale` is TRL's `scale_rewards`: "group"
     (the paper), "batch" (std of all rewards of the step), "none" (Dr. GRPO, arXiv 2503.20783: centring only).
  2. Choice: a group whose rewards are all equal -- a group of one included -- gets advantage exactly 0: nobody in
     it did better or worse than a peer. (verl gives a group of one mean 0, std 1, i.e. its raw reward.)
  3. Clip: symmetric clip_eps 0.2 (PPO, TRL). verl's "dual clip" for negative advantages (clip_ratio_c) is left out.
  4. KL: k3 with beta 0.04 (the paper); skipped entirely when beta == 0 or ref_logp is None, as TRL does. Unclamped
     (verl's low_var_kl clamps k3 to [-10, 10]).
  5. Aggregations (TRL name / verl name): "seq-mean-token-mean" (grpo / same) = the paper; "token-mean" (bnpo, dapo /
     token-mean) = sum over all tokens / number of tokens; "seq-mean-token-sum-norm" (dr_grpo / same) = sum over
     tokens / (number of sequences * max_len), Dr. GRPO's removal of the 1/|o_i| length bias.
  6. Micro-batch invariance: every aggregation is a sum over this call's rows divided by a count. Pass the counts of
     the whole step's batch, `num_tokens, num_seqs = batch_counts(mask_of_the_whole_batch)`, and call backward() on
     each micro-batch's loss with no extra scaling: the accumulated gradient is then the full-batch gradient.
     token-mean needs num_tokens; the two seq-mean aggregations need num_seqs. Left at None, they are this call's
     own counts -- exact for one batch only (TRL's "bnpo" normalises per micro-batch like that).

Worked example (tests/test_grpo.py::test_worked_example): one group of G = 4 with one correct answer.
    r = [1, 0, 0, 0]: mean 0.25, Bessel std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    A = [0.75, -0.25, -0.25, -0.25] / 0.5 = [1.5, -0.5, -0.5, -0.5]      (1.49970, -0.49990 with eps = 1e-4)
    lengths |o_i| = [1, 2, 3, 2]; first update (rho = 1), beta = 0, so every token's loss is -A_i:
      seq-mean-token-mean         (1/4) * (-1.5 + 0.5 + 0.5 + 0.5)           = 0      the group cancels out...
      token-mean                  (1/8) * (-1.5 + 2*0.5 + 3*0.5 + 2*0.5)     = 0.25   ...unless long answers weigh more
      seq-mean-token-sum-norm     (-1.5 + 2*0.5 + 3*0.5 + 2*0.5) / (4 * max_len 4) = 0.125
    Had o_1's token rho = 1.5: its loss is -min(1.5 * 1.5, 1.2 * 1.5) = -1.8, with zero gradient (clipped).

Shapes: N prompts (= groups), G group size, B = N*G completions, T completion tokens (right-padded).
Run the tests: .venv/bin/python -m pytest -q tests/test_grpo.py
"""

import torch

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def check_finite(**tensors):
    """Raise a ValueError naming the tensor that holds NaN/inf: one NaN in the loss would poison every weight."""
    for name, x in tensors.items():
        if x is not None and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{name} has {bad} non-finite value(s) (NaN/inf); refusing to build a loss from it. "
                             "Typical causes: -inf log-probs of tokens outside a top-k/top-p filter, or a NaN reward.")


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """A_i = (r_i - group mean) / (std + eps). rewards (B,) laid out group after group. Returns (A (B,), metrics)."""
    check_finite(rewards=rewards)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    B, G = rewards.numel(), group_size
    if G < 1 or B % G:
        raise ValueError(f"{B} rewards do not split into groups of {G}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, G)  # (N, G); int/bool rewards -> float
    # Compare with the first member instead of testing std == 0: the mean of equal floats can be off by one ulp,
    # and that ulp divided by eps = 1e-4 would give a small non-zero "advantage" to a group that carries no signal.
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)  # (N, 1)
    centred = r - r.mean(dim=1, keepdim=True)  # (N, G) the group mean is GRPO's baseline (replaces PPO's critic)
    if scale == "none":
        adv = centred  # Dr. GRPO: dividing by the std up-weights near-uniform groups (too easy or too hard prompts)
    else:
        # Bessel-corrected (torch's default correction=1), as TRL and verl. A group of one has no std; it is
        # all-equal anyway, so 0 stands in for it to avoid torch's degrees-of-freedom warning.
        if scale == "group":
            std = r.std(dim=1, keepdim=True) if G > 1 else torch.zeros_like(centred)  # (N, 1)
        else:
            std = r.std() if B > 1 else r.new_zeros(())  # () one scale for the whole step, TRL scale_rewards="batch"
        adv = centred / (std + eps)  # (N, G)
    adv = torch.where(all_equal, 0.0, adv)  # (N, G) exactly 0, never 0/0
    metrics = {"reward_mean": r.mean().item(), "reward_std": r.std().item() if B > 1 else 0.0,
               "frac_all_equal_groups": all_equal.float().mean().item()}
    return adv.reshape(B), metrics  # (B,)


def batch_counts(mask):
    """(num_tokens, num_seqs) of a whole step's batch: the normalisers that make micro-batch losses add up exactly.

    A sequence counts if it has at least one loss token (rows emptied by DAPO's overlong filtering do not count).
    """
    lengths = mask.sum(-1)  # (B,) |o_i|
    return int(lengths.sum()), int((lengths > 0).sum())


def validate_inputs(logp, old_logp, advantages, mask, ref_logp=None):
    """Check shapes and finiteness; return the mask as bool (B, T). Shared with dapo.py."""
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp, mask must all be (B, T); got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (B,) = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must be {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    check_finite(logp=logp, old_logp=old_logp, advantages=advantages, ref_logp=ref_logp)
    return mask.bool()  # 1 for completion tokens incl. the sampled EOS, built from positions (never from pad ids)


def clipped_surrogate(logp, old_logp, advantages, mask, eps_low, eps_high):
    """Per-token -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A), 0 on padding. Returns (loss (B, T), metrics).

    GRPO passes eps_low == eps_high; DAPO's clip-higher decouples them. mask must be bool (validate_inputs).
    """
    # Zero the log-ratio on padding *before* exp: padding log-probs are arbitrary, exp of a big difference overflows
    # to inf, and inf * 0 = NaN would leak into the sum. torch.where also sends exactly zero gradient there.
    log_ratio = torch.where(mask, logp - old_logp.detach(), 0.0)  # (B, T) the sampling policy is a constant
    ratio = torch.exp(log_ratio)  # (B, T) rho = pi / pi_old, 1 on the first update after sampling
    adv = advantages.detach()[:, None]  # (B, 1) every token of o_i shares the outcome advantage A_i
    # clamp has zero gradient outside its range, and min() picks the clipped branch exactly when clipping lowers the
    # objective: rho > 1 + eps_high with A > 0, or rho < 1 - eps_low with A < 0 (PPO, arXiv 1707.06347, eq. 7).
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)  # (B, T)
    loss = torch.where(mask, -surrogate, 0.0)  # (B, T) minus: optimisers minimise
    n = max(int(mask.sum()), 1)
    r = ratio.detach()
    metrics = {  # the two sides where clipping zeroes the gradient, as TRL logs them (clip_ratio/low_mean, high_mean)
        "clip_frac_low": ((r < 1 - eps_low) & (adv < 0) & mask).sum().item() / n,
        "clip_frac_high": ((r > 1 + eps_high) & (adv > 0) & mask).sum().item() / n,
        "ratio_mean": (r * mask).sum().item() / n,
        "adv_mean": advantages.detach().float().mean().item(),
        "num_tokens": int(mask.sum()),
    }
    return loss, metrics


def k3_kl(logp, ref_logp, mask):
    """Per-token k3 = exp(d) - d - 1 with d = ref - logp: unbiased for KL(pi || ref), >= 0 since e^d >= 1 + d.

    Schulman, "Approximating KL divergence" (2020); the GRPO paper's eq. 4. 0 on padding. Returns (B, T).
    """
    d = torch.where(mask, ref_logp.detach() - logp, 0.0)  # (B, T) the reference model is frozen
    return torch.exp(d) - d - 1


def aggregate(per_token, mask, aggregation, max_len=None, num_tokens=None, num_seqs=None):
    """Reduce a (B, T) per-token loss (0 on padding) to a scalar. See note 6 of the file docstring for the counts."""
    lengths = mask.sum(-1)  # (B,) |o_i|
    num_tokens = int(lengths.sum()) if num_tokens is None else num_tokens
    num_seqs = int((lengths > 0).sum()) if num_seqs is None else num_seqs
    if aggregation == "token-mean":
        # every token weighs the same, whatever sequence it is in (DAPO §3.3)
        return per_token.sum() / max(num_tokens, 1)
    seq_sum = per_token.sum(-1)  # (B,)
    if aggregation == "seq-mean-token-mean":
        # every sequence weighs the same, so a token of a short answer weighs more (the length bias Dr. GRPO removes)
        return (seq_sum / lengths.clamp_min(1)).sum() / max(num_seqs, 1)
    if aggregation == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_len (the max completion length)")
        # a constant denominator: Dr. GRPO divides by the generation budget, not by the realised length
        return seq_sum.sum() / (max(num_seqs, 1) * max_len)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.04,
              aggregation="seq-mean-token-mean", max_len=None, num_tokens=None, num_seqs=None):
    """The GRPO loss of the file docstring. logp/old_logp/ref_logp/mask (B, T), advantages (B,).

    num_tokens / num_seqs: counts of the whole step's batch when this call sees one micro-batch (note 6).
    Returns (loss scalar, metrics: clip_frac_low, clip_frac_high, ratio_mean, adv_mean, num_tokens, kl).
    """
    use_kl = beta != 0 and ref_logp is not None  # DAPO and Dr. GRPO run with beta = 0: no reference forward pass
    mask = validate_inputs(logp, old_logp, advantages, mask, ref_logp if use_kl else None)
    per_token, metrics = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps, clip_eps)  # (B, T)
    if use_kl:
        kl = k3_kl(logp, ref_logp, mask)  # (B, T)
        per_token = per_token + beta * kl  # per token, inside the aggregation, as the paper's eq. 3 and TRL
        metrics["kl"] = kl.detach().sum().item() / max(metrics["num_tokens"], 1)
    else:
        metrics["kl"] = 0.0
    loss = aggregate(per_token, mask, aggregation, max_len, num_tokens, num_seqs)
    return loss, metrics
