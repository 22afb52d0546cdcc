"""
bench/masking.py -- what LongAct's per-step masking costs, measured side by side. Not a test.

Two parts, on the embedded SmolLM2-135M-Instruct:
  1. step    one optimizer step = zero_grad, forward + backward of one batch, grad-norm clipping
             and an AdamW step (weight decay 0.1), in three variants on the same model:
               plain   optimizer.step(), no mask
               grad    mask_grads + masked_step(..., "grad")     (masked gradient only)
               frozen  mask_grads + masked_step(..., "frozen")   (rows outside copied back,
                       parameter and AdamW moments)
             A fresh per-head top-30% mask is built every step (its cost is part of "grad" and
             "frozen"). Reported: the whole step, and the update alone (masking + clip + step).
  2. prefill the decoder over the prompt with and without saliency.prefill_collector's hooks
             (the per-step statistic at no extra forward), plus finalize_state.

Medians and ratios to "plain" / "no hooks" (RESULTS.md holds them). How it measures (random
statistics, one AdamW per variant, interleaved rounds, fp32 or --bf16, threads): SOURCES.md §9.41.

Shapes: B prompts per batch, T tokens.
Run (from the repository root):
    .venv/bin/python -m bench.masking --threads 1
    .venv/bin/python -m bench.masking --threads 1 --batch 1 --seq-len 64 --repeats 1   (smoke)
"""

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if not __package__:  # run as a file, `import masking` below would not find the repository root
    sys.exit("run from the repository root as a module: python -m bench.masking")

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LONGACT_CACHE", str(ROOT / ".cache" / "longact"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

import torch  # noqa: E402  (after the environment above)

import masking  # noqa: E402
import saliency  # noqa: E402
from plumbing.common import (cpu_name, head_dim_of, mix_seed,  # noqa: E402
                             positions_from_mask, qk_modules)
from plumbing.policy import load_policy  # noqa: E402

# Letters: B batch rows, T tokens, C channels of one q/k matrix.
VARIANTS = ("plain", "grad", "frozen")


def interleaved(contenders: dict, repeats: int) -> dict:
    """{name: [seconds per round]} of zero-arg functions run side by side (one warm-up round;
    odd rounds reverse the order, so a slow drift does not always hit the same contender)."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for r in range(repeats):
        for name in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
            times[name].append(contenders[name]())
    return times


def make_step(model, variant: str, ids, autocast, ratio: float):
    """A zero-arg function running one optimizer step; returns (whole step, update part) seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1)
    names = {n: m.weight.shape[0] for n, m in qk_modules(model).items()}
    head_dim = head_dim_of(model.config)
    count = [0]

    def step():
        count[0] += 1
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        t1 = time.perf_counter()
        if variant != "plain":  # a new mask every step, as a per-step schedule builds it
            g = torch.Generator().manual_seed(mix_seed("bench", count[0]))
            stats = {n: torch.rand(c, generator=g) for n, c in names.items()}  # (C,) each
            masks = masking.build_masks(stats, ratio, "topk", head_dim=head_dim)
            masking.mask_grads(model, masks)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if variant == "plain":
            opt.step()
        else:
            masking.masked_step(opt, model, masks, variant)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    return step


def bench_step(model, ids, repeats: int, autocast, ratio: float) -> dict:
    """Part 1 -> {variant: (median whole step, median update part)}."""
    model.train()
    steps = {v: make_step(model, v, ids, autocast, ratio) for v in VARIANTS}
    times = interleaved(steps, repeats)
    return {v: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for v, ts in times.items()}


def bench_prefill(model, ids, repeats: int, autocast) -> dict:
    """Part 2 -> {"no hooks": s, "hooks": s} medians of one prefill forward (plus finalize)."""
    model.eval()
    mask = torch.ones_like(ids)  # (B, T)
    pos = positions_from_mask(mask)  # (B, T)

    def prefill(hooked: bool):
        hook, state = saliency.prefill_collector(model) if hooked else (None, None)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(), (hook(mask) if hooked else nullcontext()):
            model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                use_cache=False)
        if hooked:
            saliency.finalize_state(state)
        return time.perf_counter() - t0

    times = interleaved({"no hooks": lambda: prefill(False), "hooks": lambda: prefill(True)},
                        repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description="Cost of LongAct's per-step masking, side by side.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--ratio", type=float, default=masking.DEFAULT_RATIO)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for forward + backward")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--parts", nargs="+", choices=("step", "prefill"), default=["step", "prefill"])
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(0)
    model, _ = load_policy(a.model)  # fp32 weights
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq_len))  # (B, T)
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.bf16 else nullcontext)
    print(f"model {a.model}, batch {a.batch} x {a.seq_len} tokens, "
          f"{'bf16 autocast' if a.bf16 else 'fp32'}, ratio {a.ratio} per head")
    print(f"  CPU: {cpu_name()}; torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; "
          f"{os.cpu_count()} cores; {torch.get_num_threads()} torch threads; "
          f"1-min load average {os.getloadavg()[0]:.1f}")
    print(f"  medians of {a.repeats} timed round(s) after 1 warm-up round")
    if "step" in a.parts:
        res = bench_step(model, ids, a.repeats, autocast, a.ratio)
        base_step, base_update = res["plain"]
        print(f"{'step (AdamW wd 0.1)':<22}{'whole step s':>14}{'ratio':>8}{'update s':>12}"
              f"{'ratio':>8}")
        for v, (whole, update) in res.items():
            print(f"  {v:<20}{whole:>14.3f}{whole / base_step:>8.3f}{update:>12.4f}"
                  f"{update / base_update:>8.3f}")
    if "prefill" in a.parts:
        res = bench_prefill(model, ids, a.repeats, autocast)
        print(f"{'prefill forward':<22}{'median s':>14}{'ratio':>8}")
        for name, s in res.items():
            print(f"  {name:<20}{s:>14.3f}{s / res['no hooks']:>8.3f}")


if __name__ == "__main__":
    main()
