"""
grpo.py -- the GRPO objective (DeepSeekMath, arXiv 2402.03300, §4.1; SOURCES.md §3): pure functions,
tensors in, (value, metrics) out.

For N prompts with G sampled completions o_1..o_G each (B = N*G rows), rewards r_i, and per
token t of o_i:

    A_i     = (r_i - mean(r of its group)) / (std(r of its group) + eps)   one per completion
    rho_i,t = exp(logp_i,t - old_logp_i,t)                                  ratio to the sampler
    k3_i,t  = exp(ref_i,t - logp_i,t) - (ref_i,t - logp_i,t) - 1            KL estimate, >= 0
    l_i,t   = -min(rho_i,t * A_i, clip(rho_i,t, 1 - clip_eps, 1 + clip_eps) * A_i) + beta * k3_i,t
    loss    = (1/B) * sum_i (1/|o_i|) * sum_t l_i,t        "seq-mean-token-mean", the paper's

Against TRL and verl (choices: SOURCES.md §9.10-9.12): TRL's Bessel std with eps 1e-4 and
its `scale_rewards` (group, batch, none); an all-equal group gets advantage exactly 0; symmetric
clip 0.2 without verl's dual clip; k3 clamped to [-10, 10] as verl's `low_var_kl` (one token far
below the reference would otherwise swamp the batch), `kl_max` logging the unclamped largest;
three aggregations (seq-mean-token-mean, token-mean, seq-mean-token-sum-norm). Micro-batch
invariance: pass the whole step's counts (`batch_counts`) and call backward() on each
micro-batch's loss unscaled; the summed gradient is then the full-batch gradient.

A worked example (one group of 4, one correct answer, each aggregation by hand) is
tests/test_grpo.py::test_worked_example.

Shapes: N prompts (= groups), G group size, B = N*G completions, T completion tokens (right-padded)
Run the tests: .venv/bin/python -m pytest -q tests/test_grpo.py
"""

import torch

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def check_finite(**tensors):
    """Raise a ValueError naming the tensor holding NaN/inf: one NaN would poison every weight."""
    for name, x in tensors.items():
        if x is not None and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{name} has {bad} non-finite value(s) (NaN/inf); refusing to build a "
                             "loss from it. Typical causes: -inf log-probs of tokens outside a "
                             "top-k/top-p filter, or a NaN reward.")


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """A_i = (r_i - group mean) / (std + eps); rewards (B,) group after group. -> (A, metrics)."""
    check_finite(rewards=rewards)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    B, G = rewards.numel(), group_size
    if G < 1 or B % G:
        raise ValueError(f"{B} rewards do not split into groups of {G}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)  # int/bool rewards -> float
    r = rewards.to(dtype).view(-1, G)  # (N, G)
    # Compare with the first member instead of testing std == 0: the mean of equal floats can be
    # off by one ulp, and that ulp / eps = 1e-4 would give a signal-less group an "advantage".
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)  # (N, 1)
    centred = r - r.mean(dim=1, keepdim=True)  # (N, G) the group mean: GRPO's baseline (no critic)
    if scale == "none":
        adv = centred  # Dr. GRPO: dividing by the std up-weights near-uniform groups
    else:
        # Bessel-corrected (torch's default correction=1), as TRL and verl. A group of one has no
        # std; it is all-equal anyway, so 0 stands in to avoid torch's degrees-of-freedom warning.
        if scale == "group":
            std = r.std(dim=1, keepdim=True) if G > 1 else torch.zeros_like(centred)  # (N, 1)
        else:
            std = r.std() if B > 1 else r.new_zeros(())  # () one scale for the step, TRL "batch"
        adv = centred / (std + eps)  # (N, G)
    adv = torch.where(all_equal, 0.0, adv)  # (N, G) exactly 0, never 0/0
    metrics = {"reward_mean": r.mean().item(), "reward_std": r.std().item() if B > 1 else 0.0,
               "frac_all_equal_groups": all_equal.float().mean().item()}
    return adv.reshape(B), metrics  # (B,)


def batch_counts(mask):
    """(num_tokens, num_seqs) of a whole step's batch: the normalisers that make micro-batch losses
    add up exactly. A sequence counts if it has at least one loss token (rows emptied by DAPO's
    overlong filtering do not count)."""
    lengths = mask.sum(-1)  # (B,) |o_i|
    return int(lengths.sum()), int((lengths > 0).sum())


def validate_inputs(logp, old_logp, advantages, mask, ref_logp=None):
    """Check shapes and finiteness; return the mask as bool (B, T). Shared with dapo.py."""
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp, mask must all be (B, T); got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (B,) = {tuple(logp.shape[:1])}, "
                         f"got {tuple(advantages.shape)}")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must be {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    check_finite(logp=logp, old_logp=old_logp, advantages=advantages, ref_logp=ref_logp)
    return mask.bool()  # 1 for completion tokens incl. the sampled EOS, built from positions


def clipped_surrogate(logp, old_logp, advantages, mask, eps_low, eps_high):
    """Per-token -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A), 0 on padding. -> (loss (B, T),
    metrics). GRPO passes eps_low == eps_high; DAPO's clip-higher decouples them. mask is bool."""
    # Zero the log-ratio on padding *before* exp: padding log-probs are arbitrary, exp of a big
    # difference overflows to inf, and inf * 0 = NaN would leak into the sum. torch.where also sends
    # exactly zero gradient there.
    log_ratio = torch.where(mask, logp - old_logp.detach(), 0.0)  # (B, T) pi_old is a constant
    ratio = torch.exp(log_ratio)  # (B, T) rho = pi / pi_old, 1 on the first update after sampling
    adv = advantages.detach()[:, None]  # (B, 1) every token of o_i shares the outcome advantage A_i
    # clamp has zero gradient outside its range, and min() picks the clipped branch exactly when
    # clipping lowers the objective: rho > 1 + eps_high with A > 0, or rho < 1 - eps_low with A < 0
    # (PPO, arXiv 1707.06347, eq. 7).
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    loss = torch.where(mask, -surrogate, 0.0)  # (B, T) minus: optimisers minimise
    n = max(int(mask.sum()), 1)
    r = ratio.detach()
    metrics = {  # the two sides where clipping zeroes the gradient, as TRL logs them
        "clip_frac_low": ((r < 1 - eps_low) & (adv < 0) & mask).sum().item() / n,
        "clip_frac_high": ((r > 1 + eps_high) & (adv > 0) & mask).sum().item() / n,
        "ratio_mean": (r * mask).sum().item() / n,
        "ratio_dev_max": ((r - 1).abs() * mask).max().item() if mask.any() else 0.0,
        "adv_mean": advantages.detach().float().mean().item(),
        "num_tokens": int(mask.sum()),
    }
    return loss, metrics


def k3_kl(logp, ref_logp, mask, clamp=None):
    """Per-token k3 = exp(d) - d - 1 with d = ref - logp: unbiased for KL(pi || ref), and >= 0.

    Schulman, "Approximating KL divergence" (2020); the GRPO paper's eq. 4. 0 on padding. (B, T).
    clamp=c: verl's low_var_kl, k3 clamped to [-c, c] (§9.11); clamped tokens get zero gradient.
    """
    d = torch.where(mask, ref_logp.detach() - logp, 0.0)  # (B, T) the reference model is frozen
    if clamp is None:
        return torch.exp(d) - d - 1
    # verl also clamps d to [-20, 20] first. It never changes a clamped value (k3 >= 19 there), but
    # keeps exp finite: an inf k3 behind a zero-gradient clamp would give 0 * inf = NaN in backward.
    d = d.clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(-clamp, clamp)


def aggregate(per_token, mask, aggregation, max_len=None, num_tokens=None, num_seqs=None):
    """Reduce a (B, T) per-token loss (0 on padding) to a scalar. Counts: §9.12."""
    lengths = mask.sum(-1)  # (B,) |o_i|
    num_tokens = int(lengths.sum()) if num_tokens is None else num_tokens
    num_seqs = int((lengths > 0).sum()) if num_seqs is None else num_seqs
    if aggregation == "token-mean":
        # every token weighs the same, whatever sequence it is in (DAPO §3.3)
        return per_token.sum() / max(num_tokens, 1)
    seq_sum = per_token.sum(-1)  # (B,)
    if aggregation == "seq-mean-token-mean":
        # every sequence weighs the same, so a token of a short answer weighs more (the length bias
        # Dr. GRPO removes)
        return (seq_sum / lengths.clamp_min(1)).sum() / max(num_seqs, 1)
    if aggregation == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_len "
                             "(the max completion length)")
        # a constant denominator: Dr. GRPO divides by the generation budget, not the realised length
        return seq_sum.sum() / (max(num_seqs, 1) * max_len)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.04,
              aggregation="seq-mean-token-mean", max_len=None, num_tokens=None, num_seqs=None,
              kl_clamp=10.0):
    """The GRPO loss of the file docstring. logp/old_logp/ref_logp/mask (B, T), advantages (B,).

    num_tokens / num_seqs: counts of the whole step's batch when this call sees a micro-batch
    (§9.12). kl_clamp: bound on each token's k3 (§9.11; None = unclamped, as TRL).
    Returns (loss scalar, metrics: clip_frac_low, clip_frac_high, ratio_mean, adv_mean, num_tokens,
    kl = mean token k3 as used in the loss, kl_max = largest unclamped token k3; both 0 without KL).
    """
    use_kl = beta != 0 and ref_logp is not None  # DAPO, Dr. GRPO: beta = 0, no reference forward
    mask = validate_inputs(logp, old_logp, advantages, mask, ref_logp if use_kl else None)
    per_token, metrics = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps, clip_eps)
    metrics["kl"], metrics["kl_max"] = 0.0, 0.0
    if use_kl:
        kl = k3_kl(logp, ref_logp, mask, kl_clamp)  # (B, T)
        per_token = per_token + beta * kl  # per token, inside the aggregation (eq. 3, TRL)
        metrics["kl"] = kl.detach().sum().item() / max(metrics["num_tokens"], 1)
        if mask.any():
            raw = k3_kl(logp.detach(), ref_logp, mask)  # (B, T) unclamped, may be inf
            metrics["kl_max"] = raw[mask].max().item()
    loss = aggregate(per_token, mask, aggregation, max_len, num_tokens, num_seqs)
    return loss, metrics
