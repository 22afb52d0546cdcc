"""
optim.py -- AdamW for bf16 weights: fp32 math, bf16 storage, stochastic rounding on each store.

Why. Adam with fp32 master weights, gradients and moments costs 16 bytes per parameter, so the
update of the paper's Qwen3-8B (SOURCES.md §1.6) does not fit one 141 GB GPU; bf16 weights,
gradients and moments cost 8 (`python -m plumbing.plan --model qwen3-8b --optimizer bf16-sr`).
But bf16 keeps 8 significant bits, and at a small learning rate round-to-nearest drops every
Adam step (SOURCES.md §8.8; tests/test_optim.py shows it). Stochastic rounding (Zamirai et al.,
arXiv 2010.06192) rounds up with probability equal to the distance from the lower neighbour in
ulps: the stored value is unbiased, so the expected trajectory is the exact one. We do the whole
AdamW update in fp32 and round once per store:

    w <- w (1 - lr wd)                             decoupled weight decay (AdamW)
    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    store w, m, v: stochastic rounding where the storage is bf16, plain copy where it is fp32

The same ops as torch's single-tensor AdamW, in the same order, so fp32 parameters with fp32 state
give exactly torch.optim.AdamW(foreach=False) (a test checks it bit for bit). Every state tensor
but the step count has the parameter's shape, so masking.py's row freezing works unchanged.
Choices (bf16 moments, the noise's seed, flat chunks, bf16 gradient accumulation, why not Kahan
summation): SOURCES.md §9.38.

Shapes: every function works on a tensor of any shape (flat chunks inside the optimizer).
Run: .venv/bin/python -m pytest -q tests/test_optim.py
"""

import torch
from torch import Tensor

from plumbing.common import mix_seed

MOMENTS = ("exp_avg", "exp_avg_sq")  # the param-shaped state tensors (step is a plain int)


def stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """fp32 -> bf16, rounding up with probability (x - lower) / ulp: unbiased, E[result] = x.

    bf16 is the top 16 bits of fp32. Adding uniform noise in [0, 2^16) to the low 16 bits carries
    into bit 16 with exactly that probability; truncating the low bits then gives the result.
    The sign bit is untouched, so magnitudes round the same way for negative numbers. Values that
    are already bf16 (low bits 0) come back exactly. Example: 1 + 2^-9 lies a quarter of the way
    from 1 to 1 + 2^-7 and becomes 1 + 2^-7 with probability 1/4, 1 otherwise.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000


def store(dst: Tensor, src: Tensor, generator: torch.Generator | None) -> None:
    """Write the fp32 result `src` into `dst`: stochastic rounding into bf16, a plain copy else."""
    if dst.dtype == torch.bfloat16:
        dst.copy_(stochastic_round(src, generator))
    elif dst.data_ptr() != src.data_ptr():
        dst.copy_(src)  # fp32 storage: `src` may already be `dst` itself (updated in place)


@torch.no_grad()
def adamw_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 generator: torch.Generator | None = None) -> None:
    """One AdamW step of one tensor (or a flat slice of it), in place; arithmetic in fp32.

    The op sequence is torch's `_single_tensor_adam` with decoupled decay, so fp32 storage gives
    the same bits; bf16 storage gets one stochastic rounding per stored tensor.
    """
    w, m, v, g = p.float(), exp_avg.float(), exp_avg_sq.float(), grad.float()  # fp32 views/copies
    w.mul_(1 - lr * weight_decay)  # decoupled decay, before the update (AdamW)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    w.addcdiv_(m, denom, value=-lr / bias_correction1)
    for dst, src in ((p, w), (exp_avg, m), (exp_avg_sq, v)):
        store(dst, src, generator)


class AdamWSR(torch.optim.Optimizer):
    """AdamW whose weights and moments may be bf16: fp32 math, stochastic rounding when storing.

    AdamWSR(model.parameters(), lr=1e-6, weight_decay=0.1, seed=run_seed) on a bf16 model.
    state_dtype=None keeps m and v in each parameter's dtype; torch.float32 keeps them in fp32.
    Param groups work as in torch (per-group lr, weight_decay; a scheduler changing group["lr"]).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0, state_dtype=None,
                 chunk: int = 1 << 24):
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and 0 <= betas[0] < 1
                and 0 <= betas[1] < 1 and chunk > 0):
            raise ValueError(f"AdamWSR: invalid lr {lr}, betas {betas}, eps {eps}, "
                             f"weight_decay {weight_decay} or chunk {chunk}")
        self.state_dtype, self.chunk = state_dtype, chunk
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      seed=seed))

    def _init_state(self, p: Tensor) -> dict:
        if not p.is_contiguous():
            raise ValueError(f"AdamWSR: parameter of shape {tuple(p.shape)} is not contiguous; "
                             "the chunked update needs a flat view")
        dtype = self.state_dtype or p.dtype
        return {"step": 0, **{k: torch.zeros_like(p, dtype=dtype) for k in MOMENTS}}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1  # position of the tensor in the param groups: part of its noise seed
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue  # like AdamW: no gradient, no step (and no decay)
                if p.grad.is_sparse:
                    raise ValueError("AdamWSR does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                gen = torch.Generator(device=p.device)
                gen.manual_seed(mix_seed(group["seed"], state["step"], index))  # §9.38
                flat = [t.view(-1) for t in (p, state["exp_avg"], state["exp_avg_sq"])]
                g = p.grad.reshape(-1)
                for s in range(0, p.numel(), self.chunk):  # §9.38: bounded fp32 temporaries
                    part = slice(s, s + self.chunk)
                    adamw_update(flat[0][part], g[part], flat[1][part], flat[2][part],
                                 state["step"], lr, beta1, beta2, group["eps"],
                                 group["weight_decay"], gen)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every loaded state tensor to its parameter's dtype; keep m, v in ours."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, i in zip(params, saved):
            for k in MOMENTS:
                if k in state_dict["state"].get(i, {}):
                    self.state[p][k] = state_dict["state"][i][k].to(
                        device=p.device, dtype=self.state_dtype or p.dtype, copy=True)


def make_optimizer(model, args):
    """AdamW (fp32 state) or the bf16 stochastic-rounding AdamW (optim.py), and a linear warm-up.
    Masks act in masking.masked_step, so one param group with decay serves every matrix."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "bf16-sr":
        optimizer = AdamWSR(params, lr=args.lr, weight_decay=args.weight_decay,
                                  seed=mix_seed(args.seed, "optimizer"))
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=args.weight_decay, foreach=False)
    warm = max(1, args.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    return optimizer, scheduler
