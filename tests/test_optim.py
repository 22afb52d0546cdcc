"""AdamWSR: bf16 weights and moments with stochastic rounding (plumbing/optim.py).

The first test is the reason the file exists: at lr 1e-6 on weights near 1 (bf16 ulp 2^-7), plain
bf16 AdamW never moves a weight, while stochastic rounding follows the exact (fp64) trajectory on
average. The others pin the details: fp32 storage is torch's AdamW bit for bit, the rounding is
unbiased, frozen rows survive the copy-out/copy-in that masking does, and resume is exact.

Run: .venv/bin/python -m pytest -q tests/test_optim.py
"""

import copy
import io

import pytest
import torch

from plumbing import optim

D, STEPS, LR = 16384, 1000, 1e-6


def fit(dtype, make_optimizer, w0, target):
    """STEPS of a separable least-squares fit 0.5 * sum (w - target)^2; returns w - w0 (fp64)."""
    w = torch.nn.Parameter(w0.to(dtype).clone())
    opt = make_optimizer([w])
    for _ in range(STEPS):
        opt.zero_grad()
        (0.5 * ((w.double() - target) ** 2).sum()).backward()
        opt.step()
    return w.detach().double() - w0.double()


def test_stochastic_rounding_tracks_exact_adamw_where_round_to_nearest_bf16_stalls():
    # Weights in [1, 1.1]: bf16 ulp 2^-7 = 0.0078, so an Adam step of ~lr = 1e-6 is 1/7800 ulp.
    w0 = (1 + 0.1 * torch.rand(D, generator=torch.Generator().manual_seed(0))).bfloat16()
    target = torch.full((D,), 0.5, dtype=torch.float64)  # far away: every step moves w down by ~lr
    adamw = lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1)  # noqa: E731
    exact = fit(torch.float64, adamw, w0, target)
    fp32 = fit(torch.float32, adamw, w0, target)
    nearest = fit(torch.bfloat16, adamw, w0, target)
    ours = fit(torch.bfloat16, lambda ps: optim.AdamWSR(ps, lr=LR, weight_decay=0.1), w0, target)
    # The exact path: ~STEPS * lr * (1 + wd * w) = 1.1e-3 down on every weight.
    assert exact.mean().item() == pytest.approx(-STEPS * LR * 1.105, rel=0.01)
    # Round-to-nearest bf16: not one weight moved in 1000 steps.
    assert torch.equal(nearest, torch.zeros(D, dtype=torch.float64))
    # Stochastic rounding: the mean move is the exact one within 5% (seed spread here: ~1.5%).
    # Each single weight is noisy -- it moves in whole ulps -- so only averages track.
    assert ours.mean().item() == pytest.approx(exact.mean().item(), rel=0.05)
    # fp32 itself is within 5% (it rounds each 1e-6 step to a whole number of 1.2e-7 ulps).
    assert fp32.mean().item() == pytest.approx(exact.mean().item(), rel=0.05)


def test_fp32_storage_reproduces_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(30, 7)), torch.nn.Parameter(torch.randn(5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    groups = lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]], "weight_decay": 0.0}]  # noqa
    ref = torch.optim.AdamW(groups(a), lr=1e-2, weight_decay=0.1, foreach=False)
    ours = optim.AdamWSR(groups(b), lr=1e-2, weight_decay=0.1, chunk=64)  # chunks of 64
    for step in range(20):
        grads = [torch.randn_like(p) for p in a]
        for pa, pb, g in zip(a, b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        for o in (ref, ours):
            o.param_groups[0]["lr"] = 1e-2 * (1 + step % 3)  # a scheduler changing lr
            o.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((100_000,), 1 + 2**-9)  # a quarter of the way from 1 to 1 + 2^-7
    r = optim.stochastic_round(x, gen).float()
    assert set(r.unique().tolist()) == {1.0, 1 + 2**-7}
    assert (r > 1).float().mean().item() == pytest.approx(0.25, abs=0.01)  # 7 sigma
    neg = optim.stochastic_round(-x, gen).float()
    assert set(neg.unique().tolist()) == {-1.0, -(1 + 2**-7)}  # magnitudes round the same way
    already = torch.randn(1000).bfloat16()
    assert torch.equal(optim.stochastic_round(already.float(), gen), already)


def test_frozen_rows_stay_bit_identical_under_copy_out_copy_in():
    """What masking does to keep rows fixed: copy the frozen rows of the parameter and of every
    state tensor of the parameter's shape out before step(), back after."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 16).bfloat16())
    opt = optim.AdamWSR([w], lr=1e-2, weight_decay=0.1)
    frozen = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    w0 = w.detach().clone()
    for _ in range(5):
        w.grad = torch.randn_like(w)
        tensors = [w.data] + [t for t in opt.state[w].values()
                              if isinstance(t, torch.Tensor) and t.shape == w.shape]
        saved = [t[frozen].clone() for t in tensors]
        opt.step()
        for t, s in zip(tensors, saved):
            t[frozen] = s
    state = opt.state[w]
    assert sorted(k for k, v in state.items() if isinstance(v, torch.Tensor)) == sorted(
        optim.MOMENTS)  # every state tensor is param-shaped; "step" is a plain int
    assert all(state[k].shape == w.shape for k in optim.MOMENTS)
    assert torch.equal(w[frozen], w0[frozen])
    assert (w[~frozen] != w0[~frozen]).float().mean() > 0.9  # the other rows did move


def run_steps(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def test_resume_from_state_dict_continues_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).bfloat16()
    straight = copy.deepcopy(model)
    o1 = optim.AdamWSR(straight.parameters(), lr=1e-3, seed=7)
    run_steps(straight, o1, 3, seed=1)
    run_steps(straight, o1, 3, seed=2)

    o2 = optim.AdamWSR(model.parameters(), lr=1e-3, seed=7)
    run_steps(model, o2, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = torch.nn.Linear(16, 8).bfloat16()
    resumed.load_state_dict(ckpt["model"])
    o3 = optim.AdamWSR(resumed.parameters(), lr=1e-3, seed=0)  # seed comes from the checkpoint
    o3.load_state_dict(ckpt["opt"])
    run_steps(resumed, o3, 3, seed=2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

    other = copy.deepcopy(model)  # same start, another seed: other noise, other weights
    o4 = optim.AdamWSR(other.parameters(), lr=1e-3, seed=8)
    o4.load_state_dict({**o2.state_dict(), "param_groups": [
        {**g, "seed": 8} for g in o2.state_dict()["param_groups"]]})
    run_steps(other, o4, 3, seed=2)
    assert not torch.equal(other.weight, resumed.weight)


def test_fp32_moments_of_bf16_weights_stay_fp32_through_load_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).bfloat16()
    opt = optim.AdamWSR(model.parameters(), lr=1e-3, state_dtype=torch.float32)
    run_steps(model, opt, 2, seed=0)
    m = opt.state[model.weight]["exp_avg"].clone()
    assert m.dtype == torch.float32
    fresh = optim.AdamWSR(model.parameters(), lr=1e-3, state_dtype=torch.float32)
    fresh.load_state_dict(opt.state_dict())  # torch alone would cast the moments to bf16
    assert fresh.state[model.weight]["exp_avg"].dtype == torch.float32
    assert torch.equal(fresh.state[model.weight]["exp_avg"], m)


def test_invalid_hyperparameters_are_rejected_by_name():
    with pytest.raises(ValueError, match="betas"):
        optim.AdamWSR([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))
